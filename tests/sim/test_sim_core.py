"""The fleet simulator: determinism, failures, residency, the policies' ordering, scale, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gpufleet.serving import loadgen
from gpufleet.serving.outcomes import FAILED, OK
from gpufleet.serving.sim.core import Failure, SimConfig, SimError, Simulator

DEMO = ("aws-us-west-2", "gcp-us-central1", "azure-eastus")


def _items(seconds=120.0, load=4.0, seed=3):
    return loadgen.synthetic("conv", seconds, load, seed)


def test_failure_spec_parsing():
    assert Failure.parse("aws-us-east-1@30") == Failure("aws-us-east-1", 30.0, None)
    assert Failure.parse("eu@10+5") == Failure("eu", 10.0, 15.0)
    for bad in ("aws", "@3", "x@", "x@a", "x@3+0", "x@-1"):
        with pytest.raises(SimError):
            Failure.parse(bad)


def test_unknown_failure_region_is_refused(example_fleet):
    with pytest.raises(SimError, match="nowhere"):
        Simulator(example_fleet, SimConfig(failures=[Failure("nowhere", 1.0)]))


def test_runs_are_deterministic_and_complete(example_fleet):
    items = _items(60, 2)
    a = Simulator(example_fleet, SimConfig(engines_per_region=1, regions=DEMO)).run(items)
    b = Simulator(example_fleet, SimConfig(engines_per_region=1, regions=DEMO)).run(items)
    assert [r.ttft_s for r in a.records] == [r.ttft_s for r in b.records]
    assert a.summary.requests == len(items)
    assert all(r.outcome == OK for r in a.records)
    assert a.summary.output_tokens == sum(i.max_tokens for i in items)
    assert a.cost_per_million_tokens and a.cost_per_million_tokens > 0
    assert set(a.utilisation) == set(DEMO) and all(0 <= u <= 1 for u in a.utilisation.values())


def test_headroom_beats_round_robin_when_a_small_region_overloads(example_fleet):
    items = _items(300, 4)
    good = {}
    for p in ("headroom", "round-robin", "least-outstanding"):
        r = Simulator(example_fleet, SimConfig(policy=p, engines_per_region=1, regions=DEMO)).run(items)
        good[p] = r.summary.goodput_rps
        if p == "round-robin":
            assert r.preemptions > 0 and sum(r.spills.values()) == 0
    assert good["headroom"] > 1.2 * good["round-robin"]
    assert good["headroom"] > 1.2 * good["least-outstanding"]


def test_region_failure_loses_no_request_and_continues_streams(example_fleet):
    items = _items(120, 2)
    fail = Failure("gcp-us-central1", 40.0, 80.0)
    r = Simulator(example_fleet, SimConfig(engines_per_region=1, regions=DEMO, failures=[fail])).run(items)
    assert r.failed_during_failure == 0
    assert r.summary.failed == 0
    assert r.summary.continued > 0  # streams in flight at the failure were continued elsewhere
    during = [x for x in r.records if 41 <= x.arrival_s < 80 and x.outcome == OK]
    assert during and all(x.region != "gcp-us-central1" for x in during)
    assert [what for _, what in r.events] == ["gcp-us-central1 down", "gcp-us-central1 restored"]


def test_residency_keeps_eu_requests_in_the_eu(example_fleet):
    items = _items(120, 6)
    r = Simulator(example_fleet, SimConfig(engines_per_region=1)).run(items)
    eu = {"gcp-europe-west4", "azure-westeurope"}
    for rec in r.records:
        if rec.outcome == OK and rec.client_region in eu:
            assert rec.region in eu
    assert any(rec.spilled for rec in r.records)


def test_mooncake_prefixes_hit_the_prefix_cache(example_fleet, traces_dir):
    from dataclasses import replace

    trace = traces_dir / "mooncake_synthetic_trace.jsonl.gz"
    items = loadgen.clip(loadgen.from_trace(trace, duration_s=120, load_scale=0.5), 32768)
    cfg = SimConfig(engines_per_region=1, regions=("gcp-us-central1",))
    shared = Simulator(example_fleet, cfg).run(items)
    unique = Simulator(example_fleet, cfg).run([replace(i, hash_ids=()) for i in items])
    assert shared.prefix_hit_rate > 0.005  # the hash_ids that repeat in this slice are found
    assert unique.prefix_hit_rate == 0.0


def test_twenty_region_fleet_builds_500_engines(repo_root):
    from gpufleet.stacks.fleetfile import load_fleet

    fleet = load_fleet(repo_root / "tests" / "bench" / "fleet_20_regions.yaml")
    sim = Simulator(fleet, SimConfig())
    assert len(sim.engines) == 500 and len(sim.routers) == 20


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpufleet.cli.app", "simulate", *args], cwd=cwd, capture_output=True, text=True
    )


def test_cli_json_and_bad_input(repo_root):
    r = _cli(
        "--trace",
        "builtin:conv",
        "--duration",
        "30",
        "--engines-per-region",
        "1",
        "-p",
        "all",
        "--json",
        "--fail",
        "aws-us-east-1@10+5",
        cwd=repo_root,
    )
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)
    from gpufleet.cli.simulate import POLICIES
    from gpufleet.serving.router.policies import POLICIES as REGISTERED

    assert set(POLICIES) == set(REGISTERED)  # the CLI's literal list follows the registry
    assert [x["policy"] for x in runs] == [p for p in POLICIES if p != "default"]
    assert all(x["failure"] == "aws-us-east-1@10+5" for x in runs)
    for args, needle in (
        (("--trace", "missing.csv"), "missing.csv"),
        (("--trace", "builtin:conv", "-p", "random"), "random"),
        (("--trace", "builtin:conv", "--reach", "planet"), "planet"),
        (("--trace", "builtin:conv", "--fail", "x"), "REGION@SECONDS"),
        (("--trace", "builtin:conv", "--load-scale", "0"), "positive"),
        (("--trace", "builtin:conv", "--fleet", "nope.yaml"), "nope.yaml"),
    ):
        r = _cli(*args, cwd=repo_root)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr


def test_failed_outcome_is_counted(example_fleet):
    # every engine of a one-region fleet down for good: requests cannot be served, and say so
    items = _items(20, 1)
    r = Simulator(
        example_fleet,
        SimConfig(engines_per_region=1, regions=("aws-us-west-2",), failures=[Failure("aws-us-west-2", 5.0)]),
    ).run(items)
    late = [x for x in r.records if x.arrival_s > 6]
    assert late and all(x.outcome != OK for x in late)
    assert r.summary.failed + r.summary.rejected == sum(1 for x in r.records if x.outcome != OK)
    assert FAILED in {x.outcome for x in r.records} or r.summary.rejected


def test_global_reach_is_one_router_that_pays_the_round_trip(example_fleet):
    from gpufleet.serving.sim import network

    items = loadgen.assign_clients(_items(120, 3), ["aws-us-west-2"])  # every client in one region
    regional = Simulator(example_fleet, SimConfig(policy="least-outstanding", engines_per_region=1,
                                                  regions=DEMO)).run(items)  # fmt: skip
    glob = Simulator(example_fleet, SimConfig(policy="least-outstanding", engines_per_region=1, regions=DEMO,
                                              reach="global")).run(items)  # fmt: skip
    # regional least-outstanding serves its own region only; one global router spreads over all three
    assert {r.region for r in regional.records} == {"aws-us-west-2"}
    away = [r for r in glob.records if r.region not in (None, "aws-us-west-2")]
    assert away and all(r.spilled for r in away)
    # a request served far away pays the round trip in its TTFT
    rtt = 2 * network.one_way_s("us-west-2", "eastus")
    far = [r for r in away if r.region == "azure-eastus"]
    assert far and min(r.ttft_s for r in far) > rtt
    with pytest.raises(SimError, match="reach"):
        Simulator(example_fleet, SimConfig(reach="planet", regions=DEMO))


@pytest.mark.parametrize("policy", ["default", "kv-cost", "prefix-affinity", "llm-d", "power-of-two", "instance-aware"])
def test_every_policy_runs_through_a_region_failure_without_losing_requests(example_fleet, policy):
    items = _items(90, 2)
    fail = Failure("gcp-us-central1", 30.0, 60.0)
    for reach in ("regional", "global"):
        r = Simulator(example_fleet, SimConfig(policy=policy, engines_per_region=1, regions=DEMO, failures=[fail],
                                               reach=reach)).run(items)  # fmt: skip
        assert r.summary.failed == 0, (policy, reach)


def test_prefix_affinity_reuses_the_longest_prefix(example_fleet):
    # a Mooncake-like workload: groups share long prefixes that differ after their first block
    import random

    rng = random.Random(5)
    items = []
    for i in range(300):
        g = rng.randrange(60)
        hashes = (0, 100 + g, 200 + g, 300 + g, 1000 + i)  # the first block is shared by all
        items.append(loadgen.WorkItem(id=i, at_s=i * 0.2, prompt_tokens=5 * 512, max_tokens=50,
                                      client_region=DEMO[i % 3], hash_ids=hashes))  # fmt: skip
    hit = {}
    for p in ("round-robin", "prefix-affinity", "default"):
        r = Simulator(example_fleet, SimConfig(policy=p, engines_per_region=1, regions=DEMO, reach="global")).run(items)
        hit[p] = r.prefix_hit_rate
    assert hit["prefix-affinity"] > hit["round-robin"] + 0.1
    assert hit["default"] > hit["round-robin"] + 0.1


def test_late_binding_holds_a_burst_at_the_router_and_keeps_more_within_slo(example_fleet):
    # A load the three engines cannot all take at once: with late binding the router holds requests
    # no engine can start in its next step, and refuses those whose TTFT slack runs out.
    items = loadgen.synthetic("code", 120, 6, 3)
    runs = {}
    for late in (True, False):
        fleet = example_fleet.model_copy(
            update={"router": example_fleet.router.model_copy(update={"late_binding": late})}
        )
        runs[late] = Simulator(fleet, SimConfig(policy="default", engines_per_region=1, regions=DEMO)).run(items)
    on, off = runs[True], runs[False]
    assert on.held > 0 and off.held == 0
    assert on.summary.rejected == on.refused_held  # every 429 here is a request whose slack ran out
    assert on.summary.failed == off.summary.failed == 0
    assert on.summary.requests == off.summary.requests == len(items)  # none lost
    assert on.summary.slo_attainment > off.summary.slo_attainment + 0.05


def test_a_request_a_full_peer_refused_waits_for_room_and_is_served(example_fleet):
    # Engines shrunk to 512 KV blocks (as `gpufleet bench` runs them): KV room binds, and a peer whose
    # summary said room is sometimes full by the time a forwarded request reaches it (429). The
    # origin then waits for room as its admission would have (queue_wait_s from the arrival), as
    # the gateway does, instead of answering 429 at once.
    items = loadgen.assign_clients(loadgen.clip(loadgen.synthetic("conv", 60, 0.8, 3), 4096), list(DEMO))
    cfg = SimConfig(policy="default", engines_per_region=1, regions=DEMO, num_gpu_blocks=512)
    r = Simulator(example_fleet, cfg).run(items)
    assert r.peer_refused > 0
    assert 0 < r.served_after_peer_refusal <= r.peer_refused
    assert r.summary.failed == 0 and r.summary.requests == len(items)
