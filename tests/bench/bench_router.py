"""Router benchmark: what the router costs over talking to the engine directly.

    .venv/bin/python tests/bench/bench_router.py [--rounds 5] [--streams 64]

Processes: this one is the client; the engine emulator and the router each run in their own
process (`python -m gpufleet.serving.engine`, `gpufleet router serve`), all on loopback. Direct and
routed rounds alternate in one run, so both see the same machine load; medians and ratios are
printed side by side.

1. Added latency at N concurrent streams: time to first token through the router minus direct,
   per round (p50 and p99 of each round), median over rounds. Targets: p50 < 1 ms, p99 < 5 ms.
2. Proxied requests per second on one router process (small non-streamed requests).
3. Scrape cost per engine: one GET /metrics of a busy emulator plus parsing, and parsing alone.
4. Policy decision time per request with 1,000 engines (HeadroomPolicy, 10 regions).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

TOKEN = "bench-admin-token-0123456789abcdef"
MODEL = "llama-3.1-8b"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def ttft(session: aiohttp.ClientSession, url: str, i: int) -> float:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"bench {i}"}],
        "max_tokens": 32,
        "stream": True,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    first = None
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if first is None and b'"content":"' in line and b'"content":""' not in line:
                first = time.perf_counter() - start
    assert first is not None
    return first


async def round_of(session, url: str, n: int) -> list[float]:
    return list(await asyncio.gather(*(ttft(session, url, i) for i in range(n))))


async def rps(session, url: str, seconds: float, concurrency: int = 64) -> float:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    done = 0
    until = time.perf_counter() + seconds

    async def worker():
        nonlocal done
        while time.perf_counter() < until:
            async with session.post(url + "/v1/completions", json=body) as r:
                await r.read()
                assert r.status == 200
                done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


def decision_time(engines: int = 1000, requests: int = 2000) -> tuple[float, float]:
    from gpufleet.serving.router.policy import EngineView, HeadroomPolicy, RegionView, RoutedRequest

    rng = random.Random(1)
    regions = [
        RegionView(f"r{i}", tier=("reserved", "on-demand", "spot")[i % 3], residency="us", local=i == 0)
        for i in range(10)
    ]
    views = [
        EngineView(
            f"http://e{i}",
            f"r{i % 10}",
            free_tokens=rng.uniform(0, 200_000),
            sampled_at=99.5,
            waiting=rng.randint(0, 4),
        )
        for i in range(engines)
    ]
    policy = HeadroomPolicy()
    times = []
    for _ in range(requests):
        t = time.perf_counter()
        policy.choose(RoutedRequest(rng.randint(100, 60_000), residency="us"), views, regions, 100.0)
        times.append(time.perf_counter() - t)
    return statistics.median(times), pct(times, 99)


async def scrape_cost(engine_url: str, n: int = 50) -> tuple[float, float, int]:
    from gpufleet.serving.router.signals import Scraper, parse_metrics

    scraper = Scraper(interval_s=1, timeout_s=2)
    scraper.set_engines([engine_url])
    state = scraper.engines[engine_url]
    async with aiohttp.ClientSession() as s:
        scraper._session = s
        whole = []
        for _ in range(n):
            await scraper.scrape_one(state)
            whole.append(state.scrape_seconds)
        async with s.get(engine_url + "/metrics") as r:
            text = await r.text()
    t = time.perf_counter()
    for _ in range(n):
        parse_metrics(text, 0.0)
    return statistics.median(whole), (time.perf_counter() - t) / n, len(text)


def start_router(engine_url: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    fleet = tmp / "fleet.yaml"
    fleet.write_text(
        f"fleet: bench\nmodels: [{{name: {MODEL}, catalog: {MODEL}}}]\n"
        "regions: [{cloud: aws, region: us-east-1, gpu: H100-80GB, nodes: {max: 1},"
        f" endpoints: {{engines: ['{engine_url}']}}}}]\n"
        "router: {scrape_interval_s: 0.5, queue_max: 10000}\n"
    )
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "GPUFLEET_ADMIN_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpufleet.cli.app",
            "router",
            "serve",
            "--fleet",
            str(fleet),
            "--region",
            "aws-us-east-1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    line = proc.stdout.readline()
    assert "listening" in line, line
    return proc, f"http://127.0.0.1:{port}"


async def main(args) -> None:
    from gpufleet.serving.engine.server import spawn_emulator

    print(f"os.cpu_count() = {os.cpu_count()}; python {sys.version.split()[0]}")
    t = decision_time()
    print(f"policy decision, 1,000 engines: median {t[0] * 1e6:.0f} us, p99 {t[1] * 1e6:.0f} us per request")
    with (
        tempfile.TemporaryDirectory() as tmp,
        spawn_emulator(
            [
                "--model",
                MODEL,
                "--gpu",
                "H100",
                "--served-model-name",
                MODEL,
                "--time-scale",
                str(args.time_scale),
            ]
        ) as engine,
    ):
        router, router_url = start_router(engine.url, Path(tmp))
        try:
            await asyncio.sleep(1.0)  # first scrapes
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                await round_of(s, engine.url, 8)
                await round_of(s, router_url, 8)  # warm both paths
                p50s, p99s, d50, r50 = [], [], [], []
                for _ in range(args.rounds):
                    direct = await round_of(s, engine.url, args.streams)
                    routed = await round_of(s, router_url, args.streams)
                    p50s.append((statistics.median(routed) - statistics.median(direct)) * 1000)
                    p99s.append((pct(routed, 99) - pct(direct, 99)) * 1000)
                    d50.append(statistics.median(direct) * 1000)
                    r50.append(statistics.median(routed) * 1000)
                print(
                    f"TTFT at {args.streams} concurrent streams, median of {args.rounds} rounds: "
                    f"direct p50 {statistics.median(d50):.2f} ms, routed p50 {statistics.median(r50):.2f} ms"
                )
                print(
                    f"  added latency: p50 {statistics.median(p50s):+.2f} ms (target < 1), "
                    f"p99 {statistics.median(p99s):+.2f} ms (target < 5)"
                )
                d = await rps(s, engine.url, args.seconds)
                r = await rps(s, router_url, args.seconds)
                print(
                    f"requests/s (1-token completions, 64 clients): direct {d:.0f}, through one router "
                    f"process {r:.0f} (ratio {r / d:.2f})"
                )
            whole, parse, size = await scrape_cost(engine.url)
            print(
                f"scrape cost per engine: {whole * 1000:.2f} ms GET+parse (median), "
                f"parse alone {parse * 1e6:.0f} us for {size:,} bytes of /metrics"
            )
        finally:
            router.terminate()
            router.wait(10)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--time-scale", type=float, default=1.0)
    asyncio.run(main(ap.parse_args()))
