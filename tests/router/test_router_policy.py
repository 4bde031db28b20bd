"""The routing policies, pure: views in, ordered candidates out, time passed in."""

from __future__ import annotations

from dataclasses import replace

import pytest
from gpufleet.serving.router.policy import (
    BreakerState,
    EngineView,
    HeadroomPolicy,
    LeastOutstandingPolicy,
    OptimisticLedger,
    PolicyConfig,
    RegionView,
    RoundRobinPolicy,
    RoutedRequest,
    headroom,
    make_policy,
    recent_pace,
    spare_headroom,
)
from gpufleet.stacks.spec import RouterSettings
from hypothesis import given, settings
from hypothesis import strategies as st

NOW = 100.0
CFG = PolicyConfig(stale_after_s=3.0, waiting_request_tokens=100.0)


def eng(id_, region, free, **kw) -> EngineView:
    return EngineView(
        id=id_, region=region, free_tokens=free, sampled_at=kw.pop("sampled_at", NOW - 0.5), **kw
    )


def reg(key, **kw) -> RegionView:
    return RegionView(key=key, **kw)


REGIONS = [
    reg("local", tier="on-demand", residency="us", local=True),
    reg("cheap", tier="reserved", residency="us"),
    reg("spot", tier="spot", residency="us"),
    reg("eu", tier="reserved", residency="eu"),
]


def ids(cands):
    return [c.target for c in cands]


def test_headroom_subtracts_pending_and_waiting_and_fails_closed():
    e = eng("a", "local", 10_000, pending_tokens=2_000, waiting=3)
    assert headroom(e, NOW, CFG) == 10_000 - 2_000 - 300
    assert headroom(replace(e, waiting_tokens=50.0), NOW, CFG) == 10_000 - 2_000 - 50
    assert headroom(replace(e, sampled_at=NOW - 3.5), NOW, CFG) == 0  # stale counts as full
    assert headroom(replace(e, sampled_at=None), NOW, CFG) == 0  # never sampled
    assert headroom(replace(e, healthy=False), NOW, CFG) == 0


def test_local_region_first_when_it_fits_even_with_less_headroom():
    p = HeadroomPolicy(CFG)
    engines = [eng("l1", "local", 2_000), eng("c1", "cheap", 50_000)]
    assert ids(p.choose(RoutedRequest(1_000), engines, REGIONS, NOW)) == ["l1", "c1"]


def test_spill_prefers_cheaper_tier_then_headroom():
    p = HeadroomPolicy(CFG)
    engines = [
        eng("l1", "local", 500),
        eng("s1", "spot", 90_000),
        eng("c1", "cheap", 5_000),
        eng("c2", "cheap", 8_000),
    ]
    assert ids(p.choose(RoutedRequest(1_000), engines, REGIONS, NOW)) == ["c2", "c1", "s1"]


def test_fit_is_per_engine_not_per_region_sum():
    p = HeadroomPolicy(CFG)
    engines = [eng(f"c{i}", "cheap", 900) for i in range(10)] + [eng("s1", "spot", 1_500)]
    assert ids(p.choose(RoutedRequest(1_000), engines, REGIONS, NOW)) == ["s1"]


def test_residency_drain_breaker_and_exclusions():
    p = HeadroomPolicy(CFG)
    engines = [eng("l1", "local", 9_000), eng("e1", "eu", 90_000), eng("c1", "cheap", 9_000)]
    assert ids(p.choose(RoutedRequest(100, residency="us"), engines, REGIONS, NOW)) == ["l1", "c1"]
    assert ids(p.choose(RoutedRequest(100, residency="eu"), engines, REGIONS, NOW)) == ["e1"]
    drained = [replace(r, drained=r.key == "local") for r in REGIONS]
    assert "l1" not in ids(p.choose(RoutedRequest(100), engines, drained, NOW))
    opened = [replace(engines[0], breaker=BreakerState.open), *engines[1:]]
    assert "l1" not in ids(p.choose(RoutedRequest(100), opened, REGIONS, NOW))
    assert "l1" not in ids(p.choose(RoutedRequest(100, exclude=frozenset({"l1"})), engines, REGIONS, NOW))
    half = [replace(engines[0], breaker=BreakerState.half_open), *engines[1:]]
    assert ids(p.choose(RoutedRequest(100), half, REGIONS, NOW))[0] == "l1"
    dr = [replace(engines[0], drained=True), *engines[1:]]
    assert "l1" not in ids(p.choose(RoutedRequest(100), dr, REGIONS, NOW))


