"""checkov (framework terraform_json) over the synthesized example fleet: every failing check must be
waived in waivers.yaml (with a reason), and every waiver must still be needed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import date
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WAIVERS = ROOT / "waivers.yaml"
INSTALLED = ROOT / ".venv-tools" / ".installed"


def _checkov() -> str:
    local = ROOT / ".venv-tools" / "bin" / "checkov"
    # `make setup` may still be installing it: wait a little for the marker file.
    deadline = time.monotonic() + 120
    while local.exists() and not INSTALLED.exists() and time.monotonic() < deadline:
        time.sleep(5)
    if local.exists() and INSTALLED.exists():
        return str(local)
    found = shutil.which("checkov")
    if not found:
        pytest.skip("checkov is not installed (make setup puts it in .venv-tools/)")
    return found


def _waivers() -> list[dict]:
    """The checkov waivers (CKV_*); the file's GPU0xx waivers belong to `gpufleet plan-check`."""
    doc = yaml.safe_load(WAIVERS.read_text())
    return [w for w in doc["waivers"] if w["policy"].startswith("CKV")]


@pytest.fixture(scope="module")
def findings(synthesized) -> list[tuple[str, str, str]]:
    """(check id, resource, stack) of every failed check."""
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_NO_DOWNLOAD": "true"}
    proc = subprocess.run(
        [
            _checkov(),
            "-d",
            str(synthesized.outdir / "stacks"),
            "--framework",
            "terraform_json",
            "--quiet",
            "--compact",
            "--output",
            "json",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode in (0, 1), f"checkov failed to run (rc {proc.returncode}): {proc.stderr[-2000:]}"
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
    assert passed > 100, f"checkov checked too little ({passed} passed checks): did it parse the stacks?"
    out = []
    for report in reports:
        for f in report.get("results", {}).get("failed_checks", []):
            stack = Path(f["file_path"]).parent.name
            out.append((f["check_id"], f["resource"], stack))
    return out


def _waived(finding: tuple[str, str, str], waiver: dict) -> bool:
    check, resource, stack = finding
    return (
        fnmatchcase(check, waiver["policy"])
        and fnmatchcase(resource, waiver.get("resource", "*"))
        and fnmatchcase(stack, waiver.get("stack", "*"))
    )


def test_waiver_file_is_documented():
    for w in _waivers():
        assert len(w.get("reason", "")) > 40, f"waiver {w['policy']} needs a real reason"
        assert date.fromisoformat(str(w["expires"])) >= date.today(), f"waiver {w['policy']} expired"
    assert len({(w["policy"], w["stack"]) for w in _waivers()}) == len(_waivers()), "duplicate waivers"


@pytest.mark.parametrize("group", ["cluster", "other"])
def test_every_failed_check_is_waived(findings, group):
    """Per group, so a failure says whose stacks it is: the cluster stacks, or the serving/global ones."""
    mine = [f for f in findings if f[2].endswith("-cluster") == (group == "cluster")]
    unwaived = [f for f in mine if not any(_waived(f, w) for w in _waivers())]
    assert not unwaived, (
        f"checkov findings in {group} stacks to fix or waive in waivers.yaml:\n"
        + ("\n".join(f"  {c} {r} ({s})" for c, r, s in unwaived))
    )


def test_no_stale_waivers(findings):
    stale = [w["policy"] for w in _waivers() if not any(_waived(f, w) for f in findings)]
    assert not stale, f"waivers that match no finding any more (remove them): {stale}"
