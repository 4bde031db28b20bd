"""Small engines for scheduler tests: a handful of blocks so that pressure is easy to build."""

from __future__ import annotations

import pytest
from gpufleet.serving.engine.model import Engine, EngineConfig, Request, leak_check


def small_engine(blocks: int = 33, seqs: int = 8, budget: int = 64, caching: bool = True, **kw) -> Engine:
    cfg = EngineConfig(
        num_gpu_blocks=blocks,
        max_num_seqs=seqs,
        max_num_batched_tokens=budget,
        enable_prefix_caching=caching,
        max_model_len=kw.pop("max_model_len", 2048),
        **kw,
    )
    return Engine(cfg)


def run_to_end(engine: Engine, now: float = 0.0, max_steps: int = 1, check=leak_check, limit: int = 100_000):
    """Step until idle, checking the block accounting after every step; returns (now, plans)."""
    plans = []
    for _ in range(limit):
        plan = engine.schedule(now, max_steps)
        if plan is None:
            assert not engine.has_work(), "work left but nothing schedulable"
            return now, plans
        now += plan.duration
        engine.commit(plan, now)
        plans.append(plan)
        if check:
            check(engine)
    raise AssertionError("did not finish")


def req(rid: str, prompt_len: int, max_tokens: int, **kw) -> Request:
    return Request(rid, prompt_len=prompt_len, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture
def engine_factory():
    return small_engine
