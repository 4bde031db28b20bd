"""The default policy, `predictive`: send each request where it is most likely to meet its SLO while
doing the least harm to the requests already running there, judged in seconds per engine.

For every engine that can hold the request (KV stays the admission guard, `policy.can_hold`: a
request is never sent where it would make the engine preempt, judged from the headroom bound or,
where that says no, from when the router's requests there end), `predict.predict` gives its TTFT
and TPOT from the engine's running batch, KV in use, prefill queued there, GPU type and TP (the
engine model's step times), the prompt tokens it likely caches (longest prefix,
`prefix.PrefixIndex`) and the round trip; corrected online from the engine's own inter-token
latency and from the TTFTs the router measured there (`predict.Corrections`; the caller reports
them, `observe_ttft`). Then:

* an engine is FEASIBLE when the request's predicted TTFT and TPOT are within the SLO and admitting
  it does not push the running batch's TPOT past the target (the harm: its prefill stalls them and
  its decode share slows every step; `estimate`'s running_tpot_after). The TTFT counts from the
  request's arrival: the time it has waited already (`RoutedRequest.waited_s`: held, queued for
  room, at the origin router of a forwarded request) is added to the prediction, so a request that
  waited long is not sent where it would now be late, taking an engine from requests still on time;
* among feasible engines the least loaded relative to its speed wins (`_load`: requests in flight
  and queued, in seconds of the engine model's prefill per token), so load spreads by capacity;
* when no engine is feasible, the fewest expected misses win:
      risk(max(TTFT / TTFT SLO, TPOT / TPOT SLO))          this request's chance to miss
      + HARM_WEIGHT x running x (their TPOT after - now) / TPOT SLO   the harm to the running batch
      + SPEED_TIE x the request's own SLO fraction
  with risk(x) a logistic step at x = RISK_CENTER (width RISK_WIDTH; below 1 because requests that
  arrive later stretch the steps further).

Late binding (`PolicyConfig.late_binding`, on by default): an engine is not feasible for a request
whose prompt would not start in the engine's next step: the prompt tokens this router sent there and
has no first token for yet (its ledger: exact and fresh, where a scraped queue is a scrape old) plus
the request's uncached tokens, past the engine's chunk (`max_num_batched_tokens`); an engine with
nothing pending takes any prompt. vLLM fills each step with waiting prefill up to that chunk, and a
full chunk takes longer than a TPOT target (144-203 ms for Llama-8B on an L40S, A100 or H100 in the
engine model), so a queue there slows every request decoding on that engine, and a request queued
inside an engine cannot move to another one that frees first. When no engine anywhere is feasible, the first
candidate carries `hold_s`: the caller holds the request (gateway admission, the simulator) and asks
again when a prefill completes or data refreshes, for at most its TTFT slack (the SLO less its own
prefill alone, less what it has waited). A request still held then cannot meet its TTFT SLO: it is
refused (429), which frees its work for requests that still can (Mooncake's prediction-based early
rejection, FAST '25, is the same idea at the cluster's entry). A request that could not meet the
SLO even on an idle engine is never held: it is served, best effort.

Peer regions are predicted from the engines their summaries describe (`RegionView.engines`); a
request spills to a peer only where the peer predicts better: feasible where nothing here is, or
feasible and clearly less loaded for its speed (SPILL_LOAD), or, with nothing feasible anywhere,
fewer expected misses by SPILL_MARGIN (a peer with no engine figures is a last resort, after every
local engine that fits).

Measured, not assumed (docs/results.md): choosing the engine with the least predicted time, or the
lowest risk with a small load tie-break, did worse than this in the simulator: greedy on
predictions herds onto the fastest GPU between samples; the prediction is best used to say where a
request would miss, and capacity-weighted least load to spread the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from operator import itemgetter

from gpufleet.serving.router.policies._base import prompt_tokens
from gpufleet.serving.router.policy import (
    Candidate,
    EngineView,
    PolicyConfig,
    RegionView,
    RoutedRequest,
    _allowed_regions,
    _fresh_peers,
    can_hold,
    engine_usable,
    headroom,
)
from gpufleet.serving.router.predict import Corrections, EngineProfile, estimate, ttft_offset
from gpufleet.serving.router.prefix import PrefixIndex

RISK_WIDTH = 0.1  # with the centre at 0.8: an SLO fraction of 0.6 is a 12 % risk, 1.0 is 88 %
# The prediction is for the engine as it is now; requests that arrive after this one stretch its
# steps further, so the risk is centred below the SLO.
RISK_CENTER = 0.8
# An engine is feasible while the request's predicted SLO fraction is at most FEASIBLE_AT, and the
# running batch's TPOT after admission is within the target or (already past it) no worse than
# FEASIBLE_HARM x what it is now.
FEASIBLE_AT = 1.0
FEASIBLE_HARM = 1.0
ENOUGH_FEASIBLE = 8  # feasible engines scored per decision: the choice and its retries
SPILL_MARGIN = 0.1  # expected misses a peer must save to be worth the hop
# A feasible peer engine is taken before the feasible local ones when its load (`_load`) is below
# this fraction of the best local one's: a clear difference, not a stale summary's noise.
SPILL_LOAD = 0.7
# ... and only when the best local engine's predicted SLO fraction is at least this.
SPILL_FROM = 0.2
SPEED_TIE = 0.01  # weight of the request's own SLO fraction among equally safe engines
# The running batch's harm: each running request's TPOT rise (this request's decode share plus its
# prefill stalling them, spread over the tokens they have left), in SLO units, at this weight.
HARM_WEIGHT = 0.1


RISK_FLOOR = RISK_CENTER - 6 * RISK_WIDTH  # below it the risk is under 0.25 %: counted as 0, no exp


def _risk(x: float) -> float:
    z = (x - RISK_CENTER) / RISK_WIDTH
    if z > 40:
        return 1.0
    if z < -40:
        return 0.0
    return 1.0 / (1.0 + math.exp(-z))


_LOAD_ID = itemgetter(0, 1)


def _load(e: EngineView) -> float:
    """Requests on `e` (running, or this router's in flight if more, plus its queue) in seconds of the
    engine's prefill per token: the load relative to the engine's speed, from the engine model (no
    hand-set rates). Running counts what other routers sent there too (a peer's engines)."""
    q = e.profile.q_rate if isinstance(e.profile, EngineProfile) else 1.0
    return (max(e.outstanding, e.running) + e.waiting + 1) * q


def _queued(e: EngineView, config: PolicyConfig) -> float:
    """Prompt tokens queued for prefill on `e`: what this router sent and has no token for yet, or,
    when it sent none, the engine's waiting queue at the assumed size per request."""
    if e.pending_prefill_tokens > 0 or not e.waiting:
        return e.pending_prefill_tokens
    return e.waiting * config.waiting_request_tokens


def _remaining(e: EngineView) -> float | None:
    """Output tokens the requests this router has on `e` still have to generate, on average: its
    ledger's pending demand less their unprefilled prompts, per request in flight."""
    if not e.outstanding:
        return None
    return (e.pending_tokens - e.pending_prefill_tokens) / e.outstanding


@dataclass
class PredictivePolicy:
    config: PolicyConfig = field(default_factory=PolicyConfig)
    name: str = "predictive"
    index: PrefixIndex = field(default_factory=PrefixIndex)
    corrections: Corrections = field(default_factory=Corrections)
    # when a list: each decision appends (request key, engine, predicted TTFT s, predicted TPOT s, the
    # decision's time) for the first candidate, to check the prediction against what happened
    # (results_sim.py); a held request is logged when it is sent
    log: list[tuple[object | None, str, float, float, float]] | None = None
    _states: dict = field(default_factory=dict, repr=False)  # id(view) -> (view, _state)

    def score(
        self, e: EngineView, prompt: int, cached: int, out: int, own_s: float | None = None, rtt_s: float = 0.0,
        waited_s: float = 0.0,
    ) -> tuple[bool, float, float, float]:
        """(feasible, expected SLO misses, SLO fraction, predicted TTFT) of sending the request to `e`
        (see the module text): feasible when its predicted TTFT and TPOT are within the SLO and the
        running batch's TPOT stays within it too (or no worse than FEASIBLE_HARM x what it is).
        `own_s`: the request's prefill time on this engine's profile, when the caller has it; `rtt_s`:
        a round trip on top of the view's (a peer region's); `waited_s`: how long the request has
        waited already, which its TTFT includes (the predicted TTFT returned is from now). No
        profile: (False, inf, inf, inf)."""
        st = self._state(e, rtt_s)
        if st is None:
            return False, math.inf, math.inf, math.inf
        prof, running, ctx, queued, rtt, speed, pace, remaining, _, corr = st
        if own_s is None:
            own_s = prof.prefill_s(prompt, cached)
        ttft, tpot, before, after = estimate(prof, running, ctx, queued, own_s, prompt - cached, prompt, out,
                                             rtt + ttft_offset(e, corr), speed, pace, remaining)  # fmt: skip
        config = self.config
        tpot_slo = config.tpot_slo_s
        own = (ttft + waited_s) / config.ttft_slo_s  # its TTFT counts from its arrival
        if tpot / tpot_slo > own:
            own = tpot / tpot_slo
        risk = (_risk(own) if own > RISK_FLOOR else 0.0) + SPEED_TIE * own
        feasible = own <= FEASIBLE_AT
        sent = e.pending_prefill_tokens  # the ledger's: exact and fresh, unlike the scraped queue
        if config.late_binding and sent and sent + prompt - cached > prof.chunk:
            feasible = False  # late binding: its prefill would not start in the engine's next step
        if running and after > before:
            risk += HARM_WEIGHT * running * (after - before) / tpot_slo
            if after > tpot_slo and after > FEASIBLE_HARM * before:
                feasible = False  # it would push the running batch past the TPOT target
        return feasible, risk, own, ttft

    def _state(self, e: EngineView, rtt_s: float = 0.0) -> tuple | None:
        """What the prediction reads from `e`, once per view object (the router reuses a view while its
        sample and accounting are unchanged, so a decision over 1,000 engines recomputes only the
        ones that changed): (profile, running, context tokens, queued prefill, round trip, speed,
        pace, remaining tokens, load, the engine's correction: its TTFT offset moves between samples,
        read live). None without a profile. A view is always asked with the same
        `rtt_s` by one policy (one router's round trip to that peer)."""
        hit = self._states.get(id(e))
        if hit is not None and hit[0] is e:
            return hit[1]
        prof = e.profile
        st = None
        if isinstance(prof, EngineProfile):
            corr = self.corrections.observe(e)
            ctx = e.kv_usage * prof.capacity_tokens
            st = (prof, e.running, ctx, _queued(e, self.config), e.rtt_s + rtt_s, corr.speed, corr.pace,
                  _remaining(e), _load(e), corr)  # fmt: skip
        if len(self._states) > 16384:  # views of engines long gone
            self._states.clear()
        self._states[id(e)] = (e, st)
        return st

    def choose(self, request: RoutedRequest, engines: Sequence[EngineView], regions: Sequence[RegionView],
               now: float) -> list[Candidate]:  # fmt: skip
        config = self.config
        allowed = _allowed_regions(request, regions)
        need = request.need_tokens
        prompt = prompt_tokens(request)
        out = request.max_tokens or max(1, need - prompt)
        hits = self.index.match(request.prefix) if request.prefix else {}
        per = request.prefix_block_tokens
        waited = request.waited_s
        # Feasible engines rank by load, so walking them in load order the first feasible one is the
        # choice: scoring stops after ENOUGH_FEASIBLE of them (the retries' candidates); the engines
        # not scored follow in load order, then the infeasible ones by expected misses.
        fits: list[tuple] = []  # (load, id, view, room)
        seen: set[str] = set()
        for e in engines:
            region = allowed.get(e.region)
            if region is None or (region.remote and not request.allow_remote) or not engine_usable(e, request):
                continue
            seen.add(e.region)
            room = headroom(e, now, config)
            if room < need and not can_hold(e, need, out, now, config):
                continue  # the admission guard: it cannot hold the request's KV
            # the load alone orders them; the prediction's state is built only for those scored
            fits.append((_load(e) if isinstance(e.profile, EngineProfile) else math.inf, e.id, e, room))
        fits.sort(key=_LOAD_ID)
        feasible: list[tuple] = []  # (load, id, score, region, room, SLO fraction, predicted TTFT)
        risky: list[tuple] = []  # (score, id, region, room, predicted TTFT)
        own_cache: dict = {}  # (profile, cached tokens) -> the request's prefill seconds there
        score = self.score
        rest = len(fits)
        for i, (load, eid, e, room) in enumerate(fits):
            prof = e.profile
            cached = min(prompt, hits.get(eid, 0) * per) if hits else 0
            own_s = own_cache.get((prof, cached))
            if own_s is None and prof is not None:
                own_s = own_cache[(prof, cached)] = prof.prefill_s(prompt, cached)
            ok, sc, own, ttft = score(e, prompt, cached, out, own_s, 0.0, waited)
            if ok:
                feasible.append((load, eid, sc, e.region, room, own, ttft))
                if len(feasible) >= ENOUGH_FEASIBLE:
                    rest = i + 1
                    break
            else:
                risky.append((sc, eid, e.region, room, ttft))
        risky.sort()
        best = min(min((t[2] for t in feasible), default=math.inf), risky[0][0] if risky else math.inf)
        best_load = feasible[0][0] if feasible else None  # None: nothing feasible here (of those scored)
        # a feasible engine here that is comfortably within SLO keeps the request here, whatever a
        # peer's load: the hop buys nothing (and costs a round trip)
        spill_load = feasible[0][5] >= SPILL_FROM if feasible else True
        ahead: list[tuple[float, str, Candidate]] = []
        after: list[tuple[float, str, Candidate]] = []
        if request.allow_remote:
            for region in _fresh_peers(allowed, seen, now, config):
                cand = self._peer(region, request, prompt, out, hits, now,
                                  None if best_load is None else SPILL_LOAD * best_load)  # fmt: skip
                if cand is None:
                    continue
                ok, s, load, c = cand
                # spill only where the peer predicts better: within SLO where nothing here is, or
                # within SLO and clearly less loaded for its speed, or fewer expected misses
                if ok:
                    better = best_load is None or (spill_load and load < SPILL_LOAD * best_load)
                else:
                    better = best_load is None and s + SPILL_MARGIN < best
                (ahead if better else after).append((load if ok else math.inf, region.key, c))
        ahead.sort(key=lambda t: (t[0], t[1]))
        after.sort(key=lambda t: (t[0], t[1]))
        ranked = [c for _, _, c in ahead]
        # a local candidate carries its predicted TTFT: the caller measures it (`observe_ttft`)
        ranked += [Candidate(reg, eid, room, ttft) for _, eid, _, reg, room, _, ttft in feasible]
        ranked += [Candidate(e.region, eid, room) for _, eid, e, room in fits[rest:]]  # not scored: by load
        ranked += [Candidate(reg, eid, room, ttft) for _, eid, reg, room, ttft in risky]
        ranked += [c for _, _, c in after]
        if config.late_binding and risky and not feasible and not ahead:
            # Nothing anywhere can take it well now: hold it while it could still meet its TTFT on
            # an engine that frees up (its prefill there alone), unless it never could (best effort).
            alone = min(own_cache.values(), default=math.inf)
            if alone <= config.ttft_slo_s:
                ranked[0] = replace(ranked[0], hold_s=config.ttft_slo_s - alone - request.waited_s)
                return ranked  # not sent: nothing to record or explain yet
        eid = ranked[0].engine if ranked else None
        if eid is not None:
            if request.prefix:
                self.index.record(request.prefix, eid)
            if self.log is not None or request.explain and ranked[0].predicted_ttft_s is None:
                predicted = self._predict(request, eid, engines, prompt, out, hits)
                if predicted is not None and self.log is not None:
                    self.log.append((request.key, eid, *predicted, now))
                if predicted is not None and ranked[0].predicted_ttft_s is None:
                    ranked[0] = replace(ranked[0], predicted_ttft_s=predicted[0])
        return ranked

    def observe_ttft(self, engine_id: str, predicted_s: float, measured_s: float) -> None:
        """A request sent to `engine_id` got its first token back `measured_s` engine seconds after
        the send; the policy had predicted `predicted_s` (the candidate's `predicted_ttft_s`)."""
        self.corrections.observe_ttft(engine_id, predicted_s, measured_s)

    def _predict(self, request: RoutedRequest, eid: str, engines: Sequence[EngineView], prompt: int, out: int,
                 hits: dict[str, int]) -> tuple[float, float] | None:  # fmt: skip
        """(TTFT, TPOT) predicted for the request on engine `eid`, as the decision saw it."""
        e = next(v for v in engines if v.id == eid)
        prof = e.profile
        if not isinstance(prof, EngineProfile):
            return None
        corr = self.corrections.observe(e)
        cached = min(prompt, hits.get(eid, 0) * request.prefix_block_tokens)
        queued = _queued(e, self.config)
        ttft, tpot, _, _ = estimate(prof, e.running, e.kv_usage * prof.capacity_tokens, queued,
                                    prof.prefill_s(prompt, cached), prompt - cached, prompt, out,
                                    e.rtt_s + ttft_offset(e, corr), corr.speed, corr.pace, _remaining(e))  # fmt: skip
        return ttft, tpot

    def _peer(self, region: RegionView, request: RoutedRequest, prompt: int, out: int, hits: dict[str, int],
              now: float, max_load: float | None = None) -> tuple[bool, float, float, Candidate] | None:  # fmt: skip
        """(feasible, score, load, candidate) of the best of a peer's summarised engines where the
        request fits: the least loaded feasible one, else the fewest expected misses. With `max_load`
        (a feasible local engine exists) only engines below it could win, so only those are scored;
        the others leave the peer a last resort, (False, inf, inf)."""
        need = request.need_tokens
        if not region.engines:
            if region.largest_free_tokens >= need:  # an older peer: no figures, a last resort
                return False, math.inf, math.inf, Candidate(region.key, None, region.largest_free_tokens)
            return None
        best: tuple[int, float, float, bool] | None = None
        per = request.prefix_block_tokens
        share = region.forwarded / len(region.engines)
        for e in region.engines:
            if e.free_tokens - e.pending_tokens < need:
                continue
            # _load, counting what this router forwarded there (shared over the summarised engines),
            # which the summary may not show yet
            load = math.inf
            if isinstance(e.profile, EngineProfile):
                load = (max(e.outstanding + share, e.running) + e.waiting + 1) * e.profile.q_rate
            if max_load is not None and load >= max_load:
                key = (1, math.inf, math.inf, False)
            else:
                ok, s, _, _ = self.score(e, prompt, min(prompt, hits.get(e.id, 0) * per), out, rtt_s=region.rtt_s,
                                         waited_s=request.waited_s)
                key = (0, load, s, True) if ok else (1, s, load, False)
            if best is None or key < best:
                best = key
        if best is None:
            return None
        ok = best[3]
        score, load = (best[2], best[1]) if ok else (best[1], best[2])
        return ok, score, load, Candidate(region.key, None, region.largest_free_tokens)
