"""Router benchmark: what a router costs over talking to the engine directly, gpufleet's and
vllm-router's (the Rust router of vllm-project/router, `round_robin`) side by side in one run.

    .venv/bin/python tests/bench/bench_router.py [--rounds 3] [--seconds 3] [--streams 1 16 64]
        [--tokens 16 256] [--no-vllm-router] [--extras]

Processes: this one is the client; the engine emulator (`python -m gpufleet.serving.engine`, time
scale 1), `gpufleet router serve` and `vllm-router` each run in their own process, all on loopback,
both routers in front of the same one engine. For every load (closed-loop streams x answer length)
the rounds alternate direct, gpufleet, vllm-router (the order rotating from round to round), so all
three see the same machine load; medians over rounds are printed.

Per load and router: added time to first token over direct (p50 and p99 of each round, median over
rounds), streamed requests per second, and the router process's CPU time per streamed request
(user + system from /proc, every thread). On a machine with fewer cores than busy processes the
added latency is mostly CPU queueing, so the CPU figure is the router's own cost.

A closed-loop stream sends its next request when the last one ended (answers of exactly
`--tokens` tokens, `ignore_eos`). `--extras` adds: 1-token completions per second, scrape cost
and decision time with 1,000 engines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

TOKEN = "bench-admin-token-0123456789abcdef"
MODEL = "llama-3.1-8b"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds a process has run, all its threads (Linux). /proc/PID/task/*/schedstat counts
    nanoseconds; /proc/PID/stat's 10 ms ticks are too coarse for a few requests (the fallback)."""
    try:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue  # a thread that just ended
        if total:
            return total / 1e9
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def start_router(
    engine_url: str, tmp: Path, loop: str | None = None, pythonpath: str | None = None
) -> tuple[subprocess.Popen, str]:
    """`gpufleet router serve` in front of the engine; `pythonpath`: another checkout's code (its
    folder holding a `gpufleet` link to the checkout), for before/after comparisons."""
    fleet = tmp / "fleet.yaml"
    fleet.write_text(
        f"fleet: bench\nmodels: [{{name: {MODEL}, catalog: {MODEL}}}]\n"
        "regions: [{cloud: aws, region: us-east-1, gpu: H100-80GB, nodes: {max: 1},"
        f" endpoints: {{engines: ['{engine_url}']}}}}]\n"
        "router: {scrape_interval_s: 0.5, queue_max: 10000}\n"
    )
    port = free_port()
    env = {**os.environ, "GPUFLEET_ADMIN_TOKEN": TOKEN}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
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
            *(("--loop", loop) if loop else ()),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    line = proc.stdout.readline()
    assert "listening" in line, line
    return proc, f"http://127.0.0.1:{port}"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_vllm_router(engine_url: str) -> tuple[subprocess.Popen, str] | None:
    """vllm-router (`round_robin`) in front of the same engine; None when it is not installed."""
    exe = shutil.which("vllm-router") or str(Path(sys.executable).with_name("vllm-router"))
    if not Path(exe).exists():
        return None
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", engine_url,
         "--policy", "round_robin", "--log-level", "warning", "--queue-size", "10000",
         "--max-concurrent-requests", "10000"],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(session: aiohttp.ClientSession, url: str, seconds: float = 60.0) -> None:
    """Until one streamed request through `url` succeeds (vllm-router first checks its workers)."""
    until = time.perf_counter() + seconds
    while True:
        try:
            await ttft(session, url, 0, 2)
            return
        except (aiohttp.ClientError, AssertionError, OSError):
            if time.perf_counter() > until:
                raise
            await asyncio.sleep(0.5)


async def ttft(session: aiohttp.ClientSession, url: str, i: int, max_tokens: int) -> float:
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


async def closed_loop(session, url: str, streams: int, tokens: int, seconds: float) -> tuple[list[float], float]:
    """TTFTs of `streams` closed-loop workers for `seconds` (each finishes its last request), and
    the requests completed per second."""
    out: list[float] = []
    start = time.perf_counter()
    until = start + seconds

    async def worker(w: int) -> None:
        # Stagger the first requests over ~one 16-token answer, so arrivals spread from the start.
        await asyncio.sleep(w * 0.2 / streams)
        i = 0
        while time.perf_counter() < until:
            out.append(await ttft(session, url, w * 100_000 + i, tokens))
            i += 1

    await asyncio.gather(*(worker(w) for w in range(streams)))
    return out, len(out) / (time.perf_counter() - start)


