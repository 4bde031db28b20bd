"""Issue 15 row 7: `gpufleet validate` refuses what it used to accept, and prints places as written.

Each case edits the example fleet the way a person would (text, not a re-dumped document), runs the
real CLI and expects exit 2, the file, the line:column and what is wrong.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = (ROOT / "fleet.yaml").read_text()


def _edit(old: str, new: str, count: int = 1) -> str:
    assert old in EXAMPLE, old
    return EXAMPLE.replace(old, new, count)


def _line_of(text: str, fragment: str, nth: int = 1) -> int:
    hits = [i for i, t in enumerate(text.splitlines(), 1) if fragment in t]
    return hits[nth - 1]


CASES = [
    # (id, fleet text, fragment on the offending line (nth hit), what the message must say)
    (
        "duplicate gpu key",
        _edit(
            "    gpu: H100-80GB\n    nodes: {min: 0, max: 2}",
            "    gpu: H100-80GB\n    gpu: L4\n    nodes: {min: 0, max: 2}",
        ),
        ("gpu: L4", 1),
        ["duplicate key 'gpu'", "first at line"],
    ),
    (
        "duplicate top-level key",
        EXAMPLE + "\nfleet: other-name\n",
        ("fleet: other-name", 1),
        ["duplicate key 'fleet'"],
    ),
    (
        "duplicate key in a flow mapping",
        _edit("nodes: {min: 0, max: 2}", "nodes: {min: 0, max: 2, max: 9}"),
        ("max: 9", 1),
        ["duplicate key 'max'"],
    ),
    (
        "bool as nodes.max",
        _edit("nodes: {min: 0, max: 2}", "nodes: {min: 0, max: true}"),
        ("max: true", 1),
        ["regions[0].nodes.max", "valid integer", "boolean (true)"],
    ),
    (
        "float as max_model_len",
        _edit("max_model_len: 32768", "max_model_len: 32768.5"),
        ("max_model_len", 1),
        ["models[0].max_model_len", "valid integer"],
    ),
    (
        "string yes as a boolean",
        _edit("    tensor_parallel_size: 1", "    tensor_parallel_size: 1\n    allow_fp8_kv_cache: 'yes'"),
        ("allow_fp8_kv_cache", 1),
        ["allow_fp8_kv_cache", "valid boolean"],
    ),
    (
        "infinite budget",
        _edit("budget_per_hour: 400", "budget_per_hour: .inf"),
        ("budget_per_hour", 1),
        ["settings.budget_per_hour", "finite"],
    ),
    (
        "NaN slo",
        _edit("ttft_ms: 2000", "ttft_ms: .nan"),
        ("ttft_ms", 1),
        ["slo.ttft_ms", "finite"],
    ),
    (
        "binary tag",
        _edit("residency: eu", "residency: !!binary ZXU="),
        ("!!binary", 1),
        ["the tag !!binary is not allowed"],
    ),
    (
        "python tag",
        _edit("fleet: acme-llm", "fleet: !!python/object/apply:os.getcwd []"),
        ("fleet: !!python", 1),
        ["!!python/object/apply:os.getcwd is not allowed"],
    ),
    (
        "custom tag",
        _edit("gpu: L4", "gpu: !gpu L4"),
        ("!gpu", 1),
        ["the tag !gpu is not allowed"],
    ),
    (
        "engine url that is not a url",
        _edit("    residency: us\n", "    residency: us\n    endpoints: {engines: ['not a url']}\n"),
        ("not a url", 1),
        ["regions[0].endpoints.engines", "'not a url' is not a URL"],
    ),
    (
        "engine url without a host",
        _edit("    residency: us\n", "    residency: us\n    endpoints: {engines: ['http://:8000']}\n"),
        ("http://:8000", 1),
        ["names no host"],
    ),
    (
        "engine url of another scheme",
        _edit("    residency: us\n", "    residency: us\n    endpoints: {engines: ['ftp://10.0.0.5:8000']}\n"),
        ("ftp://", 1),
        ["is not an http(s) URL"],
    ),
    (
        "engine url with a bad port",
        _edit("    residency: us\n", "    residency: us\n    endpoints: {engines: ['http://10.0.0.5:99999']}\n"),
        ("99999", 1),
        ["valid host and port"],
    ),
    (
        "router url that is not a url",
        _edit("    residency: us\n", "    residency: us\n    endpoints: {router: 'aws-us-east-1.llm'}\n"),
        ("aws-us-east-1.llm", 1),
        ["regions[0].endpoints.router", "is not an http(s) URL"],
    ),
    (
        "engines_dns without a port",
        _edit("    residency: us\n", "    residency: us\n    endpoints: {engines_dns: 'vllm-engines'}\n"),
        ("vllm-engines", 1),
        ["engines_dns", "is not host:port"],
    ),
    (
        "nesting past the limit",
        EXAMPLE + "\nextra: " + "[" * 70 + "]" * 70 + "\n",
        ("extra:", 1),
        ["nested more than 64 levels"],
    ),
    (
        "a date that is no date",
        _edit("fleet: acme-llm", "fleet: 2026-02-30"),
        ("fleet: 2026", 1),
        ["cannot read the value '2026-02-30'"],
    ),
]


@pytest.mark.parametrize(("text", "where", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validate_refuses_with_the_place(tmp_path, run_cli, text, where, expected):
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    code, out = run_cli(["validate", str(path)])
    assert code == 2, out
    line = _line_of(text, *where)
    assert re.search(rf"{re.escape(str(path))}:{line}:\d+: ", out), f"no {path}:{line}:col in:\n{out}"
    for fragment in expected:
        assert fragment in out, f"{fragment!r} not in:\n{out}"


def test_the_duplicate_no_longer_silently_wins(tmp_path):
    """The issue's case: a region's `gpu: H100-80GB` followed by `gpu: L4` used to become L4."""
    from gpufleet.stacks.fleetfile import FleetFileError, parse_fleet

    text = CASES[0][1]
    with pytest.raises(FleetFileError) as exc:
        parse_fleet(text, "fleet.yaml")
    (problem,) = exc.value.problems
    assert problem.line == _line_of(text, "gpu: L4") and problem.column == 5


def test_a_location_at_line_100_prints_as_written(tmp_path, run_cli):
    """`fleet.yaml:100:3` must not be read as the emoji code `:100:` (it printed fleet.yaml💯3)."""
    lines = EXAMPLE.splitlines()
    at = _line_of(EXAMPLE, "ttft_ms: 2000")
    text = "\n".join(["# padding"] * (100 - at) + lines).replace("ttft_ms: 2000", "ttft_ms: x") + "\n"
    assert _line_of(text, "ttft_ms: x") == 100
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    code, out = run_cli(["validate", str(path)])
    assert code == 2
    assert f"{path}:100:3: slo.ttft_ms:" in out, out
    assert "\U0001f4af" not in out


def test_markup_and_emoji_in_user_text_reach_the_terminal_verbatim(tmp_path, run_cli):
    """A path or value with `[bold]` or `:smile:` is printed as typed, in errors and in the ok line."""
    odd = tmp_path / "[bold]x:smile:"
    odd.mkdir()
    path = odd / "[red]fleet.yaml"
    path.write_text(EXAMPLE.replace("ttft_ms: 2000", "ttft_ms: '[red]:100:'"))
    code, out = run_cli(["validate", str(path)])
    assert code == 2
    assert str(path) in out and "'[red]:100:'" in out, out
    path.write_text(EXAMPLE.replace("- name: llama-3.1-8b", "- name: '[b]llama:fire:'"))
    code, out = run_cli(["validate", str(path)])
    assert code == 0, out
    assert f"ok {path} is a valid fleet file" in out and "[b]llama:fire:" in out


@pytest.mark.parametrize(
    "text",
    [
        EXAMPLE,
        (ROOT / "examples" / "fleet-mixed.yaml").read_text(),
        _edit("    residency: us\n", "    residency: us\n    endpoints:\n      engines: ['http://10.0.0.5:8000', "
              "'https://[::1]:8443/']\n      engines_dns: vllm-engines.gpufleet.svc.cluster.local:8000\n"
              "      router: https://aws-us-east-1.llm.example.com\n"),
        _edit("budget_per_hour: 400", "budget_per_hour: 400.5"),  # an int where a float goes is fine
        _edit("ttft_ms: 2000", "ttft_ms: !!float 2000"),  # explicit plain tags are plain
        _edit("max_model_len: 32768", "max_model_len: 32_768"),  # YAML 1.1 ints
    ],
    ids=["example", "mixed example", "endpoints", "float budget", "explicit float tag", "underscored int"],
)
def test_legitimate_fleets_still_pass(tmp_path, run_cli, text):
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    code, out = run_cli(["validate", str(path)])
    assert code == 0, out


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "big"])
def test_validate_refuses_devices_fifos_and_big_files_without_reading_them(tmp_path, run_cli, fifo, target):
    if target == "/dev/zero" and not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    path = {"/dev/zero": Path("/dev/zero"), "fifo": fifo, "big": tmp_path / "big.yaml"}[target]
    if target == "big":
        path.write_text(EXAMPLE + "#" * (1 << 20))
    code, out = run_cli(["validate", str(path)], seconds=10)
    assert code == 2 and str(path) in out
    assert {"/dev/zero": "character device", "fifo": "FIFO", "big": "1 MiB"}[target] in out, out
