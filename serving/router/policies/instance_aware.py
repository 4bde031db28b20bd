"""Baseline `instance-aware`: least load per unit of a per-GPU-type target rate (SkyServe's
`instance_aware_least_load` policy, skypilot sky/serve/load_balancing_policies.py: requests in
flight on a replica divided by the target QPS its accelerator is given in the service spec). SkyServe
takes the target rates by hand; here they are the GPU's dense bf16 FLOP/s x TP from the catalog,
the figure an operator would copy from a data sheet (an engine without a profile counts as 1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.serving.router.policies._base import rank
from gpufleet.serving.router.policy import Candidate, EngineView, PolicyConfig, RegionView, RoutedRequest
from gpufleet.serving.router.predict import EngineProfile

REFERENCE_FLOPS = 989e12  # an H100's dense bf16: target rates are relative to it


def _load(e: EngineView) -> float:
    rate = e.profile.flops_s / REFERENCE_FLOPS if isinstance(e.profile, EngineProfile) else 1.0
    return (e.outstanding + e.waiting) / rate


@dataclass
class InstanceAwarePolicy:
    config: PolicyConfig = field(default_factory=PolicyConfig)
    name: str = "instance-aware"

    def choose(self, request: RoutedRequest, engines: Sequence[EngineView], regions: Sequence[RegionView],
               now: float) -> list[Candidate]:  # fmt: skip
        return rank(request, engines, regions, now, self.config, _load)
