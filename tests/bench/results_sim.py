"""The simulator's results table: three policies x load levels x the three public traces, plus a
region failure at the load where round-robin drops below 90% SLO attainment.

    .venv/bin/python tests/bench/results_sim.py [--out results/sim]

Fleet: the demo's three regions of fleet.yaml (AWS L40S, GCP H100, Azure A100), one full-size engine
each, clients spread evenly over the regions. Reads ../shared/traces (skips when absent).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRACES = ROOT.parent / "shared" / "traces"
REGIONS = ("aws-us-west-2", "gcp-us-central1", "azure-eastus")
PLAN = {  # trace -> (seconds of the trace replayed at every load, loads: fine enough to bracket 90% SLO)
    "AzureLLMInferenceTrace_conv.csv": (600, (1, 1.5, 2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75, 4)),
    "AzureLLMInferenceTrace_code.csv": (600, (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.75, 1, 1.5, 2)),
    "mooncake_synthetic_trace.jsonl.gz": (300, (0.05, 0.1, 0.2, 0.4)),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "sim")
    args = ap.parse_args()
    if not TRACES.is_dir():
        print(f"skipped: public traces not found at {TRACES}")
        return 0
    from gpufleet.serving import loadgen
    from gpufleet.serving.bench import Setup, sim_run
    from gpufleet.serving.report import write_report
    from gpufleet.stacks.fleetfile import load_fleet

    fleet = load_fleet(ROOT / "fleet.yaml")
    runs = []
    for name, (seconds, loads) in PLAN.items():
        steady = {}
        for x in loads:
            # the same requests at every load (the slice's first `seconds` of trace), x times as fast
            items = loadgen.from_trace(TRACES / name, load_scale=x, duration_s=seconds)
            items = loadgen.assign_clients(loadgen.clip(items, 32768), list(REGIONS))
            for p in ("headroom", "round-robin", "least-outstanding"):
                r = sim_run(Setup(fleet, REGIONS), items, p, name, x)
                runs.append(r)
                steady[(p, x)] = r
                print(f"{name} x{x:g} {p}: {100 * r.summary.slo_attainment:.1f}%", flush=True)
        # the failure, at the load where round-robin first drops below 90% (or the highest)
        x = next((x for x in loads if steady[("round-robin", x)].summary.slo_attainment < 0.9), loads[-1])
        items = loadgen.from_trace(TRACES / name, load_scale=x, duration_s=seconds)
        items = loadgen.assign_clients(loadgen.clip(items, 32768), list(REGIONS))
        span = seconds / x  # model seconds
        setup = Setup(fleet, REGIONS, fail_region="gcp-us-central1", fail_at_s=span / 3, fail_for_s=span / 3)
        for p in ("headroom", "round-robin", "least-outstanding"):
            runs.append(sim_run(setup, items, p, name, x))
    path = write_report(
        runs,
        args.out,
        title="gpufleet simulator results",
        notes=[
            "fleet.yaml's aws-us-west-2 (L40S), gcp-us-central1 (H100), azure-eastus (A100): one engine "
            "each, llama-3.1-8b, clients spread evenly, SLO TTFT 2 s / TPOT 100 ms",
            "region failure: gcp-us-central1's engines die at 1/3 of the slice and return at 2/3",
        ],
    )
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
