"""Routing policies: pure functions of a snapshot of the fleet, shared by the router and the simulator.

Nothing here does I/O, awaits, or reads a clock: the caller passes `now` (seconds on any monotonic
scale, the same one the views' `sampled_at` use). The router builds views from live scrapes; the
simulator builds them from its virtual engines, and both get the same decisions.

The signal (docs/ARCHITECTURE.md, "The signal"): an engine's headroom in tokens is what its last
sample said was free, minus what was routed there since the sample (optimistic accounting, so a
burst does not herd onto one engine between scrapes), minus the estimated demand of its waiting
queue. Stale data counts as full; an engine that does not answer counts as down.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gpufleet.serving.router.predict import EngineProfile

# Reserved before on-demand before spot (mirrors stacks.spec.TIER_PREFERENCE without importing pydantic).
TIER_RANK: dict[str, int] = {"reserved": 0, "on-demand": 1, "spot": 2}


class BreakerState(StrEnum):
    closed = "closed"
    half_open = "half-open"  # one probe may go now
    open = "open"


@dataclass(frozen=True, slots=True)
class EngineView:
    """One engine as the policy sees it at decision time."""

    id: str  # the engine's base URL in the router
    region: str
    free_tokens: float  # (1 - kv_cache_usage) * (num_gpu_blocks - 1) * block_size, at the sample
    capacity_tokens: float = 0.0  # (num_gpu_blocks - 1) * block_size: block 0 is the null block
    kv_usage: float = 0.0
    running: int = 0
    waiting: int = 0
    sampled_at: float | None = None  # None: never sampled (counts as full)
    healthy: bool = True  # False: the last scrape failed or returned garbage
    drained: bool = False
    breaker: BreakerState = BreakerState.closed
    pending_tokens: float = 0.0  # committed here, not yet in the sample (OptimisticLedger.pending)
    outstanding: int = 0  # requests this router has in flight here
    waiting_tokens: float | None = None  # demand of the waiting queue; None: estimate from `waiting`
    recent_itl_s: float | None = None  # mean inter-token latency since the previous sample (`recent_pace`)
    # For the predicting policy (serving/router/predict.py):
    profile: EngineProfile | None = None  # model, GPU type, TP, step times; None: unknown
    rtt_s: float = 0.0  # round trip from the request's client region to this engine (global reach)
    pending_prefill_tokens: float = 0.0  # prompt tokens sent here and not yet prefilled (ledger)
    # between the last two samples: prompt tokens prefilled (vllm:prompt_tokens_total delta) and
    # output tokens counted by the inter-token-latency histogram (its _count delta); None: unknown
    recent_prompt_tokens: float | None = None
    recent_itl_tokens: float | None = None
    # this router's ledger, where the engine is its own: `fits` reads when its requests end
    ledger: OptimisticLedger | None = None
    # a peer's engine: the TTFT offset its own router measured (`predict.Correction.offset_s`, carried
    # in the summary); None: this router's own correction applies
    ttft_offset_s: float | None = None

    def age(self, now: float) -> float:
        return float("inf") if self.sampled_at is None else max(0.0, now - self.sampled_at)


@dataclass(frozen=True, slots=True)
class RegionView:
    """A region's static facts plus, for a region whose engines this router cannot see (a peer),
    the summary its own router published."""

    key: str
    tier: str = "on-demand"
    residency: str | None = None
    models: frozenset[str] = frozenset()  # empty: serves any model
    cost_per_gpu_hour: float | None = None
    drained: bool = False
    breaker: BreakerState = BreakerState.closed
    local: bool = False  # the region the request arrived at
    # Peer summary (ignored when the region's engines are passed to the policy directly).
    remote: bool = False
    free_tokens: float = 0.0
    largest_free_tokens: float = 0.0  # on engines that take requests now (not saturated)
    largest_fit_tokens: float = 0.0  # on any healthy engine, saturated ones too (a last resort)
    healthy_engines: int = 0
    queue: int = 0
    summarized_at: float | None = None
    rtt_s: float = 0.0  # round trip from the request's client region to this region
    # the peer's engines as its summary describes them (EngineView with profile, running, KV, queued
    # prefill, speed correction), so that this router can predict a forwarded request's outcome there
    engines: tuple[EngineView, ...] = ()
    forwarded: int = 0  # requests this router has in flight there (its summary may not show them yet)


@dataclass(frozen=True, slots=True)
class RoutedRequest:
    need_tokens: int  # prompt tokens (estimated) + max_tokens: must fit on ONE engine
    model: str | None = None
    residency: str | None = None  # None: may go anywhere
    affinity_key: str | None = None  # e.g. a hash of the prompt's first block; breaks ties
    allow_remote: bool = True  # False for a request already forwarded once (hop header)
    exclude: frozenset[str] = frozenset()  # engine ids / region keys that already failed this request
    prompt_tokens: int | None = None  # None: need_tokens - max_tokens (or need_tokens) stands in
    max_tokens: int | None = None
    # chained hashes of the prompt's blocks (prefix.block_chain): longest-prefix affinity
    prefix: tuple[int, ...] = ()
    prefix_block_tokens: int = 512  # prompt tokens per element of `prefix`
    key: object | None = None  # the caller's id for the request (decision logs); never read to decide
    explain: bool = False  # the first candidate carries the policy's predicted TTFT, where it has one
    waited_s: float = 0.0  # how long the request has waited since it reached the fleet (late binding)


# Not frozen: a frozen dataclass's __init__ costs twice as much, and a decision over 1,000 engines
# builds one per engine (tests/bench/bench_decision.py). Treat it as a value: nothing mutates one.
@dataclass(slots=True)
class Candidate:
    region: str
    engine: str | None  # None: forward to the region's router (a peer)
    headroom: float
    # the predicting policy's TTFT for it (engine seconds), where it has one: the gateway measures
    # it (`observe_ttft`) and says it on the answer only when asked (RoutedRequest.explain)
    predicted_ttft_s: float | None = None
    # Late binding (policies/predictive.py), on the first candidate only: no engine can start this
    # request's prefill in its next step, so the policy would rather it wait here, at most this many
    # seconds (its TTFT slack). <= 0: it can no longer meet its TTFT SLO (refuse it). None: send now.
    # The ranking is valid either way, for a caller that does not hold requests.
    hold_s: float | None = None

    @property
    def target(self) -> str:
        return self.engine if self.engine is not None else self.region


# Late binding: when a prefill completes at a router, its held requests are looked at again oldest
# first, until this many are still held (each one sent frees its look for the next). A cost bound, not
# a tuning: measured in the simulator, 16 did as well as looking at every held request, and 4 cost
# about a point of SLO attainment on the conversation trace; every scrape round looks at all of them.
HELD_LOOKS_PER_PREFILL = 16


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    stale_after_s: float = 3.0
    waiting_request_tokens: float = 512.0  # assumed demand per waiting request when not given
    peer_stale_after_s: float = 6.0
    # An engine decoding slower than this (recent inter-token latency) is saturated; None: ignore pace.
    itl_limit_s: float | None = None
    ttft_slo_s: float = 2.0  # the SLO the predicting policy aims at
    tpot_slo_s: float = 0.1
    seed: int = 0  # randomised baselines (power-of-two)
    late_binding: bool = True  # the predicting policy may hold requests (Candidate.hold_s)
    exact_admission: bool = True  # its guard asks the ledger (`can_hold`); False: the headroom bound alone

    @classmethod
    def from_settings(cls, settings, tpot_slo_s: float, ttft_slo_s: float = 2.0) -> PolicyConfig:
        """From the fleet's router settings (stacks.spec.RouterSettings) and its SLO, as the router and
        the simulator both build it."""
        return cls(
            stale_after_s=settings.stale_after_s,
            peer_stale_after_s=2 * settings.stale_after_s,
            itl_limit_s=settings.pace_fraction * tpot_slo_s,
            ttft_slo_s=ttft_slo_s,
            tpot_slo_s=tpot_slo_s,
            late_binding=settings.late_binding,
        )


class Policy(Protocol):
    """Orders where a request may go. An empty list means nothing fits now (queue, then 429). A first
    candidate with `hold_s` set asks the caller to hold the request (late binding)."""

    name: str

    def choose(
        self,
        request: RoutedRequest,
        engines: Sequence[EngineView],
        regions: Sequence[RegionView],
        now: float,
    ) -> list[Candidate]: ...


# ---- shared filters and the headroom arithmetic ------------------------------------------------------


def headroom(engine: EngineView, now: float, config: PolicyConfig) -> float:
    """Tokens this engine can still take, by the signal; 0 when its data is stale or it is down."""
    if not engine.healthy or engine.age(now) > config.stale_after_s:
        return 0.0
    waiting = engine.waiting_tokens
    if waiting is None:
        waiting = engine.waiting * config.waiting_request_tokens
    return max(0.0, engine.free_tokens - engine.pending_tokens - waiting)


def can_hold(engine: EngineView, need: float, out: float, now: float, config: PolicyConfig) -> bool:
    """The admission guard: can the engine hold a request of `need` tokens (its prompt, then `out`
    generated) without preempting anything? Yes when its headroom covers the whole demand; else,
    with this router's ledger of the engine, when it does at every step counting the requests in
    flight there that end first (`OptimisticLedger.fits`). Stale or down: no."""
    if headroom(engine, now, config) >= need:
        return True
    ledger = engine.ledger
    if ledger is None or not config.exact_admission or not engine.healthy or engine.age(now) > config.stale_after_s:
        return False
    waiting = engine.waiting_tokens
    if waiting is None:
        waiting = engine.waiting * config.waiting_request_tokens
    # commitments here that this ledger does not itemise (other replicas', replicas.py)
    others = max(0.0, engine.pending_tokens - ledger.pending(engine.id))
    return ledger.fits(engine.id, engine.free_tokens - waiting - others, need - out, out)


def recent_pace(
    prev_itl_seconds: float, prev_itl_tokens: float, itl_seconds: float, itl_tokens: float,
    running: int, last: float | None,
) -> float | None:  # fmt: skip
    """Mean inter-token latency between two samples of vLLM's `inter_token_latency_seconds`
    histogram (its _sum and _count). No token in between: the last value while requests are running
    (a long step or a stall is not a fast engine), None when idle. A counter reset gives None."""
    tokens = itl_tokens - prev_itl_tokens
    if tokens > 0:
        seconds = itl_seconds - prev_itl_seconds
        return seconds / tokens if seconds >= 0 else None
    if tokens < 0:
        return None
    return last if running > 0 else None


def saturated(waiting: int, recent_itl_s: float | None, config: PolicyConfig) -> bool:
    """Free KV is not usable headroom when the engine cannot admit now (a waiting queue: its
    scheduler is out of sequences or token budget) or decodes slower than the pace limit (another
    request would push its running requests over the TPOT target)."""
    if waiting > 0:
        return True
    limit = config.itl_limit_s
    return limit is not None and recent_itl_s is not None and recent_itl_s > limit


def spare_headroom(engine: EngineView, now: float, config: PolicyConfig) -> float:
    """Headroom a peer region may spill into: none while the engine is saturated (`saturated`),
    whatever its free KV; see HeadroomPolicy."""
    return 0.0 if saturated(engine.waiting, engine.recent_itl_s, config) else headroom(engine, now, config)


def region_allowed(region: RegionView, request: RoutedRequest) -> bool:
    if region.drained or region.breaker is BreakerState.open or region.key in request.exclude:
        return False
    if request.residency is not None and region.residency != request.residency:
        return False
    return not (request.model is not None and region.models and request.model not in region.models)


def engine_usable(engine: EngineView, request: RoutedRequest) -> bool:
    return (
        engine.healthy
        and not engine.drained
        and engine.breaker is not BreakerState.open
        and engine.id not in request.exclude
    )


def _allowed_regions(request: RoutedRequest, regions: Sequence[RegionView]) -> dict[str, RegionView]:
    return {r.key: r for r in regions if region_allowed(r, request)}


def _usable_engines(
    request: RoutedRequest, engines: Sequence[EngineView], allowed: dict[str, RegionView]
) -> list[EngineView]:
    """Engines the request may go to: in an allowed region (local, or remote if it may hop) and usable."""
    return [
        e
        for e in engines
        if e.region in allowed
        and (request.allow_remote or not allowed[e.region].remote)
        and engine_usable(e, request)
    ]


def _tie(affinity_key: str | None, engine_id: str) -> int:
    # Stable per (prompt prefix, engine): equal-headroom engines keep getting the same prefix,
    # so its cached blocks get reused.
    return 0 if affinity_key is None else zlib.crc32(f"{affinity_key}|{engine_id}".encode())


def _peer_candidates(
    request: RoutedRequest, allowed: dict[str, RegionView], seen: set[str], now: float, config: PolicyConfig
) -> list[tuple[RegionView, float]]:
    """Remote regions (summaries only) where the request fits on the largest engine."""
    if not request.allow_remote:
        return []
    return [
        (region, region.free_tokens)
        for region in _fresh_peers(allowed, seen, now, config)
        if region.largest_free_tokens >= request.need_tokens
    ]


def _fresh_peers(
    allowed: dict[str, RegionView], seen: set[str], now: float, config: PolicyConfig
) -> list[RegionView]:
    """Remote regions with a recent summary and a healthy engine."""
    return [
        r
        for r in allowed.values()
        if r.remote
        and r.key not in seen
        and r.summarized_at is not None
        and now - r.summarized_at <= config.peer_stale_after_s
        and r.healthy_engines > 0
    ]


def load_order(e: EngineView) -> tuple[int, float]:
    """Requests in flight from this router plus the engine's reported queue: the baselines' load."""
    return (e.outstanding + e.waiting, e.pending_tokens)


def ranked_engines(
    request: RoutedRequest, usable: list[EngineView], key, allowed: dict[str, RegionView], now: float,
    config: PolicyConfig,
) -> list[Candidate]:  # fmt: skip
    """Candidates in `key` order (smaller first), then peer regions where the request fits: the
    shape every baseline shares."""
    usable.sort(key=key)
    out = [Candidate(e.region, e.id, headroom(e, now, config)) for e in usable]
    seen = {e.region for e in usable}
    peers = _peer_candidates(request, allowed, seen, now, config)
    out += [Candidate(r.key, None, r.largest_free_tokens) for r, _ in peers]
    return out


def make_policy(name: str, config: PolicyConfig | None = None) -> Policy:
    """The policy registered under `name` (policies/__init__.py: POLICIES)."""
    from gpufleet.serving.router.policies import POLICIES

    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; one of {', '.join(POLICIES)}") from None
    return cls(config=config or PolicyConfig())


# ---- optimistic accounting ---------------------------------------------------------------------------


class OptimisticLedger:
    """KV demand this router has committed to each target and the target's metrics do not show yet.

    An engine's sample shows the KV blocks its requests hold NOW; a request admitted with
    `prompt + max_tokens` of demand holds only its prompt at first and grows by one token per
    step. So the headroom of an engine is its sampled free tokens minus, for every request in
    flight there, what that request has yet to materialize: `need - materialized`. Without this a
    burst between two scrapes (or a batch of freshly admitted requests) herds onto one engine, and
    the engine preempts later as they grow.

    For a target whose figures already include what was sent before some time (a peer router's
    summary), `covered(target, t)` stops counting entries routed before t. Pure: time is passed in.

    Kept on purpose: a request's materialized tokens count as shown from its first token on, though
    a sample taken before its prefill does not show them, so until the next scrape an engine looks
    up to a prompt emptier than it is. Counting them only against later samples was measured (the
    KV-bound setup of tests/bench/bench_admission.py, 2026-12-07): preemptions fell from 14-16 to 0
    at x1-x1.25, 429s rose, and attainment fell from 93 to 89 % at x1. The small overcommit pays.
    """

    __slots__ = ("_by_target", "_where", "_covered", "_sums", "_prefill")

    def __init__(self) -> None:
        # target -> request key -> [routed_at, need, materialized]
        self._by_target: dict[str, dict[object, list[float]]] = {}
        self._where: dict[object, str] = {}
        self._covered: dict[str, float] = {}
        # target -> sum of max(0, need - materialized) over its entries, kept up to date so that
        # `pending` (asked per engine per request) does not walk every request in flight.
        self._sums: dict[str, float] = {}
        # target -> prompt tokens of its entries that have no token yet: the prefill queued there
        # (what the predicting policy reads as queued prefill; vLLM's /metrics has only a count)
        self._prefill: dict[str, float] = {}

    def _add(self, target: str, amount: float) -> None:
        self._sums[target] = self._sums.get(target, 0.0) + amount

    def routed(self, target: str, key: object, need_tokens: float, now: float, prefill_tokens: float = 0.0) -> None:
        entries = self._by_target.setdefault(target, {})
        old = entries.get(key)
        if old is not None:
            self._add(target, -max(0.0, old[1] - old[2]))
            self._unprefill(target, old)
        entries[key] = [now, need_tokens, 0.0, prefill_tokens]
        self._add(target, max(0.0, need_tokens))
        if prefill_tokens:
            self._prefill[target] = self._prefill.get(target, 0.0) + prefill_tokens
        self._where[key] = target

    def _unprefill(self, target: str, entry: list[float]) -> None:
        if entry[3]:
            left = self._prefill.get(target, 0.0) - entry[3]
            self._prefill[target] = left if left > 1e-6 else 0.0
            entry[3] = 0.0

    def progress(self, key: object, materialized_tokens: float) -> None:
        """The request now holds this many of its tokens in the target's KV cache."""
        target = self._where.get(key)
        if target is not None:
            entry = self._by_target[target][key]
            need, held = entry[1], entry[2]
            entry[2] = materialized_tokens
            self._unprefill(target, entry)
            self._add(target, max(0.0, need - materialized_tokens) - max(0.0, need - held))

    def done(self, key: object) -> None:
        target = self._where.pop(key, None)
        if target is not None:
            entries = self._by_target[target]
            entry = entries.pop(key, None)
            if entry is not None:
                self._unprefill(target, entry)
            if not entries:
                del self._by_target[target]
                self._sums.pop(target, None)  # exactly 0 again, whatever rounding crept in
                self._prefill.pop(target, None)
            elif entry is not None:
                self._add(target, -max(0.0, entry[1] - entry[2]))

    def fits(self, target: str, room: float, prompt: float, out: float) -> bool:
        """Would a new request fit in `room` tokens (the target's sampled free KV, less anything not
        in this ledger) at EVERY step until it ends: its prompt at once, then one token per step up
        to `out`? `pending` is the bound that counts every request's whole growth and none of their
        ends. This is the peak under the same worst case (every answer runs to its max_tokens): each
        request in flight here that has started grows one token per step until its demand is met
        and frees what it holds the step after; one not started yet counts its whole demand, for
        good (when it starts is not known). So an engine whose running requests end before a new
        one has grown takes it without preempting any of them. Between ends the total only grows:
        the peak is just before an end or at the new request's last token."""
        entries = self._by_target.get(target)
        if not entries:
            return prompt + out <= room
        fixed = 0.0  # the whole demand of the requests not started
        ends = []  # (the step after its last token, tokens it holds now), for the started ones
        for _, need, held, unprefilled in entries.values():
            left = need - held if need > held else 0.0
            if unprefilled > 0.0:
                fixed += left
            else:
                ends.append((left + 1.0, held))
        if fixed + sum(end - 1.0 for end, _ in ends) + prompt + out <= room:
            return True  # within the bound (`pending`'s), no need to look closer
        ends.sort()
        growing = len(ends)
        freed = 0.0
        i = 0
        for k in sorted({0.0, float(out), *(end - 1.0 for end, _ in ends)}):
            while i < len(ends) and ends[i][0] <= k:
                growing -= 1
                freed += ends[i][1]
                i += 1
            mine = prompt + k if k <= out else 0.0
            if fixed + k * growing - freed + mine > room:
                return False
        return True

    def covered(self, target: str, until: float) -> None:
        self._covered[target] = until

    def pending(self, target: str) -> float:
        entries = self._by_target.get(target)
        if not entries:
            return 0.0
        if target not in self._covered:
            return max(0.0, self._sums.get(target, 0.0))
        since = self._covered[target]
        return sum(max(0.0, e[1] - e[2]) for e in entries.values() if e[0] > since)

    def pending_prefill(self, target: str) -> float:
        """Prompt tokens routed to `target` whose first token has not come yet."""
        return self._prefill.get(target, 0.0)

    def in_flight(self, target: str) -> int:
        return len(self._by_target.get(target, ()))


def estimate_prompt_tokens(text_chars: int) -> int:
    """Without the model's tokenizer: about 4 characters per token for English text and code."""
    return max(1, (text_chars + 3) // 4)


# The policies live one per module in policies/; these names are imported from here by the router.
from gpufleet.serving.router.policies.headroom import HeadroomPolicy as HeadroomPolicy  # noqa: E402
from gpufleet.serving.router.policies.least_outstanding import (  # noqa: E402
    LeastOutstandingPolicy as LeastOutstandingPolicy,
)
from gpufleet.serving.router.policies.round_robin import RoundRobinPolicy as RoundRobinPolicy  # noqa: E402


def __getattr__(name: str):
    if name == "POLICIES":  # the registry imports every policy module: read it lazily
        from gpufleet.serving.router.policies import POLICIES

        return POLICIES
    raise AttributeError(name)
