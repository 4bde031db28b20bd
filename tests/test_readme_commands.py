"""README's "Deploying for real" commands, run as written on the example fleet.

Only the gpufleet commands that need no cloud run (validate, synth, plan-check), in a scratch folder
holding the repository files they read (fleet.yaml, waivers.yaml). The one change: an image
placeholder (`REGISTRY/...@sha256:...`) becomes a real reference. plan-check runs checkov from
.venv-tools when it is there, else with --skip-checkov.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Deploying for real"
NEEDS_NO_CLOUD = ("validate", "synth", "plan-check")
FILES = ("fleet.yaml", "waivers.yaml")  # what those commands read from the working directory
IMAGE = "ghcr.io/acme/gpufleet-serving@sha256:" + "0" * 64


def readme_commands() -> list[list[str]]:
    """The gpufleet commands of the section's first bash block, as argv lists (comments dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"README.md {SECTION!r} has no bash block"
    commands = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv[:1] == ["gpufleet"]:
            commands.append(argv)
    return commands


def _placeholder(arg: str) -> bool:
    return "..." in arg or arg.startswith("REGISTRY/")


def as_run(argv: list[str]) -> list[str]:
    """The command as the test runs it: the image placeholder made real; --skip-checkov without checkov."""
    out = [IMAGE if i and argv[i - 1] == "--image" and _placeholder(arg) else arg for i, arg in enumerate(argv)]
    out = [re.sub(r"^--image=.*\.\.\.$", f"--image={IMAGE}", a) for a in out]
    checkov = ROOT / ".venv-tools" / "bin" / "checkov"
    if out[1] == "plan-check" and not checkov.is_file() and "--skip-checkov" not in out:
        out.append("--skip-checkov")
    return out


def test_the_section_holds_the_commands_this_test_runs():
    kinds = [argv[1] for argv in readme_commands()]
    for kind in NEEDS_NO_CLOUD:
        assert kind in kinds, f"README {SECTION!r} no longer shows `gpufleet {kind}`; update this test"
    assert kinds.index("validate") < kinds.index("synth") < kinds.index("plan-check")


def test_image_placeholder_only_is_substituted():
    argv = ["gpufleet", "synth", "fleet.yaml", "--image", "REGISTRY/gpufleet-serving@sha256:..."]
    assert as_run(argv) == [*argv[:4], IMAGE]
    assert as_run(["gpufleet", "synth", "fleet.yaml"]) == ["gpufleet", "synth", "fleet.yaml"]


@pytest.mark.slow
def test_deploying_for_real_passes_on_the_example_fleet_as_written(tmp_path):
    if importlib.util.find_spec("cdktn") is None:  # not imported here: that would start a jsii runtime
        pytest.skip("synthesis needs the 'cdk' extra")
    for name in FILES:
        shutil.copy(ROOT / name, tmp_path / name)
    bindir = Path(sys.executable).parent  # the venv's `gpufleet` console script
    if not (bindir / "gpufleet").is_file():
        pytest.skip(f"no gpufleet console script beside {sys.executable}")
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("GPUFLEET_FLEET", None)
    ran = []
    for argv in readme_commands():
        if argv[1] not in NEEDS_NO_CLOUD:
            continue  # capacity scan needs cloud credentials
        command = as_run(argv)
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert done.returncode == 0, (
            f"`{shlex.join(argv)}` exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-3000:]}"
        )
        assert "Traceback" not in done.stderr
        ran.append((argv[1], done.stdout))
    assert {kind for kind, _ in ran} == set(NEEDS_NO_CLOUD)
    verdict = ran[-1][1]
    assert "passed:" in verdict and "waivers: " in verdict and "fleet: " in verdict
