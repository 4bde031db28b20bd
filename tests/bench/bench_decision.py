"""What one routing decision costs with 1,000 engines (issue 13: under 2 ms), for the default policy
(predictive, late binding, exact admission guard) and the headroom policy beside it.

    .venv/bin/python tests/bench/bench_decision.py [--decisions 2000] [--engines 1000]

Three GPU types over 20 regions, the engines loaded unevenly (running batch, KV use, queued prompt
tokens, a recent inter-token latency for the online correction). Two cases:

* warm: the views are reused between decisions, as the gateway reuses an engine's view while its
  sample and its accounting are unchanged;
* cold: every engine has a new sample before every decision (new view objects, a new sample time),
  the worst case: right after a scrape round of every engine.

Prints the median and p99 per decision, and the machine's core count. The collector is set as
`gpufleet router serve` sets it (start-up objects frozen, young generation every 20,000 allocations).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from dataclasses import replace

from gpufleet.serving.router.policy import EngineView, PolicyConfig, RegionView, RoutedRequest, make_policy
from gpufleet.serving.router.predict import profile_for

GPUS = ("H100-80GB", "L40S", "A100-80GB")


def fleet(engines: int, seed: int = 1) -> tuple[list[EngineView], list[RegionView]]:
    rng = random.Random(seed)
    profiles = [profile_for("llama-3.1-8b", g) for g in GPUS]
    views = []
    for i in range(engines):
        prof = profiles[i % len(profiles)]
        usage = rng.uniform(0.0, 0.9)
        views.append(EngineView(
            f"http://10.0.{i // 250}.{i % 250}:8000", f"r{i % 20}",
            free_tokens=(1 - usage) * prof.capacity_tokens, capacity_tokens=prof.capacity_tokens,
            kv_usage=usage, running=rng.randint(0, 48), waiting=rng.randint(0, 3), sampled_at=99.5,
            profile=prof, pending_prefill_tokens=float(rng.choice((0, 0, 500, 3000))),
            recent_itl_s=rng.uniform(0.01, 0.06), recent_prompt_tokens=rng.uniform(0, 20_000),
            recent_itl_tokens=rng.uniform(100, 2_000),
        ))  # fmt: skip
    regions = [RegionView(f"r{i}", local=i == 0) for i in range(20)]
    return views, regions


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def timed(policy_name: str, engines: int, decisions: int, cold: bool) -> tuple[float, float]:
    views, regions = fleet(engines)
    policy = make_policy(policy_name, PolicyConfig(tpot_slo_s=0.1, ttft_slo_s=2.0))
    gc.collect()
    gc.freeze()  # the collector as `gpufleet router serve` sets it (cli/router.py)
    gc.set_threshold(20_000, 20, 20)
    rng = random.Random(2)
    times = []
    for d in range(decisions):
        if cold:  # a new sample of every engine: built outside the timing, as the scraper does
            views = [replace(v, sampled_at=100.0 + d) for v in views]
        prompt = rng.randint(100, 8_000)
        req = RoutedRequest(need_tokens=prompt + 300, prompt_tokens=prompt, max_tokens=300)
        t = time.perf_counter()
        policy.choose(req, views, regions, 100.0 + d)
        times.append(time.perf_counter() - t)
    return statistics.median(times), pct(times, 99)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decisions", type=int, default=2000)
    ap.add_argument("--engines", type=int, default=1000)
    args = ap.parse_args()
    print(f"os.cpu_count() = {os.cpu_count()}, {args.engines} engines, {args.decisions} decisions per case")
    for name in ("predictive", "headroom"):
        for cold in (False, True):
            med, p99 = timed(name, args.engines, args.decisions if not cold else args.decisions // 4, cold)
            label = "default (predictive)" if name == "predictive" else name
            case = "cold: every engine newly sampled" if cold else "warm: views reused"
            print(f"{label:22s} {case:34s} median {med * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms (target < 2 ms)")


if __name__ == "__main__":
    main()
