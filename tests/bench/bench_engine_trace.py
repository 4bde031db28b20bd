"""Benchmark (not a test): replay a slice of the Azure conversation trace through ONE emulated H100
engine serving llama-3.1-8b, in virtual time, and the virtual-time speed for 48 engines.

    .venv/bin/python tests/bench/bench_engine_trace.py [--start 0] [--seconds 600] [--rate-x 4]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from gpufleet.serving import traces
from gpufleet.serving.engine.model import EngineConfig, resolve
from gpufleet.serving.engine.virtual import VirtualEngine, VirtualLoop, replay

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def one_engine(records, label: str) -> None:
    loop = VirtualLoop()
    eng = VirtualEngine(loop, EngineConfig(model="llama-3.1-8b", gpu="H100", max_model_len=32768))
    done = []
    reqs = [(t, r) for t, r in traces.iter_requests(records) if r.prompt_len + r.max_tokens <= 32768]
    replay(loop, [eng], reqs, on_finish=lambda r, t: done.append(r))
    samples = []

    def sample() -> None:
        s = eng.stats()
        samples.append((loop.now, s.kv_cache_usage, s.num_running, s.num_waiting))
        if eng.engine.has_work() or loop.pending:
            loop.call_later(30.0, sample)

    loop.schedule(0.0, sample)
    w0 = time.perf_counter()
    loop.run()
    wall = time.perf_counter() - w0
    span = max(r.finish_time for r in done) - min(r.arrival_time for r in done)
    out = sum(r.num_output_tokens for r in done)
    ttft = [r.first_token_time - r.arrival_time for r in done]
    e = eng.engine
    print(
        f"== {label}: {len(done)} requests, 1 x H100 llama-3.1-8b "
        f"({e.num_gpu_blocks} blocks x {e.block_size})"
    )
    print(
        f"throughput: {len(done) / span:.2f} req/s, {out / span:.0f} output tok/s, "
        f"{(out + sum(r.prompt_len for r in done)) / span:.0f} total tok/s over {span:.0f} s"
    )
    print(
        f"TTFT p50 {1000 * pct(ttft, 0.5):.0f} ms, p99 {1000 * pct(ttft, 0.99):.0f} ms; "
        f"preemptions {e.num_preemptions}; simulated in {wall:.2f} s wall"
    )
    print("KV usage over time (t s: usage running waiting):")
    for t, u, run, wait in samples[:: max(1, len(samples) // 12)]:
        print(f"  {t:7.0f}: {u:5.1%} {'#' * int(40 * u):<40} run {run:4d} wait {wait:4d}")


def fleet_speed(records, n_engines: int = 48) -> None:
    cfg = resolve(EngineConfig(model="llama-3.1-8b", gpu="H100"))
    loop = VirtualLoop()
    engines = [VirtualEngine(loop, cfg, name=f"e{i}") for i in range(n_engines)]
    done = []
    replay(loop, engines, traces.iter_requests(records), on_finish=lambda r, t: done.append(r))
    w0 = time.perf_counter()
    loop.run()
    wall = time.perf_counter() - w0
    steps = sum(e.engine.num_steps for e in engines)
    busy = sum(e.engine.busy_time for e in engines) / (n_engines * loop.now)
    print(
        f"== virtual time, {n_engines} engines: {len(records)} requests "
        f"({len(records) / loop.now:.1f} req/s), "
        f"{loop.now:.0f} simulated s in {wall:.2f} wall s = {loop.now / wall:.0f} sim s per wall s "
        f"(target >= 100); {steps} engine steps, engines busy {busy:.0%}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--start", type=float, default=0.0)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--rate-x", type=float, default=4.0, help="compress the slice this many times (load)")
    ap.add_argument("--fleet-seconds", type=float, default=300.0)
    ap.add_argument("--fleet-rate-x", type=float, default=8.0)
    a = ap.parse_args()
    print(f"os.cpu_count() = {os.cpu_count()}")
    recs = traces.read_trace(TRACES / "AzureLLMInferenceTrace_conv.csv")
    for x in (1.0, a.rate_x):
        part = traces.scale_rate(traces.time_window(recs, a.start, a.start + a.seconds * x), x)
        one_engine(part, f"Azure conv [{a.start:g}, {a.start + a.seconds * x:g}) s at {x:g}x rate")
    part = traces.scale_rate(traces.time_window(recs, 0, a.fleet_seconds * a.fleet_rate_x), a.fleet_rate_x)
    fleet_speed(part)


if __name__ == "__main__":
    main()
