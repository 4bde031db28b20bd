"""Hypothesis against every file reader: fleet file, trace, capacity snapshot, plan JSON, waivers.

Each gets 2,000 small inputs (real documents with parts replaced by hostile values, and raw noise),
and each call runs under a 5 s bound: the reader returns its result or raises its own clean error
type, never anything else, and never hangs. What a reader accepts must also be safe to use: a
trace's times are finite and bounded, a snapshot can be placed and checked against a fleet.
"""

from __future__ import annotations

import atexit
import copy
import gzip
import json
import math
import shutil
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
BOUND_S = 5
_DIR = Path(tempfile.mkdtemp(prefix="gpufleet-fuzz-"))  # one file per reader, rewritten each example
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)

# Values a careless or hostile file puts where a real one has a plain value, as YAML/JSON text.
NASTY_TEXT = [
    "true", "false", "null", "-1", "0", "1e308", "-1e308", ".inf", "-.inf", ".nan", "1e400", "NaN", "Infinity",
    "99999999999999999999999", "3.5", "'3.5'", "'not a url'", "http://", "http://:0", "!!binary aGk=",
    "!!python/object/apply:os.getcwd []", "!!set {a, b}", "!custom x", "*nope", "&a x", "2026-13-45", "2026-06-30",
    "[[[[[[[[", "{a: 1, a: 2}", "[]", "{}", "'[bold]x[/]'", "':100:'", "''", "\"\\u0000\"", "'\x07'", "~",
]
NASTY_VALUES = [
    True, False, None, -1, 0, 2**70, -(2**70), 1e308, -1e308, 3.5, "3.5", "", "not a url", "[red]x", ":100:",
    [], {}, [[["deep"]]], {"a": {"b": {"c": 1}}}, "H100-80GB", "aws", "us-east-1", 8, 16, 55.04,
]
values = st.sampled_from(NASTY_VALUES) | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=12)


def _bounded_call(bounded, fn, *args):
    with bounded(BOUND_S):
        return fn(*args)


def _write(name: str, data: str | bytes) -> Path:
    path = _DIR / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


@st.composite
def mutated_text(draw, base: str, extra_tokens: list[str]) -> str:
    """`base` with 1-3 lines edited the way people and attackers do: a value replaced, a line
    repeated (duplicate keys), removed, or noise inserted."""
    lines = base.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["value", "repeat", "drop", "insert"]))
        if how == "value" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            token = draw(st.sampled_from(NASTY_TEXT + extra_tokens) | st.text(max_size=10))
            lines[i] = f"{key}: {token}"
        elif how == "repeat":
            lines.insert(i, lines[i])
        elif how == "drop" and len(lines) > 1:
            del lines[i]
        else:
            lines.insert(i, draw(st.text(max_size=20)))
    return "\n".join(lines) + "\n"


def _set_leaf(doc, path, value):
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _leaves(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*prefix, i))


@st.composite
def mutated_doc(draw, base: dict) -> dict:
    doc = copy.deepcopy(base)
    paths = [p for p in _leaves(base) if p]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        try:
            _set_leaf(doc, path, copy.deepcopy(draw(values)))  # a shared value could make a cycle
        except (KeyError, IndexError, TypeError):
            pass  # an earlier change replaced a parent
    return doc


def _json_text(draw, doc) -> str:
    text = json.dumps(doc, indent=draw(st.sampled_from([None, 1])), allow_nan=True)
    # raw-text damage JSON encoders never write: NaN literals, duplicate keys, deep nesting, truncation
    damage = draw(st.sampled_from(["none", "nan", "dup", "deep", "cut", "noise"]))
    if damage == "nan":
        text = text.replace("8", "NaN", 1)
    elif damage == "dup" and text.startswith("{"):
        text = '{"schema": 1, ' + text[1:]
    elif damage == "deep":
        n = draw(st.integers(60, 3000))
        text = text.replace("[]", "[" * n + "]" * n, 1) if "[]" in text else "[" * n + text + "]" * n
    elif damage == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif damage == "noise":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=8)) + text[at:]
    return text


# ---- fleet file

FLEET_TEXT = (ROOT / "fleet.yaml").read_text()


