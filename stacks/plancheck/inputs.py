"""Plan-check inputs: synthesized stacks or `show -json` plans, normalised into resource changes.

Two shapes are accepted (FACTS.md sections 4 and 5):

* a `cdktf.out` directory: `manifest.json` names each stack and its `stacks/<stack>/cdk.tf.json`;
  a single `cdk.tf.json` file (or a `stacks/<stack>/` directory holding one) works too. Nothing is
  applied yet, so every resource becomes a change with action `create`.
* a plan document from `terraform show -json PLAN` / `tofu show -json PLAN`: top-level
  `format_version` and `resource_changes[]` with `address`, `type`, `name`, `change.actions`,
  `change.before`, `change.after`, `change.after_unknown`.

Anything else raises `InputError`, whose message says what was found and what was expected; the
CLI turns it into exit 2.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

MAX_INPUT_BYTES = 512 * 1024 * 1024

EXPECTED = (
    "expected a cdktf.out directory (manifest.json + stacks/<stack>/cdk.tf.json), a cdk.tf.json file, "
    "or a plan from `terraform show -json PLAN` / `tofu show -json PLAN`"
)

# The action lists `show -json` writes (FACTS.md section 5); `forget` is Terraform >= 1.7.
KNOWN_ACTIONS = {
    ("no-op",),
    ("create",),
    ("read",),
    ("update",),
    ("delete", "create"),
    ("create", "delete"),
    ("delete",),
    ("forget",),
}


class InputError(ValueError):
    """Input that is not a synthesized stack or a plan; the message names the file and the fix."""


@dataclass(frozen=True)
class ResourceChange:
    stack: str
    address: str
    type: str
    name: str
    actions: tuple[str, ...]
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    after_unknown: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file it came from, for reports
    mode: str = "managed"

    @property
    def is_replace(self) -> bool:
        return "delete" in self.actions and "create" in self.actions

    @property
    def is_delete(self) -> bool:
        return self.actions == ("delete",)

    @property
    def is_destructive(self) -> bool:
        return "delete" in self.actions

    @property
    def is_noop(self) -> bool:
        return self.actions in (("no-op",), ("read",), ("forget",))

    @property
    def values(self) -> dict[str, Any]:
        """What the resource will look like: `after`, or `before` for a plain delete."""
        if self.after is not None:
            return self.after
        return self.before or {}

    @property
    def action_label(self) -> str:
        if self.is_replace:
            return "replace (" + " then ".join(self.actions) + ")"
        return "+".join(self.actions)


@dataclass
class StackInfo:
    """Per-stack context the resources alone do not carry (e.g. the AWS provider's region)."""

    name: str
    source: str
    kind: str  # "cdktf" or "plan"
    provider_regions: dict[str, str] = field(default_factory=dict)
    provider_default_tags: dict[str, dict[str, str]] = field(default_factory=dict)
    # plans only: each resource's configuration expressions (address without index -> attribute ->
    # {"constant_value": ...} or {"references": [...]}), to tell a literal from a computed value
    config_expressions: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Inputs:
    changes: list[ResourceChange] = field(default_factory=list)
    stacks: dict[str, StackInfo] = field(default_factory=dict)
    # what checkov should scan: (framework, file) pairs
    scan_targets: list[tuple[str, Path]] = field(default_factory=list)

    def extend(self, other: Inputs) -> None:
        for name in other.stacks:
            if name in self.stacks:
                raise InputError(
                    f"stack {name!r} is given twice ({self.stacks[name].source} and "
                    f"{other.stacks[name].source}); "
                    "give each stack or plan once"
                )
        self.changes.extend(other.changes)
        self.stacks.update(other.stacks)
        self.scan_targets.extend(other.scan_targets)


# ---------------------------------------------------------------------------------------------
# reading files


def _read_json(path: Path) -> Any:
    from gpufleet.stacks.readers import ReadError, decode_utf8, parse_json, read_bytes

    try:
        raw = read_bytes(path, MAX_INPUT_BYTES, "plan JSON or cdk.tf.json")
    except ReadError as exc:
        if exc.code == "missing":
            raise InputError(f"{path}: no such file or directory; {EXPECTED}") from None
        raise InputError(str(exc)) from None
    if not raw:
        raise InputError(f"{path}: is empty; {EXPECTED}")
    if not raw.strip():
        raise InputError(f"{path}: holds only whitespace; {EXPECTED}")
    try:
        text = decode_utf8(raw, str(path))
    except ReadError as exc:
        raise InputError(f"{exc} (a binary plan file? run `tofu show -json` on it)") from None
    try:
        return parse_json(text, str(path))
    except ReadError as exc:
        if exc.code != "syntax":
            raise InputError(str(exc)) from None
        hint = ""
        if raw[:2] == b"PK":  # the binary plan `terraform plan -out` writes is a zip archive
            hint = " It looks like a binary plan file: convert it with `tofu show -json PLAN > plan.json`."
        raise InputError(f"{exc}.{hint} {EXPECTED}") from None


def load(paths: Iterable[str | Path]) -> Inputs:
    """Read every path and merge them into one normalised list of resource changes."""
    out = Inputs()
    given = list(paths)
    if not given:
        raise InputError(f"no input given; {EXPECTED}")
    for p in given:
        out.extend(load_one(Path(p)))
    return out


def load_one(path: Path) -> Inputs:
    if path.is_dir():
        return _load_directory(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory; {EXPECTED}")
    doc = _read_json(path)
    return parse_document(doc, path)


def _load_directory(path: Path) -> Inputs:
    manifest = path / "manifest.json"
    if manifest.is_file():
        return _load_manifest(path, manifest)
    single = path / "cdk.tf.json"
    if single.is_file():  # a cdktf.out/stacks/<stack> directory
        return parse_document(_read_json(single), single, stack=path.name)
    found = sorted(path.glob("stacks/*/cdk.tf.json"))
    if found:  # a cdktf.out without its manifest still has a clear layout
        out = Inputs()
        for f in found:
            out.extend(parse_document(_read_json(f), f, stack=f.parent.name))
        return out
    raise InputError(f"{path}: is a directory without manifest.json or stacks/*/cdk.tf.json; {EXPECTED}")


def _load_manifest(root: Path, manifest: Path) -> Inputs:
    doc = _read_json(manifest)
    stacks = doc.get("stacks") if isinstance(doc, dict) else None
    if not isinstance(stacks, dict):
        raise InputError(
            f"{manifest}: has no `stacks` mapping; expected the manifest.json that `cdktn synth` writes "
            '({"version": ..., "stacks": {"<name>": {"synthesizedStackPath": ...}}})'
        )
    if not stacks:
        raise InputError(f"{manifest}: lists no stacks; synthesize the fleet first (`gpufleet synth FLEET`)")
    out = Inputs()
    for name, entry in stacks.items():
        rel = entry.get("synthesizedStackPath") if isinstance(entry, dict) else None
        if not isinstance(rel, str):
            raise InputError(f"{manifest}: stack {name!r} has no synthesizedStackPath")
        stack_file = (root / rel).resolve()
        if not stack_file.is_relative_to(root.resolve()):
            raise InputError(f"{manifest}: stack {name!r} points outside the directory ({rel})")
        if not stack_file.is_file():
            raise InputError(
                f"{manifest}: stack {name!r} names {rel}, which does not exist; synthesize again"
            )
        label = entry.get("name", name)
        if not isinstance(label, str):
            raise InputError(f"{manifest}: stack {name!r} has a name that is not a string")
        out.extend(parse_document(_read_json(stack_file), root / rel, stack=label))
    return out


def parse_document(doc: Any, path: Path, stack: str | None = None) -> Inputs:
    """Recognise the document's shape and normalise it."""
    if not isinstance(doc, dict):
        raise InputError(f"{path}: is a JSON {type(doc).__name__}, not an object; {EXPECTED}")
    if "resource_changes" in doc or ("format_version" in doc and "planned_values" in doc):
        return _parse_plan(doc, path, stack or _stack_from_filename(path))
    if "format_version" in doc and "values" in doc:
        raise InputError(
            f"{path}: is `show -json` of a STATE, not of a plan; run `tofu plan -out plan` then `tofu show "
            "-json plan`"
        )
    if "resource" in doc or "terraform" in doc or "//" in doc:
        return _parse_cdktf(doc, path, stack or _stack_from_filename(path))
    keys = ", ".join(sorted(doc)[:6]) or "none"
    raise InputError(f"{path}: is JSON of another shape (top-level keys: {keys}); {EXPECTED}")


def _stack_from_filename(path: Path) -> str:
    # cdktf.out/stacks/<stack>/cdk.tf.json -> <stack>; aws-us-east-1-cluster.json -> aws-us-east-1-cluster
    if path.name == "cdk.tf.json":
        return path.parent.name
    name = path.name
    for suffix in (".json", ".tfplan", ".plan"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name or path.name


# ---------------------------------------------------------------------------------------------
# cdk.tf.json


def _parse_cdktf(doc: dict[str, Any], path: Path, stack: str) -> Inputs:
    resources = doc.get("resource", {})
    if not isinstance(resources, dict):
        raise InputError(f"{path}: `resource` must map resource types to named resources; {EXPECTED}")
    info = StackInfo(name=stack, source=str(path), kind="cdktf")
    _provider_context(doc.get("provider", {}), info, path)
    changes: list[ResourceChange] = []
    for rtype, named in resources.items():
        if not isinstance(named, dict):
            raise InputError(f"{path}: resource.{rtype} must map names to resource bodies")
        for name, body in named.items():
            if not isinstance(body, dict):
                raise InputError(f"{path}: resource.{rtype}.{name} must be an object")
            after = {k: v for k, v in body.items() if k != "//"}
            changes.append(
                ResourceChange(
                    stack=stack,
                    address=f"{rtype}.{name}",
                    type=rtype,
                    name=name,
                    actions=("create",),
                    before=None,
                    after=after,
                    source=str(path),
                )
            )
    return Inputs(changes=changes, stacks={stack: info}, scan_targets=[("terraform_json", path)])


def _provider_context(providers: Any, info: StackInfo, path: Path) -> None:
    if not isinstance(providers, dict):
        raise InputError(f"{path}: `provider` must be an object")
    for pname, configs in providers.items():
        # cdktf writes a list per provider (aliases); plain Terraform JSON may write one object
        for cfg in configs if isinstance(configs, list) else [configs]:
            if not isinstance(cfg, dict) or cfg.get("alias"):
                continue
            region = cfg.get("region")
            if isinstance(region, str):
                info.provider_regions[pname] = region
            tags = _default_tags(cfg)
            if tags:
                info.provider_default_tags[pname] = tags


def _default_tags(cfg: dict[str, Any]) -> dict[str, str]:
    """The AWS provider's default_tags.tags, or the google provider's default_labels."""
    out: dict[str, str] = {}
    for block in blocks(cfg.get("default_tags")):
        tags = block.get("tags")
        if isinstance(tags, dict):
            out.update({str(k): str(v) for k, v in tags.items()})
    labels = cfg.get("default_labels")
    if isinstance(labels, dict):
        out.update({str(k): str(v) for k, v in labels.items()})
    return out


# ---------------------------------------------------------------------------------------------
# show -json plans


def _parse_plan(doc: dict[str, Any], path: Path, stack: str) -> Inputs:
    rcs = doc.get("resource_changes", [])
    if not isinstance(rcs, list):
        raise InputError(f"{path}: `resource_changes` must be a list (the `show -json` plan format)")
    info = StackInfo(name=stack, source=str(path), kind="plan")
    _plan_provider_context(doc, info)
    config = doc.get("configuration")
    if isinstance(config, dict):
        _plan_expressions(config.get("root_module"), "", info.config_expressions)
    changes: list[ResourceChange] = []
    for i, rc in enumerate(rcs):
        where = f"{path}: resource_changes[{i}]"
        if not isinstance(rc, dict):
            raise InputError(f"{where} must be an object")
        missing = [k for k in ("address", "type", "change") if k not in rc]
        if missing:
            raise InputError(f"{where} lacks {', '.join(missing)}; not a `show -json` plan")
        for key in ("address", "type", "name", "mode"):
            if key in rc and not isinstance(rc[key], str):
                raise InputError(f"{where}.{key} must be a string, not {json.dumps(rc[key])[:60]}")
        change = rc["change"]
        if not isinstance(change, dict) or not isinstance(change.get("actions"), list):
            raise InputError(f'{where}.change.actions must be a list such as ["create"]')
        actions = tuple(str(a) for a in change["actions"])
        if actions not in KNOWN_ACTIONS:
            raise InputError(
                f"{where}.change.actions is {list(actions)}; expected one of "
                + ", ".join(json.dumps(list(a)) for a in sorted(KNOWN_ACTIONS))
            )
        before, after = change.get("before"), change.get("after")
        for label, value in (("before", before), ("after", after)):
            if value is not None and not isinstance(value, dict):
                raise InputError(f"{where}.change.{label} must be an object or null")
        unknown = change.get("after_unknown")
        changes.append(
            ResourceChange(
                stack=stack,
                address=rc["address"],
                type=rc["type"],
                name=rc.get("name", ""),
                actions=actions,
                before=before,
                after=after,
                after_unknown=unknown if isinstance(unknown, dict) else {},
                source=str(path),
                mode=rc.get("mode", "managed"),
            )
        )
    return Inputs(changes=changes, stacks={stack: info}, scan_targets=[("terraform_plan", path)])


def _plan_provider_context(doc: dict[str, Any], info: StackInfo) -> None:
    config = doc.get("configuration")
    providers = config.get("provider_config") if isinstance(config, dict) else None
    if not isinstance(providers, dict):
        return
    for key, cfg in providers.items():
        if not isinstance(cfg, dict) or cfg.get("alias"):
            continue
        expressions = cfg.get("expressions")
        region = expressions.get("region") if isinstance(expressions, dict) else None
        region = region.get("constant_value") if isinstance(region, dict) else None
        if isinstance(region, str):
            info.provider_regions[str(cfg.get("name", key))] = region


def _plan_expressions(module: Any, prefix: str, out: dict[str, dict[str, Any]]) -> None:
    if not isinstance(module, dict):
        return
    resources = module.get("resources")
    for r in resources if isinstance(resources, list) else []:
        if isinstance(r, dict) and isinstance(r.get("address"), str) and isinstance(r.get("expressions"), dict):
            out[prefix + r["address"]] = r["expressions"]
    calls = module.get("module_calls")
    for name, call in calls.items() if isinstance(calls, dict) else []:
        if isinstance(call, dict):  # nesting is bounded: the reader refuses JSON past MAX_DEPTH
            _plan_expressions(call.get("module"), f"{prefix}module.{name}.", out)


def config_address(address: str) -> str:
    """module.a["x"].google_kms_key_ring.r[0] -> module.a.google_kms_key_ring.r (the configuration's)."""
    return re.sub(r"\[[^\]]*\]", "", address)


# ---------------------------------------------------------------------------------------------
# value helpers shared by the policies


def blocks(value: Any) -> list[dict[str, Any]]:
    """A nested block as a list of objects.

    cdk.tf.json writes single nested blocks as an object and repeated ones as a list; plans always
    write lists. Either way the policies see a list.
    """
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []


def first(value: Any) -> dict[str, Any]:
    found = blocks(value)
    return found[0] if found else {}


_D = TypeVar("_D")


def text_or(value: Any, default: _D) -> str | _D:
    """The value if it is a string, else the default (plan values are untyped JSON)."""
    return value if isinstance(value, str) else default


def dig(value: Any, *keys: str) -> Any:
    """Follow keys through objects and single-element block lists; None where a step is missing."""
    for key in keys:
        node = first(value) if isinstance(value, list) else value
        if not isinstance(node, dict):
            return None
        value = node.get(key)
    return value
