"""Waivers: a reviewed, dated exception to a policy for some resources.

The file is YAML (JSON works too):

    waivers:
      - policy: GPU003                      # a policy id, or a glob such as CKV_AWS_*
        resource: "aws_eks_node_group.*"    # a glob over resource addresses
        stack: "aws-us-east-1-*"            # optional glob over stack names (default: every stack)
        reason: why this is acceptable, and who decided
        expires: 2026-06-30                 # ISO date; the waiver stops applying after this day

A waiver past its expiry no longer waives anything, and is itself a finding (policy WAIVER, severity
critical) so the check fails until someone renews or removes it: exceptions must not outlive the
decision that made them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from gpufleet.stacks.plancheck.inputs import InputError
from gpufleet.stacks.plancheck.policies import Finding

WAIVER_SHAPE = (
    "a YAML file `waivers: [{policy: GPU003, resource: 'aws_eks_node_group.*', stack: '*', "
    "reason: '...', expires: 2026-06-30}]`"
)
EXPIRED_POLICY = "WAIVER"


@dataclass(frozen=True)
class Waiver:
    index: int
    policy: str
    resource: str
    reason: str
    expires: dt.date
    stack: str = "*"
    source: str = ""

    def matches(self, finding: Finding) -> bool:
        return (
            fnmatchcase(finding.policy, self.policy)
            and fnmatchcase(finding.address, self.resource)
            and fnmatchcase(finding.stack, self.stack)
        )

    def expired(self, today: dt.date) -> bool:
        return today > self.expires

    @property
    def label(self) -> str:
        return f"{self.source}#{self.index + 1} ({self.policy} on {self.stack}:{self.resource})"


MAX_WAIVER_BYTES = 1024 * 1024


def load_waivers(path: Path) -> list[Waiver]:
    from gpufleet.stacks.readers import ReadError, decode_utf8, load_yaml, read_bytes

    try:
        text = decode_utf8(read_bytes(path, MAX_WAIVER_BYTES, "waiver file"), str(path))
        doc, node = load_yaml(text, str(path))
    except ReadError as exc:
        if exc.code == "missing":
            raise InputError(f"{path}: no such waiver file; expected {WAIVER_SHAPE}") from None
        raise InputError(f"{exc}; expected {WAIVER_SHAPE}") from None
    return parse_waivers(doc, str(path), _entry_marks(node))


def _entry_marks(node: yaml.Node | None) -> dict[int, str]:
    """waivers[i] -> "line:column" where the entry starts, for messages."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    seq = next((v for k, v in node.value if getattr(k, "value", None) == "waivers"), None)
    if not isinstance(seq, yaml.SequenceNode):
        return {}
    return {i: f"{e.start_mark.line + 1}:{e.start_mark.column + 1}" for i, e in enumerate(seq.value)}


def parse_waivers(doc: Any, source: str, marks: dict[int, str] | None = None) -> list[Waiver]:
    if doc is None:
        return []  # an empty file waives nothing
    entries = doc.get("waivers") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise InputError(f"{source}: has no `waivers` list; expected {WAIVER_SHAPE}")
    out = []
    for i, e in enumerate(entries):
        at = (marks or {}).get(i)
        where = f"{source}:{at}: waivers[{i}]" if at else f"{source}: waivers[{i}]"
        if not isinstance(e, dict):
            raise InputError(f"{where} must be a mapping; expected {WAIVER_SHAPE}")
        unknown = {str(k) for k in e} - {"policy", "resource", "stack", "reason", "expires"}
        if unknown:
            raise InputError(
                f"{where} has unknown key(s) {', '.join(sorted(unknown))}; expected {WAIVER_SHAPE}"
            )
        for key in ("policy", "resource", "reason"):
            if not isinstance(e.get(key), str) or not e[key].strip():
                raise InputError(f"{where} needs a non-empty `{key}`; expected {WAIVER_SHAPE}")
        stack = e.get("stack", "*")
        if not isinstance(stack, str):  # `stack: 5` is a slip, not the stack named "5"
            raise InputError(f"{where}.stack must be a string (a glob over stack names)")
        expires = e.get("expires")
        if isinstance(expires, str):
            text = expires
            try:
                expires = dt.date.fromisoformat(text)
            except ValueError:
                raise InputError(f"{where}.expires {text[:40]!r} is not an ISO date (YYYY-MM-DD)") from None
        if isinstance(expires, dt.datetime):
            expires = expires.date()
        if not isinstance(expires, dt.date):
            raise InputError(
                f"{where} needs `expires` as an ISO date (YYYY-MM-DD); waivers must not be forever"
            )
        out.append(
            Waiver(
                index=i,
                policy=e["policy"].strip(),
                resource=e["resource"].strip(),
                reason=e["reason"].strip(),
                expires=expires,
                stack=stack.strip() or "*",
                source=source,
            )
        )
    return out


def apply_waivers(
    findings: list[Finding], waivers: list[Waiver], today: dt.date
) -> tuple[list[Finding], list[Waiver]]:
    """Mark waived findings; add one finding per expired waiver. Returns (findings, unused waivers)."""
    used: set[int] = set()
    active = [w for w in waivers if not w.expired(today)]
    for f in findings:
        for w in active:
            if w.matches(f):
                f.waived_by = w
                used.add(id(w))
                break
    expired = [
        Finding(
            policy=EXPIRED_POLICY,
            severity="critical",
            stack="(waivers)",
            address=f"waivers[{w.index}]",
            message=(
                f"waiver {w.label} expired on {w.expires.isoformat()} (reason was: {w.reason}). Fix: fix the "
                "findings it covered, or renew it with a new expiry after review"
            ),
            source=w.source,
            title="An expired waiver fails the check",
        )
        for w in waivers
        if w.expired(today)
    ]
    unused = [w for w in active if id(w) not in used]
    return findings + expired, unused
