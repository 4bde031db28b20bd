"""Baseline `prefix-affinity`: vllm-router's `cache_aware` policy (vllm-project/router
src/policies/cache_aware.rs, from sglang's sgl-router; defaults cache_threshold 0.5,
balance_abs_threshold 32, balance_rel_threshold 1.0001). When the load is imbalanced (max - min >
32 and max > 1.0001 x min requests in flight) the least loaded engine; otherwise the engine whose
approximate cache (what was sent there) matches the longest prefix, when the match covers more than
half the prompt; otherwise the engine with the smallest tree (the fewest recent prompt tokens sent
there). The chosen engine's tree gets the prompt."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.serving.router.policies._base import prompt_tokens, rank
from gpufleet.serving.router.policy import Candidate, EngineView, PolicyConfig, RegionView, RoutedRequest
from gpufleet.serving.router.prefix import PrefixIndex

CACHE_THRESHOLD = 0.5
BALANCE_ABS, BALANCE_REL = 32, 1.0001
TREE_HALF_LIFE_S = 120.0  # the tree is pruned to a size limit in vllm-router; here its size decays


@dataclass
class PrefixAffinityPolicy:
    config: PolicyConfig = field(default_factory=PolicyConfig)
    name: str = "prefix-affinity"
    index: PrefixIndex = field(default_factory=PrefixIndex)
    _tree: dict[str, tuple[float, float]] = field(default_factory=dict)  # engine -> (tokens, at)

    def _size(self, eid: str, now: float) -> float:
        tokens, at = self._tree.get(eid, (0.0, now))
        return tokens * math.exp2(-(now - at) / TREE_HALF_LIFE_S)

    def choose(self, request: RoutedRequest, engines: Sequence[EngineView], regions: Sequence[RegionView],
               now: float) -> list[Candidate]:  # fmt: skip
        loads = [e.outstanding + e.waiting for e in engines]
        imbalanced = bool(loads) and max(loads) - min(loads) > BALANCE_ABS and max(loads) > min(loads) * BALANCE_REL
        prompt = prompt_tokens(request)
        hits = self.index.match(request.prefix) if request.prefix and not imbalanced else {}
        best = max(hits.values(), default=0)
        if imbalanced:

            def key(e: EngineView) -> float:
                return e.outstanding + e.waiting
        elif best * request.prefix_block_tokens > CACHE_THRESHOLD * prompt:

            def key(e: EngineView) -> float:
                return -hits.get(e.id, 0)
        else:

            def key(e: EngineView) -> float:
                return self._size(e.id, now)

        out = rank(request, engines, regions, now, self.config, key)
        if out and out[0].engine is not None:
            eid = out[0].engine
            if request.prefix:
                self.index.record(request.prefix, eid)
            self._tree[eid] = (self._size(eid, now) + prompt, now)
        return out
