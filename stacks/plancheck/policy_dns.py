"""Policies on global traffic: DNS records Route53 accepts (GPU016)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from gpufleet.stacks.plancheck.inputs import ResourceChange, first, text_or
from gpufleet.stacks.plancheck.policy_base import Context, Finding, Policy, finding, policy
from gpufleet.stacks.plancheck.regions import live


def _known(value: object) -> str | None:
    return value if isinstance(value, str) and value and "${" not in value else None


@policy(
    Policy(
        id="GPU016",
        title="One Route53 latency record per AWS region and name",
        severity="critical",
        rationale=(
            "Route53 latency routing picks the record whose AWS region is closest to the client, so a name "
            "and type may have only ONE latency record per AWS region; a change batch with a second one is "
            "rejected (InvalidChangeBatch) and the whole global-traffic apply fails. Fleet regions on other "
            "clouds map to their nearest AWS region, so two of them (or one of them and an AWS region) easily "
            "land on the same one."
        ),
        fix=(
            "keep one latency record per AWS region: put the fleet regions that share it behind that record "
            "as a weighted (or failover) set of per-region records, with a CALCULATED health check over them "
            "(aws_route53_record latency_routing_policy.region unique per zone_id, name and type)"
        ),
    )
)
def _latency_records(ctx: Context) -> Iterator[Finding]:
    groups: dict[tuple[str, str, str], dict[str, list[ResourceChange]]] = defaultdict(lambda: defaultdict(list))
    for rc in ctx.inputs.changes:
        if rc.type != "aws_route53_record" or not live(rc):
            continue
        v = rc.values
        region = _known(first(v.get("latency_routing_policy")).get("region"))
        name = _known(v.get("name"))
        if region is None or name is None:
            continue
        zone = text_or(v.get("zone_id"), f"(zone of {rc.stack})")
        key = (str(zone), name.lower().rstrip("."), str(v.get("type", "")).upper())
        groups[key][region].append(rc)
    for (_zone, name, rtype), by_region in sorted(groups.items()):
        for region, records in sorted(by_region.items()):
            if len(records) < 2:
                continue
            for rc in records:
                others = ", ".join(
                    f"{o.address} (set_identifier {o.values.get('set_identifier')!r})" for o in records if o is not rc
                )
                yield finding(
                    "GPU016",
                    rc,
                    f"latency record {name} {rtype} for AWS region {region} (set_identifier "
                    f"{rc.values.get('set_identifier')!r}) has a twin: {others}; Route53 rejects the change "
                    "batch",
                    cloud="aws",
                    region=region,
                )
