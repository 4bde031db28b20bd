"""The default policy's admission guard where KV room binds: the exact peak against the headroom bound.

    .venv/bin/python tests/bench/bench_admission.py [--duration 60] [--blocks 512]

The simulator with `gpufleet bench`'s HTTP setup: the example fleet's three demo regions, one engine
each shrunk to `--blocks` KV blocks, the first `--duration` s of the Azure conversation trace at
x0.5-x1.5 of its rate. For the default policy (regional) with the exact guard (`policy.can_hold`,
`OptimisticLedger.fits`) and with the headroom bound alone, and power-of-two (global) for reference:
SLO attainment, 429s and engine preemptions per load (docs/results.md, "The exact admission guard").
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"
LOADS = (0.5, 0.75, 1.0, 1.25, 1.5)
RUNS = (  # (label, policy, reach, exact guard)
    ("default @ regional, exact peak", "default", "regional", True),
    ("default @ regional, headroom bound", "default", "regional", False),
    ("power-of-two @ global", "power-of-two", "global", True),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the trace replayed")
    ap.add_argument("--blocks", type=int, default=512, help="KV blocks per engine")
    args = ap.parse_args()
    if not TRACE.is_file():
        print(f"skipped: public trace not found at {TRACE}")
        return 0
    from gpufleet.serving import loadgen
    from gpufleet.serving.demo import DEMO_REGIONS
    from gpufleet.serving.sim.core import SimConfig, Simulator
    from gpufleet.stacks.fleetfile import load_fleet

    fleet = load_fleet(ROOT / "fleet.yaml")
    regions = tuple(DEMO_REGIONS)
    print(f"os.cpu_count() = {os.cpu_count()}; {args.blocks} KV blocks per engine, regions {', '.join(regions)}")
    print("\n| run | " + " | ".join(f"x{x:g}" for x in LOADS) + " |")
    print("|---|" + "---|" * len(LOADS))
    t0 = time.perf_counter()
    for label, policy, reach, exact in RUNS:
        cells = []
        for x in LOADS:
            # as `gpufleet bench` builds its items (cli/bench.py)
            items = loadgen.from_trace(TRACE, load_scale=x, duration_s=args.duration)
            items = loadgen.assign_clients(loadgen.clip(items, args.blocks * 16 // 2), list(regions))
            sim = Simulator(fleet, SimConfig(policy=policy, reach=reach, regions=regions, engines_per_region=1,
                                             num_gpu_blocks=args.blocks))  # fmt: skip
            for router in sim.routers.values():
                router.policy.config = replace(router.policy.config, exact_admission=exact)
            r = sim.run(items)
            s = r.summary
            cells.append(f"{100 * s.slo_attainment:.0f}% ({s.rejected} refused, {r.extra()['preemptions']} preempted)")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nwall {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
