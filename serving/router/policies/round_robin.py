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
    _usable_engines,
    ranked_engines,
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
        if usable:
            start = self._turn % len(usable)
            self._turn += 1
            usable = usable[start:] + usable[:start]
        # the rotation is the order (a stable sort on a constant key keeps it), then peer regions
        return ranked_engines(request, usable, lambda e: 0, allowed, now, self.config)
