"""`gpufleet failover drain|restore REGION --dns` against moto server on loopback (Route53)."""

from __future__ import annotations

import boto3
import pytest
from gpufleet.cli.app import app
from moto.server import ThreadedMotoServer
from typer.testing import CliRunner

TOKEN = "dns-test-admin-token-0123456789"
FLEET = """\
fleet: dns
models: [{name: m, catalog: llama-3.1-8b}]
regions:
  - {cloud: aws, region: us-east-1, gpu: H100-80GB, nodes: {max: 1}}
  - {cloud: aws, region: us-west-2, gpu: L40S, instance_type: g6e.xlarge, nodes: {max: 1}}
settings:
  dns: {zone: example.com, record: llm.example.com}
"""


@pytest.fixture()
def route53(monkeypatch):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "GPUFLEET_ADMIN_TOKEN": TOKEN,
    }.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("route53", region_name="us-east-1")
    zone = client.create_hosted_zone(Name="example.com", CallerReference="z")["HostedZone"]["Id"]
    checks = {}
    for i, region in enumerate(("aws-us-east-1", "aws-us-west-2")):
        hc = client.create_health_check(
            CallerReference=region,
            HealthCheckConfig={
                "Type": "HTTPS",
                "FullyQualifiedDomainName": f"{region}.example.com",
                "ResourcePath": "/health",
                "Port": 443,
            },
        )["HealthCheck"]["Id"]
        checks[region] = hc
        client.change_resource_record_sets(
            HostedZoneId=zone,
            ChangeBatch={
                "Changes": [
                    {
                        "Action": "CREATE",
                        "ResourceRecordSet": {
                            "Name": "llm.example.com",
                            "Type": "A",
                            "SetIdentifier": region,
                            "Weight": 1,
                            "TTL": 30,
                            "HealthCheckId": hc,
                            "ResourceRecords": [{"Value": f"192.0.2.{i + 1}"}],
                        },
                    }
                ]
            },
        )
    yield client, checks
    server.stop()


def inverted(client, hc: str) -> bool:
    return bool(client.get_health_check(HealthCheckId=hc)["HealthCheck"]["HealthCheckConfig"].get("Inverted"))


def test_drain_and_restore_invert_the_regions_health_check(route53, tmp_path):
    client, checks = route53
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET)
    # No router URL in this fleet: the routers are named explicitly, and one is unreachable.
    args = ["--fleet", str(fleet), "--dns", "--router", "http://127.0.0.1:9"]
    res = CliRunner().invoke(app, ["failover", "drain", "aws-us-west-2", *args])
    assert res.exit_code == 1, res.output  # the unreachable router is a finding...
    assert "FAILED" in res.output and "inverted (out of DNS)" in res.output  # ...but DNS changed
    assert inverted(client, checks["aws-us-west-2"]) and not inverted(client, checks["aws-us-east-1"])
    res = CliRunner().invoke(app, ["failover", "restore", "aws-us-west-2", *args])
    assert "normal (in DNS)" in res.output
    assert not inverted(client, checks["aws-us-west-2"])


def test_region_without_a_record_is_a_clear_error(route53, tmp_path):
    from gpufleet.stacks.dns_failover import DnsFailoverError, set_region_in_dns
    from gpufleet.stacks.fleetfile import load_fleet

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET.replace("us-west-2, gpu: L40S", "eu-west-1, gpu: L40S"))
    with pytest.raises(DnsFailoverError, match="SetIdentifier 'aws-eu-west-1'"):
        set_region_in_dns(load_fleet(fleet), "aws-eu-west-1", in_dns=False)
    change = set_region_in_dns(load_fleet(fleet), "aws-us-east-1", in_dns=True)
    assert change.changed is False and change.inverted is False


def test_a_region_behind_a_shared_latency_record_is_found_under_its_group(route53, tmp_path):
    """Two fleet regions in one AWS latency region sit in a weighted set at `<aws-region>.<record>`
    (modules/dns.py): draining one inverts its own check, not the group's calculated check."""
    from gpufleet.stacks.dns_failover import set_region_in_dns
    from gpufleet.stacks.fleetfile import load_fleet

    client, _ = route53
    zone = client.list_hosted_zones_by_name(DNSName="example.com")["HostedZones"][0]["Id"]
    own = client.create_health_check(
        CallerReference="azure-eastus",
        HealthCheckConfig={"Type": "HTTPS", "FullyQualifiedDomainName": "azure-eastus.llm.example.com",
                           "ResourcePath": "/ready", "Port": 443},
    )["HealthCheck"]["Id"]  # fmt: skip
    client.change_resource_record_sets(
        HostedZoneId=zone,
        ChangeBatch={"Changes": [{"Action": "CREATE", "ResourceRecordSet": {
            "Name": "us-east-1.llm.example.com", "Type": "CNAME", "SetIdentifier": "azure-eastus",
            "Weight": 4, "TTL": 60, "HealthCheckId": own,
            "ResourceRecords": [{"Value": "azure-eastus.llm.example.com"}]}}]},
    )  # fmt: skip
    fleet = tmp_path / "fleet.yaml"
    azure = "  - {cloud: azure, region: eastus, gpu: A100-80GB, nodes: {max: 1}}\n"
    fleet.write_text(FLEET.replace("regions:\n", "regions:\n" + azure))
    change = set_region_in_dns(load_fleet(fleet), "azure-eastus", in_dns=False)
    assert change.record == "us-east-1.llm.example.com." and change.health_check_id == own
    assert inverted(client, own)
