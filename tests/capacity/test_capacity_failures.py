"""The CLI over all three loopback clouds: one times out, one throttles then answers, one denies.

The scan completes for the rest, writes the snapshot, and exits with the documented codes:
0 all scanned, 1 some cloud failed, 2 bad input, 3 no cloud could be scanned.
"""

from __future__ import annotations

import json

import capfakes
from conftest import AWS_REGIONS, AZURE_REGIONS, GCP_REGIONS
from gpufleet.cli.app import app
from typer.testing import CliRunner

REGIONS = ",".join(AWS_REGIONS + GCP_REGIONS + AZURE_REGIONS)


def run(*args):
    return CliRunner().invoke(app, ["capacity", "scan", *args], env={"COLUMNS": "200"})


def test_all_three_clouds_ok(all_env, clean_env):
    res = run("--regions", REGIONS, "--out", "snap.json")
    assert res.exit_code == 0, res.output
    doc = json.loads((clean_env / "snap.json").read_text())
    assert doc["schema"] == "gpufleet.capacity/v1" and doc["taken_at"].endswith("Z")
    assert {c: s["status"] for c, s in doc["clouds"].items()} == {"aws": "ok", "gcp": "ok", "azure": "ok"}
    assert len(doc["regions"]) == 9
    assert "obtainable GPUs" in res.stdout and "us-east-1" in res.stdout


def test_timeout_throttle_and_denial_together(all_env, clean_env):
    aws, gcp, azure = all_env
    gcp.server.fault = capfakes.hang(2.0)  # every GCP call outlives --timeout
    aws.proxy.fault = capfakes.first_n(
        2,
        lambda r: capfakes.aws_query_error("RequestLimitExceeded", "Request limit exceeded.", 503),
        lambda r: capfakes.aws_action(r) == "DescribeInstanceTypeOfferings",
    )
    azure.server.fault = lambda r: capfakes.azure_error(403, "AuthorizationFailed", "no authorization")
    res = run("--regions", REGIONS, "--out", "snap.json", "--json", "--timeout", "0.3", "--attempts", "3")
    assert res.exit_code == 1, res.output
    doc = json.loads(res.stdout)
    clouds = doc["clouds"]
    assert clouds["aws"]["status"] == "ok" and clouds["aws"]["regions_scanned"] == 3
    assert clouds["gcp"]["status"] == "error" and clouds["gcp"]["error"]["kind"] == "timeout"
    assert "gave up after 3 tries" in clouds["gcp"]["error"]["message"]
    assert clouds["azure"]["status"] == "error" and clouds["azure"]["error"]["kind"] == "access-denied"
    assert "gcp: timeout:" in res.stderr and "azure: access-denied:" in res.stderr
    assert "Traceback" not in res.output
    assert json.loads((clean_env / "snap.json").read_text())["clouds"] == clouds
    east = next(r for r in doc["regions"] if r["region"] == "us-east-1")
    assert east["obtainable_gpus"] == 16


def test_every_cloud_failing_exits_3(clean_env):
    # No credentials anywhere (and no emulator endpoints): nothing can be scanned.
    res = run("--regions", "us-east-1,us-central1,eastus", "--out", "snap.json")
    assert res.exit_code == 3, res.output
    assert "aws: no-credentials:" in res.stderr and "azure: no-credentials:" in res.stderr


def test_bad_input_exits_2(clean_env):
    for args, needle in (
        (["--gpu", "H1000"], "unknown GPU type"),
        (["--clouds", "aws,oracle"], "unknown cloud"),
        (["--regions", "US_EAST"], "not a region name"),
        (["--out", "/nonexistent/x.json"], "does not exist"),
    ):
        res = run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.stderr and "Traceback" not in res.output
