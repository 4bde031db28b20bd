"""Router benchmark: what the router costs over talking to the engine directly.

    .venv/bin/python tests/bench/bench_router.py [--rounds 5] [--streams 64] [--seconds 3]

Processes: this one is the client; the engine emulator and the router each run in their own
process (`python -m gpufleet.serving.engine`, `gpufleet router serve`), all on loopback. Direct and
routed rounds alternate in one run, so both see the same machine load; medians over rounds are
printed side by side. On a machine with fewer cores than busy processes (client, emulator, router)
the added latency is mostly CPU queueing, so the router's own cost is reported apart from it:

- its CPU time per request (from /proc, Linux), and
- its internal overhead histogram (`gpufleet_router_overhead_seconds`): phase=request from a
  request's arrival to its POST upstream, phase=relay from a stream's first bytes read upstream to
  their write to the client.

1. Added latency, time to first token through the router minus direct, per round (p50 and p99 of
   each round), median over rounds. Targets at 64 concurrent streams: p50 < 1 ms, p99 < 5 ms.
   - steady: N closed-loop streams (each worker sends its next request when the last one ended;
     answer lengths vary, so arrivals spread out): N streams always in flight;
   - burst: N requests sent at the same instant (worst case: the router serves them one by one);
   - 1 stream: no concurrency, the router's per-request path alone.
2. Proxied requests per second on one router process (small non-streamed requests, 64 clients).
3. Scrape cost per engine: one GET /metrics of a busy emulator plus parsing, and parsing alone.
4. Decision time per request with 1,000 engines: the policy alone (HeadroomPolicy, 10 regions) and
   the router's whole `choose` (engine views from live samples + policy, one region).
"""

from __future__ import annotations

import argparse
import asyncio
import math
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


async def ttft(session: aiohttp.ClientSession, url: str, i: int, max_tokens: int = 32) -> float:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"bench {i}"}],
        "max_tokens": max_tokens,
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


async def steady(session, url: str, streams: int, seconds: float) -> list[float]:
    """TTFTs of `streams` closed-loop workers; answers of 8..56 tokens spread the arrivals."""
    out: list[float] = []
    until = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        rng = random.Random(w)
        await asyncio.sleep(w * 0.3 / streams)  # stagger the first requests over ~one answer
        i = 0
        while time.perf_counter() < until:
            out.append(await ttft(session, url, w * 100_000 + i, rng.randint(8, 56)))
            i += 1

    await asyncio.gather(*(worker(w) for w in range(streams)))
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def overhead(session, router_url: str) -> dict[str, tuple[list[float], list[float], float]]:
    """The router's overhead histogram: phase -> (bucket bounds, cumulative counts, sum)."""
    async with session.get(router_url + "/metrics") as r:
        text = await r.text()
    out: dict[str, tuple[list[float], list[float], float]] = {}
    for line in text.splitlines():
        if not line.startswith("gpufleet_router_overhead_seconds"):
            continue
        name, value = line.rsplit(" ", 1)
        phase = name.split('phase="')[1].split('"')[0]
        bounds, counts, total = out.setdefault(phase, ([], [], 0.0))
        if "_bucket" in name:
            le = name.split('le="')[1].split('"')[0]
            bounds.append(float(le))
            counts.append(float(value))
        elif name.startswith("gpufleet_router_overhead_seconds_sum"):
            out[phase] = (bounds, counts, float(value))
    return out


def _bucket_bound(bounds: list[float], cumulative: list[float], rank: float) -> str:
    le = next(b for b, c in zip(bounds, cumulative, strict=True) if c >= rank)
    return "> 100 ms" if math.isinf(le) else f"<= {le * 1e3:g} ms"


def overhead_delta(before, after) -> str:
    """p50 / p99 (upper bucket bounds) and mean of the overhead observed between two reads."""
    parts = []
    for phase, (bounds, counts, total) in after.items():
        b_counts = before.get(phase, (bounds, [0.0] * len(counts), 0.0))[1] or [0.0] * len(counts)
        d = [a - b for a, b in zip(counts, b_counts, strict=True)]
        n = d[-1]
        if n <= 0:
            continue
        mean = (total - before.get(phase, ([], [], 0.0))[2]) / n

        q50, q99 = (_bucket_bound(bounds, d, p * n) for p in (0.5, 0.99))
        parts.append(f"{phase}: mean {mean * 1e3:.3f} ms, p50 {q50}, p99 {q99} ({n:.0f} obs.)")
    return "; ".join(parts)


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
    from gpufleet.serving.router.policy import EngineView, HeadroomPolicy, PolicyConfig, RegionView, RoutedRequest
    from gpufleet.stacks.spec import RouterSettings

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
            recent_itl_s=rng.uniform(0.01, 0.12),  # some over the pace limit (0.8 x 100 ms)
        )
        for i in range(engines)
    ]
    policy = HeadroomPolicy(PolicyConfig.from_settings(RouterSettings(), tpot_slo_s=0.1))
    times = []
    for _ in range(requests):
        t = time.perf_counter()
        policy.choose(RoutedRequest(rng.randint(100, 60_000), residency="us"), views, regions, 100.0)
        times.append(time.perf_counter() - t)
    return statistics.median(times), pct(times, 99)


