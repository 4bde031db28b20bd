"""Shared, session-scoped synthesis: importing cdktn and three providers costs 20-30 s, so the stacks
tests build the example fleet ONCE (and one variant fleet for the tiers the example lacks)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml


@dataclass
class Synthesized:
    outdir: Path
    app: object
    clusters: dict  # region key -> ClusterStackHandle

    def stack_json(self, name: str) -> dict:
        return json.loads((self.outdir / "stacks" / name / "cdk.tf.json").read_text())

    def manifest(self) -> dict:
        return json.loads((self.outdir / "manifest.json").read_text())


def _synth(fleet, outdir: Path) -> Synthesized:
    from gpufleet.stacks.synth import build_app

    app, clusters = build_app(fleet, outdir)
    app.synth()
    return Synthesized(outdir=outdir, app=app, clusters=clusters)


@pytest.fixture(scope="session")
def synthesized(example_fleet, tmp_path_factory) -> Synthesized:
    """The example fleet, synthesized into a temporary cdktf.out/."""
    return _synth(example_fleet, tmp_path_factory.mktemp("synth") / "cdktf.out")


VARIANT_REGIONS = [
    # AWS capacity block: CAPACITY_BLOCK, a launch template with the reservation, one subnet.
    {
        "cloud": "aws",
        "region": "us-east-2",
        "zones": ["us-east-2a", "us-east-2b"],
        "gpu": "H100-80GB",
        "nodes": {"min": 0, "max": 2},
        "capacity": {"tier": "reserved", "reservation_id": "cr-0123456789abcdef0"},
    },
    # AWS with no zones listed: the first two available zones, from a data source.
    {"cloud": "aws", "region": "eu-west-1", "gpu": "L4", "nodes": {"min": 1, "max": 3}},
    # GCP reservation.
    {
        "cloud": "gcp",
        "region": "us-east4",
        "zones": ["us-east4-a"],
        "gpu": "A100-80GB",
        "instance_type": "a2-ultragpu-2g",
        "nodes": {"min": 0, "max": 2},
        "capacity": {"tier": "reserved", "reservation_id": "acme-a100-reservation"},
    },
    # Azure spot.
    {
        "cloud": "azure",
        "region": "westus3",
        "gpu": "H100-80GB",
        "nodes": {"min": 0, "max": 3},
        "capacity": {"tier": "spot"},
    },
]


@pytest.fixture(scope="session")
def variant_fleet_doc(example_fleet_path) -> dict:
    doc = yaml.safe_load(example_fleet_path.read_text())
    doc = copy.deepcopy(doc)
    doc["fleet"] = "variant"
    doc["regions"] = VARIANT_REGIONS
    doc["settings"]["state"] = {"backend": "s3", "bucket": "acme-tfstate", "region": "us-east-1"}
    return doc


@pytest.fixture(scope="session")
def variant(variant_fleet_doc, tmp_path_factory) -> Synthesized:
    """Tiers and shapes the example fleet does not have: capacity block, GCP reservation, Azure spot."""
    from gpufleet.stacks.fleetfile import parse_fleet

    fleet = parse_fleet(yaml.safe_dump(variant_fleet_doc), "variant.yaml")
    return _synth(fleet, tmp_path_factory.mktemp("variant") / "cdktf.out")
