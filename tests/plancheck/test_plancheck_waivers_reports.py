"""Waivers (dated exceptions; an expired one fails the check) and the machine formats."""

from __future__ import annotations

import datetime as dt
import json
import xml.etree.ElementTree as ET

import pytest
from gpufleet.cli.app import app
from gpufleet.stacks.plancheck import report
from gpufleet.stacks.plancheck.inputs import InputError
from gpufleet.stacks.plancheck.policies import POLICIES
from gpufleet.stacks.plancheck.run import check
from gpufleet.stacks.plancheck.waivers import load_waivers, parse_waivers
from typer.testing import CliRunner

from .conftest import CDKTF_OUT, PLANS

runner = CliRunner()
REPLACE = PLANS / "aws-us-east-1-cluster.replace.json"
TODAY = dt.date(2026, 11, 28)


def waivers(expires: str = "2027-01-31", policy: str = "GPU011", resource: str = "aws_eks_node_group.*"):
    return parse_waivers(
        {
            "waivers": [
                {"policy": policy, "resource": resource, "reason": "planned move to H200", "expires": expires}
            ]
        },
        "w.yaml",
    )


def test_a_waiver_covers_matching_findings_only():
    result = check([REPLACE], waivers=waivers(resource="*.gpu"), run_checkov=False, today=TODAY)
    assert [f.address for f in result.waived] == ["aws_eks_node_group.gpu"]
    assert [f.address for f in result.violations] == ["aws_eks_node_group.l40s"]
    assert not result.passed


def test_waived_findings_pass_and_unused_waivers_are_listed():
    w = waivers() + parse_waivers(
        {"waivers": [{"policy": "CKV_*", "resource": "*", "reason": "r", "expires": "2027-01-01"}]}, "w.yaml"
    )
    result = check([REPLACE], waivers=w, run_checkov=False, today=TODAY)
    assert result.passed and len(result.waived) == 2
    assert [u.policy for u in result.unused_waivers] == ["CKV_*"]


def test_an_expired_waiver_waives_nothing_and_fails_the_check():
    result = check([REPLACE], waivers=waivers(expires="2026-11-27"), run_checkov=False, today=TODAY)
    assert result.waived == []
    expired = [f for f in result.findings if f.policy == "WAIVER"]
    assert (
        len(expired) == 1
        and expired[0].severity == "critical"
        and "expired on 2026-11-27" in expired[0].message
    )
    assert not result.passed
    # the expiry day itself still counts
    assert check([REPLACE], waivers=waivers(expires="2026-11-28"), run_checkov=False, today=TODAY).passed


def test_expired_waiver_fails_even_with_fail_on_critical(tmp_path):
    f = tmp_path / "w.yaml"
    f.write_text("waivers:\n  - {policy: GPU001, resource: '*', reason: old decision, expires: 2020-01-01}\n")
    result = runner.invoke(
        app, ["plan-check", str(CDKTF_OUT), "--skip-checkov", "--waivers", str(f), "--fail-on", "critical"]
    )
    assert result.exit_code == 1 and "WAIVER" in result.output


def test_user_text_in_the_table_is_printed_verbatim_not_as_markup(tmp_path):
    """Waiver reasons and stack globs come from the user's file: rich markup in them is text."""
    f = tmp_path / "w.yaml"
    f.write_text(
        "waivers:\n  - {policy: GPU011, resource: '*', reason: 'see [red]ticket[/red] :smile:', expires: 2099-01-01}\n"
        "  - {policy: GPU999, resource: '[bold]x[/bold]', stack: '*', reason: r, expires: 2099-01-01}\n"
    )
    result = runner.invoke(app, ["plan-check", str(REPLACE), "--skip-checkov", "--waivers", str(f)])
    assert "see [red]ticket[/red] :smile: (until 2099-01-01)" in result.output  # a waived finding's reason
    assert "[bold]x[/bold]" in result.output  # the unused waiver's label


