"""Property: any YAML document (random, or the example fleet with random parts replaced) gives either
a valid Fleet or a clean FleetFileError with at least one problem; never another exception."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from gpufleet.stacks.fleetfile import FleetFileError, parse_fleet
from gpufleet.stacks.spec import Fleet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "fleet.yaml").read_text())

# Real field names and values mixed with noise, so documents get past the first checks.
KEYS = st.sampled_from(
    [
        "fleet",
        "models",
        "regions",
        "settings",
        "slo",
        "router",
        "name",
        "catalog",
        "cloud",
        "region",
        "zones",
        "gpu",
        "nodes",
        "min",
        "max",
        "capacity",
        "tier",
        "reservation_id",
        "instance_type",
        "state",
        "backend",
        "tags",
        "api_allowed_cidrs",
        "dns",
        "zone",
        "record",
        "tensor_parallel_size",
        "max_model_len",
    ]
) | st.text(max_size=12)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(
        [
            "aws",
            "gcp",
            "azure",
            "H100-80GB",
            "L4",
            "spot",
            "reserved",
            "us-east-1",
            "0.0.0.0/0",
            "llama-3.1-8b",
            "p5.48xlarge",
            "1",
            "on-demand",
            "s3",
        ]
    )
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=25,
)


def _check(text: str | bytes) -> None:
    try:
        fleet = parse_fleet(text, "prop.yaml")
    except FleetFileError as exc:
        assert exc.problems, "a FleetFileError must carry at least one problem"
        for p in exc.problems:
            assert p.message and str(p).startswith("prop.yaml")
        return
    assert isinstance(fleet, Fleet)


def _dump(value) -> str:
    try:
        return yaml.safe_dump(value, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        return "{}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(VALUES)
def test_random_documents(value):
    _check(_dump(value))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_random_text(text):
    _check(text)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data):
    _check(data)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


PATHS = [p for p in _paths(BASE) if p]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), VALUES), min_size=1, max_size=3))
def test_mutated_example_fleet(mutations):
    """The example fleet with 1-3 parts replaced: reaches the deep (catalog, consistency) checks."""
    doc = copy.deepcopy(BASE)
    for path, value in mutations:
        node = doc
        try:
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced a parent
    _check(_dump(doc))
