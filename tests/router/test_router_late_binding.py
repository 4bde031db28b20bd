"""Late binding (policies/predictive.py, admission.py): a request waits at the router while no engine
can start its prefill in its next step, and is refused once it can no longer meet its TTFT SLO."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from gpufleet.serving.router.parsing import HOP_HEADER, WAITED_HEADER
from gpufleet.serving.router.policy import EngineView, PolicyConfig, RegionView, RoutedRequest, make_policy
from gpufleet.serving.router.predict import profile_for

from .harness import RegionSpec, ask, router_metric, start_fleet

NOW = 50.0
H100 = profile_for("llama-3.1-8b", "H100-80GB")
L40S = profile_for("llama-3.1-8b", "L40S")
HERE = [RegionView("r", local=True)]


def _view(eid, region="r", profile=H100, **kw):
    base = dict(id=eid, region=region, free_tokens=200_000.0, capacity_tokens=profile.capacity_tokens,
                sampled_at=NOW, profile=profile)  # fmt: skip
    base.update(kw)
    return EngineView(**base)


def _req(prompt=3000, out=100, **kw):
    return RoutedRequest(need_tokens=prompt + out, prompt_tokens=prompt, max_tokens=out, **kw)


def _choose(views, req=None, regions=HERE, config=None):
    pol = make_policy("predictive", config or PolicyConfig(ttft_slo_s=2.0))
    return pol.choose(req or _req(), views, regions, NOW)


def test_a_request_waits_while_every_engine_has_a_full_chunk_queued():
    # Both engines have more queued prefill than their next step takes with this prompt.
    busy = [_view("h", pending_prefill_tokens=H100.chunk - 1000, outstanding=3),
            _view("l", profile=L40S, pending_prefill_tokens=L40S.chunk, outstanding=2)]  # fmt: skip
    out = _choose(busy)
    assert out[0].hold_s is not None
    # its slack: the SLO less its own prefill alone on the faster engine
    assert out[0].hold_s == pytest.approx(2.0 - H100.prefill_s(3000), abs=1e-6)
    assert {c.engine for c in out} == {"h", "l"}  # the ranking stays usable
    assert all(c.hold_s is None for c in out[1:])
    # what it has waited already comes off its slack; past it, the policy says refuse
    assert _choose(busy, _req(waited_s=0.5))[0].hold_s == pytest.approx(out[0].hold_s - 0.5, abs=1e-6)
    assert _choose(busy, _req(waited_s=2.0))[0].hold_s <= 0


def test_an_engine_that_can_start_the_prefill_now_takes_it_at_once():
    busy = _view("h", pending_prefill_tokens=H100.chunk, outstanding=3)
    room = _view("h2", pending_prefill_tokens=H100.chunk - 3000, outstanding=1)  # just fits its next step
    out = _choose([busy, room])
    assert out[0].engine == "h2" and out[0].hold_s is None
    # nothing queued: any prompt is taken, even one longer than a chunk
    idle = _view("idle", profile=L40S)
    out = _choose([busy, idle], _req(prompt=L40S.chunk * 2))
    assert out[0].engine == "idle" and out[0].hold_s is None


def test_no_hold_when_disabled_or_when_the_slo_was_never_reachable():
    busy = [_view("h", pending_prefill_tokens=H100.chunk, outstanding=3)]
    assert _choose(busy, config=PolicyConfig(late_binding=False))[0].hold_s is None
    # a prompt whose prefill alone takes longer than the TTFT SLO is served, best effort
    tight = PolicyConfig(ttft_slo_s=0.5 * H100.prefill_s(3000))
    assert _choose(busy, config=tight)[0].hold_s is None


def test_a_peer_that_can_start_it_now_gets_it_instead_of_a_hold():
    busy = _view("h", region="a", pending_prefill_tokens=H100.chunk, outstanding=3)
    ready = _view("p", region="b")
    regions = [RegionView("a", local=True),
               RegionView("b", remote=True, summarized_at=NOW, healthy_engines=1, largest_free_tokens=2e5,
                          free_tokens=2e5, rtt_s=0.06, engines=(ready,))]  # fmt: skip
    out = _choose([busy], regions=regions)
    assert out[0].region == "b" and out[0].engine is None and out[0].hold_s is None
    # the same peer, as busy as here: the request waits here
    regions[1] = replace(regions[1], engines=(replace(ready, pending_prefill_tokens=H100.chunk),))
    assert _choose([busy], regions=regions)[0].hold_s is not None


def _run(coro):
    asyncio.run(coro)


ONE_H100 = (RegionSpec("aws", "us-east-1", "H100-80GB", engines=1, blocks=4096),)
LONG = "gpu " * 2900  # ~3,000 prompt tokens: three of them do not fit one H100 step (8,192 tokens)


def test_a_burst_waits_at_the_router_and_every_request_is_served(tmp_path):
    async def main():
        bed = await start_fleet(tmp_path, ONE_H100, time_scale=1, router={"queue_wait_s": 5.0})
        url = bed["aws-us-east-1"].url
        try:
            answers = await asyncio.gather(*(ask(bed.session, url, LONG, max_tokens=8) for _ in range(12)))
            assert all(a.complete for a in answers), [a.error for a in answers if not a.complete]
            held = await router_metric(bed.session, url, "gpufleet_router_held_total", outcome="sent")
            assert held >= 3  # the engine got the burst as its steps could start it, not all at once
            assert await router_metric(bed.session, url, "gpufleet_router_held_total", outcome="refused") == 0
        finally:
            await bed.close()

    _run(main())


def test_a_request_that_can_no_longer_meet_its_ttft_is_refused_not_lost(tmp_path):
    async def main():
        # TTFT SLO 120 ms: the router expects ~75 ms for one of these prompts alone, so of a burst of 30
        # only the first few can make it
        bed = await start_fleet(tmp_path, ONE_H100, time_scale=1, slo_ttft_ms=120, router={"queue_wait_s": 5.0})
        url = bed["aws-us-east-1"].url
        try:
            answers = await asyncio.gather(*(ask(bed.session, url, LONG, max_tokens=8) for _ in range(30)))
            refused = [a for a in answers if a.status == 429]
            assert refused and all("time-to-first-token" in (a.error or "") for a in refused)
            served = [a for a in answers if a.status != 429]
            assert served and all(a.complete for a in served)  # the rest served in full
            assert len(refused) == await router_metric(
                bed.session, url, "gpufleet_router_held_total", outcome="refused"
            )
            # A forwarded request says how long its origin had it; nonsense there is the sender's fault.
            bad = await ask(bed.session, url, headers={HOP_HEADER: "aws-us-east-1", WAITED_HEADER: "nan"})
            assert bad.status == 400 and WAITED_HEADER in bad.error
        finally:
            await bed.close()

    _run(main())



def test_held_requests_are_woken_oldest_first_and_a_timed_out_wait_is_skipped():
    from gpufleet.serving.router.config import RegionInfo, RouterConfig
    from gpufleet.serving.router.gateway import Router
    from gpufleet.stacks.spec import RouterSettings

    async def main():
        here = RegionInfo("r0", "on-demand", "us", frozenset({"m"}), None, ("http://127.0.0.1:9",), None, None)
        router = Router(RouterConfig(here, {"r0": here}, {"m": 4096}, RouterSettings(), "x" * 16, 500.0))
        first, second, third = (router.held_order() for _ in range(3))
        # the third in line starts waiting first; the line is by order held, not by who waited first
        w3, w1, w2 = router.held_waiter(third), router.held_waiter(first), router.held_waiter(second)
        w2.cancel()  # its wait timed out (wait_for cancels the waiter)
        router.wake_held(1)
        assert w1.done() and not w3.done()
        router.wake_held(1)  # the cancelled one is passed over
        assert w3.done()
        # a request whose wait timed out while a little of its slack was left waits again in its
        # place: two waiters of one order side by side
        again = router.held_order()
        stale = router.held_waiter(again)
        stale.cancel()
        fresh = router.held_waiter(again)
        router.prefill_done()  # a completed prefill wakes the line
        assert fresh.done() and not router._held

    _run(main())


def test_a_forwarded_request_is_held_at_the_peer_for_what_is_left_of_its_slack(tmp_path):
    """A peer holds a forwarded request as its own, less what it waited at its origin (the waited
    header): with its slack spent there it is refused at once, with its slack whole it waits its turn
    and is served."""

    async def main():
        # TTFT SLO 5 s: a burst of 24 prompts of ~3,000 tokens takes ~2 s of H100 prefill, within it
        bed = await start_fleet(tmp_path, ONE_H100, time_scale=1, slo_ttft_ms=5000, router={"queue_wait_s": 10.0})
        url = bed["aws-us-east-1"].url
        forwarded = {HOP_HEADER: "aws-us-east-1"}
        try:
            burst = [asyncio.create_task(ask(bed.session, url, LONG, max_tokens=8)) for _ in range(24)]
            await asyncio.sleep(0.1)  # the engine has more queued than its next step starts, for ~2 s
            spent = await ask(bed.session, url, LONG, max_tokens=8, headers={**forwarded, WAITED_HEADER: "4990"})
            assert spent.status == 429 and "time-to-first-token" in (spent.error or "")
            whole = await ask(bed.session, url, LONG, max_tokens=8, headers={**forwarded, WAITED_HEADER: "0"})
            answers = await asyncio.gather(*burst)
            assert whole.complete and all(a.complete for a in answers), [a.error for a in answers if not a.complete]
            assert await router_metric(bed.session, url, "gpufleet_router_held_total", outcome="refused") == 1
        finally:
            await bed.close()

    _run(main())


def test_the_time_a_request_has_waited_counts_in_its_ttft():
    """An engine that could start the request at once is not taken when what the request has waited
    already, plus its predicted TTFT there, passes the SLO: it would be late, and would take the engine
    from requests still on time. It is refused (its slack is spent) rather than sent late."""
    idle = [_view("h")]
    fresh = _choose(idle)
    assert fresh[0].engine == "h" and fresh[0].hold_s is None
    ttft = fresh[0].predicted_ttft_s
    assert ttft is not None and 0 < ttft < 0.5
    on_time = _choose(idle, _req(waited_s=2.0 - ttft - 0.05))
    assert on_time[0].engine == "h" and on_time[0].hold_s is None
    late = _choose(idle, _req(waited_s=2.0 - ttft + 0.05))
    assert late[0].engine == "h" and late[0].hold_s is not None and late[0].hold_s <= 0


FILLS_IT = "gpu " * 500  # ~500 prompt tokens: with 200 to generate, one fills a 64-block (1,024-token) engine


def test_a_request_that_waited_for_room_past_its_slack_is_refused_not_sent_late(tmp_path):
    """A request queued for KV room (none anywhere) is asked about again with the time it has waited:
    when room comes within its TTFT slack it is served, after it, refused (429) as late binding
    refuses, not sent to answer late."""
    tiny = (RegionSpec("aws", "us-east-1", "H100-80GB", engines=1, blocks=64),)

    async def main():
        for slo_ms, served in ((3000, True), (400, False)):
            bed = await start_fleet(tmp_path, tiny, time_scale=1, slo_ttft_ms=slo_ms, router={"queue_wait_s": 10.0})
            url = bed["aws-us-east-1"].url
            try:
                first = asyncio.create_task(ask(bed.session, url, FILLS_IT, max_tokens=200))
                await asyncio.sleep(0.2)  # it holds the engine's KV for its ~200 steps (~1.4 s)
                second = await ask(bed.session, url, FILLS_IT, max_tokens=8)
                assert (await first).complete
                if served:
                    assert second.complete, second.error
                else:
                    assert second.status == 429 and "time-to-first-token" in (second.error or ""), second
            finally:
                await bed.close()

    _run(main())
