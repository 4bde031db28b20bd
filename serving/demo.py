"""`gpufleet demo`: the default policy and the best baseline, side by side, live, through a region failure.

Two fleets on loopback from the same fleet file (serving/fleetrun.py), each with the same three
regions of different clouds and GPU types and the same emulated engines: one routes with the policy
the router ships, a router per region as deployed; the other with the best baseline of the routing
results (docs/results.md), given one router over every engine, its best case. The load generator
(serving/loadgen.py) sends both the same streaming completions at the same times, each to the
router of the request's client region. Half way the region with the most capacity loses its
engines in both fleets (SIGKILL); at three quarters they come back. A rich dashboard shows, per
fleet and region, the KV usage, free tokens, running and waiting requests (engines' /metrics),
requests served, served outside their client's region, and failures (the client's records). At the
end: a summary of both and a report folder (report.md, results.json, plots).

One clock everywhere: trace time (engine seconds; wall seconds x time_scale), as the report uses.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.serving import loadgen
from gpufleet.serving.outcomes import FAILED, OK, RequestRecord, summarize

DEMO_REGIONS = ("aws-us-west-2", "gcp-us-central1", "azure-eastus")  # L40S, H100, A100 in the example fleet
# The best baseline of docs/results.md on every trace (global reach): SkyServe's instance-aware
# least load. The demo gives it one router over every engine, as the results do.
BEST_BASELINE = "instance-aware"


@dataclass
class DemoConfig:
    regions: tuple[str, ...] = DEMO_REGIONS
    duration_s: float = 60.0  # wall seconds of load
    time_scale: float = 2.0  # engine seconds per wall second
    load_scale: float = 3.0  # x the profile's request rate
    profile: str = "conv"
    trace: Path | None = None
    engines_per_region: int = 1
    fail_region: str | None = None  # default: the region with the most KV capacity
    live: bool = True
    report_dir: Path = Path("results/demo")
    seed: int = 0
    policy: str = "default"  # a router per region, as deployed
    baseline: str | None = BEST_BASELINE  # one router over every engine; None: the default alone


@dataclass
class RegionState:
    up: bool = True
    kv: float = 0.0
    free_tokens: float = 0.0
    running: int = 0
    waiting: int = 0
    served: int = 0
    elsewhere: int = 0  # requests from this region's clients served in another region
    failures: int = 0


@dataclass
class Arm:
    """One routing setup of the demo: its policy and reach, its fleet, what its clients saw."""

    policy: str
    reach: str  # regional | global
    states: dict[str, RegionState]
    records: list[RequestRecord] = field(default_factory=list)
    continuations: float = 0.0
    kv_series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    lf: Any = None  # its LocalFleet while running
    stalled_share: float | None = None  # its emulated engines' (LocalFleet.stalled_share), at the end

    @property
    def label(self) -> str:
        return f"{self.policy}@{self.reach}"

    @property
    def title(self) -> str:
        where = "a router per region (as deployed)" if self.reach == "regional" else "one router over every engine"
        return f"{self.policy}, {where}"

    def on_done(self, rec: RequestRecord) -> None:
        self.records.append(rec)
        if rec.outcome == OK and rec.region in self.states:
            self.states[rec.region].served += 1
            if rec.client_region in self.states and rec.region != rec.client_region:
                self.states[rec.client_region].elsewhere += 1
        if rec.outcome == FAILED and rec.client_region in self.states:
            self.states[rec.client_region].failures += 1


@dataclass
class DemoResult:
    arms: list[Arm]
    report: Path
    events: list[tuple[float, str]] = field(default_factory=list)  # trace time


def _capacity(fleet, key: str) -> float:
    from gpufleet.stacks import catalog

    return catalog.gpu(fleet.region(key).gpu).memory_gib


def _workload(cfg: DemoConfig, regions: list[str]) -> list[loadgen.WorkItem]:
    model_s = cfg.duration_s * cfg.time_scale
    if cfg.trace is not None:
        items = loadgen.from_trace(cfg.trace, load_scale=cfg.load_scale, duration_s=model_s * cfg.load_scale)
        items = [i for i in items if i.at_s < model_s]
    else:
        items = loadgen.synthetic(cfg.profile, model_s, cfg.load_scale, cfg.seed)
    return loadgen.assign_clients(items, regions, seed=cfg.seed)


async def _poll(session, arm: Arm) -> None:
    """One look at every engine's and router's /metrics of one arm's fleet."""
    from gpufleet.serving.router.signals import MetricsError, parse_metrics
    from prometheus_client.parser import text_string_to_metric_families

    lf = arm.lf

    async def text(url: str) -> str | None:
        try:
            async with session.get(url) as resp:
                return await resp.text() if resp.status == 200 else None
        except Exception:  # noqa: BLE001 - a dead engine is the point of the demo
            return None

    for key, urls in lf.engine_urls.items():
        st = arm.states[key]
        samples = []
        for body in await asyncio.gather(*(text(u + "/metrics") for u in urls)):
            if body is None:
                continue
            try:
                samples.append(parse_metrics(body, time.monotonic()))
            except MetricsError:
                continue
        st.up = bool(samples)
        st.kv = sum(s.kv_usage for s in samples) / len(urls) if samples else 0.0
        st.free_tokens = sum(s.free_tokens for s in samples)
        st.running = sum(s.running for s in samples)
        st.waiting = sum(s.waiting for s in samples)
    continuations = 0.0
    for url in set(lf.router_urls.values()):  # one URL for every region under global reach
        body = await text(url + "/metrics")
        for fam in text_string_to_metric_families(body or ""):
            for sample in fam.samples:
                if sample.name == "gpufleet_router_continuations_total":
                    continuations += sample.value
    arm.continuations = max(arm.continuations, continuations)


