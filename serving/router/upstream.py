"""A lean HTTP/1.1 client for the requests the router sends upstream (engines and peer routers).

aiohttp's client costs, per streamed chunk, a parser callback, a StreamReader append, a future
woken and a task stepped, and a read-timer rescheduled; per request, its session and request
machinery. Profiled at 64 streams, that was a fifth of the router's CPU. This client keeps what the
router's POST upstream needs and nothing more: one request at a time per connection, kept alive
and pooled per host; bodies that are chunked, sized or end at EOF; TLS for https peers (the
default trust store, as aiohttp's). A body is either read (`read_some`, `read`) or pushed to a
sink from the connection's own callback (`push`), which is how the relay writes each chunk on to
the client without waking a task. An inactivity timer is one timer per idle period, not one per
chunk: each chunk only notes the time (`set_idle_timeout`).

Scrapes, summaries and /tokenize keep aiohttp: they are not per token.
"""

from __future__ import annotations

import asyncio
import ssl
from functools import lru_cache
from typing import Protocol
from urllib.parse import urlsplit

from multidict import CIMultiDict

MAX_HEAD_BYTES = 64 * 1024  # an answer's status line and headers
MAX_CHUNK_LINE = 1024  # a chunk-size line (with extensions)
PULL_HIGH_WATER = 256 * 1024  # unread body bytes before reading from the socket pauses
RECYCLE_WAIT_S = 1.0  # a released answer may finish its body this long to keep its connection
# A whole answer read into memory (not streamed) at most this large: vLLM's largest answers (many
# choices with logprobs) are megabytes; a peer that sends without end must not exhaust the router.
MAX_ANSWER_BYTES = 256 * 1024 * 1024

_HEAD, _BODY, _DONE = 0, 1, 2
_SIZE, _DATA, _CRLF, _TRAILER = 0, 1, 2, 3


class UpstreamError(ConnectionError):
    """The connection failed, or the answer broke or was not HTTP/1.1 as expected."""


class BodySink(Protocol):
    """Takes a pushed body: `feed` per piece, then `end` once (None: the body is complete)."""

    def feed(self, data: bytes) -> None: ...

    def end(self, error: BaseException | None) -> None: ...


