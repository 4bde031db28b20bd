"""Abandoned requests and continued streams (issue 15, rows 3 and 5): a client that goes away cancels
its request upstream, streamed or not, and is counted as such; after a continuation the usage is the
whole answer's."""

from __future__ import annotations

import asyncio
import json
import socket
import time

from .harness import MODEL, FleetBed, RegionSpec, ask, router_metric, start_fleet

AWS = "aws-us-east-1"
TWO = (RegionSpec("aws", "us-east-1", "H100-80GB", engines=2, blocks=512),)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def running(bed: FleetBed) -> int:
    return sum(e.engine.stats().num_running + e.engine.stats().num_waiting for e in bed[AWS].engines)


def abandoned_upstream(bed: FleetBed) -> int:
    """Requests an engine is still handling whose connection from the router is gone (an engine
    that does not stop on a disconnect; vLLM does, for streamed and non-streamed requests)."""
    n = 0
    for e in bed[AWS].engines:
        server = e.runner.server if e.runner is not None else None
        for handler in server.connections if server is not None else ():
            if handler.transport is None and getattr(handler, "_request_in_progress", False):
                n += 1
    return n


async def cancelled(bed: FleetBed) -> float:
    return await router_metric(bed.session, bed[AWS].url, "gpufleet_router_requests_total", outcome="client_cancelled")


async def wait_for(predicate, timeout: float = 3.0) -> bool:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def test_a_client_that_leaves_a_stream_stops_the_engine(tmp_path):
    async def main():
        bed = await start_fleet(tmp_path, TWO, time_scale=2)
        url = bed[AWS].url
        try:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 2000,
                    "stream": True, "ignore_eos": True}  # fmt: skip
            async with bed.session.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                got = 0
                async for line in r.content:
                    got += line.startswith(b"data: {")
                    if got >= 4:
                        break
                assert running(bed) == 1
                r.close()  # hang up mid-stream
            assert await wait_for(lambda: running(bed) == 0), "the engine kept generating"
            assert await cancelled(bed) == 1
            router = bed[AWS].router
            assert await wait_for(lambda: not router.outstanding and not router.ledger.pending(bed[AWS].engines[0].url))
        finally:
            await bed.close()

    run(main())


def test_a_client_that_leaves_a_non_streamed_request_cancels_it_upstream(tmp_path):
    async def main():
        bed = await start_fleet(tmp_path, TWO, time_scale=2)
        url = bed[AWS].url
        try:
            body = {"model": MODEL, "prompt": "go", "max_tokens": 400, "ignore_eos": True}
            task = asyncio.create_task(bed.session.post(url + "/v1/completions", json=body))
            assert await wait_for(lambda: running(bed) == 1)
            task.cancel()  # the client gives up: its connection is closed
            # The router closes its connection to the engine: the engine aborts the request (vLLM and
            # an emulator that watches disconnects), or at least holds a request nobody reads.
            assert await wait_for(lambda: running(bed) == 0 or abandoned_upstream(bed) == 1)
            assert await cancelled(bed) == 1
            assert await router_metric(bed.session, url, "gpufleet_router_requests_total", outcome="ok") == 0
            router = bed[AWS].router
            assert await wait_for(lambda: not router.outstanding)
            assert all(b._failures == 0 and not b._probing for b in router.breakers.engines.values())
            await wait_for(lambda: running(bed) == 0, 15)  # an emulator that runs on: let it finish
        finally:
            await bed.close()

    run(main())


def test_usage_after_a_continuation_is_the_whole_answers(tmp_path):
    """The first engine breaks the stream after 5 tokens; the second continues it. The client's usage
    is that of one answer: the original prompt, every completion token from both engines."""

    async def main():
        bed = await start_fleet(tmp_path, TWO, time_scale=20)
        url = bed[AWS].url
        usage_opts = {"stream_options": {"include_usage": True}}
        try:
            await bed[AWS].engines[0].set_faults({"break_stream_after_tokens": 5})
            for chat in (True, False):
                if not chat:
                    # the first loop's broken streams may have opened the faulty engine's breaker:
                    # let it half-open, so that this loop's requests reach that engine too
                    await asyncio.sleep(bed.router_settings["breaker_cooldown_s"] + 0.2)
                # a long answer keeps the healthy engine busy, so the router prefers the faulty one
                # (the two are otherwise alike, and which one it takes would be up to timing)
                busy = asyncio.create_task(ask(bed.session, bed[AWS].engines[1].url, max_tokens=3800,
                                               content="keep busy", timeout=60))  # fmt: skip
                await asyncio.sleep(0.3)  # a few scrape rounds: the router sees it running
                continued = 0
                for i in range(8):
                    content = f"how big is a KV cache? ({i})"
                    # The reference: the same request on the healthy engine directly, unbroken.
                    ref = await ask(bed.session, bed[AWS].engines[1].url, max_tokens=40, chat=chat,
                                    content=content, extra=usage_opts)  # fmt: skip
                    assert ref.complete and ref.usage is not None
                    before = await router_metric(bed.session, url, "gpufleet_router_continuations_total", outcome="ok")
                    a = await ask(bed.session, url, max_tokens=40, chat=chat, content=content, extra=usage_opts)
                    assert a.complete and a.tokens == 40 and len(a.ids) == 1, (i, a.error)
                    assert a.usage == ref.usage, (chat, a.usage, ref.usage)
                    after = await router_metric(bed.session, url, "gpufleet_router_continuations_total", outcome="ok")
                    continued += after > before
                assert continued >= 1, chat  # some of them really were continued
                assert (await busy).complete
        finally:
            await bed.close()

    run(main())