def _headline(arm: Arm, ttft: float, tpot: float, now_t: float) -> str:
    recs = arm.records
    done = len(recs)
    met = sum(1 for r in recs if r.meets(ttft, tpot))
    good = met / now_t if now_t > 0 else 0.0
    return (
        f"{arm.title}: done {done}, SLO met {100 * met / done if done else 100:.1f}%, goodput "
        f"{good:.2f}/s, failed {sum(1 for r in recs if r.outcome == FAILED)}, continued {arm.continuations:.0f}"
    )


def _render(arms: list[Arm], cfg: DemoConfig, fleet, elapsed: float, sent: int, events):
    from rich import box
    from rich.console import Group, RenderableType
    from rich.table import Table
    from rich.text import Text

    ttft = fleet.slo.ttft_ms / 1000
    tpot = fleet.slo.tpot_ms / 1000
    # One clock everywhere: trace time (engine seconds; wall time x time_scale), as in the report.
    now_t, end_t = elapsed * cfg.time_scale, cfg.duration_s * cfg.time_scale
    lines: list[RenderableType] = [
        Text(
            f"gpufleet demo: {fleet.fleet}, the same load into {len(arms)} fleet(s)   trace time "
            f"t={now_t:5.1f}/{end_t:.0f} s (time x{cfg.time_scale:g})   sent {sent}",
            style="bold",
        ),
        Text("free: KV tokens free; run, wait: requests running and waiting in the engines; away: the region's "
             "clients' requests served in another region", style="grey50"),
    ]
    for arm in arms:
        lines += [Text(""), Text(_headline(arm, ttft, tpot, now_t), style="bold")]
        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
        for col in ("region (GPU)", "state", "KV usage", "free", "run", "wait", "served", "away", "failed"):
            t.add_column(col, justify="left" if col in ("region (GPU)", "state", "KV usage") else "right",
                         no_wrap=True)  # fmt: skip
        for key, st in arm.states.items():
            bar_len = 10
            fill = round(st.kv * bar_len)
            color = "green" if st.kv < 0.7 else ("yellow" if st.kv < 0.9 else "red")
            bar = Text("█" * fill, style=color) + Text("░" * (bar_len - fill), style="grey50")
            bar += Text(f" {100 * st.kv:3.0f}%")
            state = Text("up", "green") if st.up else Text("DOWN", "bold red")
            t.add_row(f"{key} ({fleet.region(key).gpu})", state, bar, f"{st.free_tokens:,.0f}", str(st.running),
                      str(st.waiting), str(st.served), str(st.elsewhere), str(st.failures))  # fmt: skip
        lines.append(t)
    if events:
        lines.append(
            Text("  ".join(f"[t={w * cfg.time_scale:.0f} s] {what}" for w, what in events), style="bold")
        )
    return Group(*lines)


