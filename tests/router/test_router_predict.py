"""The predicting policy's model (serving/router/predict.py), its online correction, the prefix
index, and the baselines' shared interface."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from gpufleet.serving.router.policies import BASELINES, POLICIES
from gpufleet.serving.router.policy import EngineView, PolicyConfig, RegionView, RoutedRequest, make_policy
from gpufleet.serving.router.predict import Correction, Corrections, predict, profile_for
from gpufleet.serving.router.prefix import PrefixIndex, chain, text_chain

NOW = 50.0
H100 = profile_for("llama-3.1-8b", "H100-80GB")
L40S = profile_for("llama-3.1-8b", "L40S")


def _view(eid, region="r", profile=H100, **kw):
    base = dict(id=eid, region=region, free_tokens=200_000.0, capacity_tokens=profile.capacity_tokens,
                sampled_at=NOW, profile=profile)  # fmt: skip
    base.update(kw)
    return EngineView(**base)


def _pred(profile, **kw):
    args = dict(running=0, ctx_tokens=0.0, queued_prefill=0.0, prompt=1000, cached=0, max_tokens=200, rtt_s=0.0,
                corr=Correction())  # fmt: skip
    args.update(kw)
    return predict(profile, **args)


def test_prediction_uses_the_engine_models_step_times():
    from gpufleet.serving.engine.model import plan_step

    # one chunk of prefill alone is exactly the model's step for it
    n = 1024
    assert H100.prefill_s(n) == pytest.approx(plan_step(H100.cfg, n, n, n * n / 2, 1).step_time(0))
    # a faster GPU predicts a faster prefill and decode; a longer queue a later first token
    assert _pred(H100).ttft_s < _pred(L40S).ttft_s
    assert _pred(H100, running=50, ctx_tokens=5e4).tpot_s < _pred(L40S, running=50, ctx_tokens=5e4).tpot_s
    assert _pred(H100, queued_prefill=20_000).ttft_s > _pred(H100).ttft_s + 0.1
    # cached prefix tokens are not prefilled again; the round trip is paid on top
    assert _pred(H100, prompt=8000, cached=7168).ttft_s < _pred(H100, prompt=8000).ttft_s / 3
    assert _pred(H100, rtt_s=0.15).ttft_s == pytest.approx(_pred(H100).ttft_s + 0.15)


def test_online_correction_sees_a_slow_engine_and_the_policy_avoids_it():
    corr = Corrections()
    slow = _view("slow", running=20, kv_usage=0.1)
    step = H100.decode_step(20, 0.1 * H100.capacity_tokens)
    for i in range(12):  # the engine decodes 3x slower than its catalog figure
        corr.observe(_view("slow", running=20, kv_usage=0.1, sampled_at=NOW + i, recent_itl_s=3 * step))
    c = corr.by_engine["slow"]
    from gpufleet.serving.router.predict import MAX_PACE

    assert 2.5 < c.speed < 3.1 and c.pace == pytest.approx(MAX_PACE, rel=0.05)
    # the policy: two identical engines, one observed slow, gets the request second
    pol = make_policy("predictive", PolicyConfig())
    fast = _view("fast", running=20, kv_usage=0.1)
    for i in range(12):
        t = NOW + i
        views = [_view("slow", running=20, kv_usage=0.1, sampled_at=t, recent_itl_s=3 * step),
                 _view("fast", running=20, kv_usage=0.1, sampled_at=t, recent_itl_s=step)]  # fmt: skip
        out = pol.choose(RoutedRequest(need_tokens=1200, prompt_tokens=1000, max_tokens=200), views,
                         [RegionView("r", local=True)], t)  # fmt: skip
    assert [c.engine for c in out] == ["fast", "slow"]
    assert slow.id != fast.id


def test_the_ttft_offset_tracks_the_median_of_what_the_router_measured():
    """What the engine model leaves out of a TTFT (the hops, the wait for the current step) is learnt
    per engine from what the router measures: at the median, so the one request in ten that waited
    behind a burst does not move it; never below 0; and the policy's predictions carry it."""
    import random

    rng = random.Random(7)
    c = Correction()
    for i in range(400):
        predicted = 0.05 + c.offset_s  # the prediction includes the offset learnt so far
        late = 1.0 if i % 10 == 0 else rng.uniform(-0.005, 0.005)
        c.observe_ttft(predicted, 0.05 + 0.03 + late)  # 30 ms the model leaves out
    assert c.offset_s == pytest.approx(0.03, abs=0.006)
    for _ in range(200):  # predictions too high: the offset goes to 0, not below
        c.observe_ttft(0.5 + c.offset_s, 0.1)
    assert c.offset_s == 0.0
    c.observe_ttft(float("nan"), 0.1)
    c.observe_ttft(0.1, float("inf"))
    assert c.offset_s == 0.0

    pol = make_policy("predictive", PolicyConfig())
    req = RoutedRequest(need_tokens=1200, prompt_tokens=1000, max_tokens=200)
    base = pol.choose(req, [_view("e")], [RegionView("r", local=True)], NOW)[0].predicted_ttft_s
    assert base is not None and base > 0
    for _ in range(100):
        predicted = pol.choose(req, [_view("e")], [RegionView("r", local=True)], NOW)[0].predicted_ttft_s
        pol.observe_ttft("e", predicted, base + 0.04)
    after = pol.choose(req, [_view("e")], [RegionView("r", local=True)], NOW)[0].predicted_ttft_s
    assert after == pytest.approx(base + 0.04, abs=0.005)