def test_the_body_of_a_continuation_is_one_an_engine_takes(tmp_path):
    """What the second engine is asked: the text so far as the assistant's message to continue (no
    echo: vLLM would repeat it), max_tokens reduced by what was sent; and an engine takes it."""
    from gpufleet.serving.router.continuation import continuation_payload

    async def main():
        bed = await start_fleet(tmp_path, TWO, time_scale=20)
        try:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 40,
                    "echo": True, "stream": True}  # fmt: skip
            p = continuation_payload("chat", body, "The answer so", 3)
            assert p is not None
            assert p["messages"][-1] == {"role": "assistant", "content": "The answer so"}
            assert p["continue_final_message"] is True and p["add_generation_prompt"] is False
            assert "echo" not in p and p["max_tokens"] == 37
            async with bed.session.post(bed[AWS].engines[0].url + "/v1/chat/completions", json=p) as r:
                assert r.status == 200
                assert b"data: [DONE]" in await r.read()
        finally:
            await bed.close()

    run(main())


def test_relay_bookkeeping_counts_and_parses_runs_of_events():
    """The relay keeps each chunk's events whole (relay.Stream.add) and parses them later: the
    count of tokens before the parse, the text after it, and [DONE] found only as a payload."""
    import json

    from gpufleet.serving.router.relay import Stream, _events

    def event(text: str, finish: str | None = None) -> bytes:
        chunk = {"id": "c1", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    stream = Stream()
    # A token whose text looks like an SSE line or like [DONE] is one token, not an event or the end.
    run = event("a") + event("data: x") + event("[DONE]")
    out, done = _events(run, stream, False)
    assert (out, done) == (run, False)
    assert stream.materialized == 3 and stream.text == []  # counted, not parsed yet
    out, done = _events(event("b", "length") + b"data: [DONE]\n\n" + event("after"), stream, False)
    assert done and out == event("b", "length") + b"data: [DONE]\n\n"  # nothing after [DONE]
    stream.settle()
    assert stream.text == ["a", "data: x", "[DONE]", "b"] and stream.tokens == 4 and stream.finished
    assert stream.chunk_id == "c1" and stream.materialized == 4


def test_a_client_slower_than_its_stream_pauses_the_engine_side_and_loses_nothing(tmp_path, monkeypatch):
    """The relay writes each chunk from the engine connection's callback (relay._Relay.feed); when
    the client does not keep up, the engine connection stops being read until the client has
    taken what waits for it, and the client still gets every token once, in order."""
    from gpufleet.serving.router import upstream

    pauses = []
    pause = upstream.Response.pause_reading
    monkeypatch.setattr(upstream.Response, "pause_reading", lambda self: (pauses.append(1), pause(self)))

    async def main():
        bed = await start_fleet(tmp_path, TWO, time_scale=50)
        try:
            port = int(bed[AWS].url.rsplit(":", 1)[1])
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, ("127.0.0.1", port))
            # The router's side of this connection gets a small send buffer too, or the kernel
            # takes the whole answer and nothing waits in the router.
            here = sock.getsockname()
            server = bed[AWS].router._runner.server
            assert await wait_for(lambda: any(h.transport and h.transport.get_extra_info("peername") == here
                                              for h in server.connections))  # fmt: skip
            for h in server.connections:
                if h.transport and h.transport.get_extra_info("peername") == here:
                    h.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 3000, "stream": True, "ignore_eos": True}).encode()  # fmt: skip
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            await loop.sock_sendall(sock, head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
            await asyncio.sleep(2.0)  # not reading: the answer piles up in front of this client
            raw = b""
            async with asyncio.timeout(30):
                while not raw.endswith(b"\r\n0\r\n\r\n"):
                    got = await loop.sock_recv(sock, 65536)
                    assert got, "the router closed the connection"
                    raw += got
            sock.close()
            head, _, chunks = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            text = b""
            while chunks:
                size, _, rest = chunks.partition(b"\r\n")
                n = int(size, 16)
                text, chunks = text + rest[:n], rest[n + 2 :]
            events = [e for e in text.split(b"\n\n") if e]
            payloads = [json.loads(e[6:]) for e in events[:-1]]
            tokens = [c["choices"][0]["delta"].get("content") for c in payloads if c.get("choices")]
            assert events[-1] == b"data: [DONE]" and text.count(b"[DONE]") == 1
            assert sum(1 for t in tokens if t) == 3000
            assert pauses, "the engine side was never paused: the client was not slow enough to test this"
        finally:
            await bed.close()

    run(main())
