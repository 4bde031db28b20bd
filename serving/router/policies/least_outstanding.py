"""Baseline: the engine with the fewest requests in flight (Envoy LEAST_REQUEST, nginx least_conn)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.serving.router.policy import (
    Candidate,
    EngineView,
    PolicyConfig,
    RegionView,
    RoutedRequest,
    _allowed_regions,
    _peer_candidates,
    _usable_engines,
    headroom,
)


@dataclass
class LeastOutstandingPolicy:
    """Baseline: the engine with the fewest requests in flight (ours, plus its reported queue)."""

    config: PolicyConfig = field(default_factory=PolicyConfig)
    name: str = "least-outstanding"

    def choose(
        self,
        request: RoutedRequest,
        engines: Sequence[EngineView],
        regions: Sequence[RegionView],
        now: float,
    ) -> list[Candidate]:
        allowed = _allowed_regions(request, regions)
        usable = _usable_engines(request, engines, allowed)
        usable.sort(key=lambda e: (e.outstanding + e.waiting, not allowed[e.region].local, e.id))
        out = [Candidate(e.region, e.id, headroom(e, now, self.config)) for e in usable]
        seen = {e.region for e in usable}
        out += [
            Candidate(r.key, None, r.largest_free_tokens)
            for r, _ in _peer_candidates(request, allowed, seen, now, self.config)
        ]
        return out
