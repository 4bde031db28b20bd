"""The scheduler and KV block manager on hand-built scenarios (vLLM V1 semantics, model.py)."""

from __future__ import annotations

import pytest
from gpufleet.serving.engine import tokenizer as tk
from gpufleet.serving.engine.model import Request, leak_check
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import req, run_to_end, small_engine


def test_usage_is_one_minus_free_over_blocks_minus_null():
    e = small_engine(blocks=11)
    assert e.pool.total == 10 and e.kv_cache_usage == 0.0
    e.add_request(req("a", 40, 4))  # 40 tokens -> 3 blocks
    plan = e.schedule(0.0)
    assert plan.scheduled[0][1] == 40
    assert e.num_free_blocks == 7
    assert abs(e.kv_cache_usage - 0.3) < 1e-12
    leak_check(e)


def test_chunked_prefill_respects_the_token_budget_and_decode_goes_first():
    e = small_engine(blocks=200, budget=48, seqs=8)
    e.add_request(req("a", 100, 3))
    e.add_request(req("b", 30, 3))
    now, plans = 0.0, []
    while e.has_work():
        plan = e.schedule(now)
        assert plan.num_tokens <= 48
        plans.append([(r.request_id, n) for r, n in plan.scheduled])
        now += plan.duration
        e.commit(plan, now)
        leak_check(e)
    assert plans[0] == [("a", 48)]
    assert plans[1] == [("a", 48)]
    assert plans[2] == [("a", 4), ("b", 30)]  # a's last chunk, then b fills the budget
    assert plans[3] == [("a", 1), ("b", 1)]  # both decode; the running (older) request first


def test_max_num_seqs_caps_the_batch():
    e = small_engine(blocks=200, budget=1000, seqs=2)
    for i in range(4):
        e.add_request(req(f"r{i}", 20, 5))
    plan = e.schedule(0.0)
    assert [r.request_id for r, _ in plan.scheduled] == ["r0", "r1"]
    assert e.num_running == 2 and e.num_waiting == 2


def test_preemption_exactly_when_a_decode_cannot_get_a_block_and_the_victim_is_recomputed():
    # 6 usable blocks of 16 tokens. a and b each take 3 blocks for a 48-token prompt; their first
    # decode token (the 49th) needs a 4th block each and there is none.
    e = small_engine(blocks=7, budget=512, seqs=8)
    a = e.add_request(req("a", 48, 5))
    b = e.add_request(req("b", 48, 5))
    plan = e.schedule(0.0)
    assert e.num_free_blocks == 0 and len(plan.scheduled) == 2
    e.commit(plan, 1.0)  # both prefilled, one token each; next step each needs a block
    assert a.num_output_tokens == 1 and b.num_output_tokens == 1 and e.num_preemptions == 0
    plan = e.schedule(1.0)
    # a (oldest) needs a block: none free, so the NEWEST running request (b) is preempted
    assert e.num_preemptions == 1
    assert b.status == "waiting" and b.num_computed_tokens == 0 and not b.blocks
    assert e.waiting[0] is b  # front of the queue
    assert [r.request_id for r, _ in plan.scheduled] == ["a"]
    leak_check(e)
    e.commit(plan, 2.0)
    now = 2.0
    while True:  # step until b is scheduled again
        queries_before, hits_before = e.prefix_cache_queries, e.prefix_cache_hits
        plan = e.schedule(now)
        mine = [n for r, n in plan.scheduled if r is b]
        if mine:
            break
        now += plan.duration
        e.commit(plan, now)
    # b is recomputed: its prompt AND its output token (49 tokens), less any surviving cached blocks
    assert b.num_tokens == 49
    assert mine[0] == 49 - b.num_computed_tokens and b.num_computed_tokens % 16 == 0
    # a preempted request's lookup counts like any other (vllm/v1/core/kv_cache_manager.py at
    # v0.11.0: get_computed_blocks adds num_tokens and the hit to PrefixCacheStats every call)
    assert e.prefix_cache_queries == queries_before + 49
    assert e.prefix_cache_hits == hits_before + b.num_computed_tokens
    now += plan.duration
    e.commit(plan, now)
    run_to_end(e, now)
    assert a.finish_reason == b.finish_reason == "length"
    assert b.num_output_tokens == 5 and b.num_preemptions == 1


