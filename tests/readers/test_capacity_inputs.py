"""Issue 15 row 9: `capacity place` and `validate --capacity` on broken snapshots: exit 2, the file, the
line:column and the field; never a traceback."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLEET = str(ROOT / "fleet.yaml")

SNAPSHOT = {
    "schema": "gpufleet.capacity/v1",
    "taken_at": "2026-01-31T12:00:00Z",
    "gpus": ["H100-80GB"],
    "clouds": {"aws": {"cloud": "aws", "status": "ok", "error": None, "regions_scanned": 2,
                       "region_errors": {}, "global_free_gpus": None, "notes": []}},
    "regions": [
        {"cloud": "aws", "region": "us-east-1", "gpu": "H100-80GB", "instance_type": "p5.48xlarge",
         "offers": [{"name": "p5.48xlarge", "gpus": 8, "vcpus": 192, "zones": ["us-east-1a"], "price": 55.04}],
         "quota": {"on-demand": {"name": "L-417A185B", "unit": "vcpu", "limit": 384, "used": 0,
                                 "limit_gpus": 16, "free_gpus": 16}},
         "spot_score": 7, "notes": [], "offered": True, "obtainable_gpus": 16},
        {"cloud": "gcp", "region": "us-central1", "gpu": "H100-80GB", "instance_type": "a3-highgpu-1g",
         "offers": [{"name": "a3-highgpu-1g", "gpus": 1, "vcpus": 26, "zones": ["us-central1-a"], "price": 11.06}],
         "quota": {"on-demand": {"name": "NVIDIA_H100_GPUS", "unit": "gpu", "limit": 8, "used": 2,
                                 "limit_gpus": 8, "free_gpus": 6}}},
    ],
}


def _text(path: str | None = None, value=None) -> str:
    """The snapshot, indented (one value a line), with the dotted `path` set to `value`."""
    doc = copy.deepcopy(SNAPSHOT)
    if path is not None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = doc
        for p in parents:
            node = node[p]
        node[last] = value
    return json.dumps(doc, indent=2)


def _line_of(text: str, fragment: str) -> int:
    return next(i for i, t in enumerate(text.splitlines(), 1) if fragment in t)


CASES = {
    # name: (snapshot text, fragment on the line named (None: the file only), what the message says)
    "price as a string": (_text("regions.0.offers.0.price", "55.04"), '"price": "55.04"',
                          ["regions[0].offers[0].price", "valid number", "a string ('55.04')"]),
    "gpus as a bool": (_text("regions.1.offers.0.gpus", True), '"gpus": true', ["valid integer", "boolean"]),
    "negative free gpus": (_text("regions.1.quota.on-demand.free_gpus", -4), '"free_gpus": -4',
                           ["free_gpus", "greater than or equal to 0"]),
    "unknown quota unit": (
        _text("regions.0.quota.on-demand.unit", "cores"), '"unit": "cores"', ["got 'cores'; allowed: 'vcpu' or 'gpu'"]
    ),
    "quota limit as a string": (_text("regions.0.quota.on-demand.limit", "384"), '"limit": "384"', ["valid number"]),
    "offers not a list": (_text("regions.0.offers", {"name": "x"}), '"offers": {', ["valid list"]),
    "clouds entry with a typo": (_text("clouds.aws.regoins_scanned", 2), '"regoins_scanned"', ["unknown key"]),
    "bad taken_at": (_text("taken_at", "yesterday"), None, ["taken_at 'yesterday'", "ISO 8601"]),
    "NaN price": (_text().replace('"price": 55.04', '"price": NaN'), '"price": NaN', ["not finite"]),
    "1e400 limit": (_text().replace('"limit": 384', '"limit": 1e400'), '"limit": 1e400', ["not finite"]),
    "duplicate key": (_text().replace('"price": 55.04', '"price": 55.04, "price": 0.01'), '"price": 55.04, "price"',
                      ['duplicate key "price"']),
    "deeply nested": ('{"schema": "gpufleet.capacity/v1", "regions": ' + "[" * 100_000 + "]" * 100_000 + "}", None,
                      ["nested more than 64 levels"]),
    "a number among the notes": (_text("regions.0.notes", ["ok", 777777]), "777777",
                                 ["regions[0].notes[1]", "valid string, not an integer (777777)"]),
    "not json": ("{\n  \"schema\": \"gpufleet.capacity/v1\",\n  oops\n}", "oops", ["is not JSON"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["place", "validate"])
def test_broken_snapshot_exits_2_with_the_place(tmp_path, run_cli, case, command):
    text, fragment, expected = CASES[case]
    path = tmp_path / "snap.json"
    path.write_text(text)
    args = (
        ["capacity", "place", "--gpu", "H100-80GB", "--gpus", "8", "--snapshot", str(path)]
        if command == "place"
        else ["validate", FLEET, "--capacity", str(path)]
    )
    code, out = run_cli(args, seconds=20)
    assert code == 2, out
    where = f"{path}:{_line_of(text, fragment)}:" if fragment else f"{path}:"
    assert where in out, f"{where!r} not in:\n{out}"
    for fragment in expected:
        assert fragment in out, f"{fragment!r} not in:\n{out}"


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "directory", "big"])
@pytest.mark.parametrize("command", ["place", "validate"])
def test_special_snapshot_paths_exit_2_without_reading(tmp_path, run_cli, fifo, target, command):
    if target == "/dev/zero" and not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    path = {"/dev/zero": Path("/dev/zero"), "fifo": fifo, "directory": tmp_path, "big": tmp_path / "big.json"}[target]
    if target == "big":
        with open(path, "wb") as fh:  # sparse: 33 MiB on paper, nothing on disk
            fh.truncate(33 << 20)
    args = (
        ["capacity", "place", "--gpu", "H100-80GB", "--gpus", "8", "--snapshot", str(path)]
        if command == "place"
        else ["validate", FLEET, "--capacity", str(path)]
    )
    code, out = run_cli(args, seconds=10)
    assert code == 2 and str(path) in out, out
    assert {"/dev/zero": "character device", "fifo": "FIFO", "directory": "directory", "big": "32 MiB"}[target] in out


def test_a_good_snapshot_still_places_and_checks(tmp_path, run_cli):
    path = tmp_path / "snap.json"
    path.write_text(_text())
    code, out = run_cli(["capacity", "place", "--gpu", "H100-80GB", "--gpus", "8", "--snapshot", str(path),
                         "--json"])
    assert code == 0, out
    assert json.loads(out)["gpus"] >= 8
    code, out = run_cli(["validate", FLEET, "--capacity", str(path)])
    assert code == 0, out


def test_a_written_snapshot_reads_back(tmp_path):
    """The writer's own output (with the derived keys it adds) passes the strict reader."""
    from gpufleet.stacks.capacity.snapshot import read_snapshot, write_snapshot

    path = tmp_path / "snap.json"
    path.write_text(_text())
    snap = read_snapshot(path)
    again = tmp_path / "again.json"
    write_snapshot(snap, again)
    assert read_snapshot(again).to_dict() == snap.to_dict()


def test_place_write_refuses_a_fleet_with_a_duplicate_key(tmp_path, run_cli):
    snap = tmp_path / "snap.json"
    snap.write_text(_text())
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text((ROOT / "fleet.yaml").read_text().replace("fleet: acme-llm", "fleet: acme-llm\nfleet: b"))
    code, out = run_cli(["capacity", "place", "--gpu", "H100-80GB", "--gpus", "8", "--snapshot", str(snap),
                         "--write", str(fleet)])
    assert code == 2 and f"{fleet}:4:1: duplicate key 'fleet'" in out, out
