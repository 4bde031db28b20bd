"""The emulator against vLLM 0.11.0 (the pinned image), one behaviour per test, over real HTTP on
127.0.0.1 (and the openai client where a client would meet it). Each names the vLLM file at tag
v0.11.0 the expected behaviour was read from."""

from __future__ import annotations

import ast
import contextlib
import http.client
import json
import threading
import time

import openai
import pytest
from gpufleet.serving.engine import tokenizer as tk
from gpufleet.serving.engine.model import EngineConfig
from gpufleet.serving.engine.server import run_emulator_in_thread, spawn_emulator

from .http_util import get, post, sample, scrape, sse

LIMIT = 4096
USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def emu():
    h = run_emulator_in_thread(EngineConfig(num_gpu_blocks=400, max_model_len=LIMIT), time_scale=20)
    yield h
    h.stop()


def client(h) -> openai.OpenAI:
    return openai.OpenAI(base_url=h.url + "/v1", api_key="unused", max_retries=0)


def validation_errors(body: dict) -> list[dict]:
    """The pydantic error list vLLM's validation_exception_handler puts in the message."""
    assert body["error"]["type"] == "Bad Request" and body["error"]["code"] == 400
    return ast.literal_eval(body["error"]["message"].replace("ValueError(", "("))


# -- continue_final_message / add_generation_prompt ------------------------------------------------


