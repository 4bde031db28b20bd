"""The fleet simulator: the engine model and the router's own policy objects, in virtual time.

What runs, per region of the fleet file:
  * engines: `gpufleet.serving.engine.model.Engine`, the scheduler the HTTP emulator runs, stepped by
    `gpufleet.serving.engine.virtual.VirtualEngine` on one `VirtualLoop`; one per GPU group
    (nodes.max x GPUs per node / tensor_parallel_size), sized from the catalog;
  * a router: ONE policy object from `gpufleet.serving.router.policy` (the class the gateway uses),
    fed `EngineView`s built from engine stats sampled every `scrape_interval_s` (stale after
    `stale_after_s`), with the router's optimistic accounting (`OptimisticLedger`) and outstanding
    counts, and peer regions as `RegionView` summaries published at the same interval;
  * the gateway's request path: residency of the arrival region, candidates in order within the
    retry budget, one hop to a peer region (the peer does not queue, a full peer answers 429 and
    the origin moves on), a bounded queue of `queue_wait_s`, then 429; a stream broken after the
    first token is continued on another engine from the prompt plus what was sent.
Network: clients reach the router of their region in 5 ms; router to engine 0.5 ms; between
regions the great-circle latency of `network.py`. A region failure (`--fail REGION@T[+D]`) kills the
region's engines (their router stays up), as the demo does; they come back empty after D.

Time is virtual (virtual.py's event loop: no sockets, no sleeps). Decode steps between two events
run as one window, cut short at the next step boundary when a request arrives.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from gpufleet.serving.engine.model import Engine, EngineConfig, EngineStats, Request, resolve
from gpufleet.serving.engine.virtual import VirtualEngine, VirtualLoop
from gpufleet.serving.loadgen import WorkItem
from gpufleet.serving.outcomes import FAILED, OK, REJECTED, RequestRecord, Summary, summarize
from gpufleet.serving.router.policy import (
    HELD_LOOKS_PER_PREFILL,
    EngineView,
    OptimisticLedger,
    PolicyConfig,
    RegionView,
    RoutedRequest,
    make_policy,
    recent_pace,
    saturated,
)
from gpufleet.serving.router.predict import from_resolved, offset_of
from gpufleet.serving.router.prefix import chain
from gpufleet.serving.sim import network

REACHES = ("regional", "global")
PEER_SUMMARY_ENGINES = 4  # engines a region summary describes to peers (the least queued)

MAX_WINDOW_STEPS = 4096
MOONCAKE_BLOCK_TOKENS = 512  # a Mooncake hash_id names 512 prompt tokens


class SimError(ValueError):
    """A simulation that cannot run as asked (unknown region, nothing to simulate, ...)."""


@dataclass(frozen=True)
class Failure:
    region: str
    at_s: float
    until_s: float | None = None  # None: down to the end

    @classmethod
    def parse(cls, text: str) -> Failure:
        """REGION@T or REGION@T+DURATION, in model seconds from the start of the run."""
        region, sep, when = text.partition("@")
        if not sep or not region:
            raise SimError(f"--fail {text!r}: expected REGION@SECONDS or REGION@SECONDS+DURATION")
        at, plus, dur = when.partition("+")
        try:
            start = float(at)
            duration = float(dur) if plus else None
        except ValueError:
            raise SimError(f"--fail {text!r}: {when!r} is not SECONDS or SECONDS+DURATION") from None
        if start < 0 or (duration is not None and duration <= 0) or math.isnan(start):
            raise SimError(f"--fail {text!r}: times must be positive")
        return cls(region, start, None if duration is None else start + duration)

    def __str__(self) -> str:
        tail = "" if self.until_s is None else f"+{self.until_s - self.at_s:g}"
        return f"{self.region}@{self.at_s:g}{tail}"


@dataclass
class SimConfig:
    policy: str = "headroom"
    failures: Sequence[Failure] = ()
    engines_per_region: int | None = None  # None: every GPU group of nodes.max
    clients: str = "uniform"  # how arrivals spread over regions: uniform | capacity
    kv_sample_s: float | None = None  # KV-usage series step; None: duration / 120
    seed: int = 0
    num_gpu_blocks: int | None = None  # override the catalog sizing (small test engines)
    regions: Sequence[str] | None = None  # simulate only these regions of the fleet (None: all)
    # regional: one router per region over its own engines, peers by summary (as deployed);
    # global: one router over every engine, a request served outside its client's region paying the
    # round trip between the two (the baselines' best case)
    reach: str = "regional"
    ttft_slo_s: float | None = None  # override the fleet's SLO (Mooncake's long prompts: 10 s)


# ---- per-request state -----------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    item: WorkItem
    rec: RequestRecord
    router: str  # region key of the router the client reached
    need: int
    hashes: list[int] | None
    attempts: int = 0
    excluded: set[str] = field(default_factory=set)
    # regions that answered 429 (full, not broken): left out until the next scrape round
    full: set[str] = field(default_factory=set)
    first_token_at: float | None = None  # absolute model time the client got the first token
    lost_engine: bool = False  # its engine died with it in flight: continued elsewhere
    return_s: float = 0.0  # engine -> client latency of the current placement
    sent_tokens: int = 0  # output tokens the client has (for a continuation)
    queued_until: float | None = None  # when its queue or hold timer fires
    arrived_at: float = 0.0  # model time it reached its router (waited_s counts from here)
    # until when it may wait for room (the gateway's Job.room_until): queue_wait_s after it arrived,
    # whether nothing had room at once or a full peer refused it later; idle_timeout_s after its
    # stream broke (continuation.py)
    room_until: float = 0.0
    held_at: str | None = None  # the router holding it (late binding: Candidate.hold_s), with the
    held_hop_s: float = 0.0  # latency from that router back to the client
    was_held: bool = False
    peer_refused: bool = False  # a peer answered it 429 at least once
    done: bool = False
    live: Request | None = None  # the engine request now serving this job
    forwarded_by: str | None = None  # the router that forwarded it to a peer (its ledger counts it)
    prefix: tuple[int, ...] = ()  # chained hashes of its 512-token prompt blocks (prefix affinity)
    # (the policy's predicted TTFT, when its router sent it, the router-engine latency): measured at
    # its first token, as the gateway does (`Router.first_token`)
    probe: tuple[float, float, float] | None = None


class _Placement(NamedTuple):
    """What the simulator hangs on an engine request (its `user_data`): whose it is, and where."""

    job: _Job
    router_key: str  # the router whose ledger counts it
    eid: str


def _placement(req: Request) -> _Placement:
    p = req.user_data
    assert isinstance(p, _Placement), "every engine request the simulator submits carries its _Placement"
    return p


class _CountingEngine(Engine):
    """The engine model, counting the tokens each preemption throws away (recomputed later)."""

    recomputed_tokens = 0

    def _preempt(self, req: Request) -> None:
        self.recomputed_tokens += req.num_computed_tokens
        super()._preempt(req)


class _SimEngine:
    __slots__ = ("id", "region", "v", "alive", "stats", "sampled_at", "stamp", "itl", "profile", "cloud",
                 "prompt_delta", "itl_delta")  # fmt: skip

    def __init__(self, eid: str, region: str, v: VirtualEngine) -> None:
        self.id = eid
        self.region = region
        self.v = v  # the engine model, stepped on the shared virtual loop
        self.alive = True
        self.stats: EngineStats | None = None
        self.sampled_at: float | None = None
        self.stamp: tuple[int, int] | None = None  # engine state the cached stats were read at
        self.itl: float | None = None  # decode pace between the last two samples (policy.recent_pace)
        self.profile = from_resolved(v.engine.cfg)  # GPU type, TP and step times, for the predictor
        self.cloud = ""  # the cloud region it runs in (network latency)
        self.prompt_delta: float | None = None  # prompt / ITL tokens between the last two samples
        self.itl_delta: float | None = None

    @property
    def engine(self) -> _CountingEngine:
        return self.v.engine  # type: ignore[return-value]


class _Router:
    def __init__(
        self, key: str, region: RegionView, cloud_region: str, engines: list[_SimEngine], policy, cfg
    ):
        self.key = key
        self.region = region
        self.cloud_region = cloud_region
        self.engines = engines
        self.by_id = {e.id: e for e in engines}
        self.policy = make_policy(policy, cfg)
        self.ledger = OptimisticLedger()
        self.outstanding: dict[str, int] = {}
        self.down: set[str] = set()  # engines this router saw fail since their last good scrape
        self.queue: deque[_Job] = deque()  # waiting for room (KV), looked at every scrape round
        self.held: deque[_Job] = deque()  # held by late binding, oldest first
        self.summary: dict | None = None
        self.peer_engines: tuple = ()  # the EngineViews its summary describes (predictive policy)
        self.summary_at: float | None = None
        self.routed = 0
        self.spills = 0


# ---- the simulator ---------------------------------------------------------------------------------


@dataclass
class SimResult:
    records: list[RequestRecord]
    summary: Summary
    duration_s: float
    wall_s: float
    engines: int
    regions: int
    preemptions: int
    recomputed_tokens: int
    prefix_hit_rate: float | None
    cost_usd: float | None
    cost_per_million_tokens: float | None
    cost_notes: list[str]
    utilisation: dict[str, float]  # region -> busy fraction of its engines
    region_engines: dict[str, int]
    routed: dict[str, int]  # region -> requests its router placed locally
    spills: dict[str, int]  # region -> requests its router forwarded to a peer
    kv_series: dict[str, list[tuple[float, float]]]
    events: list[tuple[float, str]]
    failed_during_failure: int
    held: int = 0  # requests held at a router (late binding) at least once
    refused_held: int = 0  # of them, refused (429) once their TTFT slack was spent
    # requests a peer answered 429 (full) at least once, and of them those served after all (they
    # waited for room at their origin: Simulator._route)
    peer_refused: int = 0
    served_after_peer_refusal: int = 0

    @property
    def speed(self) -> float:
        """Simulated seconds per wall second."""
        return self.duration_s / self.wall_s if self.wall_s > 0 else math.inf

    def extra(self) -> dict:
        return {
            "engines": self.engines,
            "preemptions": self.preemptions,
            "recomputed_tokens": self.recomputed_tokens,
            "prefix_hit_rate": self.prefix_hit_rate,
            "held": self.held,
            "refused_held": self.refused_held,
            "peer_refused": self.peer_refused,
            "served_after_peer_refusal": self.served_after_peer_refusal,
            "cost_per_million_tokens_usd": self.cost_per_million_tokens,
            "sim_speed_x": round(self.speed, 1),
            "utilisation": {k: round(v, 3) for k, v in self.utilisation.items()},
        }


class Simulator:
    def __init__(self, fleet, config: SimConfig | None = None) -> None:
        self.fleet = fleet
        self.cfg = config or SimConfig()
        s = fleet.router
        self.scrape_s = s.scrape_interval_s
        self.stale_s = s.stale_after_s
        self.queue_wait_s = s.queue_wait_s
        self.continuation_wait_s = s.idle_timeout_s
        self.queue_max = s.queue_max
        self.retry_budget = s.retry_budget
        self.ttft_slo = self.cfg.ttft_slo_s or fleet.slo.ttft_ms / 1000.0
        self.tpot_slo = fleet.slo.tpot_ms / 1000.0
        self.policy_cfg = replace(PolicyConfig.from_settings(s, self.tpot_slo, self.ttft_slo), seed=self.cfg.seed)
        if self.cfg.reach not in REACHES:
            raise SimError(f"reach {self.cfg.reach!r}: one of {', '.join(REACHES)}")
        keys = {r.key for r in fleet.regions}
        unknown = [k for k in (self.cfg.regions or ()) if k not in keys]
        if unknown:
            raise SimError(f"region {unknown[0]!r} is not in the fleet; regions: {', '.join(sorted(keys))}")
        if self.cfg.regions:
            keys = set(self.cfg.regions)
        self.region_keys = keys
        self.loop = VirtualLoop()
        for f in self.cfg.failures:
            if f.region not in keys:
                raise SimError(
                    f"--fail names region {f.region!r}; the fleet's regions are {', '.join(sorted(keys))}"
                )
        self._build()

    # -- construction ---------------------------------------------------------------------------------

    def _build(self) -> None:
        from gpufleet.stacks import catalog

        fleet = self.fleet
        self.routers: dict[str, _Router] = {}
        self.engines: list[_SimEngine] = []
        self.region_cost: dict[str, float | None] = {}
        self.cost_notes: list[str] = []
        self.capacity: dict[str, int] = {}
        for r in fleet.regions:
            if r.key not in self.region_keys:
                continue
            model = fleet.model_for(r)
            tp = model.tensor_parallel_size
            n = fleet.gpus_at_max(r) // tp
            if self.cfg.engines_per_region is not None:
                n = min(n, self.cfg.engines_per_region) if n else self.cfg.engines_per_region
            n = max(1, n)
            resolved = resolve(
                EngineConfig(
                    model=model.catalog or model.name,
                    gpu=r.gpu,
                    tensor_parallel_size=tp,
                    max_model_len=model.max_model_len,
                    kv_cache_dtype=model.kv_cache_dtype,
                    num_gpu_blocks=self.cfg.num_gpu_blocks,
                    served_model_name=model.name,
                )
            )
            engines = [
                _SimEngine(f"{r.key}/e{i}", r.key, self._engine(resolved, f"{r.key}/e{i}")) for i in range(n)
            ]
            self.engines += engines
            self.capacity[r.key] = n * resolved.kv_capacity_tokens
            it = r.instance(tp)
            price = catalog.price(r.cloud.value, r.region, it.name)
            if price is None:
                # The same instance type elsewhere in the same cloud: an estimate, and said so.
                table = catalog.prices().get(r.cloud.value)
                seen = [p[it.name] for p in (table.per_region.values() if table else ()) if it.name in p]
                if seen:
                    price = min(seen)
                    self.cost_notes.append(
                        f"{r.key}: no catalog price for {it.name} here; used {price} USD/h elsewhere"
                    )
                else:
                    self.cost_notes.append(f"{r.key}: no catalog price for {it.name}; left out of the cost")
            nodes = math.ceil(n * tp / it.gpus)
            self.region_cost[r.key] = None if price is None else price * nodes
            view = RegionView(
                key=r.key,
                tier=r.capacity.tier.value,
                residency=r.residency,
                models=frozenset({model.name}),
                cost_per_gpu_hour=None if price is None else price / it.gpus,
            )
            self.routers[r.key] = _Router(r.key, view, r.region, engines, self.cfg.policy, self.policy_cfg)
        self.cloud_region = {r.key: r.region for r in fleet.regions if r.key in self.region_keys}
        for e in self.engines:
            e.cloud = self.cloud_region[e.region]
        self.global_reach = self.cfg.reach == "global"
        if self.global_reach:
            # ONE router over every engine: one policy (its turn, its prefix index), one ledger and one
            # count of requests in flight; each region's entry point shares them.
            first = next(iter(self.routers.values()))
            by_id = {e.id: e for e in self.engines}
            for router in self.routers.values():
                router.policy, router.ledger, router.outstanding = first.policy, first.ledger, first.outstanding
                router.by_id = by_id
        # the longest request every engine takes: its context limit, and its cache less the null block
        # (a request past that would stall the engine, as in vLLM: vllm-project/vllm#35541)
        self.max_model_len = min(min(e.engine.cfg.max_model_len, e.engine.cfg.kv_capacity_tokens) for e in self.engines)
        self._by_id = {e.id: e for e in self.engines}

    def _engine(self, resolved, name: str) -> VirtualEngine:
        return VirtualEngine(self.loop, _CountingEngine(resolved, name=name), name=name,
                             max_window_steps=MAX_WINDOW_STEPS)  # fmt: skip

    # -- event plumbing -------------------------------------------------------------------------------

    def run(self, items: Sequence[WorkItem]) -> SimResult:
        if not items:
            raise SimError("no requests to simulate")
        wall0 = time.perf_counter()
        loop = self.loop
        self._ids = itertools.count()
        self.jobs: list[_Job] = []
        self.events: list[tuple[float, str]] = []
        items = self._clients(items)
        duration = max(it.at_s for it in items)
        for it in items:
            loop.schedule(it.at_s + network.CLIENT_MS / 1000.0, self._on_arrive, it)
        for f in self.cfg.failures:
            loop.schedule(f.at_s, self._on_fail, f.region)
            if f.until_s is not None:
                loop.schedule(f.until_s, self._on_restore, f.region)
        self._sample_step = self.cfg.kv_sample_s or max(self.scrape_s, duration / 120.0)
        self.kv_series: dict[str, list[tuple[float, float]]] = {k: [] for k in self.routers}
        self._open_jobs = 0
        self.held = 0  # late binding's counts (SimResult.held, refused_held)
        self.refused_held = 0
        self._arrivals_left = len(items)
        self._lost_preemptions = 0  # counters of engines that died with their region
        self._lost_recomputed = 0
        self._lost_busy: dict[str, float] = {}
        self._lost_prefix = [0, 0]
        self._rv_cache: dict[str, list[RegionView]] = {}
        loop.schedule(0.0, self._scrape_tick)
        loop.schedule(0.0, self._sample_tick)
        now = loop.run()
        wall = time.perf_counter() - wall0
        return self._result(duration, now, wall)

    def _clients(self, items: Sequence[WorkItem]) -> list[WorkItem]:
        keys = list(self.routers)
        if self.cfg.clients == "capacity":
            weights = [float(self.capacity[k]) for k in keys]
        elif self.cfg.clients == "uniform":
            weights = [1.0] * len(keys)
        else:
            raise SimError(f"clients {self.cfg.clients!r}: one of uniform, capacity")
        import random

        rng = random.Random(self.cfg.seed ^ 0xC11E)
        out = []
        for it in items:
            if it.client_region in self.routers:
                out.append(it)
            else:
                out.append(replace(it, client_region=rng.choices(keys, weights)[0]))
        return out

    # -- requests at routers --------------------------------------------------------------------------

    def _scrape_tick(self) -> None:
        now = self.loop.now
        self._on_scrape(now)
        if self._arrivals_left or self._open_jobs:
            self.loop.schedule(now + self.scrape_s, self._scrape_tick)

    def _sample_tick(self) -> None:
        now = self.loop.now
        self._on_sample(now)
        if self._arrivals_left or self._open_jobs:
            self.loop.schedule(now + self._sample_step, self._sample_tick)

    def _on_arrive(self, item: WorkItem) -> None:
        now = self.loop.now
        self._arrivals_left -= 1
        prompt = item.prompt_tokens
        out = item.max_tokens
        if prompt + out > self.max_model_len:  # the engines would answer 400; keep the load, clip it
            out = max(1, min(out, self.max_model_len // 8))
            prompt = max(1, min(prompt, self.max_model_len - out))
        rec = RequestRecord(id=item.id, arrival_s=item.at_s, prompt_tokens=prompt, max_tokens=out,
                            client_region=item.client_region)  # fmt: skip
        # run() gave every item a router's region (_clients)
        assert item.client_region is not None, "a work item reached _on_arrive without a client region"
        job = _Job(item=item, rec=rec, router=item.client_region, need=prompt + out, hashes=None)
        if item.hash_ids:
            job.hashes = _block_hashes(item.hash_ids, prompt, self.engines[0].engine.block_size)
            job.prefix = chain(item.hash_ids[: prompt // MOONCAKE_BLOCK_TOKENS])
        job.arrived_at = now
        job.room_until = now + self.queue_wait_s
        self.jobs.append(job)
        self._open_jobs += 1
        self._route(job, self.routers[job.router], now, allow_remote=True, hop_s=0.0)

    def _views(self, router: _Router, now: float) -> list[EngineView]:
        out = []
        pending = router.ledger.pending
        prefill = router.ledger.pending_prefill
        here = router.cloud_region
        for e in self.engines if self.global_reach else router.engines:
            s = e.stats
            healthy = e.sampled_at is not None and e.id not in router.down and s is not None
            out.append(
                EngineView(
                    id=e.id,
                    region=e.region,
                    free_tokens=s.free_tokens if s else 0.0,
                    capacity_tokens=float(s.capacity_tokens) if s else 0.0,
                    kv_usage=s.kv_cache_usage if s else 1.0,
                    running=s.num_running if s else 0,
                    waiting=s.num_waiting if s else 0,
                    sampled_at=e.sampled_at,
                    healthy=healthy,
                    # waiting_tokens stays None: /metrics has only the count, so the router estimates
                    recent_itl_s=e.itl,
                    pending_tokens=pending(e.id),
                    outstanding=router.outstanding.get(e.id, 0),
                    profile=e.profile,
                    rtt_s=2 * network.one_way_s(here, e.cloud),
                    pending_prefill_tokens=prefill(e.id),
                    recent_prompt_tokens=e.prompt_delta,
                    recent_itl_tokens=e.itl_delta,
                    ledger=router.ledger,
                )
            )
        return out

    def _region_views(self, router: _Router) -> list[RegionView]:
        """The peers' summaries as this router last read them (rebuilt once per scrape round)."""
        cached = self._rv_cache.get(router.key)
        if cached is not None:
            return cached
        out = []
        for key, other in self.routers.items():
            if key == router.key:
                out.append(replace(other.region, local=True))
                continue
            if self.global_reach:
                out.append(other.region)  # its engines are this router's own
                continue
            s = other.summary
            if s is None:
                out.append(replace(other.region, remote=True))
                continue
            # What this router forwarded since the summary is not in it yet (as the gateway does).
            free = s["free"] - router.ledger.pending(key)
            rtt = 2 * network.one_way_s(router.cloud_region, other.cloud_region)
            out.append(
                replace(
                    other.region,
                    remote=True,
                    free_tokens=free,
                    largest_free_tokens=min(s["largest"], free),
                    largest_fit_tokens=s["fit"] - router.ledger.pending(key),
                    healthy_engines=s["healthy"],
                    queue=len(other.queue) + len(other.held),
                    summarized_at=other.summary_at,
                    rtt_s=rtt,
                    engines=other.peer_engines,  # the policy adds rtt_s
                    # what this router forwarded there and the summary may not show yet (so a burst
                    # does not herd onto one stale summary)
                    forwarded=router.ledger.in_flight(key),
                )
            )
        self._rv_cache[router.key] = out
        return out

    def _route(self, job: _Job, router: _Router, now: float, allow_remote: bool, hop_s: float) -> None:
        """The gateway's `_serve` for one request at `router` (hop_s: latency back to the client)."""
        residency = self.routers[job.router].region.residency  # the arrival region's, as the gateway does
        prompt = job.rec.prompt_tokens + job.sent_tokens
        routed = RoutedRequest(
            need_tokens=job.need,
            model=None,
            residency=residency,
            affinity_key=str(job.item.hash_ids[0]) if job.item.hash_ids else None,
            allow_remote=allow_remote,
            exclude=frozenset(job.excluded | job.full),
            prompt_tokens=prompt,
            max_tokens=job.rec.max_tokens - job.sent_tokens,
            prefix=job.prefix,
            prefix_block_tokens=MOONCAKE_BLOCK_TOKENS,
            key=job.item.id,
            # a request that lost its engine is the fleet's to finish, late or not (as the gateway's
            # continuation does): its age is not counted against its TTFT
            waited_s=0.0 if job.lost_engine else now - job.arrived_at,
        )
        cands = router.policy.choose(routed, self._views(router, now), self._region_views(router), now)
        if cands and cands[0].hold_s is not None:
            self._hold(job, router, now, cands[0].hold_s, hop_s)
            return
        while cands and job.attempts <= self.retry_budget:
            cand = cands.pop(0)
            if cand.engine is None:
                peer = self.routers[cand.region]
                router.spills += 1
                router.ledger.routed(peer.key, job, job.need, now)
                job.forwarded_by = router.key
                self._rv_cache.pop(router.key, None)
                lat = network.one_way_s(router.cloud_region, peer.cloud_region)
                job.attempts += 1
                self.loop.schedule(now + lat, self._on_engine_in, job, ("peer", peer.key, hop_s + lat))
                return
            eng = router.by_id[cand.engine]
            job.attempts += 1
            if not eng.alive:
                # connection refused: the router learns at once, tries the next candidate
                router.down.add(eng.id)
                job.excluded.add(eng.id)
                continue
            router.ledger.routed(eng.id, job, job.need, now, prefill_tokens=prompt)
            router.outstanding[eng.id] = router.outstanding.get(eng.id, 0) + 1
            router.routed += 1
            lat = network.one_way_s(router.cloud_region, eng.cloud)
            job.probe = None if cand.predicted_ttft_s is None else (cand.predicted_ttft_s, now, lat)
            self.loop.schedule(
                now + lat, self._on_engine_in, job, ("engine", eng.id, hop_s + lat, router.key)
            )
            return
        if job.attempts > self.retry_budget:
            self._fail(job, now, "retry budget spent")
            return
        # Nothing fits now: a forwarded request is refused at once (429, the origin moves on);
        # one that arrived here waits in the bounded queue, until its room_until (the gateway's
        # admission.wait_for_room).
        if not allow_remote:
            self.loop.schedule(now + hop_s, self._on_engine_in, job, ("refused", router.key, 0.0))
            return
        if job in router.queue:
            return
        if job.room_until <= now or len(router.queue) >= self.queue_max:
            self._reject(job, now)
            return
        if job.queued_until != job.room_until:  # one timer per deadline
            job.queued_until = job.room_until
            self.loop.schedule(job.queued_until, self._on_queue_timeout, job)
        router.queue.append(job)

    def _hold(self, job: _Job, router: _Router, now: float, hold_s: float, hop_s: float) -> None:
        """Late binding, as the gateway's admission does it: the request waits at `router` (a peer
        too, for a forwarded one) until a prefill there completes or data refreshes, for at most
        `hold_s`; past its slack, or with the queue full, it is refused (429)."""
        if not job.was_held:
            job.was_held = True
            self.held += 1
        if hold_s <= 0 or len(router.queue) + len(router.held) >= self.queue_max:
            self.refused_held += 1
            self._reject(job, now)
            return
        job.held_at, job.held_hop_s = router.key, hop_s
        until = now + hold_s
        if job.queued_until is None or abs(until - job.queued_until) > 1e-9:  # one timer per deadline
            job.queued_until = until
            self.loop.schedule(until, self._on_queue_timeout, job)
        router.held.append(job)

    def _unhold(self, job: _Job, router: _Router, now: float) -> None:
        """Another look at a held request (out of `router.held`): sent, held again (at the back), or refused."""
        held_at, hop_s = job.held_at, job.held_hop_s
        job.held_at = None
        self._route(job, router, now, allow_remote=held_at == job.router, hop_s=hop_s)

    def _wake_held(self, router: _Router, now: float) -> None:
        """A prefill completed at `router`, as the gateway wakes its held requests: oldest first,
        until HELD_LOOKS_PER_PREFILL of them are still held; those keep their places. Unlike the
        gateway, an answer's end does not wake them here: the gateway needs that for non-streamed
        answers (their only sign of a prefill done), and every simulated request reports its first
        token. A streamed answer's end there is one more look, which the simulator leaves out."""
        held = router.held
        still: list[_Job] = []
        while held and len(still) < HELD_LOOKS_PER_PREFILL:
            job = held.popleft()
            if job.done or job.held_at is None:
                continue
            self._unhold(job, router, now)
            if job.held_at is not None:  # held again (appended): back to its place
                held.pop()
                still.append(job)
        held.extendleft(reversed(still))

    def _wake(self, router: _Router, now: float) -> None:
        """A scrape round: every queued and held request gets another look (new data, freed room)."""
        held, router.held = router.held, deque()
        for job in held:
            if not job.done and job.held_at is not None:
                self._unhold(job, router, now)
        if not router.queue:
            return
        waiting = list(router.queue)
        router.queue.clear()
        for job in waiting:
            if not job.done:
                job.full.clear()
                self._route(job, router, now, allow_remote=True, hop_s=0.0)

    def _on_engine_in(self, job: _Job, where: tuple) -> None:
        now = self.loop.now
        kind = where[0]
        if job.done:
            return
        if kind == "peer":
            _, peer_key, hop_s = where
            self._route(job, self.routers[peer_key], now, allow_remote=False, hop_s=hop_s)
            return
        if kind == "refused":
            # Back at the origin: the peer was full (429), not broken. As the gateway does, it tries
            # its other candidates; with none left it waits for room until its room_until (the peer
            # asked again after the next scrape round), and a 429 does not spend the retry budget.
            job.full.add(where[1])
            job.peer_refused = True
            job.attempts -= 1
            self._unforward(job)
            self._route(job, self.routers[job.router], now, allow_remote=True, hop_s=0.0)
            return
        _, eid, ret_s, router_key = where
        eng = self._by_id[eid]
        router = self.routers[router_key]
        if not eng.alive:
            self._release(router, eid, job)
            router.down.add(eid)
            job.excluded.add(eid)
            self._unforward(job)
            self._route(job, self.routers[job.router], now, allow_remote=True, hop_s=0.0)
            return
        job.return_s = ret_s + network.CLIENT_MS / 1000.0
        job.rec.region = eng.region
        job.rec.spilled = eng.region != job.router
        prompt = job.rec.prompt_tokens + job.sent_tokens
        req = Request(
            request_id=f"{job.item.id}.{next(self._ids)}",
            prompt_len=prompt,
            max_tokens=job.rec.max_tokens - job.sent_tokens,
            prompt_block_hashes=job.hashes[: prompt // eng.engine.block_size] if job.hashes else None,
            ignore_eos=True,
            user_data=_Placement(job, router_key, eid),
            on_first_token=self._first_token,
            on_finish=self._finished,
        )
        job.live = req
        eng.v.submit(req)

    def _first_token(self, req: Request, t: float) -> None:
        job, router_key, eid = _placement(req)
        if job.live is not req:
            return  # an engine that died with its region finishing its last window
        router = self.routers[router_key]
        router.ledger.progress(job, req.prompt_len + 1)
        if job.probe is not None:  # the TTFT its router measures: from its send to the token's return
            predicted, sent, lat = job.probe
            job.probe = None
            observe = getattr(router.policy, "observe_ttft", None)
            if observe is not None:
                observe(eid, predicted, t + lat - sent)
        self._wake_held(router, t)  # its prefill is done: a held request may now start
        if job.first_token_at is None:
            job.first_token_at = t + job.return_s
            job.rec.ttft_s = job.first_token_at - job.item.at_s

    def _finished(self, req: Request, t: float) -> None:
        job, router_key, eid = _placement(req)
        if job.live is not req:
            return
        self._release(self.routers[router_key], eid, job)
        if job.done:
            return
        self._close(job)
        rec = job.rec
        end = t + job.return_s
        rec.outcome = OK
        rec.output_tokens = rec.max_tokens
        rec.e2e_s = end - job.item.at_s
        if rec.max_tokens > 1 and job.first_token_at is not None:
            rec.tpot_s = (end - job.first_token_at) / (rec.max_tokens - 1)

    def _release(self, router: _Router, eid: str, job: _Job) -> None:
        router.ledger.done(job)
        n = router.outstanding.get(eid, 0) - 1
        if n > 0:
            router.outstanding[eid] = n
        else:
            router.outstanding.pop(eid, None)

    def _close(self, job: _Job) -> None:
        job.done = True
        self._open_jobs -= 1
        self._unforward(job)

    def _unforward(self, job: _Job) -> None:
        """The origin router's accounting of a request it forwarded ends with the request."""
        if job.forwarded_by is not None:
            self.routers[job.forwarded_by].ledger.done(job)
            self._rv_cache.pop(job.forwarded_by, None)
            job.forwarded_by = None

    def _fail(self, job: _Job, now: float, why: str) -> None:
        if job.done:
            return
        self._close(job)
        job.rec.outcome = FAILED
        job.rec.error = why

    def _reject(self, job: _Job, now: float) -> None:
        if job.done:
            return
        if job.lost_engine:
            # the gateway took it and its engine died: a continuation that finds no engine ends the
            # client's answer with an error (continuation.py), a failure, not a clean 429
            self._fail(job, now, "the stream broke and could not be continued")
            return
        self._close(job)
        job.rec.outcome = REJECTED
        job.rec.error = "429"

    def _on_queue_timeout(self, job: _Job) -> None:
        now = self.loop.now
        if job.done or job.queued_until is None or job.queued_until > now + 1e-9:
            return
        if job.held_at is not None:  # its TTFT slack is spent: a last look, then 429
            router = self.routers[job.held_at]
            if job in router.held:
                router.held.remove(job)
                self._unhold(job, router, now)
            return
        router = self.routers[job.router]
        if job in router.queue:
            router.queue.remove(job)
            self._reject(job, now)

    # -- engines --------------------------------------------------------------------------------------

    # -- scrapes, samples, failures -------------------------------------------------------------------

    def _on_scrape(self, now: float) -> None:
        self._rv_cache.clear()
        for router in self.routers.values():
            ledger = router.ledger
            free = largest = fit_largest = 0.0
            healthy = 0
            brief = []  # (queued prefill, -fit, id, engine, pending, stats) for the summary's engine figures
            for e in router.engines:
                if not e.alive:
                    e.stats = None
                    e.sampled_at = None
                    router.down.add(e.id)
                    continue
                # Re-read the stats only when the engine stepped or took a request since last time.
                eng = e.engine
                stamp = (eng.num_steps, len(eng.requests))
                st = e.stats
                if stamp != e.stamp or st is None:
                    prev = st
                    st = e.stats = eng.stats()
                    e.stamp = stamp
                    e.itl = None if prev is None else recent_pace(
                        prev.itl_seconds_total, prev.itl_tokens_total, st.itl_seconds_total,
                        st.itl_tokens_total, st.num_running, e.itl,
                    )  # fmt: skip
                    if prev is not None:
                        e.prompt_delta = float(st.prompt_tokens - prev.prompt_tokens)
                        e.itl_delta = float(st.itl_tokens_total - prev.itl_tokens_total)
                elif not e.engine.running:
                    e.itl = None  # idle since the last sample
                # the summary's headroom before accounting (policy.spare_headroom): none at all while
                # the engine is saturated; what fits as a last resort regardless
                spare = 0.0 if saturated(st.num_waiting, e.itl, self.policy_cfg) else st.free_tokens
                e.sampled_at = now
                healthy += 1
                if eng.requests:
                    # what the streams through this router have materialized (the gateway counts
                    # prompt + tokens relayed, per chunk; here once per scrape round)
                    for req in eng.requests.values():
                        if req.num_output_tokens:
                            p = _placement(req)
                            if self.routers[p.router_key].ledger is ledger:
                                ledger.progress(p.job, req.prompt_len + req.num_output_tokens)
                pending = ledger.pending(e.id)
                room = spare - pending
                fit = st.free_tokens - pending
                if fit > fit_largest:
                    fit_largest = fit
                if not self.global_reach:
                    brief.append((ledger.pending_prefill(e.id) + st.num_waiting, -fit, e.id, e, pending, st))
                if room > 0:
                    free += room
                    if room > largest:
                        largest = room
            if router.down:
                router.down = {eid for eid in router.down if not router.by_id[eid].alive}
            router.summary = {"free": free, "largest": largest, "fit": fit_largest, "healthy": healthy}
            brief.sort(key=lambda t: t[:3])
            router.peer_engines = tuple(
                EngineView(
                    id=e.id, region=e.region, free_tokens=es.free_tokens,
                    capacity_tokens=float(es.capacity_tokens),
                    kv_usage=es.kv_cache_usage, running=es.num_running, waiting=es.num_waiting,
                    sampled_at=now, recent_itl_s=e.itl, pending_tokens=pending, profile=e.profile,
                    recent_prompt_tokens=e.prompt_delta, recent_itl_tokens=e.itl_delta,
                    pending_prefill_tokens=ledger.pending_prefill(e.id),
                    ttft_offset_s=offset_of(router.policy, e.id),
                )  # fmt: skip
                for _, _, _, e, pending, es in brief[:PEER_SUMMARY_ENGINES]
            )
            router.summary_at = now
        for router in self.routers.values():
            for key in self.routers:
                if key != router.key:
                    router.ledger.covered(key, now)  # the fresh summaries include what was forwarded
        # queued requests get another look with the new data (the gateway wakes its queue per round)
        for router in self.routers.values():
            self._wake(router, now)

    def _on_sample(self, now: float) -> None:
        for key, router in self.routers.items():
            alive = [e for e in router.engines if e.alive]
            usage = sum(e.engine.kv_cache_usage for e in alive) / len(router.engines) if alive else 0.0
            self.kv_series[key].append((now, usage))

    def _on_fail(self, region: str) -> None:
        now = self.loop.now
        self.events.append((now, f"{region} down"))
        router = self.routers[region]
        lost: list[Request] = []
        for e in router.engines:
            if not e.alive:
                continue
            e.alive = False
            lost += list(e.engine.running) + list(e.engine.waiting)
            self._lost_preemptions += e.engine.num_preemptions
            self._lost_recomputed += e.engine.recomputed_tokens
            self._lost_busy[e.id] = self._lost_busy.get(e.id, 0.0) + e.engine.busy_time
            self._lost_prefix[0] += e.engine.prefix_cache_queries
            self._lost_prefix[1] += e.engine.prefix_cache_hits
        for req in lost:
            job, router_key, eid = _placement(req)
            self._release(self.routers[router_key], eid, job)
            if job.done:
                continue
            # The owning router sees the connection reset at once.
            owner = self.routers[router_key]
            for e in router.engines:
                owner.down.add(e.id)
                job.excluded.add(e.id)
            if req.num_output_tokens > 0 or job.first_token_at is not None:
                job.rec.continued = True
                job.sent_tokens = min(job.rec.max_tokens - 1, job.sent_tokens + req.num_output_tokens)
            job.live = None
            job.lost_engine = True
            # its wait for room, if it finds none, starts now and lasts idle_timeout_s (continuation.py)
            job.room_until = now + self.continuation_wait_s
            self._unforward(job)
            job.attempts = 0  # a continuation gets its own retry budget in the gateway
            self._route(job, self.routers[job.router], now, allow_remote=True, hop_s=0.0)
        for e in router.engines:
            e.v = self._engine(e.engine.cfg, e.id)  # its memory is gone with the process

    def _on_restore(self, region: str) -> None:
        now = self.loop.now
        self.events.append((now, f"{region} restored"))
        for e in self.routers[region].engines:
            e.alive = True
            e.stamp = None

    # -- results --------------------------------------------------------------------------------------

    def _result(self, duration: float, end: float, wall: float) -> SimResult:
        for job in self.jobs:
            if not job.done:
                self._fail(job, end, "unfinished at the end of the run")
        records = [j.rec for j in self.jobs]
        summary = summarize(records, self.ttft_slo, self.tpot_slo, duration)
        engines = [e.engine for e in self.engines]
        preempt = sum(e.num_preemptions for e in engines) + self._lost_preemptions
        recomputed = sum(e.recomputed_tokens for e in engines) + self._lost_recomputed
        q = sum(e.prefix_cache_queries for e in engines) + self._lost_prefix[0]
        h = sum(e.prefix_cache_hits for e in engines) + self._lost_prefix[1]
        hours = max(end, duration) / 3600.0
        priced = [c for c in self.region_cost.values() if c is not None]
        cost = sum(priced) * hours if priced else None
        tokens = summary.prompt_tokens + summary.output_tokens
        util = {}
        span = max(end, 1e-9)
        for key, router in self.routers.items():
            busy = sum(e.engine.busy_time + self._lost_busy.get(e.id, 0.0) for e in router.engines)
            util[key] = min(1.0, busy / (len(router.engines) * span))
        failed_in = 0
        for f in self.cfg.failures:
            stop = f.until_s if f.until_s is not None else math.inf
            failed_in += sum(1 for r in records if f.at_s <= r.arrival_s < stop and r.outcome == FAILED)
        return SimResult(
            records=records,
            summary=summary,
            duration_s=duration,
            wall_s=wall,
            engines=len(self.engines),
            regions=len(self.routers),
            preemptions=preempt,
            recomputed_tokens=recomputed,
            prefix_hit_rate=(h / q) if q else None,
            cost_usd=cost,
            cost_per_million_tokens=(cost / tokens * 1e6) if cost is not None and tokens else None,
            cost_notes=self.cost_notes,
            utilisation=util,
            region_engines={k: len(r.engines) for k, r in self.routers.items()},
            routed={k: r.routed for k, r in self.routers.items()},
            spills={k: r.spills for k, r in self.routers.items()},
            kv_series=self.kv_series,
            events=self.events,
            failed_during_failure=failed_in,
            held=self.held,
            refused_held=self.refused_held,
            peer_refused=sum(1 for j in self.jobs if j.peer_refused),
            served_after_peer_refusal=sum(1 for j in self.jobs if j.peer_refused and j.rec.outcome == OK),
        )


def _block_hashes(hash_ids: Sequence[int], prompt_len: int, block_size: int) -> list[int]:
    """Chained engine-block hashes from Mooncake's 512-token block ids: equal id prefixes give equal
    hash chains, so the engine's prefix cache finds exactly the prefixes the trace shares."""
    per = MOONCAKE_BLOCK_TOKENS // block_size
    out: list[int] = []
    parent = 0
    for i in range(prompt_len // block_size):
        j = i // per
        if j >= len(hash_ids):
            break
        parent = hash((parent, hash_ids[j], i % per))
        out.append(parent)
    return out
