"""Issue 16 item 2: tables keep whole names when stdout is not a terminal (CI logs, pipes, make).

The commands run as real processes with stdout a pipe, as `gpufleet validate fleet.yaml | cat` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPLACE_PLAN = ROOT / "tests" / "plancheck" / "fixtures" / "plans" / "aws-us-east-1-cluster.replace.json"


def _piped(*args: str, columns: str | None = None) -> str:
    drop = ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if columns is not None:
        env["COLUMNS"] = columns
    proc = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli.app", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,  # stdout is a pipe, as in `| cat`
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def test_validate_through_a_pipe_keeps_whole_names():
    out = _piped("validate", "fleet.yaml")
    for name in (
        "aws-us-east-1",
        "gcp-europe-west4",
        "azure-westeurope",
        "H100-80GB",
        "A100-80GB",
        "p5.48xlarge (8)",
        "a3-highgpu-1g (1)",
        "Standard_NC24ads_A100_v4 (1)",
        "on-demand",
        "GPUs at max",
    ):
        assert name in out, f"{name!r} cut in:\n{out}"
    assert "…" not in out


def test_plan_check_through_a_pipe_keeps_whole_names():
    out = _piped("plan-check", str(REPLACE_PLAN), "--skip-checkov", "--no-waivers")
    for name in ("aws-us-east-1-cluster.replace", "aws_eks_node_group.gpu", "aws_eks_node_group.l40s", "GPU011"):
        assert name in out, f"{name!r} cut in:\n{out}"
    assert "…" not in out


@pytest.mark.parametrize("command", [("validate", "fleet.yaml"), ("plan-check", str(REPLACE_PLAN), "--skip-checkov")])
def test_a_narrow_columns_setting_folds_instead_of_cutting(command):
    """$COLUMNS still wins where it is set; then long names wrap onto more lines, never `…`."""
    out = _piped(*command, columns="60")
    assert "…" not in out
    table = [line for line in out.splitlines() if line[:1] in "┏┃┡│├└"]
    assert table and max(len(line) for line in table) <= 60  # messages are not wrapped (soft_wrap)
