"""Golden test: the synthesized Terraform JSON of the example fleet's cluster stacks, pinned.

An intended change regenerates the golden files in the same commit:

    GPUFLEET_UPDATE_GOLDEN=1 .venv/bin/pytest tests/stacks/test_stacks_golden.py

and the diff of tests/stacks/golden/ is what the change does to real infrastructure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("GPUFLEET_UPDATE_GOLDEN") == "1"
HOW = (
    "if the change is intended: GPUFLEET_UPDATE_GOLDEN=1 .venv/bin/pytest tests/stacks/test_stacks_golden.py"
)


def _cluster_stacks(synthesized) -> list[str]:
    return sorted(n for n in synthesized.manifest()["stacks"] if n.endswith("-cluster"))


def _canonical(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def test_golden_stack_set(synthesized):
    names = _cluster_stacks(synthesized)
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        for stale in GOLDEN.glob("*.json"):
            if stale.stem not in names:
                stale.unlink()
    pinned = sorted(p.stem for p in GOLDEN.glob("*.json"))
    assert names == pinned, f"cluster stacks {names} differ from the golden files {pinned}; {HOW}"


@pytest.mark.parametrize(
    "stack",
    sorted(p.stem for p in GOLDEN.glob("*.json")) or ["(no golden files yet)"],
)
def test_golden_stack_json(synthesized, stack):
    if stack not in _cluster_stacks(synthesized):
        pytest.fail(f"stack {stack} is pinned but no longer synthesized; {HOW}")
    actual = _canonical(synthesized.stack_json(stack))
    path = GOLDEN / f"{stack}.json"
    if UPDATE:
        path.write_text(actual)
    expected = path.read_text()
    assert actual == expected, f"{stack}: synthesized JSON differs from {path}; {HOW}"


def test_update_writes_every_stack(synthesized):
    """With GPUFLEET_UPDATE_GOLDEN=1 a new stack gets its golden file even before parametrization sees it."""
    if not UPDATE:
        pytest.skip("only when regenerating golden files")
    for stack in _cluster_stacks(synthesized):
        (GOLDEN / f"{stack}.json").write_text(_canonical(synthesized.stack_json(stack)))
