"""Continuing a broken stream on another engine, so the client sees one stream.

Chat: the text so far becomes a final assistant message that vLLM continues
(continue_final_message=true, add_generation_prompt=false); completions: the prompt plus the text.
max_tokens shrinks by what was sent and `echo` is dropped (vLLM would repeat the prefix: the prompt
for completions, the continued assistant message for chat). The continuation's chunks get the first
stream's id, and its usage is made the whole answer's (`relay.whole_usage`): the original prompt as
an engine's /tokenize counts it, every completion token of both engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from gpufleet.serving.router.admission import anything_up
from gpufleet.serving.router.errors import error_body
from gpufleet.serving.router.parsing import Job
from gpufleet.serving.router.policy import Candidate
from gpufleet.serving.router.relay import ClientOut, Stream, Upstream, pump

if TYPE_CHECKING:
    from gpufleet.serving.router.gateway import Router


def continuation_payload(
    kind: str, payload: dict[str, Any], text: str, tokens_sent: int
) -> dict[str, Any] | None:
    """The request that continues an answer from `text` (what the client has already received).

    None when the request cannot be continued (several choices, a token-id prompt, or nothing left
    to generate).
    """
    if payload.get("n", 1) not in (1, None) or payload.get("best_of", 1) not in (1, None):
        return None
    p = dict(payload)
    p.pop("echo", None)
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(p.get(key), int):
            left = p[key] - tokens_sent
            if left < 1:
                return None
            p[key] = left
    if kind == "chat":
        messages = list(payload["messages"])
        last = messages[-1] if messages else None
        if (
            payload.get("continue_final_message")
            and isinstance(last, dict)
            and last.get("role") == "assistant"
            and isinstance(last.get("content"), str)
        ):
            messages[-1] = {**last, "content": last["content"] + text}
        else:
            messages.append({"role": "assistant", "content": text})
        p["messages"] = messages
        p["continue_final_message"] = True
        p["add_generation_prompt"] = False
        return p
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        return None
    p["prompt"] = prompt + text
    return p


TOKENIZE_TIMEOUT_S = 1.0
# What vLLM's /tokenize takes besides the prompt, so it renders the chat as the completion did
# (vllm/entrypoints/openai/protocol.py, TokenizeChatRequest and TokenizeCompletionRequest, v0.11.0).
_TOKENIZE_CHAT = ("model", "messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
                  "chat_template", "chat_template_kwargs", "tools", "mm_processor_kwargs")  # fmt: skip
_TOKENIZE_COMPLETION = ("model", "prompt", "add_special_tokens")


def _wants_usage(payload: dict[str, Any]) -> bool:
    opts = payload.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


async def original_prompt_tokens(router: Router, job: Job, cand: Candidate) -> int | None:
    """The original prompt's token count from an engine's /tokenize (the continuation's engine, or
    for a peer any healthy local engine), for the usage of a continued stream; None when no engine
    answers in time (the usage then derives it from the continuation's count)."""
    engine = cand.engine or next((u for u, st in router.scraper.engines.items() if st.healthy), None)
    if engine is None or router.session is None:
        return None
    keys = _TOKENIZE_CHAT if job.kind == "chat" else _TOKENIZE_COMPLETION
    body = {k: job.payload[k] for k in keys if k in job.payload}
    try:
        async with asyncio.timeout(TOKENIZE_TIMEOUT_S):
            async with router.session.post(engine + "/tokenize", json=body) as r:
                if r.status != 200:
                    return None
                data = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None
    count = data.get("count") if isinstance(data, dict) else None
    return count if type(count) is int and count >= 0 else None


async def continue_stream(
    router: Router,
    request: web.Request,
    job: Job,
    broken: Candidate,
    out: ClientOut,
    stream: Stream,
    why: str,
) -> bool:
    """Continue a broken stream elsewhere; on failure end it with an error event. True if completed."""
    stream.settle()  # the exact text the client has seen
    if stream.finished:
        # Everything but [DONE] arrived: close it properly.
        await out.write(b"data: [DONE]\n\n")
        router.metrics.outcome(broken.region, "ok")
        return True
    settings = router.config.settings
    failed = {broken.target}
    # Targets that answered 429: full a moment ago, not broken. They are asked again once room may
    # have come (the next scrape round), within the wait for room, and do not spend the retry budget.
    full: set[str] = set()
    # Nothing has room now (the failed engines' load just moved to the rest): wait for room rather
    # than break the stream. A new request waits queue_wait_s and then gets a clean 429 it can retry;
    # a broken stream is a lost request, so it waits as long as the router lets an engine be silent
    # mid-stream (idle_timeout_s) before it counts the stream as broken. A request forwarded by a
    # peer does not wait, as in admission: its origin has other regions.
    wait = settings.idle_timeout_s if job.routed.allow_remote else 0.0
    wait_until = min(job.deadline, router.clock() + wait)
    attempts = 0
    while attempts <= settings.retry_budget and router.clock() < job.deadline:
        # Nothing relayed yet: the original request is its own continuation.
        payload = (
            continuation_payload(job.kind, job.payload, "".join(stream.text), stream.tokens)
            if stream.text
            else job.payload
        )
        if payload is None:
            break
        stream.prior_tokens = stream.tokens
        # The new engine holds the prompt, the text so far and the rest: the same demand.
        cands = router.choose(replace(job.routed, exclude=frozenset(failed | full)))
        while not cands and (left := wait_until - router.clock()) > 0 and anything_up(router, job.routed):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(router.room_event().wait(), left)
            full.clear()
            cands = router.choose(replace(job.routed, exclude=frozenset(failed)))
        cand = router.take(cands)
        if cand is None:
            break
        if stream.prior_tokens and stream.prompt_tokens is None and _wants_usage(job.payload):
            stream.prompt_tokens = await original_prompt_tokens(router, job, cand)
        attempts += 1
        body = json.dumps(payload).encode()
        key = stream.key = object()
        router.note_sent(cand, job, key)
        resp = None
        done = False
        try:
            try:
                resp = await router.open_upstream(cand, job, body, continuation=True)
            except Upstream as exc:
                if exc.penalize:
                    failed.add(cand.target)
                    router.record(cand, ok=False)
                else:  # full (429), not broken
                    full.add(cand.target)
                    router.release(cand)
                    attempts -= 1
                continue
            if resp.status != 200:
                failed.add(cand.target)
                router.release(cand)
                continue
            done, why = await pump(router, job, resp, out, stream, True)
        except BaseException:
            router.release(cand)  # the client left (or the task was cancelled): not the engine's fault
            if resp is not None:
                resp.close()
                resp = None
            raise
        finally:
            if resp is not None:
                resp.release() if done else resp.close()
            router.note_done(cand, key)
        if done:
            router.record(cand, ok=True)
            router.metrics.continuations.labels("ok").inc()
            router.metrics.outcome(cand.region, "continued")
            return True
        router.record(cand, ok=False)
        failed.add(cand.target)
        stream.settle()
        if stream.finished:
            return await continue_stream(router, request, job, cand, out, stream, why)
    router.metrics.continuations.labels("failed").inc()
    if not job.routed.allow_remote and request.transport is not None:
        # A request forwarded by a peer: the origin router owns the client's stream and may try
        # regions this router may not (one hop only). Break the relay instead of ending it with
        # an error event, so the origin sees a broken stream and continues it elsewhere.
        request.transport.close()
        return False
    err = error_body(502, f"the stream broke ({why}) and could not be continued", "service_unavailable")
    await out.write(b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n")
    return False
