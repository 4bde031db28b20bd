"""Placement from a snapshot, `capacity place` on the CLI, and `validate --capacity` warnings."""

from __future__ import annotations

import json
import shutil

import pytest
from gpufleet.cli.app import app
from gpufleet.stacks.capacity.model import CloudResult, InstanceOffer, Quota, RegionCapacity
from gpufleet.stacks.capacity.place import PlacementError, place
from gpufleet.stacks.capacity.snapshot import Snapshot, read_snapshot, write_snapshot
from gpufleet.stacks.capacity_check import check_fleet
from typer.testing import CliRunner


def row(cloud, region, instance, gpus, vcpus, price, free_nodes, zones, gpu="H100-80GB", limit_nodes=None):
    per_node = vcpus if cloud != "gcp" else gpus
    unit = "gpu" if cloud == "gcp" else "vcpu"
    limit = (limit_nodes if limit_nodes is not None else free_nodes) * per_node
    q = Quota.of("Q", unit, limit, limit - free_nodes * per_node, per_node=per_node, gpus_per_node=gpus)
    return RegionCapacity(
        cloud, region, gpu, [InstanceOffer(instance, gpus, vcpus, zones, price)], instance, {"on-demand": q}
    )


def snapshot(*rows, taken_at=None, gcp_global=None):
    clouds = {c: CloudResult(c) for c in ("aws", "gcp", "azure")}
    clouds["gcp"].global_free_gpus = gcp_global
    return Snapshot(taken_at or Snapshot.now(), ["H100-80GB"], clouds, list(rows))


AWS_EAST = row("aws", "us-east-1", "p5.48xlarge", 8, 192, 55.04, 2, ["us-east-1a", "us-east-1b"])
AWS_WEST = row("aws", "us-west-2", "p5.48xlarge", 8, 192, 60.0, 4, ["us-west-2a"])
GCP_C1 = row("gcp", "us-central1", "a3-highgpu-1g", 1, 26, 11.06, 16, ["us-central1-a"])
AZ_EAST = row("azure", "eastus", "Standard_ND96isr_H100_v5", 8, 96, 98.32, 1, ["1", "2"])


def test_cheapest_first_and_spread():
    p = place(snapshot(AWS_EAST, AWS_WEST, GCP_C1, AZ_EAST), "H100-80GB", 16)
    # aws us-east-1 is cheapest per GPU (6.88), then aws us-west-2 (7.50); neither takes more than half.
    assert [(x.row.region, x.nodes, x.gpus) for x in p.picks] == [("us-east-1", 1, 8), ("us-west-2", 1, 8)]
    assert p.gpus == 16 and p.cost_per_hour == pytest.approx(115.04)


def test_single_region_only_when_nothing_else_fits():
    p = place(snapshot(AWS_WEST), "H100-80GB", 16)
    assert [(x.row.region, x.nodes) for x in p.picks] == [("us-west-2", 2)]


def test_max_price_per_gpu_hour():
    p = place(snapshot(AWS_EAST, AWS_WEST, GCP_C1, AZ_EAST), "H100-80GB", 8, max_price=7.0)
    assert {x.row.region for x in p.picks} == {"us-east-1"}  # only 6.88/GPU-h is under 7
    with pytest.raises(PlacementError, match=r"only 16 of 24 .* at or under \$7 per GPU-hour"):
        place(snapshot(AWS_EAST, AWS_WEST), "H100-80GB", 24, max_price=7.0)


def test_gcp_global_quota_is_shared_between_regions():
    other = row("gcp", "us-east4", "a3-highgpu-1g", 1, 26, 11.06, 16, ["us-east4-a"])
    with pytest.raises(PlacementError) as exc:
        place(snapshot(GCP_C1, other, gcp_global=10), "H100-80GB", 20, clouds=["gcp"])
    assert exc.value.obtainable == 10


def _cli(*args):
    return CliRunner().invoke(app, ["capacity", "place", *args], env={"COLUMNS": "200"})


