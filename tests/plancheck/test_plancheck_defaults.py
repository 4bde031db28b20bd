"""What plan-check uses when no flag says: waivers.yaml of the working directory, the fleet file that
`gpufleet synth` recorded in the synthesized folder; and each report says which files those were."""

from __future__ import annotations

import json
import shutil

import pytest
from gpufleet.cli.app import app
from gpufleet.stacks.plancheck.run import check, find_waivers, recorded_fleet
from gpufleet.stacks.synth import FLEET_RECORD, read_fleet_record, write_fleet_record
from typer.testing import CliRunner

from .conftest import CDKTF_OUT, REPO, resource, stack_docs, write_out

runner = CliRunner()
NEEDS_FLEET = "GPU006 (budget) and GPU007 (tags) need --fleet FILE"
# Waives the one finding of the broken fixture below (and nothing of the intact fixture).
WAIVER = (
    "waivers:\n  - policy: GPU009\n    resource: 'azurerm_kubernetes_cluster.*'\n"
    "    reason: the operator brings the Key Vault key; reviewed by the platform team\n"
    "    expires: 2099-12-31\n"
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding cdktf.out (the fixture stacks) and a copy of the example fleet."""
    out = tmp_path / "cdktf.out"
    shutil.copytree(CDKTF_OUT, out)
    shutil.copy(REPO / "fleet.yaml", tmp_path / "fleet.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _no_kms(root):
    """cdktf.out whose AKS cluster has no key_management_service: one GPU009 finding."""
    docs = stack_docs()
    del resource(docs, "azure-westeurope-cluster", "azurerm_kubernetes_cluster", "cluster_cluster")[
        "key_management_service"
    ]
    shutil.rmtree(root, ignore_errors=True)
    return write_out(root, docs)


def _json(*args):
    result = runner.invoke(app, ["plan-check", *args, "--skip-checkov", "--format", "json"])
    return result, (json.loads(result.stdout) if result.stdout.strip() else None)


# -- waivers -------------------------------------------------------------------------------------
def test_find_waivers_order(tmp_path):
    given = tmp_path / "mine.yaml"
    assert find_waivers(given, cwd=tmp_path) == (given, f"{given} (--waivers)")
    assert find_waivers(None, cwd=tmp_path)[0] is None  # nothing in the working directory
    assert "no waivers.yaml in the working directory" in find_waivers(None, cwd=tmp_path)[1]
    (tmp_path / "waivers.yaml").write_text(WAIVER)
    found, line = find_waivers(None, cwd=tmp_path)
    assert found == tmp_path / "waivers.yaml" and line.startswith("waivers.yaml (found in the working directory")
    assert find_waivers(None, skip=True, cwd=tmp_path) == (None, "none (--no-waivers)")


def test_waivers_yaml_in_the_working_directory_is_used_and_named(workdir):
    _no_kms(workdir / "cdktf.out")
    failed, doc = _json("cdktf.out", "--no-waivers")
    assert failed.exit_code == 1 and doc["summary"]["waivers"] == "none (--no-waivers)"
    assert [v["policy"] for v in doc["violations"]] == ["GPU009"]
    (workdir / "waivers.yaml").write_text(WAIVER)
    passed, doc = _json("cdktf.out")
    assert passed.exit_code == 0, passed.output
    assert doc["summary"]["waivers"].startswith("waivers.yaml (found in the working directory")
    assert doc["waived"][0]["waiver"]["file"] == "waivers.yaml"
    table = runner.invoke(app, ["plan-check", "cdktf.out", "--skip-checkov"])
    assert table.exit_code == 0 and "waivers: waivers.yaml (found in the working directory" in table.stdout
    md = runner.invoke(app, ["plan-check", "cdktf.out", "--skip-checkov", "--format", "markdown"])
    assert "Waivers: waivers.yaml (found in the working directory" in md.stdout


def test_waivers_and_no_waivers_together_is_bad_input(workdir):
    result = runner.invoke(app, ["plan-check", "cdktf.out", "--waivers", "w.yaml", "--no-waivers"])
    assert result.exit_code == 2 and "--waivers and --no-waivers" in result.output


def test_a_broken_waivers_yaml_in_the_working_directory_is_bad_input(workdir):
    (workdir / "waivers.yaml").write_text("waivers: [{policy: GPU009}]\n")
    result = runner.invoke(app, ["plan-check", "cdktf.out", "--skip-checkov"])
    assert result.exit_code == 2 and "waivers.yaml" in result.output
    assert "waivers[0] needs a non-empty `resource`" in result.output


# -- the fleet synth recorded ------------------------------------------------------------------------
def test_fleet_record_round_trip(workdir):
    path = write_fleet_record(workdir / "cdktf.out", workdir / "fleet.yaml")
    assert path.name == FLEET_RECORD
    assert json.loads(path.read_text())["fleet"] == "../fleet.yaml"  # relative: the pair can move
    rec = read_fleet_record(workdir / "cdktf.out")
    assert rec.fleet == (workdir / "fleet.yaml").resolve() and not rec.changed
    with (workdir / "fleet.yaml").open("a") as f:
        f.write("# edited\n")
    assert read_fleet_record(workdir / "cdktf.out").changed
    assert read_fleet_record(workdir) is None  # no record there


def test_without_fleet_the_recorded_fleet_is_used_and_named(workdir):
    write_fleet_record(workdir / "cdktf.out", workdir / "fleet.yaml")
    _, doc = _json("cdktf.out")
    assert doc["summary"]["fleet"] == "fleet.yaml (recorded by gpufleet synth in cdktf.out/gpufleet.json)"
    assert NEEDS_FLEET not in doc["skipped_policies"] and doc["notes"] == []
    # a cdk.tf.json (or a `tofu show -json` plan) inside a stack folder finds the record too
    stack = workdir / "cdktf.out" / "stacks" / "aws-us-east-1-cluster"
    fleet, line, notes = recorded_fleet([stack / "cdk.tf.json"])
    assert fleet is not None and fleet.fleet == "acme-llm" and not notes
    # --fleet wins, and says so
    _, doc = _json("cdktf.out", "--fleet", "fleet.yaml")
    assert doc["summary"]["fleet"] == "fleet.yaml (--fleet)"


def test_a_changed_recorded_fleet_is_used_with_a_note(workdir):
    write_fleet_record(workdir / "cdktf.out", workdir / "fleet.yaml")
    with (workdir / "fleet.yaml").open("a") as f:
        f.write("# edited after synth\n")
    _, doc = _json("cdktf.out")
    assert doc["summary"]["fleet"].startswith("fleet.yaml (recorded by gpufleet synth")
    assert any("fleet.yaml changed since the stacks were synthesized" in n for n in doc["notes"])
    table = runner.invoke(app, ["plan-check", "cdktf.out", "--skip-checkov"])
    assert "note: fleet.yaml changed since the stacks were synthesized" in table.stdout


@pytest.mark.parametrize(
    "damage, note",
    [
        ("missing", "which does not exist now: pass --fleet FILE"),
        ("invalid", "cannot be loaded now"),
        ("garbled record", "fleet record not used"),
    ],
)
def test_an_unusable_recorded_fleet_is_a_note_not_an_error(workdir, damage, note):
    write_fleet_record(workdir / "cdktf.out", workdir / "fleet.yaml")
    if damage == "missing":
        (workdir / "fleet.yaml").unlink()
    elif damage == "invalid":
        (workdir / "fleet.yaml").write_text("fleet: acme-llm\nregions: 3\n")
    else:
        (workdir / "cdktf.out" / FLEET_RECORD).write_text("{not json")
    result, doc = _json("cdktf.out")
    assert result.exit_code == 0, result.output  # the fixture stacks pass; the fleet is only missing
    assert doc["summary"]["fleet"].startswith("none")
    assert any(note in n for n in doc["notes"]), doc["notes"]
    assert NEEDS_FLEET in doc["skipped_policies"]


def test_no_record_says_so(workdir):
    _, doc = _json("cdktf.out")
    assert doc["summary"]["fleet"].startswith("none (no --fleet, and no gpufleet.json")
    assert NEEDS_FLEET in doc["skipped_policies"]


def test_check_without_sources_names_what_it_was_given(example_fleet):
    result = check([CDKTF_OUT], fleet=example_fleet, waivers=[], run_checkov=False)
    assert (result.sources.fleet, result.sources.waivers) == ("acme-llm", "0 given")


# -- per-cloud fix texts ---------------------------------------------------------------------------
def test_gpu009_on_aks_gives_the_azure_fix(tmp_path):
    result = check([_no_kms(tmp_path / "out")], run_checkov=False)
    [f] = [f for f in result.findings if f.policy == "GPU009"]
    assert f.address == "azurerm_kubernetes_cluster.cluster_cluster"
    fix = f.message.split("Fix: ", 1)[1]
    assert "key_management_service" in fix and "key_vault_key_id" in fix
    assert "encryption_config" not in fix and "database_encryption" not in fix  # not AWS's, not GCP's
