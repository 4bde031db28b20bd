"""Reading a user's file safely: the one bounded way every reader opens, decompresses and parses input.

The fleet file, traces, capacity snapshots, plan JSON and waiver files all come through here, so each
refuses the same things the same way, with a `ReadError` that names the file and, where the format
has them, the line and column:

* anything but a regular file (a directory, /dev/zero, a FIFO, a socket), refused before reading;
* files past a size limit, and compressed input that is corrupt or expands past a limit;
* JSON or YAML nested deeper than `MAX_DEPTH`, duplicate keys, and (JSON) NaN and Infinity;
* YAML tags other than the plain ones (`!!binary`, `!!python/...`, `!custom`), and aliases that
  expand past `MAX_YAML_NODES` nodes ("billion laughs").

Standard library and PyYAML only, so every command can import it cheaply.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import re
import stat
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

MAX_DEPTH = 64  # deeper than any real fleet file, snapshot or Terraform plan (plans nest about 15)
MAX_YAML_NODES = 100_000  # with every alias expanded

_CHUNK = 1024 * 1024


class ReadError(ValueError):
    """A file that cannot be used as given: which file, where in it (if known) and why."""

    def __init__(
        self, file: str, message: str, line: int | None = None, column: int | None = None, code: str = "invalid"
    ):
        self.file = file
        self.message = message
        self.line = line
        self.column = column
        self.code = code  # "missing" (no such file), "syntax" (not JSON/YAML at all), or "invalid"
        super().__init__(str(self))

    @property
    def where(self) -> str:
        if self.line is None:
            return self.file
        return f"{self.file}:{self.line}" + (f":{self.column}" if self.column is not None else "")

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 2**10} KiB" if n >= 2**10 else f"{n} bytes"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes.

    Devices, FIFOs and sockets are refused before a byte is read (opened non-blocking, so a FIFO
    without a writer cannot stall us), and the read stops at limit + 1 bytes whatever stat said.
    """
    name = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ReadError(name, "no such file", code="missing") from None
    except PermissionError:
        raise ReadError(name, "cannot be read (permission denied)") from None
    except OSError as exc:
        raise ReadError(name, f"cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ReadError(name, f"is {_kind(st.st_mode)}; give a {what}")
    if st.st_size > limit:
        raise ReadError(name, f"is {st.st_size} bytes, more than the {_size(limit)} a {what} may have")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except PermissionError:
        raise ReadError(name, "cannot be read (permission denied)") from None
    except OSError as exc:
        raise ReadError(name, f"cannot be read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)  # the file opened may not be the one stat saw
        if not stat.S_ISREG(st.st_mode):
            raise ReadError(name, f"is {_kind(st.st_mode)}; give a {what}")
        parts: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise ReadError(name, f"cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if got > limit:
        raise ReadError(name, f"is more than the {_size(limit)} a {what} may have")
    return b"".join(parts)


def gunzip(data: bytes, file: str, limit: int) -> bytes:
    """Decompress gzip data, refusing corrupt input and output past `limit` bytes (a gzip bomb)."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
            out = fh.read(limit + 1)  # reads in bounded steps: memory stays near the limit
    except (OSError, EOFError, zlib.error) as exc:
        raise ReadError(file, f"is not valid gzip data ({exc or type(exc).__name__})") from None
    if len(out) > limit:
        raise ReadError(file, f"expands past {_size(limit)} when decompressed; refusing it")
    return out


def position(text: str, offset: int) -> tuple[int, int]:
    """1-based (line, column) of a character offset."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def decode_utf8(data: bytes, file: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ReadError(file, f"is not UTF-8 text (byte {exc.start})", line, column) from None


# ---------------------------------------------------------------------------------------------
# JSON


class _Duplicate(Exception):
    pass


class _NotFinite(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Duplicate()
    return out


def _constant(name: str) -> Any:
    raise _NotFinite()  # NaN, Infinity, -Infinity: Python's json accepts them, JSON does not


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400
        raise _NotFinite()
    return value


# One regex pass over the text finds where a problem is; it runs only after json.loads has failed
# or the document was refused, so valid input is parsed by the C decoder alone.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\],:]|[^\s{}\[\],:"]+', re.S)


def _json_events(text: str) -> Iterator[tuple[str, tuple, int, str]]:
    """(event, path, offset, token): "value" at each value's start (path = keys and indexes to it),
    "duplicate" at a key its object already has."""
    frames: list[list] = []  # ["{", keys seen, want key] or ["[", index]
    path: list = []
    for m in _TOKEN.finditer(text):
        tok, at = m.group(), m.start()
        top = frames[-1] if frames else None
        if top is not None and top[0] == "{" and top[2] and tok[0] == '"':
            try:
                key = json.loads(tok)
            except ValueError:
                key = tok
            path[-1] = key
            if key in top[1]:
                yield "duplicate", tuple(path), at, tok
            top[1].add(key)
            top[2] = False
            continue
        if tok in ("}", "]"):
            if frames:
                frames.pop()
                path.pop()
            continue
        if tok == ",":
            if top is not None and top[0] == "[":
                top[1] += 1
                path[-1] = top[1]
            elif top is not None:
                top[2] = True
            continue
        if tok == ":":
            continue
        yield "value", tuple(path), at, tok
        if tok in ("{", "["):
            frames.append(["{", set(), True] if tok == "{" else ["[", 0])
            path.append(None if tok == "{" else 0)


def json_position(text: str, loc: tuple | list) -> tuple[int, int] | None:
    """(line, column) where the value at `loc` (keys and indexes) starts, or its deepest parent's."""
    loc = tuple(loc)
    best: tuple[int, int] | None = None
    best_len = -1
    for event, path, at, _ in _json_events(text):
        if event != "value" or len(path) <= best_len or path != loc[: len(path)]:
            continue
        best, best_len = position(text, at), len(path)
        if path == loc:
            break
    return best


def _find(text: str, want) -> tuple[int, int] | None:
    for event, path, at, tok in _json_events(text):
        if want(event, path, tok):
            return position(text, at)
    return None


def _not_finite(tok: str) -> bool:
    if tok in ("NaN", "Infinity", "-Infinity"):
        return True
    try:
        return not math.isfinite(float(tok))
    except ValueError:
        return False


def parse_json(text: str, file: str, max_depth: int = MAX_DEPTH, first_line: int = 1) -> Any:
    """Parse JSON text strictly; `first_line` numbers the lines of a document that is one line of a
    bigger file (JSON Lines)."""

    def fail(message: str, where: tuple[int, int] | None) -> ReadError:
        if where is None:
            return ReadError(file, message, first_line if first_line != 1 else None)
        line, column = where
        return ReadError(file, message, line + first_line - 1, column)

    try:
        doc = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float)
    except json.JSONDecodeError as exc:
        error = fail(f"is not JSON: {exc.msg}", (exc.lineno, exc.colno))
        error.code = "syntax"
        raise error from None
    except _Duplicate:
        found = next(((p[-1], at) for e, p, at, _ in _json_events(text) if e == "duplicate"), None)
        key, where = (json.dumps(found[0])[:80], position(text, found[1])) if found else ("", None)
        raise fail(f"duplicate key {key} (each key may appear once in an object)", where) from None
    except _NotFinite:
        where = _find(text, lambda event, path, tok: event == "value" and _not_finite(tok))
        raise fail("has a number that is not finite (NaN, Infinity or out of range)", where) from None
    except RecursionError:
        raise fail(f"is nested more than {max_depth} levels deep", _too_deep_at(text, max_depth)) from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise fail(f"is not usable JSON: {exc}", None) from None
    if _depth(doc) > max_depth:
        raise fail(f"is nested more than {max_depth} levels deep", _too_deep_at(text, max_depth))
    return doc


def _too_deep_at(text: str, max_depth: int) -> tuple[int, int] | None:
    return _find(text, lambda event, path, tok: event == "value" and len(path) >= max_depth and tok in ("{", "["))


def _depth(doc: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, [] and {} are 1), without recursion."""
    deepest = 0
    stack = [(doc, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in node)
    return deepest


# ---------------------------------------------------------------------------------------------
# schema errors (pydantic's error dicts), worded for people who wrote a file


def dotted(loc: tuple | list) -> str:
    """("regions", 2, "nodes", "max") -> regions[2].nodes.max"""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def schema_message(err: Mapping[str, Any], unknown_hint: str = "check the spelling") -> str:
    kind = err["type"]
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "extra_forbidden":
        return f"unknown key ({unknown_hint})"
    if kind == "missing":
        return "required field is missing"
    if kind in ("enum", "literal_error") and "expected" in err.get("ctx", {}):
        return f"got {err.get('input')!r}; allowed: {err['ctx']['expected']}"
    if kind == "string_pattern_mismatch":
        return f"{err.get('input')!r} does not match the pattern {err['ctx']['pattern']}"
    if kind.endswith("_type") and "input" in err:  # strict types: say what the file gave instead
        return f"{msg}, not {kind_of(err['input'])}"
    return msg


def kind_of(value: Any) -> str:
    """What a parsed value is, in the words of the file: `a boolean (true)`, `a string ('3.5')`."""
    import datetime

    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, datetime.date):
        return f"a date ({value.isoformat()})"
    for t, name in ((int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"), (dict, "a mapping")):
        if isinstance(value, t):
            small = isinstance(value, float) or (isinstance(value, int) and value.bit_length() < 100)
            shown = repr(value) if small or (isinstance(value, str) and len(value) <= 38) else ""
            return f"{name} ({shown})" if shown and len(shown) <= 40 else name
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# YAML

# The plain tags: what a YAML document resolves to without tags, and their explicit spellings.
PLAIN_TAGS = {"!"} | {
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map", "timestamp", "merge")
}


class _Refused(yaml.constructor.ConstructorError):
    """Valid YAML that a gpufleet file may not use (a tag, a duplicate key, too deep)."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: no tags beyond the plain ones, no duplicate keys, bounded
    depth, and a value the constructor cannot build (2026-13-45) is an error at its place."""

    max_depth = MAX_DEPTH

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        tag = getattr(event, "tag", None)
        if tag is not None and tag not in PLAIN_TAGS:
            shown = tag.replace("tag:yaml.org,2002:", "!!")
            raise _Refused(None, None, f"the tag {shown} is not allowed; write plain values", event.start_mark)
        if not isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        self._depth += 1  # depth counts lists and mappings, as for JSON
        try:
            if self._depth > self.max_depth:
                raise _Refused(None, None, f"is nested more than {self.max_depth} levels deep", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` then overriding a key is YAML's own idiom
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key; the base constructor says so at its place
                if first is not None:
                    line = first.start_mark.line + 1
                    problem = f"duplicate key {repr(key)[:80]} (first at line {line}); each key may appear once"
                    raise _Refused(None, None, problem, key_node.start_mark)
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date 2026-13-45, a 5,000-digit int
            value = f"the value {node.value[:80]!r}" if isinstance(node, yaml.ScalarNode) else "this value"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {value}: {str(exc)[:200]}", node.start_mark
            ) from None


def _expanded_too_big(node: yaml.Node, max_nodes: int, max_depth: int) -> str | None:
    """Why the document is too big with every alias expanded, or None."""
    budget = max_nodes
    stack = [(node, 0)]  # a node and how many lists and mappings hold it
    while stack:
        budget -= 1
        if budget < 0:
            return f"expands to more than {max_nodes} YAML nodes (aliases nested too deeply?)"
        n, d = stack.pop()
        if isinstance(n, yaml.MappingNode | yaml.SequenceNode):
            d += 1
            if d > max_depth:
                return f"is nested more than {max_depth} levels deep (through aliases)"
            children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else n.value
            stack.extend((c, d) for c in children)
    return None


def _yaml_error(file: str, text: str, exc: yaml.YAMLError) -> ReadError:
    if isinstance(exc, yaml.reader.ReaderError):  # a control character, say; the reader counts characters
        line, col = position(text, min(exc.position, len(text)))
        ch = exc.character
        shown = f"#x{ch:04x}" if isinstance(ch, int) else repr(ch)
        return ReadError(file, f"is not valid YAML: the control character {shown} is not allowed", line, col)
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        at: tuple[int | None, int | None] = (mark.line + 1, mark.column + 1) if mark else (None, None)
        what = exc.problem or exc.context or str(exc)  # PyYAML always sets one; never print "None"
        return ReadError(file, what if isinstance(exc, _Refused) else f"is not valid YAML: {what}", *at)
    return ReadError(file, f"is not valid YAML: {exc}")


def load_yaml(
    text: str, file: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_YAML_NODES
) -> tuple[Any, yaml.Node | None]:
    """(data, node) of a one-document YAML text read strictly; the node gives each value's place."""
    loader = None
    try:
        loader = _StrictLoader(text)  # the reader checks for control characters here already
        loader.max_depth = max_depth
        node = loader.get_single_node()
        if node is None:
            return None, None
        problem = _expanded_too_big(node, max_nodes, max_depth)
        if problem:
            raise ReadError(file, problem)
        return loader.construct_document(node), node
    except yaml.YAMLError as exc:
        raise _yaml_error(file, text, exc) from None
    except RecursionError:
        raise ReadError(file, f"is nested more than {max_depth} levels deep") from None
    finally:
        if loader is not None:
            loader.dispose()
