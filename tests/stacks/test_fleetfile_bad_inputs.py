"""Bad fleet files through the real CLI (`gpufleet validate`): each gives a clear message naming the
problem, exit code 2, and no Python traceback."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from gpufleet.cli.app import app
from gpufleet.cli.common import EXIT_BAD_INPUT
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "fleet.yaml").read_text())


def _doc(change: Callable[[dict], None]) -> str:
    doc = copy.deepcopy(BASE)
    change(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def _set(path: str, value) -> Callable[[dict], None]:
    """A change that sets a dotted path (list indexes as numbers), e.g. regions.0.nodes.max."""

    def change(doc: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = doc
        for p in parents:
            node = node[p]
        node[last] = value

    return change


def _dup_region(doc: dict) -> None:
    doc["regions"].append(copy.deepcopy(doc["regions"][0]))


def _gcp_l40s(doc: dict) -> None:
    doc["regions"][2]["gpu"] = "L40S"
    doc["regions"][2].pop("instance_type")


def _drop(key: str) -> Callable[[dict], None]:
    return lambda doc: doc.pop(key)


# (id, file content (str or bytes), substrings the message must contain)
CASES: list[tuple[str, str | bytes, list[str]]] = [
    ("empty file", "", ["is empty"]),
    ("only comments", "# nothing here\n", ["is empty"]),
    ("not yaml", "fleet: [unclosed\nregions: {\n", ["is not valid YAML"]),
    ("binary garbage", b"\x00\x01\x02\xff\xfe\x00garbage", ["binary file"]),
    ("not utf-8", b"fleet: caf\xe9\n", ["not UTF-8"]),
    ("a list, not a mapping", "- fleet\n- models\n", ["must be a mapping", "not a list"]),
    ("a scalar", "just words\n", ["must be a mapping"]),
    ("unknown top-level key", _doc(_set("colour", "blue")), ["colour", "unknown key"]),
    ("unknown region key", _doc(_set("regions.0.gpus", 8)), ["regions[0].gpus", "unknown key"]),
    ("wrong type nodes.max", _doc(_set("regions.0.nodes.max", "many")), ["regions[0].nodes.max", "integer"]),
    ("wrong type models", _doc(_set("models", "llama")), ["models", "list"]),
    ("wrong type tags", _doc(_set("settings.tags", ["a", "b"])), ["settings.tags", "dictionary"]),
    ("unknown GPU", _doc(_set("regions.0.gpu", "H1000")), ["unknown GPU type 'H1000'", "did you mean"]),
    ("GPU the cloud does not sell", _doc(_gcp_l40s), ["gcp does not sell L40S", "aws"]),
    (
        "min greater than max",
        _doc(_set("regions.0.nodes", {"min": 5, "max": 2})),
        ["nodes.min (5)", "nodes.max (2)"],
    ),
    (
        "negative min",
        _doc(_set("regions.0.nodes.min", -1)),
        ["regions[0].nodes.min", "greater than or equal to 0"],
    ),
    ("duplicate regions", _doc(_dup_region), ["repeats aws us-east-1"]),
    ("missing regions", _doc(_drop("regions")), ["regions", "required field is missing"]),
    ("unknown cloud", _doc(_set("regions.0.cloud", "oracle")), ["regions[0].cloud", "'oracle'", "allowed"]),
    (
        "reserved without id",
        _doc(_set("regions.0.capacity", {"tier": "reserved"})),
        ["needs a reservation_id"],
    ),
    ("API open to the internet", _doc(_set("settings.api_allowed_cidrs", ["0.0.0.0/0"])), ["whole internet"]),
    ("not a CIDR", _doc(_set("settings.api_allowed_cidrs", ["300.1.1.1/8"])), ["300.1.1.1/8"]),
    ("zone outside region", _doc(_set("regions.0.zones", ["eu-west-1a"])), ["'eu-west-1a' is not in region"]),
    (
        "instance type with another GPU",
        _doc(_set("regions.0.instance_type", "g6e.xlarge")),
        ["carries L40S GPUs"],
    ),
    (
        "unknown instance type",
        _doc(_set("regions.0.instance_type", "p9.huge")),
        ["'p9.huge' is not in the catalog"],
    ),
    ("unknown model", _doc(_set("models.0.catalog", "llama-9")), ["unknown model 'llama-9'"]),
    (
        "tensor parallel above the node",
        _doc(_set("models.0.tensor_parallel_size", 8)),
        ["g6e.xlarge has 1 GPUs"],
    ),
    ("azure zone letter", _doc(_set("regions.4.zones", ["a"])), ["Azure availability zones"]),
    ("s3 state without bucket", _doc(_set("settings.state", {"backend": "s3"})), ["needs bucket, region"]),
    ("upper-case fleet name", _doc(_set("fleet", "ACME")), ["fleet", "does not match the pattern ^[a-z]"]),
    (
        "alias bomb",
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True)
        )
        + "fleet: *h\n",
        ["expands to more than"],
    ),
    ("dns record outside zone", _doc(_set("settings.dns.record", "llm.other.org")), ["is not inside zone"]),
]


def _run(args: list[str]):
    result = CliRunner().invoke(app, args)
    text = result.output  # click >= 8.2 mixes stderr into output
    stderr = getattr(result, "stderr", "") or ""
    if stderr not in text:
        text += stderr
    return result, text


@pytest.mark.parametrize(("content", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_fleet_file(tmp_path, content, expected):
    path = tmp_path / "fleet.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result, text = _run(["validate", str(path)])
    assert result.exit_code == EXIT_BAD_INPUT, text
    assert (
        "Traceback" not in text
        and not isinstance(result.exception, Exception | None)
        or result.exit_code == 2
    )
    assert str(path) in text, f"the message should name the file: {text}"
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in:\n{text}"


def test_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_schema_errors_point_at_line_and_column(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(
        (ROOT / "fleet.yaml").read_text().replace("nodes: {min: 0, max: 8}", "nodes: {min: 0, max: x}", 1)
    )
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "max: x" in t)
    _, text = _run(["validate", str(path)])
    assert re.search(rf"{re.escape(str(path))}:{line}:\d+: regions\[1\]\.nodes\.max:", text), text


@pytest.mark.parametrize("target", ["missing", "directory"])
def test_unreadable_paths(tmp_path, target):
    path = tmp_path / "nope.yaml" if target == "missing" else tmp_path
    result, text = _run(["validate", str(path)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert ("no such file" if target == "missing" else "is a directory") in text


def test_synth_refuses_bad_fleet_the_same_way(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(_doc(_set("regions.0.gpu", "H1000")))
    result, text = _run(["synth", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "unknown GPU type 'H1000'" in text
    assert not (tmp_path / "out").exists()
