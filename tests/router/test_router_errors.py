"""Every error the gateway returns is an OpenAI-style JSON error with the status that tells the
client what to do (issue 15, rows 4 and 6): its own routes, malformed HTTP, requests that can never
be served (400), nothing up (503); and admin tokens need some entropy."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from gpufleet.serving.router.config import ConfigError, read_admin_token
from gpufleet.stacks.spec import RouterSettings

from .harness import MODEL, TOKEN, RegionSpec, ask, start_fleet

AWS, GCP = "aws-us-east-1", "gcp-us-central1"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ONE = (RegionSpec("aws", "us-east-1", "H100-80GB", engines=2, blocks=96),)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def is_openai_error(data: object, status: int) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("error"), dict)
        and data["error"]["code"] == status
        and isinstance(data["error"]["message"], str)
        and isinstance(data["error"]["type"], str)
    )


async def raw_http(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], object]:
    """Send bytes as they are (what a client library would refuse to send); the answer parsed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":  # one chunk is enough for an error body
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    try:
        parsed: object = json.loads(body)
    except ValueError:
        parsed = body
    return status, headers, parsed


def test_the_gateways_own_routes_answer_json(tmp_path):
    async def main():
        bed = await start_fleet(tmp_path, ONE, time_scale=20, router={"max_body_bytes": 65536})
        url, s = bed[AWS].url, bed.session
        port = bed[AWS].router.port
        try:

            async def call(method: str, path: str, **kw) -> tuple[int, object, dict]:
                async with s.request(method, url + path, **kw) as r:
                    text = await r.text()
                    try:
                        return r.status, json.loads(text), dict(r.headers)
                    except ValueError:
                        return r.status, text, dict(r.headers)

            status, data, _ = await call("GET", "/nope")
            assert status == 404 and is_openai_error(data, 404), data
            status, data, headers = await call("POST", "/health")
            assert status == 405 and is_openai_error(data, 405) and "GET" in headers["Allow"], data
            status, data, _ = await call("GET", "/v1/chat/completions")
            assert status == 405 and is_openai_error(data, 405)
            status, data, _ = await call("POST", "/v1/chat/completions", data=b"{nope")
            assert status == 400 and is_openai_error(data, 400)
            deep = b'{"model": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            status, data, _ = await call("POST", "/v1/completions", data=deep)
            assert status == 413 and is_openai_error(data, 413)  # past max_body_bytes: not even parsed
            deep = b'{"model": "x", "a": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
            status, data, _ = await call("POST", "/v1/completions", data=deep)
            assert status == 400 and is_openai_error(data, 400) and "deeper" in data["error"]["message"]
            # An authenticated drain with a body of the wrong shape.
            for body in ({"region": []}, {"engine": 5}, {"region": None}, {"region": ""}, [1]):
                status, data, _ = await call("POST", "/admin/v1/drain", json=body, headers=ADMIN)
                assert status == 400 and is_openai_error(data, 400), (body, data)
            status, data, _ = await call("POST", "/admin/v1/drain", data=b"\xff{", headers=ADMIN)
            assert status == 400 and is_openai_error(data, 400)

            # Raw HTTP: bytes a client library would not send.
            close = b"Host: x\r\nConnection: close\r\n"
            bad_auth = b"GET /admin/v1/state HTTP/1.1\r\n" + close + b"Authorization: Bearer \xff\xfe\r\n\r\n"
            status, headers, data = await raw_http(port, bad_auth)
            assert status == 401 and is_openai_error(data, 401) and headers["www-authenticate"] == "Bearer"
            chat = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}).encode()
            bad_auth_chat = (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer \xff\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(chat) + chat
            )
            status, _, data = await raw_http(port, bad_auth_chat)
            assert status == 400 and is_openai_error(data, 400) and "ASCII" in data["error"]["message"]
            status, headers, data = await raw_http(port, b"GARBAGE\x01 / HTTP/9\r\n\r\n")
            assert status == 400 and is_openai_error(data, 400), data
            long_header = b"GET /health HTTP/1.1\r\n" + close + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n"
            status, headers, data = await raw_http(port, long_header)
            assert 400 <= status < 500 and is_openai_error(data, status), data
            # The router still serves after all of that.
            assert (await ask(s, url, max_tokens=3)).complete
        finally:
            await bed.close()

    run(main())


def test_never_servable_is_400_no_room_is_429_nothing_up_is_503(tmp_path):
    async def main():
        bed = await start_fleet(tmp_path, ONE, time_scale=20, router={"queue_wait_s": 0.3})
        url, s = bed[AWS].url, bed.session
        try:
            # No `model`: the region's only model is served, as vLLM serves its only one.
            async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] <= 3
            # 2M characters: past the 4096-token context however it tokenizes. Answered at once.
            t0 = time.monotonic()
            a = await ask(s, url, content="x" * 2_000_000, max_tokens=10)
            assert a.status == 400 and "context" in a.error and time.monotonic() - t0 < 2
            # An unknown residency: no region will ever take it.
            a = await ask(s, url, headers={"X-Gpufleet-Residency": "mars"})
            assert a.status == 400 and "unknown X-Gpufleet-Residency" in a.error
            # Fits the context (4096) but no engine's KV cache (96 blocks x 16 = 1536 tokens).
            a = await ask(s, url, max_tokens=2000)
            assert a.status == 400 and "more than any engine" in a.error
            # Every engine down: 503 at once, not a 429 after waiting in the queue.
            for e in bed[AWS].engines:
                await e.set_faults({"refuse_connections": True})
            until = time.monotonic() + 5
            while any(st.healthy for st in bed[AWS].router.scraper.engines.values()):
                assert time.monotonic() < until
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            a = await ask(s, url, max_tokens=4)
            assert a.status == 503 and time.monotonic() - t0 < 0.25, (a.status, a.error)
            async with s.post(
                url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3}
            ) as r:
                assert r.status == 503 and is_openai_error(await r.json(), 503)
        finally:
            await bed.close()

    run(main())


@pytest.mark.parametrize(
    "token, says",
    [
        ("a" * 16, "too little entropy"),
        ("a" * 64, "too little entropy"),
        ("ab" * 16, "too little entropy"),
        ("abcdabcdabcdabcd", "too little entropy"),
        ("0123456789abcde", "shorter than 16"),
    ],
)
def test_admin_tokens_need_some_entropy(token, says):
    with pytest.raises(ConfigError, match=says):
        read_admin_token(RouterSettings(), {"GPUFLEET_ADMIN_TOKEN": token})


def test_a_random_token_passes():
    import secrets

    for _ in range(200):
        token = secrets.token_hex(16)
        assert read_admin_token(RouterSettings(), {"GPUFLEET_ADMIN_TOKEN": token}) == token


def test_router_serve_refuses_a_weak_token_with_exit_3(tmp_path, monkeypatch):
    from gpufleet.cli.app import app
    from typer.testing import CliRunner

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "fleet: tok\nmodels: [{name: m, catalog: llama-3.1-8b}]\n"
        "regions: [{cloud: aws, region: us-east-1, gpu: H100-80GB, nodes: {max: 1},"
        " endpoints: {engines: ['http://127.0.0.1:9']}}]\n"
    )
    monkeypatch.setenv("GPUFLEET_ADMIN_TOKEN", "x" * 32)
    res = CliRunner().invoke(app, ["router", "serve", "--fleet", str(fleet), "--region", "aws-us-east-1"])
    assert res.exit_code == 3, res.output
    assert "too little entropy" in res.output and "Traceback" not in res.output
