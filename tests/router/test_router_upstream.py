"""The router's lean HTTP/1.1 client (upstream.py) against a scripted server on a loopback socket:
every body framing, answers cut anywhere, broken and hostile answers, keep-alive and its limits,
the idle timer, and the hung-engine watch."""

from __future__ import annotations

import asyncio
import socket

import pytest
from gpufleet.serving.router.upstream import MAX_HEAD_BYTES, UpstreamError, UpstreamPool
from hypothesis import given, settings
from hypothesis import strategies as st

OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Gpufleet-Region: r1\r\n"


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


class Script:
    """A server that answers each request on a connection with the next answer of `answers`: a
    list of byte pieces, each sent on its own after `gap_s` (None: close the connection here)."""

    def __init__(self, answers: list[list[bytes | None]], gap_s: float = 0.0) -> None:
        self.answers = list(answers)
        self.gap_s = gap_s
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Script:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
                self.requests.append(head + await reader.readexactly(length))
                for piece in self.answers.pop(0):
                    if piece is None:
                        writer.close()
                        return
                    writer.write(piece)
                    await writer.drain()
                    if self.gap_s:
                        await asyncio.sleep(self.gap_s)
            await reader.read()  # until the client closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.closed.set()


def run(coro, timeout: float = 20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def post(pool: UpstreamPool, url: str, **kw):
    return await pool.post(url, "/v1/chat/completions", b'{"stream":true}', {"Content-Type": "application/json"},
                           connect_timeout_s=1.0, read_timeout_s=kw.pop("read_timeout_s", 5.0), **kw)  # fmt: skip


class Sink:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()

    def feed(self, data: bytes) -> None:
        self.data.append(data)

    def end(self, error: BaseException | None) -> None:
        self.ended.set_result(error)


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=12))
def test_a_chunked_answer_cut_anywhere_reads_whole_and_keeps_its_connection(cuts):
    events = [b'data: {"n": %d}\n\n' % i for i in range(12)] + [b"data: [DONE]\n\n"]
    raw = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(*events)
    pieces, at = [], 0
    for cut in sorted(set(c % len(raw) for c in cuts if c % len(raw))):
        pieces.append(raw[at:cut])
        at = cut
    pieces.append(raw[at:])

    async def main():
        async with Script([pieces, [OK_HEAD + b"Content-Length: 2\r\n\r\nok"]], gap_s=0.002) as server:
            pool = UpstreamPool(keepalive_s=5)
            resp = await post(pool, server.url)
            assert (resp.status, resp.headers["x-gpufleet-region"]) == (200, "r1")
            assert await resp.read() == b"".join(events)
            resp.release()
            again = await post(pool, server.url)  # the same connection, kept alive
            assert await again.read() == b"ok"
            again.release()
            assert (server.connections, pool.connects) == (1, 1)
            pool.close()

    run(main())