@lru_cache(maxsize=1024)
def target_of(url: str) -> tuple[str, int, bool, str]:
    """(host, port, tls, path prefix) of an engine's or a peer's base URL."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return parts.hostname, parts.port or (443 if tls else 80), tls, parts.path.rstrip("/")


class Response:
    """One answer on one connection: its head, then its body, read or pushed."""

    status: int
    reason: str
    headers: CIMultiDict[str]

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        loop = conn.loop
        self._loop = loop
        self._state = _HEAD
        self._head = b""
        self._head_done: asyncio.Future[None] = loop.create_future()
        self._chunked = False
        self._left: int | None = None  # bytes left of a sized body, or of the current chunk
        self._cstate = _SIZE
        self._pending = b""  # an incomplete chunk-size or trailer line
        self.keep_alive = True
        self.error: BaseException | None = None
        self._buf: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._sink: BodySink | None = None
        self._discard = False  # released before its end: read on to keep the connection, drop it
        self._released = False
        self._recycle_timer: asyncio.TimerHandle | None = None
        self._idle_s: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self.last_rx = loop.time()
        self._watchers: set[Response] | None = None  # the set that watches this answer (`watch`)

    # ---- the consumer's side ---------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """The whole body arrived."""
        return self._state == _DONE

    async def head(self) -> None:
        await self._head_done

    async def read_some(self) -> bytes:
        """What arrived of the body since the last read (waits for something); b"" at its end."""
        while not self._buf:
            if self.error is not None:
                raise self.error
            if self._state == _DONE:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        buf, self._buf = self._buf, []
        if self._buffered > PULL_HIGH_WATER:
            self._conn.resume()
        self._buffered = 0
        return buf[0] if len(buf) == 1 else b"".join(buf)

    async def read(self, limit: int | None = None, max_bytes: int = MAX_ANSWER_BYTES) -> bytes:
        """The body to its end, or its first `limit` bytes or more. A body past `max_bytes` breaks
        the answer (UpstreamError; the connection closes)."""
        out: list[bytes] = []
        size = 0
        while limit is None or size < limit:
            data = await self.read_some()
            if not data:
                break
            out.append(data)
            size += len(data)
            if size > max_bytes:
                error = UpstreamError(f"answer larger than {max_bytes} bytes")
                self.abort(error)
                raise error
        return b"".join(out)

    def push(self, sink: BodySink) -> None:
        """From now on give the body to `sink` as it arrives (what was read and not taken first)."""
        self._sink = sink
        if self._buf:
            buf, self._buf = self._buf, []
            if self._buffered > PULL_HIGH_WATER:
                self._conn.resume()
            self._buffered = 0
            sink.feed(b"".join(buf))
        if self.error is not None:
            sink.end(self.error)
        elif self._state == _DONE:
            sink.end(None)

    def watch(self, watchers: set[Response] | None) -> None:
        """Be in `watchers` until `unwatch` or the answer's end, so that whoever holds the set may
        `abort` it (the router's hung-engine watch)."""
        if watchers is not None and self.error is None and not self._released:
            self._watchers = watchers
            watchers.add(self)

    def unwatch(self) -> None:
        if self._watchers is not None:
            self._watchers.discard(self)
            self._watchers = None

    def abort(self, error: BaseException) -> None:
        """Break the answer: its reader or sink gets `error`; the connection closes."""
        self._fail(error)
        self._conn.close()

    def pause_reading(self) -> None:
        self._conn.pause()

    def resume_reading(self) -> None:
        self._conn.resume()

    def set_idle_timeout(self, seconds: float) -> None:
        """From now on, a silence longer than `seconds` breaks the answer (TimeoutError)."""
        self._idle_s = seconds
        self.last_rx = self._loop.time()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self._loop.call_at(self.last_rx + seconds, self._idle_check)

    def release(self) -> None:
        """Done with this answer. Its connection goes back to the pool once the body has ended
        (within RECYCLE_WAIT_S: anything not yet read is dropped), else it is closed."""
        if self._released:
            return
        self._released = True
        self._sink = None
        self._buf, self._buffered = [], 0
        if self.error is not None or not self.keep_alive:
            self._conn.close()
        elif self._state == _DONE:
            self._recycle()
        else:
            self._discard = True
            self._conn.resume()
            self._recycle_timer = self._loop.call_later(RECYCLE_WAIT_S, self.close)

    def close(self) -> None:
        """Done with this answer; close its connection (an engine aborts a request whose connection
        closes, as vLLM does)."""
        self._released = True
        self._sink = None
        self._stop_timers()
        self._conn.close()

    # ---- the connection's side -------------------------------------------------------------------

    def _recycle(self) -> None:
        self._stop_timers()
        self._conn.recycle()

    def _stop_timers(self) -> None:
        self.unwatch()
        for timer in (self._idle_timer, self._recycle_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._recycle_timer = None

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._state == _DONE or self.error is not None or self._idle_s is None:
            return
        due = self.last_rx + self._idle_s
        if self._conn.paused or self._loop.time() < due:  # paused: our reader is slow, not the peer
            self._idle_timer = self._loop.call_at(max(due, self._loop.time() + 0.05), self._idle_check)
            return
        self._fail(TimeoutError(f"no data for {self._idle_s:g} s"))
        self._conn.close()

    def _data(self, data: bytes) -> None:
        self.last_rx = self._loop.time()
        if self._state == _HEAD:
            data = self._parse_head(data)
            if not data:
                return
        if self._state == _BODY:
            if self._chunked:
                self._dechunk(data)
            else:
                self._sized(data)

    def _parse_head(self, data: bytes) -> bytes:
        head = self._head + data if self._head else data
        while True:
            end = head.find(b"\r\n\r\n")
            if end < 0:
                if len(head) > MAX_HEAD_BYTES:
                    self._fail(UpstreamError("answer head too large"))
                    self._conn.close()
                    return b""
                self._head = head
                return b""
            rest = head[end + 4 :]
            try:
                status = self._set_head(head[:end])
            except (ValueError, UnicodeDecodeError):
                self._fail(UpstreamError("malformed answer head"))
                self._conn.close()
                return b""
            if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
                head = rest
                continue
            self._head = b""
            self._state = _BODY
            if not self._head_done.done():
                self._head_done.set_result(None)
            if self.status in (204, 304) or (self._left == 0 and not self._chunked):
                self._finish()
                return b""
            return rest

    def _set_head(self, raw: bytes) -> int:
        lines = raw.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError(lines[0])
        status = int(code)
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(line)
            headers.add(name.strip(), value.strip())
        self.status, self.reason, self.headers = status, reason, headers
        connection = headers.get("Connection", "").lower()
        self.keep_alive = version == "HTTP/1.1" and "close" not in connection
        self._chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        length = headers.get("Content-Length")
        self._left = None if self._chunked or length is None else int(length)
        if self._left is not None and self._left < 0:
            raise ValueError("negative Content-Length")
        if self._left is None and not self._chunked and status not in (204, 304) and not 100 <= status < 200:
            self.keep_alive = False  # the body ends when the connection does
        return status

    def _sized(self, data: bytes) -> None:
        if self._left is None:  # to EOF
            self._deliver(data)
            return
        if len(data) < self._left:
            self._left -= len(data)
            self._deliver(data)
            return
        extra = len(data) > self._left
        self._deliver(data[: self._left] if extra else data)
        self._left = 0
        if extra:
            self.keep_alive = False  # bytes beyond the answer: do not trust the connection again
        self._finish()

    def _dechunk(self, data: bytes) -> None:
        if self._cstate == _SIZE and not self._pending:
            # The usual piece: exactly one whole chunk ("<size>\r\n<data>\r\n").
            eol = data.find(b"\r\n", 0, 18)
            if eol > 0:
                try:
                    size = int(data[:eol], 16)
                except ValueError:
                    size = 0
                start = eol + 2
                if size > 0 and len(data) == start + size + 2 and data.endswith(b"\r\n"):
                    self._deliver(data[start : start + size])
                    return
        if self._pending:
            data, self._pending = self._pending + data, b""
        pos, n = 0, len(data)
        out: list[bytes] = []
        done = False
        while pos < n:
            state = self._cstate
            if state == _DATA:
                left = self._left or 0
                take = n - pos if n - pos < left else left
                out.append(data[pos : pos + take] if take != n else data)
                pos += take
                self._left = left - take
                if not self._left:
                    self._cstate, self._left = _CRLF, 2
            elif state == _CRLF:
                take = min(self._left or 0, n - pos)
                pos += take
                self._left = (self._left or 0) - take
                if not self._left:
                    self._cstate = _SIZE
            else:  # a size line or a trailer line
                end = data.find(b"\r\n", pos)
                if end < 0:
                    self._pending = data[pos:]
                    if len(self._pending) > MAX_CHUNK_LINE:
                        self._broken("chunk line too long")
                        return
                    break
                line, pos = data[pos:end], end + 2
                if state == _TRAILER:
                    if not line:
                        done = True
                        if pos < n:
                            self.keep_alive = False
                        break
                    continue
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self._broken("malformed chunk size")
                    return
                if size < 0:
                    self._broken("malformed chunk size")
                    return
                if size == 0:
                    self._cstate = _TRAILER
                else:
                    self._cstate, self._left = _DATA, size
        if out:
            self._deliver(out[0] if len(out) == 1 else b"".join(out))
        if done:
            self._finish()

    def _broken(self, why: str) -> None:
        self._fail(UpstreamError(why))
        self._conn.close()

    def _deliver(self, data: bytes) -> None:
        if self._discard:
            return
        if self._sink is not None:
            self._sink.feed(data)
            return
        self._buf.append(data)
        self._buffered += len(data)
        if self._buffered > PULL_HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _finish(self) -> None:
        self._state = _DONE
        self.unwatch()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._discard:
            self._recycle() if self.keep_alive else self._conn.close()
            return
        if self._sink is not None:
            self._sink.end(None)
        else:
            self._wake()

    def _fail(self, error: BaseException) -> None:
        if self.error is not None or self._state == _DONE:
            return
        self.error = error
        self.keep_alive = False
        self.unwatch()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if not self._head_done.done():
            self._head_done.set_exception(error)
            self._head_done.exception()  # retrieved: a caller that left must not log it
        if self._sink is not None:
            self._sink.end(error)
        else:
            self._wake()


class Connection(asyncio.Protocol):
    """One pooled connection upstream; carries one answer at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.key, self.loop = pool, key, loop
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.paused = False
        self.expiry: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # nothing was asked: a server talking out of turn
            self.close()
            return
        self.response._data(data)

    def eof_received(self) -> bool:
        resp = self.response
        if resp is not None and resp._state == _BODY and not resp._chunked and resp._left is None:
            resp._finish()  # a body that ends at EOF
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.expiry is not None:
            self.expiry.cancel()
        resp = self.response
        if resp is not None and resp._state != _DONE:
            error = UpstreamError(f"connection lost{f': {exc}' if exc else ''}")
            resp._fail(error)

    def send(self, head: bytes, body: bytes) -> Response:
        assert self.transport is not None
        self.response = resp = Response(self)
        self.transport.write(head + body if len(body) < 16384 else head)
        if len(body) >= 16384:
            self.transport.write(body)
        return resp

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def recycle(self) -> None:
        self.response = None
        self.resume()
        self.pool._put(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.pool._forget(self)


class UpstreamPool:
    """Kept-alive connections per (host, port, tls); an idle one closes after `keepalive_s`."""

    def __init__(self, keepalive_s: float) -> None:
        self.keepalive_s = keepalive_s
        self._idle: dict[tuple, list[Connection]] = {}
        self._open: set[Connection] = set()
        self._ssl: ssl.SSLContext | None = None
        self.connects = 0  # new connections opened (for the benchmark and the tests)

    async def post(
        self, base_url: str, path: str, body: bytes, headers: dict[str, str], *,
        connect_timeout_s: float, read_timeout_s: float, watchers: set[Response] | None = None,
    ) -> Response:  # fmt: skip
        """POST `body` to base_url + path; the answer with its head read. The head must come within
        `read_timeout_s` (of silence); a caller that gives up (cancels) closes the connection. The
        answer is in `watchers` (`Response.watch`) from the moment it is sent."""
        host, port, tls, prefix = target_of(base_url)
        key = (host, port, tls)
        conn = self._take(key)
        if conn is None:
            conn = await self._connect(key, connect_timeout_s)
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"POST {prefix}{path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {len(body)}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        lines.append("\r\n")
        resp = conn.send("".join(lines).encode("latin-1"), body)
        resp.set_idle_timeout(read_timeout_s)
        resp.watch(watchers)
        try:
            await resp.head()
        except BaseException:
            resp.close()
            raise
        return resp

    def _take(self, key: tuple) -> Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.expiry is not None:
                conn.expiry.cancel()
                conn.expiry = None
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, key: tuple, timeout_s: float) -> Connection:
        host, port, tls = key
        loop = asyncio.get_running_loop()
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(
                    lambda: Connection(self, key, loop), host, port,
                    ssl=self._ssl if tls else None, server_hostname=host if tls else None,
                )  # fmt: skip
        except ssl.SSLError as exc:
            raise UpstreamError(f"TLS: {exc}") from exc
        self.connects += 1
        self._open.add(conn)
        return conn

    def _put(self, conn: Connection) -> None:
        if conn.closed:
            return
        self._idle.setdefault(conn.key, []).append(conn)
        conn.expiry = conn.loop.call_later(self.keepalive_s, conn.close)

    def _forget(self, conn: Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
