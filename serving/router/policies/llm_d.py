"""Baseline `llm-d`: llm-d's inference scheduler with its chart's default scorers and weights
(llm-d/llm-d-inference-scheduler, the `default` scheduling profile: queue-scorer weight 2,
kv-cache-utilization-scorer 2, prefix-cache-scorer 3; max-score picker). Queue score: (max queue -
queue) / (max - min) over the candidates (1 when all equal), queue = the engine's waiting requests
plus what this router sent since its sample; KV score: 1 - KV usage (with the router's pending
demand); prefix score: the fraction of the prompt's blocks this router sent to that engine before
(the scorer's approximate prefix index). The pool is the request's reach: one region, or all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.serving.router.policies._base import rank
from gpufleet.serving.router.policy import Candidate, EngineView, PolicyConfig, RegionView, RoutedRequest
from gpufleet.serving.router.prefix import PrefixIndex

QUEUE_WEIGHT, KV_WEIGHT, PREFIX_WEIGHT = 2.0, 2.0, 3.0


@dataclass
class LlmdPolicy:
    config: PolicyConfig = field(default_factory=PolicyConfig)
    name: str = "llm-d"
    index: PrefixIndex = field(default_factory=PrefixIndex)

    def choose(self, request: RoutedRequest, engines: Sequence[EngineView], regions: Sequence[RegionView],
               now: float) -> list[Candidate]:  # fmt: skip
        hits = self.index.match(request.prefix) if request.prefix else {}
        blocks = len(request.prefix)
        queues = {e.id: e.waiting + e.outstanding for e in engines}
        lo, hi = (min(queues.values()), max(queues.values())) if queues else (0, 0)

        def score(e: EngineView) -> float:
            q = 1.0 if hi == lo else (hi - queues[e.id]) / (hi - lo)
            cap = e.capacity_tokens or 1.0
            kv = 1.0 - min(1.0, e.kv_usage + e.pending_tokens / cap)
            pre = hits.get(e.id, 0) / blocks if blocks else 0.0
            return -(QUEUE_WEIGHT * q + KV_WEIGHT * kv + PREFIX_WEIGHT * pre)

        out = rank(request, engines, regions, now, self.config, score)
        if request.prefix and out and out[0].engine is not None:
            self.index.record(request.prefix, out[0].engine)
        return out
