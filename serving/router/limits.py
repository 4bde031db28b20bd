"""The router's HTTP server under slow, idle and too many clients.

aiohttp closes nothing by itself before 3.14 (a connection that never sends a request was kept for
ever) and reads a body as slowly as it comes. Here:

- **headers**: a connection must complete its first request's headers within `header_timeout_s`
  (later requests on a kept-alive connection: within `keepalive_timeout_s` of the last answer);
- **body**: the handler reads the body within `body_timeout_s` (a body shorter than its
  Content-Length times out: 408, connection closed after at most `LINGERING_TIME_S` more);
- **keep-alive**: an idle connection is closed `keepalive_timeout_s` after its last answer
  (aiohttp's own `keepalive_timeout`);
- **connections**: at most `max_connections` client connections at once (plain and TLS together);
  one more is answered 503 with `Connection: close` and closed, so descriptors stay free for the
  engines and `accept()` never fails for lack of them;
- **errors aiohttp answers itself** (a malformed request line, headers past `max_line_size` /
  `max_field_size`) are OpenAI-style JSON too.

Connections start on the lean front (front.py) and move to aiohttp at their first request that
is not a completion request in the usual shape; the front applies the same deadlines, the same
cap (one count over both kinds) and the same lingering close.

These are not fleet-file settings yet (`RouterSettings` has no such fields): the defaults are the
constants below; tests pass a `ServerLimits` of their own.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from gpufleet.serving.router.errors import error_body, error_response
from gpufleet.serving.router.front import Front, Handler

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEPALIVE_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 8192  # ceiling; the file-descriptor limit usually sets a lower cap (below)
FD_RESERVE = 64  # descriptors kept for listeners, scrapes, peers, logs
MAX_LINE_SIZE = 8190  # request line and each header line, bytes (aiohttp's default)
MAX_FIELD_SIZE = 8190
# After an answer that left the body unread (413, 408, a POST to an unknown path), aiohttp reads and
# drops what still comes for this long before closing, so the client reads the answer rather than a
# reset: a body that times out holds its connection body_timeout_s + this at most.
LINGERING_TIME_S = 1.0
REFUSAL_LINGER_S = 0.5  # a refused connection is read (and dropped) this long, so the client sees the 503
MAX_LINGERING_REFUSALS = 64  # more at once are closed at once
# Connections the kernel completes and queues while the router's loop is busy (aiohttp's default is
# 128; Linux caps it at net.core.somaxconn). Past it a client's SYN is dropped and it sees a connect
# timeout after seconds: a burst of new connections during a busy moment waits here instead.
LISTEN_BACKLOG = 2048

log = logging.getLogger("gpufleet.router")


def fd_limit() -> int | None:
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def default_max_connections(nofile: int | None = None) -> int:
    """Half of the descriptors left after a reserve: every client connection may need one to an
    engine as well."""
    nofile = fd_limit() if nofile is None else nofile
    if nofile is None:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, (nofile - FD_RESERVE) // 2))


@dataclass(frozen=True)
class ServerLimits:
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S
    max_connections: int = field(default_factory=default_max_connections)


_REFUSAL = error_body(503, "the router has too many open connections; retry shortly", "service_unavailable")


def _refusal_bytes() -> bytes:
    import json

    body = json.dumps(_REFUSAL).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Refusal(asyncio.Protocol):
    """A connection over the cap: answered 503 at once, what it sends is read and dropped for a
    moment (closing on unread data would reset the connection before the client reads the 503)."""

    lingering = 0
    _REPLY = _refusal_bytes()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = t
        self.timer: asyncio.TimerHandle | None = None
        t.write(self._REPLY)
        if _Refusal.lingering >= MAX_LINGERING_REFUSALS:
            t.close()
            return
        _Refusal.lingering += 1
        self.counted = True
        if t.can_write_eof():
            t.write_eof()
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, t.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if getattr(self, "counted", False):
            _Refusal.lingering -= 1
            self.counted = False


class _Handler(RequestHandler):
    """aiohttp's request handler with a deadline for the first request's headers and JSON errors
    for what its parser rejects."""

    def __init__(self, manager: web.Server, *, header_timeout_s: float, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._header_timer = self._loop.call_later(self._header_timeout_s, self._headers_due)

    def _headers_due(self) -> None:
        self._header_timer = None
        # No request parsed yet on this connection: idle since it opened, or headers dripping in.
        if getattr(self, "_request_count", 1) == 0:
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def handle_error(self, request, status: int = 500, exc=None, message=None) -> web.StreamResponse:
        # aiohttp logs each of these with a traceback and answers text/plain; a scanner's garbage is
        # not worth more than a debug line (and the log filter counts repeats of those that are).
        text = str(message or (exc if exc is not None else "")).strip().split("\n")[0] or HTTPStatus(status).phrase
        if status >= 500:
            log.error("error handling a request: %s: %s", type(exc).__name__, text)
        else:
            log.debug("bad request: %s", text)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; cannot send an error")
        resp = error_response(status, f"malformed HTTP request: {text}"[:500] if status < 500 else "internal error")
        resp.force_close()
        return resp


class _Server(web.Server):
    """aiohttp's low-level server with a cap on open connections. With `hot` handlers, connections
    start on the lean front (front.py), which hands them to aiohttp at their first other request."""

    max_connections: int
    header_timeout_s: float
    limits: ServerLimits
    max_body_bytes: int
    lingering_s: float
    hot: dict[str, Handler]
    fronts: set[Front]

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        if len(self._connections) + len(self.fronts) >= self.max_connections:
            return _Refusal()
        if self.hot:
            return Front(self, self._loop)
        return self.aiohttp_protocol()

    @property
    def connections(self) -> list:
        """Open client connections: aiohttp's and the fronts' (each has a `transport`)."""
        return [*self._connections, *self.fronts]

    def aiohttp_protocol(self) -> asyncio.Protocol:
        return _Handler(self, loop=self._loop, header_timeout_s=self.header_timeout_s, **self._kwargs)

    async def shutdown(self, timeout: float | None = None) -> None:
        await asyncio.gather(*(f.shutdown(timeout) for f in list(self.fronts)))
        await super().shutdown(timeout)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose server applies `ServerLimits`; handlers are cancelled when their client
    goes away (the gateway then cancels the request upstream)."""

    def __init__(
        self, app: web.Application, limits: ServerLimits, hot: dict[str, Handler] | None = None, max_body_bytes: int = 0
    ) -> None:
        super().__init__(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            keepalive_timeout=limits.keepalive_timeout_s,
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_FIELD_SIZE,
            lingering_time=LINGERING_TIME_S,
        )
        self.limits = limits
        self.hot = hot or {}
        self.max_body_bytes = max_body_bytes

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds the Server; give it the capped class (no new state beyond two numbers).
        server.__class__ = _Server
        assert isinstance(server, _Server)
        server.max_connections = self.limits.max_connections
        server.header_timeout_s = self.limits.header_timeout_s
        server.limits = self.limits
        server.hot = self.hot
        server.max_body_bytes = self.max_body_bytes
        server.fronts = set()
        server.lingering_s = LINGERING_TIME_S
        return server

    @property
    def open_connections(self) -> int:
        server = self.server
        return len(server.connections) if server is not None else 0
