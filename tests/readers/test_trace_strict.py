"""Issue 15 row 8: `gpufleet simulate --trace` neither hangs nor crashes on a broken trace.

Every case runs the real command in-process under a time bound (the old reader spun at 100% CPU on
an infinite or 1e308 timestamp), and expects exit 2 with the file and the line.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLEET = str(ROOT / "fleet.yaml")
GOOD = {"timestamp": 0, "input_length": 100, "output_length": 20, "hash_ids": [1, 2]}


def _jsonl(*bad_lines: str) -> bytes:
    return ("\n".join([json.dumps(GOOD), *bad_lines]) + "\n").encode()


def _line(**change) -> str:
    return json.dumps({**GOOD, **change})


AZURE_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"

CASES = {
    # name: (file content, line the message names (None: the file only), what the message says)
    "Infinity timestamp": (_jsonl('{"timestamp": Infinity, "input_length": 1, "output_length": 1}'), 2, "not finite"),
    "1e400 timestamp": (_jsonl('{"timestamp": 1e400, "input_length": 1, "output_length": 1}'), 2, "not finite"),
    "NaN timestamp": (_jsonl('{"timestamp": NaN, "input_length": 1, "output_length": 1}'), 2, "not finite"),
    "1e308 timestamp": (_jsonl(_line(timestamp=1e308)), None, "more than 366 days"),
    "huge integer timestamp": (_jsonl('{"timestamp": 1' + "0" * 400 + ', "input_length": 1, "output_length": 1}'),
                               2, "finite number"),
    "negative timestamp": (_jsonl(_line(timestamp=-5)), 2, "timestamp is -5"),
    "string timestamp": (_jsonl(_line(timestamp="12")), 2, "not a number"),
    "negative input_length": (_jsonl(_line(input_length=-3)), 2, "input_length is -3"),
    "negative output_length": (_jsonl(_line(output_length=-1)), 2, "output_length is -1"),
    "bool token count": (_jsonl(_line(output_length=True)), 2, "not a number"),
    "fractional token count": (_jsonl(_line(input_length=12.5)), 2, "not a whole number"),
    "absurd token count": (_jsonl(_line(input_length=10**15)), 2, "at most"),
    "hash_ids not a list": (_jsonl(_line(hash_ids="abc")), 2, "not a list"),
    "negative hash id": (_jsonl(_line(hash_ids=[1, -2])), 2, "hash_ids holds -2"),
    "duplicate key": (_jsonl('{"timestamp": 1, "timestamp": 2, "input_length": 1, "output_length": 1}'),
                      2, 'duplicate key "timestamp"'),
    "deeply nested line": (_jsonl('{"timestamp": ' + "[" * 50_000 + "]" * 50_000 + "}"), 2, "nested more than 64"),
    "array line": (_jsonl("[1, 2, 3]"), 2, "not an object"),
    "truncated line": (_jsonl('{"timestamp": 3, "input_length'), 2, "is not JSON"),
    "azure negative tokens": ((AZURE_HEAD + "2023-11-16 18:15:47.0,-5,10\n").encode(), 3, "ContextTokens '-5'"),
    "azure nan timestamp": ((AZURE_HEAD + "nan,5,10\n").encode(), 3, "TIMESTAMP 'nan'"),
    "azure exponent fraction": ((AZURE_HEAD + "2023-11-16 18:15:47.1e400,5,10\n").encode(), 3, "TIMESTAMP"),
    "azure years apart": ((AZURE_HEAD + "9999-12-31 23:59:59,5,10\n").encode(), None, "more than 366 days"),
    "azure NUL byte": ((AZURE_HEAD + "2023-11-16 18:15:47.0,5\x00,10\n").encode(), 3, "ContextTokens"),
    "azure giant field": ((AZURE_HEAD + "2023-11-16 18:15:47.0," + "9" * 200_000 + ",1\n").encode(), 3, "CSV"),
    "not utf-8": (b'{"timestamp": 0, "input_length": 1, "output_length": 1}\n{"x": "\xff"}\n', 2, "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_traces_exit_2_quickly(tmp_path, run_cli, case):
    content, line, expected = CASES[case]
    path = tmp_path / "trace.jsonl"
    path.write_bytes(content)
    code, out = run_cli(["simulate", "--trace", str(path), "--fleet", FLEET], seconds=20)
    assert code == 2, out
    where = f"{path}:{line}:" if line is not None else f"{path}:"
    assert where in out, f"{where!r} not in:\n{out}"
    assert expected in out, f"{expected!r} not in:\n{out}"


def test_the_same_trace_gzipped_is_read_the_same(tmp_path):
    from gpufleet.serving.traces import TraceError, read_trace

    plain, packed = tmp_path / "t.jsonl", tmp_path / "t.jsonl.gz"
    content = _jsonl(_line(timestamp=1500), _line(timestamp=-1))
    plain.write_bytes(content)
    packed.write_bytes(gzip.compress(content))
    messages = []
    for p in (plain, packed):
        with pytest.raises(TraceError) as exc:
            read_trace(p)
        messages.append(str(exc.value).replace(p.name, "T"))
    assert messages[0] == messages[1] and ":3:" in messages[0]


@pytest.mark.parametrize("how", ["truncated", "bad crc", "garbage after magic", "bad deflate"])
def test_corrupt_gzip_exits_2(tmp_path, run_cli, how):
    good = gzip.compress(_jsonl(_line(timestamp=5)))
    data = {
        "truncated": good[: len(good) // 2],
        "bad crc": good[:-8] + b"\0\0\0\0" + good[-4:],
        "garbage after magic": b"\x1f\x8b" + b"garbage" * 10,
        "bad deflate": good[:10] + bytes(b ^ 0x5A for b in good[10:-8]) + good[-8:],
    }[how]
    path = tmp_path / "trace.jsonl.gz"
    path.write_bytes(data)
    code, out = run_cli(["simulate", "--trace", str(path), "--fleet", FLEET], seconds=20)
    assert code == 2 and f"{path}: is not valid gzip data" in out, out


def test_a_gzip_bomb_stops_at_the_limit(tmp_path, run_cli):
    """300 gzip members of 1 MiB of zeros each: 300 MiB out of ~300 KiB in, past the 256 MiB limit."""
    member = zlib.compressobj(9, zlib.DEFLATED, 31)
    one = member.compress(b"\0" * (1 << 20)) + member.flush()
    path = tmp_path / "bomb.jsonl.gz"
    path.write_bytes(one * 300)
    assert path.stat().st_size < 2 << 20
    code, out = run_cli(["simulate", "--trace", str(path), "--fleet", FLEET], seconds=60)
    assert code == 2 and "expands past 256 MiB" in out, out


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "directory", "missing"])
def test_special_paths_exit_2_without_reading(tmp_path, run_cli, fifo, target):
    if target == "/dev/zero" and not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    path = {"/dev/zero": Path("/dev/zero"), "fifo": fifo, "directory": tmp_path, "missing": tmp_path / "no"}[target]
    code, out = run_cli(["simulate", "--trace", str(path), "--fleet", FLEET], seconds=10)
    assert code == 2 and str(path) in out, out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--load-scale", "1e-300"], "spans 1e+300 s of simulated time"),
        (["--load-scale", "nan"], "--load-scale must be a positive, finite number"),
        (["--load-scale", "inf"], "--load-scale must be a positive, finite number"),
        (["--duration", "inf"], "finite numbers of seconds"),
        (["--duration", "1e12"], "spans 1e+12 s of simulated time"),  # refused before reading
    ],
)
def test_the_simulated_span_is_bounded(tmp_path, run_cli, args, expected):
    """A sane trace cannot be stretched into years of simulated time either: the loop would step
    every scrape interval to the last arrival."""
    path = tmp_path / "t.jsonl"
    path.write_bytes(_jsonl(_line(timestamp=1000)))  # 1 s later, then stretched by 1e300
    code, out = run_cli(["simulate", "--trace", str(path), "--fleet", FLEET, *args], seconds=20)
    assert code == 2, out
    assert expected in out, out


def test_a_good_small_trace_still_simulates(tmp_path, run_cli):
    path = tmp_path / "t.jsonl"
    lines = [_line(timestamp=i * 250, input_length=200 + i, output_length=16) for i in range(1, 20)]
    path.write_bytes(_jsonl(*lines))
    code, out = run_cli(["simulate", "--trace", str(path), "--fleet", FLEET, "--json"], seconds=60)
    assert code == 0, out
    assert json.loads(out)[0]["summary"]["requests"] == 20
