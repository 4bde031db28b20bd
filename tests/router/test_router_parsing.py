"""Reading a request before routing (serving/router/parsing.py): what is refused with 400 and why,
without sockets. The same checks over real sockets are in test_router_poison.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from gpufleet.serving.router.config import RegionInfo, RouterConfig
from gpufleet.serving.router.continuation import continuation_payload
from gpufleet.serving.router.errors import HttpError
from gpufleet.serving.router.parsing import MAX_JSON_DEPTH, decode_json, parse_job
from gpufleet.serving.router.relay import whole_usage
from gpufleet.stacks.spec import RouterSettings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

MODEL = "m-8b"


def config(models: dict[str, int] | None = None) -> RouterConfig:
    models = models or {MODEL: 4096}
    here = RegionInfo("r-us", "on-demand", "us", frozenset(models), None, ("http://e:1",), None, None)
    eu = RegionInfo("r-eu", "on-demand", "eu", frozenset(models), None, ("http://e:2",), None, "http://r:2")
    return RouterConfig(here, {"r-us": here, "r-eu": eu}, models, RouterSettings(), "tok", 500.0)


def parse(body: bytes | dict, kind: str = "chat", headers: dict[str, str] | None = None, cfg=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = SimpleNamespace(headers=CIMultiDict(headers or {}), path="/v1/chat/completions")
    return parse_job(cfg or config(), request, raw, kind, deadline=0.0, received=0.0, arrived=0.0)


def refused(body, kind="chat", headers=None, cfg=None, status=400) -> str:
    with pytest.raises(HttpError) as info:
        parse(body, kind, headers, cfg)
    assert info.value.status == status, info.value.message
    return info.value.message


def chat(content="hello", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def test_a_valid_request_is_a_job():
    job = parse(chat(max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert job.stream and job.routed.model == MODEL and job.routed.need_tokens == job.prompt_tokens + 10
    assert job.routed.residency == "us" and job.routed.allow_remote
    # A paired surrogate escape (an emoji as ensure_ascii JSON writes it) is valid text.
    assert parse(b'{"model": "m-8b", "messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}]}')
    # Completions: a string, strings, token ids or lists of them.
    for prompt in ("abc", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert parse({"model": MODEL, "prompt": prompt}, "completions").kind == "completions"


@pytest.mark.parametrize(
    "body, says",
    [
        (b'{"model": "m-8b", "messages": [{"role": "user", "content": "a \\ud800 b"}]}', "surrogate"),
        (b'{"model": "m-8b", "messages": [{"role": "user", "content": "\\udc00"}]}', "surrogate"),
        (b'{"model": "m-8b", "messages": [{"role": "user", "content": "x"}], "\\ud800k": 1}', "surrogate"),
        (b'{"model": "m-8b", "prompt": "x", "stop": ["ok", "\\udfff"]}', "surrogate"),
        (b'{"model": "m-8b", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "not UTF-8"),
        (b'{"model": "m-8b", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "not UTF-8"),
        (b'{"model": "m-8b", "temperature": NaN, "messages": []}', "NaN"),
        (b'{"model": "m-8b", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "deeper"),
        (b'{"model": "m-8b", "x": ' + b'{"a":' * 70 + b"1" + b"}" * 70 + b"}", "deeper"),
        (b"[1, 2]", "JSON object"),
        (b"{nope", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_bodies_that_no_engine_can_take(body, says):
    kind = "completions" if b"prompt" in body else "chat"
    assert says in refused(body, kind)


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"stream": "true"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"n": -1}, "n"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": False}, "temperature"),
        ({"seed": 1.5}, "seed"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 1]}, "stop"),
        ({"user": {}}, "user"),
        ({"model": 7}, "model"),
        ({"stream_options": []}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream, as vLLM
        ({"logprobs": 3}, "logprobs"),
        ({"echo": "no"}, "echo"),
        ({"continue_final_message": 1}, "continue_final_message"),
    ],
)
def test_wrong_types_are_named(extra, field):
    assert f"`{field}" in refused(chat(**extra))


@pytest.mark.parametrize(
    "messages, field",
    [
        ([], "messages"),
        ("hello", "messages"),
        ([["user", "hi"]], "messages[0]"),
        ([{"role": 5, "content": "x"}], "messages[0].role"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"text": "x"}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
        ([{"role": "user", "content": "x", "name": 1}], "messages[0].name"),
    ],
)
def test_wrong_messages_are_named(messages, field):
    assert f"`{field}`" in refused({"model": MODEL, "messages": messages})


@pytest.mark.parametrize("prompt", ["", [], [-1], [1, "a", None], [[]], [[1, "x"]], {"a": 1}, 5, None])
def test_wrong_prompts(prompt):
    assert "`prompt`" in refused({"model": MODEL, "prompt": prompt}, "completions")


def test_a_missing_model_is_the_only_one_served():
    assert parse({"messages": [{"role": "user", "content": "x"}]}).routed.model == MODEL
    assert parse({"model": "", "prompt": "x"}, "completions").routed.model == MODEL
    two = config({"a-8b": 4096, "b-70b": 8192})
    message = refused({"messages": [{"role": "user", "content": "x"}]}, cfg=two)
    assert "`model` is required" in message and "a-8b, b-70b" in message
    assert "does not exist" in refused(chat() | {"model": "gpt-9"}, status=404)


def test_requests_past_the_context_are_refused_and_borderline_ones_pass():
    assert "exceeds the model's context" in refused(chat(max_tokens=5000))
    # 2M characters are at least 62,500 tokens however they tokenize: never servable at 4096.
    assert "exceed the model's context" in refused(chat("x" * 2_000_000))
    # 40,000 characters of ordinary text are ~10,000 tokens, but could be fewer than 4,096: vLLM decides.
    assert parse(chat("x" * 40_000, max_tokens=100))
    assert "exceed" in refused(chat("x" * 140_000))
    assert "exceed" in refused({"model": MODEL, "prompt": list(range(4000)), "max_tokens": 100}, "completions")


def test_headers_the_router_reads():
    assert parse(chat(), headers={"X-Gpufleet-Residency": "eu"}).routed.residency == "eu"
    assert "unknown X-Gpufleet-Residency 'mars'" in refused(chat(), headers={"X-Gpufleet-Residency": "mars"})
    assert "eu, us" in refused(chat(), headers={"X-Gpufleet-Residency": "mars"})
    forwarded = parse(chat(), headers={"X-Gpufleet-Hop": "r-eu"})
    assert not forwarded.routed.allow_remote and forwarded.headers["X-Gpufleet-Hop"] == "r-eu"
    assert "names no region" in refused(chat(), headers={"X-Gpufleet-Hop": "elsewhere"})
    # aiohttp hands over header bytes that are not UTF-8 as surrogates: never sent on upstream.
    assert "ASCII" in refused(chat(), headers={"Authorization": "Bearer \udcff\udcfe"})
    assert parse(chat(), headers={"Authorization": "Bearer abc"}).headers["Authorization"] == "Bearer abc"


def test_depth_limit_is_exact():
    def nested(depth: int) -> bytes:  # the body object itself is level 1
        return b'{"model": "m-8b", "prompt": "x", "a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    assert parse(nested(MAX_JSON_DEPTH), "completions")
    assert "deeper" in refused(nested(MAX_JSON_DEPTH + 1), "completions")


def test_a_continuation_drops_echo_and_the_usage_is_the_whole_answer():
    for kind, payload in (
        ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "echo": True, "max_tokens": 9}),
        ("completions", {"model": MODEL, "prompt": "q", "echo": True, "max_tokens": 9}),
    ):
        p = continuation_payload(kind, payload, "so far", 4)
        assert p is not None and "echo" not in p and p["max_tokens"] == 5
    # The continuation's engine counted the 4 tokens already relayed as prompt: they are completion.
    usage = {"prompt_tokens": 14, "completion_tokens": 5, "total_tokens": 19}
    assert whole_usage(usage, 4) and usage == {"prompt_tokens": 10, "completion_tokens": 9, "total_tokens": 19}
    assert not whole_usage({"prompt_tokens": "x"}, 4) and not whole_usage(usage, 0)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        k: _json
        for k in ("model", "messages", "prompt", "stream", "stream_options", "max_tokens", "n", "stop",
                  "temperature", "echo", "logprobs", "continue_final_message")  # fmt: skip
    },
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_fields, kind=st.sampled_from(["chat", "completions"]), junk=st.binary(max_size=8))
def test_fuzz_any_body_is_a_job_or_a_clean_400(body, kind, junk):
    """Whatever the body, the parser answers a Job or an HttpError: never another exception."""
    raw = json.dumps(body).encode()
    for candidate in (raw, raw[: len(raw) // 2] + junk):
        try:
            parse(candidate, kind)
        except HttpError as exc:
            assert exc.status in (400, 404, 413)


def test_decode_json_rejects_a_lone_surrogate_behind_an_escaped_backslash_only_when_real():
    # "\\ud800" in JSON is a backslash followed by the text "ud800": valid, no surrogate in it.
    assert decode_json(b'{"a": "\\\\ud800"}') == {"a": "\\ud800"}
