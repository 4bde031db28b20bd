"""AWS adapter against moto's server on loopback (real botocore over HTTP), quotas answered by the proxy."""

from __future__ import annotations

import datetime as dt

import boto3
import capfakes
import pytest
from gpufleet.stacks.capacity.aws import AwsAdapter
from gpufleet.stacks.capacity.scan import ScanOptions, scan


def _scan(regions=None, **kw):
    opts = ScanOptions(
        gpus=["H100-80GB"],
        clouds=["aws"],
        regions=regions,
        call_timeout_s=5,
        attempts=3,
        backoff_base_s=0.01,
        **kw,
    )
    return scan(opts, None, [AwsAdapter(opts)])


def test_offerings_gpu_info_quota_and_spot_score(aws_env):
    res = _scan(["us-east-1", "eu-west-1"])
    assert res.clouds["aws"].status == "ok"
    rows = {r.region: r for r in res.rows}
    east = rows["us-east-1"]
    assert east.instance_type == "p5.48xlarge"
    assert east.zones == [f"us-east-1{z}" for z in "abcdef"]  # moto's offering data
    offer = east.offer
    assert (offer.gpus, offer.vcpus) == (8, 192)  # from describe_instance_types GpuInfo / VCpuInfo
    od = east.quota["on-demand"]
    assert (od.name, od.unit, od.limit, od.limit_gpus) == ("L-417A185B", "vcpu", 384.0, 16)
    assert east.obtainable() == 16 and east.obtainable("spot") == 8  # L-C4BD4855 192 vCPUs = 1 node
    assert east.spot_score == 9
    assert east.price_per_gpu == pytest.approx(55.04 / 8, rel=0.5)
    assert not rows["eu-west-1"].offered and rows["eu-west-1"].obtainable() == 0  # moto: no p5 in eu-west-1


def test_usage_comes_from_the_quota_usage_metric(aws_env):
    # The quota's UsageMetric names AWS/Usage ResourceCount Class=P/OnDemand; put a datapoint into moto.
    cw = boto3.client("cloudwatch", region_name="us-west-2", endpoint_url=aws_env.moto_url)
    dims = [
        {"Name": "Class", "Value": "P/OnDemand"},
        {"Name": "Resource", "Value": "vCPU"},
        {"Name": "Service", "Value": "EC2"},
        {"Name": "Type", "Value": "Resource"},
    ]
    cw.put_metric_data(
        Namespace="AWS/Usage",
        MetricData=[
            {
                "MetricName": "ResourceCount",
                "Dimensions": dims,
                "Value": 192,
                "Timestamp": dt.datetime.now(dt.UTC),
            }
        ],
    )
    row = next(r for r in _scan(["us-west-2"]).rows)
    q = row.quota["on-demand"]
    assert (q.limit, q.used, q.free_gpus) == (384.0, 192.0, 8)


def test_regions_come_from_describe_regions(aws_env):
    opts = ScanOptions(gpus=["H100-80GB"], clouds=["aws"])
    regions = AwsAdapter(opts).connect()
    assert "us-east-1" in regions and "eu-west-1" in regions and len(regions) >= 20


def test_default_quota_when_none_applied(aws_env):
    aws_env.applied = False
    try:
        row = next(r for r in _scan(["us-east-1"]).rows)
    finally:
        aws_env.applied = True
    assert row.quota["on-demand"].limit == 384.0


def test_access_denied_is_translated(aws_env):
    aws_env.proxy.fault = capfakes.first_n(
        100,
        lambda r: capfakes.aws_query_error("UnauthorizedOperation", "You are not authorized", 403),
        lambda r: capfakes.aws_action(r) == "DescribeInstanceTypeOfferings",
    )
    res = _scan(["us-east-1"])
    state = res.clouds["aws"]
    assert state.status == "error" and state.error["kind"] == "access-denied"
    assert "ec2:DescribeInstanceTypeOfferings" in state.error["message"]


