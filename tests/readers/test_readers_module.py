"""The shared reading rules (gpufleet.stacks.readers) on their own: what every file reader refuses."""

from __future__ import annotations

import gzip
import os

import pytest
from gpufleet.stacks.readers import (
    MAX_DEPTH,
    ReadError,
    gunzip,
    json_position,
    load_yaml,
    parse_json,
    read_bytes,
)

# ---- opening files


def test_a_character_device_is_refused_before_reading(bounded):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    with bounded(5), pytest.raises(ReadError, match="character device"):
        read_bytes("/dev/zero", 1024)


def test_a_fifo_without_a_writer_is_refused_at_once(fifo, bounded):
    with bounded(5), pytest.raises(ReadError, match="FIFO"):
        read_bytes(fifo, 1024)


def test_directory_missing_and_too_big(tmp_path):
    with pytest.raises(ReadError, match="a directory") as exc:
        read_bytes(tmp_path, 1024)
    assert exc.value.file == str(tmp_path)
    with pytest.raises(ReadError, match="no such file") as exc:
        read_bytes(tmp_path / "nope", 1024)
    assert exc.value.code == "missing"
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2049)
    with pytest.raises(ReadError, match="2 KiB"):
        read_bytes(big, 2048)
    assert read_bytes(big, 4096) == b"x" * 2049


# ---- gzip


def test_corrupt_and_truncated_gzip_are_refused():
    good = gzip.compress(b"hello\n" * 100)
    for bad in (good[:-9], good[:12], good[:10] + b"\xff" * 40, b"\x1f\x8b" + b"\x00" * 30):
        with pytest.raises(ReadError, match="not valid gzip"):
            gunzip(bad, "t.gz", 1 << 20)
    assert gunzip(good, "t.gz", 1 << 20) == b"hello\n" * 100


def test_a_gzip_bomb_stops_at_the_limit():
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 200_000
    with pytest.raises(ReadError, match="expands past 1 MiB"):
        gunzip(bomb, "bomb.gz", 1 << 20)


# ---- JSON


@pytest.mark.parametrize(
    ("text", "message", "line", "column"),
    [
        ('{"a": 1,\n "b": {"c": 2,\n   "c": 3}}', 'duplicate key "c"', 3, 4),
        ('{"a": 1, "a": 1}', 'duplicate key "a"', 1, 10),
        ('{"price": NaN}', "not finite", 1, 11),
        ('[1,\n -Infinity]', "not finite", 2, 2),
        ('{"t": 1e400}', "not finite", 1, 7),
        ('{"a": [1, 2}', "is not JSON", 1, 12),
    ],
)
def test_json_refusals_name_the_place(text, message, line, column):
    with pytest.raises(ReadError, match=message) as exc:
        parse_json(text, "doc.json")
    assert (exc.value.line, exc.value.column) == (line, column), str(exc.value)
    assert str(exc.value).startswith(f"doc.json:{line}:{column}: ")


def test_json_depth_limit_both_below_and_past_the_recursion_limit():
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_json(ok, "d.json") is not None
    for depth in (MAX_DEPTH + 1, 100_000):
        with pytest.raises(ReadError, match=f"more than {MAX_DEPTH} levels") as exc:
            parse_json("[" * depth + "]" * depth, "d.json")
        assert exc.value.line == 1 and exc.value.column == MAX_DEPTH + 1


def test_json_lines_number_from_their_line():
    with pytest.raises(ReadError) as exc:
        parse_json('{"a": 1, "a": 2}', "t.jsonl", first_line=7)
    assert (exc.value.line, exc.value.column) == (7, 10)


def test_json_position_of_a_schema_path():
    text = '{"regions": [\n  {"cloud": "aws"},\n  {"offers": [{"price": "3.5"}]}\n]}'
    assert json_position(text, ("regions", 1, "offers", 0, "price")) == (3, 25)
    assert json_position(text, ("regions", 1, "missing")) == (3, 3)  # its deepest parent


def test_a_huge_integer_is_refused_cleanly():
    with pytest.raises(ReadError, match="not usable JSON"):
        parse_json('{"n": ' + "9" * 5000 + "}", "n.json")


# ---- YAML


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("a: 1\nb:\n  c: 2\n  c: 3\n", "duplicate key 'c' (first at line 3)", 4),
        ("gpu: H100\ngpu: L4\n", "duplicate key 'gpu'", 2),
        ("a: !!binary aGVsbG8=\n", "the tag !!binary is not allowed", 1),
        ("a: !!python/object/apply:os.system [ls]\n", "!!python/object/apply:os.system is not allowed", 1),
        ("a: !!set {x, y}\n", "!!set is not allowed", 1),
        ("a: !Ref thing\n", "!Ref is not allowed", 1),
        ("%TAG !e! tag:yaml.org,2002:\n---\na: !e!binary aGk=\n", "!!binary is not allowed", 3),
        ("expires: 2026-13-45\n", "cannot read the value '2026-13-45'", 1),
        ("a: [1,\n  2\n", "is not valid YAML", None),
        ("a: \x07\n", "control character #x0007", 1),
    ],
)
def test_yaml_refusals_name_the_line(text, message, line):
    with pytest.raises(ReadError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        load_yaml(text, "f.yaml")
    if line is not None:
        assert exc.value.line == line, str(exc.value)


def test_plain_yaml_still_reads():
    text = (
        "max_model_len: 32768\nratio: 0.5\non: true\nnothing: null\ntags: {cost-center: '4711'}\n"
        "s: !!str 12\nexpires: 2026-06-30\nbase: &b {x: 1}\nmerged: {<<: *b, x: 2}\n"
    )
    data, node = load_yaml(text, "f.yaml")
    assert data["max_model_len"] == 32768 and data["tags"] == {"cost-center": "4711"} and data["s"] == "12"
    assert data["merged"] == {"x": 2}  # a merge then an override is not a duplicate
    assert node is not None


def test_yaml_depth_and_alias_expansion_are_bounded():
    with pytest.raises(ReadError, match=f"more than {MAX_DEPTH} levels"):
        load_yaml("[" * 100_000 + "]" * 100_000, "deep.yaml")
    chain = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 80))
    with pytest.raises(ReadError, match="through aliases"):
        load_yaml(chain, "chain.yaml")
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True)
    )
    with pytest.raises(ReadError, match="expands to more than"):
        load_yaml(laughs, "laughs.yaml")
    with pytest.raises(ReadError):
        load_yaml("a: &a [*a]\n", "self.yaml")
