"""Baseline: every usable engine in turn (nginx / Kubernetes Service style round-robin)."""

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
class RoundRobinPolicy:
    """Baseline: every usable engine in turn, ignoring headroom (local region first, then peers)."""

    config: PolicyConfig = field(default_factory=PolicyConfig)
    name: str = "round-robin"
    _turn: int = 0

    def choose(
        self,
        request: RoutedRequest,
        engines: Sequence[EngineView],
        regions: Sequence[RegionView],
        now: float,
    ) -> list[Candidate]:
        allowed = _allowed_regions(request, regions)
        usable = _usable_engines(request, engines, allowed)
        out: list[Candidate] = []
        if usable:
            start = self._turn % len(usable)
            self._turn += 1
            rotated = usable[start:] + usable[:start]
            out = [Candidate(e.region, e.id, headroom(e, now, self.config)) for e in rotated]
        seen = {e.region for e in usable}
        out += [
            Candidate(r.key, None, r.largest_free_tokens)
            for r, _ in _peer_candidates(request, allowed, seen, now, self.config)
        ]
        return out