def test_spot_scores_denied_is_a_note_not_a_failure(aws_env):
    aws_env.proxy.fault = capfakes.first_n(
        100,
        lambda r: capfakes.aws_query_error("UnauthorizedOperation", "no", 403),
        lambda r: capfakes.aws_action(r) == "GetSpotPlacementScores",
    )
    res = _scan(["us-east-1"])
    assert res.clouds["aws"].status == "ok"
    assert any("spot placement scores not read" in n for n in res.clouds["aws"].notes)
    assert res.rows[0].spot_score is None and res.rows[0].obtainable() == 16


def test_no_credentials(clean_env):
    res = _scan(["us-east-1"])
    err = res.clouds["aws"].error
    assert err["kind"] == "no-credentials" and "aws configure" in err["message"]


# -- a failed quota call keeps the offerings already read --------------------------------------------
def _quota_unknown(row) -> bool:
    return not row.quota and any("quota unknown" in n for n in row.notes)


def test_moto_server_alone_lists_offerings_with_quota_unknown(aws_env, monkeypatch):
    # Straight to moto server, no proxy: GetServiceQuota says NoSuchResource for ec2 and
    # GetAWSDefaultServiceQuota answers 500 (not implemented in moto 5); GetSpotPlacementScores too.
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_env.moto_url)
    res = _scan(["us-east-1", "us-west-2"])
    state = res.clouds["aws"]
    assert state.status == "partial" and state.regions_scanned == 2 and not state.region_errors
    rows = {r.region: r for r in res.rows}
    assert set(rows) == {"us-east-1", "us-west-2"}
    for region, row in rows.items():
        assert row.instance_type == "p5.48xlarge" and row.zones, region
        assert _quota_unknown(row) and row.obtainable() == 0, row.notes
        assert any("GetAWSDefaultServiceQuota failed on the server side" in n for n in row.notes)
    assert any(n.startswith("us-east-1: quota L-417A185B unknown") for n in state.notes)


def test_quota_access_denied_keeps_offerings(aws_env):
    aws_env.proxy.fault = capfakes.first_n(
        100,
        lambda r: capfakes.aws_json_error("AccessDeniedException", "not authorized to GetServiceQuota", 400),
        lambda r: r.headers.get("x-amz-target", "").startswith("ServiceQuotasV20190624."),
    )
    res = _scan(["us-east-1"])
    east = res.rows[0]
    assert east.instance_type == "p5.48xlarge" and east.spot_score == 9  # offerings and scores kept
    assert _quota_unknown(east)
    assert any("access denied to GetServiceQuota" in n and "servicequotas:GetServiceQuota" in n for n in east.notes)
    assert res.clouds["aws"].status == "partial"


def test_usage_denied_keeps_limits_with_usage_unknown(aws_env):
    aws_env.proxy.fault = capfakes.first_n(
        100,
        lambda r: capfakes.aws_query_error("AccessDenied", "no cloudwatch", 403),
        lambda r: capfakes.aws_action(r) == "GetMetricData",
    )
    res = _scan(["us-east-1"])
    q = res.rows[0].quota["on-demand"]
    assert (q.limit, q.used) == (384.0, None)
    assert any("vCPU usage unknown" in n for n in res.rows[0].notes)
    assert res.clouds["aws"].status == "partial"


def test_cli_scan_against_moto_server_shows_p5_with_quota_unknown(aws_env, monkeypatch, clean_env):
    import json

    from gpufleet.cli.app import app
    from typer.testing import CliRunner

    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_env.moto_url)
    args = ["capacity", "scan", "--gpu", "H100-80GB", "--clouds", "aws", "--regions", "us-east-1,us-west-2"]
    res = CliRunner().invoke(app, [*args, "--json", "--attempts", "2"])
    assert res.exit_code == 1, res.output  # partial: the quota could not be read
    doc = json.loads(res.stdout)
    rows = {r["region"]: r for r in doc["regions"]}
    assert {r["instance_type"] for r in rows.values()} == {"p5.48xlarge"}
    assert all(r["offered"] and r["quota"] == {} for r in rows.values())
    assert "quota L-417A185B unknown" in res.stderr and "Traceback" not in res.output