@FUZZ
@given(st.one_of(mutated_text(FLEET_TEXT, ["H100-80GB", "L4", "spot", "reserved", "p5.48xlarge"]),
                 st.text(max_size=60), st.binary(max_size=60).map(lambda b: b.decode("latin-1"))))
def test_fuzz_fleet_file(bounded, text):
    from gpufleet.stacks.fleetfile import FleetFileError, parse_fleet
    from gpufleet.stacks.spec import Fleet

    try:
        fleet = _bounded_call(bounded, parse_fleet, text, "fuzz.yaml")
    except FleetFileError as exc:
        assert exc.problems and all(str(p).startswith("fuzz.yaml") and p.message for p in exc.problems)
        return
    assert isinstance(fleet, Fleet)
    for r in fleet.regions:
        assert isinstance(r.nodes.max, int) and not isinstance(r.nodes.max, bool)


# ---- traces

TRACE_KEYS = ["timestamp", "input_length", "output_length", "hash_ids"]
TRACE_TOKENS = ["0", "1", "512", "-0", "-5", "1e308", "1e400", "NaN", "Infinity", "-Infinity", "true", "null",
                '"12"', "[1, 2]", "[-1]", '["a"]', "{}", "12.5", "1" + "0" * 400, "[" * 100 + "]" * 100]


