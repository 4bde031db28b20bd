"""The lean front (front.py): completion requests in the usual shape are answered on it, everything
else on aiohttp, and one connection may move from the first to the second mid-way, its requests
answered in order, none lost."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from gpufleet.serving.router.front import head_bytes, parse_head

from .harness import MODEL, RegionSpec, ask, start_fleet

AWS = "aws-us-east-1"
ONE = (RegionSpec("aws", "us-east-1", "H100-80GB", engines=1, blocks=512),)


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _body(stream: bool = False, content: str = "hi") -> bytes:
    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 3, "stream": stream}
    ).encode()


def _post(body: bytes, path: bytes = b"/v1/chat/completions", extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%bContent-Length: %d\r\n\r\n"
        % (path, extra, len(body))
        + body
    )


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer: status, headers (names lower-cased), body (chunked or sized)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += data[:-2]
        return status, headers, body
    return status, headers, await reader.readexactly(int(headers.get("content-length", "0")))


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2", "chat"),
        (b"POST /v1/completions HTTP/1.1\r\ncontent-length: 0\r\nX-A:  b ", "completions"),
        (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nConnection: close", "completions"),
        (b"GET /v1/chat/completions HTTP/1.1\r\nContent-Length: 2", None),  # aiohttp: 405
        (b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nContent-Length: 2", None),
        (b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 2", None),  # aiohttp: 404
        (b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: 2", None),
        (b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked", None),
        (b"POST /v1/chat/completions HTTP/1.1", None),  # no Content-Length
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3", None),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: +2", None),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length : 2", None),  # space before the colon
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n folded", None),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\nX: a\nb", None),  # bare LF
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\nX: a\x00b", None),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue", None),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\nConnection: Upgrade", None),
        (b"POST  /v1/chat/completions HTTP/1.1\r\nContent-Length: 2", None),
    ],
)
def test_the_front_takes_only_the_usual_completion_request(head, kind):
    got = parse_head(head + b"\r\n\r\n", len(head))
    assert (got.kind if got else None) == kind
    if got is not None:
        assert got.start == len(head) + 4 and got.length == int(got.headers["Content-Length"])
        assert got.keep_alive == (b"close" not in head)


def test_an_answer_head_never_carries_a_line_break_from_a_header_value():
    head = head_bytes(200, "OK", {"X-Ok": "1", "X-Bad": "a\r\nSet-Cookie: x", "X-Lf": "a\nb"}, 3, close=True)
    assert b"X-Ok: 1\r\n" in head and b"X-Bad" not in head and b"X-Lf" not in head
    assert head.endswith(b"Content-Length: 3\r\nConnection: close\r\n\r\n")


def test_one_connection_moves_from_the_front_to_aiohttp_and_every_request_is_answered_in_order(tmp_path):
    """Pipelined in one write: two completions (front), a GET /health (hands the connection over),
    one more completion (now aiohttp's); then a head and its body in pieces on a second
    connection. Every answer arrives, in order, whole."""

    async def main():
        bed = await start_fleet(tmp_path, ONE, time_scale=50)
        port = bed[AWS].router.port
        assert port is not None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                _post(_body(content="one"))
                + _post(_body(stream=True, content="two"))
                + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                + _post(_body(stream=True, content="three"))
            )
            status, headers, body = await _answer(reader)
            assert status == 200 and json.loads(body)["object"] == "chat.completion", body
            assert headers["x-gpufleet-region"] == AWS and "date" in headers
            for expect in ("stream", "health", "stream"):
                status, headers, body = await _answer(reader)
                assert status == 200, body
                if expect == "stream":
                    assert headers["content-type"] == "text/event-stream"
                    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"[DONE]") == 1
                else:
                    assert json.loads(body)["status"] == "ok", body
            assert bed[AWS].router._runner.server.fronts == set()  # handed over: aiohttp's now
            writer.close()

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            whole = _post(_body(stream=True, content="pieces"))
            cut = whole.index(b"\r\n\r\n") + 4
            for piece in (whole[:20], whole[20:cut], whole[cut : cut + 10], whole[cut + 10 :]):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)
            status, _, body = await _answer(reader)
            assert status == 200 and body.endswith(b"data: [DONE]\n\n"), body
            assert len(bed[AWS].router._runner.server.fronts) == 1  # still the front's
            writer.close()
        finally:
            await bed.close()

    run(main())


def test_unusual_requests_get_aiohttp_answers_and_the_front_its_own(tmp_path):
    """What the front does not take is answered as before the front existed (aiohttp: a chunked
    body, 404, 405, 413, a malformed head); a bad body or `Connection: close` the front answers."""

    async def main():
        bed = await start_fleet(tmp_path, ONE, time_scale=50)
        port = bed[AWS].router.port
        limit = bed[AWS].router.config.settings.max_body_bytes
        try:

            async def one(raw: bytes) -> tuple[int, dict[str, str], bytes]:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(raw)
                try:
                    return await _answer(reader)
                finally:
                    writer.close()

            body = _body()
            chunked = (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
            )
            status, _, answer = await one(chunked)
            assert status == 200 and json.loads(answer)["object"] == "chat.completion", answer
            for raw, code in (
                (_post(body, b"/v1/embeddings"), 404),
                (b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405),
                (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (limit + 1), 413),
                (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\nContent-Length: 2\r\n\r\n{}", 400),
                (_post(b"{not json"), 400),
                (_post(json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode()), 404),
            ):
                status, headers, answer = await one(raw)
                assert status == code, (raw[:60], answer)
                error = json.loads(answer)["error"]
                assert error["code"] == code and error["message"], answer
                assert headers["content-type"].startswith("application/json")

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post(_body(stream=True), extra=b"Connection: close\r\n"))
            status, headers, answer = await _answer(reader)
            assert status == 200 and headers["connection"] == "close" and answer.endswith(b"[DONE]\n\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""  # then the router closes
            writer.close()
        finally:
            await bed.close()

    run(main())


def test_a_client_that_pipelines_and_never_reads_gets_no_more_answers_buffered(tmp_path):
    """600 pipelined requests from a client that reads nothing: the front stops taking its requests
    once its answers wait unsent (the write buffer stays near the transport's high-water mark, not
    600 answers), another client is served meanwhile, and when the first reads, every answer comes,
    in order."""

    async def main():
        bed = await start_fleet(tmp_path, ONE, time_scale=50)
        router = bed[AWS].router
        port = router.port
        assert port is not None
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            here = sock.getsockname()
            server = router._runner.server
            fronts = [f for f in list(server.fronts) if f.transport.get_extra_info("peername") == here]
            while not fronts:
                await asyncio.sleep(0.01)
                fronts = [f for f in list(server.fronts) if f.transport.get_extra_info("peername") == here]
            front = fronts[0]
            # The router's side gets a small send buffer too, or the kernel takes every answer.
            front.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            reader, writer = await asyncio.open_connection(sock=sock)
            n = 600
            writer.write(b"".join(_post(_body(content=f"p{i}")) for i in range(n)))
            await writer.drain()
            await asyncio.sleep(3.0)
            buffered = front.transport.get_write_buffer_size()
            assert buffered < 100 * 1024, buffered  # about the high-water mark (64 KiB), not n answers
            a = await ask(bed.session, bed[AWS].url, max_tokens=4, stream=True, content="other client")
            assert a.complete, a.error
            contents, size = [], 0
            for _ in range(n):
                status, _, body = await asyncio.wait_for(_answer(reader), 30)
                assert status == 200, body
                contents.append(json.loads(body)["object"])
                size += len(body)
            assert contents == ["chat.completion"] * n
            assert size > 2 * 100 * 1024, size  # so the bound above held answers back
            writer.close()
        finally:
            await bed.close()

    run(main(), timeout=120)
