"""Global traffic (modules/dns.py) through cdktn Testing: one latency record per AWS region.

Route53 takes one latency record per AWS region for a name, so fleet regions that share an AWS latency
region sit behind one latency record, as a weighted set with a calculated health check over it. One
synthesis of a hand-made five-region set for the whole module (the providers take seconds to load):
  us-east-1     aws-us-east-1 + azure-eastus             (shared)
  eu-central-1  gcp-europe-west4 + azure-westeurope      (shared)
  us-west-2     aws-us-west-2                            (alone)
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable

import pytest
from gpufleet.modules.dns import (
    GROUP_TAG,
    HEALTH_PATH,
    REGION_TAG,
    ROUTER_LB_PORT,
    TTL_S,
    RouterTarget,
    latency_groups,
    route53_weights,
)

ZONE = "example.com"
RECORD = "llm.example.com"
ROUTERS = (
    RouterTarget("aws-us-east-1", "us-east-1", "use1.elb.us-east-1.amazonaws.com", False, weight=16),
    RouterTarget("azure-eastus", "us-east-1", "20.0.0.1", True, weight=8),
    RouterTarget("gcp-europe-west4", "eu-central-1", "34.0.0.1", True, weight=8),
    RouterTarget("azure-westeurope", "eu-central-1", "20.0.0.2", True),  # default weight 1
    RouterTarget("aws-us-west-2", "us-west-2", "usw2.elb.us-west-2.amazonaws.com", False, weight=8),
)
SHARED = {"us-east-1": ("aws-us-east-1", "azure-eastus"), "eu-central-1": ("gcp-europe-west4", "azure-westeurope")}


def latency_region_clashes(records: Iterable[dict]) -> dict[tuple[str, str], list[str]]:
    """(name, AWS region) -> set identifiers, for each region more than one latency record of a name claims.

    Route53 rejects such a change batch ("Values specific for latency records" -> Region)."""
    claims: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in records:
        policy = r.get("latency_routing_policy")
        if policy:
            claims[(r["name"], policy["region"])].append(r.get("set_identifier", ""))
    return {k: v for k, v in claims.items() if len(v) > 1}


# ---- pure helpers (no synthesis) --------------------------------------------------------------


def test_latency_groups_keep_fleet_order_within_an_aws_region():
    groups = latency_groups(ROUTERS)
    assert list(groups) == ["eu-central-1", "us-east-1", "us-west-2"]
    assert {aws: tuple(r.region_key for r in g) for aws, g in groups.items() if len(g) > 1} == SHARED
    assert [r.region_key for r in groups["us-west-2"]] == ["aws-us-west-2"]


def test_route53_weights_fit_0_to_255_and_keep_the_ratio():
    assert route53_weights([16, 8]) == [16, 8]
    assert route53_weights([510, 255, 1, 0]) == [255, 128, 1, 0]  # positive stays >= 1, zero stays 0
    assert max(route53_weights([4096, 64])) == 255
    with pytest.raises(ValueError, match="negative"):
        RouterTarget("aws-us-east-1", "us-east-1", "x", False, weight=-1)


def test_the_clash_helper_catches_two_latency_records_for_one_region():
    # The old layout: one latency record per fleet region, two of them in us-east-1.
    bad = [
        {"name": RECORD, "set_identifier": "aws-us-east-1", "latency_routing_policy": {"region": "us-east-1"}},
        {"name": RECORD, "set_identifier": "azure-eastus", "latency_routing_policy": {"region": "us-east-1"}},
        {"name": RECORD, "set_identifier": "aws-us-west-2", "latency_routing_policy": {"region": "us-west-2"}},
    ]
    assert latency_region_clashes(bad) == {(RECORD, "us-east-1"): ["aws-us-east-1", "azure-eastus"]}
    assert latency_region_clashes(bad[1:]) == {}


# ---- the synthesized stack --------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The `resource` block of one synthesized stack holding the AWS provider and GlobalTraffic."""
    from cdktn import App, TerraformStack, Testing
    from cdktn_provider_aws.provider import AwsProvider
    from gpufleet.modules.dns import GlobalTraffic, GlobalTrafficProps

    app = App(outdir=str(tmp_path_factory.mktemp("dns")))
    stack = TerraformStack(app, "global-traffic")
    AwsProvider(stack, "aws", region="us-east-1")
    GlobalTraffic(stack, "traffic", props=GlobalTrafficProps(zone=ZONE, record=RECORD, routers=ROUTERS))
    # The construct's own checks need no synthesis: a region key that is an AWS region name is refused.
    with pytest.raises(ValueError, match="AWS region names"):
        clash = (*ROUTERS, RouterTarget("us-west-2", "us-west-2", "x", False))
        GlobalTraffic(stack, "clash", props=GlobalTrafficProps(zone=ZONE, record=RECORD, routers=clash))
    stack.node.try_remove_child("clash")
    return json.loads(Testing.synth(stack))["resource"]


def _records(res) -> list[dict]:
    return list(res["aws_route53_record"].values())


def _checks(res) -> dict[str, dict]:
    """`${aws_route53_health_check.<id>.id}` (how records refer to a check) -> the check."""
    return {f"${{aws_route53_health_check.{k}.id}}": v for k, v in res["aws_route53_health_check"].items()}


def _regional_check_refs(res) -> dict[str, str]:
    """region key -> reference to its regional check."""
    return {c["tags"][REGION_TAG]: ref for ref, c in _checks(res).items() if REGION_TAG in c["tags"]}