def test_model_filter():
    p = HeadroomPolicy(CFG)
    regions = [replace(REGIONS[0], models=frozenset({"a"})), replace(REGIONS[1], models=frozenset({"b"}))]
    engines = [eng("l1", "local", 9_000), eng("c1", "cheap", 9_000)]
    assert ids(p.choose(RoutedRequest(100, model="b"), engines, regions, NOW)) == ["c1"]


def test_nothing_fits_gives_empty_list():
    p = HeadroomPolicy(CFG)
    assert p.choose(RoutedRequest(10_000), [eng("l1", "local", 9_000)], REGIONS, NOW) == []


def test_peer_summaries_are_forward_candidates():
    p = HeadroomPolicy(CFG)
    regions = [
        REGIONS[0],
        reg(
            "peer",
            tier="reserved",
            remote=True,
            free_tokens=40_000,
            largest_free_tokens=20_000,
            healthy_engines=2,
            summarized_at=NOW - 1,
        ),
        reg(
            "small",
            tier="reserved",
            remote=True,
            free_tokens=40_000,
            largest_free_tokens=500,
            healthy_engines=4,
            summarized_at=NOW - 1,
        ),
        reg(
            "old",
            tier="reserved",
            remote=True,
            free_tokens=99_000,
            largest_free_tokens=99_000,
            healthy_engines=4,
            summarized_at=NOW - 60,
        ),
    ]
    cands = p.choose(RoutedRequest(1_000), [eng("l1", "local", 200)], regions, NOW)
    assert [(c.region, c.engine) for c in cands] == [("peer", None)]
    # A request that already crossed a region boundary is not forwarded again.
    assert p.choose(RoutedRequest(1_000, allow_remote=False), [eng("l1", "local", 200)], regions, NOW) == []


def test_an_engine_with_a_waiting_queue_fits_only_as_a_last_resort():
    """A waiting queue means the engine admits nothing now, whatever its free KV: the request goes
    to an engine or a peer region that admits it now, and to the queued engine only if none does."""
    p = HeadroomPolicy(CFG)
    peer = reg(
        "peer",
        tier="spot",  # a worse tier than local: still before a local engine with a queue
        remote=True,
        free_tokens=9_000,
        largest_free_tokens=9_000,
        healthy_engines=1,
        summarized_at=NOW - 1,
    )
    regions = [REGIONS[0], peer]
    busy = eng("l1", "local", 90_000, waiting=2)
    idle = eng("l2", "local", 5_000)
    assert ids(p.choose(RoutedRequest(1_000), [busy, idle], regions, NOW)) == ["l2", "peer", "l1"]
    assert ids(p.choose(RoutedRequest(1_000), [busy], regions, NOW)) == ["peer", "l1"]
    # Nothing else admits it (the peer is too small, or it was forwarded once): still served, not refused.
    assert ids(p.choose(RoutedRequest(20_000), [busy], regions, NOW)) == ["l1"]
    assert ids(p.choose(RoutedRequest(1_000, allow_remote=False), [busy], regions, NOW)) == ["l1"]
    # What a region publishes for its peers: no room on an engine with a queue.
    assert spare_headroom(busy, NOW, CFG) == 0
    assert spare_headroom(idle, NOW, CFG) == headroom(idle, NOW, CFG) == 5_000


def test_an_engine_decoding_slower_than_the_pace_limit_fits_only_as_a_last_resort():
    """Free KV with running requests already near the TPOT target is not headroom: one more request
    slows every one of them. The pace limit comes from the fleet's SLO and router settings."""
    cfg = PolicyConfig.from_settings(RouterSettings(pace_fraction=0.6), tpot_slo_s=0.1)
    assert cfg.itl_limit_s == pytest.approx(0.06)
    assert cfg.stale_after_s == RouterSettings().stale_after_s
    p = HeadroomPolicy(cfg)
    slow = eng("l1", "local", 90_000, recent_itl_s=0.07)
    fast = eng("l2", "local", 5_000, recent_itl_s=0.03)
    idle = eng("l3", "local", 4_000)  # no pace measured: idle, not slow
    assert ids(p.choose(RoutedRequest(1_000), [slow, fast, idle], REGIONS[:1], NOW)) == ["l2", "l3", "l1"]
    assert ids(p.choose(RoutedRequest(1_000), [slow], REGIONS[:1], NOW)) == ["l1"]  # still served
    assert spare_headroom(slow, NOW, cfg) == 0 and spare_headroom(fast, NOW, cfg) == 5_000
    # Without a limit (PolicyConfig's default) the pace is ignored: most headroom first.
    assert ids(HeadroomPolicy(CFG).choose(RoutedRequest(1_000), [slow, fast], REGIONS[:1], NOW)) == ["l1", "l2"]


