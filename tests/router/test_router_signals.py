"""The metrics parser against vLLM's exposition format: current and previous names, data parallel,
and garbage (which must raise MetricsError and nothing else)."""

from __future__ import annotations

import pytest
from gpufleet.serving.engine.metrics import EngineMetrics
from gpufleet.serving.engine.model import Engine, EngineConfig, Request
from gpufleet.serving.router.signals import EngineState, MetricsError, parse_metrics
from hypothesis import given, settings
from hypothesis import strategies as st

from .fixtures import CURRENT, DATA_PARALLEL, PREVIOUS


def test_current_names():
    s = parse_metrics(CURRENT, taken_at=10.0)
    assert (s.num_gpu_blocks, s.block_size) == (1000, 16)
    assert s.kv_usage == pytest.approx(0.25)
    assert s.free_tokens == pytest.approx(0.75 * 999 * 16)  # usage is over every block but the null one
    assert s.capacity_tokens == 999 * 16
    assert (s.running, s.waiting) == (7, 2)
    assert s.preemptions_total == 3
    assert (s.prefix_queries_total, s.prefix_hits_total) == (1000, 400)
    assert s.models == {"llama-3.1-8b"}
    assert s.taken_at == 10.0
    assert (s.itl_seconds_total, s.itl_tokens_total) == (4.0, 100.0)  # _sum and _count, not buckets


def test_previous_names_read_as_fallback():
    old, new = parse_metrics(PREVIOUS, 0.0), parse_metrics(CURRENT, 0.0)
    assert "inter_token" not in PREVIOUS and "kv_cache_usage_perc" not in PREVIOUS
    assert (old.free_tokens, old.prefix_hits_total) == (new.free_tokens, new.prefix_hits_total)
    assert (old.itl_seconds_total, old.itl_tokens_total) == (4.0, 100.0)


def test_current_name_wins_when_both_present():
    both = CURRENT + 'vllm:gpu_cache_usage_perc{engine="0",model_name="llama-3.1-8b"} 0.9\n'
    assert parse_metrics(both, 0.0).kv_usage == pytest.approx(0.25)


def test_data_parallel_cores_add_up():
    # Each core's cache_config_info says 200 blocks, the sum (as vLLM 0.11 labels it): 100 each.
    s = parse_metrics(DATA_PARALLEL, 0.0)
    assert s.free_tokens == pytest.approx(0.5 * 99 * 16 + 99 * 16)  # each core has its null block
    assert s.num_gpu_blocks == 200 and s.running == 4
    assert s.kv_usage == pytest.approx(0.25)


def test_four_data_parallel_cores_each_hold_a_quarter_of_the_reported_sum():
    usage = {"0": 0.5, "1": 0.0, "2": 1.0, "3": 0.25}
    text = "".join(
        f'vllm:kv_cache_usage_perc{{engine="{c}",model_name="m"}} {u}\n'
        f'vllm:cache_config_info{{block_size="16",engine="{c}",num_gpu_blocks="4000",extra="x"}} 1\n'
        for c, u in usage.items()
    )
    s = parse_metrics(text, 0.0)
    assert s.num_gpu_blocks == 4000 and s.capacity_tokens == 3999 * 16  # not 4 x 4000
    assert s.free_tokens == pytest.approx(sum(1 - u for u in usage.values()) * 999 * 16)
    # One engine core: the label is its own blocks.
    assert parse_metrics(text.split("vllm:kv_cache_usage_perc{engine=\"1\"")[0], 0.0).num_gpu_blocks == 4000


def test_free_tokens_read_from_an_engine_are_its_free_blocks_and_capacity_leaves_out_the_null_block():
    # The engine model's /metrics, read back by the router's parser: the headroom the router sees is
    # exactly the engine's free blocks, and its capacity the largest request that cannot stall it.
    engine = Engine(EngineConfig(num_gpu_blocks=65, max_model_len=2048, enable_prefix_caching=False))
    metrics = EngineMetrics(engine, "m")
    engine.add_request(Request("a", prompt_len=100, max_tokens=50, ignore_eos=True))
    engine.commit(plan := engine.schedule(0.0), plan.duration)
    s = parse_metrics(metrics.render(), 0.0)
    assert engine.num_free_blocks == 64 - 7  # 101 tokens in 16-token blocks
    assert s.free_tokens == pytest.approx(engine.num_free_blocks * 16)
    assert s.capacity_tokens == engine.stats().capacity_tokens == 64 * 16


