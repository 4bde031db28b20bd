"""The OpenAI-compatible gateway: route each request by KV headroom, fail over, continue broken streams.

One `Router` serves one region. Per request it reads the latest engine samples (never waits on a
scrape), asks the policy for an ordered list of candidates, and tries them within the retry budget
and the request's deadline. Streams are relayed event by event as they arrive (no buffering beyond
one SSE event); if the engine breaks after the client has seen bytes, the stream is continued on
another engine from the prompt plus the text already sent, so the client sees one stream.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from aiohttp import web
from gpufleet.serving.router.breaker import BreakerBoard, CircuitBreaker
from gpufleet.serving.router.config import RegionInfo, RouterConfig
from gpufleet.serving.router.metrics import RouterMetrics
from gpufleet.serving.router.policy import (
    BreakerState,
    Candidate,
    EngineView,
    OptimisticLedger,
    Policy,
    PolicyConfig,
    RegionView,
    RoutedRequest,
    estimate_prompt_tokens,
    headroom,
    make_policy,
    spare_headroom,
)
from gpufleet.serving.router.signals import Sample, Scraper, resolve_engines
from gpufleet.serving.router.tls import CertReloader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

HOP_HEADER = "X-Gpufleet-Hop"  # set on a request forwarded to a peer region; the peer never forwards it again
ROUTED_HEADER = "X-Gpufleet-Region"  # on responses: the region that answered
RESIDENCY_HEADER = "X-Gpufleet-Residency"
DEFAULT_MAX_TOKENS = 256  # demand assumed when a request gives no max_tokens
_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade")
)
_RETRYABLE_STATUS = frozenset((429, 500, 502, 503, 504))


class HttpError(Exception):
    """Answered to the client as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers or {}

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.type, self.headers)


def error_body(status: int, message: str, type_: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": status}}


def error_response(
    status: int, message: str, type_: str = "invalid_request_error", headers=None
) -> web.Response:
    return web.json_response(error_body(status, message, type_), status=status, headers=headers)


class _Upstream(Exception):
    """One attempt failed before the client saw a byte; try the next candidate."""

    def __init__(self, reason: str, penalize: bool = True) -> None:
        super().__init__(reason)
        self.penalize = penalize  # False: not the target's fault (e.g. it is merely full)


class _ClientGone(Exception):
    pass


@dataclass
class _Stream:
    """What has been relayed of one streamed answer so far (for continuation).

    Only a broken stream needs the text, so the relay does not parse events: it keeps each relayed
    event's `data:` payload in `raw` and `settle()` parses them when the text is wanted (a break), or
    in one batch once `raw` grows past `_RAW_LIMIT` bytes (bounds memory on long answers).
    """

    text: list[str] = field(default_factory=list)
    tokens: int = 0  # text pieces in `text`
    finished: bool = False  # a finish_reason was relayed
    chunk_id: str | None = None
    bytes_out: int = 0
    key: object = None  # the current attempt's ledger entry
    raw: list[bytes] = field(default_factory=list)  # relayed data payloads not parsed yet
    raw_bytes: int = 0

    def add(self, data: bytes) -> None:
        self.raw.append(data)
        self.raw_bytes += len(data)
        if self.raw_bytes > _RAW_LIMIT:
            self.settle()

    @property
    def materialized(self) -> int:
        """Tokens relayed so far; an unparsed event counts as one (exact after `settle`)."""
        return self.tokens + len(self.raw)

    def settle(self) -> None:
        """Parse the pending payloads into text, tokens, finished and the first chunk id."""
        raw, self.raw, self.raw_bytes = self.raw, [], 0
        if not raw:
            return
        try:
            # One C-level parse for the lot; a payload that is not one JSON value each (garbage, or
            # text that would merge with its neighbours) falls back to one parse per payload.
            chunks = json.loads(b"[" + b",".join(raw) + b"]")
            if len(chunks) != len(raw):
                raise ValueError("payloads do not map one to one")
        except ValueError:
            chunks = [_loads_or_none(d) for d in raw]
        for chunk in chunks:
            self.note(chunk)

    def note(self, chunk: Any) -> None:
        """Note the text one parsed chunk carries."""
        if not isinstance(chunk, dict):
            return
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str) and text:
                self.text.append(text)
                self.tokens += 1
            if choice.get("finish_reason"):
                self.finished = True
        if self.chunk_id is None and isinstance(chunk.get("id"), str):
            self.chunk_id = chunk["id"]


