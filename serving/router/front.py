"""The router's connections start here: completion requests in the usual shape are read and answered
by this small HTTP/1.1 front; any other request hands its connection to aiohttp for good.

Why: aiohttp's server costs ~0.1 ms per request on top of the handler (its request and response
objects, routing, middleware, payload stream and writer; docs/router.md, Benchmark), as much as the
rest of a streamed request's router work. The usual request, `POST /v1/chat/completions` or
`/v1/completions` over HTTP/1.1 with a Content-Length body, takes a few lines to read; everything
else (other paths and methods, chunked or oversized bodies, `Expect`, malformed or unusual heads)
goes to aiohttp, bytes untouched, with its own answers for the unusual (413, 400, 404, lingering).

The same limits hold on both (limits.py): the first head within `header_timeout_s`, later ones
within `keepalive_timeout_s` of the last answer, the body within `body_timeout_s` (408 after), the
connection cap counting both kinds, and the handler cancelled when its client goes away. Requests
on one connection are answered in order; bytes that arrive during an answer wait (reading pauses
past `PIPELINE_LIMIT`).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from gpufleet.serving.router.errors import HttpError, json_errors
from gpufleet.serving.router.relay import ClientGone, ClientOut
from multidict import CIMultiDict

if TYPE_CHECKING:
    from gpufleet.serving.router.limits import ServerLimits

log = logging.getLogger("gpufleet.router")

MAX_HEAD_BYTES = 16 * 1024  # a longer head goes to aiohttp (its limits answer it)
MAX_LINE_BYTES = 8190  # aiohttp's max_line_size / max_field_size (limits.py)
PIPELINE_LIMIT = 256 * 1024  # bytes of later requests held while one is answered before reading pauses

HOT_PATHS = {b"/v1/chat/completions": "chat", b"/v1/completions": "completions"}
# Control characters other than tab, anywhere in a head (CR LF pairs removed first): aiohttp's parser
# refuses them; so must anything that forwards header values.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a header name (RFC 9110, token)
# Heads whose meaning the front does not implement: aiohttp answers them.
_NOT_HERE = ("Transfer-Encoding", "Expect", "Upgrade")

Handler = Callable[["LeanRequest"], Awaitable[web.StreamResponse]]


class FrontServer(Protocol):
    """What a front needs of the server that made it (limits.py `_Server`)."""

    limits: ServerLimits
    max_body_bytes: int
    lingering_s: float  # after an answer that leaves bytes unread, what comes is dropped this long
    hot: dict[str, Handler]
    fronts: set[Front]

    def aiohttp_protocol(self) -> asyncio.Protocol: ...


class _Head:
    __slots__ = ("kind", "path", "headers", "length", "start", "keep_alive")

    def __init__(self, kind: str, path: str, headers: CIMultiDict[str], length: int, start: int, keep_alive: bool):
        self.kind, self.path, self.headers, self.length = kind, path, headers, length
        self.start, self.keep_alive = start, keep_alive


def parse_head(buf: bytes, end: int) -> _Head | None:
    """The head that ends at `end` (its blank line), when it is a completion request the front
    answers; None: aiohttp's."""
    raw = buf[:end]
    lines = raw.split(b"\r\n")
    request_line = lines[0].split(b" ")
    if len(request_line) != 3 or request_line[0] != b"POST" or request_line[2] != b"HTTP/1.1":
        return None
    kind = HOT_PATHS.get(request_line[1])
    if kind is None or _CONTROL.search(raw.replace(b"\r\n", b"")):
        return None
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or len(line) > MAX_LINE_BYTES or not _TOKEN.fullmatch(name):
            return None  # no colon, an obsolete folded line, space before the colon, too long
        headers.add(name.decode("ascii"), value.strip(b" \t").decode("utf-8", "surrogateescape"))
    lengths = headers.getall("Content-Length", ())
    if len(lengths) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
        return None
    if any(name in headers for name in _NOT_HERE):
        return None
    connection = headers.get("Connection", "").lower()
    if "upgrade" in connection:
        return None
    path = request_line[1].decode("ascii")
    return _Head(kind, path, headers, int(lengths[0]), end + 4, "close" not in connection)


class LeanRequest:
    """The parts of aiohttp's `web.Request` that the completion handlers use, for a request read by
    the front: its whole body is here before the handler starts."""

    method = "POST"

    def __init__(self, head: _Head, body: bytes, front: Front) -> None:
        self.kind = head.kind
        self.path = head.path
        self.headers = head.headers
        self.body = body
        self.keep_alive = head.keep_alive
        self.transport: asyncio.Transport | None = front.transport
        self.writer = front  # `drain()`, as aiohttp's writer
        self.started = False  # bytes of the answer went out
        self.finished = False  # the whole answer went out


