"""Global traffic: Route53 latency records that send each client to a nearby, healthy regional router.

Per region, in the fleet's public hosted zone:
  - `<region-key>.<record>`: the region's own name, pointing at its router's load balancer (CNAME to
    the AWS NLB hostname; A record for the IP that GKE and AKS load balancers get). Peers forward to it.
  - a health check on that router: HTTPS on port 443 (ROUTER_LB_PORT, the router Service's TLS port),
    `GET /ready` (HEALTH_PATH). `/ready` answers 200 only while the region has at least one healthy
    local engine and is not drained; `/health` answers 200 from the router process alone, so DNS would
    keep sending clients to a region whose engines are all down or still scaling up from zero. The check
    sends `<region-key>.<record>` as Host and SNI, the name on the router's certificate. Tagged
    `gpufleet-region = <region-key>`.

Route53 takes only ONE latency record per AWS (EC2) region for a name (developer guide, "Values specific
for latency records" -> Region), and GCP and Azure regions are entered under their nearest AWS region
(the stack resolves that from the catalog's aws_latency_regions.yaml), so fleet regions are grouped by
that AWS region:
  - a region alone in its AWS region: `<record>` CNAME `<region-key>.<record>`, latency-routed,
    SetIdentifier = region key, tied to the region's health check;
  - several regions in one AWS region: `<record>` CNAME `<aws-region>.<record>`, latency-routed,
    SetIdentifier = the AWS region name, tied to a CALCULATED health check over the group's regional
    checks (healthy while at least 1 is: the group leaves DNS only when every region in it is down).
    `<aws-region>.<record>` is a WEIGHTED set of CNAMEs, one per region (SetIdentifier = region key,
    `<region-key>.<record>`, weight = RouterTarget.weight, the region's health check), so an unhealthy
    or drained region drops out of its group while the others keep answering. The calculated check is
    tagged `gpufleet-latency-group = <aws-region>` (not `gpufleet-region`: it is no region's own check).
All latency records of one name must share a type, hence the CNAME indirection.

`gpufleet failover --dns` drains a region by inverting its own (regional) health check, so Terraform
ignores that field after creation. Alone, the region's latency record then leaves DNS; in a group, its
weighted record does, and the group's calculated check turns unhealthy once every child is.
"""

from __future__ import annotations

from dataclasses import dataclass

from constructs import Construct

HEALTH_PATH = "/ready"  # the router's readiness: 503 when the region has no healthy engine (or is drained)
ROUTER_LB_PORT = 443  # the router Service's HTTPS port (cert-manager certificate for <key>.<record>)
TTL_S = 60  # short: failover is only as fast as resolvers forget the old answer
REGION_TAG = "gpufleet-region"  # on regional checks only: `gpufleet failover --dns` looks for it
GROUP_TAG = "gpufleet-latency-group"  # on calculated checks, so none is taken for a region's
ROUTE53_MAX_WEIGHT = 255  # weighted records take 0..255


@dataclass(frozen=True)
class RouterTarget:
    region_key: str
    latency_region: str  # an AWS region name
    address: str  # hostname (AWS) or IP (GCP, Azure); a token from the region's serving stack
    is_ip: bool
    weight: int = 1  # share of its latency group's answers (e.g. GPUs at max size); unused when alone

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"{self.region_key}: weight {self.weight} is negative")


@dataclass(frozen=True)
class GlobalTrafficProps:
    zone: str  # public hosted zone, e.g. example.com
    record: str  # the fleet's global name, e.g. llm.example.com
    routers: tuple[RouterTarget, ...]


@dataclass(frozen=True)
class GlobalTrafficOutputs:
    record: str
    regional_names: dict[str, str]  # region key -> its own DNS name
    health_check_ids: dict[str, str]  # region key -> token
    latency_targets: dict[str, str]  # AWS region -> the name its latency record answers with
    group_health_check_ids: dict[str, str]  # AWS region with several fleet regions -> calculated check


def latency_groups(routers: tuple[RouterTarget, ...]) -> dict[str, tuple[RouterTarget, ...]]:
    """AWS latency region -> the fleet regions entered under it (sorted by AWS region, fleet order kept)."""
    groups: dict[str, list[RouterTarget]] = {}
    for r in routers:
        groups.setdefault(r.latency_region, []).append(r)
    return {aws: tuple(groups[aws]) for aws in sorted(groups)}


def route53_weights(weights: list[int]) -> list[int]:
    """Scale a group's weights into Route53's 0..255, keeping their ratio; a positive one stays >= 1."""
    top = max(weights, default=0)
    if top <= ROUTE53_MAX_WEIGHT:
        return list(weights)
    return [max(1, round(w * ROUTE53_MAX_WEIGHT / top)) if w > 0 else 0 for w in weights]