@pytest.mark.slow
def test_exactly_one_latency_record_per_aws_region(synth):
    latency = [r for r in _records(synth) if "latency_routing_policy" in r]
    assert latency_region_clashes(latency) == {}
    assert sorted(r["latency_routing_policy"]["region"] for r in latency) == [
        "eu-central-1", "us-east-1", "us-west-2",
    ]  # fmt: skip
    by_region = {r["latency_routing_policy"]["region"]: r for r in latency}
    assert {r["name"] for r in latency} == {RECORD} and {r["type"] for r in latency} == {"CNAME"}
    # Alone: straight to the region's own name, SetIdentifier = region key, the region's own check.
    alone = by_region["us-west-2"]
    assert alone["set_identifier"] == "aws-us-west-2" and alone["records"] == [f"aws-us-west-2.{RECORD}"]
    assert alone["health_check_id"] == _regional_check_refs(synth)["aws-us-west-2"]
    # Shared: to the group's weighted set, SetIdentifier = the AWS region name, a calculated check.
    for aws in SHARED:
        rec = by_region[aws]
        assert rec["set_identifier"] == aws and rec["records"] == [f"{aws}.{RECORD}"]
        assert rec["ttl"] == TTL_S
        assert _checks(synth)[rec["health_check_id"]]["type"] == "CALCULATED"


@pytest.mark.slow
def test_shared_regions_are_weighted_children_with_their_own_checks(synth):
    refs = _regional_check_refs(synth)
    weighted = [r for r in _records(synth) if "weighted_routing_policy" in r]
    assert len(weighted) == 4
    for aws, keys in SHARED.items():
        children = {r["set_identifier"]: r for r in weighted if r["name"] == f"{aws}.{RECORD}"}
        assert sorted(children) == sorted(keys)
        for key, r in children.items():
            assert r["type"] == "CNAME" and r["records"] == [f"{key}.{RECORD}"]
            assert r["health_check_id"] == refs[key]
    weights = {r["set_identifier"]: r["weighted_routing_policy"]["weight"] for r in weighted}
    assert weights == {"aws-us-east-1": 16, "azure-eastus": 8, "gcp-europe-west4": 8, "azure-westeurope": 1}
    assert not any(r["set_identifier"] == "aws-us-west-2" for r in weighted)  # alone: no weighted set


@pytest.mark.slow
def test_calculated_check_covers_its_group_with_threshold_1(synth):
    refs = _regional_check_refs(synth)
    latency = {r["set_identifier"]: r for r in _records(synth) if "latency_routing_policy" in r}
    checks = _checks(synth)
    calculated = {ref: c for ref, c in checks.items() if c["type"] == "CALCULATED"}
    assert len(calculated) == len(SHARED)
    for aws, keys in SHARED.items():
        c = checks[latency[aws]["health_check_id"]]
        assert sorted(c["child_healthchecks"]) == sorted(refs[k] for k in keys)
        assert c["child_health_threshold"] == 1
        # Its own tag key: `gpufleet failover --dns` must never take it for a region's check.
        assert c["tags"][GROUP_TAG] == aws and REGION_TAG not in c["tags"]
        assert "invert_healthcheck" not in c and "resource_path" not in c and "port" not in c


@pytest.mark.slow
def test_regional_checks_are_https_443_ready_and_left_inverted_by_failover(synth):
    from cdktn import Testing

    regional = [c for c in synth["aws_route53_health_check"].values() if c["type"] != "CALCULATED"]
    assert sorted(c["tags"][REGION_TAG] for c in regional) == sorted(r.region_key for r in ROUTERS)
    by_key = {r.region_key: r for r in ROUTERS}
    for c in regional:
        r = by_key[c["tags"][REGION_TAG]]
        assert (c["type"], c["port"], c["resource_path"]) == ("HTTPS", ROUTER_LB_PORT, HEALTH_PATH)
        assert (HEALTH_PATH, ROUTER_LB_PORT) == ("/ready", 443)
        assert c["lifecycle"] == {"ignore_changes": ["invert_healthcheck"]}
        assert c["fqdn"] == f"{r.region_key}.{RECORD}"  # Host and SNI: the name on the router's cert
        assert c.get("ip_address") == (r.address if r.is_ip else None)
        assert GROUP_TAG not in c["tags"]
    # The same through the Testing matcher, which must also reject the old HTTP/80 /health check.
    doc = json.dumps({"resource": synth})
    hc = "aws_route53_health_check"
    assert Testing.to_have_resource_with_properties(doc, hc, {"type": "HTTPS", "resource_path": "/ready"})
    assert not Testing.to_have_resource_with_properties(doc, hc, {"resource_path": "/health"})


@pytest.mark.slow
def test_every_name_holds_one_type_and_one_routing_policy(synth):
    """A CNAME cannot share its name, and Route53 does not mix routing policies within a name."""
    kinds: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for r in _records(synth):
        policy = next((p for p in ("latency", "weighted") if f"{p}_routing_policy" in r), "simple")
        kinds[r["name"]].add((r["type"], policy))
    assert all(len(k) == 1 for k in kinds.values()), kinds
    assert kinds[RECORD] == {("CNAME", "latency")}
    assert kinds[f"us-east-1.{RECORD}"] == {("CNAME", "weighted")}
    assert kinds[f"aws-us-east-1.{RECORD}"] == {("CNAME", "simple")}  # NLB hostname
    assert kinds[f"azure-eastus.{RECORD}"] == {("A", "simple")}  # AKS load balancer IP
    ids = [(r["name"], r.get("set_identifier")) for r in _records(synth)]
    assert len(ids) == len(set(ids))
