"""Reading fleet files: YAML in, a validated `Fleet` out, or errors that point at file:line:column.

Every failure (missing file, a device or FIFO, binary garbage, bad YAML, duplicate keys, a tag such as
`!!binary`, a schema or catalog error) becomes one `FleetFileError` listing `Problem`s, so the CLI
prints them and exits 2 without a traceback. The reading itself is `gpufleet.stacks.readers`'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from gpufleet.stacks.readers import ReadError, decode_utf8, dotted, load_yaml, read_bytes, schema_message

MAX_FLEET_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Problem:
    file: str
    path: str  # field path, e.g. regions[2].nodes.max
    message: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    @staticmethod
    def of(exc: ReadError) -> Problem:
        return Problem(exc.file, "", exc.message, exc.line, exc.column)

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


def _loc_mark(marks: dict[tuple, yaml.Mark], loc: tuple) -> yaml.Mark | None:
    # The deepest path the file has: an unknown key points at itself, a missing one at its parent.
    for n in range(len(loc), -1, -1):
        if loc[:n] in marks:
            return marks[loc[:n]]
    return None


def parse_fleet(text: str | bytes, file: str = "<fleet>"):
    """Validate fleet YAML text; return a `Fleet` or raise `FleetFileError`."""
    from gpufleet.stacks.catalog import CatalogError
    from gpufleet.stacks.spec import Fleet
    from pydantic import ValidationError

    if isinstance(text, bytes):
        if b"\x00" in text:
            raise FleetFileError([Problem(file, "", "is a binary file, not YAML")])
        try:
            text = decode_utf8(text, file)
        except ReadError as exc:
            raise FleetFileError([Problem.of(exc)]) from None
    try:
        data, node = load_yaml(text, file)
    except ReadError as exc:
        raise FleetFileError([Problem.of(exc)]) from None
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
                    dotted(loc),
                    schema_message(err, "check the spelling; see the README's fleet file reference"),
                    mark.line + 1 if mark else None,
                    mark.column + 1 if mark else None,
                )
            )
        raise FleetFileError(problems) from None
    except CatalogError as exc:  # raised outside a validator context
        raise FleetFileError([Problem(file, "", str(exc))]) from None


def load_fleet(path: str | Path):
    """Read and validate a fleet file."""
    try:
        raw = read_bytes(path, MAX_FLEET_BYTES, "fleet YAML file")
    except ReadError as exc:
        raise FleetFileError([Problem.of(exc)]) from None
    return parse_fleet(raw, str(path))
