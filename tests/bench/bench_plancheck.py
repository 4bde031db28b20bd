"""Benchmark (not a test): `gpufleet plan-check` over the synthesized example fleet, with and without
checkov, as a user runs it (a fresh process each time, so imports are counted).

    .venv/bin/python tests/bench/bench_plancheck.py [--fleet fleet.yaml] [--out DIR] [--repeat 3]

Synthesizes once into --out (default: a temporary folder) unless it already holds a manifest.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def timed(cmd: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return elapsed, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default=str(REPO / "fleet.yaml"))
    ap.add_argument("--out", default=None, help="synthesized cdktf.out (made if missing)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-plancheck-")) / "cdktf.out"
    if args.out and Path(args.out, "manifest.json").is_file():
        out = Path(args.out)
    gpufleet = [sys.executable, "-m", "gpufleet.cli.app"]
    if not (out / "manifest.json").is_file():
        seconds, _ = timed([*gpufleet, "synth", args.fleet, "--out", str(out)])
        print(f"synth: {seconds:.1f} s (once, not part of the figures below)")
    stacks = len(list(out.glob("stacks/*/cdk.tf.json")))
    base = [
        *gpufleet,
        "plan-check",
        str(out),
        "--fleet",
        args.fleet,
        "--waivers",
        str(REPO / "waivers.yaml"),
        "--format",
        "json",
        "--output",
        os.devnull,
    ]
    print(f"os.cpu_count()={os.cpu_count()}  stacks={stacks}  repeat={args.repeat}")
    for label, extra in (("GPU pack only (--skip-checkov)", ["--skip-checkov"]), ("GPU pack + checkov", [])):
        runs = [timed(base + extra) for _ in range(args.repeat)]
        walls = [w for w, _ in runs]
        print(
            f"{label:32s} wall median {statistics.median(walls):6.2f} s  min {min(walls):6.2f} s  "
            f"exit {runs[-1][1]}"
        )


if __name__ == "__main__":
    main()