def test_predictive_sends_a_long_prompt_to_the_fast_gpu_and_never_where_it_cannot_fit():
    pol = make_policy("predictive", PolicyConfig(ttft_slo_s=2.0))
    views = [_view("l40s", profile=L40S), _view("h100", free_tokens=10_000.0)]
    req = RoutedRequest(need_tokens=12_500, prompt_tokens=12_000, max_tokens=500)
    out = pol.choose(req, views, [RegionView("r", local=True)], NOW)
    assert [c.engine for c in out] == ["l40s"]  # the H100 cannot hold it: the admission guard
    views[1] = _view("h100")
    out = pol.choose(req, views, [RegionView("r", local=True)], NOW)
    assert out[0].engine == "h100"


def test_predictive_admits_where_the_running_requests_end_before_it_grows():
    """The admission guard reads the router's ledger: an engine with 1,000 tokens free whose running
    request has 50 tokens left takes a request of 600 + 400 (at most 700 more while that one runs,
    and then it frees 8,950), which the headroom bound (50 + 1,000) would refuse."""
    from gpufleet.serving.router.policy import OptimisticLedger

    ledger = OptimisticLedger()
    ledger.routed("e", "r1", 9000, NOW, prefill_tokens=8000)
    ledger.progress("r1", 8950)
    view = _view("e", free_tokens=1000.0, pending_tokens=ledger.pending("e"), running=1, ledger=ledger)
    req = RoutedRequest(need_tokens=1000, prompt_tokens=600, max_tokens=400)
    regions = [RegionView("r", local=True)]
    pol = make_policy("predictive", PolicyConfig())
    assert [c.engine for c in pol.choose(req, [view], regions, NOW)] == ["e"]
    assert pol.choose(req, [replace(view, ledger=None)], regions, NOW) == []  # the bound alone
    ledger.routed("e", "r2", 400, NOW, prefill_tokens=300)  # queued there, not started: all of it counts
    view = replace(view, pending_tokens=ledger.pending("e"))
    assert pol.choose(req, [view], regions, NOW) == []