@dataclass
class Figures:
    """Per round: added p50/p99 (ms), requests/s, router CPU ms per request."""

    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    cpu_net: list[float] = field(default_factory=list)  # less what the process burns idle meanwhile


async def idle_cpu(pids: dict[str, int], seconds: float = 3.0) -> dict[str, float]:
    """CPU seconds per second each process spends with no request (scrapes, health checks)."""
    c0 = {n: cpu_seconds(p) for n, p in pids.items()}
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    dt = time.perf_counter() - t0
    return {n: (cpu_seconds(p) - c0[n]) / dt for n, p in pids.items() if c0[n] is not None}


async def measure(session, targets: dict[str, tuple[str, int | None]], streams: int, tokens: int,
                  rounds: int, seconds: float, idle: dict[str, float]) -> dict[str, Figures]:  # fmt: skip
    """Rounds of direct and each router, the order rotating; added TTFT against the same round's
    direct run."""
    names = list(targets)
    figs = {n: Figures() for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        got: dict[str, tuple[list[float], float, float | None, float | None]] = {}
        for name in order:
            url, pid = targets[name]
            c0 = cpu_seconds(pid) if pid else None
            t0 = time.perf_counter()
            ttfts, per_s = await closed_loop(session, url, streams, tokens, seconds)
            c1 = cpu_seconds(pid) if pid else None
            cpu = net = None
            if c0 is not None and c1 is not None:
                cpu = (c1 - c0) / len(ttfts) * 1000
                net = (c1 - c0 - idle.get(name, 0.0) * (time.perf_counter() - t0)) / len(ttfts) * 1000
            got[name] = (ttfts, per_s, cpu, net)
        direct = got["direct"][0]
        for name, (ttfts, per_s, cpu, net) in got.items():
            f = figs[name]
            f.p50.append((statistics.median(ttfts) - statistics.median(direct)) * 1000)
            f.p99.append((pct(ttfts, 99) - pct(direct, 99)) * 1000)
            f.rps.append(per_s)
            if cpu is not None and net is not None:
                f.cpu.append(cpu)
                f.cpu_net.append(net)
    return figs


def table(results: list[tuple[int, int, dict[str, Figures]]], routers: list[str]) -> str:
    med = statistics.median
    head = ["streams", "answer"]
    for r in routers:
        head += [f"{r}: added TTFT p50 / p99", f"{r}: req/s", f"{r}: CPU per request (less idle)"]
    head += ["direct req/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for streams, tokens, figs in results:
        row = [str(streams), f"{tokens} tokens"]
        for r in routers:
            f = figs[r]
            cpu = f"{med(f.cpu):.2f} ms ({med(f.cpu_net):.2f})" if f.cpu else "n/a"
            row += [f"{med(f.p50):+.2f} / {med(f.p99):+.2f} ms", f"{med(f.rps):.0f}", cpu]
        row.append(f"{med(figs['direct'].rps):.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def ratios(results: list[tuple[int, int, dict[str, Figures]]]) -> list[str]:
    med = statistics.median
    out = []
    for streams, tokens, figs in results:
        g, v = figs.get("gpufleet"), figs.get("vllm-router")
        if g is None or v is None or not g.cpu or not v.cpu:
            continue
        out.append(
            f"{streams} streams, {tokens} tokens: CPU gpufleet / vllm-router {med(g.cpu) / med(v.cpu):.2f}x "
            f"({med(g.cpu_net) / med(v.cpu_net):.2f}x less idle) "
            f"(target <= 1.2); added p50 gpufleet - vllm-router {med(g.p50) - med(v.p50):+.2f} ms "
            f"(target <= 1); rounds gpufleet p50 {', '.join(f'{x:+.1f}' for x in g.p50)}, "
            f"vllm-router {', '.join(f'{x:+.1f}' for x in v.p50)}"
        )
    return out


async def extras(session, engine_url: str, router_url: str, rounds: int, seconds: float) -> None:
    t = decision_time()
    print(f"policy decision, 1,000 engines: median {t[0] * 1e6:.0f} us, p99 {t[1] * 1e6:.0f} us per request")
    t = router_decision()
    print(f"router decision (views + policy), 1,000 engines: median {t[0] * 1e6:.0f} us, p99 {t[1] * 1e6:.0f} us")
    ds, rs = [], []
    for _ in range(rounds):
        ds.append(await rps(session, engine_url, seconds))
        rs.append(await rps(session, router_url, seconds))
    d, r = statistics.median(ds), statistics.median(rs)
    print(f"1-token completions/s, 64 clients: direct {d:.0f}, through gpufleet {r:.0f} (ratio {r / d:.2f})")
    whole, parse, size = await scrape_cost(engine_url)
    print(f"scrape cost per engine: {whole * 1000:.2f} ms GET+parse, parse alone {parse * 1e6:.0f} us ({size:,} bytes)")


async def main(args) -> None:
    from gpufleet.serving.engine.server import spawn_emulator

    load = os.getloadavg()
    print(
        f"cores: os.cpu_count() = {os.cpu_count()}, usable {len(os.sched_getaffinity(0))}; load average "
        f"{load[0]:.2f} before the run; python {sys.version.split()[0]}; client, emulator and each "
        "router: one process each, loopback"
    )
    emulator = ["--model", MODEL, "--gpu", "H100", "--served-model-name", MODEL, "--time-scale", "1"]
    with tempfile.TemporaryDirectory() as tmp, spawn_emulator(emulator) as engine:
        procs: list[subprocess.Popen] = []
        try:
            router, router_url = start_router(engine.url, Path(tmp), args.loop)
            procs.append(router)
            targets: dict[str, tuple[str, int | None]] = {
                "direct": (engine.url, None),
                "gpufleet": (router_url, router.pid),
            }
            for also in args.also:
                name, _, path = also.partition("=")
                other, other_url = start_router(engine.url, Path(tmp), None, path)
                procs.append(other)
                targets[name] = (other_url, other.pid)
            for loop in args.also_loop:
                other, other_url = start_router(engine.url, Path(tmp), loop)
                procs.append(other)
                targets[f"gpufleet-{loop}"] = (other_url, other.pid)
            vr = None if args.no_vllm_router else start_vllm_router(engine.url)
            if vr is not None:
                procs.append(vr[0])
                targets["vllm-router"] = (vr[1], vr[0].pid)
            elif not args.no_vllm_router:
                print("vllm-router not installed: gpufleet alone")
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                for url, _ in targets.values():
                    await wait_ready(s, url)
                for url, _ in targets.values():  # warm every path's connections
                    await closed_loop(s, url, max(args.streams), 4, 0.2)
                idle = await idle_cpu({n: p for n, (_, p) in targets.items() if p})
                print("idle CPU (no requests): " + ", ".join(f"{n} {v * 1000:.1f} ms/s" for n, v in idle.items()))
                results = []
                for tokens in args.tokens:
                    for streams in args.streams:
                        t0 = time.perf_counter()
                        figs = await measure(s, targets, streams, tokens, args.rounds, args.seconds, idle)
                        results.append((streams, tokens, figs))
                        print(f"  {streams} streams x {tokens} tokens: {time.perf_counter() - t0:.0f} s", flush=True)
                routers = [n for n in targets if n != "direct"]
                print(f"\nmedians of {args.rounds} rounds of {args.seconds:g} s (closed loop):\n")
                print(table(results, routers))
                print()
                for line in ratios(results):
                    print(line)
                if args.extras:
                    await extras(s, engine.url, router_url, args.rounds, args.seconds)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="rounds per load (each: direct and every router)")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of one closed-loop run")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 256], help="answer lengths")
    ap.add_argument("--no-vllm-router", action="store_true")
    ap.add_argument("--loop", default=None, help="gpufleet's event loop (router serve --loop)")
    ap.add_argument(
        "--also-loop", action="append", default=[], help="one more gpufleet router on this event loop"
    )
    ap.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="one more gpufleet router from another checkout (DIR holds a `gpufleet` link to it)",
    )
    ap.add_argument("--extras", action="store_true", help="also: decision time, 1-token completions/s, scrape cost")
    asyncio.run(main(ap.parse_args()))
