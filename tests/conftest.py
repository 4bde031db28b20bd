"""Fixtures every test area shares: the repository root, the example fleet, the public traces."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def example_fleet_path() -> Path:
    return ROOT / "fleet.yaml"


@pytest.fixture(scope="session")
def example_fleet(example_fleet_path):
    from gpufleet.stacks.fleetfile import load_fleet

    return load_fleet(example_fleet_path)


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    """../shared/traces; tests that replay a trace skip with a clear message where it is absent."""
    if not TRACES.is_dir():
        pytest.skip(f"public traces not found at {TRACES} (the shared/ folder beside the repository)")
    return TRACES