def test_predictive_spills_only_where_the_peer_predicts_better():
    pol = make_policy("predictive", PolicyConfig())
    busy = _view("here", region="a", profile=L40S, running=200, kv_usage=0.5, pending_prefill_tokens=60_000)
    idle = _view("there", region="b", sampled_at=NOW)
    regions = [RegionView("a", local=True),
               RegionView("b", remote=True, summarized_at=NOW, healthy_engines=1, largest_free_tokens=2e5,
                          free_tokens=2e5, rtt_s=0.06, engines=(idle,))]  # fmt: skip
    req = RoutedRequest(need_tokens=3000, prompt_tokens=2500, max_tokens=500)
    assert pol.choose(req, [busy], regions, NOW)[0].region == "b"
    calm = _view("here", region="a", profile=H100)
    assert pol.choose(req, [calm], regions, NOW)[0].engine == "here"  # fine here: no hop


def test_prefix_index_finds_the_longest_shared_prefix():
    idx = PrefixIndex(max_entries=100)
    a, b = chain([1, 2, 3, 4]), chain([1, 2, 9])
    idx.record(a, "e1")
    idx.record(b, "e2")
    assert idx.match(chain([1, 2, 3, 7])) == {"e1": 3, "e2": 2}
    assert idx.match(chain([5])) == {}
    assert text_chain("x" * 5000) == text_chain("x" * 4100)[:2] and len(text_chain("x" * 5000)) == 2
    small = PrefixIndex(max_entries=3)
    small.record(a, "e1")
    assert len(small.match(a)) == 0 and sum(small.blocks.values()) == 3  # oldest blocks evicted


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_offers_every_usable_engine_and_respects_exclusions(name):
    pol = make_policy(name, PolicyConfig(seed=1))
    views = [_view(f"e{i}", outstanding=i, running=i, kv_usage=0.01 * i) for i in range(5)]
    req = RoutedRequest(need_tokens=500, prompt_tokens=400, max_tokens=100, exclude=frozenset({"e3"}),
                        prefix=chain([1, 2]))  # fmt: skip
    out = pol.choose(req, views, [RegionView("r", local=True)], NOW)
    assert sorted(c.engine for c in out) == ["e0", "e1", "e2", "e4"]
    if name in BASELINES and name not in ("round-robin", "power-of-two", "prefix-affinity", "kv-cost", "llm-d"):
        assert out[0].engine == "e0"  # the least loaded


def test_a_decision_over_1000_engines_is_cheap():
    pol = make_policy("predictive", PolicyConfig())
    profiles = [H100, L40S, profile_for("llama-3.1-8b", "A100-80GB")]
    views = [_view(f"e{i}", region=f"r{i % 20}", profile=profiles[i % 3], running=i % 40, kv_usage=(i % 10) / 20,
                   pending_prefill_tokens=float(i % 7) * 500) for i in range(1000)]  # fmt: skip
    regions = [RegionView(f"r{i}", local=i == 0) for i in range(20)]
    req = RoutedRequest(need_tokens=1500, prompt_tokens=1200, max_tokens=300)
    pol.choose(req, views, regions, NOW)
    best = min(_timed(pol, req, views, regions) for _ in range(5))
    assert best < 0.02  # generous for a loaded CI machine; tests/bench/bench_decision.py measures it


def _timed(pol, req, views, regions) -> float:
    t = time.perf_counter()
    pol.choose(req, views, regions, NOW)
    return time.perf_counter() - t


