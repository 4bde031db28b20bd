"""Relaying a streamed answer: server-sent events as they arrive, up to the last complete event.

What arrives is written on at once, up to its last complete event (a client never sees half an
event, so a continuation can follow any byte sent); several events that arrived together go out in
one write. Per chunk the relay does C-level work only (a search for [DONE], a count of data lines,
an append): events are split and parsed before the first token, when a stream breaks, or in 64 KiB
batches; a continuation's events are parsed one by one (their ids and usage are rewritten).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from gpufleet.serving.router.parsing import Job
from gpufleet.serving.router.policy import Candidate

if TYPE_CHECKING:
    from gpufleet.serving.router.gateway import Router

_RAW_LIMIT = 64 * 1024  # unparsed SSE payload bytes kept per stream before a batch parse
PROGRESS_EVERY = 8  # tokens between two updates of a stream's reservation (OptimisticLedger)


class Upstream(Exception):
    """One attempt failed before the client saw a byte; try the next candidate.

    `penalize`: the target's fault (False: e.g. it is merely full, 429). `suspect`: it answered a 5xx
    that may be the request's fault rather than the engine's (decided by one more engine)."""

    def __init__(self, reason: str, penalize: bool = True, suspect: bool = False) -> None:
        super().__init__(reason)
        self.penalize = penalize
        self.suspect = suspect


class ClientGone(Exception):
    """The client went away; `response` is what was already started for it (if anything)."""

    def __init__(self, response: web.StreamResponse | None = None) -> None:
        super().__init__("client gone")
        self.response = response


@dataclass
class Stream:
    """What has been relayed of one streamed answer so far (for continuation).

    Only a broken stream needs the text, so the relay does not parse events: it keeps each relayed
    event's `data:` payload in `raw` and `settle()` parses them when the text is wanted (a break), or
    in one batch once `raw` grows past `_RAW_LIMIT` bytes (bounds memory on long answers).
    """

    text: list[str] = field(default_factory=list)
    tokens: int = 0  # text pieces in `text`
    finished: bool = False  # a finish_reason was relayed
    chunk_id: str | None = None
    bytes_out: int = 0
    key: object = None  # the current attempt's ledger entry
    raw: list[bytes] = field(default_factory=list)  # relayed runs of complete events, not parsed yet
    raw_bytes: int = 0
    raw_events: int = 0  # `data:` lines in `raw`
    # Tokens the client had received when the current continuation began: its engine counts them as
    # prompt, and the usage the client sees must count them as completion (`whole_usage`).
    prior_tokens: int = 0
    # The original prompt's tokens as an engine's /tokenize counts them (continuation.py), when a
    # continued stream reports usage; None: not asked or not known.
    prompt_tokens: int | None = None

    def add(self, events: bytes) -> None:
        """Keep a run of complete events (ending with a blank line) for a later parse: per chunk only
        C-level work (a count and an append)."""
        self.raw.append(events)
        self.raw_bytes += len(events)
        # Data lines start the run or follow a newline (JSON text holds no raw newline).
        self.raw_events += events.count(b"\ndata:") + events.startswith(b"data:")
        if self.raw_bytes > _RAW_LIMIT:
            self.settle()

    @property
    def materialized(self) -> int:
        """Tokens relayed so far; an unparsed data line counts as one (exact after `settle`)."""
        return self.tokens + self.raw_events

    def settle(self) -> None:
        """Parse the pending events into text, tokens, finished and the first chunk id."""
        raw, self.raw, self.raw_bytes, self.raw_events = self.raw, [], 0, 0
        if not raw:
            return
        payloads = [p for p in _payloads(b"".join(raw)) if p != b"[DONE]"]
        if not payloads:
            return
        try:
            # One C-level parse for the lot; a payload that is not one JSON value each (garbage, or
            # text that would merge with its neighbours) falls back to one parse per payload.
            chunks = json.loads(b"[" + b",".join(payloads) + b"]")
            if len(chunks) != len(payloads):
                raise ValueError("payloads do not map one to one")
        except (ValueError, RecursionError):
            chunks = [loads_or_none(d) for d in payloads]
        for chunk in chunks:
            self.note(chunk)

    def note(self, chunk: Any) -> None:
        """Note the text one parsed chunk carries."""
        if not isinstance(chunk, dict):
            return
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str) and text:
                self.text.append(text)
                self.tokens += 1
            if choice.get("finish_reason"):
                self.finished = True
        if self.chunk_id is None and isinstance(chunk.get("id"), str):
            self.chunk_id = chunk["id"]


def loads_or_none(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def whole_usage(usage: Any, prior_tokens: int, prompt_tokens: int | None = None) -> bool:
    """Make a continuation's usage that of the whole answer the client received: its engine counted
    the `prior_tokens` already relayed as prompt; they are completion. The prompt is the original
    one: `prompt_tokens` when known (an engine's /tokenize), else what the continuation's engine
    counted less the relayed tokens (off by a token or two where the text so far tokenizes
    differently joined to the prompt). True if changed."""
    if not prior_tokens or not isinstance(usage, dict):
        return False
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int:
        return False
    usage["prompt_tokens"] = prompt_tokens if prompt_tokens is not None else max(0, prompt - prior_tokens)
    usage["completion_tokens"] = completion + prior_tokens
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return True


async def write(out: web.StreamResponse, data: bytes) -> None:
    try:
        if data:
            await out.write(data)
    except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
        raise ClientGone(out) from exc


async def finish(resp: aiohttp.ClientResponse, limit_s: float = 1.0) -> None:
    """Read an answer's end (the chunked body's terminator, which may come after [DONE] in a packet
    of its own), so that its connection goes back to the pool rather than being closed: under load
    about one stream in ten ended before its terminator, and each such stream cost the next
    request a new TCP connection. Anything after [DONE] is dropped, as it is never relayed."""
    content = resp.content
    if content.is_eof():
        return
    try:
        async with asyncio.timeout(limit_s):
            while await content.readany():
                pass
    except (aiohttp.ClientError, TimeoutError, OSError):
        pass


def set_idle_timeout(resp: aiohttp.ClientResponse, seconds: float) -> None:
    """From now on, a read on this response that waits longer than `seconds` fails (aiohttp's
    sock_read, changed on the open connection and restarted from now)."""
    conn = resp.connection
    proto = conn.protocol if conn is not None else None
    if proto is not None:
        proto.read_timeout = seconds
        if not resp.content.is_eof():  # at EOF aiohttp has dropped the timer for good
            proto.start_timeout()


async def pump(
    router: Router,
    job: Job,
    resp: aiohttp.ClientResponse,
    out: web.StreamResponse,
    stream: Stream,
    rewrite_id: bool,
    cand: Candidate,
) -> tuple[bool, str]:
    """Relay SSE events until [DONE]. Returns (completed, why it broke)."""
    tail = b""  # an incomplete event, waiting for the rest
    first = stream.bytes_out == 0 and not rewrite_id
    content = resp.content
    # Until its first token the request may rightly wait in the engine's queue: reads wait up to
    # the deadline (set in `_open`; the hung-engine watch applies). From the first token on,
    # silence longer than idle_timeout_s means the stream broke. Not from the first byte: an
    # engine may send the role chunk before the request leaves its queue.
    started = False
    tokens_before = stream.tokens  # a continuation starts with the text already relayed
    noted = -PROGRESS_EVERY  # tokens the ledger was last told of (the first chunk is told at once)
    try:
        while True:
            data = await (content.readany() if started else router.watched(content.readany(), cand))
            if not data:
                break
            if first:
                t_in = time.perf_counter()
            if tail:
                data = tail + data
            if b"\r" in data:  # CRLF line ends: normalise, so events split on one separator
                data = data.replace(b"\r\n", b"\n")
            end = data.rfind(b"\n\n")
            if end < 0:
                tail = data
                continue
            end += 2
            data, tail = data[:end], data[end:]
            data, done = _events(data, stream, rewrite_id)
            await write(out, data)
            if first:
                router.metrics.overhead_relay.observe(time.perf_counter() - t_in)
                first = False
            stream.bytes_out += len(data)
            if done:
                return True, ""
            if not started:
                stream.settle()  # parse only until the first token
                if stream.tokens > tokens_before or stream.finished:
                    set_idle_timeout(resp, router.config.settings.idle_timeout_s)
                    started = True
            # The ledger learns the tokens the engine now holds, in steps of PROGRESS_EVERY: the
            # reservation stays at most that many tokens above the truth (never below).
            if stream.materialized - noted >= PROGRESS_EVERY:
                noted = stream.materialized
                router.ledger.progress(stream.key, job.prompt_tokens + noted)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return False, f"{type(exc).__name__}"
    except Upstream as exc:  # the scraper found the engine dead while the request waited
        return False, str(exc)
    return False, "stream ended without [DONE]"


def _payloads(data: bytes) -> list[bytes]:
    """The `data:` payloads of complete events, in order (one line each in the usual shape)."""
    out = []
    for event in data.split(b"\n\n"):
        if event.startswith(b"data: ") and b"\n" not in event:
            out.append(event[6:].strip())
        elif event:
            out.extend(ln[5:].strip() for ln in event.split(b"\n") if ln.startswith(b"data:"))
    return out


def _events(data: bytes, stream: Stream, rewrite_id: bool) -> tuple[bytes, bool]:
    """Note the complete events in `data` (it ends with a separator); returns what to relay and
    whether [DONE] came. Nothing after [DONE] is relayed."""
    if rewrite_id:
        events = data.split(b"\n\n")
        events.pop()
        return _rewrite(events, stream)
    if b"[DONE]" not in data:  # the usual chunk: kept whole, split and parsed only when needed
        stream.add(data)
        return data, False
    pos = 0
    for event in data.split(b"\n\n")[:-1]:
        end = pos + len(event) + 2
        if b"[DONE]" in _payloads(event + b"\n\n"):
            if pos:
                stream.add(data[:pos])
            return data[:end], True
        pos = end
    stream.add(data)  # "[DONE]" inside some text, not as a payload of its own
    return data, False


def _rewrite(events: list[bytes], stream: Stream) -> tuple[bytes, bool]:
    """A continuation's events, each chunk parsed at once: the first stream's id, the whole
    answer's usage."""
    out: list[bytes] = []
    for event in events:
        lines = [ln + b"\n" for ln in event.split(b"\n") if ln.strip()]
        if not lines:
            continue
        for i, line in enumerate(lines):
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    out.append(b"data: [DONE]\n\n")
                    return b"".join(out), True
                lines[i] = _observe(payload, stream) or line
        out.extend(lines)
        out.append(b"\n")
    return b"".join(out), False


def _observe(data: bytes, stream: Stream) -> bytes | None:
    """Note the text a continuation's chunk carries; give it the first stream's id and the whole
    answer's usage. The new line when it changed, else None."""
    stream.settle()
    chunk = loads_or_none(data)
    stream.note(chunk)
    if not isinstance(chunk, dict):
        return None
    changed = whole_usage(chunk.get("usage"), stream.prior_tokens, stream.prompt_tokens)
    if stream.chunk_id is not None and chunk.get("id") != stream.chunk_id:
        chunk["id"] = stream.chunk_id
        changed = True
    if changed:
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n"
    return None