def test_a_peer_with_only_saturated_engines_is_a_last_resort():
    """A peer publishes no spare room while its engines are saturated, but what would fit there
    still counts when nothing here can take the request (this region's engines died mid-stream)."""
    p = HeadroomPolicy(CFG)
    busy_peer = reg("peer", remote=True, largest_fit_tokens=9_000, healthy_engines=1, summarized_at=NOW - 1)
    open_peer = replace(busy_peer, key="open", free_tokens=3_000, largest_free_tokens=3_000, largest_fit_tokens=3_000)
    local_busy = eng("l1", "local", 50_000, waiting=1)
    regions = [REGIONS[0], busy_peer, open_peer]
    assert ids(p.choose(RoutedRequest(1_000), [local_busy], regions, NOW)) == ["open", "l1", "peer"]
    assert ids(p.choose(RoutedRequest(1_000), [], regions, NOW)) == ["open", "peer"]
    assert ids(p.choose(RoutedRequest(5_000), [], regions, NOW)) == ["peer"]
    assert p.choose(RoutedRequest(10_000), [], regions, NOW) == []  # fits nowhere
    assert p.choose(RoutedRequest(1_000, allow_remote=False), [], regions, NOW) == []  # one hop only
    stale = replace(busy_peer, summarized_at=NOW - 60)
    assert p.choose(RoutedRequest(5_000), [], [REGIONS[0], stale], NOW) == []


def test_recent_pace_is_the_window_mean():
    assert recent_pace(4.0, 100, 6.4, 130, running=3, last=None) == pytest.approx(0.08)
    assert recent_pace(6.4, 130, 6.4, 130, running=3, last=0.08) == 0.08  # no token, still running
    assert recent_pace(6.4, 130, 6.4, 130, running=0, last=0.08) is None  # idle
    assert recent_pace(6.4, 130, 0.1, 5, running=3, last=0.08) is None  # counters reset


def test_round_robin_rotates_and_least_outstanding_balances():
    engines = [eng("a", "local", 1), eng("b", "local", 1), eng("c", "local", 1)]
    rr = RoundRobinPolicy(CFG)
    firsts = [rr.choose(RoutedRequest(10), engines, REGIONS, NOW)[0].target for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    lo = LeastOutstandingPolicy(CFG)
    loaded = [replace(engines[0], outstanding=5), replace(engines[1], outstanding=1), engines[2]]
    assert ids(lo.choose(RoutedRequest(10), loaded, REGIONS, NOW)) == ["c", "b", "a"]
    assert make_policy("round-robin").name == "round-robin"


def test_affinity_breaks_ties_stably():
    p = HeadroomPolicy(CFG)
    engines = [eng(f"e{i}", "local", 5_000) for i in range(8)]
    first = {
        p.choose(RoutedRequest(10, affinity_key="prefix-1"), engines, REGIONS, NOW)[0].target
        for _ in range(5)
    }
    assert len(first) == 1


def test_ledger_counts_demand_not_yet_materialized():
    ledger = OptimisticLedger()
    ledger.routed("a", "r1", 500, now=1.0)
    ledger.routed("a", "r2", 300, now=2.0)
    assert ledger.pending("a") == 800 and ledger.in_flight("a") == 2
    ledger.progress("r1", 120)  # prompt plus tokens generated so far now sit in the cache
    assert ledger.pending("a") == 680
    ledger.done("r2")
    assert ledger.pending("a") == 380
    ledger.covered("a", until=1.5)  # a summary that already reflects r1
    assert ledger.pending("a") == 0
    ledger.done("r1")
    ledger.done("unknown")
    assert ledger.pending("a") == 0 and ledger.pending("never") == 0


def test_ledger_fits_a_request_that_grows_after_the_running_ones_end():
    """The exact peak, not the bound: a request in flight with 50 tokens left holds 850 of an engine's
    1,000 (150 free). A new one of 40 + 100 tokens exceeds the bound (50 + 140 > 150) but needs at
    most 140 more: 50 + 90 at the running one's last token, which then frees its 900. With 80 tokens
    left it ends too late (then 80 + 120 > 150); a request not started yet counts its whole demand."""
    ledger = OptimisticLedger()
    ledger.routed("a", "running", 900, now=1.0, prefill_tokens=800)
    ledger.progress("running", 850)  # started: prompt and 50 tokens in the cache
    assert ledger.pending("a") == 50
    assert ledger.fits("a", room=150, prompt=40, out=100) and ledger.fits("a", room=140, prompt=40, out=100)
    assert not ledger.fits("a", room=139, prompt=40, out=100)
    assert not ledger.fits("a", room=140, prompt=41, out=100)
    ledger.routed("a", "running", 930, now=1.0, prefill_tokens=800)
    ledger.progress("running", 850)  # 80 left
    assert not ledger.fits("a", room=150, prompt=40, out=100)
    assert ledger.fits("a", room=260, prompt=40, out=100)  # the bound: 80 + 140, and more room
    ledger.routed("a", "queued", 100, now=2.0, prefill_tokens=60)  # not started: 100 for good
    assert not ledger.fits("a", room=260, prompt=40, out=100)
    assert ledger.fits("a", room=360, prompt=40, out=100)
    assert ledger.fits("empty", room=140, prompt=40, out=100) and not ledger.fits("empty", 139, 40, 100)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 400), st.booleans()), max_size=8),
    st.integers(0, 300), st.integers(1, 300), st.integers(0, 3000),
)  # fmt: skip
def test_ledger_fits_only_what_a_step_by_step_replay_holds(flights, prompt, out, room):
    """Against a replay of every step (each started request grows a token per step until its demand,
    then frees what it holds; one not started holds its whole demand throughout): `fits` says yes
    exactly when the replay never needs more than `room`, and always when the bound does."""
    ledger = OptimisticLedger()
    for i, (held, left, started) in enumerate(flights):
        ledger.routed("a", i, held + left, now=0.0, prefill_tokens=0 if started else max(1, held))
        if started:
            ledger.progress(i, held)
    peak = 0
    for k in range(0, 1002):
        use = prompt + k if k <= out else 0
        for held, left, started in flights:
            if not started:
                use += held + left
            elif k <= left:
                use += k
            else:
                use -= held
        peak = max(peak, use)
    assert ledger.fits("a", room, prompt, out) == (peak <= room)
    if ledger.pending("a") + prompt + out <= room:
        assert ledger.fits("a", room, prompt, out)


