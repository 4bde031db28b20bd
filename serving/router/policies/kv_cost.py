"""Baseline `kv-cost`: NVIDIA Dynamo's KV-aware router cost, in KV blocks (ai-dynamo/dynamo
lib/llm/src/kv_router/scheduler.rs, DefaultWorkerSelector: logit = overlap_score_weight x prefill
blocks + decode blocks, the lowest wins; weight 1.0 by default). Prefill blocks: the request's
prompt blocks not already cached on the worker (this router's prefix index, as Dynamo's radix tree
of KV events) plus the prefill queued there; decode blocks: the worker's active blocks (KV in use
plus what was routed since the sample) plus the request's own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.serving.router.policies._base import prompt_tokens, rank
from gpufleet.serving.router.policy import Candidate, EngineView, PolicyConfig, RegionView, RoutedRequest
from gpufleet.serving.router.prefix import PrefixIndex

OVERLAP_WEIGHT = 1.0
BLOCK = 16  # vLLM's KV block: Dynamo counts in the engine's blocks


@dataclass
class KvCostPolicy:
    config: PolicyConfig = field(default_factory=PolicyConfig)
    name: str = "kv-cost"
    index: PrefixIndex = field(default_factory=PrefixIndex)

    def choose(self, request: RoutedRequest, engines: Sequence[EngineView], regions: Sequence[RegionView],
               now: float) -> list[Candidate]:  # fmt: skip
        prompt = prompt_tokens(request)
        out_tokens = max(0, request.need_tokens - prompt)
        hits = self.index.match(request.prefix) if request.prefix else {}
        per = request.prefix_block_tokens

        def cost(e: EngineView) -> float:
            cached = min(prompt, hits.get(e.id, 0) * per)
            prefill = (prompt - cached + e.pending_prefill_tokens) / BLOCK
            active = (e.kv_usage * e.capacity_tokens + e.pending_tokens + prompt + out_tokens) / BLOCK
            return OVERLAP_WEIGHT * prefill + active

        out = rank(request, engines, regions, now, self.config, cost)
        if request.prefix and out and out[0].engine is not None:
            self.index.record(request.prefix, out[0].engine)
        return out
