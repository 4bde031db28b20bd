"""How many engines this region's current demand needs: `GET /scale`, what KEDA's metrics-api
scaler reads (valueLocation `desired_engines`, targetValue 1).

    demand (tokens)  = KV in use on the local engines (healthy, fresh samples)
                     + their waiting queues (num_requests_waiting x the policy's tokens per request)
                     + what this router holds in its own queue (the requests' prompt + max_tokens)
                     + what it could not place locally in the last UNMET_WINDOW_S: the peak of the
                       demand it had forwarded to peers at once, and the most it refused (429) in
                       one UNMET_SLOT_S slot
                     + a share of what the PEERS refused (their summaries' `unmet_tokens`, split
                       evenly over the regions), so a region idle at zero warms up when the rest
                       of the fleet runs out of room, although DNS does not send it clients then
    capacity per engine = num_gpu_blocks x block_size as the engines report it (their mean), or,
                       before any engine has reported, the fleet's sizing of one engine
                       (serving/sizing.py, `config.engine_tokens_estimate`)
    desired_engines  = ceil(demand / (capacity per engine x TARGET_FILL)),
                       at least 1 while anything is queued, spilled or refused; 0 when idle.

Peaks rather than sums over the window: a client that retries every second after a 429 is one
client's demand, not sixty, and a request forwarded for a minute counts once.

Computed when read, from state the router keeps anyway. The request path pays only on the paths
that already mean "no local room": a spill (one dict entry while it is in flight) and a 429 (one
addition).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from gpufleet.serving.router.admin import authorize
from gpufleet.serving.router.errors import HttpError

if TYPE_CHECKING:
    from gpufleet.serving.router.gateway import Router

SCALE_PATH = "/scale"
TARGET_FILL = 0.75  # an engine counts as full at this share of its KV cache: room for bursts and growth
UNMET_WINDOW_S = 60.0  # how long spilled and refused demand keeps asking for engines
UNMET_SLOT_S = 1.0


@dataclass(frozen=True, slots=True)
class ScaleInputs:
    kv_in_use_tokens: float
    waiting_tokens: float
    queued_tokens: float
    spilled_tokens: float
    refused_tokens: float
    capacity_per_engine_tokens: float | None  # None: unknown (no engine reported, no estimate)
    peer_unmet_tokens: float = 0.0  # this region's share of what its peers had to refuse

    @property
    def demand_tokens(self) -> float:
        return (
            self.kv_in_use_tokens
            + self.waiting_tokens
            + self.queued_tokens
            + self.spilled_tokens
            + self.refused_tokens
            + self.peer_unmet_tokens
        )

    @property
    def unmet(self) -> bool:
        """Some demand found no room (queued, spilled or refused here, or refused by a peer)."""
        return (
            self.queued_tokens > 0
            or self.spilled_tokens > 0
            or self.refused_tokens > 0
            or self.peer_unmet_tokens > 0
        )


def desired_engines(inputs: ScaleInputs, target_fill: float = TARGET_FILL) -> int:
    demand = inputs.demand_tokens
    cap = inputs.capacity_per_engine_tokens
    if demand <= 0:
        return 1 if inputs.unmet else 0
    if not cap or cap <= 0:
        return 1  # demand, but no idea of an engine's size: ask for one, it will report its own
    # The small epsilon keeps float noise (e.g. 2.0000000001) from asking for an extra engine.
    return max(1, math.ceil(demand / (cap * target_fill) - 1e-9))


class UnmetDemand:
    """Demand this region could not take locally, remembered for `window_s`.

    Spills are tracked while in flight (`spill_started` / `spill_ended`, by the attempt's key); each
    slot of `slot_s` keeps the peak of the tokens in flight to peers during it and the sum of the
    tokens refused in it. `peaks(now)` gives the largest of each over the window. Pure: time is passed
    in; at most window_s / slot_s + 1 slots are kept.
    """

    __slots__ = ("window_s", "slot_s", "_slots", "_spilling", "spilling_tokens")

    def __init__(self, window_s: float = UNMET_WINDOW_S, slot_s: float = UNMET_SLOT_S) -> None:
        self.window_s = window_s
        self.slot_s = slot_s
        self._slots: deque[list[float]] = deque()  # [slot index, peak spilled in flight, refused]
        self._spilling: dict[object, float] = {}
        self.spilling_tokens = 0.0

    def _first_kept(self, now: float) -> int:
        return math.floor(now / self.slot_s) - math.ceil(self.window_s / self.slot_s)

    def _slot(self, now: float) -> list[float]:
        index = math.floor(now / self.slot_s)
        slots = self._slots
        if slots and slots[-1][0] == index:
            return slots[-1]
        first = self._first_kept(now)
        while slots and slots[0][0] < first:
            slots.popleft()
        slot = [index, self.spilling_tokens, 0.0]
        slots.append(slot)
        return slot

    def spill_started(self, key: object, tokens: float, now: float) -> None:
        self._spilling[key] = tokens
        self.spilling_tokens += tokens
        slot = self._slot(now)
        slot[1] = max(slot[1], self.spilling_tokens)

    def spill_ended(self, key: object, now: float) -> None:
        tokens = self._spilling.pop(key, None)
        if tokens is None:
            return
        slot = self._slot(now)
        slot[1] = max(slot[1], self.spilling_tokens)  # it was in flight during this slot
        self.spilling_tokens = self.spilling_tokens - tokens if self._spilling else 0.0

    def refused(self, tokens: float, now: float) -> None:
        self._slot(now)[2] += tokens

    def peaks(self, now: float) -> tuple[float, float]:
        """(spilled, refused) tokens: the peak forwarded to peers at once (in flight now included)
        and the most refused in one slot, over the last window."""
        first = self._first_kept(now)
        spilled, refused = self.spilling_tokens, 0.0
        for index, peak, ref in self._slots:
            if index >= first:
                spilled = max(spilled, peak)
                refused = max(refused, ref)
        return spilled, refused


def peer_unmet_share(router: Router, now: float) -> float:
    """This region's even share of the demand its peers refused (fresh summaries only); none while
    this region is drained."""
    if router.region in router.drained_regions:
        return 0.0
    stale = router.policy_config.stale_after_s
    summaries = [d for received, d in router.peer_summaries.values() if now - received <= stale]
    refused = sum(float(d.get("unmet_tokens") or 0.0) for d in summaries)
    return refused / (len(summaries) + 1) if refused > 0 else 0.0


def scale_inputs(router: Router, now: float) -> tuple[ScaleInputs, dict[str, Any]]:
    """The inputs of `desired_engines` from the router's state, and facts to show beside them."""
    config = router.policy_config
    in_use = waiting = 0.0
    capacities: list[int] = []
    fresh = 0
    for st in router.scraper.engines.values():
        s = st.sample
        if s is None:
            continue
        if s.capacity_tokens > 0:
            capacities.append(s.capacity_tokens)
        if st.healthy and now - s.taken_at <= config.stale_after_s:
            fresh += 1
            in_use += max(0.0, s.capacity_tokens - s.free_tokens)
            waiting += s.waiting * config.waiting_request_tokens
    if capacities:
        capacity: float | None = sum(capacities) / len(capacities)
        source = "engines"
    elif router.config.engine_tokens_estimate:
        capacity = float(router.config.engine_tokens_estimate)
        source = "fleet sizing"
    else:
        capacity, source = None, "unknown"
    spilled, refused = router.unmet.peaks(now)
    inputs = ScaleInputs(
        peer_unmet_tokens=peer_unmet_share(router, now),
        kv_in_use_tokens=in_use,
        waiting_tokens=waiting,
        queued_tokens=float(router.queued_tokens),
        spilled_tokens=spilled,
        refused_tokens=refused,
        capacity_per_engine_tokens=capacity,
    )
    facts = {
        "engines": len(router.scraper.engines),
        "engines_reporting": fresh,
        "queued_requests": router.queued,
        "capacity_source": source,
    }
    return inputs, facts


def scale_report(router: Router, now: float) -> dict[str, Any]:
    inputs, facts = scale_inputs(router, now)
    cap = inputs.capacity_per_engine_tokens
    return {
        "region": router.region,
        "desired_engines": desired_engines(inputs),
        "demand_tokens": round(inputs.demand_tokens),
        "kv_in_use_tokens": round(inputs.kv_in_use_tokens),
        "waiting_tokens": round(inputs.waiting_tokens),
        "queued_tokens": round(inputs.queued_tokens),
        "spilled_tokens": round(inputs.spilled_tokens),
        "refused_tokens": round(inputs.refused_tokens),
        "peer_unmet_tokens": round(inputs.peer_unmet_tokens),
        "capacity_per_engine_tokens": None if cap is None else round(cap),
        "target_fill": TARGET_FILL,
        "window_s": router.unmet.window_s,
        "drained": router.region in router.drained_regions,
        **facts,
    }


def add_routes(app: web.Application, router: Router) -> None:
    token = router.config.admin_token

    async def scale(request: web.Request) -> web.Response:
        try:
            authorize(request, token)
        except HttpError as exc:
            return exc.response()
        return web.json_response(scale_report(router, router.clock()))

    app.router.add_get(SCALE_PATH, scale)
