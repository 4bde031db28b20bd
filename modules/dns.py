"""Global traffic: Route53 latency records that send each client to a nearby, healthy regional router.

Per region, in the fleet's public hosted zone:
  - `<region-key>.<record>`: the region's own name, pointing at its router's load balancer (CNAME to
    the AWS NLB hostname; A record for the IP that GKE and AKS load balancers get). Peers forward to it.
  - a health check on that router (`GET /health` on port 80);
  - `<record>` CNAME `<region-key>.<record>`, latency-routed with SetIdentifier = region key, tied to
    the health check. All latency records of one name must share a type, hence the CNAME indirection.
GCP and Azure regions are entered under their nearest AWS region (the stack resolves that from the
catalog's aws_latency_regions.yaml). `gpufleet failover` drains a region by inverting its health check,
so Terraform ignores that field after creation.
"""

from __future__ import annotations

from dataclasses import dataclass

from constructs import Construct

HEALTH_PATH = "/health"
ROUTER_LB_PORT = 80
TTL_S = 60  # short: failover is only as fast as resolvers forget the old answer


@dataclass(frozen=True)
class RouterTarget:
    region_key: str
    latency_region: str  # an AWS region name
    address: str  # hostname (AWS) or IP (GCP, Azure); a token from the region's serving stack
    is_ip: bool


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


class GlobalTraffic(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, props: GlobalTrafficProps) -> None:
        super().__init__(scope, construct_id)
        from cdktn import TerraformResourceLifecycle
        from cdktn_provider_aws.data_aws_route53_zone import DataAwsRoute53Zone
        from cdktn_provider_aws.route53_health_check import Route53HealthCheck
        from cdktn_provider_aws.route53_record import Route53Record, Route53RecordLatencyRoutingPolicy

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
        zone = DataAwsRoute53Zone(self, "zone", name=props.zone, private_zone=False)
        names: dict[str, str] = {}
        checks: dict[str, str] = {}
        for r in props.routers:
            name = f"{r.region_key}.{props.record}"
            Route53Record(
                self, f"{r.region_key}-router", zone_id=zone.zone_id, name=name,
                type="A" if r.is_ip else "CNAME", ttl=TTL_S, records=[r.address],
            )  # fmt: skip
            target = {"ip_address": r.address} if r.is_ip else {"fqdn": r.address}
            check = Route53HealthCheck(
                self, f"{r.region_key}-health", type="HTTP", port=ROUTER_LB_PORT, resource_path=HEALTH_PATH,
                failure_threshold=3, request_interval=10, reference_name=r.region_key[:28],
                tags={"Name": f"gpufleet {r.region_key} router", "gpufleet-region": r.region_key},
                # `gpufleet failover --dns` drains a region by inverting its check; apply must not undo it.
                lifecycle=TerraformResourceLifecycle(ignore_changes=["invert_healthcheck"]),
                **target,
            )  # fmt: skip
            Route53Record(
                self, f"{r.region_key}-latency", zone_id=zone.zone_id, name=props.record, type="CNAME",
                ttl=TTL_S, records=[name], set_identifier=r.region_key, health_check_id=check.id,
                latency_routing_policy=Route53RecordLatencyRoutingPolicy(region=r.latency_region),
            )  # fmt: skip
            names[r.region_key] = name
            checks[r.region_key] = check.id
        self.outputs = GlobalTrafficOutputs(
            record=props.record, regional_names=names, health_check_ids=checks
        )