def test_an_answer_carries_the_predicted_ttft_when_asked_also_from_the_peer_that_chose(tmp_path):
    """`X-Gpufleet-Explain: 1` on a request puts the TTFT the predicting policy expected of the chosen
    engine on the answer (streamed or not), with how long the request had waited at the routers
    when it was sent there; a request forwarded to a peer carries the peer's figures, since the peer
    chose the engine; without the header there are none."""
    import asyncio

    from gpufleet.serving.router.parsing import PREDICTED_HEADER, ROUTED_HEADER, SENT_AFTER_HEADER

    from .harness import MODEL, TOKEN, start_fleet

    aws = "aws-us-east-1"
    SEEDED = 0.2  # seconds: a TTFT offset as if earlier answers had been slower than predicted

    async def post(bed, stream: bool, explain: bool):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 300}], "max_tokens": 4,
                "stream": stream}  # fmt: skip
        headers = {"X-Gpufleet-Explain": "1"} if explain else {}
        async with bed.session.post(bed[aws].url + "/v1/chat/completions", json=body, headers=headers) as r:
            await r.read()
            assert r.status == 200
            sent_after = r.headers.get(SENT_AFTER_HEADER)
            assert (sent_after is None) is (not explain)
            if sent_after is not None:  # ms; nothing held these: the time to parse and choose
                assert 0 <= float(sent_after) < 1000
            return r.headers.get(ROUTED_HEADER), r.headers.get(PREDICTED_HEADER)

    async def main():
        bed = await start_fleet(tmp_path)
        corrections = bed[aws].router.policy.corrections
        for e in bed[aws].engines:
            corrections.by_engine.setdefault(e.url, Correction()).offset_s = SEEDED
        try:
            for stream in (True, False):
                region, predicted = await post(bed, stream, explain=True)
                assert region == aws and predicted is not None
                # a 300-word prompt on an idle H100: some milliseconds of prefill, well under a second
                assert 0.1 < float(predicted) < 1000
                assert (await post(bed, stream, explain=False))[1] is None
            # the streamed answers' TTFTs were measured against their predictions: the emulators run
            # 20x faster than their model, so the measured TTFT pulls the seeded offset down
            assert any(corrections.by_engine[e.url].offset_s < SEEDED for e in bed[aws].engines)
            async with bed.session.post(bed[aws].url + "/admin/v1/drain", json={"region": aws},
                                        headers={"Authorization": f"Bearer {TOKEN}"}) as r:  # fmt: skip
                assert r.status == 200
            region, predicted = await post(bed, True, explain=True)
            assert region != aws and predicted is not None and float(predicted) > 0.1
        finally:
            await bed.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_peers_engine_is_predicted_with_the_ttft_offset_its_own_router_measured():
    pol = make_policy("predictive", PolicyConfig())
    mine = _view("e1", running=8, kv_usage=0.2)
    theirs = replace(mine, ttft_offset_s=0.3)
    pol.corrections.by_engine["e1"] = Correction(offset_s=0.05)  # this router's own, for its engine
    own = pol.score(mine, 1000, 0, 200)[3]
    peer = pol.score(theirs, 1000, 0, 200)[3]
    assert peer == pytest.approx(own - 0.05 + 0.3)


def test_region_summaries_carry_each_engines_ttft_offset_to_the_peers(tmp_path):
    """The offset a router measured for its engines goes out with its summary; a peer predicts a
    forwarded request with it. A garbage figure is dropped (that engine uses the peer's own),
    an out-of-range one clamped."""
    import asyncio

    from gpufleet.serving.router.gateway import _peer_engines, engine_figures

    from .harness import start_fleet

    aws, gcp = "aws-us-east-1", "gcp-us-central1"

    async def main():
        bed = await start_fleet(tmp_path)
        try:
            for e in bed[aws].engines:
                bed[aws].router.policy.corrections.by_engine[e.url] = Correction(offset_s=0.25)
            seen: set = set()
            for _ in range(100):  # the next summary round
                await asyncio.sleep(0.05)
                views = {r.key: r for r in bed[gcp].router.region_views(bed[gcp].router.clock())}
                seen = {e.ttft_offset_s for e in views[aws].engines}
                if seen == {0.25}:
                    break
            assert seen == {0.25}
        finally:
            await bed.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    figures = engine_figures([_view("e1")], ("llama-3.1-8b", "H100-80GB", 1, None), NOW)
    assert figures[0]["ttft_offset_s"] is None  # no policy with corrections: none to tell
    for sent, got in ((0.4, 0.4), (-3, 0.0), (1e9, 1.0), ("0.2", None), (float("nan"), None), (True, None)):
        views = _peer_engines("r", [dict(figures[0], ttft_offset_s=sent)], NOW)
        assert len(views) == 1 and views[0].ttft_offset_s == got, sent