def test_no_preemption_when_a_block_is_free():
    e = small_engine(blocks=9, budget=512)
    e.add_request(req("a", 48, 5))
    e.add_request(req("b", 48, 5))
    run_to_end(e)
    assert e.num_preemptions == 0


def test_a_lone_request_that_cannot_grow_preempts_itself_and_waits():
    e = small_engine(blocks=4, budget=512, max_model_len=64)  # 3 usable blocks = 48 tokens
    e.add_request(req("a", 48, 8))
    plan = e.schedule(0.0)
    e.commit(plan, 0.1)
    plan = e.schedule(0.1)  # decode needs a 4th block: a is its own victim
    assert plan is None or not plan.scheduled
    assert e.num_preemptions == 1 and e.waiting[0].request_id == "a"
    leak_check(e)


@pytest.mark.parametrize("caching", [True, False])
def test_a_request_fits_while_its_computed_tokens_fit_the_usable_blocks_and_one_past_stalls_for_good(caching):
    # 4 usable blocks = 64 tokens. The last output token's KV is never computed, so prompt + output
    # may be 65. At 66 the request preempts itself near its end and never gets back in: vLLM's
    # scheduler does the same (vllm-project/vllm#35541), which is why the router's capacity is the
    # usable blocks (signals.Sample.capacity_tokens) and nothing larger is sent.
    fits = small_engine(blocks=5, budget=512, max_model_len=128, caching=caching)
    fits.add_request(req("a", 40, 25))
    run_to_end(fits)
    assert fits.num_preemptions == 0 and fits.stats().capacity_tokens == 64
    stalls = small_engine(blocks=5, budget=512, max_model_len=128, caching=caching)
    stalls.add_request(req("a", 40, 26))
    now = 0.0
    while (plan := stalls.schedule(now)) is not None:
        now += plan.duration
        stalls.commit(plan, now)
    assert stalls.num_preemptions == 1 and stalls.has_work() and stalls.num_running == 0
    assert stalls.schedule(now + 1.0) is None and stalls.num_free_blocks == 4  # free, yet never taken
    leak_check(stalls)


def test_prefix_hits_are_full_blocks_capped_at_prompt_len_minus_one_and_counted_in_tokens():
    e = small_engine(blocks=64, budget=1024)
    prompt = list(range(1000, 1064))  # 64 tokens = 4 full blocks
    first = e.add_request(Request("a", prompt_token_ids=prompt, max_tokens=2, ignore_eos=True))
    run_to_end(e)
    assert (e.prefix_cache_queries, e.prefix_cache_hits) == (64, 0)
    assert first.num_cached_tokens == 0
    # the same prompt: only 3 blocks may hit (cap at 63 tokens), the last block is recomputed
    same = e.add_request(Request("b", prompt_token_ids=prompt, max_tokens=2, ignore_eos=True))
    run_to_end(e)
    assert same.num_cached_tokens == 48
    assert (e.prefix_cache_queries, e.prefix_cache_hits) == (128, 48)
    # a prompt sharing 40 tokens: 2 full blocks (32 tokens) hit; partial blocks never do
    other = prompt[:40] + list(range(5000, 5030))
    third = e.add_request(Request("c", prompt_token_ids=other, max_tokens=2, ignore_eos=True))
    run_to_end(e)
    assert third.num_cached_tokens == 32
    assert (e.prefix_cache_queries, e.prefix_cache_hits) == (128 + 70, 48 + 32)