def test_continue_final_message_alone_meets_the_default_generation_prompt_and_is_refused(emu):
    # protocol.py: add_generation_prompt defaults to true; transformers refuses the pair and
    # serving_chat.py answers f"{e} {e.__cause__}" (the same text twice)
    messages = [*USER, {"role": "assistant", "content": "Once"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client(emu).chat.completions.create(
            model=emu.engine.cfg.served_model_name,
            messages=messages,
            max_tokens=3,
            extra_body={"continue_final_message": True},
        )
    err = caught.value.body
    assert caught.value.status_code == 400 and err["type"] == "BadRequestError"
    text = tk.CONTINUE_WITH_GENERATION_PROMPT
    assert text.startswith("continue_final_message and add_generation_prompt are not compatible.")
    assert err["message"] == f"{text} {text}"
    # the same through /tokenize (serving_tokenization.py wraps it alike)
    status, body = post(emu.url + "/tokenize", {"messages": messages, "continue_final_message": True})
    assert status == 400 and body["error"]["message"] == f"{text} {text}"


def test_both_flags_true_are_refused_by_the_request_validator(emu):
    # protocol.py ChatCompletionRequest.check_generation_prompt, a mode="before" model validator,
    # answered by api_server.py validation_exception_handler
    body = {
        "messages": [*USER, {"role": "assistant", "content": "Once"}],
        "continue_final_message": True,
        "add_generation_prompt": True,
    }
    for path in ("/v1/chat/completions", "/tokenize"):
        status, answer = post(emu.url + path, body)
        assert status == 400
        (err,) = validation_errors(answer)
        assert err["loc"] == ("body",) and err["type"] == "value_error"
        assert err["msg"] == (
            "Value error, Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
        assert err["input"] == body


def test_continuing_a_final_message_works_with_the_prompt_off_and_keeps_its_role(emu):
    # serving_chat.py get_chat_request_role: the last message's role when no generation prompt
    c = client(emu)
    model = emu.engine.cfg.served_model_name
    done = c.chat.completions.create(
        model=model,
        messages=[*USER, {"role": "assistant", "content": "Once upon"}],
        max_tokens=3,
        extra_body={"continue_final_message": True, "add_generation_prompt": False, "ignore_eos": True},
    )
    assert done.choices[0].message.role == "assistant" and done.usage.completion_tokens == 3
    # transformers checks no role: a user's message can be continued too, and the reply is its
    done = c.chat.completions.create(
        model=model,
        messages=USER,
        max_tokens=2,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert done.choices[0].message.role == "user"


# -- streaming ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_the_last_token_chunk_carries_finish_reason_and_no_empty_chunk_follows(emu, ignore_eos):
    # serving_chat.py / serving_completion.py stream generators: the output that finishes the
    # request is sent with its text and finish_reason; then the usage chunk, then [DONE]
    max_tokens = 6 if ignore_eos else 2000
    opts = {"stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    chat = list(sse(emu.url + "/v1/chat/completions", {"messages": USER, "max_tokens": max_tokens, **opts}))
    assert chat[-1] == "[DONE]"
    usage = chat[-2]
    assert usage["choices"] == [] and set(usage["usage"]) == {"prompt_tokens", "total_tokens", "completion_tokens"}
    role, *tokens = chat[:-2]
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert role["prompt_token_ids"] is None
    n = usage["usage"]["completion_tokens"]
    assert len(tokens) == n and (n == 6 if ignore_eos else 24 <= n < 320)
    for c in tokens:
        (choice,) = c["choices"]
        assert choice["delta"]["content"]  # every chunk after the role's carries a token
    assert all(c["choices"][0]["finish_reason"] is None for c in tokens[:-1])
    last = tokens[-1]["choices"][0]
    assert last["finish_reason"] == ("length" if ignore_eos else "stop") and last["stop_reason"] is None

    prompt = "Once upon a time"
    comp = list(sse(emu.url + "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, **opts}))
    assert comp[-1] == "[DONE]" and comp[-2]["choices"] == []
    tokens = comp[:-2]
    assert len(tokens) == comp[-2]["usage"]["completion_tokens"]
    assert all(c["choices"][0]["text"] for c in tokens)
    assert [c["choices"][0]["finish_reason"] for c in tokens][-1] == ("length" if ignore_eos else "stop")
    assert all(c["choices"][0]["finish_reason"] is None for c in tokens[:-1])
    # every field, set or not (exclude_unset=False); the first chunk carries the prompt's ids
    assert set(tokens[0]) == {"id", "object", "created", "model", "choices", "usage"}
    assert tokens[0]["choices"][0]["prompt_token_ids"] == tk.encode(prompt)
    assert all(c["choices"][0]["prompt_token_ids"] is None for c in tokens[1:])


def test_openai_client_sees_finish_reason_on_a_chunk_with_text(emu):
    stream = client(emu).chat.completions.create(
        model=emu.engine.cfg.served_model_name,
        messages=USER,
        max_tokens=4,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0] is chunks[-1]
    assert finishing[0].choices[0].delta.content and finishing[0].choices[0].finish_reason == "length"


def test_stream_options_without_stream_are_refused(emu):
    # protocol.py validate_stream_options: a truthy stream_options needs stream=true
    for path, extra in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": USER})):
        body = {**extra, "max_tokens": 2, "stream_options": {"include_usage": True}}
        status, answer = post(emu.url + path, body)
        (err,) = validation_errors(answer)
        assert status == 400
        assert err["msg"] == "Value error, Stream options can only be defined when `stream=True`."
        status, _ = post(emu.url + path, {**body, "stream_options": None})
        assert status == 200  # null (or {}) is falsy: accepted
    with pytest.raises(openai.BadRequestError, match="Stream options can only be defined"):
        client(emu).completions.create(
            model=emu.engine.cfg.served_model_name, prompt="hi", max_tokens=2, stream_options={"include_usage": True}
        )


# -- error texts ------------------------------------------------------------------------------------


def test_context_length_errors_read_as_vllm_0_11(emu):
    url = emu.url
    # chat: serving_engine.py _validate_input, wrapped by serving_chat.py as f"{e} {e.__cause__}"
    long_text = "word " * LIMIT
    n_long = len(tk.encode(tk.apply_chat_template([{"role": "user", "content": long_text}])))
    status, body = post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]})
    assert status == 400 and body["error"]["type"] == "BadRequestError"
    assert body["error"]["message"] == (
        f"This model's maximum context length is {LIMIT} tokens. However, your request has {n_long} input "
        "tokens. Please reduce the length of the input messages. None"
    )
    n = len(tk.encode(tk.apply_chat_template(USER)))
    status, body = post(url + "/v1/chat/completions", {"messages": USER, "max_completion_tokens": 5000})
    assert status == 400 and body["error"]["message"] == (
        f"'max_tokens' or 'max_completion_tokens' is too large: 5000. This model's maximum context length "
        f"is {LIMIT} tokens and your request has {n} input tokens (5000 > {LIMIT} - {n}). None"
    )
    # completions: renderer.py _create_tokens_prompt, max_length = max_model_len - max_tokens
    ids = list(range(1000, 1100))
    status, body = post(url + "/v1/completions", {"prompt": ids, "max_tokens": LIMIT - 50})
    assert status == 400 and body["error"]["message"] == (
        "This model's maximum context length is 50 tokens. However, your request has 100 input tokens. "
        "Please reduce the length of the input messages."
    )
    # the default max_tokens of a completion is 16
    status, body = post(url + "/v1/completions", {"prompt": list(range(1000, 1000 + LIMIT - 10))})
    assert status == 400 and f"maximum context length is {LIMIT - 16} tokens" in body["error"]["message"]
    # a prompt that leaves no room: SamplingParams refuses max_tokens 0 (sampling_params.py)
    status, body = post(url + "/v1/completions", {"prompt": list(range(1000, 1000 + LIMIT)), "max_tokens": None})
    assert status == 400 and body["error"]["message"] == "max_tokens must be at least 1, got 0."
    # what fits is served, up to the whole context
    full = list(range(1000, 1000 + LIMIT - 20))
    status, body = post(url + "/v1/completions", {"prompt": full, "max_tokens": 20, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 20


def test_models_card_root_and_permission_as_vllm():
    # serving_models.py show_available_models + protocol.py ModelCard/ModelPermission
    with run_emulator_in_thread(
        EngineConfig(num_gpu_blocks=100, max_model_len=1024, served_model_name="team-model"), admin_token=None
    ) as h:
        models = client(h).models.list().data
        assert [m.id for m in models] == ["team-model"]
        card = json.loads(get(h.url + "/v1/models")[1])["data"][0]
    assert card["root"] == "meta-llama/Llama-3.1-8B-Instruct"  # what `vllm serve` was given
    assert card["parent"] is None and card["owned_by"] == "vllm" and card["max_model_len"] == 1024
    (perm,) = card["permission"]
    assert perm["id"].startswith("modelperm-") and len(perm["id"]) == len("modelperm-") + 32
    assert {k: v for k, v in perm.items() if k not in ("id", "created")} == {
        "object": "model_permission",
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    assert abs(perm["created"] - time.time()) < 60 and card["created"] == perm["created"]


# -- /load --------------------------------------------------------------------------------------------


def _load_while_streaming(h) -> tuple[int, int]:
    """(server_load seen mid-stream, after it)."""
    events = sse(h.url + "/v1/completions", {"prompt": "p", "max_tokens": 40, "stream": True, "ignore_eos": True})
    next(events)
    during = json.loads(get(h.url + "/load")[1])["server_load"]
    list(events)
    time.sleep(0.05)
    return during, json.loads(get(h.url + "/load")[1])["server_load"]


def test_load_endpoint_counts_only_with_tracking_on():
    # api_server.py get_server_load_metrics (always routed) and utils.py load_aware_call
    cfg = EngineConfig(num_gpu_blocks=100, max_model_len=1024)
    with run_emulator_in_thread(cfg, time_scale=1, admin_token=None) as h:
        assert json.loads(get(h.url + "/load")[1]) == {"server_load": 0}
        assert _load_while_streaming(h) == (0, 0)  # vLLM's default: not tracked
    with run_emulator_in_thread(cfg, time_scale=1, admin_token=None, enable_server_load_tracking=True) as h:
        assert _load_while_streaming(h) == (1, 0)


def test_the_load_tracking_flag_of_the_module_entry_point():
    with spawn_emulator(
        ["--num-gpu-blocks", "100", "--max-model-len", "1024", "--enable-server-load-tracking"], admin_token=None
    ) as p:
        assert json.loads(get(p.url + "/load")[1]) == {"server_load": 0}
        events = sse(p.url + "/v1/completions", {"prompt": "p", "max_tokens": 60, "stream": True, "ignore_eos": True})
        next(events)
        assert json.loads(get(p.url + "/load")[1])["server_load"] == 1
        list(events)


# -- metrics --------------------------------------------------------------------------------------------


def test_ttft_is_observed_at_the_first_token_not_at_the_finish():
    # stats.py IterationStats.update_from_output: TTFT when the first output comes (is_prefilling)
    cfg = EngineConfig(num_gpu_blocks=100, max_model_len=1024)
    with run_emulator_in_thread(cfg, time_scale=1, admin_token=None) as h:
        events = sse(h.url + "/v1/completions", {"prompt": "p", "max_tokens": 200, "stream": True, "ignore_eos": True})
        next(events)
        fams = scrape(h.url)
        assert sample(fams, "vllm:num_requests_running") == 1.0  # still generating
        assert sample(fams, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 1.0
        assert sample(fams, "vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count") == 0.0
        ttft = sample(fams, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_sum")
        list(events)
        fams = scrape(h.url)
        assert sample(fams, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 1.0
        assert sample(fams, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_sum") == ttft
        assert ttft < sample(fams, "vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_sum") / 10
        # a chat's role chunk goes out with the first output (serving_chat.py sends it on the first
        # RequestOutput): when it arrives, the first token has been made
        h.set_faults(slow_factor=20)  # a prefill long enough to see a role chunk sent before it
        long = [{"role": "user", "content": "tell me " * 400}]
        events = sse(h.url + "/v1/chat/completions", {"messages": long, "max_tokens": 2, "stream": True})
        assert next(events)["choices"][0]["delta"]["role"] == "assistant"
        fams = scrape(h.url)
        assert sample(fams, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 2.0
        list(events)


def test_prefix_cache_counts_every_lookup_over_http(emu):
    # kv_cache_manager.py get_computed_blocks: queries += num_tokens, hits += cached tokens per lookup
    before = scrape(emu.url)
    q0 = sample(before, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total")
    h0 = sample(before, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total")
    ids = list(range(20_000, 20_100))  # 100 tokens: 6 full blocks
    for _ in range(2):
        assert post(emu.url + "/v1/completions", {"prompt": ids, "max_tokens": 1})[0] == 200
    after = scrape(emu.url)
    assert sample(after, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") - q0 == 200
    assert sample(after, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") - h0 == 96


def _bounds(fams: dict, family: str) -> list[str]:
    return [s.labels["le"] for s in fams[family].samples if s.name.endswith("_bucket")]


def test_the_series_vllm_0_11_adds_with_its_buckets():
    # loggers.py PrometheusStatLogger: names, buckets; stats.py / parallel_sampling.py: what they add
    cfg = EngineConfig(num_gpu_blocks=400, max_model_len=LIMIT)
    with run_emulator_in_thread(cfg, time_scale=20, admin_token=None) as h:
        asked = [5, 9, 30]
        threads = [
            threading.Thread(
                target=post,
                args=(h.url + "/v1/completions", {"prompt": f"story {i} " * 20, "max_tokens": m, "ignore_eos": True}),
            )
            for i, m in enumerate(asked)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # a chat with no max_tokens: max_tokens_param is what vLLM resolves, the context left
        status, body = post(h.url + "/v1/chat/completions", {"messages": USER, "max_tokens": None})
        assert status == 200
        asked.append(LIMIT - body["usage"]["prompt_tokens"])
        fams = scrape(h.url)
    one_two_five = [f"{m * 10**e}.0" for e in range(4) for m in (1, 2, 5) if m * 10**e <= LIMIT]
    assert _bounds(fams, "vllm:iteration_tokens_total") == [
        f"{b}.0" for b in (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    ] + ["+Inf"]
    assert _bounds(fams, "vllm:request_params_n") == ["1.0", "2.0", "5.0", "10.0", "20.0", "+Inf"]
    for family in ("vllm:request_params_max_tokens", "vllm:request_max_num_generation_tokens"):
        assert _bounds(fams, family) == one_two_five + ["+Inf"]
    assert _bounds(fams, "vllm:time_per_output_token_seconds") == _bounds(fams, "vllm:inter_token_latency_seconds")

    def hist(name: str, part: str) -> float:
        return sample(fams, name, f"{name}_{part}")

    finished = len(asked)
    assert hist("vllm:request_params_max_tokens", "count") == finished
    assert hist("vllm:request_params_max_tokens", "sum") == sum(asked)
    assert hist("vllm:request_params_n", "count") == finished and hist("vllm:request_params_n", "sum") == finished
    generated = sample(fams, "vllm:generation_tokens", "vllm:generation_tokens_total")
    assert hist("vllm:request_max_num_generation_tokens", "sum") == generated
    # every step that produced outputs adds its prompt tokens (first outputs) and generated tokens
    prompt = sample(fams, "vllm:prompt_tokens", "vllm:prompt_tokens_total")
    assert hist("vllm:iteration_tokens_total", "sum") == prompt + generated
    assert hist("vllm:iteration_tokens_total", "count") <= generated
    # the deprecated name, still emitted with the inter-token latency's samples
    for part in ("count", "sum"):
        assert hist("vllm:time_per_output_token_seconds", part) == hist("vllm:inter_token_latency_seconds", part)
    assert hist("vllm:inter_token_latency_seconds", "count") == generated - finished


def test_cache_config_info_has_vllm_0_11s_labels(emu):
    # config/cache.py CacheConfig.metrics_info (its __dict__) + "engine" (loggers.py log_metrics_info)
    (info,) = scrape(emu.url)["vllm:cache_config_info"].samples
    assert info.value == 1.0
    assert info.labels == {
        "block_size": "16",
        "gpu_memory_utilization": "0.9",
        "swap_space": "4.0",
        "cache_dtype": "auto",
        "is_attention_free": "False",
        "num_gpu_blocks_override": "400",
        "sliding_window": "None",
        "enable_prefix_caching": "True",
        "prefix_caching_hash_algo": "sha256",
        "cpu_offload_gb": "0.0",
        "calculate_kv_scales": "False",
        "cpu_kvcache_space_bytes": "None",
        "mamba_page_size_padded": "None",
        "mamba_cache_dtype": "auto",
        "mamba_ssm_cache_dtype": "auto",
        "num_gpu_blocks": "400",
        "num_cpu_blocks": "None",
        "kv_sharing_fast_prefill": "False",
        "kv_cache_memory_bytes": "None",
        "swap_space_bytes": "4294967296.0",
        "engine": "0",
    }
    assert len(info.labels) == 21  # 20 of CacheConfig, and engine


def test_finished_reasons_are_vllms_three_and_a_client_abort_records_nothing():
    # v1/engine/__init__.py FinishReason: stop, length, abort; output_processor.py abort_requests
    # drops an aborted request without finished stats
    cfg = EngineConfig(num_gpu_blocks=100, max_model_len=1024)
    with run_emulator_in_thread(cfg, time_scale=20) as h:
        fams = scrape(h.url)
        reasons = {s.labels["finished_reason"] for s in fams["vllm:request_success"].samples}
        assert reasons == {"stop", "length", "abort"}
        h.set_faults(break_stream_after_tokens=2)
        got: list = []
        with contextlib.suppress(OSError, http.client.HTTPException):  # cut: a short read, or an error
            body = {"prompt": "p", "max_tokens": 50, "stream": True, "ignore_eos": True}
            got.extend(sse(h.url + "/v1/completions", body))
        assert len(got) == 2 and "[DONE]" not in got
        h.clear_faults()
        deadline = time.monotonic() + 5
        while h.stats().num_running and time.monotonic() < deadline:
            time.sleep(0.02)
        fams = scrape(h.url)
        for reason in ("stop", "length", "abort"):
            assert sample(fams, "vllm:request_success", "vllm:request_success_total", finished_reason=reason) == 0
        assert sample(fams, "vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count") == 0
        assert sample(fams, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 1