@st.composite
def trace_text(draw) -> bytes:
    if draw(st.booleans()):
        lines = []
        for _ in range(draw(st.integers(1, 5))):
            fields = {k: draw(st.sampled_from(TRACE_TOKENS) | st.integers(-10, 10**7).map(str))
                      for k in draw(st.lists(st.sampled_from(TRACE_KEYS), max_size=5))}
            line = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
            lines.append(draw(st.sampled_from([line, line, line, "", "[1]", line[: len(line) // 2]])))
        text = "\n".join(lines)
    else:
        rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
        for _ in range(draw(st.integers(0, 5))):
            ts = draw(st.sampled_from(["2023-11-16 18:15:46.6805900", "2023-11-16 18:15:47", "9999-12-31 23:59:59",
                                       "0001-01-01 00:00:00", "nan", "", "2023-11-16 18:15:47.1e400"]))
            a, b = (draw(st.sampled_from(["0", "1", "374", "-5", "1e3", "", "1_0", "99999999999", "\x00"]))
                    for _ in range(2))
            rows.append(f"{ts},{a},{b}")
        text = "\n".join(rows)
    data = text.encode()
    packing = draw(st.sampled_from(["plain", "plain", "gzip", "gzip-cut", "gzip-noise"]))
    if packing != "plain":
        data = gzip.compress(data)
        if packing == "gzip-cut":
            data = data[: draw(st.integers(2, len(data)))]
        elif packing == "gzip-noise":
            at = draw(st.integers(2, len(data) - 1))
            data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at + 1 :]
    return data


@FUZZ
@given(trace_text() | st.binary(max_size=80))
def test_fuzz_trace(bounded, data):
    from gpufleet.serving.traces import MAX_TOKENS, MAX_TRACE_SPAN_S, TraceError, read_trace

    path = _write("trace.jsonl", data)
    try:
        records = _bounded_call(bounded, read_trace, path)
    except TraceError as exc:
        assert str(exc).startswith(str(path))
        return
    assert records
    for r in records:  # what simulate gets: finite, bounded times; token counts it can clip
        assert math.isfinite(r.arrival_s) and 0 <= r.arrival_s <= MAX_TRACE_SPAN_S
        assert 1 <= r.prompt_tokens <= MAX_TOKENS and 1 <= r.output_tokens <= MAX_TOKENS


# ---- capacity snapshots

SNAPSHOT = json.loads(json.dumps({
    "schema": "gpufleet.capacity/v1",
    "taken_at": "2026-01-31T12:00:00Z",
    "gpus": ["H100-80GB"],
    "clouds": {"gcp": {"cloud": "gcp", "status": "partial", "error": None, "regions_scanned": 1,
                       "region_errors": {"x": {"kind": "denied", "message": "m"}}, "global_free_gpus": 4,
                       "notes": []}},
    "regions": [
        {"cloud": "aws", "region": "us-east-1", "gpu": "H100-80GB", "instance_type": "p5.48xlarge",
         "offers": [{"name": "p5.48xlarge", "gpus": 8, "vcpus": 192, "zones": ["us-east-1a"], "price": 55.04}],
         "quota": {"on-demand": {"name": "L-1", "unit": "vcpu", "limit": 384, "used": 0, "limit_gpus": 16,
                                 "free_gpus": 16}},
         "spot_score": 7, "notes": []},
        {"cloud": "gcp", "region": "us-central1", "gpu": "H100-80GB", "instance_type": "a3-highgpu-1g",
         "offers": [{"name": "a3-highgpu-1g", "gpus": 1, "vcpus": 26, "zones": ["us-central1-a"], "price": None}],
         "quota": {"spot": {"name": "P", "unit": "gpu", "limit": 8, "used": None, "limit_gpus": 8, "free_gpus": 6}}},
    ],
}))


@st.composite
def snapshot_text(draw) -> str:
    return _json_text(draw, draw(mutated_doc(SNAPSHOT)))


@FUZZ
@given(snapshot_text() | st.text(max_size=60))
def test_fuzz_snapshot(bounded, example_fleet, text):
    from gpufleet.stacks.capacity.place import PlacementError, place
    from gpufleet.stacks.capacity.snapshot import SnapshotError, read_snapshot
    from gpufleet.stacks.capacity_check import check_fleet

    path = _write("snap.json", text)
    try:
        snap = _bounded_call(bounded, read_snapshot, path)
    except SnapshotError as exc:
        assert str(exc).startswith(str(path))
        return
    # what `capacity place` and `validate --capacity` do next must not fail on what was accepted
    for tier in ("on-demand", "spot"):
        try:
            _bounded_call(bounded, lambda t=tier: place(snap, "H100-80GB", 8, tier=t))
        except PlacementError:
            pass
    assert isinstance(_bounded_call(bounded, check_fleet, example_fleet, snap), list)


# ---- plan JSON

PLAN = {
    "format_version": "1.2",
    "resource_changes": [
        {"address": "aws_eks_node_group.gpu", "type": "aws_eks_node_group", "name": "gpu", "mode": "managed",
         "change": {"actions": ["create"], "before": None, "after": {"instance_types": ["p5.48xlarge"],
                                                                     "scaling_config": [{"max_size": 2}]},
                    "after_unknown": {"id": True}}},
    ],
    "configuration": {"provider_config": {"aws": {"name": "aws", "expressions": {"region": {"constant_value":
                                                                                            "us-east-1"}}}},
                      "root_module": {"resources": [], "module_calls": {}}},
}


@st.composite
def plan_text(draw) -> str:
    return _json_text(draw, draw(mutated_doc(PLAN)))


@FUZZ
@given(plan_text() | st.text(max_size=60))
def test_fuzz_plan(bounded, text):
    from gpufleet.stacks.plancheck.inputs import InputError, Inputs, load

    path = _write("plan.json", text)
    try:
        inputs = _bounded_call(bounded, load, [path])
    except InputError as exc:
        assert str(path) in str(exc)
        return
    assert isinstance(inputs, Inputs)
    assert all(isinstance(c.address, str) and isinstance(c.type, str) for c in inputs.changes)


# ---- waivers

WAIVER_TEXT = (
    "waivers:\n  - policy: GPU011\n    resource: 'aws_eks_node_group.*'\n    stack: 'aws-*'\n"
    "    reason: planned move\n    expires: 2099-01-01\n  - policy: CKV_*\n    resource: '*'\n"
    "    reason: r\n    expires: '2020-01-01'\n"
)


@FUZZ
@given(st.one_of(mutated_text(WAIVER_TEXT, ["GPU011", "'*'", "2099-01-01", "[a, b]"]),
                 st.text(max_size=60),
                 st.recursive(st.sampled_from(NASTY_VALUES) | st.text(max_size=8),
                              lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                              max_leaves=10).map(lambda v: yaml.safe_dump({"waivers": v}))))
def test_fuzz_waivers(bounded, text):
    from gpufleet.stacks.plancheck.inputs import InputError
    from gpufleet.stacks.plancheck.waivers import Waiver, load_waivers

    path = _write("waivers.yaml", text)
    try:
        waivers = _bounded_call(bounded, load_waivers, path)
    except InputError as exc:
        assert str(exc).startswith(str(path))
        return
    assert all(isinstance(w, Waiver) and isinstance(w.stack, str) for w in waivers)
