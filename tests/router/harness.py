"""A fleet on loopback for the router's integration tests: emulated regions, each with its engines
(the real engine emulator, serving/engine) and its own router, all on one event loop.

Ports are bound up front (port 0, then handed to the servers) so the fleet file can name every
router before any starts, exactly as a deployed fleet file would.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from gpufleet.serving.engine.model import EngineConfig
from gpufleet.serving.engine.server import EmulatorServer
from gpufleet.serving.router.config import build_config
from gpufleet.serving.router.gateway import ROUTED_HEADER, Router
from gpufleet.serving.router.limits import ServerLimits
from gpufleet.stacks.fleetfile import load_fleet

TOKEN = "integration-admin-token-0123456789"
MODEL = "llama-3.1-8b"


@dataclass(frozen=True)
class RegionSpec:
    cloud: str
    region: str
    gpu: str
    engines: int
    blocks: int  # per engine: small caches make "full" reachable with a few requests
    tier: str = "on-demand"
    instance_type: str | None = None
    residency: str = "us"
    reservation_id: str | None = None
    max_num_seqs: int | None = None  # e.g. 1: a second request waits in the engine's queue

    @property
    def key(self) -> str:
        return f"{self.cloud}-{self.region}"


# Three regions, three GPU types and sizes.
THREE = (
    RegionSpec("aws", "us-east-1", "H100-80GB", engines=2, blocks=96, tier="on-demand"),
    RegionSpec("gcp", "us-central1", "L4", engines=2, blocks=64, tier="spot", instance_type="g2-standard-8"),
    RegionSpec(
        "azure",
        "eastus",
        "A100-80GB",
        engines=3,
        blocks=256,
        tier="on-demand",
        instance_type="Standard_NC24ads_A100_v4",
    ),
)


@dataclass
class RegionBed:
    spec: RegionSpec
    engines: list[EmulatorServer]
    router: Router
    url: str

    @property
    def key(self) -> str:
        return self.spec.key


@dataclass
class FleetBed:
    regions: dict[str, RegionBed]
    fleet_path: Path
    session: aiohttp.ClientSession
    time_scale: float
    router_settings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> RegionBed:
        return self.regions[key]

    async def close(self) -> None:
        await self.session.close()
        for r in self.regions.values():
            await r.router.close()
        for r in self.regions.values():
            for e in r.engines:
                await e.stop()
        gc.unfreeze()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Every router has a good sample of each of its engines and a summary of each peer."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            ok = all(
                all(st.sample is not None and st.healthy for st in r.router.scraper.engines.values())
                and len(r.router.peer_summaries) == len(self.regions) - 1
                and all(
                    d.get("healthy_engines") == d.get("engines") and d.get("data_age_s") is not None
                    for _, d in r.router.peer_summaries.values()
                )
                for r in self.regions.values()
            )
            if ok:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("routers did not see their engines and peers in time")


def _free_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(512)
    s.setblocking(False)
    return s


async def start_fleet(
    tmp_path: Path,
    specs: tuple[RegionSpec, ...] = THREE,
    time_scale: float = 20.0,
    router: dict[str, Any] | None = None,
    slo_ttft_ms: float = 2000,
    limits: ServerLimits | None = None,
) -> FleetBed:
    # Routers, engines and client share this one process, which after the tests before it holds
    # hundreds of thousands of objects: a full garbage collection in the middle of a timed burst
    # paused everything ~0.5 s (every TTFT of a burst late by the same amount, scrape rounds late).
    # A deployed router's process holds only its own. Older objects are left out of collections
    # until close (gc.freeze), so a test's timing sees only what it allocates itself.
    gc.collect()
    gc.freeze()
    settings = {
        "scrape_interval_s": 0.1,
        "scrape_timeout_s": 0.3,
        "stale_after_s": 0.6,
        "connect_timeout_s": 0.5,
        "request_timeout_s": 30,
        "idle_timeout_s": 2.0,
        "queue_wait_s": 1.0,
        "breaker_cooldown_s": 1.0,
        **(router or {}),
    }
    engines: dict[str, list[EmulatorServer]] = {}
    for spec in specs:
        engines[spec.key] = []
        for _ in range(spec.engines):
            e = EmulatorServer(
                EngineConfig(
                    model=MODEL,
                    gpu=spec.gpu,
                    num_gpu_blocks=spec.blocks,
                    max_model_len=4096,
                    served_model_name=MODEL,
                    max_num_seqs=spec.max_num_seqs,
                ),
                time_scale=time_scale,
                admin_token=TOKEN,
            )
            await e.start("127.0.0.1", 0)
            engines[spec.key].append(e)
    socks = {spec.key: _free_socket() for spec in specs}
    doc = {
        "fleet": "loopback",
        "models": [{"name": MODEL, "catalog": MODEL, "max_model_len": 4096}],
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": 100},
        "regions": [
            {
                "cloud": s.cloud,
                "region": s.region,
                "gpu": s.gpu,
                **({"instance_type": s.instance_type} if s.instance_type else {}),
                "nodes": {"min": 0, "max": s.engines},
                "capacity": {
                    "tier": s.tier,
                    **({"reservation_id": s.reservation_id} if s.reservation_id else {}),
                },
                "residency": s.residency,
                "endpoints": {
                    "engines": [e.url for e in engines[s.key]],
                    "router": f"http://127.0.0.1:{socks[s.key].getsockname()[1]}",
                },
            }
            for s in specs
        ],
        "settings": {"dns": {"zone": "example.com", "record": "llm.example.com"}},
        "router": settings,
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    fleet = load_fleet(path)
    regions: dict[str, RegionBed] = {}
    for spec in specs:
        r = Router(build_config(fleet, spec.key, {"GPUFLEET_ADMIN_TOKEN": TOKEN}), limits=limits)
        port = await r.start(sock=socks[spec.key])
        regions[spec.key] = RegionBed(spec, engines[spec.key], r, f"http://127.0.0.1:{port}")
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    bed = FleetBed(regions, path, session, time_scale, settings)
    await bed.wait_ready()
    return bed


@dataclass
class Answer:
    status: int
    region: str | None = None
    text: str = ""
    tokens: int = 0
    done: bool = False  # [DONE] seen (streams) or a full JSON body (non-stream)
    finished: bool = False  # a finish_reason was seen
    error: str | None = None  # an error body or error event
    ttft_s: float | None = None
    ids: set[str] = field(default_factory=set)
    events_after_done: int = 0
    usage: dict[str, Any] | None = None  # the usage the client received (stream: its usage chunk)

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.done and self.finished and self.error is None

    @property
    def clean_error(self) -> bool:
        """An error the client can act on: an OpenAI error body, or an error event then [DONE]."""
        return self.error is not None and (self.status != 200 or self.done)


async def ask(
    session: aiohttp.ClientSession,
    url: str,
    content: str = "Tell me about GPUs.",
    max_tokens: int = 16,
    stream: bool = True,
    chat: bool = True,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    extra: dict[str, Any] | None = None,
) -> Answer:
    """One request as a client sees it, parsed strictly (every byte after [DONE] is counted).
    `extra`: more request fields (e.g. stream_options)."""
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}
    if chat:
        body["messages"] = [{"role": "user", "content": content}]
    else:
        body["prompt"] = content
    body.update(extra or {})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    start = time.perf_counter()
    async with session.post(
        url + path, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as r:
        ans = Answer(status=r.status, region=r.headers.get(ROUTED_HEADER))
        if r.status != 200:
            data = await r.json(content_type=None)
            ans.error = data["error"]["message"]
            return ans
        if not stream:
            data = await r.json()
            choice = data["choices"][0]
            ans.text = choice["message"]["content"] if chat else choice["text"]
            ans.tokens = data["usage"]["completion_tokens"]
            ans.usage = data["usage"]
            ans.done = ans.finished = choice.get("finish_reason") is not None
            ans.ttft_s = time.perf_counter() - start
            return ans
        async for line in r.content:
            line = line.strip()
            if not line:
                continue
            assert line.startswith(b"data: "), line
            payload = line[6:]
            if ans.done:
                ans.events_after_done += 1
                continue
            if payload == b"[DONE]":
                ans.done = True
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                ans.error = chunk["error"]["message"]
                continue
            if chunk.get("id"):
                ans.ids.add(chunk["id"])
            if chunk.get("usage"):
                ans.usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if piece:
                    if ans.ttft_s is None:
                        ans.ttft_s = time.perf_counter() - start
                    ans.text += piece
                    ans.tokens += 1
                if choice.get("finish_reason"):
                    ans.finished = True
    return ans


async def router_metric(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """Sum of a series of a router's /metrics (matching the given labels)."""
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series = head.split("{", 1)[0]
        if series != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
