"""Fixtures for the plan-check tests: the fixture stacks as editable dicts, a writer that turns them
back into a cdktf.out directory, and ONE synthesis of the example fleet per test session."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
CDKTF_OUT = FIXTURES / "cdktf.out"
PLANS = FIXTURES / "plans"
SNAPSHOT = FIXTURES / "capacity-snapshot.json"
REPO = Path(__file__).resolve().parents[2]
# The day the tests judge Kubernetes support windows (GPU012) on: the catalog's dates do not age them.
TODAY = dt.date(2026, 12, 6)


def stack_docs() -> dict[str, dict]:
    """The fixture stacks (all compliant), deep-copied so a test can break one."""
    manifest = json.loads((CDKTF_OUT / "manifest.json").read_text())
    return {
        name: copy.deepcopy(json.loads((CDKTF_OUT / entry["synthesizedStackPath"]).read_text()))
        for name, entry in manifest["stacks"].items()
    }


def write_out(root: Path, docs: dict[str, dict]) -> Path:
    """A cdktf.out directory (manifest.json + stacks/<name>/cdk.tf.json) holding `docs`."""
    manifest = {"version": "0.24.0", "stacks": {}}
    for name, doc in docs.items():
        d = root / "stacks" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "cdk.tf.json").write_text(json.dumps(doc, indent=2))
        manifest["stacks"][name] = {"name": name, "synthesizedStackPath": f"stacks/{name}/cdk.tf.json"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def resource(docs: dict[str, dict], stack: str, rtype: str, name: str) -> dict:
    return docs[stack]["resource"][rtype][name]


@pytest.fixture(scope="session")
def synthesized_fleet(tmp_path_factory, example_fleet_path) -> Path:
    """`gpufleet synth fleet.yaml --out DIR`, once per session (cdktn imports cost 10-60 s)."""
    pytest.importorskip("cdktn", reason="synthesis needs the 'cdk' extra")
    out = tmp_path_factory.mktemp("synth") / "cdktf.out"
    env = dict(os.environ, JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION="1")
    proc = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli.app", "synth", str(example_fleet_path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"gpufleet synth failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return out
