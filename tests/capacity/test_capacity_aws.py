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
