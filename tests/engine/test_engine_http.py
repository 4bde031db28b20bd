"""The HTTP face: vLLM's metrics (scraped with prometheus_client's parser), the openai client,
errors, and the fault admin API. Real sockets on 127.0.0.1, time-scaled."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from gpufleet.serving.engine.model import EngineConfig
from gpufleet.serving.engine.server import run_emulator_in_thread
from prometheus_client.parser import text_string_to_metric_families

from .http_util import get, post, sample, scrape


@pytest.fixture(scope="module")
def emu():
    # a small cache (200 blocks = 3200 tokens) so a few requests move kv_cache_usage visibly
    h = run_emulator_in_thread(EngineConfig(num_gpu_blocks=200, max_model_len=4096), time_scale=10)
    yield h
    h.stop()


def test_metrics_names_labels_and_types_a_router_reads(emu):
    fams = scrape(emu.url)
    model = emu.engine.cfg.served_model_name
    gauges = ["vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"]
    for g in gauges:
        assert fams[g].type == "gauge"
        assert fams[g].samples[0].labels == {"model_name": model, "engine": "0"}
    # the parser strips _total from the family name; the sample keeps it, as scraped
    for c in [
        "vllm:num_preemptions",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
    ]:
        assert fams[c].type == "counter"
        assert fams[c].samples[0].name == c + "_total"
        assert fams[c].samples[0].labels == {"model_name": model, "engine": "0"}
    reasons = {s.labels["finished_reason"] for s in fams["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort"}  # vllm/v1/engine/__init__.py FinishReason
    info = fams["vllm:cache_config_info"]
    assert info.type == "gauge" and info.samples[0].value == 1.0
    labels = info.samples[0].labels
    assert labels["block_size"] == "16" and labels["num_gpu_blocks"] == "200"
    assert labels["engine"] == "0" and "model_name" not in labels
    assert {"gpu_memory_utilization", "cache_dtype", "enable_prefix_caching"} <= set(labels)
    for h in [
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
    ]:
        assert fams[h].type == "histogram"
        names = {s.name for s in fams[h].samples}
        assert {h + "_bucket", h + "_sum", h + "_count"} <= names
    ttft_bounds = [
        s.labels["le"] for s in fams["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")
    ]
    assert ttft_bounds[0] == "0.001" and ttft_bounds[-2] == "2560.0" and ttft_bounds[-1] == "+Inf"


def test_kv_cache_usage_rises_under_load_and_falls_after(emu):
    url = emu.url
    assert sample(scrape(url), "vllm:kv_cache_usage_perc") == 0.0
    results = []

    def one(i: int) -> None:
        body = {
            "prompt": "lorem ipsum dolor sit amet " * 40 + f"request {i}",
            "max_tokens": 150,
            "ignore_eos": True,
        }
        results.append(post(url + "/v1/completions", body))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    peak, running = 0.0, 0.0
    deadline = time.monotonic() + 20
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        fams = scrape(url)
        peak = max(peak, sample(fams, "vllm:kv_cache_usage_perc"))
        running = max(running, sample(fams, "vllm:num_requests_running"))
        time.sleep(0.02)
    for t in threads:
        t.join(20)
    assert all(status == 200 for status, _ in results) and len(results) == 6
    assert peak > 0.3 and running >= 2
    fams = scrape(url)
    assert sample(fams, "vllm:kv_cache_usage_perc") == 0.0
    assert sample(fams, "vllm:num_requests_running") == 0.0
    assert sample(fams, "vllm:generation_tokens", "vllm:generation_tokens_total") >= 900
    assert sample(fams, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") >= 6
    assert sample(fams, "vllm:request_success", "vllm:request_success_total", finished_reason="length") >= 6
    # the shared prompt text hit the prefix cache
    assert sample(fams, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") > 0


def test_openai_client_streams_chat_and_completions_with_usage(emu):
    import openai

    client = openai.OpenAI(base_url=emu.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0]
    assert model.id == emu.engine.cfg.served_model_name
    assert model.model_extra["max_model_len"] == 4096
    stream = client.chat.completions.create(
        model=model.id,
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens > 0
    assert len(text.split()) == 12
    stream = client.completions.create(
        model=model.id,
        prompt="Once upon a time",
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens <= 7
    assert (
        chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    )
    # non-streaming, with usage; a natural stop when ignore_eos is not set and max_tokens allows
    done = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "hi"}], max_tokens=2000
    )
    assert done.choices[0].finish_reason == "stop" and 24 <= done.usage.completion_tokens < 320
    # continue_final_message: the reply continues the assistant's text (prompt ends inside it)
    cont = client.chat.completions.create(
        model=model.id,
        messages=[{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two"}],
        max_tokens=3,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert cont.usage.completion_tokens == 3


def test_bad_requests_get_openai_style_errors(emu):
    url = emu.url
    status, body = post(url + "/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "BadRequestError"
    status, body = post(url + "/v1/completions", {"prompt": "x", "max_tokens": 0})
    # vllm/sampling_params.py SamplingParams._verify_args at v0.11.0
    assert status == 400 and body["error"]["message"] == "max_tokens must be at least 1, got 0."
    status, body = post(url + "/v1/completions", {"prompt": "x" * 10, "max_tokens": 5000})
    assert status == 400 and "maximum context length is" in body["error"]["message"]
    status, body = post(url + "/v1/completions", {"prompt": "x", "model": "gpt-17"})
    assert status == 404 and body["error"]["type"] == "NotFoundError"
    status, body = post(url + "/v1/chat/completions", {"messages": []})
    assert status == 400
    status, _ = get(url + "/nope")
    assert status == 404


def test_health_version_ping_tokenize(emu):
    assert get(emu.url + "/health")[0] == 200
    assert get(emu.url + "/ping")[0] == 200
    assert json.loads(get(emu.url + "/version")[1])["version"]
    s1, a = post(emu.url + "/tokenize", {"prompt": "shared prefix here and then one"})
    s2, b = post(emu.url + "/tokenize", {"prompt": "shared prefix here and then two"})
    assert s1 == s2 == 200 and a["max_model_len"] == 4096
    assert a["tokens"][:-1] == b["tokens"][:-1] and a["count"] == len(a["tokens"])


def test_fault_admin_api_needs_the_token_and_injects_faults():
    with run_emulator_in_thread(EngineConfig(num_gpu_blocks=200, max_model_len=4096), time_scale=20) as h:
        url, auth = h.url, {"Authorization": f"Bearer {h.admin_token}"}
        assert post(url + "/admin/faults", {"status_503": True})[0] == 401
        assert post(url + "/admin/faults", {"status_503": True}, {"Authorization": "Bearer wrong"})[0] == 401
        status, state = post(url + "/admin/faults", {"status_503": True}, auth)
        assert status == 200 and state["status_503"] is True
        status, body = get(url + "/health")
        assert status == 503
        assert post(url + "/v1/completions", {"prompt": "x"})[1]["error"]["code"] == 503
        assert post(url + "/admin/faults", {"bogus": 1}, auth)[0] == 400
        post(url + "/admin/faults", {"clear": True, "garbage_metrics": True}, auth)
        status, text = get(url + "/metrics")
        assert status == 200
        with pytest.raises(Exception):  # noqa: B017 - any parse error
            list(text_string_to_metric_families(text.decode()))
        post(url + "/admin/faults", {"clear": True, "break_stream_after_tokens": 3}, auth)
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        got = []
        with pytest.raises(Exception):  # noqa: B017 - the connection is cut mid-stream
            for chunk in client.completions.create(
                model=h.engine.cfg.served_model_name,
                prompt="p",
                max_tokens=20,
                stream=True,
                extra_body={"ignore_eos": True},
            ):
                got.append(chunk)
        assert len(got) == 3
        # slow: a step takes slow_factor times longer
        post(url + "/admin/faults", {"clear": True, "slow_factor": 4}, auth)
        assert h.engine.slowdown == 4
        # hang: requests wait until cleared
        post(url + "/admin/faults", {"clear": True, "hang": True}, auth)
        with pytest.raises(OSError):
            urllib.request.urlopen(url + "/health", timeout=0.3)
        post(url + "/admin/faults", {"clear": True}, auth)
        assert get(url + "/health")[0] == 200
        # refuse: the listening socket closes, and reopens after the given seconds
        status, state = post(url + "/admin/faults", {"refuse_connections": 0.5}, auth)
        assert state["refuse_connections"] is True
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url + "/health", timeout=1)
        time.sleep(0.8)
        assert get(url + "/health")[0] == 200
        # and in-process, without HTTP
        h.set_faults(refuse_connections=True)
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url + "/health", timeout=1)
        h.clear_faults()
        assert get(url + "/health")[0] == 200


def test_admin_api_is_off_without_a_token():
    with run_emulator_in_thread(EngineConfig(num_gpu_blocks=100, max_model_len=1024), admin_token=None) as h:
        assert post(h.url + "/admin/faults", {"hang": True}, {"Authorization": "Bearer "})[0] == 404
