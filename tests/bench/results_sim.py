"""The simulator's results: every policy's rate at 90% SLO attainment on the three public traces,
the default policy running regional (as deployed) against each baseline running global (one router
over every engine: their best case), the goodput at 1.5x the best baseline's 90%-SLO load, and a
region failure.

    .venv/bin/python tests/bench/results_sim.py [--out results/sim] [--quick]

Fleet: the demo's three regions of fleet.yaml (AWS L40S, GCP H100, Azure A100), one full-size engine
each, clients spread evenly; SLO TTFT 2 s / TPOT 100 ms (Mooncake: TTFT 10 s, its prompts average
13-15k tokens). Each load replays the same slice, x times as fast. Reads ../shared/traces.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRACES = ROOT.parent / "shared" / "traces"
REGIONS = ("aws-us-west-2", "gcp-us-central1", "azure-eastus")
SHORT = {"AzureLLMInferenceTrace_conv.csv": "conv", "AzureLLMInferenceTrace_code.csv": "code",
         "mooncake_synthetic_trace.jsonl.gz": "mooncake"}  # fmt: skip
PLAN = {  # trace -> (seconds replayed, TTFT SLO override, load grid)
    "AzureLLMInferenceTrace_conv.csv": (300, None, (2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14)),
    "AzureLLMInferenceTrace_code.csv": (300, None, (0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.6, 2, 2.5, 3, 3.5, 4, 5)),
    "mooncake_synthetic_trace.jsonl.gz": (300, 10.0, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2)),
}


def _items(name: str, seconds: float, x: float):
    from gpufleet.serving import loadgen
    from gpufleet.serving.sim.arrivals import MOONCAKE_TICK_S, on_grid, spread_ticks

    items = loadgen.from_trace(TRACES / name, load_scale=x, duration_s=seconds)
    if on_grid(items, MOONCAKE_TICK_S / x):  # a trace stamped on a 3 s grid: spread, seeded
        items = spread_ticks(items, MOONCAKE_TICK_S / x, seed=0)
    return loadgen.assign_clients(loadgen.clip(items, 32768), list(REGIONS))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "sim")
    ap.add_argument("--trace", action="append", help="only these traces (file names)")
    args = ap.parse_args()
    if not TRACES.is_dir():
        print(f"skipped: public traces not found at {TRACES}")
        return 0
    from gpufleet.serving.bench import Setup, sim_run
    from gpufleet.serving.report import slo_capacity, write_report
    from gpufleet.serving.router.policies import BASELINES
    from gpufleet.stacks.fleetfile import load_fleet

    fleet = load_fleet(ROOT / "fleet.yaml")
    t0 = time.perf_counter()
    runs, lines = [], []
    setups = [("default", "regional"), ("default", "global")] + [(b, "global") for b in BASELINES]
    for name, (seconds, ttft, loads) in PLAN.items():
        if args.trace and name not in args.trace:
            continue
        cap, by = {}, {}
        for policy, reach in setups:
            label = f"{policy}@{reach}"
            mine = []
            for x in loads:
                r = sim_run(Setup(fleet, REGIONS, reach=reach, ttft_slo_s=ttft), _items(name, seconds, x), policy,
                            name, x, label=label)  # fmt: skip
                mine.append(r)
                by[(label, x)] = r
                print(f"{name} x{x:g} {label}: {100 * r.summary.slo_attainment:.1f}% "
                      f"prefix hits {r.extra.get('prefix_hit_rate')}", flush=True)  # fmt: skip
                if r.summary.slo_attainment < 0.9:
                    break  # the sweep has bracketed this policy's 90% point
            runs += mine
            cap[label] = slo_capacity(mine)
        base = {k: v for k, v in cap.items() if not k.startswith("default@")}
        best = max(base, key=lambda k: base[k].rate_rps or 0.0)
        mine = cap["default@regional"]
        ratio = (mine.rate_rps / base[best].rate_rps) if mine.rate_rps and base[best].rate_rps else None
        # 1.5x the best baseline's 90%-SLO load: goodput of each
        x15 = 1.5 * (base[best].load_scale or loads[-1])
        items = _items(name, seconds, x15)
        g = {}
        for label in ("default@regional", best):
            policy, reach = label.split("@")
            r = sim_run(Setup(fleet, REGIONS, reach=reach, ttft_slo_s=ttft), items, policy, name, x15, label=label)
            runs.append(r)
            g[label] = r.summary
        # the region failure at the best baseline's 90% load
        xf = base[best].load_scale or loads[-1]
        span = seconds / xf
        fail = Setup(fleet, REGIONS, fail_region="gcp-us-central1", fail_at_s=span / 3, fail_for_s=span / 3,
                     ttft_slo_s=ttft)  # fmt: skip
        rf = sim_run(fail, _items(name, seconds, xf), "default", name, xf, label="default@regional")
        runs.append(rf)
        lines.append((name, cap, best, ratio, x15, g, rf, by))
    hits = {}
    for r in runs:
        if r.failure is None and r.extra.get("prefix_hit_rate") is not None:
            hits.setdefault((r.trace, r.policy), []).append(r.extra["prefix_hit_rate"])
    wall = time.perf_counter() - t0
    print(f"\nos.cpu_count() = {os.cpu_count()}; wall {wall:.0f} s")
    for name, cap, best, ratio, x15, g, rf, _ in lines:
        print(f"\n## {name}")
        for label, c in sorted(cap.items(), key=lambda kv: -(kv[1].rate_rps or 0)):
            h = hits.get((name, label))
            hr = f", prefix hit rate {100 * sum(h) / len(h):.1f}%" if h else ""
            print(f"  {label:28} rate at 90% SLO {c.label()}{hr}")
        gm, gb = g["default@regional"], g[best]
        gratio = gm.goodput_rps / gb.goodput_rps if gb.goodput_rps else float("inf")
        print(f"  default@regional / best baseline ({best}): "
              f"{'-' if ratio is None else f'{ratio:.2f}x'} (target >= 1.15)")  # fmt: skip
        print(f"  at x{x15:.2f} (1.5x {best}'s 90% load): goodput {gm.goodput_rps:.2f} "
              f"({100 * gm.slo_attainment:.0f}%) vs {gb.goodput_rps:.2f} ({100 * gb.slo_attainment:.0f}%): "
              f"{gratio:.2f}x (target >= 2)")  # fmt: skip
        print(f"  region failure (gcp-us-central1, x{rf.load_scale:.2f}): failed {rf.summary.failed}, "
              f"in failure {rf.failed_during_failure} (target 0)")  # fmt: skip
    prediction_check(fleet, lines, args.out)
    path = write_report(runs, args.out, title="gpufleet simulator results", notes=[
        "fleet.yaml's aws-us-west-2 (L40S), gcp-us-central1 (H100), azure-eastus (A100): one engine each, "
        "llama-3.1-8b, clients spread evenly, SLO TTFT 2 s (Mooncake 10 s) / TPOT 100 ms",
        "policy@reach: regional = one router per region, peers by summary; global = one router over all "
        "engines, paying the inter-region round trip",
    ])  # fmt: skip
    print(f"report: {path}")
    return 0


def prediction_check(fleet, lines, out: Path) -> None:
    """The predicting policy's TTFT prediction against the TTFT the simulator then measured, per GPU
    type: the default policy (global) at each trace's best-baseline 90% load; a plot and a table."""
    from gpufleet.serving import predictions
    from gpufleet.serving.sim.core import SimConfig, Simulator

    gpu = {r.key: r.gpu for r in fleet.regions}
    points: predictions.Points = {}
    for name, cap, best, *_ in lines:
        x = cap[best].load_scale or 1.0
        sim = Simulator(fleet, SimConfig(policy="default", engines_per_region=1, regions=REGIONS, reach="global",
                                         ttft_slo_s=PLAN[name][1]))  # fmt: skip
        log = sim.routers[REGIONS[0]].policy.log = []  # one policy object under global reach
        res = sim.run(_items(name, PLAN[name][0], x))
        first = {}
        for key, eid, ttft, _, at in log:
            first.setdefault(key, (eid, ttft, at))  # the first decision (a retry or continuation is another)
        for rec in res.records:
            hit = first.get(rec.id)
            if hit is None or rec.ttft_s is None or rec.continued or rec.region != hit[0].split("/")[0]:
                continue
            # measured from the decision: a request held at the router (late binding) waited before it
            measured = rec.arrival_s + rec.ttft_s - hit[2]
            points.setdefault(f"{gpu[rec.region]} ({SHORT[name]})", []).append((hit[1], measured))
    print("\n## predicted vs measured TTFT (default@global at the best baseline's 90% load)")
    print("\n".join(predictions.table(points)))
    predictions.plot(points, out / "predicted_ttft.png", "measured TTFT, s (simulator)")


if __name__ == "__main__":
    sys.exit(main())
