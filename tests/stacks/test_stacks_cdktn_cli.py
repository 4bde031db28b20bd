"""End to end: the real `cdktn synth` CLI (Node 22 + cdktn-cli from node_modules/, installed by
`make setup`) on the repository's cdktf.json finds the same stacks as `build_app`, with the same JSON.

It runs in a scratch copy (cdktf.json, fleet.yaml, and links to .venv and node_modules) so the
repository's own cdktf.out/ is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CDKTN = ROOT / "node_modules" / ".bin" / "cdktn"


@pytest.fixture(scope="module")
def cdktn_out(tmp_path_factory) -> Path:
    if not CDKTN.exists():
        pytest.skip(f"{CDKTN} is absent: run `make setup` (npm installs Node 22 and cdktn-cli)")
    work = tmp_path_factory.mktemp("cdktn-cli")
    shutil.copy(ROOT / "cdktf.json", work / "cdktf.json")
    shutil.copy(ROOT / "fleet.yaml", work / "fleet.yaml")
    for name in (".venv", "node_modules"):
        (work / name).symlink_to(ROOT / name)
    env = {
        **os.environ,
        "PATH": f"{ROOT / 'node_modules' / '.bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "CHECKPOINT_DISABLE": "1",  # no version check over the network
        "CI": "1",
        "JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION": "1",
    }
    proc = subprocess.run(
        [str(CDKTN), "synth"], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"cdktn synth failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Generated Terraform code for the stacks" in proc.stdout, proc.stdout[-2000:]
    return work / "cdktf.out"


def test_same_stacks(cdktn_out, synthesized):
    cli = set(json.loads((cdktn_out / "manifest.json").read_text())["stacks"])
    ours = set(synthesized.manifest()["stacks"])
    assert cli == ours
    assert {n for n in cli if n.endswith("-cluster")} == {f"{k}-cluster" for k in synthesized.clusters}


def test_same_cluster_json(cdktn_out, synthesized):
    for name in synthesized.manifest()["stacks"]:
        if not name.endswith("-cluster"):
            continue
        cli = json.loads((cdktn_out / "stacks" / name / "cdk.tf.json").read_text())
        assert cli == synthesized.stack_json(name), f"{name} differs between cdktn synth and build_app"
