"""Relaying a streamed answer: server-sent events as they arrive, up to the last complete event.

What arrives is written on at once, up to its last complete event (a client never sees half an
event, so a continuation can follow any byte sent); several events that arrived together go out in
one write. Until the first token the request's task reads the engine's answer and writes through
aiohttp (the head goes out with the first events). From the first token on, the engine
connection's own callback (upstream.py) frames each chunk and writes it to the client's connection
as an HTTP/1.1 chunk: no task wakes per chunk. The last events go out with the answer's end in one
write. A client that does not keep up pauses the reading of the engine connection until it has
taken what waits for it.

Per chunk the relay does C-level work only (a search for [DONE], a count of data lines, an append):
events are split and parsed before the first token, when a stream breaks, or in 64 KiB batches; a
continuation's events are parsed one by one (their ids and usage are rewritten).
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

if TYPE_CHECKING:
    from gpufleet.serving.router.gateway import Router
    from gpufleet.serving.router.upstream import Response

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
    # (engine, the policy's predicted TTFT in engine seconds, when it was sent): the router measures
    # the TTFT against it at the first token (`Router.first_token`); None: nothing to measure
    probe: tuple[str, float, float] | None = None

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


class EventStream(web.StreamResponse):
    """A streamed answer whose head waits for its first events and goes out with them in one write
    (web.Response's behaviour; a StreamResponse sends its head at once)."""

    _send_headers_immediately = False


class ClientOut:
    """The client's side of a streamed answer. aiohttp writes its head (with the first events) and
    its end (with the last events); in between the relay writes each run of events to the
    connection itself, framed as an HTTP/1.1 chunk, from the upstream connection's callback
    (`_Relay.feed`)."""

    HIGH_WATER = 64 * 1024  # unsent bytes to a slow client before the upstream read pauses

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self.request = request
        self.response = response
        self.last = b""  # the answer's last events, sent with its end (`end`)

    async def start(self) -> None:
        self.response.enable_chunked_encoding()
        try:
            await self.response.prepare(self.request)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            raise ClientGone() from exc

    async def write(self, data: bytes) -> None:
        if self.last:
            data, self.last = self.last + data, b""
        try:
            if data:
                await self.response.write(data)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            raise ClientGone(self.response) from exc

    def send(self, data: bytes) -> bool:
        """Write at once, as one chunk (after a first `write`, which sent the head). True when the
        client is slow to take it: more than HIGH_WATER bytes wait to go out."""
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ClientGone(self.response)
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return transport.get_write_buffer_size() > self.HIGH_WATER

    async def drain(self) -> None:
        try:
            await self.request.writer.drain()
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            raise ClientGone(self.response) from exc

    async def end(self) -> None:
        last, self.last = self.last, b""
        try:
            await self.response.write_eof(last)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass

    @property
    def broken_on_purpose(self) -> bool:
        """The relay was cut (continuation.py, a forwarded stream): nothing more to send."""
        transport = self.request.transport
        return transport is None or transport.is_closing()


class _Relay:
    """One attempt's relay. Until the first token the request's task reads and writes (`frame`,
    `progress`); from then on `push` hands the answer to the upstream connection's callback
    (`feed`), which frames each chunk and writes it on to the client at once, and the task sleeps
    until the end, or until a slow client must be waited for."""

    def __init__(self, router: Router, job: Job, resp: Response, out: ClientOut, stream: Stream,
                 rewrite_id: bool) -> None:  # fmt: skip
        self.router, self.job, self.resp, self.out = router, job, resp, out
        self.stream, self.rewrite_id = stream, rewrite_id
        self.tail = b""  # an incomplete event, waiting for the rest
        self.noted = -PROGRESS_EVERY  # tokens the ledger was last told of (the first chunk at once)
        self.result: tuple[bool, str] | ClientGone | None = None
        self.congested = False
        self.waiter: asyncio.Future[None] | None = None

    def frame(self, data: bytes) -> tuple[bytes, bool]:
        """The complete events that `data` ends (to relay) and whether [DONE] came."""
        if self.tail:
            data = self.tail + data
        if b"\r" in data:  # CRLF line ends: normalise, so events split on one separator
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self.tail = data
            return b"", False
        end += 2
        data, self.tail = data[:end], data[end:]
        return _events(data, self.stream, self.rewrite_id)

    def progress(self) -> None:
        # The ledger learns the tokens the engine now holds, in steps of PROGRESS_EVERY: the
        # reservation stays at most that many tokens above the truth (never below).
        stream = self.stream
        if stream.materialized - self.noted >= PROGRESS_EVERY:
            self.noted = stream.materialized
            self.router.ledger.progress(stream.key, self.job.prompt_tokens + self.noted)

    # ---- from the first token on: pushed ---------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.result is not None:
            return
        data, done = self.frame(data)
        if not data:
            return
        self.stream.bytes_out += len(data)
        if done:  # the last events go out with the answer's end, in one write
            self.out.last = data
            self._end((True, ""))
            return
        try:
            congested = self.out.send(data)
        except ClientGone as exc:
            self._end(exc)
            return
        self.progress()
        if congested:
            self.resp.pause_reading()
            self.congested = True
            self._wake()

    def end(self, error: BaseException | None) -> None:
        if self.result is None:
            self._end((False, type(error).__name__ if error else "stream ended without [DONE]"))

    def _end(self, result: tuple[bool, str] | ClientGone) -> None:
        self.result = result
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def push(self) -> tuple[bool, str]:
        self.resp.unwatch()  # streaming: silence is the idle timeout's business now
        self.resp.set_idle_timeout(self.router.config.settings.idle_timeout_s)
        self.resp.push(self)
        loop = asyncio.get_running_loop()
        while self.result is None:
            if self.congested:
                self.congested = False
                await self.out.drain()
                self.resp.resume_reading()
                continue
            self.waiter = loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        if isinstance(self.result, ClientGone):
            raise self.result
        return self.result


async def pump(
    router: Router,
    job: Job,
    resp: Response,
    out: ClientOut,
    stream: Stream,
    rewrite_id: bool,
) -> tuple[bool, str]:
    """Relay SSE events until [DONE]. Returns (completed, why it broke)."""
    relay = _Relay(router, job, resp, out, stream, rewrite_id)
    first = stream.bytes_out == 0 and not rewrite_id
    # Until its first token the request may rightly wait in the engine's queue: reads wait up to
    # the deadline (set in `open_upstream`; the hung-engine watch applies). From the first token on,
    # silence longer than idle_timeout_s means the stream broke. Not from the first byte: an
    # engine may send the role chunk before the request leaves its queue.
    tokens_before = stream.tokens  # a continuation starts with the text already relayed
    try:
        while True:
            data = await resp.read_some()  # watched for a hung engine (Router.watchers)
            if not data:
                return False, "stream ended without [DONE]"
            if first:
                t_in = time.perf_counter()
            data, done = relay.frame(data)
            if not data:
                continue
            if done:
                out.last = data  # goes out with the answer's end, in one write
            else:
                await out.write(data)
            if first:
                router.metrics.overhead_relay.observe(time.perf_counter() - t_in)
                first = False
            stream.bytes_out += len(data)
            if done:
                return True, ""
            stream.settle()  # parse only until the first token
            relay.progress()
            if stream.tokens > tokens_before or stream.finished:
                router.first_token(stream)
                return await relay.push()
    except (TimeoutError, OSError) as exc:
        return False, f"{type(exc).__name__}"
    except Upstream as exc:  # the scraper found the engine dead while the request waited
        return False, str(exc)


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
