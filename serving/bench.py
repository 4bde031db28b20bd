"""Experiments: one workload through one routing setup, over real HTTP or in the simulator.

`http_run` starts a loopback fleet (serving/fleetrun.py) whose routers use the given policy, or, for
a peer router, the engines alone behind `vllm-router` (PyPI package vllm-router, the vLLM project's
Rust router; optional) with its own policy; then replays the workload through it with the load
generator, time-scaled, killing a region's engines at the failure time. `sim_run` runs the same
workload, fleet and policy in the simulator. Both return a `report.RunResult`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpufleet.serving import loadgen
from gpufleet.serving.outcomes import summarize
from gpufleet.serving.report import RunResult, failed_between

if TYPE_CHECKING:
    from gpufleet.stacks.spec import Fleet

# vllm-router 0.1.17's single-pool policies a user would pick for a fleet of engines (its --policy;
# random, round_robin and consistent_hash are left out: load-blind)
PEER_POLICIES = ("power_of_two", "cache_aware", "kv_aware", "sticky_least_loaded")


@dataclass(frozen=True)
class Setup:
    """What both drivers share: the fleet, its regions and engine shape, and the failure."""

    fleet: Fleet
    regions: tuple[str, ...]
    engines_per_region: int = 1
    num_gpu_blocks: int | None = None  # small engines saturate at request rates loopback can carry
    fail_region: str | None = None
    fail_at_s: float | None = None  # model seconds
    fail_for_s: float | None = None
    reach: str = "regional"  # router reach (regional | global): sim/core.py, fleetrun.py
    ttft_slo_s: float | None = None  # override the fleet's TTFT target

    @property
    def failure(self) -> str | None:
        if self.fail_region is None or self.fail_at_s is None:
            return None
        tail = f"+{self.fail_for_s:g}" if self.fail_for_s else ""
        return f"{self.fail_region}@{self.fail_at_s:g}{tail}"


def peer_router_available() -> bool:
    return importlib.util.find_spec("vllm_router") is not None or shutil.which("vllm-router") is not None


def sim_run(
    setup: Setup, items: Sequence[loadgen.WorkItem], policy: str, trace: str, load: float,
    label: str | None = None,
) -> RunResult:  # fmt: skip
    """`label` names the run in reports (default: the policy, with `@global` under global reach)."""
    from gpufleet.serving.sim.core import Failure, SimConfig, Simulator

    failures = []
    if setup.failure:
        failures = [Failure.parse(setup.failure)]
    sim = Simulator(
        setup.fleet,
        SimConfig(policy=policy, failures=failures, engines_per_region=setup.engines_per_region,
                  num_gpu_blocks=setup.num_gpu_blocks, regions=setup.regions, reach=setup.reach,
                  ttft_slo_s=setup.ttft_slo_s),
    )  # fmt: skip
    r = sim.run(items)
    return RunResult(
        driver="sim", trace=trace, load_scale=load, summary=r.summary, failure=setup.failure,
        policy=label or (policy if setup.reach == "regional" else f"{policy}@{setup.reach}"),
        failed_during_failure=r.failed_during_failure, records=r.records, kv_series=r.kv_series,
        events=r.events, extra=r.extra(),
    )  # fmt: skip


async def _replay(items, targets, model, time_scale, lf, setup: Setup, events: list) -> list:
    load = asyncio.create_task(loadgen.run_http(items, targets, model, time_scale=time_scale))
    t0 = time.monotonic()
    if setup.fail_region and setup.fail_at_s is not None:
        await asyncio.sleep(max(0.0, setup.fail_at_s / time_scale - (time.monotonic() - t0)))
        if not load.done():
            lf.kill_region(setup.fail_region)
            events.append((setup.fail_at_s, f"{setup.fail_region} down"))
            if setup.fail_for_s:
                await asyncio.sleep(setup.fail_for_s / time_scale)
                await asyncio.to_thread(lf.restore_region, setup.fail_region)
                events.append((setup.fail_at_s + setup.fail_for_s, f"{setup.fail_region} restored"))
    return await load


def http_run(
    setup: Setup,
    items: Sequence[loadgen.WorkItem],
    policy: str,
    trace: str,
    load: float,
    time_scale: float,
    workdir: Path,
    label: str | None = None,
) -> RunResult:
    """Replay over HTTP. `policy` is one of ours, under `setup.reach` (regional: a router per region;
    global: one router over every engine), or "vllm-router:<policy>" for the peer router (always one
    global router). `label` names the run in reports (default: as `sim_run`'s)."""
    from gpufleet.serving.fleetrun import LocalFleet
    from gpufleet.serving.procs import free_port

    fleet = setup.fleet
    peer = policy.split(":", 1)[1] if policy.startswith("vllm-router:") else None
    blocks = {k: setup.num_gpu_blocks for k in setup.regions} if setup.num_gpu_blocks else {}
    lf = LocalFleet(fleet, setup.regions, workdir, engines_per_region=setup.engines_per_region,
                    time_scale=time_scale, policy=policy if peer is None else "headroom",
                    num_gpu_blocks=blocks, start_routers=peer is None,
                    reach=setup.reach if peer is None else "regional")  # fmt: skip
    events: list[tuple[float, str]] = []
    model = fleet.models[0].name
    with lf:
        if peer is None:
            targets = lf.router_urls
        else:
            port = free_port()
            urls = [u for us in lf.engine_urls.values() for u in us]
            lf.sup.start("vllm-router", _peer_argv(urls, peer, port))
            deadline = time.monotonic() + 60
            lf._wait("vllm-router", f"http://127.0.0.1:{port}/health", deadline)
            # One global router: every client region's requests go to it.
            targets = {k: f"http://127.0.0.1:{port}" for k in setup.regions}
        records = asyncio.run(_replay(items, targets, model, time_scale, lf, setup, events))
        stalled = lf.stalled_share()
    ttft, tpot = fleet.slo.ttft_ms / 1000, fleet.slo.tpot_ms / 1000
    duration = max(i.at_s for i in items)
    failed = 0
    if setup.failure and setup.fail_at_s is not None:  # a failure has its time (Setup.failure)
        failed = failed_between(records, setup.fail_at_s, setup.fail_at_s + (setup.fail_for_s or duration))
    return RunResult(
        driver="http", trace=trace, load_scale=load,
        policy=label or (policy if peer or setup.reach == "regional" else f"{policy}@{setup.reach}"),
        summary=summarize(records, ttft, tpot, duration), failure=setup.failure,
        failed_during_failure=failed,
        records=records, events=events,
        extra={"time_scale": time_scale, "gpu": {k: fleet.region(k).gpu for k in setup.regions},
               **({} if stalled is None else {"emulator_stalled_share": round(stalled, 4)})},
    )  # fmt: skip


def _peer_argv(worker_urls: list[str], policy: str, port: int) -> list[str]:
    import sys

    from gpufleet.serving.procs import free_port

    exe = shutil.which("vllm-router")
    head = [exe] if exe else [sys.executable, "-m", "vllm_router.launch_router"]
    return [
        *head,
        "--worker-urls",
        *worker_urls,
        "--policy",
        policy,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # its Prometheus exporter listens on a fixed port (29000) by default: a second router on the
        # machine (another run, a test beside this one) would fail to start
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(free_port()),
    ]