@pytest.mark.parametrize(
    "text, message",
    [
        ("- just a list\n", "no `waivers` list"),
        ("waivers:\n  - {policy: GPU001, resource: '*', reason: r}\n", "needs `expires`"),
        ("waivers:\n  - {policy: GPU001, resource: '*', expires: 2027-01-01}\n", "non-empty `reason`"),
        ("waivers:\n  - {policy: GPU001, resource: '*', reason: r, expires: soon}\n", "not an ISO date"),
        (
            "waivers:\n  - {policy: GPU001, resource: '*', reason: r, expires: 2027-01-01, owner: me}\n",
            "unknown key",
        ),
        ("waivers: [\n", "not valid YAML"),
    ],
)
def test_malformed_waiver_files_exit_2(tmp_path, text, message):
    f = tmp_path / "w.yaml"
    f.write_text(text)
    with pytest.raises(InputError, match=message):
        load_waivers(f)
    result = runner.invoke(app, ["plan-check", str(CDKTF_OUT), "--skip-checkov", "--waivers", str(f)])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_fail_on_decides_the_exit_code():
    args = ["plan-check", str(REPLACE), "--skip-checkov"]
    assert runner.invoke(app, args).exit_code == 1  # two high findings, default --fail-on medium
    assert runner.invoke(app, [*args, "--fail-on", "high"]).exit_code == 1
    assert runner.invoke(app, [*args, "--fail-on", "critical"]).exit_code == 0
    assert runner.invoke(app, [*args, "--fail-on", "urgent"]).exit_code == 2


# -- formats ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_result():
    """Two violations, one waived finding."""
    return check([REPLACE], waivers=waivers(resource="*.gpu"), run_checkov=False, today=TODAY)


def test_json_report(mixed_result):
    doc = json.loads(report.render(mixed_result, "json"))
    assert (
        doc["summary"]["passed"] is False
        and doc["summary"]["violations"] == 1
        and doc["summary"]["waived"] == 1
    )
    assert doc["violations"][0]["policy"] == "GPU011" and doc["violations"][0]["details"]["gpus_lost"] == 8
    assert doc["waived"][0]["waiver"]["reason"] == "planned move to H200"


def test_sarif_report_is_sarif_2_1_0(mixed_result, monkeypatch):
    monkeypatch.chdir(PLANS.parents[3])  # repository root: URIs become repository-relative
    doc = json.loads(report.render(mixed_result, "sarif"))
    assert doc["version"] == "2.1.0" and doc["$schema"].endswith("sarif-2.1.0.json")
    (run,) = doc["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] and driver["version"]
    rule_ids = [r["id"] for r in driver["rules"]]
    assert len(rule_ids) == len(set(rule_ids)) and {f"GPU{i:03d}" for i in range(1, 12)} <= set(rule_ids)
    for rule in driver["rules"]:
        assert rule["shortDescription"]["text"] and rule["defaultConfiguration"]["level"] in (
            "error",
            "warning",
            "note",
        )
        assert 0 < float(rule["properties"]["security-severity"]) <= 10
    assert len(run["results"]) == 2
    for res in run["results"]:
        assert rule_ids[res["ruleIndex"]] == res["ruleId"]
        assert res["level"] in ("none", "note", "warning", "error") and res["message"]["text"]
        loc = res["locations"][0]["physicalLocation"]
        assert (
            loc["artifactLocation"]["uri"]
            == "tests/plancheck/fixtures/plans/aws-us-east-1-cluster.replace.json"
        )
        assert loc["region"]["startLine"] >= 1
    lines = REPLACE.read_text().splitlines()
    for res in run["results"]:
        line = lines[res["locations"][0]["physicalLocation"]["region"]["startLine"] - 1]
        assert res["locations"][0]["logicalLocations"][0]["fullyQualifiedName"].split("/")[1] in line
    waived = [r for r in run["results"] if "suppressions" in r]
    assert len(waived) == 1 and waived[0]["suppressions"][0]["kind"] == "external"


def test_junit_report(mixed_result):
    root = ET.fromstring(report.render(mixed_result, "junit"))
    (suite,) = root.findall("testsuite")
    assert suite.get("failures") == "1" and suite.get("skipped") == "1"
    # two findings + every other policy (it found nothing)
    assert int(suite.get("tests")) == 2 + len(POLICIES) - 1
    failure = suite.find("testcase/failure")
    assert failure.get("type") == "high" and "L40S" in failure.text


def test_markdown_report(mixed_result):
    text = report.render(mixed_result, "markdown")
    assert text.startswith("## :x: gpufleet plan-check FAILED")
    assert "| high | GPU011 |" in text and "<details><summary>Waived findings</summary>" in text
    assert "not checked: GPU006 (budget) and GPU007 (tags) need --fleet FILE" in text


def test_output_file_and_table(tmp_path):
    out = tmp_path / "r.sarif"
    result = runner.invoke(
        app, ["plan-check", str(CDKTF_OUT), "--skip-checkov", "--format", "sarif", "-o", str(out)]
    )
    assert result.exit_code == 0 and json.loads(out.read_text())["version"] == "2.1.0"
    result = runner.invoke(app, ["plan-check", str(REPLACE), "--skip-checkov"])
    assert "GPU011" in result.output and "failed" in result.output
