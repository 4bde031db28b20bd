"""The OpenAI-compatible gateway: route each request by KV headroom, fail over, continue broken streams.

One `Router` serves one region. Per request it reads the latest engine samples (never waits on a
scrape), asks the policy for an ordered list of candidates, and tries them within the retry budget
and the request's deadline. Its concerns live in modules of their own: reading and validating a
request (parsing.py), candidates now or after a wait or why not (admission.py), the connections
upstream (upstream.py), relaying a stream (relay.py), continuing a broken one on another engine
(continuation.py), errors as OpenAI-style JSON (errors.py) and the HTTP server's limits (limits.py).
This module holds the `Router`: its view of the engines and regions, the attempts on candidates,
and the app wiring.

A request's fault is told from an engine's: a request the router finds invalid is answered 400
before routing; one an engine refuses (4xx) goes back to the client as that engine answered it and
is not tried elsewhere; an engine's 500 is tried once more on another engine, and when that one
answers 500 too, the request is at fault (400) and neither engine's breaker counts it. A client that
goes away cancels its request upstream (the upstream connection is closed, so vLLM aborts it).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web
from gpufleet.serving.router import admission, continuation, logs
from gpufleet.serving.router.breaker import BreakerBoard, CircuitBreaker
from gpufleet.serving.router.config import RegionInfo, RouterConfig
from gpufleet.serving.router.continuation import continuation_payload
from gpufleet.serving.router.errors import HttpError, error_body, error_response, json_errors, snippet, upstream_error
from gpufleet.serving.router.front import LeanClientOut, LeanRequest
from gpufleet.serving.router.limits import LISTEN_BACKLOG, GatewayRunner, ServerLimits
from gpufleet.serving.router.metrics import RouterMetrics
from gpufleet.serving.router.parsing import (
    DEFAULT_MAX_TOKENS,
    HOP_HEADER,
    PREDICTED_HEADER,
    RESIDENCY_HEADER,
    ROUTED_HEADER,
    SENT_AFTER_HEADER,
    WAITED_HEADER,
    Job,
    parse_job,
    read_body,
)
from gpufleet.serving.router.policy import (
    HELD_LOOKS_PER_PREFILL,
    BreakerState,
    Candidate,
    EngineView,
    OptimisticLedger,
    Policy,
    PolicyConfig,
    RegionView,
    RoutedRequest,
    headroom,
    make_policy,
    spare_headroom,
)
from gpufleet.serving.router.predict import MAX_OFFSET_S, offset_of
from gpufleet.serving.router.relay import ClientGone, ClientOut, EventStream, Stream, Upstream, pump
from gpufleet.serving.router.scale import UnmetDemand
from gpufleet.serving.router.signals import Sample, Scraper, resolve_engines
from gpufleet.serving.router.tls import CertReloader
from gpufleet.serving.router.upstream import Response, UpstreamPool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

# Importable from here as before the split (admin, regions, scale, the CLI and the tests use them).
__all__ = [
    "DEFAULT_MAX_TOKENS",
    "HOP_HEADER",
    "RESIDENCY_HEADER",
    "ROUTED_HEADER",
    "HttpError",
    "Router",
    "continuation_payload",
    "error_body",
    "error_response",
]

_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade")
)
UPSTREAM_KEEPALIVE_S = 4.0  # idle connections to engines and peers are closed after this
_GATEWAY_STATUS = frozenset((502, 503, 504))  # something in front of the engine: never the body's fault
# requests_total's outcome for the router's own error answers
_OUTCOMES = {400: "bad_request", 404: "bad_request", 408: "bad_request", 413: "bad_request",
             429: "rejected", 503: "unavailable"}  # fmt: skip


PEER_SUMMARY_ENGINES = 4  # engines a region summary describes to its peers (as the simulator's)


def _profile(shape):
    """predict.EngineProfile of an engine shape (model, gpu, tp, max_model_len); None if unknown."""
    if shape is None:
        return None
    from gpufleet.serving.router.predict import profile_for

    try:
        return profile_for(*shape)
    except Exception:  # noqa: BLE001 - a GPU or model the catalog lacks: no prediction, say so in views
        return None


def engine_figures(views, shape, now: float, policy: object = None) -> list[dict]:
    ranked = sorted((v for v in views if v.healthy and not v.drained and v.sampled_at is not None),
                    key=lambda v: (v.pending_prefill_tokens + v.waiting, -v.free_tokens, v.id))  # fmt: skip
    return [
        {"id": v.id, "shape": list(shape) if shape else None, "running": v.running, "waiting": v.waiting,
         "kv_usage": v.kv_usage, "capacity_tokens": v.capacity_tokens, "free_tokens": v.free_tokens,
         "pending_tokens": v.pending_tokens, "pending_prefill_tokens": v.pending_prefill_tokens,
         "recent_itl_s": v.recent_itl_s, "recent_prompt_tokens": v.recent_prompt_tokens,
         "recent_itl_tokens": v.recent_itl_tokens, "age_s": v.age(now),
         "ttft_offset_s": offset_of(policy, v.id)}  # fmt: skip
        for v in ranked[:PEER_SUMMARY_ENGINES]
    ]


def _offset(value) -> float | None:
    """A peer's TTFT offset for one engine, within the bounds its router keeps; None: absent or not a
    number (an older peer, or garbage: that engine is then predicted with this router's own)."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return min(MAX_OFFSET_S, max(0.0, float(value)))


def _peer_engines(key: str, figures, received: float) -> tuple:
    """EngineViews of a peer's engine_figures (an older peer sends none: ())."""
    out = []
    for f in figures if isinstance(figures, list) else ():
        try:
            out.append(EngineView(
                id=str(f["id"]), region=key, free_tokens=float(f["free_tokens"]),
                capacity_tokens=float(f["capacity_tokens"]), kv_usage=float(f["kv_usage"]),
                running=int(f["running"]), waiting=int(f["waiting"]),
                sampled_at=received - float(f.get("age_s") or 0.0),
                pending_tokens=float(f["pending_tokens"]),
                pending_prefill_tokens=float(f["pending_prefill_tokens"]),
                recent_itl_s=f.get("recent_itl_s"), recent_prompt_tokens=f.get("recent_prompt_tokens"),
                recent_itl_tokens=f.get("recent_itl_tokens"),
                profile=_profile(tuple(f["shape"])) if f.get("shape") else None,
                ttft_offset_s=_offset(f.get("ttft_offset_s")),
            ))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            continue  # a malformed figure: that engine is not predicted, the rest are
    return tuple(out)


class Router:
    def __init__(
        self,
        config: RouterConfig,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
        limits: ServerLimits | None = None,
        replicas: Sequence[str] = (),
        replicas_dns: str | None = None,
    ) -> None:
        self.config = config
        self.limits = limits or ServerLimits()
        s = config.settings
        self.clock = clock
        self.policy_config = PolicyConfig.from_settings(s, config.slo_tpot_ms / 1000.0, config.slo_ttft_ms / 1000.0)
        self.profile = _profile(config.region.shape)  # this region's engines' step times (predict.py)
        # Global reach: each engine's own region and step times (the shapes of its region).
        shapes = {key: _profile(config.regions[key].shape) for key in set(config.engine_regions.values())}
        self.engine_home: dict[str, tuple[str, Any]] = {
            url: (key, shapes[key]) for url, key in config.engine_regions.items()
        }
        self.peer_rtt: dict[str, float] = {}  # peer region -> measured summary round trip (regions.py)
        self._peer_engine_views: dict[str, tuple[float, tuple]] = {}
        self.policy = policy or make_policy(s.policy, self.policy_config)
        self.breakers = BreakerBoard(
            engine_threshold=s.breaker_failures,
            region_threshold=s.breaker_failures,
            cooldown_s=s.breaker_cooldown_s,
        )
        self.ledger = OptimisticLedger()
        self.scraper = Scraper(
            interval_s=s.scrape_interval_s,
            timeout_s=s.scrape_timeout_s,
            on_round=self._on_round,
        )
        self.scraper.set_engines(config.region.engines)
        self.drained_regions: set[str] = set()
        self.drained_engines: set[str] = set()
        self.outstanding: dict[str, int] = {}
        self.queued = 0
        self.queued_tokens = 0  # the demand (need_tokens) of the requests in `queued`
        self.unmet = UnmetDemand()  # spilled and refused demand, for /scale
        self._room = asyncio.Event()
        # late binding's held requests: a heap of (order held, tie, waiter), oldest first (`wake_held`);
        # `tie` keeps two waiters of one request apart (a timed-out one stays until popped)
        self._held: list[tuple[int, int, asyncio.Future[None]]] = []
        self._held_order = itertools.count()
        self._held_ties = itertools.count()
        self._views: dict[str, tuple[EngineView, Sample | None]] = {}  # engine_views' cache
        self._waits: dict[str, set[Response]] = {}  # engine -> answers awaited from it (watchers)
        self.metrics = RouterMetrics(self, clock)
        # Other replicas of this region (replicas.py): their reservations per engine, and this
        # replica's id, by which it knows itself among the replicas a DNS name lists.
        self.replica_id = os.urandom(8).hex()
        self.replicas, self.replicas_dns = tuple(replicas), replicas_dns
        self.shared_pending: dict[str, float] = {}
        self.shared_in_flight: dict[str, int] = {}
        # Peer summaries: filled by gpufleet.serving.router.regions.PeerReader.
        self.peer_summaries: dict[str, tuple[float, dict[str, Any]]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None  # the answers' connections (upstream.py)
        self._tasks: list[asyncio.Task] = []
        self._runner: GatewayRunner | None = None
        self.port: int | None = None
        self.tls: CertReloader | None = None  # set by start_tls
        self.tls_port: int | None = None

    # ---- views for the policy --------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """aiohttp's client session, for what is not per token (/tokenize); the answers themselves
        travel on the lean client (upstream.py). None until `start`."""
        return self._session

    @property
    def region(self) -> str:
        return self.config.region.key

    def engine_views(self, now: float) -> list[EngineView]:
        # Built per request over every engine, so a view is reused while nothing it shows changed
        # (same sample, health, drain, breaker state, pending demand and requests in flight):
        # comparing is several times cheaper than building a 14-field frozen view.
        region = self.region
        cache = self._views
        pending = self.ledger.pending
        outstanding = self.outstanding
        drained_engines = self.drained_engines
        breakers = self.breakers.engines
        shared, shared_n = self.shared_pending, self.shared_in_flight  # other replicas' (replicas.py)
        home = self.engine_home
        out = []
        for url, st in self.scraper.engines.items():
            b = breakers.get(url)
            breaker = BreakerState.closed if b is None else b.state(now)
            waiting_for = pending(url)
            prefill_for = self.ledger.pending_prefill(url)
            in_flight = outstanding.get(url, 0)
            if shared:
                waiting_for += shared.get(url, 0.0)
                in_flight += shared_n.get(url, 0)
            drained = url in drained_engines
            hit = cache.get(url)
            if hit is not None:
                view, sample = hit
                if (
                    sample is st.sample
                    and view.healthy == st.healthy
                    and view.breaker is breaker
                    and view.pending_tokens == waiting_for
                    and view.pending_prefill_tokens == prefill_for
                    and view.outstanding == in_flight
                    and view.drained == drained
                ):
                    out.append(view)
                    continue
            s = st.sample
            engine_region, profile = home.get(url) or (region, self.profile)
            view = EngineView(
                id=url,
                region=engine_region,
                free_tokens=s.free_tokens if s else 0.0,
                capacity_tokens=float(s.capacity_tokens) if s else 0.0,
                kv_usage=s.kv_usage if s else 1.0,
                running=s.running if s else 0,
                waiting=s.waiting if s else 0,
                sampled_at=s.taken_at if s else None,
                healthy=st.healthy,
                drained=drained,
                breaker=breaker,
                pending_tokens=waiting_for,
                # Its waiting queue is requests we sent: their whole demand is in pending_tokens.
                waiting_tokens=0.0,
                recent_itl_s=st.recent_itl_s,
                outstanding=in_flight,
                profile=profile,
                pending_prefill_tokens=prefill_for,
                recent_prompt_tokens=st.recent_prompt_tokens,
                recent_itl_tokens=st.recent_itl_tokens,
                ledger=self.ledger,
            )
            cache[url] = (view, s)
            out.append(view)
        if len(cache) > len(out):  # engines gone (DNS): forget their views
            for url in set(cache) - set(self.scraper.engines):
                del cache[url]
        return out

    def region_views(self, now: float) -> list[RegionView]:
        out = []
        every_local = self.config.reach == "global"  # every region's engines are this router's own
        for key, info in self.config.regions.items():
            local = every_local or key == self.region
            summary = None if local else self.peer_summaries.get(key)
            base = RegionView(
                key=key,
                tier=info.tier,
                residency=info.residency,
                models=info.models,
                cost_per_gpu_hour=info.cost_per_gpu_hour,
                drained=key in self.drained_regions,
                breaker=self.breakers.region_state(key, now),
                local=local,
                remote=not local,
            )
            if summary is not None:
                received, data = summary
                age = data.get("data_age_s")
                # What we forwarded since this summary is not in it yet (optimistic accounting).
                sent = self.ledger.pending(key)
                free = float(data.get("free_tokens", 0.0)) - sent
                base = replace(
                    base,
                    drained=base.drained or bool(data.get("drained")),
                    free_tokens=free,
                    # The peer spreads what we sent over its engines; its largest one keeps its room
                    # until the region as a whole runs short.
                    largest_free_tokens=min(float(data.get("largest_free_tokens", 0.0)), free),
                    largest_fit_tokens=float(data.get("largest_fit_tokens", 0.0)) - sent,
                    healthy_engines=int(data.get("healthy_engines", 0)),
                    queue=int(data.get("queue", 0)),
                    summarized_at=None if age is None else received - float(age),
                    # for the predicting policy: the peer's engine figures, the measured round trip,
                    # and what this router has in flight there
                    engines=self._peer_engines(key, data, received),
                    rtt_s=self.peer_rtt.get(key, 0.0),
                    forwarded=self.ledger.in_flight(key),
                )
            out.append(base)
        return out

    def _peer_engines(self, key: str, data: dict, received: float) -> tuple:
        """A peer summary's engine figures as EngineViews, built once per summary."""
        hit = self._peer_engine_views.get(key)
        if hit is None or hit[0] != received:
            hit = self._peer_engine_views[key] = (received, _peer_engines(key, data.get("engine_figures"), received))
        return hit[1]

    def headroom_of(self, view: EngineView, now: float) -> float:
        return headroom(view, now, self.policy_config)

    def local_summary(self, now: float) -> dict[str, Any]:
        views = self.engine_views(now)
        drained = self.region in self.drained_regions
        # Peers spill here only into engines that take requests now (not saturated: policy.saturated).
        rooms = [0.0 if drained or v.drained else spare_headroom(v, now, self.policy_config) for v in views]
        # ... and, as a last resort, into any healthy engine (saturated ones too).
        fits = [0.0 if drained or v.drained else headroom(v, now, self.policy_config) for v in views]
        ages = [v.age(now) for v in views if v.sampled_at is not None]
        # The largest engine's whole KV cache, once every engine has reported (peers tell from it
        # whether a request can ever fit here: admission.unservable).
        caps = [v.capacity_tokens for v in views if v.sampled_at is not None]
        return {
            "region": self.region,
            "tier": self.config.region.tier,
            "residency": self.config.region.residency,
            "models": sorted(self.config.region.models),
            "drained": drained,
            "free_tokens": sum(rooms),
            "largest_free_tokens": max(rooms, default=0.0),
            "largest_fit_tokens": max(fits, default=0.0),
            "queue": self.queued,
            "running": sum(v.running for v in views),
            "waiting": sum(v.waiting for v in views),
            "healthy_engines": sum(1 for v in views if v.healthy and not v.drained),
            "engines": len(views),
            "data_age_s": max(ages) if ages else None,  # None: no engine sampled yet
            "largest_capacity_tokens": max(caps) if caps and len(caps) == len(views) else None,
            # Demand refused here for lack of room anywhere (peak tokens in one second of the last
            # minute): peers that can still grow take a share of it into their own /scale.
            "unmet_tokens": self.unmet.peaks(now)[1],
            # For this region's other router replicas (replicas.py): what this one has reserved.
            "replica": self.replica_id,
            "reservations": {url: self.ledger.pending(url) for url in self.outstanding},
            "in_flight": dict(self.outstanding),
            # the predicting policy's inputs for the engines that would take a forwarded request first
            # (least queued prefill, then most room): peers predict TTFT/TPOT here from them
            "engine_figures": engine_figures(views, self.config.region.shape, now, self.policy),
        }

    def region_summaries(self, now: float) -> list[dict[str, Any]]:
        out = [self.local_summary(now)]
        for key, (received, data) in self.peer_summaries.items():
            age = data.get("data_age_s")
            out.append(
                {**data, "region": key, "data_age_s": None if age is None else float(age) + now - received}
            )
        return out

    def choose(self, routed: RoutedRequest) -> list[Candidate]:
        now = self.clock()
        t0 = time.perf_counter()
        cands = self.policy.choose(routed, self.engine_views(now), self.region_views(now), now)
        self.metrics.decision.observe(time.perf_counter() - t0)
        return cands

    def _on_round(self) -> None:
        self._expire_hung()
        self._wake_queue()
        self.wake_held(None)

    def _wake_queue(self) -> None:
        self._room.set()
        self._room = asyncio.Event()

    def room_event(self) -> asyncio.Event:
        """Set at the next scrape round (room may have come): what queued requests wait on."""
        return self._room


    # ---- lifecycle --------------------------------------------------------------------------------

    def app(self) -> web.Application:
        from gpufleet.serving.router import admin, regions, scale

        app = web.Application(client_max_size=self.config.settings.max_body_bytes + 1, middlewares=[json_errors])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        admin.add_routes(app, self)
        regions.add_routes(app, self)
        scale.add_routes(app, self)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None) -> int:
        """Serve on host:port, or on an already bound socket (tests that must know ports up front)."""
        from gpufleet.serving.router.regions import PeerReader

        s = self.config.settings
        # vLLM closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, vllm/envs.py, v0.11.0):
        # drop ours sooner, or a request could go out on a connection the engine is closing and
        # fail as if the engine had. The answers travel on the lean client (upstream.py); the
        # session carries what is not per token (/tokenize for a continuation's usage).
        connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True, keepalive_timeout=UPSTREAM_KEEPALIVE_S)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self._pool = UpstreamPool(UPSTREAM_KEEPALIVE_S)
        self._tasks.append(asyncio.create_task(self.scraper.run(), name=f"scrape-{self.region}"))
        if self.config.region.engines_dns:
            self._tasks.append(asyncio.create_task(self._discover(), name=f"dns-{self.region}"))
        if self.replicas or self.replicas_dns:
            from gpufleet.serving.router.replicas import ReplicaReader

            replicas = ReplicaReader(self, self.replicas, self.replicas_dns)
            self._tasks.append(asyncio.create_task(replicas.run(), name=f"replicas-{self.region}"))
        if self.config.peers:
            reader = PeerReader(self, interval_s=s.scrape_interval_s, timeout_s=s.scrape_timeout_s)
            self._tasks.append(asyncio.create_task(reader.run(), name=f"peers-{self.region}"))
        self._tasks.append(asyncio.create_task(self._flush_logs(logs.install()), name=f"logs-{self.region}"))
        # The two completion routes are served on the front (front.py) too: the usual request is
        # answered there, any other hands its connection to the app.
        hot = {"chat": self._chat, "completions": self._completions}
        self._runner = GatewayRunner(self.app(), self.limits, hot, self.config.settings.max_body_bytes)  # type: ignore[arg-type]
        await self._runner.setup()
        site: web.BaseSite = (
            web.SockSite(self._runner, sock, backlog=LISTEN_BACKLOG)
            if sock
            else web.TCPSite(self._runner, host, port, backlog=LISTEN_BACKLOG)
        )
        await site.start()
        self.port = (sock or site._server.sockets[0]).getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def start_tls(
        self, tls: CertReloader, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None
    ) -> int:
        """Serve the same app over HTTPS too (after `start`), with `tls.context`; `tls.run()` re-reads
        the certificate and key when their files change. One connection cap covers both."""
        assert self._runner is not None, "start() first"
        site: web.BaseSite = (
            web.SockSite(self._runner, sock, ssl_context=tls.context, backlog=LISTEN_BACKLOG)
            if sock
            else web.TCPSite(self._runner, host, port, ssl_context=tls.context, backlog=LISTEN_BACKLOG)
        )
        await site.start()
        self.tls = tls
        self.tls_port = (sock or site._server.sockets[0]).getsockname()[1]  # type: ignore[union-attr]
        self._tasks.append(asyncio.create_task(tls.run(), name=f"tls-{self.region}"))
        return self.tls_port

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        if self._pool is not None:
            self._pool.close()

    @staticmethod
    async def _flush_logs(repeats: logs.RepeatFilter) -> None:
        while True:
            await asyncio.sleep(repeats.window_s)
            repeats.flush()

    async def _discover(self) -> None:
        """Re-resolve engines_dns periodically; static engines stay."""
        dns = self.config.region.engines_dns
        assert dns
        while True:
            try:
                found = await resolve_engines(dns)
            except (OSError, ValueError):
                found = None  # keep the last known set: a DNS hiccup must not empty the region
            if found is not None:
                self.scraper.set_engines([*self.config.region.engines, *found])
            await asyncio.sleep(self.config.settings.dns_refresh_s)

    # ---- simple endpoints -------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "gpufleet", "max_model_len": n}
            for name, n in self.config.models.items()
        ]
        return web.json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        s = self.local_summary(self.clock())
        return web.json_response(
            {
                "status": "ok",
                "region": self.region,
                "healthy_engines": s["healthy_engines"],
                "drained": s["drained"],
            }
        )

    def readiness(self, now: float) -> tuple[int, dict[str, int]]:
        """(usable local engines, why the others are not): usable = up, a sample younger than
        stale_after_s, not drained, breaker not open."""
        stale = self.policy_config.stale_after_s
        why = {"down": 0, "stale": 0, "drained": 0, "breaker_open": 0}
        ready = 0
        for url, st in self.scraper.engines.items():
            if not st.healthy or st.sample is None:
                why["down"] += 1
            elif now - st.sample.taken_at > stale:
                why["stale"] += 1
            elif url in self.drained_engines:
                why["drained"] += 1
            elif self.breakers.engine_state(url, now) is BreakerState.open:
                why["breaker_open"] += 1
            else:
                ready += 1
        return ready, why

    async def _ready(self, request: web.Request) -> web.Response:
        """Readiness for DNS health checks (Route53, HTTPS /ready): 200 while this region can serve
        from its own engines, 503 (OpenAI-style error) while it cannot, so DNS stops sending
        clients here and peers spill around it."""
        ready, why = self.readiness(self.clock())
        facts = {"region": self.region, "engines_ready": ready, "engines": len(self.scraper.engines)}
        if self.region in self.drained_regions:
            message = f"region {self.region} is drained"
        elif not ready:
            detail = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in why.items() if n)
            message = f"no engine of region {self.region} is up" + (f" ({detail})" if detail else " (none known)")
        else:
            return web.json_response({"ready": True, **facts})
        body = {**error_body(503, message, "service_unavailable"), "ready": False, **facts}
        return web.json_response(body, status=503, headers={"Cache-Control": "no-store"})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


    # ---- the request path -------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completions")

    async def _handle(self, request: web.Request, kind: str) -> web.StreamResponse:
        """Exactly one answer per request: the engine's, or an OpenAI-style error. A client that goes
        away is counted `client_cancelled` (`origin_cancelled` when the client is a peer router that
        forwarded the request): aiohttp cancels this handler when its connection is lost, and the
        attempts close their upstream connection on the way out."""
        received = time.perf_counter()
        try:
            if type(request) is LeanRequest:  # read whole by the front (front.py), within the limits
                body = request.body
            else:
                body = await read_body(request, self.config.settings.max_body_bytes, self.limits.body_timeout_s)
            arrived = self.clock()
            deadline = arrived + self.config.settings.request_timeout_s
            job = parse_job(self.config, request, body, kind, deadline, received, arrived)
            return await self._serve(request, job)
        except HttpError as exc:
            self.metrics.outcome(self.region, _OUTCOMES.get(exc.status, "error"))
            return exc.response()
        except ClientGone as exc:
            self.metrics.outcome(self.region, _cancelled(request))
            return exc.response or web.Response(status=499)
        except asyncio.CancelledError:
            self.metrics.outcome(self.region, _cancelled(request))
            raise

    def take(self, cands: list[Candidate]) -> Candidate | None:
        """The first candidate whose breaker lets a request through now (half-open: as the probe)."""
        now = self.clock()
        for c in cands:
            if self.breaker(c).allow(now):
                return c
        return None

    def record(self, cand: Candidate, ok: bool) -> None:
        # Local engines each have a breaker; a region's breaker guards forwarding to its router, so
        # one sick local engine cannot shut the whole local region.
        now = self.clock()
        b = self.breaker(cand)
        b.success(now) if ok else b.failure(now)

    def _base_url(self, cand: Candidate) -> str:
        if cand.engine is not None:
            return cand.engine
        peer: RegionInfo = self.config.regions[cand.region]
        return peer.router_url or ""

    async def _serve(self, request: web.Request, job: Job) -> web.StreamResponse:
        """Try the candidates within the retry budget and the deadline.

        An engine's 500 is a suspect, not yet a failure: the next engine decides. Another 500 for the
        same body means the request is at fault (400, no further attempt, neither breaker counts
        it); an answer means the first engine was (its breaker counts the failure then)."""
        cands = await admission.admit(self, job)
        failed: set[str] = set()
        # Targets that answered 429: full a moment ago, not broken. With no other candidate the request
        # waits for room as admission would have (what is left of its wait), and they are asked again
        # after the next scrape round; a 429 does not spend the retry budget.
        full: set[str] = set()
        attempts = 0  # those that count against the retry budget
        tried = 0
        budget = self.config.settings.retry_budget
        last_error = "no candidate"
        only_full = True  # every failure so far was a target saying it is full (429)
        suspect: Candidate | None = None  # answered 500; whose fault is not known yet
        try:
            while attempts <= budget:
                cand = self.take(cands)
                if cand is None:
                    break
                if tried:
                    self.metrics.retries.inc()
                else:
                    self.metrics.overhead_request.observe(time.perf_counter() - job.received)
                tried += 1
                attempts += 1
                try:
                    answer = await self._attempt(request, job, cand)
                except Upstream as exc:
                    last_error = f"{cand.target}: {exc}"
                    if exc.suspect or exc.penalize:
                        failed.add(cand.target)
                    else:
                        full.add(cand.target)
                        attempts -= 1
                    if exc.suspect and suspect is not None:
                        # The same body broke two engines: the request's fault, not theirs.
                        self.release(cand)
                        self.release(suspect)
                        suspect = None
                        raise HttpError(
                            400,
                            f"the request could not be processed: two engines failed on it ({last_error})",
                        ) from None
                    if exc.suspect:
                        suspect = cand
                        only_full = False
                    elif exc.penalize:
                        only_full = False
                        self.record(cand, ok=False)
                    else:
                        self.release(cand)
                else:
                    if suspect is not None:  # another engine answered: the first one was at fault
                        self.record(suspect, ok=False)
                        suspect = None
                    return answer
                if self.clock() >= job.deadline:
                    break
                routed = replace(job.routed, exclude=frozenset(failed))
                waited = admission.waited_s(job, self.config.settings.time_scale)
                cands = self.choose(replace(routed, exclude=frozenset(failed | full), waited_s=waited))
                if cands and cands[0].hold_s is not None:  # late binding, after a refusal too
                    # held, a target that answered 429 stays out (as in the simulator: asking it again
                    # there before its next round added preemptions, 16 -> 70 at x1.25 of bench_admission)
                    held = replace(routed, exclude=frozenset(failed | full))
                    cands = await admission.hold(self, job, held, cands[0].hold_s)
                elif not cands and only_full:
                    cands = await admission.wait_for_room(self, job, routed)
        finally:
            if suspect is not None:
                # Nothing confirmed either way (no other engine, the budget spent, the client gone):
                # a poison request must not open a breaker, so this one is not counted.
                self.release(suspect)
        if only_full:
            admission.refused(self, job)
            raise HttpError(
                429, f"no room for this request now ({last_error})", headers=admission.retry_after(self)
            )
        raise HttpError(503, f"no engine could serve the request ({last_error})", "service_unavailable")

    def breaker(self, cand: Candidate) -> CircuitBreaker:
        if cand.engine is not None:
            return self.breakers.engine(cand.engine)
        return self.breakers.region(cand.region)

    def release(self, cand: Candidate) -> None:
        self.breaker(cand).release()

    def note_sent(self, cand: Candidate, job: Job, key: object) -> None:
        # The whole demand counts against the target until the answer shows up in its KV cache.
        now = self.clock()
        self.ledger.routed(cand.target, key, job.routed.need_tokens, now,
                           prefill_tokens=job.routed.prompt_tokens or 0)  # fmt: skip
        if cand.engine is not None:
            self.outstanding[cand.engine] = self.outstanding.get(cand.engine, 0) + 1
        else:
            self.metrics.spills.labels(cand.region).inc()
            if self.region not in self.drained_regions:  # spilled for lack of local room (/scale)
                self.unmet.spill_started(key, job.routed.need_tokens, now)

    def first_token(self, stream: Stream) -> None:
        """A streamed answer's first token came: the TTFT the policy predicted for its engine is
        measured (`predict.Correction.observe_ttft`), and held requests get a look."""
        probe = stream.probe
        if probe is not None:
            stream.probe = None
            observe = getattr(self.policy, "observe_ttft", None)
            if observe is not None:
                engine, predicted, sent = probe
                observe(engine, predicted, (time.perf_counter() - sent) * self.config.settings.time_scale)
        self.prefill_done()

    def prefill_done(self) -> None:
        """A request's first token came (or its answer ended): requests held for late binding may
        now start; the oldest get another look (`policy.HELD_LOOKS_PER_PREFILL`)."""
        if self._held:
            self.wake_held(HELD_LOOKS_PER_PREFILL)

    def held_order(self) -> int:
        """A held request's place in line, kept while it waits."""
        return next(self._held_order)

    def held_waiter(self, order: int) -> asyncio.Future[None]:
        """What a held request waits on until `wake_held` reaches its place."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._held, (order, next(self._held_ties), waiter))
        return waiter

    def wake_held(self, n: int | None) -> None:
        """Wake the `n` oldest held requests (None: all). One that is sent calls this with 1, so
        that its look passes to the next in line."""
        held = self._held
        while held and (n is None or n > 0):
            _, _, waiter = heapq.heappop(held)
            if not waiter.done():  # a waiter whose wait timed out is cancelled
                waiter.set_result(None)
                if n is not None:
                    n -= 1

    def note_done(self, cand: Candidate, key: object) -> None:
        self.ledger.done(key)
        self.prefill_done()
        if cand.engine is not None:
            n = self.outstanding.get(cand.engine, 1) - 1
            if n > 0:
                self.outstanding[cand.engine] = n
            else:
                self.outstanding.pop(cand.engine, None)
        else:
            self.unmet.spill_ended(key, self.clock())

    def watchers(self, cand: Candidate) -> set[Response] | None:
        """Where an answer from the candidate waits while the scraper watches its engine.

        A hung engine accepts the request and never answers; a non-streamed answer may rightly take
        minutes, so no read timeout tells the two apart. Two failed scrapes in a row do: after each
        scrape round `_expire_hung` breaks the answers still awaited from such an engine (a stream's
        until its first token, `relay.pump`; any other's until its end). Being watched costs a set
        entry: no task, no timer.
        """
        if cand.engine is None or cand.engine not in self.scraper.engines:
            return None
        return self._waits.setdefault(cand.engine, set())

    def _expire_hung(self) -> None:
        for url, waits in self._waits.items():
            state = self.scraper.engines.get(url)
            if waits and state is not None and state.failures >= 2:
                why = f"engine stopped answering ({state.error})"
                for resp in list(waits):
                    resp.abort(Upstream(why))


    async def open_upstream(self, cand: Candidate, job: Job, body: bytes, continuation: bool = False) -> Response:
        """POST to the candidate; the response with headers read, or `Upstream`. `continuation`: the
        request lost its engine after the fleet took it (continuation.py)."""
        assert self._pool is not None
        s = self.config.settings
        left = job.deadline - self.clock()
        if left <= 0:
            raise Upstream("deadline passed", penalize=False)
        # Until the first byte the request may rightly wait in the engine's queue, so reads are bounded
        # by its deadline only; `pump` tightens a stream to idle_timeout_s once its first token came.
        headers = job.headers
        if cand.engine is None:  # to a peer: what is left of its TTFT slack is the peer's to hold for
            # A continuation is the fleet's to finish, late or not (its engine failed, not the client):
            # a peer must not count its age against its TTFT, refuse it as late, and break the stream.
            waited_ms = 0.0 if continuation else 1000.0 * admission.waited_s(job, s.time_scale)
            headers = {**headers, WAITED_HEADER: f"{waited_ms:.0f}"}
        try:
            resp = await self._pool.post(
                self._base_url(cand), job.path, body, headers, connect_timeout_s=min(s.connect_timeout_s, left),
                read_timeout_s=left, watchers=self.watchers(cand),
            )  # fmt: skip
        except (TimeoutError, OSError, ValueError) as exc:
            raise Upstream(f"{type(exc).__name__}: {exc}") from None
        if resp.status == 429:
            resp.release()
            raise Upstream("answered 429", penalize=False)  # full, not broken: no breaker failure
        if resp.status >= 500:
            detail = ""
            if resp.status not in _GATEWAY_STATUS:
                try:
                    async with asyncio.timeout(min(1.0, left)):
                        detail = ": " + snippet(await resp.read(4096), 200)
                except (TimeoutError, OSError):
                    pass
            resp.close()
            # 502/503/504 say the engine is unavailable; any other 5xx may be the body's doing.
            raise Upstream(f"answered {resp.status}{detail}", suspect=resp.status not in _GATEWAY_STATUS)
        return resp

    async def _attempt(self, request: web.Request, job: Job, cand: Candidate) -> web.StreamResponse:
        key = object()
        # Reserve before the first await, so concurrent requests see this one's demand.
        self.note_sent(cand, job, key)
        resp: Response | None = None
        finished = False  # the upstream answer was read to its end: its connection may be reused
        sent = time.perf_counter()
        waited = admission.waited_s(job, self.config.settings.time_scale, sent)  # for the answer's head
        try:
            resp = await self.open_upstream(cand, job, job.body)
            if job.stream and resp.status == 200:
                answer = await self._relay(request, job, cand, resp, key, sent, waited)
                finished = True
                return answer
            try:
                data = await resp.read()
            except (TimeoutError, OSError) as exc:
                raise Upstream(f"answer broke: {type(exc).__name__}") from None
            finished = True
            # A 4xx is the engine refusing the request (it is up): relayed, never tried elsewhere.
            self.record(cand, ok=True)
            headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers.update(_answer_headers(job, cand, resp, waited))
            if resp.status >= 400:
                self.metrics.outcome(cand.region, "upstream_4xx")
                return upstream_error(resp.status, data, headers)
            self.metrics.outcome(cand.region, "ok")
            return web.Response(status=resp.status, body=data, headers=headers)
        except (ClientGone, asyncio.CancelledError):
            self.release(cand)  # the client left: not the engine's fault
            raise
        finally:
            if resp is not None:
                # Not read to its end (the client left, the stream broke): close the connection, so
                # the engine sees the request abandoned and aborts it (vLLM does on disconnect). A
                # finished stream's connection is kept once its chunked end has come (upstream.py).
                resp.release() if finished else resp.close()
            self.note_done(cand, key)

    async def _relay(
        self, request: web.Request, job: Job, cand: Candidate, resp: Response, key: object, sent: float,
        waited: float,
    ) -> web.StreamResponse:
        response = EventStream(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                     **_answer_headers(job, cand, resp, waited)},
        )  # fmt: skip
        out = LeanClientOut(request, response) if type(request) is LeanRequest else ClientOut(request, response)
        await out.start()
        stream = Stream(key=key)
        if cand.engine is not None and cand.predicted_ttft_s is not None:
            stream.probe = (cand.engine, cand.predicted_ttft_s, sent)
        try:
            done, broke = await pump(self, job, resp, out, stream, False)
            if done:
                self.record(cand, ok=True)
                self.metrics.outcome(cand.region, "ok")
            else:
                self.record(cand, ok=False)
                if not await continuation.continue_stream(self, request, job, cand, out, stream, broke):
                    self.metrics.outcome(cand.region, "stream_error")
        except ClientGone as exc:
            exc.response = response
            raise
        if not out.broken_on_purpose:
            await out.end()
        return response


def _answer_headers(job: Job, cand: Candidate, resp: Response, waited_s: float) -> dict[str, str]:
    """Who answered (a peer says which of its regions), and when asked, the TTFT the policy
    predicted for the engine it chose and how long the request had waited at the routers when it
    was sent there (this router's figures, or those of the peer that chose the engine)."""
    out = {ROUTED_HEADER: resp.headers.get(ROUTED_HEADER, cand.region)}
    if job.routed.explain:
        if cand.engine is not None:
            if cand.predicted_ttft_s is not None:
                out[PREDICTED_HEADER] = f"{cand.predicted_ttft_s * 1000:.1f}"
            out[SENT_AFTER_HEADER] = f"{waited_s * 1000:.1f}"
        else:
            for name in (PREDICTED_HEADER, SENT_AFTER_HEADER):
                if name in resp.headers:
                    out[name] = resp.headers[name]
    return out


def _cancelled(request: web.Request) -> str:
    return "origin_cancelled" if HOP_HEADER in request.headers else "client_cancelled"