def test_extra_labels_and_escapes_tolerated():
    text = CURRENT.replace('cache_dtype="auto"', 'cache_dtype="a\\"b,c=\\\\d"')
    assert parse_metrics(text, 0.0).num_gpu_blocks == 1000


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<html>502 Bad Gateway</html>",
        CURRENT.replace("vllm:cache_config_info", "vllm:other_info"),  # no cache config
        CURRENT.replace("vllm:kv_cache_usage_perc{", "vllm:unrelated{"),  # no usage
        CURRENT.replace("} 0.25", "} banana"),
        CURRENT.replace("} 0.25", "} NaN"),
        CURRENT.replace("} 0.25", "} 1.5"),  # out of range
        CURRENT.replace('num_gpu_blocks="1000"', 'num_gpu_blocks="lots"'),
        'vllm:cache_config_info{block_size="16,num_gpu_blocks="1"} 1\n',
    ],
)
def test_unusable_text_raises_metrics_error(text):
    with pytest.raises(MetricsError):
        parse_metrics(text, 0.0)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from('vlm:_kvcache{}="\\, \n0123.eE+-#abcdefgnpurst'), max_size=400))
def test_garbage_never_raises_anything_else(text):
    try:
        parse_metrics(text, 0.0)
    except MetricsError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(CURRENT)), st.text(max_size=20))
def test_corrupted_fixture_never_raises_anything_else(cut, junk):
    try:
        parse_metrics(CURRENT[:cut] + junk + CURRENT[cut:], 0.0)
    except MetricsError:
        pass


def test_rates_between_samples():
    state = EngineState("http://e")
    state.record(parse_metrics(CURRENT, 0.0))
    later = CURRENT.replace(
        'preemptions_total{engine="0",model_name="llama-3.1-8b"} 3.0',
        'preemptions_total{engine="0",model_name="llama-3.1-8b"} 7.0',
    )
    later = later.replace(
        'queries_total{engine="0",model_name="llama-3.1-8b"} 1000.0',
        'queries_total{engine="0",model_name="llama-3.1-8b"} 2000.0',
    )
    state.record(parse_metrics(later, 2.0))
    preempt, hit = state.rates()
    assert preempt == pytest.approx(2.0)
    assert hit == pytest.approx(0.0)
    state.fail("boom")
    assert not state.healthy and state.sample is not None


def _itl(text: str, seconds: float, tokens: float, running: int = 7) -> str:
    text = text.replace("inter_token_latency_seconds_sum{engine=\"0\",model_name=\"llama-3.1-8b\"} 4.0",
                        f"inter_token_latency_seconds_sum{{engine=\"0\",model_name=\"llama-3.1-8b\"}} {seconds}")
    text = text.replace("inter_token_latency_seconds_count{engine=\"0\",model_name=\"llama-3.1-8b\"} 100.0",
                        f"inter_token_latency_seconds_count{{engine=\"0\",model_name=\"llama-3.1-8b\"}} {tokens}")
    return text.replace("num_requests_running{engine=\"0\",model_name=\"llama-3.1-8b\"} 7.0",
                        f"num_requests_running{{engine=\"0\",model_name=\"llama-3.1-8b\"}} {running}")


def test_recent_decode_pace_between_samples():
    """The pace is the histogram's mean over the window between two scrapes, not since start."""
    state = EngineState("http://e")
    state.record(parse_metrics(CURRENT, 0.0))
    assert state.recent_itl_s is None  # one sample: no window yet
    state.record(parse_metrics(_itl(CURRENT, 4.0 + 2.4, 100 + 30), 1.0))
    assert state.recent_itl_s == pytest.approx(0.08)  # 2.4 s over 30 tokens; the lifetime mean is 0.049
    # No token since, requests still running (a long step, or a stall): the last pace stands.
    state.record(parse_metrics(_itl(CURRENT, 6.4, 130), 2.0))
    assert state.recent_itl_s == pytest.approx(0.08)
    # Idle: no pace at all.
    state.record(parse_metrics(_itl(CURRENT, 6.4, 130, running=0), 3.0))
    assert state.recent_itl_s is None
    # The engine restarted (counters went back): no pace until the next window.
    state.record(parse_metrics(_itl(CURRENT, 0.5, 10), 4.0))
    assert state.recent_itl_s is None
    state.record(parse_metrics(_itl(CURRENT, 0.7, 20), 5.0))
    assert state.recent_itl_s == pytest.approx(0.02)