def test_sized_eof_and_empty_bodies_and_an_interim_answer():
    async def main():
        answers = [
            [b"HTTP/1.1 100 Continue\r\n\r\n", OK_HEAD + b"Content-Length: 5\r\n\r\nhe", b"llo"],
            [b"HTTP/1.1 204 No Content\r\n\r\n"],
            [b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\n{\"e\": \"x\"}\n"],
            [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil ", b"the end", None],
        ]
        async with Script(answers) as server:
            pool = UpstreamPool(keepalive_s=5)
            resp = await post(pool, server.url)
            assert (resp.status, await resp.read()) == (200, b"hello")
            resp.release()
            resp = await post(pool, server.url)
            assert (resp.status, resp.complete, await resp.read()) == (204, True, b"")
            resp.release()
            resp = await post(pool, server.url)
            assert (resp.status, await resp.read(4)) == (400, b'{"e": "x"}\n')  # read(n): at least n
            resp.release()
            resp = await post(pool, server.url)
            assert (resp.status, resp.keep_alive, await resp.read()) == (200, False, b"until the end")
            resp.release()
            assert pool.connects == 1  # the first three answers on one connection
            pool.close()

    run(main())


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ([OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel", None], "connection lost"),
        ([OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"], "malformed chunk size"),
        ([OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 2000], "chunk line too long"),
        ([OK_HEAD + b"Content-Length: 10\r\n\r\nshort", None], "connection lost"),
    ],
)
def test_a_broken_body_fails_its_reader_and_its_sink_and_never_returns_to_the_pool(answer, why):
    async def main():
        async with Script([answer, answer]) as server:
            pool = UpstreamPool(keepalive_s=5)
            resp = await post(pool, server.url)
            with pytest.raises(UpstreamError, match=why):
                await resp.read()
            resp.release()
            resp = await post(pool, server.url)
            sink = Sink()
            resp.push(sink)
            error = await sink.ended
            assert isinstance(error, UpstreamError) and why in str(error)
            resp.release()
            assert pool.connects == 2  # the broken connection was not reused
            pool.close()

    run(main())


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"SPDY/3 200 OK\r\n\r\n", "malformed answer head"),
        (b"HTTP/1.1 2OO OK\r\n\r\n", "malformed answer head"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed answer head"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -4\r\n\r\n", "malformed answer head"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * MAX_HEAD_BYTES, "answer head too large"),
    ],
)
def test_a_hostile_head_is_an_upstream_error_not_a_crash(head, why):
    async def main():
        async with Script([[head]]) as server:
            pool = UpstreamPool(keepalive_s=5)
            with pytest.raises(UpstreamError, match=why):
                await post(pool, server.url)
            pool.close()

    run(main())


def test_silence_before_the_head_and_within_the_body_times_out():
    async def main():
        async with Script([[], [OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", chunked(b"x")[:-5]]]) as server:
            pool = UpstreamPool(keepalive_s=5)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(TimeoutError):
                await post(pool, server.url, read_timeout_s=0.3)
            assert 0.25 < loop.time() - t0 < 2.0
            resp = await post(pool, server.url)
            assert await resp.read_some() == b"x"
            resp.set_idle_timeout(0.3)
            t0 = loop.time()
            with pytest.raises(TimeoutError):
                await resp.read_some()
            assert 0.25 < loop.time() - t0 < 2.0
            resp.close()
            pool.close()

    run(main())


def test_an_answer_released_before_its_end_keeps_its_connection_only_if_the_end_comes():
    async def main():
        body = chunked(b"data: a\n\n", b"data: [DONE]\n\n")
        cut = body.index(b"0\r\n\r\n")
        answers = [
            [OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body[:cut], body[cut:]],  # the end comes
            [OK_HEAD + b"Content-Length: 2\r\n\r\nok"],
        ]
        async with Script(answers, gap_s=0.05) as server:
            pool = UpstreamPool(keepalive_s=5)
            resp = await post(pool, server.url)
            await resp.read_some()
            resp.release()  # before the terminator: read on, then back to the pool
            await asyncio.sleep(0.3)
            again = await post(pool, server.url)
            assert await again.read() == b"ok"
            again.release()
            assert pool.connects == 1
            pool.close()
        never = [[OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"x")[:-5]]]
        async with Script(never) as server:
            pool = UpstreamPool(keepalive_s=5)
            resp = await post(pool, server.url)
            await resp.read_some()
            resp.release()  # the end never comes: closed after RECYCLE_WAIT_S
            await asyncio.wait_for(server.closed.wait(), 3)
            pool.close()

    run(main())


def test_an_idle_connection_closes_after_the_keepalive_and_a_new_one_opens():
    async def main():
        ok = [OK_HEAD + b"Content-Length: 2\r\n\r\nok"]
        async with Script([ok, ok]) as server:
            pool = UpstreamPool(keepalive_s=0.2)
            resp = await post(pool, server.url)
            await resp.read()
            resp.release()
            await asyncio.wait_for(server.closed.wait(), 3)  # the pool closed it, not the server
            resp = await post(pool, server.url)
            assert await resp.read() == b"ok"
            assert pool.connects == 2
            pool.close()

    run(main())


def test_a_watched_answer_is_aborted_with_the_watchers_error_and_leaves_the_set():
    async def main():
        async with Script([[], [OK_HEAD + b"Content-Length: 2\r\n\r\nok"]]) as server:
            pool = UpstreamPool(keepalive_s=5)
            watchers: set = set()
            task = asyncio.create_task(post(pool, server.url, watchers=watchers))
            while not watchers:
                await asyncio.sleep(0.01)
            for resp in list(watchers):
                resp.abort(RuntimeError("engine stopped answering"))
            with pytest.raises(RuntimeError, match="stopped answering"):
                await task
            assert not watchers
            resp = await post(pool, server.url, watchers=watchers)
            assert await resp.read() == b"ok" and not watchers  # an answer's end unwatches it
            pool.close()

    run(main())


def test_a_connection_refused_is_an_oserror():
    async def main():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        pool = UpstreamPool(keepalive_s=5)
        with pytest.raises(OSError):
            await post(pool, f"http://127.0.0.1:{port}")

    run(main())


def test_an_answer_without_end_is_cut_at_its_size_limit():
    async def main():
        endless = [OK_HEAD + b"Content-Length: 100000000\r\n\r\n"] + [b"x" * 4096] * 64
        async with Script([endless], gap_s=0.001) as server:
            pool = UpstreamPool(keepalive_s=5)
            resp = await post(pool, server.url)
            with pytest.raises(UpstreamError, match="larger than 65536 bytes"):
                await resp.read(max_bytes=65536)
            await asyncio.wait_for(server.closed.wait(), 3)  # the connection was closed on it
            pool.close()

    run(main())
