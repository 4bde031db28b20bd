"""Baseline `power-of-two`: two engines at random, the less loaded first (Mitzenmacher's "power of
two choices"; vllm-router `--policy power_of_two`, vllm-project/router src/policies/power_of_two.rs,
which compares the two workers' loads). Load: requests in flight from this router plus the engine's
reported waiting queue. The rest follow by load, for retries."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.serving.router.policies._base import rank
from gpufleet.serving.router.policy import Candidate, EngineView, PolicyConfig, RegionView, RoutedRequest, load_order


@dataclass
class PowerOfTwoPolicy:
    config: PolicyConfig = field(default_factory=PolicyConfig)
    name: str = "power-of-two"
    _rng: random.Random | None = None

    def choose(self, request: RoutedRequest, engines: Sequence[EngineView], regions: Sequence[RegionView],
               now: float) -> list[Candidate]:  # fmt: skip
        if self._rng is None:
            self._rng = random.Random(self.config.seed ^ 0x2C)
        out = rank(request, engines, regions, now, self.config, load_order)
        local = [i for i, c in enumerate(out) if c.engine is not None]
        if len(local) >= 2:
            i, j = sorted(self._rng.sample(local, 2))  # out is in load order: i is the lighter
            out = [out[i], out[j]] + [c for k, c in enumerate(out) if k not in (i, j)]
        return out