class GlobalTraffic(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, props: GlobalTrafficProps) -> None:
        super().__init__(scope, construct_id)
        from cdktn import TerraformResourceLifecycle
        from cdktn_provider_aws.data_aws_route53_zone import DataAwsRoute53Zone
        from cdktn_provider_aws.route53_health_check import Route53HealthCheck
        from cdktn_provider_aws.route53_record import (
            Route53Record,
            Route53RecordLatencyRoutingPolicy,
            Route53RecordWeightedRoutingPolicy,
        )

        if not props.routers:
            raise ValueError("global traffic needs at least one regional router")
        keys = [r.region_key for r in props.routers]
        if len(set(keys)) != len(keys):
            raise ValueError(f"region keys repeat: {keys}")
        if props.record == props.zone:
            # A CNAME cannot sit at the zone apex; the latency set is made of CNAMEs.
            raise ValueError(
                f"dns.record {props.record!r} is the zone apex; use a name inside it, e.g. llm.{props.zone}"
            )
        groups = latency_groups(props.routers)
        clash = set(keys) & set(groups)
        if clash:  # `<aws-region>.<record>` would be some region's own name
            raise ValueError(f"region keys {sorted(clash)} are also AWS region names")
        zone = DataAwsRoute53Zone(self, "zone", name=props.zone, private_zone=False)
        names: dict[str, str] = {}
        checks: dict[str, str] = {}
        for r in props.routers:
            name = f"{r.region_key}.{props.record}"
            Route53Record(
                self, f"{r.region_key}-router", zone_id=zone.zone_id, name=name,
                type="A" if r.is_ip else "CNAME", ttl=TTL_S, records=[r.address],
            )  # fmt: skip
            # The regional name goes as Host and SNI (it is on the router's certificate); with an IP the
            # checkers connect to it, without one they resolve the name (CNAME to the load balancer).
            check = Route53HealthCheck(
                self, f"{r.region_key}-health", type="HTTPS", port=ROUTER_LB_PORT, resource_path=HEALTH_PATH,
                fqdn=name, failure_threshold=3, request_interval=10, reference_name=r.region_key[:28],
                tags={"Name": f"gpufleet {r.region_key} router", REGION_TAG: r.region_key},
                # `gpufleet failover --dns` drains a region by inverting its check; apply must not undo it.
                lifecycle=TerraformResourceLifecycle(ignore_changes=["invert_healthcheck"]),
                ip_address=r.address if r.is_ip else None,  # None: the binding leaves it out
            )  # fmt: skip
            names[r.region_key] = name
            checks[r.region_key] = check.id
        targets: dict[str, str] = {}
        group_checks: dict[str, str] = {}
        for aws, members in groups.items():
            if len(members) == 1:
                (r,) = members
                Route53Record(
                    self, f"{r.region_key}-latency", zone_id=zone.zone_id, name=props.record, type="CNAME",
                    ttl=TTL_S, records=[names[r.region_key]], set_identifier=r.region_key,
                    health_check_id=checks[r.region_key],
                    latency_routing_policy=Route53RecordLatencyRoutingPolicy(region=aws),
                )  # fmt: skip
                targets[aws] = names[r.region_key]
                continue
            group_name = f"{aws}.{props.record}"
            weights = route53_weights([r.weight for r in members])
            for r, weight in zip(members, weights, strict=True):
                Route53Record(
                    self, f"{r.region_key}-weighted", zone_id=zone.zone_id, name=group_name, type="CNAME",
                    ttl=TTL_S, records=[names[r.region_key]], set_identifier=r.region_key,
                    health_check_id=checks[r.region_key],
                    weighted_routing_policy=Route53RecordWeightedRoutingPolicy(weight=weight),
                )  # fmt: skip
            group = Route53HealthCheck(
                self, f"{aws}-group-health", type="CALCULATED",
                child_healthchecks=[checks[r.region_key] for r in members], child_health_threshold=1,
                reference_name=f"{aws} group"[:28],
                tags={"Name": f"gpufleet {aws} latency group", GROUP_TAG: aws},
            )  # fmt: skip
            Route53Record(
                self, f"{aws}-group-latency", zone_id=zone.zone_id, name=props.record, type="CNAME",
                ttl=TTL_S, records=[group_name], set_identifier=aws, health_check_id=group.id,
                latency_routing_policy=Route53RecordLatencyRoutingPolicy(region=aws),
            )  # fmt: skip
            targets[aws] = group_name
            group_checks[aws] = group.id
        self.outputs = GlobalTrafficOutputs(
            record=props.record, regional_names=names, health_check_ids=checks,
            latency_targets=targets, group_health_check_ids=group_checks,
        )  # fmt: skip
