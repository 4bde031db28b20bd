"""Inputs: cdktf.out directories and `show -json` plans become one list of resource changes; anything
else is exit 2 with a message that says what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gpufleet.cli.app import app
from gpufleet.stacks.plancheck.inputs import InputError, blocks, dig, load
from typer.testing import CliRunner

from .conftest import CDKTF_OUT, PLANS

runner = CliRunner()


def plan_change(kind: str, address: str):
    inputs = load([PLANS / f"aws-us-east-1-cluster.{kind}.json"])
    return next(c for c in inputs.changes if c.address == address)


def test_cdktf_out_directory_becomes_create_changes():
    inputs = load([CDKTF_OUT])
    assert set(inputs.stacks) == {
        "aws-us-east-1-cluster",
        "gcp-us-central1-cluster",
        "azure-westeurope-cluster",
        "aws-us-east-1-serving",
        "aws-us-east-1-addons",
        "azure-westeurope-addons",
    }
    assert all(c.actions == ("create",) and c.before is None for c in inputs.changes)
    pool = next(c for c in inputs.changes if c.address == "aws_eks_node_group.cluster_gpu-pool")
    assert pool.stack == "aws-us-east-1-cluster" and pool.type == "aws_eks_node_group"
    assert "//" not in pool.after  # cdktn's metadata is not a resource attribute
    assert inputs.stacks["aws-us-east-1-cluster"].provider_regions == {"aws": "us-east-1"}
    assert {f for f, _ in inputs.scan_targets} == {"terraform_json"}


def test_a_single_stack_directory_or_file_is_accepted():
    stack_dir = CDKTF_OUT / "stacks" / "gcp-us-central1-cluster"
    assert set(load([stack_dir]).stacks) == {"gcp-us-central1-cluster"}
    assert set(load([stack_dir / "cdk.tf.json"]).stacks) == {"gcp-us-central1-cluster"}


def test_plan_create():
    c = plan_change("create", "aws_eks_node_group.gpu")
    assert c.actions == ("create",) and c.before is None and c.after["instance_types"] == ["p5.48xlarge"]
    assert c.after_unknown["id"] is True
    assert not c.is_destructive


def test_plan_update_and_noop():
    inputs = load([PLANS / "aws-us-east-1-cluster.update.json"])
    by = {c.address: c for c in inputs.changes}
    assert by["aws_eks_cluster.cluster"].actions == ("no-op",)
    pool = by["aws_eks_node_group.gpu"]
    assert pool.actions == ("update",)
    assert (
        dig(pool.before, "scaling_config", "max_size") == 2
        and dig(pool.after, "scaling_config", "max_size") == 4
    )
    assert inputs.stacks["aws-us-east-1-cluster.update"].provider_regions == {"aws": "us-east-1"}
    assert {f for f, _ in inputs.scan_targets} == {"terraform_plan"}


def test_plan_replace_both_orders():
    delete_first = plan_change("replace", "aws_eks_node_group.gpu")
    create_first = plan_change("replace", "aws_eks_node_group.l40s")
    assert delete_first.actions == ("delete", "create") and delete_first.is_replace
    assert create_first.actions == ("create", "delete") and create_first.is_replace
    assert delete_first.action_label == "replace (delete then create)"
    assert delete_first.values["instance_types"] == ["p5e.48xlarge"]  # what it will be


def test_plan_delete_keeps_before_and_skips_data_sources():
    inputs = load([PLANS / "aws-us-east-1-cluster.delete.json"])
    pool = next(c for c in inputs.changes if c.address == "aws_eks_node_group.gpu")
    assert pool.is_delete and pool.after is None and pool.values["instance_types"] == ["p5.48xlarge"]
    data = next(c for c in inputs.changes if c.address.startswith("data."))
    assert data.mode == "data" and data.actions == ("read",)


def test_blocks_reads_objects_and_lists_alike():
    assert blocks({"a": 1}) == [{"a": 1}] and blocks([{"a": 1}, "x"]) == [{"a": 1}] and blocks(None) == []


def test_the_same_stack_twice_is_an_error():
    with pytest.raises(InputError, match="given twice"):
        load([CDKTF_OUT, CDKTF_OUT / "stacks" / "gcp-us-central1-cluster"])


BAD = {
    "empty file": (b"", "is empty"),
    "whitespace": (b"  \n", "only whitespace"),
    "not JSON": (b'resource "aws_eks_cluster" {}', "is not JSON"),
    "binary plan": (b"PK\x03\x04\x14\x00\x08\x08", "binary plan file"),
    "JSON array": (b"[1, 2]", "is a JSON list, not an object"),
    "JSON of another shape": (b'{"kind": "Deployment", "spec": {}}', "JSON of another shape"),
    "state, not plan": (b'{"format_version": "1.0", "values": {}}', "STATE, not of a plan"),
    "bad actions": (
        json.dumps(
            {
                "format_version": "1.2",
                "resource_changes": [{"address": "a.b", "type": "a", "change": {"actions": ["explode"]}}],
            }
        ).encode(),
        "change.actions",
    ),
    "change missing": (
        json.dumps({"format_version": "1.2", "resource_changes": [{"address": "a.b", "type": "a"}]}).encode(),
        "lacks change",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_files_exit_2_with_a_clear_message(tmp_path, case):
    content, expected = BAD[case]
    f = tmp_path / "input.json"
    f.write_bytes(content)
    with pytest.raises(InputError, match=expected):
        load([f])
    result = runner.invoke(app, ["plan-check", str(f), "--skip-checkov"])
    assert result.exit_code == 2, result.output
    assert expected.split()[0] in result.output and "Traceback" not in result.output


def test_missing_path_and_directory_without_stacks_exit_2(tmp_path):
    result = runner.invoke(app, ["plan-check", str(tmp_path / "nope"), "--skip-checkov"])
    assert result.exit_code == 2 and "no such file or directory" in result.output
    assert "cdktf.out directory" in result.output  # says what was expected
    result = runner.invoke(app, ["plan-check", str(tmp_path), "--skip-checkov"])
    assert result.exit_code == 2 and "without manifest.json" in result.output


def test_manifest_problems_exit_2(tmp_path):
    (tmp_path / "manifest.json").write_text(
        '{"stacks": {"a": {"synthesizedStackPath": "stacks/a/cdk.tf.json"}}}'
    )
    result = runner.invoke(app, ["plan-check", str(tmp_path), "--skip-checkov"])
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "manifest.json").write_text('{"version": "0.24.0"}')
    result = runner.invoke(app, ["plan-check", str(tmp_path), "--skip-checkov"])
    assert result.exit_code == 2 and "no `stacks` mapping" in result.output


def test_clean_input_exits_0(tmp_path: Path):
    result = runner.invoke(app, ["plan-check", str(CDKTF_OUT), "--skip-checkov"])
    assert result.exit_code == 0, result.output
    assert "passed" in result.output