def test_prefix_hits_through_the_tokenizer_on_text_that_shares_a_prefix():
    e = small_engine(blocks=256, budget=4096)
    system = "You are a helpful assistant. " * 20
    a = e.add_request(Request("a", prompt_token_ids=tk.encode(system + "What is a GPU?"), max_tokens=3))
    run_to_end(e)
    b = e.add_request(Request("b", prompt_token_ids=tk.encode(system + "Why is the sky blue?"), max_tokens=3))
    run_to_end(e)
    shared = len(tk.encode(system))
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens >= (shared // 16 - 1) * 16 > 0


def test_lru_eviction_takes_the_oldest_free_cached_blocks_first():
    e = small_engine(blocks=9, budget=1024)  # 8 usable blocks
    old = list(range(100, 132))  # 2 blocks
    new = list(range(200, 232))
    e.add_request(Request("old", prompt_token_ids=old + [1], max_tokens=1, ignore_eos=True))
    run_to_end(e)
    e.add_request(Request("new", prompt_token_ids=new + [1], max_tokens=1, ignore_eos=True))
    run_to_end(e)
    assert len(e.pool.cached) == 4
    # a request needing 6 fresh blocks: evicts from the LRU head; the 'new' blocks must survive
    e.add_request(Request("big", prompt_token_ids=list(range(300, 380)), max_tokens=1, ignore_eos=True))
    run_to_end(e)
    again = e.add_request(Request("new2", prompt_token_ids=new + [2], max_tokens=1, ignore_eos=True))
    run_to_end(e)
    assert again.num_cached_tokens == 32


def test_decode_windows_match_single_steps_exactly():
    def scenario(max_steps):
        e = small_engine(blocks=40, budget=64, seqs=6)
        reqs = [e.add_request(req(f"r{i}", 20 + 13 * i, 30 + 7 * i)) for i in range(6)]
        now, _ = run_to_end(e, max_steps=max_steps)
        return now, [(r.first_token_time, r.finish_time, r.num_preemptions) for r in reqs], e.num_preemptions

    t1, per1, p1 = scenario(1)
    t2, per2, p2 = scenario(64)
    assert p1 == p2
    assert abs(t1 - t2) < 1e-9
    for x, y in zip(per1, per2, strict=True):
        assert abs(x[0] - y[0]) < 1e-9 and abs(x[1] - y[1]) < 1e-9 and x[2] == y[2]


mixes = st.lists(
    st.tuples(st.integers(1, 120), st.integers(1, 40), st.integers(0, 3), st.integers(0, 5)),
    min_size=1,
    max_size=14,
)


@settings(max_examples=60, deadline=None)
@given(mixes, st.sampled_from([1, 16]), st.booleans())
def test_blocks_never_leak_over_random_request_mixes(mix, max_steps, caching):
    """free + used == total and the refcounts match the live requests after EVERY step."""
    e = small_engine(blocks=24, budget=48, seqs=5, caching=caching, max_model_len=256)
    shared = list(range(7000, 7100))
    pending = []
    for i, (plen, out, share, delay) in enumerate(mix):
        prompt = shared[: min(plen, share * 16)] + [50_000 + i * 1000 + j for j in range(plen)]
        prompt = prompt[:plen] if share == 0 else prompt[: max(plen, 1)]
        pending.append((delay, Request(f"r{i}", prompt_token_ids=prompt, max_tokens=out, ignore_eos=True)))
    now, step = 0.0, 0
    finished = 0
    while pending or e.has_work():
        for item in [p for p in pending if p[0] <= step]:
            pending.remove(item)
            e.add_request(item[1], now)
        plan = e.schedule(now, max_steps)
        step += 1
        if plan is None:
            leak_check(e)
            continue
        assert plan.num_tokens <= 48
        now += plan.duration
        finished += len(e.commit(plan, now))
        leak_check(e)
        assert step < 20_000
    assert finished == len(mix)
    assert e.num_free_blocks == e.pool.total  # everything back (cached blocks count as free)
    assert e.kv_cache_usage == 0.0


def test_a_head_that_does_not_fit_is_looked_up_every_step_in_windows_too():
    """vllm/v1/core/sched/scheduler.py at v0.11.0 calls get_computed_blocks for the waiting head
    each step before allocate_slots fails, and kv_cache_manager.py counts each call; a decode window
    counts its steps' lookups alike."""

    def scenario(max_steps: int) -> tuple[int, int, int]:
        e = small_engine(blocks=10, budget=512, seqs=8)  # 9 usable blocks
        a_ids = list(range(3000, 3100))  # 7 blocks, 8 once its 20 tokens are out
        e.add_request(Request("a", prompt_token_ids=a_ids, max_tokens=20, ignore_eos=True))
        b_ids = a_ids[:32] + list(range(9000, 9040))  # 72 tokens: 5 blocks, 2 of them a's; 2 are free
        b = e.add_request(Request("b", prompt_token_ids=b_ids, max_tokens=2, ignore_eos=True))
        _, plans = run_to_end(e, max_steps=max_steps)
        assert b.num_cached_tokens == 32
        return e.prefix_cache_queries, e.prefix_cache_hits, len(plans)

    by_step = scenario(1)
    # a's 100 once; b's 72 (32 found) in each of a's 20 steps and when it gets in
    assert by_step[:2] == (100 + 21 * 72, 21 * 32)
    windowed = scenario(64)
    assert windowed[:2] == by_step[:2] and windowed[2] < by_step[2]