async def run_demo(fleet, cfg: DemoConfig, workdir: Path, out=None) -> DemoResult:
    """Run the whole demo; `out` is a rich Console (None: quiet)."""
    import contextlib

    import aiohttp
    from gpufleet.serving.fleetrun import LocalFleet, stall_warning
    from gpufleet.serving.report import RunResult, failed_between, write_report

    regions = list(cfg.regions)
    fail_region = cfg.fail_region or max(regions, key=lambda k: _capacity(fleet, k))
    items = _workload(cfg, regions)
    model = fleet.models[0].name
    setups = [(cfg.policy, "regional")] + ([(cfg.baseline, "global")] if cfg.baseline else [])
    arms = [Arm(p, reach, {k: RegionState() for k in regions}, kv_series={k: [] for k in regions})
            for p, reach in setups]  # fmt: skip
    events: list[tuple[float, str]] = []  # wall seconds here; shown and reported in trace time

    with contextlib.ExitStack() as stack:
        for i, arm in enumerate(arms):
            arm.lf = stack.enter_context(
                LocalFleet(fleet, regions, workdir / f"fleet{i}", engines_per_region=cfg.engines_per_region,
                           time_scale=cfg.time_scale, policy=arm.policy, reach=arm.reach)  # fmt: skip
            )
        t0 = time.monotonic()
        loads = [
            asyncio.create_task(loadgen.run_http(items, arm.lf.router_urls, model, time_scale=cfg.time_scale,
                                                 on_done=arm.on_done))  # fmt: skip
            for arm in arms
        ]
        fail_at, restore_at = 0.5 * cfg.duration_s, 0.75 * cfg.duration_s
        failed = restored = False
        live = None
        if out is not None and cfg.live:
            from rich.live import Live

            live = Live(console=out, refresh_per_second=4, transient=False)
            live.start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
                while not all(load.done() for load in loads):
                    elapsed = time.monotonic() - t0
                    if not failed and elapsed >= fail_at:
                        for arm in arms:  # the same failure at the same moment in every fleet
                            arm.lf.kill_region(fail_region)
                        failed = True
                        events.append((elapsed, f"{fail_region} engines killed"))
                    if failed and not restored and elapsed >= restore_at:
                        await asyncio.gather(*(asyncio.to_thread(arm.lf.restore_region, fail_region) for arm in arms))
                        restored = True
                        events.append((time.monotonic() - t0, f"{fail_region} restored"))
                    await asyncio.gather(*(_poll(session, arm) for arm in arms))
                    for arm in arms:
                        for k, st in arm.states.items():
                            arm.kv_series[k].append((elapsed * cfg.time_scale, st.kv))
                    sent = sum(1 for i in items if i.at_s <= elapsed * cfg.time_scale)
                    if live is not None:
                        live.update(_render(arms, cfg, fleet, elapsed, sent, events))
                    await asyncio.sleep(0.5)
                await asyncio.gather(*(_poll(session, arm) for arm in arms))
                if live is not None:
                    live.update(_render(arms, cfg, fleet, time.monotonic() - t0, len(items), events))
            results = [load.result() for load in loads]
            for arm in arms:
                arm.stalled_share = await asyncio.to_thread(arm.lf.stalled_share)
        finally:
            if live is not None:
                live.stop()
            for load in loads:
                if not load.done():
                    load.cancel()
    ts = cfg.time_scale
    model_events = [(w * ts, what) for w, what in events]
    fail_end = restore_at * ts if restored else cfg.duration_s * ts
    runs = []
    for arm, records in zip(arms, results, strict=True):
        arm.records = records
        summary = summarize(records, fleet.slo.ttft_ms / 1000, fleet.slo.tpot_ms / 1000, cfg.duration_s * ts)
        runs.append(RunResult(
            driver="http",
            trace=cfg.trace.name if cfg.trace else f"builtin:{cfg.profile}",
            policy=arm.label,
            load_scale=cfg.load_scale,
            summary=summary,
            failure=f"{fail_region}@{fail_at * ts:.0f}+{(restore_at - fail_at) * ts:.0f}",
            failed_during_failure=failed_between(records, fail_at * ts, fail_end),
            records=records,
            kv_series=arm.kv_series,
            events=model_events,
            extra={"continuations": arm.continuations, "time_scale": ts,
                   "engines_per_region": cfg.engines_per_region,
                   **({} if arm.stalled_share is None else {"emulator_stalled_share": round(arm.stalled_share, 4)})},
        ))  # fmt: skip
    report = write_report(
        runs,
        cfg.report_dir,
        title="gpufleet demo",
        notes=[
            f"regions: {', '.join(f'{k} ({fleet.region(k).gpu})' for k in regions)}, "
            f"{cfg.engines_per_region} emulated engine(s) each, time x{ts:g}",
            f"load: {runs[0].trace} x{cfg.load_scale:g}, {len(items)} requests over "
            f"{cfg.duration_s * ts:.0f} s of trace time, the same requests at the same times into each fleet",
            *(f"{arm.label}: {arm.title}" for arm in arms),
            f"failure: {fail_region}'s engines killed at t={fail_at * ts:.0f} s, restored at "
            f"t={restore_at * ts:.0f} s (trace time), in every fleet at once",
            "the fleets ran at the same time on one machine: both saw the same CPU contention",
            *(f"{arm.label}: {w}" for arm in arms if (w := stall_warning(arm.stalled_share))),
        ],
        timeline_run=runs[0],
        sweep=False,
    )
    return DemoResult(arms=arms, report=report, events=model_events)