_RAW_LIMIT = 64 * 1024  # unparsed SSE payload bytes kept per stream before a batch parse


def _loads_or_none(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class _Job:
    kind: str  # "chat" | "completions"
    path: str
    body: bytes
    payload: dict[str, Any]
    stream: bool
    prompt_tokens: int
    routed: RoutedRequest
    headers: dict[str, str]
    deadline: float
    received: float = 0.0  # time.perf_counter() when the handler started (router overhead metric)


class Router:
    def __init__(
        self,
        config: RouterConfig,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        s = config.settings
        self.clock = clock
        self.policy_config = PolicyConfig.from_settings(s, config.slo_tpot_ms / 1000.0)
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
        from gpufleet.serving.router.scale import UnmetDemand  # (scale imports this module)

        self.unmet = UnmetDemand()  # spilled and refused demand, for /scale
        self._room = asyncio.Event()
        self._views: dict[str, tuple[EngineView, Sample | None]] = {}  # engine_views' cache
        self._waits: dict[str, set[asyncio.Timeout]] = {}  # engine -> awaits on its answer (_watched)
        self.metrics = RouterMetrics(self, clock)
        # Peer summaries: filled by gpufleet.serving.router.regions.PeerReader.
        self.peer_summaries: dict[str, tuple[float, dict[str, Any]]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.tls: CertReloader | None = None  # set by start_tls
        self.tls_port: int | None = None

    # ---- views for the policy --------------------------------------------------------------------

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
        out = []
        for url, st in self.scraper.engines.items():
            b = breakers.get(url)
            breaker = BreakerState.closed if b is None else b.state(now)
            waiting_for = pending(url)
            in_flight = outstanding.get(url, 0)
            drained = url in drained_engines
            hit = cache.get(url)
            if hit is not None:
                view, sample = hit
                if (
                    sample is st.sample
                    and view.healthy == st.healthy
                    and view.breaker is breaker
                    and view.pending_tokens == waiting_for
                    and view.outstanding == in_flight
                    and view.drained == drained
                ):
                    out.append(view)
                    continue
            s = st.sample
            view = EngineView(
                id=url,
                region=region,
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
            )
            cache[url] = (view, s)
            out.append(view)
        if len(cache) > len(out):  # engines gone (DNS): forget their views
            for url in set(cache) - set(self.scraper.engines):
                del cache[url]
        return out

    def region_views(self, now: float) -> list[RegionView]:
        out = []
        for key, info in self.config.regions.items():
            local = key == self.region
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
                )
            out.append(base)
        return out

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
            # Demand refused here for lack of room anywhere (peak tokens in one second of the last
            # minute): peers that can still grow take a share of it into their own /scale.
            "unmet_tokens": self.unmet.peaks(now)[1],
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

    def _wake_queue(self) -> None:
        self._room.set()
        self._room = asyncio.Event()

    # ---- lifecycle --------------------------------------------------------------------------------

    def app(self) -> web.Application:
        from gpufleet.serving.router import admin, regions, scale

        app = web.Application(client_max_size=self.config.settings.max_body_bytes + 1)
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
        connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self._tasks.append(asyncio.create_task(self.scraper.run(), name=f"scrape-{self.region}"))
        if self.config.region.engines_dns:
            self._tasks.append(asyncio.create_task(self._discover(), name=f"dns-{self.region}"))
        if self.config.peers:
            reader = PeerReader(self, interval_s=s.scrape_interval_s, timeout_s=s.scrape_timeout_s)
            self._tasks.append(asyncio.create_task(reader.run(), name=f"peers-{self.region}"))
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site: web.BaseSite = (
            web.SockSite(self._runner, sock) if sock else web.TCPSite(self._runner, host, port)
        )
        await site.start()
        self.port = (sock or site._server.sockets[0]).getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def start_tls(
        self, tls: CertReloader, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None
    ) -> int:
        """Serve the same app over HTTPS too (after `start`), with `tls.context`; `tls.run()` re-reads
        the certificate and key when their files change."""
        assert self._runner is not None, "start() first"
        site: web.BaseSite = (
            web.SockSite(self._runner, sock, ssl_context=tls.context)
            if sock
            else web.TCPSite(self._runner, host, port, ssl_context=tls.context)
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
        received = time.perf_counter()
        try:
            job = await self._parse(request, kind, received)
        except HttpError as exc:
            self.metrics.outcome(self.region, "bad_request")
            return exc.response()
        try:
            return await self._serve(request, job)
        except HttpError as exc:
            outcome = "rejected" if exc.status == 429 else "error"
            self.metrics.outcome(self.region, outcome)
            return exc.response()
        except _ClientGone:
            self.metrics.outcome(self.region, "client_gone")
            return web.Response(status=499)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise HttpError(413, f"request body is larger than {limit} bytes", "invalid_request_error")
        chunks, size = [], 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"request body is larger than {limit} bytes", "invalid_request_error")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(self, request: web.Request, kind: str, received: float = 0.0) -> _Job:
        body = await self._read_body(request)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise HttpError(400, "request body must be a JSON object")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise HttpError(400, "`model` is required")
        if model not in self.config.models:
            raise HttpError(
                404,
                f"The model `{model}` does not exist. Served here: {', '.join(self.config.models)}",
                "NotFoundError",
            )
        if kind == "chat":
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                raise HttpError(400, "`messages` must be a non-empty list")
            chars = sum(len(str(m.get("content", ""))) if isinstance(m, dict) else 0 for m in messages)
        else:
            prompt = payload.get("prompt")
            if not isinstance(prompt, str | list) or not prompt:
                raise HttpError(400, "`prompt` is required")
            # A token id stands for about 4 characters.
            chars = (
                len(prompt)
                if isinstance(prompt, str)
                else sum(len(p) if isinstance(p, str) else 4 for p in prompt)
            )
        max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            raise HttpError(400, "`max_tokens` must be a positive integer")
        prompt_tokens = estimate_prompt_tokens(chars)
        if max_tokens is not None and max_tokens > self.config.models[model]:
            raise HttpError(
                400, f"max_tokens {max_tokens} exceeds the model's context ({self.config.models[model]})"
            )
        need = prompt_tokens + (max_tokens or DEFAULT_MAX_TOKENS)
        hop = request.headers.get(HOP_HEADER)
        residency = request.headers.get(RESIDENCY_HEADER) or self.config.region.residency
        routed = RoutedRequest(
            need_tokens=need,
            model=model,
            residency=residency,
            affinity_key=str(hash(body[:256])),
            allow_remote=hop is None,
        )
        headers = {"Content-Type": "application/json", HOP_HEADER: hop or self.region}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        deadline = self.clock() + self.config.settings.request_timeout_s
        stream = bool(payload.get("stream"))
        return _Job(
            kind, request.path, body, payload, stream, prompt_tokens, routed, headers, deadline, received
        )

    async def _admit(self, job: _Job) -> list[Candidate]:
        """Candidates now, or after a short wait in the bounded queue, or 429."""
        cands = self.choose(job.routed)
        if cands:
            return cands
        s = self.config.settings
        # A forwarded request does not queue here: the origin router has other candidates.
        wait = 0.0 if not job.routed.allow_remote else s.queue_wait_s
        retry_after = {"Retry-After": str(max(1, math.ceil(s.queue_wait_s or s.scrape_interval_s)))}
        if wait <= 0 or self.queued >= s.queue_max:
            self._refused(job)
            raise HttpError(
                429, "no engine has room for this request now; retry later", "rate_limit_error", retry_after
            )
        self.queued += 1
        self.queued_tokens += job.routed.need_tokens
        try:
            until = min(job.deadline, self.clock() + wait)
            while True:
                left = until - self.clock()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._room.wait(), left)
                except TimeoutError:
                    pass
                cands = self.choose(job.routed)
                if cands:
                    return cands
        finally:
            self.queued -= 1
            self.queued_tokens -= job.routed.need_tokens
        self._refused(job)
        raise HttpError(
            429, "no engine has room for this request now; retry later", "rate_limit_error", retry_after
        )

    def _refused(self, job: _Job) -> None:
        """A 429: no room. Unless the region is drained, it is demand for more engines (/scale)."""
        self.metrics.rejected.inc()
        if self.region not in self.drained_regions:
            self.unmet.refused(job.routed.need_tokens, self.clock())

    def _take(self, cands: list[Candidate]) -> Candidate | None:
        """The first candidate whose breaker lets a request through now (half-open: as the probe)."""
        now = self.clock()
        for c in cands:
            if self._breaker(c).allow(now):
                return c
        return None

    def _record(self, cand: Candidate, ok: bool) -> None:
        # Local engines each have a breaker; a region's breaker guards forwarding to its router, so
        # one sick local engine cannot shut the whole local region.
        now = self.clock()
        b = self._breaker(cand)
        b.success(now) if ok else b.failure(now)

    def _url(self, cand: Candidate, path: str) -> str:
        if cand.engine is not None:
            return cand.engine + path
        peer: RegionInfo = self.config.regions[cand.region]
        return f"{peer.router_url}{path}"

    async def _serve(self, request: web.Request, job: _Job) -> web.StreamResponse:
        cands = await self._admit(job)
        failed: set[str] = set()
        attempts = 0
        budget = self.config.settings.retry_budget
        last_error = "no candidate"
        only_full = True  # every failure so far was a target saying it is full (429)
        while attempts <= budget:
            cand = self._take(cands)
            if cand is None:
                break
            if attempts:
                self.metrics.retries.inc()
            else:
                self.metrics.overhead_request.observe(time.perf_counter() - job.received)
            attempts += 1
            try:
                return await self._attempt(request, job, cand, job.body, job.payload)
            except _Upstream as exc:
                last_error = f"{cand.target}: {exc}"
                failed.add(cand.target)
                if exc.penalize:
                    only_full = False
                    self._record(cand, ok=False)
                else:
                    self._release(cand)
            if self.clock() >= job.deadline:
                break
            cands = self.choose(replace(job.routed, exclude=frozenset(failed)))
        if only_full:
            s = self.config.settings
            self._refused(job)
            retry_after = {"Retry-After": str(max(1, math.ceil(s.queue_wait_s or s.scrape_interval_s)))}
            raise HttpError(
                429, f"no room for this request now ({last_error})", "rate_limit_error", retry_after
            )
        raise HttpError(503, f"no engine could serve the request ({last_error})", "service_unavailable")

    def _breaker(self, cand: Candidate) -> CircuitBreaker:
        if cand.engine is not None:
            return self.breakers.engine(cand.engine)
        return self.breakers.region(cand.region)

    def _release(self, cand: Candidate) -> None:
        self._breaker(cand).release()

    def _note_sent(self, cand: Candidate, job: _Job, key: object) -> None:
        # The whole demand counts against the target until the answer shows up in its KV cache.
        now = self.clock()
        self.ledger.routed(cand.target, key, job.routed.need_tokens, now)
        if cand.engine is not None:
            self.outstanding[cand.engine] = self.outstanding.get(cand.engine, 0) + 1
        else:
            self.metrics.spills.labels(cand.region).inc()
            if self.region not in self.drained_regions:  # spilled for lack of local room (/scale)
                self.unmet.spill_started(key, job.routed.need_tokens, now)

    def _note_done(self, cand: Candidate, key: object) -> None:
        self.ledger.done(key)
        if cand.engine is not None:
            n = self.outstanding.get(cand.engine, 1) - 1
            if n > 0:
                self.outstanding[cand.engine] = n
            else:
                self.outstanding.pop(cand.engine, None)
        else:
            self.unmet.spill_ended(key, self.clock())

    async def _watched(self, awaitable, cand: Candidate):
        """Await an engine's answer, but give up when the scraper finds the engine dead meanwhile.

        A hung engine accepts the request and never answers; a non-streamed answer may rightly take
        minutes, so no read timeout tells the two apart. Two failed scrapes in a row do: after each
        scrape round `_expire_hung` expires the waits on such an engine (an `asyncio.timeout` with
        no deadline of its own, so a wait costs no task and no timer).
        """
        if cand.engine is None or cand.engine not in self.scraper.engines:
            return await awaitable
        waits = self._waits.setdefault(cand.engine, set())
        try:
            async with asyncio.timeout(None) as cm:
                waits.add(cm)
                try:
                    return await awaitable
                finally:
                    waits.discard(cm)
        except TimeoutError:
            if not cm.expired():
                raise  # the request's own timeout
            state = self.scraper.engines.get(cand.engine)
            raise _Upstream(f"engine stopped answering ({state.error if state else 'gone'})") from None

    def _expire_hung(self) -> None:
        for url, waits in self._waits.items():
            state = self.scraper.engines.get(url)
            if waits and state is not None and state.failures >= 2:
                for cm in waits:
                    if not cm.expired():
                        cm.reschedule(-1)  # in the past: fires on the next loop iteration

    async def _open(self, cand: Candidate, job: _Job, body: bytes) -> aiohttp.ClientResponse:
        """POST to the candidate; the response with headers read, or `_Upstream`."""
        assert self._session is not None
        s = self.config.settings
        left = job.deadline - self.clock()
        if left <= 0:
            raise _Upstream("deadline passed", penalize=False)
        # Until the first byte the request may rightly wait in the engine's queue, so reads are bounded
        # by its deadline only; `_pump` tightens a stream to idle_timeout_s once its first byte came.
        timeout = aiohttp.ClientTimeout(total=None, connect=min(s.connect_timeout_s, left), sock_read=left)
        post = self._session.post(self._url(cand, job.path), data=body, headers=job.headers, timeout=timeout)
        try:
            resp = await self._watched(post, cand)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _Upstream(f"{type(exc).__name__}: {exc}") from None
        if resp.status in _RETRYABLE_STATUS:
            resp.release()
            # 429 means full, not broken: move on without opening the breaker.
            raise _Upstream(f"answered {resp.status}", penalize=resp.status != 429)
        return resp

    async def _attempt(
        self, request: web.Request, job: _Job, cand: Candidate, body: bytes, payload: dict[str, Any]
    ) -> web.StreamResponse:
        key = object()
        # Reserve before the first await, so concurrent requests see this one's demand.
        self._note_sent(cand, job, key)
        try:
            resp = await self._open(cand, job, body)
        except _Upstream:
            self._note_done(cand, key)
            raise
        try:
            if not job.stream or resp.status != 200:
                try:
                    data = await self._watched(resp.read(), cand)
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    raise _Upstream(f"answer broke: {type(exc).__name__}") from None
                self._record(cand, ok=True)
                self.metrics.outcome(cand.region, "ok" if resp.status < 400 else "upstream_4xx")
                headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers[ROUTED_HEADER] = resp.headers.get(ROUTED_HEADER, cand.region)
                return web.Response(status=resp.status, body=data, headers=headers)
            return await self._relay(request, job, cand, resp, key)
        finally:
            resp.release()
            self._note_done(cand, key)

    # ---- streaming --------------------------------------------------------------------------------

    async def _relay(
        self, request: web.Request, job: _Job, cand: Candidate, resp: aiohttp.ClientResponse, key: object
    ) -> web.StreamResponse:
        out = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                ROUTED_HEADER: resp.headers.get(ROUTED_HEADER, cand.region),
            },
        )
        out.enable_chunked_encoding()
        try:
            await out.prepare(request)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            raise _ClientGone() from exc
        stream = _Stream(key=key)
        try:
            done, broke = await self._pump(job, resp, out, stream, False, cand)
            if done:
                self._record(cand, ok=True)
                self.metrics.outcome(cand.region, "ok")
            else:
                self._record(cand, ok=False)
                if not await self._continue(request, job, cand, out, stream, broke):
                    self.metrics.outcome(cand.region, "stream_error")
        except _ClientGone:
            # The client left mid-stream: not the engine's fault, and nobody to answer.
            self._release(cand)
            self.metrics.outcome(cand.region, "client_gone")
            return out
        try:
            await out.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass
        return out

    async def _write(self, out: web.StreamResponse, data: bytes) -> None:
        try:
            if data:
                await out.write(data)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            raise _ClientGone() from exc

    async def _pump(
        self,
        job: _Job,
        resp: aiohttp.ClientResponse,
        out: web.StreamResponse,
        stream: _Stream,
        rewrite_id: bool,
        cand: Candidate,
    ) -> tuple[bool, str]:
        """Relay SSE events until [DONE]. Returns (completed, why it broke).

        What arrives is written on at once, up to its last complete event (a client never sees half
        an event, so a continuation can follow any byte sent); several events that arrived together
        go out in one write. Events are split only for bookkeeping.
        """
        tail = b""  # an incomplete event, waiting for the rest
        first = stream.bytes_out == 0 and not rewrite_id
        content = resp.content
        # Until its first token the request may rightly wait in the engine's queue: reads wait up to
        # the deadline (set in `_open`; the hung-engine watch applies). From the first token on,
        # silence longer than idle_timeout_s means the stream broke. Not from the first byte: an
        # engine may send the role chunk before the request leaves its queue.
        started = False
        tokens_before = stream.tokens  # a continuation starts with the text already relayed
        try:
            while True:
                data = await (content.readany() if started else self._watched(content.readany(), cand))
                if not data:
                    break
                if first:
                    t_in = time.perf_counter()
                if tail:
                    data = tail + data
                if b"\r" in data:  # CRLF line ends: normalise, so events split on one separator
                    data = data.replace(b"\r\n", b"\n")
                end = data.rfind(b"\n\n")
                if end < 0:
                    tail = data
                    continue
                end += 2
                data, tail = data[:end], data[end:]
                data, done = self._events(data, stream, rewrite_id)
                await self._write(out, data)
                if first:
                    self.metrics.overhead_relay.observe(time.perf_counter() - t_in)
                    first = False
                stream.bytes_out += len(data)
                if done:
                    return True, ""
                if not started:
                    stream.settle()  # parse only until the first token
                    if stream.tokens > tokens_before or stream.finished:
                        _idle_timeout(resp, self.config.settings.idle_timeout_s)
                        started = True
                self.ledger.progress(stream.key, job.prompt_tokens + stream.materialized)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return False, f"{type(exc).__name__}"
        except _Upstream as exc:  # the scraper found the engine dead while the request waited
            return False, str(exc)
        return False, "stream ended without [DONE]"

    @staticmethod
    def _events(data: bytes, stream: _Stream, rewrite_id: bool) -> tuple[bytes, bool]:
        """Note the complete events in `data` (it ends with a separator); returns what to relay and
        whether [DONE] came. Nothing after [DONE] is relayed."""
        events = data.split(b"\n\n")
        events.pop()
        if rewrite_id:
            return Router._rewrite(events, stream)
        pos = 0
        for event in events:
            pos += len(event) + 2
            if event.startswith(b"data: ") and b"\n" not in event:  # the usual shape: one data line
                payloads = [event[6:].strip()]
            else:
                payloads = [ln[5:].strip() for ln in event.split(b"\n") if ln.startswith(b"data:")]
            for payload in payloads:
                if payload == b"[DONE]":
                    return data[:pos], True
                stream.add(payload)
        return data, False

    @staticmethod
    def _rewrite(events: list[bytes], stream: _Stream) -> tuple[bytes, bool]:
        """A continuation's events, each chunk parsed at once and given the first stream's id."""
        out: list[bytes] = []
        for event in events:
            lines = [ln + b"\n" for ln in event.split(b"\n") if ln.strip()]
            if not lines:
                continue
            for i, line in enumerate(lines):
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        out.append(b"data: [DONE]\n\n")
                        return b"".join(out), True
                    lines[i] = Router._observe(payload, stream, True) or line
            out.extend(lines)
            out.append(b"\n")
        return b"".join(out), False

    @staticmethod
    def _observe(data: bytes, stream: _Stream, rewrite_id: bool) -> bytes | None:
        """Note the text a chunk carries at once; on a continuation, give it the first stream's id."""
        stream.settle()
        chunk = _loads_or_none(data)
        stream.note(chunk)
        if (
            rewrite_id
            and isinstance(chunk, dict)
            and stream.chunk_id is not None
            and chunk.get("id") != stream.chunk_id
        ):
            chunk["id"] = stream.chunk_id
            return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n"
        return None

    async def _continue(
        self,
        request: web.Request,
        job: _Job,
        broken: Candidate,
        out: web.StreamResponse,
        stream: _Stream,
        why: str,
    ) -> bool:
        """Continue a broken stream elsewhere; on failure end it with an error event. True if completed."""
        stream.settle()  # the exact text the client has seen
        if stream.finished:
            # Everything but [DONE] arrived: close it properly.
            await self._write(out, b"data: [DONE]\n\n")
            self.metrics.outcome(broken.region, "ok")
            return True
        failed = {broken.target}
        # Nothing relayed yet: the original request is its own continuation.
        payload = (
            continuation_payload(job.kind, job.payload, "".join(stream.text), stream.tokens)
            if stream.text
            else job.payload
        )
        attempts = 0
        while (
            payload is not None
            and attempts <= self.config.settings.retry_budget
            and self.clock() < job.deadline
        ):
            # The new engine holds the prompt, the text so far and the rest: the same demand.
            cands = self.choose(replace(job.routed, exclude=frozenset(failed)))
            cand = self._take(cands)
            if cand is None:
                break
            attempts += 1
            body = json.dumps(payload).encode()
            key = stream.key = object()
            self._note_sent(cand, job, key)
            try:
                resp = await self._open(cand, job, body)
            except _Upstream as exc:
                self._note_done(cand, key)
                failed.add(cand.target)
                self._record(cand, ok=False) if exc.penalize else self._release(cand)
                continue
            try:
                if resp.status != 200:
                    failed.add(cand.target)
                    self._release(cand)
                    continue
                done, why = await self._pump(job, resp, out, stream, True, cand)
            finally:
                resp.release()
                self._note_done(cand, key)
            if done:
                self._record(cand, ok=True)
                self.metrics.continuations.labels("ok").inc()
                self.metrics.outcome(cand.region, "continued")
                return True
            self._record(cand, ok=False)
            failed.add(cand.target)
            stream.settle()
            if stream.finished:
                return await self._continue(request, job, cand, out, stream, why)
            payload = continuation_payload(job.kind, job.payload, "".join(stream.text), stream.tokens)
        self.metrics.continuations.labels("failed").inc()
        if not job.routed.allow_remote and request.transport is not None:
            # A request forwarded by a peer: the origin router owns the client's stream and may try
            # regions this router may not (one hop only). Break the relay instead of ending it with
            # an error event, so the origin sees a broken stream and continues it elsewhere.
            request.transport.close()
            return False
        err = error_body(502, f"the stream broke ({why}) and could not be continued", "service_unavailable")
        await self._write(out, b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n")
        return False


def _idle_timeout(resp: aiohttp.ClientResponse, seconds: float) -> None:
    """From now on, a read on this response that waits longer than `seconds` fails (aiohttp's
    sock_read, changed on the open connection and restarted from now)."""
    conn = resp.connection
    proto = conn.protocol if conn is not None else None
    if proto is not None:
        proto.read_timeout = seconds
        if not resp.content.is_eof():  # at EOF aiohttp has dropped the timer for good
            proto.start_timeout()


def continuation_payload(
    kind: str, payload: dict[str, Any], text: str, tokens_sent: int
) -> dict[str, Any] | None:
    """The request that continues an answer from `text` (what the client has already received).

    Chat: the text so far becomes a final assistant message that vLLM continues
    (continue_final_message=true, add_generation_prompt=false). Completions: the prompt plus the
    text. max_tokens shrinks by what was sent. None when the request cannot be continued (several
    choices, a token-id prompt, or nothing left to generate).
    """
    if payload.get("n", 1) not in (1, None) or payload.get("best_of", 1) not in (1, None):
        return None
    p = dict(payload)
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(p.get(key), int):
            left = p[key] - tokens_sent
            if left < 1:
                return None
            p[key] = left
    if kind == "chat":
        messages = list(payload["messages"])
        last = messages[-1] if messages else None
        if (
            payload.get("continue_final_message")
            and isinstance(last, dict)
            and last.get("role") == "assistant"
            and isinstance(last.get("content"), str)
        ):
            messages[-1] = {**last, "content": last["content"] + text}
        else:
            messages.append({"role": "assistant", "content": text})
        p["messages"] = messages
        p["continue_final_message"] = True
        p["add_generation_prompt"] = False
        return p
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        return None
    p["prompt"] = prompt + text
    p.pop("echo", None)
    return p