def router_decision(engines: int = 1000, requests: int = 2000) -> tuple[float, float]:
    """`Router.choose` (engine views from samples + the headroom policy), one region, 64 requests in
    flight on some engines, every request with a prefix-affinity key."""
    from gpufleet.serving.router.config import RegionInfo, RouterConfig
    from gpufleet.serving.router.gateway import Router
    from gpufleet.serving.router.policy import RoutedRequest
    from gpufleet.serving.router.signals import Sample
    from gpufleet.stacks.spec import RouterSettings

    rng = random.Random(1)
    urls = tuple(f"http://10.0.{i // 250}.{i % 250}:8000" for i in range(engines))
    here = RegionInfo("r0", "on-demand", "us", frozenset({MODEL}), None, urls, None, None)
    config = RouterConfig(here, {"r0": here}, {MODEL: 131072}, RouterSettings(), "x" * 16, 500.0)
    router = Router(config, clock=lambda: 100.0)
    for st in router.scraper.engines.values():
        free = rng.uniform(0, 150_000)
        st.record(Sample(0.5, 10_000, 16, free, 4, rng.randint(0, 3), 0, 0, 0, frozenset({MODEL}), 99.5))
    for i in range(64):
        router.ledger.routed(urls[i * 7 % engines], object(), 2000, 99.9)
    times = []
    for _ in range(requests):
        req = RoutedRequest(rng.randint(100, 60_000), MODEL, "us", affinity_key=str(rng.random()))
        t = time.perf_counter()
        router.choose(req)
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


def added(direct: list[float], routed: list[float]) -> tuple[float, float]:
    """(p50, p99) of routed minus direct, in ms."""
    return (
        (statistics.median(routed) - statistics.median(direct)) * 1000,
        (pct(routed, 99) - pct(direct, 99)) * 1000,
    )


async def compare(name: str, rounds: int, run, session, router_pid: int, router_url: str) -> None:
    """Alternate direct and routed rounds of `run(url)`; print medians over rounds."""
    p50s, p99s, d50, r50, d99, r99, cpu = [], [], [], [], [], [], []
    before = await overhead(session, router_url)
    for _ in range(rounds):
        direct = await run(ENGINE_URL)
        c0 = cpu_seconds(router_pid)
        routed = await run(ROUTER_URL)
        c1 = cpu_seconds(router_pid)
        a50, a99 = added(direct, routed)
        p50s.append(a50)
        p99s.append(a99)
        d50.append(statistics.median(direct) * 1000)
        r50.append(statistics.median(routed) * 1000)
        d99.append(pct(direct, 99) * 1000)
        r99.append(pct(routed, 99) * 1000)
        if c0 is not None and c1 is not None:
            cpu.append((c1 - c0) / len(routed) * 1000)
    after = await overhead(session, router_url)
    med = statistics.median
    print(
        f"TTFT, {name} ({len(direct)} requests per round, median of {rounds} rounds): "
        f"direct p50 {med(d50):.2f} / p99 {med(d99):.2f} ms, "
        f"routed p50 {med(r50):.2f} / p99 {med(r99):.2f} ms"
    )
    print(
        f"  added: p50 {med(p50s):+.2f} ms (rounds {', '.join(f'{x:+.1f}' for x in p50s)}; target < 1), "
        f"p99 {med(p99s):+.2f} ms (rounds {', '.join(f'{x:+.1f}' for x in p99s)}; target < 5)"
    )
    if cpu:
        print(f"  router CPU per streamed request (32 tokens avg.): {med(cpu):.2f} ms")
    print(f"  router overhead histogram: {overhead_delta(before, after)}")


ENGINE_URL = ROUTER_URL = ""


async def main(args) -> None:
    global ENGINE_URL, ROUTER_URL
    from gpufleet.serving.engine.server import spawn_emulator

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"os.cpu_count() = {os.cpu_count()}; load average {load[0]:.2f} before the run; "
        f"python {sys.version.split()[0]}; client, emulator and router: one process each"
        if load
        else f"os.cpu_count() = {os.cpu_count()}; python {sys.version.split()[0]}"
    )
    t = decision_time()
    print(f"policy decision, 1,000 engines: median {t[0] * 1e6:.0f} us, p99 {t[1] * 1e6:.0f} us per request")
    t = router_decision()
    print(
        f"router decision (engine views + policy), 1,000 engines: median {t[0] * 1e6:.0f} us, "
        f"p99 {t[1] * 1e6:.0f} us per request"
    )
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
        ENGINE_URL, ROUTER_URL = engine.url, router_url
        try:
            await asyncio.sleep(1.0)  # first scrapes
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                await round_of(s, engine.url, 8)
                await round_of(s, router_url, 8)  # warm both paths
                n = args.streams
                await compare(
                    f"{n} streams steady",
                    args.rounds,
                    lambda u: steady(s, u, n, args.seconds),
                    s,
                    router.pid,
                    router_url,
                )
                await compare(
                    f"{n} streams burst", args.rounds, lambda u: round_of(s, u, n), s, router.pid, router_url
                )
                await compare(
                    "1 stream",
                    args.rounds,
                    lambda u: steady(s, u, 1, args.seconds),
                    s,
                    router.pid,
                    router_url,
                )
                ds, rs = [], []
                for _ in range(args.rounds):
                    ds.append(await rps(s, engine.url, args.seconds))
                    rs.append(await rps(s, router_url, args.seconds))
                d, r = statistics.median(ds), statistics.median(rs)
                print(
                    f"requests/s (1-token completions, 64 clients, median of {args.rounds} "
                    "alternating rounds): "
                    f"direct {d:.0f}, through one router process {r:.0f} (ratio {r / d:.2f})"
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
