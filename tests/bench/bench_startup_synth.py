"""Benchmark (run by hand, not a test): wall time of `gpufleet --help` and of synthesizing the example
fleet, median of several runs, with the machine's core count.

    .venv/bin/python tests/bench/bench_startup_synth.py [--help-runs 7] [--synth-runs 3]

Targets: --help under 0.3 s (no cdktn, cloud SDK or torch import on that path); synth under 30 s on
2 cores. Figures go in docs/stacks.md.
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

ROOT = Path(__file__).resolve().parents[2]
HELP_TARGET_S = 0.3
SYNTH_TARGET_S = 30.0


def _gpufleet() -> list[str]:
    exe = Path(sys.executable).with_name("gpufleet")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gpufleet.cli.app"]


def _time(cmd: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def _report(name: str, times: list[float], target: float) -> bool:
    median = statistics.median(times)
    ok = median < target
    runs = ", ".join(f"{t:.2f}" for t in times)
    print(
        f"{name:<28} median {median:7.3f} s  target < {target:g} s  {'OK' if ok else 'OVER'}   runs: {runs}"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--help-runs", type=int, default=7)
    parser.add_argument("--synth-runs", type=int, default=3)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"cores: {os.cpu_count()}  load average (1 min): {load:.2f}  python: {sys.version.split()[0]}")
    ok = _report("gpufleet --help", _time([*_gpufleet(), "--help"], args.help_runs), HELP_TARGET_S)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            *_gpufleet(),
            "synth",
            str(ROOT / "fleet.yaml"),
            "--out",
            str(Path(tmp) / "cdktf.out"),
            "--json",
        ]
        ok &= _report("gpufleet synth fleet.yaml", _time(cmd, args.synth_runs), SYNTH_TARGET_S)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
