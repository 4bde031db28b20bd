"""Baseline: the engine with the fewest requests in flight (Envoy LEAST_REQUEST, nginx least_conn)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.serving.router.policies._base import rank
from gpufleet.serving.router.policy import Candidate, EngineView, PolicyConfig, RegionView, RoutedRequest


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
        return rank(request, engines, regions, now, self.config, lambda e: e.outstanding + e.waiting)
