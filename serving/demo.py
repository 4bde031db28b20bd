"""`gpufleet demo`: a fleet on loopback, live, with a region failure half way.

Three regions of different clouds and GPU types from the fleet file, each with emulated engines and
its router (serving/fleetrun.py); a load generator (serving/loadgen.py) sends streaming completions to
the router of each request's client region; a rich dashboard shows per region the KV usage, free
tokens, running and waiting requests (from the engines' /metrics), requests served, spills (from the
routers' /metrics) and failures (from the client's records). Half way the region with the most
capacity loses its engines (SIGKILL); at three quarters they come back. At the end: a summary and a
report folder (report.md, results.json, plots).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.serving import loadgen
from gpufleet.serving.outcomes import FAILED, OK, RequestRecord, summarize

DEMO_REGIONS = ("aws-us-west-2", "gcp-us-central1", "azure-eastus")  # L40S, H100, A100 in the example fleet


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


@dataclass
class RegionState:
    up: bool = True
    kv: float = 0.0
    free_tokens: float = 0.0
    running: int = 0
    waiting: int = 0
    served: int = 0
    spills: float = 0.0
    failures: int = 0
    continuations: float = 0.0


@dataclass
class DemoResult:
    records: list[RequestRecord]
    spills: float
    continuations: float
    report: Path
    events: list[tuple[float, str]] = field(default_factory=list)


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


async def _poll(session, lf, states: dict[str, RegionState]) -> None:
    """One look at every engine's and router's /metrics."""
    from gpufleet.serving.router.signals import MetricsError, parse_metrics
    from prometheus_client.parser import text_string_to_metric_families

    async def text(url: str) -> str | None:
        try:
            async with session.get(url) as resp:
                return await resp.text() if resp.status == 200 else None
        except Exception:  # noqa: BLE001 - a dead engine is the point of the demo
            return None

    for key, urls in lf.engine_urls.items():
        st = states[key]
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
    for key, url in lf.router_urls.items():
        body = await text(url + "/metrics")
        if body is None:
            continue
        spills = cont = 0.0
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                if s.name == "gpufleet_router_spills_total":
                    spills += s.value
                elif s.name == "gpufleet_router_continuations_total":
                    cont += s.value
        states[key].spills = spills
        states[key].continuations = cont


def _render(states, cfg: DemoConfig, fleet, elapsed: float, records, sent: int, events):
    from rich.console import Group, RenderableType
    from rich.table import Table
    from rich.text import Text

    ttft = fleet.slo.ttft_ms / 1000
    tpot = fleet.slo.tpot_ms / 1000
    done = len(records)
    met = sum(1 for r in records if r.meets(ttft, tpot))
    t = Table(
        title=f"gpufleet demo: {fleet.fleet}, {len(states)} regions, time x{cfg.time_scale:g}", expand=False
    )
    for col in ("region", "GPU", "state", "KV usage", "free tokens", "running", "waiting", "served", "spills",
                "failed"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("region", "GPU", "state", "KV usage") else "right")
    for key, st in states.items():
        bar_len = 20
        fill = round(st.kv * bar_len)
        color = "green" if st.kv < 0.7 else ("yellow" if st.kv < 0.9 else "red")
        bar = Text("█" * fill, style=color) + Text("░" * (bar_len - fill), style="grey50")
        bar += Text(f" {100 * st.kv:3.0f}%")
        state = Text("up", "green") if st.up else Text("DOWN", "bold red")
        t.add_row(key, fleet.region(key).gpu, state, bar, f"{st.free_tokens:,.0f}", str(st.running),
                  str(st.waiting), str(st.served), f"{st.spills:.0f}", str(st.failures))  # fmt: skip
    # One clock everywhere: trace time (engine seconds; wall time x time_scale), as in the report.
    now_t, end_t = elapsed * cfg.time_scale, cfg.duration_s * cfg.time_scale
    head = Text(
        f"trace time t={now_t:5.1f}/{end_t:.0f} s   sent {sent}   done {done}   "
        f"SLO met {100 * met / done if done else 100:.1f}%   "
        f"failed {sum(1 for r in records if r.outcome == FAILED)}"
    )
    lines: list[RenderableType] = [head, t]
    if events:
        lines.append(
            Text("  ".join(f"[t={w * cfg.time_scale:.0f} s] {what}" for w, what in events), style="bold")
        )
    return Group(*lines)


async def run_demo(fleet, cfg: DemoConfig, workdir: Path, out=None) -> DemoResult:
    """Run the whole demo; `out` is a rich Console (None: quiet)."""
    import aiohttp
    from gpufleet.serving.fleetrun import LocalFleet
    from gpufleet.serving.report import RunResult, failed_between, write_report

    regions = list(cfg.regions)
    fail_region = cfg.fail_region or max(regions, key=lambda k: _capacity(fleet, k))
    items = _workload(cfg, regions)
    model = fleet.models[0].name
    states = {k: RegionState() for k in regions}
    records: list[RequestRecord] = []
    events: list[tuple[float, str]] = []  # wall seconds here; shown and reported in trace time
    kv_series: dict[str, list[tuple[float, float]]] = {k: [] for k in regions}

    def on_done(rec: RequestRecord) -> None:
        records.append(rec)
        if rec.outcome == OK and rec.region in states:
            states[rec.region].served += 1
        if rec.outcome == FAILED and rec.client_region in states:
            states[rec.client_region].failures += 1

    lf = LocalFleet(
        fleet, regions, workdir, engines_per_region=cfg.engines_per_region, time_scale=cfg.time_scale
    )
    with lf:
        t0 = time.monotonic()
        load = asyncio.create_task(
            loadgen.run_http(items, lf.router_urls, model, time_scale=cfg.time_scale, on_done=on_done)
        )
        fail_at, restore_at = 0.5 * cfg.duration_s, 0.75 * cfg.duration_s
        failed = restored = False
        live = None
        if out is not None and cfg.live:
            from rich.live import Live

            live = Live(console=out, refresh_per_second=4, transient=False)
            live.start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
                while not load.done():
                    elapsed = time.monotonic() - t0
                    if not failed and elapsed >= fail_at:
                        lf.kill_region(fail_region)
                        failed = True
                        events.append((elapsed, f"{fail_region} engines killed"))
                    if failed and not restored and elapsed >= restore_at:
                        await asyncio.to_thread(lf.restore_region, fail_region)
                        restored = True
                        events.append((time.monotonic() - t0, f"{fail_region} restored"))
                    await _poll(session, lf, states)
                    for k, st in states.items():
                        kv_series[k].append((elapsed * cfg.time_scale, st.kv))
                    sent = sum(1 for i in items if i.at_s <= elapsed * cfg.time_scale)
                    if live is not None:
                        live.update(_render(states, cfg, fleet, elapsed, records, sent, events))
                    await asyncio.sleep(0.5)
                await _poll(session, lf, states)
                if live is not None:
                    live.update(
                        _render(states, cfg, fleet, time.monotonic() - t0, records, len(items), events)
                    )
            all_records = load.result()
        finally:
            if live is not None:
                live.stop()
            if not load.done():
                load.cancel()
    spills = sum(s.spills for s in states.values())
    cont = sum(s.continuations for s in states.values())
    model_events = [(w * cfg.time_scale, what) for w, what in events]
    ts = cfg.time_scale
    summary = summarize(all_records, fleet.slo.ttft_ms / 1000, fleet.slo.tpot_ms / 1000, cfg.duration_s * ts)
    fail_end = restore_at * ts if restored else cfg.duration_s * ts
    run = RunResult(
        driver="http",
        trace=cfg.trace.name if cfg.trace else f"builtin:{cfg.profile}",
        policy="headroom",
        load_scale=cfg.load_scale,
        summary=summary,
        failure=f"{fail_region}@{fail_at * ts:.0f}+{(restore_at - fail_at) * ts:.0f}",
        failed_during_failure=failed_between(all_records, fail_at * ts, fail_end),
        records=all_records,
        kv_series=kv_series,
        events=model_events,
        extra={
            "spills": spills,
            "continuations": cont,
            "time_scale": ts,
            "engines_per_region": cfg.engines_per_region,
        },
    )
    report = write_report(
        [run],
        cfg.report_dir,
        title="gpufleet demo",
        notes=[
            f"regions: {', '.join(f'{k} ({fleet.region(k).gpu})' for k in regions)}, "
            f"{cfg.engines_per_region} emulated engine(s) each, time x{ts:g}",
            f"load: {run.trace} x{cfg.load_scale:g}, {len(items)} requests over "
            f"{cfg.duration_s * ts:.0f} s of engine time",
            f"failure: {fail_region}'s engines killed at {fail_at * ts:.0f} s, "
            f"restored at {restore_at * ts:.0f} s",
        ],
        timeline_run=run,
    )
    return DemoResult(
        records=all_records, spills=spills, continuations=cont, report=report, events=model_events
    )
