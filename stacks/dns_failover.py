"""Take a region out of the fleet's DNS and put it back, through Route53 (boto3).

The global traffic stack gives each region one record under `settings.dns.record`, with the region
id as its SetIdentifier and a health check on the region's router. Draining inverts that health
check (`Inverted=True`): Route53 then treats the region as unhealthy and stops answering with it,
without touching the records themselves, so restore is the exact inverse (`Inverted=False`).

boto3 is imported inside the functions (the router package never imports cloud SDKs; the CLI only
when --dns is given). AWS_ENDPOINT_URL / endpoint_url point it at moto server in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpufleet.stacks.spec import Fleet


class DnsFailoverError(Exception):
    """The change cannot be made: no DNS settings, no record or health check for the region, an AWS error."""


@dataclass(frozen=True)
class DnsChange:
    region: str
    record: str
    health_check_id: str
    inverted: bool  # after the change
    changed: bool  # False when it already was so


def _client(endpoint_url: str | None):
    try:
        import boto3
    except ImportError as exc:  # the 'clouds' extra
        raise DnsFailoverError("--dns needs boto3: pip install 'gpufleet[clouds]'") from exc
    # Route53 is global; the region only picks the signing endpoint.
    return boto3.client("route53", region_name="us-east-1", endpoint_url=endpoint_url)


def _zone_id(client: Any, zone: str) -> str:
    name = zone.rstrip(".") + "."
    for z in client.list_hosted_zones_by_name(DNSName=name).get("HostedZones", []):
        if z["Name"] == name and not z.get("Config", {}).get("PrivateZone", False):
            return z["Id"].rsplit("/", 1)[-1]
    raise DnsFailoverError(f"no public Route53 hosted zone named {zone}")


def region_health_check(client: Any, fleet: Fleet, region: str) -> tuple[str, str]:
    """(record name, health check id) of the region's record: the latency record `<record>` when the
    region is alone in its AWS latency region, the weighted `<aws-region>.<record>` when it shares one
    (modules/dns.py). Either way its SetIdentifier is the region key; a shared group's own latency
    record is named by the AWS region and carries the calculated check, which is never returned."""
    if fleet.settings.dns is None:
        raise DnsFailoverError("the fleet file has no settings.dns (zone, record): nothing to change in DNS")
    record = fleet.settings.dns.record.rstrip(".") + "."
    zone_id = _zone_id(client, fleet.settings.dns.zone)
    paginator = client.get_paginator("list_resource_record_sets")
    # The whole zone: a weighted child sorts apart from `<record>`, and list order differs between
    # Route53 and moto.
    for page in paginator.paginate(HostedZoneId=zone_id):
        for rrset in page["ResourceRecordSets"]:
            name = rrset["Name"]
            if name != record and not name.endswith("." + record):
                continue
            if rrset.get("SetIdentifier") == region:
                hc = rrset.get("HealthCheckId")
                if not hc:
                    raise DnsFailoverError(f"the {name} record of region {region} has no health check to invert")
                return name, hc
    raise DnsFailoverError(
        f"no record with SetIdentifier {region!r} at or under {record} in zone {fleet.settings.dns.zone}"
    )


def set_region_in_dns(fleet: Fleet, region: str, in_dns: bool, endpoint_url: str | None = None) -> DnsChange:
    """Drain (`in_dns=False`) or restore (`True`) the region's DNS answers."""
    from botocore.exceptions import BotoCoreError, ClientError

    fleet.region(region)  # KeyError names the fleet's regions
    try:
        client = _client(endpoint_url)
        record, hc_id = region_health_check(client, fleet, region)
        current = client.get_health_check(HealthCheckId=hc_id)["HealthCheck"]["HealthCheckConfig"]
        want = not in_dns
        if bool(current.get("Inverted", False)) == want:
            return DnsChange(region, record, hc_id, want, changed=False)
        client.update_health_check(HealthCheckId=hc_id, Inverted=want)
    except (BotoCoreError, ClientError) as exc:
        raise DnsFailoverError(f"Route53: {exc}") from None
    return DnsChange(region, record, hc_id, want, changed=True)
