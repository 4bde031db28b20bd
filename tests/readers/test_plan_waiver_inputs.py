"""Issue 15 Build 6 for plan-check's two readers: plan JSON (or cdk.tf.json) and the waiver file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLANS = ROOT / "tests" / "plancheck" / "fixtures" / "plans"
CDKTF_OUT = ROOT / "tests" / "plancheck" / "fixtures" / "cdktf.out"

PLAN = {
    "format_version": "1.2",
    "resource_changes": [
        {"address": "aws_eks_node_group.gpu", "type": "aws_eks_node_group", "name": "gpu",
         "change": {"actions": ["create"], "before": None, "after": {"instance_types": ["p5.48xlarge"]}}}
    ],
}


def _plan_text(**rc_change) -> str:
    doc = json.loads(json.dumps(PLAN))
    doc["resource_changes"][0].update(rc_change)
    return json.dumps(doc, indent=2)


PLAN_CASES = {
    # name: (text, line the message names (None: the file only), what it says)
    "duplicate key": (
        _plan_text().replace('"name": "gpu",', '"name": "gpu", "name": "cpu",'), 7, 'duplicate key "name"'
    ),
    "NaN": (_plan_text().replace('"name": "gpu"', '"name": NaN'), 7, "not finite"),
    "1e400": (_plan_text().replace('"name": "gpu"', '"name": 1e400'), 7, "not finite"),
    "deeply nested": ('{"format_version": "1.2", "resource_changes": ' + "[" * 100_000 + "]" * 100_000 + "}", 1,
                      "nested more than 64 levels"),
    "address not a string": (_plan_text(address={"a": 1}), None, "resource_changes[0].address must be a string"),
    "type not a string": (_plan_text(type=7), None, "resource_changes[0].type must be a string"),
    "not utf-8": (None, 1, "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_broken_plans_exit_2(tmp_path, run_cli, case):
    text, line, expected = PLAN_CASES[case]
    path = tmp_path / "plan.json"
    if text is None:
        path.write_bytes(b'{"format_version": "\xff"}')
    else:
        path.write_text(text)
    code, out = run_cli(["plan-check", str(path), "--skip-checkov", "--no-waivers"], seconds=20)
    assert code == 2, out
    where = f"{path}:{line}:" if line is not None else f"{path}:"
    assert where in out and expected in out, out


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "big"])
def test_special_plan_paths_exit_2_without_reading(tmp_path, run_cli, fifo, target):
    if target == "/dev/zero" and not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    path = {"/dev/zero": Path("/dev/zero"), "fifo": fifo, "big": tmp_path / "big.json"}[target]
    if target == "big":
        with open(path, "wb") as fh:
            fh.truncate(513 << 20)  # sparse
    code, out = run_cli(["plan-check", str(path), "--skip-checkov", "--no-waivers"], seconds=10)
    assert code == 2 and str(path) in out, out
    assert {"/dev/zero": "character device", "fifo": "FIFO", "big": "512 MiB"}[target] in out, out


WAIVER = (
    "waivers:\n  - policy: GPU011\n    resource: 'aws_eks_node_group.*'\n    reason: planned move\n"
    "    expires: 2099-01-01\n"
)

WAIVER_CASES = {
    # name: (text, line, what the message says)
    "duplicate key": (WAIVER.replace("    reason: planned move\n", "    reason: planned move\n    reason: other\n"), 5,
                      "duplicate key 'reason'"),
    "binary tag": (WAIVER.replace("reason: planned move", "reason: !!binary cGxhbm5lZA=="), 4,
                   "the tag !!binary is not allowed"),
    "python tag": (WAIVER.replace("reason: planned move", "reason: !!python/name:os.system"), 4,
                   "!!python/name:os.system is not allowed"),
    "impossible date": (WAIVER.replace("2099-01-01", "2099-13-45"), 5, "cannot read the value '2099-13-45'"),
    "stack as a number": (WAIVER + "    stack: 5\n", 2, "waivers[0].stack must be a string"),
    "entry not a mapping": ("waivers:\n  - GPU011\n", 2, "waivers[0] must be a mapping"),
    "unknown key": (WAIVER + "    owner: me\n", 2, "unknown key(s) owner"),
    "mixed-type keys": (WAIVER + "    1: x\n", 2, "unknown key(s) 1"),
    "deep": ("waivers: " + "[" * 200 + "]" * 200 + "\n", 1, "nested more than 64 levels"),
    "alias bomb": ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                   + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh",
                                                                                          strict=True)),
                   None, "expands to more than"),
}


@pytest.mark.parametrize("case", sorted(WAIVER_CASES))
def test_broken_waiver_files_exit_2_with_the_place(tmp_path, run_cli, case):
    text, line, expected = WAIVER_CASES[case]
    path = tmp_path / "waivers.yaml"
    path.write_text(text)
    code, out = run_cli(
        ["plan-check", str(PLANS / "aws-us-east-1-cluster.replace.json"), "--skip-checkov", "--waivers", str(path)],
        seconds=20,
    )
    assert code == 2, out
    where = f"{path}:{line}:" if line is not None else f"{path}:"
    assert where in out and expected in out, out


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_special_waiver_paths_exit_2(run_cli, fifo, target):
    if target == "/dev/zero" and not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    path = Path("/dev/zero") if target == "/dev/zero" else fifo
    code, out = run_cli(["plan-check", str(CDKTF_OUT), "--skip-checkov", "--waivers", str(path)], seconds=10)
    assert code == 2 and str(path) in out, out


def test_a_good_waiver_file_still_waives(tmp_path, run_cli):
    path = tmp_path / "waivers.yaml"
    path.write_text(WAIVER)
    code, out = run_cli(
        ["plan-check", str(PLANS / "aws-us-east-1-cluster.replace.json"), "--skip-checkov", "--waivers", str(path)]
    )
    assert code == 0, out
    assert "2 finding(s) waived" in out
