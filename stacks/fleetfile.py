"""Reading fleet files: YAML in, a validated `Fleet` out, or errors that point at file:line:column.

Every failure (missing file, binary garbage, bad YAML, a schema or catalog error) becomes one
`FleetFileError` listing `Problem`s, so the CLI prints them and exits 2 without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_FLEET_BYTES = 1024 * 1024
MAX_EXPANDED_NODES = 100_000  # YAML aliases can make a small file expand exponentially ("billion laughs")


@dataclass(frozen=True)
class Problem:
    file: str
    path: str  # field path, e.g. regions[2].nodes.max
    message: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        field = f" {self.path}:" if self.path else ""
        return f"{where}:{field} {self.message}"


class FleetFileError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _marks(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, yaml.Mark]:
    """Map each field path (tuple of keys and indexes) to where its value starts in the file."""
    out: dict[tuple, yaml.Mark] = {prefix: node.start_mark}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            out[prefix + (key,)] = key_node.start_mark
            out.update({k: v for k, v in _marks(value_node, prefix + (key,)).items() if k != prefix + (key,)})
            out.setdefault(prefix + (key, "__value__"), value_node.start_mark)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.update(_marks(item, prefix + (i,)))
    return out


def _too_big(node: yaml.Node | None, budget: int = MAX_EXPANDED_NODES) -> bool:
    """Whether the document, with every alias expanded, has more than `budget` nodes."""
    stack = [node] if node is not None else []
    while stack:
        budget -= 1
        if budget < 0:
            return True
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.extend((k, v))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    return False


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _loc_mark(marks: dict[tuple, yaml.Mark], loc: tuple) -> yaml.Mark | None:
    # The deepest path the file has: an unknown key points at itself, a missing one at its parent.
    for n in range(len(loc), -1, -1):
        if loc[:n] in marks:
            return marks[loc[:n]]
    return None


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; see the README's fleet file reference)"
    if kind == "missing":
        return "required field is missing"
    if kind in ("enum", "literal_error") and "expected" in err.get("ctx", {}):
        return f"got {err.get('input')!r}; allowed: {err['ctx']['expected']}"
    if kind == "string_pattern_mismatch":
        return f"{err.get('input')!r} does not match the pattern {err['ctx']['pattern']}"
    return msg


def parse_fleet(text: str | bytes, file: str = "<fleet>"):
    """Validate fleet YAML text; return a `Fleet` or raise `FleetFileError`."""
    from gpufleet.stacks.catalog import CatalogError
    from gpufleet.stacks.spec import Fleet
    from pydantic import ValidationError

    if isinstance(text, bytes):
        if b"\x00" in text:
            raise FleetFileError([Problem(file, "", "is a binary file, not YAML")])
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FleetFileError([Problem(file, "", f"is not UTF-8 text (byte {exc.start})")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if _too_big(node):
            raise FleetFileError([Problem(file, "", f"expands to more than {MAX_EXPANDED_NODES} YAML nodes "
                                                    "(aliases nested too deeply?)")])
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise FleetFileError([Problem(file, "", f"is not valid YAML: {exc.problem}", line, col)]) from None
    except yaml.YAMLError as exc:
        raise FleetFileError([Problem(file, "", f"is not valid YAML: {exc}")]) from None
    except RecursionError:
        raise FleetFileError([Problem(file, "", "is nested too deeply")]) from None
    if data is None:
        raise FleetFileError([Problem(file, "", "is empty; a fleet file needs at least fleet, models and regions")])
    if not isinstance(data, dict):
        raise FleetFileError(
            [Problem(file, "", f"must be a mapping (fleet:, models:, regions:), not a {type(data).__name__}", 1, 1)]
        )
    marks = _marks(node) if node is not None else {}
    try:
        return Fleet.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            mark = _loc_mark(marks, loc)
            problems.append(
                Problem(
                    file,
                    _dotted(loc),
                    _message(err),
                    mark.line + 1 if mark else None,
                    mark.column + 1 if mark else None,
                )
            )
        raise FleetFileError(problems) from None
    except CatalogError as exc:  # raised outside a validator context
        raise FleetFileError([Problem(file, "", str(exc))]) from None


def load_fleet(path: str | Path):
    """Read and validate a fleet file."""
    path = Path(path)
    try:
        if path.is_dir():
            raise FleetFileError([Problem(str(path), "", "is a directory; give a fleet YAML file")])
        size = path.stat().st_size
        if size > MAX_FLEET_BYTES:
            raise FleetFileError([Problem(str(path), "", f"is {size} bytes; fleet files are at most 1 MiB")])
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FleetFileError([Problem(str(path), "", "no such file")]) from None
    except PermissionError:
        raise FleetFileError([Problem(str(path), "", "cannot be read (permission denied)")]) from None
    except OSError as exc:
        raise FleetFileError([Problem(str(path), "", f"cannot be read: {exc.strerror}")]) from None
    return parse_fleet(raw, str(path))
