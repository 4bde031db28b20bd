"""The project's first policy: fit by single-engine KV headroom, prefer local, cheaper tier, most
headroom (docs/router.md). Kept as a policy of its own beside the predicting default."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.serving.router.policy import (
    TIER_RANK,
    Candidate,
    EngineView,
    PolicyConfig,
    RegionView,
    RoutedRequest,
    _allowed_regions,
    _fresh_peers,
    _peer_candidates,
    _tie,
    engine_usable,
    headroom,
    saturated,
)


@dataclass
class HeadroomPolicy:
    """The project's policy: fit by single-engine headroom, prefer local, cheaper tier, most headroom."""

    config: PolicyConfig = field(default_factory=PolicyConfig)
    name: str = "headroom"

    def choose(
        self,
        request: RoutedRequest,
        engines: Sequence[EngineView],
        regions: Sequence[RegionView],
        now: float,
    ) -> list[Candidate]:
        # One pass over the engines, through the same `engine_usable` and `headroom` as everything else.
        allowed = _allowed_regions(request, regions)
        need = request.need_tokens
        config = self.config
        closed_regions = {k for k, r in allowed.items() if r.remote and not request.allow_remote}
        by_region: dict[str, list[tuple[float, str]]] = {}
        queued: dict[str, list[tuple[float, str]]] = {}  # fits, but saturated (queue or slow pace)
        totals: dict[str, float] = {}
        for e in engines:
            key = e.region
            if key not in allowed or key in closed_regions or not engine_usable(e, request):
                continue
            room = headroom(e, now, config)
            totals[key] = totals.get(key, 0.0) + room
            if room >= need:
                # A saturated engine (a waiting queue, or decoding slower than the pace limit) cannot
                # use what its free KV would hold: it fits only as a last resort, after every engine
                # and peer region with room to take the request now.
                group = queued if saturated(e.waiting, e.recent_itl_s, config) else by_region
                fits = group.get(key)
                if fits is None:
                    group[key] = [(room, e.id)]
                else:
                    fits.append((room, e.id))
        ranked: list[tuple[tuple, list[Candidate]]] = []
        for last, groups in ((False, by_region), (True, queued)):
            for key, fits in groups.items():
                region = allowed[key]
                order = (last, not region.local, TIER_RANK.get(region.tier, 9), -totals[key], key)
                ranked.append((order, [Candidate(key, eid, room) for room, eid in _by_room(fits, request)]))
        peers = _peer_candidates(request, allowed, set(totals), now, config)
        for region, free in peers:
            order = (False, not region.local, TIER_RANK.get(region.tier, 9), -free, region.key)
            ranked.append((order, [Candidate(region.key, None, region.largest_free_tokens)]))
        if request.allow_remote:
            # A peer whose engines are all saturated still serves as a last resort (its router ranks
            # its own saturated engines last, never refuses for it), e.g. to continue a stream when
            # this region's engines died: like a saturated local engine, after everything else.
            taken = set(totals) | {r.key for r, _ in peers}
            for region in _fresh_peers(allowed, taken, now, config):
                if region.largest_fit_tokens >= need:
                    order = (True, not region.local, TIER_RANK.get(region.tier, 9), -region.largest_fit_tokens,
                             region.key)  # fmt: skip
                    ranked.append((order, [Candidate(region.key, None, region.largest_fit_tokens)]))
        ranked.sort(key=lambda t: t[0])
        return [c for _, group in ranked for c in group]


def _by_room(fits: list[tuple[float, str]], request: RoutedRequest) -> list[tuple[float, str]]:
    """Most headroom first; equal headroom by the prefix-affinity tie-break (`_tie`), which is
    computed only for the engines that are tied."""
    fits.sort(key=lambda t: -t[0])  # stable: ties stay in engine order
    if request.affinity_key is None or len(fits) < 2:
        return fits
    out: list[tuple[float, str]] = []
    i, n = 0, len(fits)
    while i < n:
        j = i + 1
        while j < n and fits[j][0] == fits[i][0]:
            j += 1
        if j - i > 1:
            out.extend(sorted(fits[i:j], key=lambda t: _tie(request.affinity_key, t[1])))
        else:
            out.append(fits[i])
        i = j
    return out