def test_cli_place_prints_entries_and_writes_them(tmp_path, example_fleet_path):
    snap_path = tmp_path / "snap.json"
    ohio = row("aws", "us-east-2", "p5.48xlarge", 8, 192, 55.04, 3, ["us-east-2a", "us-east-2b"])
    stockholm = row("aws", "eu-north-1", "p5.48xlarge", 8, 192, 58.0, 3, ["eu-north-1a"])
    write_snapshot(snapshot(AWS_EAST, AWS_WEST, GCP_C1, AZ_EAST, ohio, stockholm), snap_path)
    fleet = tmp_path / "fleet.yaml"
    shutil.copy(example_fleet_path, fleet)
    before = fleet.read_text()
    res = _cli("--gpu", "H100", "--gpus", "16", "--snapshot", str(snap_path), "--write", str(fleet))
    assert res.exit_code == 0, res.output
    assert "region: us-east-2" in res.stdout and "region: eu-north-1" in res.stdout
    # us-east-1, us-west-2 (aws), us-central1 and eastus are already in the fleet, so placement skipped them
    assert "region: us-east-1\n" not in res.stdout and "region: us-west-2" not in res.stdout
    after = fleet.read_text()
    assert after.startswith(before.split("settings:")[0].rstrip("\n"))  # comments and entries kept
    assert after.split("settings:")[1] == before.split("settings:")[1]  # the rest untouched
    from gpufleet.stacks.fleetfile import load_fleet

    keys = [r.key for r in load_fleet(fleet).regions]
    assert "aws-us-east-2" in keys and "aws-eu-north-1" in keys and len(keys) == 8


def test_cli_not_enough_gpus_exits_1(tmp_path):
    snap_path = tmp_path / "snap.json"
    write_snapshot(snapshot(AWS_EAST), snap_path)
    res = _cli("--gpu", "H100-80GB", "--gpus", "64", "--snapshot", str(snap_path))
    assert res.exit_code == 1
    assert "only 16 of 64 H100-80GB GPUs are obtainable" in res.stderr


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "no such file"),
        ("{", "is not JSON"),  # stacks/readers.py's wording, with the line and column
        ('{"schema": "gpufleet.capacity/v9", "taken_at": "x"}', "is not supported"),
        ("[]", "JSON object"),
    ],
)
def test_cli_bad_snapshot_exits_2(tmp_path, content, needle):
    path = tmp_path / "snap.json"
    if content is not None:
        path.write_text(content)
    res = _cli("--gpu", "H100-80GB", "--gpus", "8", "--snapshot", str(path))
    assert res.exit_code == 2 and needle in res.stderr and "Traceback" not in res.output


def test_cli_bad_flags_exit_2(tmp_path):
    snap_path = tmp_path / "snap.json"
    write_snapshot(snapshot(AWS_EAST), snap_path)
    for args in (
        ["--gpus", "0"],
        ["--max-price", "-1", "--gpus", "8"],
        ["--tier", "cheap", "--gpus", "8"],
        ["--gpus", "8", "--write", str(tmp_path / "missing.yaml")],
    ):
        res = _cli("--gpu", "H100-80GB", "--snapshot", str(snap_path), *args)
        assert res.exit_code == 2, (args, res.output)


def test_validate_capacity_warnings(tmp_path, example_fleet, example_fleet_path):
    # us-east-1 offers H100 but quota leaves 1 node (fleet wants 2); us-central1 does not offer H100 at all.
    east = row(
        "aws", "us-east-1", "p5.48xlarge", 8, 192, 55.04, 1, ["us-east-1a", "us-east-1b"], limit_nodes=2
    )
    central = RegionCapacity("gcp", "us-central1", "H100-80GB")
    snap = snapshot(east, central)
    warnings = check_fleet(example_fleet, snap)
    text = "\n".join(warnings)
    assert "nodes.max 2 x p5.48xlarge needs 16 GPUs (384 vcpus of on-demand quota Q)" in text
    assert "room for 1 node(s)" in text
    assert "us-east-1c" in text  # the fleet names a zone the snapshot did not find
    assert (
        "aws-us-central1" not in text
        and "gcp-us-central1 (gcp us-central1): H100-80GB is not offered" in text
    )
    path = tmp_path / "snap.json"
    write_snapshot(snap, path)
    assert read_snapshot(path).regions[0].quota["on-demand"].free_gpus == 8
    res = CliRunner().invoke(app, ["validate", str(example_fleet_path), "--capacity", str(path), "--json"])
    assert res.exit_code == 0
    assert any("is not offered" in w for w in json.loads(res.stdout)["warnings"])
    bad = CliRunner().invoke(
        app, ["validate", str(example_fleet_path), "--capacity", str(tmp_path / "nope.json")]
    )
    assert bad.exit_code == 2 and "no such file" in bad.stderr


def test_old_snapshot_warns(example_fleet):
    warnings = check_fleet(example_fleet, snapshot(taken_at="2020-01-01T00:00:00Z"))
    assert "days old" in warnings[0]
