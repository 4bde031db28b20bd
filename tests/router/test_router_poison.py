"""A request's fault is not an engine's fault (issue 15, row 1): poison requests are answered 400,
tried on at most one more engine, and never open a breaker, while good traffic keeps flowing."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web
from gpufleet.serving.router import parsing
from gpufleet.serving.router.breaker import CircuitBreaker
from gpufleet.serving.router.config import RegionInfo, RouterConfig
from gpufleet.serving.router.errors import HttpError
from gpufleet.serving.router.gateway import Router
from gpufleet.serving.router.parsing import Job
from gpufleet.serving.router.policy import BreakerState, RoutedRequest
from gpufleet.serving.router.relay import Upstream
from gpufleet.serving.router.signals import Sample
from gpufleet.stacks.spec import RouterSettings

from .harness import MODEL, RegionSpec, ask, router_metric, start_fleet

AWS = "aws-us-east-1"
SURROGATE = b'{"model": "%s", "messages": [{"role": "user", "content": "a \\ud800 b"}], "max_tokens": 4}' % (
    MODEL.encode()
)
POISON = [
    SURROGATE,
    b'{"model": "%s", "prompt": "x \\udc01", "max_tokens": 4}' % MODEL.encode(),
    b'{"model": "%s", "messages": [{"role": "user", "content": 5}]}' % MODEL.encode(),
    b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}' % MODEL.encode(),
    b'{"model": "%s", "messages": "hello", "stream": "yes"}' % MODEL.encode(),
    b'{"model": "%s", "prompt": "x", "n": ' % MODEL.encode() + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"model": "%s", "prompt": "x", "a": ' % MODEL.encode() + b'{"b":' * 100 + b"1" + b"}" * 100 + b"}",
    b'{"model": "%s", "prompt": "\xff\xfe", "max_tokens": 4}' % MODEL.encode(),
    b'{"model": "%s", "prompt": "x", "temperature": NaN}' % MODEL.encode(),
    b'{"model": "%s", "prompt": "x", "stream_options": {"include_usage": true}}' % MODEL.encode(),
]
TWO = (RegionSpec("aws", "us-east-1", "H100-80GB", engines=2, blocks=512),)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


@pytest.fixture()
def breaker_failures(monkeypatch):
    """Every breaker failure recorded during the test (engine or region), by breaker."""
    seen: list[CircuitBreaker] = []
    original = CircuitBreaker.failure

    def failure(self, now):
        seen.append(self)
        return original(self, now)

    monkeypatch.setattr(CircuitBreaker, "failure", failure)
    return seen


async def post(session, url: str, body: bytes, path: str = "/v1/chat/completions"):
    path = "/v1/completions" if b'"prompt"' in body else path
    async with session.post(url + path, data=body, headers={"Content-Type": "application/json"}) as r:
        text = await r.text()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text  # not JSON (the router never answers so; an engine may)


def test_invalid_requests_are_answered_400_before_any_engine(tmp_path, breaker_failures):
    async def main():
        bed = await start_fleet(tmp_path, TWO, time_scale=20)
        url = bed[AWS].url
        try:
            before = [e.engine.stats().num_finished for e in bed[AWS].engines]
            for body in POISON:
                status, data = await post(bed.session, url, body)
                assert status == 400, (body[:80], data)
                assert data["error"]["type"] == "invalid_request_error" and data["error"]["code"] == 400
            assert [e.engine.stats().num_finished for e in bed[AWS].engines] == before
            assert await router_metric(bed.session, url, "gpufleet_router_retries_total") == 0
            assert breaker_failures == []
        finally:
            await bed.close()

    run(main())


def test_an_engine_500_that_repeats_on_a_second_engine_is_the_requests_fault(
    tmp_path, monkeypatch, breaker_failures
):
    """With the router's own check off, a lone surrogate reaches the engines, which answer 500 (as
    the emulator and a vLLM whose tokenizer chokes do). One more engine confirms; the client gets 400;
    no breaker counts it; good requests still go through."""
    monkeypatch.setattr(parsing, "check_tree", lambda value, surrogates=True: None)

    async def main():
        bed = await start_fleet(tmp_path, TWO, time_scale=20)
        url = bed[AWS].url
        try:
            # What the engine itself answers: 500 (the emulator today), or 400 (an engine that checks).
            engine_says, _ = await post(bed.session, bed[AWS].engines[0].url, SURROGATE)
            assert engine_says in (400, 500)
            for _ in range(6):  # twice the breaker threshold
                status, data = await post(bed.session, url, SURROGATE)
                assert status == 400 and data["error"]["code"] == 400, data
                if engine_says == 500:
                    assert "two engines failed" in data["error"]["message"], data
            retries = await router_metric(bed.session, url, "gpufleet_router_retries_total")
            assert retries == (6 if engine_says == 500 else 0)  # one confirming attempt each, no more
            assert breaker_failures == []
            now = bed[AWS].router.clock()
            assert all(b.state(now) is BreakerState.closed for b in bed[AWS].router.breakers.engines.values())
            good = await asyncio.gather(*(ask(bed.session, url, max_tokens=4) for _ in range(6)))
            assert all(a.complete and a.region == AWS for a in good)
        finally:
            await bed.close()

    run(main())


def test_poison_under_steady_load_loses_no_good_request(tmp_path, monkeypatch, breaker_failures):
    """10 invalid requests within a second while a steady load runs, twice: with the router's
    validation, and with its JSON-tree check off (lone surrogates then reach the engines, which
    answer 500; a 100-level nesting is served). Not one good request fails, no breaker opens, no
    breaker failure is even recorded."""

    async def load(bed, stop: asyncio.Event, good: list, w: int) -> None:
        i = 0
        while not stop.is_set():
            good.append(await ask(bed.session, bed[AWS].url, max_tokens=6, stream=i % 2 == 0, content=f"{w}.{i}"))
            i += 1

    async def watch(router: Router, stop: asyncio.Event, opened: list) -> None:
        while not stop.is_set():
            now = router.clock()
            opened.extend(k for k, b in router.breakers.engines.items() if b.state(now) is not BreakerState.closed)
            await asyncio.sleep(0.01)

    async def main():
        bed = await start_fleet(tmp_path, TWO, time_scale=20)
        try:
            for phase in ("router validates", "engines see surrogates"):
                if phase == "engines see surrogates":
                    monkeypatch.setattr(parsing, "check_tree", lambda value, surrogates=True: None)
                stop = asyncio.Event()
                good: list = []
                opened: list[str] = []
                tasks = [asyncio.create_task(load(bed, stop, good, w)) for w in range(6)]
                tasks.append(asyncio.create_task(watch(bed[AWS].router, stop, opened)))
                await asyncio.sleep(0.5)
                answers = []
                for body in POISON:  # 10 in one second
                    answers.append((await post(bed.session, bed[AWS].url, body))[0])
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*tasks)
                if phase == "router validates":
                    assert answers == [400] * len(POISON), answers
                else:
                    assert answers[:2] == [400, 400] and set(answers) <= {200, 400}, answers
                lost = [a.error for a in good if not a.complete]
                assert len(good) >= 20 and not lost, (phase, lost)
                assert opened == [] and breaker_failures == [], phase
        finally:
            await bed.close()

    run(main())


# ---- the attempt loop's verdicts, without sockets -----------------------------------------------


def _router(engines: int) -> tuple[Router, list[str]]:
    urls = tuple(f"http://10.0.0.{i}:8000" for i in range(1, engines + 1))
    here = RegionInfo("r0", "on-demand", "us", frozenset({MODEL}), None, urls, None, None)
    config = RouterConfig(here, {"r0": here}, {MODEL: 4096}, RouterSettings(), "x" * 16, 500.0)
    router = Router(config, clock=lambda: 100.0)
    for st in router.scraper.engines.values():
        st.record(Sample(0.0, 1000, 16, 16000.0, 0, 0, 0, 0, 0, frozenset({MODEL}), 99.9))
    return router, list(urls)


def _job() -> Job:
    routed = RoutedRequest(need_tokens=100, model=MODEL, residency="us")
    return Job("chat", "/v1/chat/completions", b"{}", {}, False, 10, routed, {}, deadline=1e9)


def _attempts(router: Router, verdicts: dict[str, object]) -> list[str]:
    """Replace the upstream attempt: each engine answers its verdict (an Upstream, or OK)."""
    tried: list[str] = []

    async def attempt(request, job, cand):
        tried.append(cand.engine)
        verdict = verdicts[cand.engine]
        if isinstance(verdict, Exception):
            raise verdict
        return web.Response(text="ok")

    router._attempt = attempt  # type: ignore[method-assign]
    return tried


def test_a_500_then_an_answer_blames_the_first_engine():
    router, urls = _router(3)
    first = router.choose(_job().routed)[0].engine  # the policy's first choice
    assert first is not None
    tried = _attempts(router, {**dict.fromkeys(urls, "ok"), first: Upstream("answered 500", suspect=True)})
    resp = asyncio.run(router._serve(None, _job()))  # type: ignore[arg-type]
    assert resp.status == 200 and len(tried) == 2 and tried[0] == first
    assert router.breakers.engine(first)._failures == 1  # the engine's fault after all


def test_a_500_twice_is_the_requests_fault_and_no_breaker_counts_it():
    router, urls = _router(3)
    tried = _attempts(router, {u: Upstream("answered 500: boom", suspect=True) for u in urls})
    with pytest.raises(HttpError) as info:
        asyncio.run(router._serve(None, _job()))  # type: ignore[arg-type]
    assert info.value.status == 400 and "two engines failed" in info.value.message
    assert len(tried) == 2  # one confirming attempt, not the whole fleet
    assert all(router.breakers.engine(u)._failures == 0 for u in urls)


def test_a_500_with_no_engine_to_confirm_counts_against_nobody():
    router, (a,) = _router(1)
    tried = _attempts(router, {a: Upstream("answered 500", suspect=True)})
    for _ in range(5):
        with pytest.raises(HttpError) as info:
            asyncio.run(router._serve(None, _job()))  # type: ignore[arg-type]
        assert info.value.status == 503
    assert len(tried) == 5 and router.breakers.engine(a)._failures == 0


def test_gateway_statuses_are_the_engines_fault():
    router, urls = _router(3)
    _attempts(router, {u: Upstream("answered 503") for u in urls})
    t0 = time.perf_counter()
    with pytest.raises(HttpError) as info:
        asyncio.run(router._serve(None, _job()))  # type: ignore[arg-type]
    assert info.value.status == 503 and time.perf_counter() - t0 < 1
    assert sum(router.breakers.engine(u)._failures for u in urls) == 3