class Front(asyncio.Protocol):
    """One client connection, while its requests are completion requests in the usual shape."""

    def __init__(self, server: FrontServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self._parts: list[bytes] = []  # bytes not yet taken by a request
        self._size = 0
        self._head: _Head | None = None  # read; its body not complete yet
        self._task: asyncio.Task[None] | None = None  # the request being answered
        self._timer: asyncio.TimerHandle | None = None  # head, body or keep-alive deadline
        self._read_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._closed = False
        self._lingering = False  # answered and closing: what still comes is dropped

    # ---- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.fronts.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:  # as aiohttp's handler: no Nagle delay on small writes (40 ms stalls), TCP keep-alive
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass
        self._set_timer(self.server.limits.header_timeout_s, self._idle_due)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        self._parts.append(data)
        self._size += len(data)
        if self._task is None:
            self._advance()
        elif self._size > PIPELINE_LIMIT and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False  # close, as aiohttp does: a half-closed client has gone

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        self.server.fronts.discard(self)
        self._cancel_timer()
        if self._task is not None:
            self._task.cancel()  # the handler cancels the request upstream
        self._wake_drain(ConnectionResetError("client connection lost"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain(None)

    async def drain(self) -> None:
        """Until the client has taken most of what waits for it (aiohttp's `writer.drain()`)."""
        if self._closed:
            raise ConnectionResetError("client connection lost")
        if not self._write_paused:
            return
        self._drain = self.loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    # ---- reading requests ------------------------------------------------------------------------

    def _advance(self) -> None:
        """Start answering the next request once its head and body are here; hand the connection to
        aiohttp at the first request that is not for the front."""
        while self._task is None and self._size and not self._closed:
            head = self._head
            if head is None:
                buf = self._joined()
                end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
                if end < 0:
                    if self._size >= MAX_HEAD_BYTES:
                        self._hand_over()
                    return  # the head is not complete: the header / keep-alive deadline runs
                head = parse_head(buf, end)
                if head is None or head.length > self.server.max_body_bytes:
                    self._hand_over()
                    return
                self._head = head
                self._cancel_timer()
            need = head.start + head.length
            if self._size < need:
                if self._timer is None:
                    self._set_timer(self.server.limits.body_timeout_s, self._body_due)
                return
            self._cancel_timer()
            buf = self._joined()
            body, rest = buf[head.start : need], buf[need:]
            self._parts, self._size = ([rest], len(rest)) if rest else ([], 0)
            self._head = None
            self._task = self.loop.create_task(self._answer(LeanRequest(head, body, self)))

    def _joined(self) -> bytes:
        parts = self._parts
        if len(parts) > 1:
            self._parts = parts = [b"".join(parts)]
        return parts[0]

    def _hand_over(self) -> None:
        """aiohttp's from now on, with what this connection sent since its last answer."""
        transport = self.transport
        assert transport is not None and self._task is None
        self._closed = True  # for this front
        self.server.fronts.discard(self)
        self._cancel_timer()
        data = b"".join(self._parts)
        self._parts, self._size = [], 0
        handler = self.server.aiohttp_protocol()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._read_paused:
            transport.resume_reading()
        if data:
            handler.data_received(data)

    # ---- answering ---------------------------------------------------------------------------------

    async def _answer(self, request: LeanRequest) -> None:
        keep = False
        try:
            handler = self.server.hot[request.kind]
            response = await json_errors(request, handler)  # type: ignore[arg-type]
            transport = self.transport
            if request.finished:
                keep = request.keep_alive
            elif (
                not request.started
                and isinstance(response, web.Response)  # not a stream that ended before its first byte
                and transport is not None
                and not transport.is_closing()
            ):
                close = response.keep_alive is False or not request.keep_alive
                transport.write(serialize(response, close))
                keep = not close
            if keep and self._write_paused:
                # The next request waits until this client has taken most of its answers (as
                # aiohttp's write_eof drains): a client that pipelines and never reads gets no more
                # answers buffered, and one that takes none for keepalive_timeout_s is closed.
                async with asyncio.timeout(self.server.limits.keepalive_timeout_s):
                    await self.drain()
        except asyncio.CancelledError:
            return  # the client went away (or the server shuts down): nothing to answer
        except (ConnectionError, TimeoutError):
            keep = False  # the client went away, or stopped taking its answers
        except Exception as exc:  # an answer that cannot be written: the connection is done
            log.error("error answering %s: %s: %s", request.path, type(exc).__name__, exc)
        finally:
            self._task = None
        if not keep or self._closed:
            self._close(linger=self._size > 0)
            return
        self._set_timer(self.server.limits.keepalive_timeout_s, self._idle_due)
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        if self._size:
            self._advance()

    async def shutdown(self, timeout: float | None) -> None:
        """Let the answer in progress finish for up to `timeout` s, then cancel it and close."""
        self._cancel_timer()
        task = self._task
        if task is not None and timeout:
            await asyncio.wait({task}, timeout=timeout)
        if self._task is not None:
            self._task.cancel()
        if self.transport is not None:
            self.transport.close()

    # ---- deadlines -----------------------------------------------------------------------------------

    def _set_timer(self, seconds: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(seconds, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_due(self) -> None:
        # No complete head in time: idle since it opened or since its last answer, or dripping in.
        self._timer = None
        if self._task is None and self._head is None and self.transport is not None:
            self.transport.close()

    def _body_due(self) -> None:
        self._timer = None
        if self._task is not None or self._head is None or self.transport is None:
            return
        error = HttpError(408, f"the request body did not arrive within {self.server.limits.body_timeout_s:g} s")
        self.transport.write(serialize(error.response(), close=True))
        self._close(linger=True)

    def _close(self, linger: bool) -> None:
        """Close; with `linger`, after the client has had a moment to read the answer (closing on
        bytes it sent and we did not read would reset the connection, the answer unread)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not linger or self._closed:
            transport.close()
            return
        self._lingering = True
        self._parts, self._size = [], 0
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self.loop.call_later(self.server.lingering_s, transport.close)

    def _wake_drain(self, error: BaseException | None) -> None:
        waiter = self._drain
        if waiter is not None and not waiter.done():
            waiter.set_exception(error) if error is not None else waiter.set_result(None)


class LeanClientOut(ClientOut):
    """A streamed answer's client side on a front connection: the head goes out with the first
    events, the end of the chunked body with the last ones (as `ClientOut` does through aiohttp)."""

    request: LeanRequest  # type: ignore[assignment]

    def __init__(self, request: LeanRequest, response: web.StreamResponse) -> None:
        super().__init__(request, response)  # type: ignore[arg-type]
        self._head = b""

    async def start(self) -> None:
        response = self.response
        self._head = head_bytes(response.status, response.reason, response.headers, None, not self.request.keep_alive)

    async def write(self, data: bytes) -> None:
        if self.last:
            data, self.last = self.last + data, b""
        if not data:
            return
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ClientGone(self.response)
        transport.write(self._head + b"%x\r\n%b\r\n" % (len(data), data))
        self._head = b""
        self.request.started = True

    async def drain(self) -> None:
        try:
            await self.request.writer.drain()
        except ConnectionError as exc:
            raise ClientGone(self.response) from exc

    async def end(self) -> None:
        last, self.last = self.last, b""
        transport = self.request.transport
        if transport is None or transport.is_closing():
            return
        chunk = b"%x\r\n%b\r\n" % (len(last), last) if last else b""
        transport.write(self._head + chunk + b"0\r\n\r\n")
        self._head = b""
        self.request.started = self.request.finished = True


# ---- writing heads ---------------------------------------------------------------------------------

_SKIP = frozenset({"content-length", "transfer-encoding", "connection", "date", "server"})
_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    return _date[1]


def head_bytes(status: int, reason: str, headers: Mapping[str, str], length: int | None, close: bool) -> bytes:
    """An answer's head: `length` None for a chunked body. Header values holding CR or LF (from an
    engine's answer, say) are dropped rather than sent."""
    lines = [f"HTTP/1.1 {status} {reason}", f"Date: {_http_date()}", "Server: gpufleet-router"]
    for name, value in headers.items():
        if name.lower() in _SKIP or "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            continue
        lines.append(f"{name}: {value}")
    lines.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def serialize(response: web.StreamResponse, close: bool) -> bytes:
    """A whole answer the handler returned (a `web.Response` with a bytes body, not prepared)."""
    body = getattr(response, "body", None)
    if body is None:
        body = b""
    if not isinstance(body, bytes | bytearray):
        raise TypeError(f"cannot write a {type(body).__name__} body")
    headers: Mapping[str, str] = response.headers
    if "Content-Type" not in headers and body:
        headers = {**headers, "Content-Type": "application/octet-stream"}
    return head_bytes(response.status, response.reason, headers, len(body), close) + bytes(body)
