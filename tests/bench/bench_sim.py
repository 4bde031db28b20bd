"""Simulator speed: one hour of the Azure conversation trace through the 20-region, 500-engine fleet.

    .venv/bin/python tests/bench/bench_sim.py [--policy default] [--reach regional] [--load-scale 1]

Prints simulated seconds per wall second (target: one hour in under a minute on one core, i.e. at
least 60x). Reads ../shared/traces and says so when it is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"
FLEET = ROOT / "tests" / "bench" / "fleet_20_regions.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="default")
    ap.add_argument("--reach", default="regional", choices=("regional", "global"))
    ap.add_argument("--load-scale", type=float, default=1.0)
    args = ap.parse_args()
    if not TRACE.is_file():
        print(f"skipped: public trace not found at {TRACE}")
        return 0
    from gpufleet.serving import loadgen
    from gpufleet.serving.sim.core import SimConfig, Simulator
    from gpufleet.stacks.fleetfile import load_fleet

    fleet = load_fleet(FLEET)
    items = loadgen.from_trace(TRACE, load_scale=args.load_scale)
    t0 = time.perf_counter()
    sim = Simulator(fleet, SimConfig(policy=args.policy, reach=args.reach))
    build = time.perf_counter() - t0
    r = sim.run(items)
    total = time.perf_counter() - t0
    s = r.summary
    print(f"fleet: {r.regions} regions, {r.engines} engines; trace: {TRACE.name} x{args.load_scale:g}, "
          f"{s.requests} requests over {r.duration_s:.0f} s")  # fmt: skip
    print(f"build {build:.1f} s, run {r.wall_s:.1f} s, total {total:.1f} s wall")
    print(f"speed: {r.duration_s / r.wall_s:.0f} simulated s per wall s (run), "
          f"{r.duration_s / total:.0f} including build; target >= 60")  # fmt: skip
    print(f"SLO attainment {100 * s.slo_attainment:.1f}%, preemptions {r.preemptions}, "
          f"cost per million tokens {r.cost_per_million_tokens:.2f} USD")  # fmt: skip
    return 0 if r.duration_s / total >= 60 else 1


if __name__ == "__main__":
    sys.exit(main())
