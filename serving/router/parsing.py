"""Reading a request before it is routed: the body (bounded in size and time), strict JSON, and one
validation pass, so that a request an engine could never serve is answered 400 here and never
counts against an engine.

A request is refused when its body is not UTF-8, holds a lone UTF-16 surrogate in any string (an
escape such as "\\ud800"; vLLM's tokenizer cannot encode it), nests deeper than `MAX_JSON_DEPTH`,
has NaN/Infinity or a field of the wrong JSON type among those the router or vLLM read, or cannot
fit the model's context whatever its tokenization.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from gpufleet.serving.router.config import RouterConfig
from gpufleet.serving.router.errors import HttpError
from gpufleet.serving.router.policy import RoutedRequest, estimate_prompt_tokens
from gpufleet.serving.router.prefix import TEXT_BLOCK_CHARS, text_chain

HOP_HEADER = "X-Gpufleet-Hop"  # set on a request forwarded to a peer region; the peer never forwards it again
ROUTED_HEADER = "X-Gpufleet-Region"  # on responses: the region that answered
# A request with "X-Gpufleet-Explain: 1" gets, on its answer, the TTFT the predicting policy expected
# of the engine it chose (engine seconds, in ms): to check the prediction against what a client sees.
EXPLAIN_HEADER = "X-Gpufleet-Explain"
PREDICTED_HEADER = "X-Gpufleet-Predicted-Ttft-Ms"
# ... and how long (engine ms) the request waited at the routers (admission, late binding, its origin
# router's too) before it was sent to the engine that answered: the prediction is made after that.
SENT_AFTER_HEADER = "X-Gpufleet-Sent-After-Ms"
RESIDENCY_HEADER = "X-Gpufleet-Residency"
# On a forwarded request: how long (ms) the origin router had it before forwarding, so that the peer
# holds it (late binding) only for what is left of its TTFT slack.
WAITED_HEADER = "X-Gpufleet-Waited-Ms"  # engine milliseconds
MAX_WAITED_MS = 3_600_000.0
DEFAULT_MAX_TOKENS = 256  # demand assumed when a request gives no max_tokens
MAX_JSON_DEPTH = 64  # tool schemas nest a dozen levels; nothing real nests 64
# Text averages ~4 characters a token and a BPE token of a Llama-3-class vocabulary rarely spans
# more than 16; only runs of one character (spaces, dashes) make longer ones. So a prompt of C
# characters has at least C / 32 tokens unless it is such a run from end to end, and one past the
# context by that bound is refused here. A tighter bound would refuse prompts vLLM accepts; a
# prompt between the bounds goes to vLLM, which refuses it itself (400, relayed as it is).
MAX_CHARS_PER_TOKEN = 32

# A \uD800-\uDFFF escape somewhere in the body: only then can a parsed string hold a lone
# surrogate (strict UTF-8 decoding refuses encoded ones), and only then are the strings checked one
# by one (`check_tree`). A literal-first pattern: a fast scan (about 1 us per KB).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class Job:
    """One parsed, valid request and what routing it needs."""

    kind: str  # "chat" | "completions"
    path: str
    body: bytes
    payload: dict[str, Any]
    stream: bool
    prompt_tokens: int  # estimated
    routed: RoutedRequest
    headers: dict[str, str]  # for the request upstream
    deadline: float
    received: float = 0.0  # time.perf_counter() when the handler started (router overhead metric)
    # until when (router clock) it may wait for room: queue_wait_s after it arrived, whether no engine
    # had room at once or a full peer refused it later; a forwarded request not at all (its origin
    # has other candidates)
    room_until: float = 0.0


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The body, at most `limit` bytes (413 above), within `timeout_s` (408 after: a body shorter
    than its Content-Length, or one sent too slowly)."""
    if request.content_length is not None and request.content_length > limit:
        raise HttpError(413, f"request body is larger than {limit} bytes", close=True)
    content = request.content
    if content.is_eof() and not content.exception():
        # The whole body came with the headers (the usual small request): no timer, no await.
        body = content.read_nowait()
        if len(body) > limit:
            raise HttpError(413, f"request body is larger than {limit} bytes", close=True)
        return body
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise HttpError(413, f"request body is larger than {limit} bytes", close=True)
                chunks.append(chunk)
    except TimeoutError:
        raise HttpError(
            408, f"the request body did not arrive within {timeout_s:g} s", close=True
        ) from None
    except web.RequestPayloadError as exc:  # e.g. broken chunked encoding
        raise HttpError(400, f"the request body could not be read: {exc}", close=True) from None
    return b"".join(chunks)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(body: bytes) -> Any:
    """Strict JSON: UTF-8 (no other encodings, no encoded surrogates), no NaN/Infinity, nesting and
    lone surrogates checked (`check_tree`)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HttpError(400, f"request body is not UTF-8 (invalid byte at offset {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise HttpError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise HttpError(400, f"request body is not valid JSON: {exc}") from None
    problem = check_tree(value, surrogates=_SURROGATE_ESCAPE.search(text) is not None)
    if problem:
        raise HttpError(400, problem)
    return value


def _path(parts: tuple) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "the body"


def _has_surrogate(s: str) -> bool:
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_tree(value: Any, surrogates: bool = True, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """One iterative pass over parsed JSON: the first problem (nesting past `max_depth`, a lone
    surrogate in a key or string when `surrogates`), or None."""
    stack: list[tuple[Any, int, tuple]] = [(value, 1, ())]
    while stack:
        node, depth, where = stack.pop()
        if depth > max_depth:
            return f"request body nests deeper than {max_depth} levels (at {_path(where)})"
        items = node.items() if type(node) is dict else enumerate(node)
        for k, v in items:
            if surrogates and type(k) is str and _has_surrogate(k):
                return f"a key in {_path(where)} holds a lone UTF-16 surrogate (not valid Unicode text)"
            t = type(v)
            if t is dict or t is list:
                stack.append((v, depth + 1, (*where, k)))
            elif surrogates and t is str and _has_surrogate(v):
                return f"{_path((*where, k))} holds a lone UTF-16 surrogate (not valid Unicode text)"
    return None


# ---- field types --------------------------------------------------------------------------------
# The fields the router reads, and the common ones vLLM would reject with a 400 of its own; others
# are passed on as they are (vLLM ignores unknown fields).

_BOOLS = ("stream", "echo", "ignore_eos", "continue_final_message", "add_generation_prompt",
          "skip_special_tokens", "include_stop_str_in_output")  # fmt: skip
_POSITIVE_INTS = ("max_tokens", "max_completion_tokens", "n", "best_of")
_INTS = ("seed", "top_k", "min_tokens", "top_logprobs", "prompt_logprobs")
_NUMBERS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "length_penalty")  # fmt: skip
_STRINGS = ("user", "model", "request_id")


def _as_int(v: Any) -> int | None:
    """A JSON integer (an integral float too, as pydantic accepts it); None for anything else."""
    if type(v) is int:
        return v
    if type(v) is float and v.is_integer():
        return int(v)
    return None


def _bad(field: str, what: str) -> HttpError:
    return HttpError(400, f"`{field}` must be {what}")


def check_fields(kind: str, p: dict[str, Any]) -> tuple[int, int]:
    """Raise 400 for a field of the wrong type; return the prompt's size: (characters of text,
    token ids)."""
    for f in _BOOLS:
        v = p.get(f)
        if v is not None and type(v) is not bool:
            raise _bad(f, "true or false")
    for f in _POSITIVE_INTS:
        v = p.get(f)
        if v is not None and ((n := _as_int(v)) is None or n < 1):
            raise _bad(f, "a positive integer")
    for f in _INTS:
        v = p.get(f)
        if v is not None and _as_int(v) is None:
            raise _bad(f, "an integer")
    for f in _NUMBERS:
        v = p.get(f)
        if v is not None and (type(v) not in (int, float) or not math.isfinite(v)):
            raise _bad(f, "a number")
    for f in _STRINGS:
        v = p.get(f)
        if v is not None and type(v) is not str:
            raise _bad(f, "a string")
    stop = p.get("stop")
    if stop is not None and type(stop) is not str and not (
        type(stop) is list and all(type(s) is str for s in stop)
    ):
        raise _bad("stop", "a string or a list of strings")
    opts = p.get("stream_options")
    if opts is not None:
        if type(opts) is not dict:
            raise _bad("stream_options", "an object")
        for f in ("include_usage", "continuous_usage_stats"):
            if opts.get(f) is not None and type(opts[f]) is not bool:
                raise _bad(f"stream_options.{f}", "true or false")
        if p.get("stream") is not True:
            # vLLM 0.11 (vllm/entrypoints/openai/protocol.py, check_stream_options) refuses it too.
            raise HttpError(400, "`stream_options` can only be given when `stream` is true")
    logprobs = p.get("logprobs")
    if logprobs is not None:
        if kind == "chat" and type(logprobs) is not bool:
            raise _bad("logprobs", "true or false")
        if kind == "completions" and _as_int(logprobs) is None:
            raise _bad("logprobs", "an integer")
    return (_chat_chars(p), 0) if kind == "chat" else _prompt_size(p)


def prompt_text(kind: str, p: dict[str, Any], limit: int = 1 << 20) -> str:
    """The prompt's text in order (chat: every message's text content; completions: a string prompt
    or the first of a list), up to `limit` characters: what the prefix chain hashes."""
    if kind == "chat":
        parts = []
        for m in p.get("messages") or ():
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [c["text"] for c in content if isinstance(c, dict) and isinstance(c.get("text"), str)]
        return "\n".join(parts)[:limit]
    prompt = p.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return prompt[:limit] if isinstance(prompt, str) else ""


def _chat_chars(p: dict[str, Any]) -> int:
    messages = p.get("messages")
    if type(messages) is not list or not messages:
        raise HttpError(400, "`messages` must be a non-empty list of messages")
    chars = 0
    for i, m in enumerate(messages):
        if type(m) is not dict:
            raise _bad(f"messages[{i}]", "an object")
        if type(m.get("role")) is not str:
            raise _bad(f"messages[{i}].role", "a string")
        if m.get("name") is not None and type(m["name"]) is not str:
            raise _bad(f"messages[{i}].name", "a string")
        content = m.get("content")
        if content is None or type(content) is str:
            chars += len(content or "")
            continue
        if type(content) is not list:
            raise _bad(f"messages[{i}].content", "a string, a list of content parts or null")
        for j, part in enumerate(content):
            if type(part) is not dict or type(part.get("type")) is not str:
                raise _bad(f"messages[{i}].content[{j}]", 'an object with a string "type"')
            if part["type"] == "text":
                if type(part.get("text")) is not str:
                    raise _bad(f"messages[{i}].content[{j}].text", "a string")
                chars += len(part["text"])
            else:
                chars += len(str(part))  # an image or audio part: some demand, not measured here
    return chars


def _prompt_size(p: dict[str, Any]) -> tuple[int, int]:
    prompt = p.get("prompt")
    what = "a non-empty string, a list of strings, or a list of token ids (or of such lists)"
    if type(prompt) is str:
        if not prompt:
            raise _bad("prompt", what)
        return len(prompt), 0
    if type(prompt) is not list or not prompt:
        raise _bad("prompt", what)
    chars = ids = 0
    for item in prompt:
        if type(item) is str:
            chars += len(item)
        elif type(item) is int and item >= 0:
            ids += 1
        elif type(item) is list and item and all(type(t) is int and t >= 0 for t in item):
            ids += len(item)
        else:
            raise _bad("prompt", what)
    return chars, ids


def _header(request: web.Request, name: str) -> str | None:
    """A header's value; 400 when it is not plain ASCII (aiohttp hands over undecodable bytes as
    surrogates, which could not be sent on or compared)."""
    value = request.headers.get(name)
    if value is not None and not (value.isascii() and value.isprintable()):
        raise HttpError(400, f"the {name} header must be printable ASCII")
    return value


def _waited_s(request: web.Request) -> float:
    """Seconds a forwarded request waited at its origin router (WAITED_HEADER; 0 when absent)."""
    value = _header(request, WAITED_HEADER)
    if value is None:
        return 0.0
    try:
        ms = float(value)
    except ValueError:
        ms = math.nan
    if not 0 <= ms <= MAX_WAITED_MS:  # also NaN
        raise HttpError(
            400, f"{WAITED_HEADER} must be milliseconds from 0 to {MAX_WAITED_MS:.0f} (it is set by routers)"
        )
    return ms / 1000.0


def parse_job(
    config: RouterConfig, request: web.Request, body: bytes, kind: str, deadline: float, received: float,
    arrived: float,
) -> Job:  # fmt: skip
    """The request as a `Job`, or HttpError (400: invalid or never servable; 404: unknown model).
    `arrived`: the router's clock when it came (`deadline` is on the same clock)."""
    payload = decode_json(body)
    if type(payload) is not dict:
        raise HttpError(400, "request body must be a JSON object")
    chars, ids = check_fields(kind, payload)
    model = payload.get("model") or None  # "" too: vLLM treats an empty name as none
    served = config.models
    if model is None:
        # vLLM serves its only model to a request without one (OpenAIServing._check_model, 0.11).
        if len(served) != 1:
            raise HttpError(400, f"`model` is required; served here: {', '.join(sorted(served))}")
        model = next(iter(served))
    elif model not in served:
        raise HttpError(
            404, f"The model `{model}` does not exist. Served here: {', '.join(sorted(served))}", "NotFoundError"
        )
    max_tokens = _as_int(payload.get("max_completion_tokens", payload.get("max_tokens")))
    context = served[model]
    if max_tokens is not None and max_tokens > context:
        raise HttpError(400, f"max_tokens {max_tokens} exceeds the model's context ({context})")
    at_least = math.ceil(chars / MAX_CHARS_PER_TOKEN) + ids
    if at_least + (max_tokens or 1) > context:
        raise HttpError(
            400,
            f"the prompt (at least {at_least} tokens: {chars} characters, {ids} token ids) and max_tokens "
            f"({max_tokens or 1}) exceed the model's context of {context} tokens",
        )
    prompt_tokens = estimate_prompt_tokens(chars) + ids if chars else max(1, ids)
    hop = _header(request, HOP_HEADER)
    if hop is not None and hop not in config.regions:
        raise HttpError(400, f"{HOP_HEADER} names no region of this fleet (it is set by routers)")
    waited_s = _waited_s(request) if hop is not None else 0.0
    residency = _header(request, RESIDENCY_HEADER)
    if residency is not None:
        known = {r.residency for r in config.regions.values() if r.residency}
        if residency not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise HttpError(400, f"unknown {RESIDENCY_HEADER} {residency!r}; this fleet's residencies: {listed}")
    else:
        residency = config.region.residency
    headers = {"Content-Type": "application/json", HOP_HEADER: hop or config.region.key}
    auth = _header(request, "Authorization")
    if auth is not None:
        headers["Authorization"] = auth
    explain = request.headers.get(EXPLAIN_HEADER) == "1"
    if explain:
        headers[EXPLAIN_HEADER] = "1"  # a peer that serves it explains its own choice
    routed = RoutedRequest(
        need_tokens=prompt_tokens + (max_tokens or DEFAULT_MAX_TOKENS),
        model=model,
        residency=residency,
        affinity_key=str(hash(body[:256])),
        allow_remote=hop is None,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        # longest-prefix affinity: chained hashes of the prompt's ~512-token text blocks
        prefix=text_chain(prompt_text(kind, payload)),
        prefix_block_tokens=TEXT_BLOCK_CHARS // 4,
        explain=explain,
        waited_s=waited_s,
    )
    stream = payload.get("stream") is True
    room_until = min(deadline, arrived + (config.settings.queue_wait_s if hop is None else 0.0))
    return Job(kind, request.path, body, payload, stream, prompt_tokens, routed, headers, deadline, received,
               room_until)  # fmt: skip