def test_optimistic_accounting_spreads_a_burst():
    """Between two scrapes, a burst goes to several engines, not all onto the roomiest one."""
    p, ledger = HeadroomPolicy(CFG), OptimisticLedger()
    base = [eng("a", "local", 10_000), eng("b", "local", 8_000)]
    chosen = []
    for i in range(6):
        views = [replace(e, pending_tokens=ledger.pending(e.id)) for e in base]
        target = p.choose(RoutedRequest(2_000), views, REGIONS, NOW + i * 0.01)[0].target
        ledger.routed(target, i, 2_000, NOW)
        chosen.append(target)
    # Without the ledger all six would go to "a"; with it, the headrooms stay within one request.
    assert chosen == ["a", "a", "b", "a", "b", "a"]
    # Left: 2,000 on "a", 4,000 on "b"; more than that fits nowhere.
    views = [replace(e, pending_tokens=ledger.pending(e.id)) for e in base]
    assert ids(p.choose(RoutedRequest(4_001), views, REGIONS, NOW)) == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([r.key for r in REGIONS]),
            st.floats(0, 50_000),
            st.booleans(),
            st.sampled_from(list(BreakerState)),
            st.floats(0, 10),
        ),
        max_size=30,
    ),
    st.integers(1, 40_000),
    st.sampled_from([None, "us", "eu"]),
)
def test_every_candidate_fits_and_is_allowed(specs, need, residency):
    engines = [
        eng(f"e{i}", r, free, healthy=ok, breaker=b, sampled_at=NOW - age)
        for i, (r, free, ok, b, age) in enumerate(specs)
    ]
    by_region = {r.key: r for r in REGIONS}
    cands = HeadroomPolicy(CFG).choose(RoutedRequest(need, residency=residency), engines, REGIONS, NOW)
    views = {e.id: e for e in engines}
    assert len({c.target for c in cands}) == len(cands)
    for c in cands:
        e = views[c.engine]
        assert headroom(e, NOW, CFG) >= need and e.breaker is not BreakerState.open
        assert residency is None or by_region[e.region].residency == residency
    # Local candidates come first.
    locals_ = [by_region[c.region].local for c in cands]
    assert locals_ == sorted(locals_, reverse=True)
