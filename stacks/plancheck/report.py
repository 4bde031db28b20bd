"""Plan-check reports: a rich table for people; JSON, SARIF 2.1.0, JUnit XML and markdown for machines.

SARIF is what GitHub code scanning ingests (github/codeql-action/upload-sarif): one rule per policy,
one result per finding, waived findings carried as suppressed results with the waiver's reason.
Markdown is for a pull-request comment or $GITHUB_STEP_SUMMARY; JUnit for CI test tabs.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from gpufleet.stacks.plancheck.policies import POLICIES, SEVERITIES, Finding, severity_rank
from gpufleet.stacks.plancheck.run import Result

FORMATS = ("table", "json", "sarif", "junit", "markdown")
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
TOOL_URI = "https://github.com/gpufleet/gpufleet/blob/main/docs/plan-check.md"
_SARIF_LEVEL = {"critical": "error", "high": "error", "medium": "warning", "low": "note"}
# GitHub ranks code-scanning alerts by this property (0.1-10); these sit inside its bands
_SECURITY_SEVERITY = {"critical": "9.5", "high": "8.0", "medium": "5.5", "low": "3.0"}


def render(result: Result, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(to_json(result), indent=2) + "\n"
    if fmt == "sarif":
        return json.dumps(to_sarif(result), indent=2) + "\n"
    if fmt == "junit":
        return to_junit(result)
    if fmt == "markdown":
        return to_markdown(result)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def _sorted(findings: list[Finding]) -> list[Finding]:
    return sorted(
        findings,
        key=lambda f: (-severity_rank(f.severity), f.origin != "gpufleet", f.policy, f.stack, f.address),
    )


def _finding_dict(f: Finding) -> dict[str, Any]:
    d: dict[str, Any] = {
        "policy": f.policy,
        "severity": f.severity,
        "origin": f.origin,
        "stack": f.stack,
        "address": f.address,
        "title": f.title,
        "message": f.message,
        "source": f.source,
    }
    if f.details:
        d["details"] = {k: v for k, v in f.details.items() if v is not None}
    if f.waived_by is not None:
        d["waiver"] = {
            "reason": f.waived_by.reason,
            "expires": f.waived_by.expires.isoformat(),
            "file": f.waived_by.source,
        }
    return d


def summary(result: Result) -> dict[str, Any]:
    return {
        "passed": result.passed,
        "fail_on": result.fail_on,
        "stacks": len(result.inputs.stacks),
        "resources": len(result.inputs.changes),
        "violations": len(result.violations),
        "failing": len(result.failing),
        "waived": len(result.waived),
        "by_severity": result.counts(),
        "checkov": result.checkov,
        "seconds": round(result.seconds, 3),
        "fleet": result.sources.fleet,
        "waivers": result.sources.waivers,
    }


def to_json(result: Result) -> dict[str, Any]:
    return {
        "summary": summary(result),
        "violations": [_finding_dict(f) for f in _sorted(result.violations)],
        "waived": [_finding_dict(f) for f in _sorted(result.waived)],
        "skipped_policies": result.skipped_policies,
        "unused_waivers": [w.label for w in result.unused_waivers],
        "notes": result.sources.notes,
        "stacks": {
            name: {"source": s.source, "kind": s.kind} for name, s in sorted(result.inputs.stacks.items())
        },
    }


# ---------------------------------------------------------------------------------------------
# SARIF


class _Lines:
    """Line numbers of resources in their files, so code scanning points at the right place."""

    def __init__(self) -> None:
        self._cache: dict[str, list[str]] = {}

    def find(self, path: str, f: Finding) -> int | None:
        if not path:
            return None
        if path not in self._cache:
            try:
                self._cache[path] = Path(path).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                self._cache[path] = []
        lines = self._cache[path]
        lines_hint = f.details.get("lines")
        if (
            isinstance(lines_hint, list)
            and lines_hint
            and isinstance(lines_hint[0], int)
            and lines_hint[0] > 0
        ):
            return lines_hint[0]
        name = f.address.rsplit(".", 1)[-1]
        # plans: the "address" line of the resource change; cdk.tf.json: the resource's key
        needles = [
            re.compile(r'"address":\s*' + re.escape(json.dumps(f.address))),
            re.compile(r"^\s*" + re.escape(json.dumps(name)) + r":\s*\{"),
        ]
        for needle in needles:
            for i, line in enumerate(lines, start=1):
                if needle.search(line):
                    return i
        return None


def _uri(path: str) -> str:
    if not path:
        return "unknown"
    p = Path(path).resolve()
    try:
        return p.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.as_uri()


def to_sarif(result: Result) -> dict[str, Any]:
    findings = _sorted(result.findings)
    rule_ids: list[str] = []
    for f in findings:
        if f.policy not in rule_ids:
            rule_ids.append(f.policy)
    for pid in POLICIES:  # every GPU rule, so a clean run still documents what was checked
        if pid not in rule_ids:
            rule_ids.append(pid)
    rules = []
    for rid in rule_ids:
        p = POLICIES.get(rid)
        example = next((f for f in findings if f.policy == rid), None)
        severity = p.severity if p else (example.severity if example else "medium")
        title = p.title if p else (example.title if example else rid)
        rule: dict[str, Any] = {
            "id": rid,
            "name": re.sub(r"[^A-Za-z0-9]", "", title.title())[:60] or rid,
            "shortDescription": {"text": title},
            "fullDescription": {"text": p.rationale if p else title},
            "help": {"text": f"Fix: {p.fix}" if p else title},
            "defaultConfiguration": {"level": _SARIF_LEVEL[severity]},
            "properties": {
                "security-severity": _SECURITY_SEVERITY[severity],
                "tags": ["gpufleet" if p or rid == "WAIVER" else "checkov", "infrastructure"],
            },
        }
        if p or rid == "WAIVER":
            rule["helpUri"] = TOOL_URI
        rules.append(rule)
    index = {rid: i for i, rid in enumerate(rule_ids)}
    lines = _Lines()
    results = []
    for f in findings:
        region = lines.find(f.source, f)
        physical: dict[str, Any] = {"artifactLocation": {"uri": _uri(f.source)}}
        if region:
            physical["region"] = {"startLine": region}
        res: dict[str, Any] = {
            "ruleId": f.policy,
            "ruleIndex": index[f.policy],
            "level": _SARIF_LEVEL[f.severity],
            "message": {"text": f"[{f.severity}] {f.stack}: {f.address}: {f.message}"},
            "locations": [
                {
                    "physicalLocation": physical,
                    "logicalLocations": [
                        {"fullyQualifiedName": f"{f.stack}/{f.address}", "kind": "resource"}
                    ],
                }
            ],
            "partialFingerprints": {"gpufleetFinding/v1": f"{f.policy}:{f.stack}:{f.address}"},
            "properties": {"severity": f.severity, "origin": f.origin, "stack": f.stack},
        }
        if f.waived_by is not None:
            res["suppressions"] = [
                {
                    "kind": "external",
                    "status": "accepted",
                    "justification": f"{f.waived_by.reason} (waiver expires {f.waived_by.expires})",
                }
            ]
        results.append(res)
    from gpufleet.stacks.plancheck import __version__

    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "gpufleet plan-check",
                        "version": __version__,
                        "informationUri": TOOL_URI,
                        "rules": rules,
                    }
                },
                "results": results,
                "invocations": [
                    {
                        "executionSuccessful": True,
                        "properties": {
                            "checkov": result.checkov,
                            "fail_on": result.fail_on,
                            "skipped_policies": result.skipped_policies,
                            "fleet": result.sources.fleet,
                            "waivers": result.sources.waivers,
                            "notes": result.sources.notes,
                        },
                    }
                ],
            }
        ],
    }


# ---------------------------------------------------------------------------------------------
# JUnit


def to_junit(result: Result) -> str:
    """One test suite per origin; a test case per failing or waived finding, and one passing case
    per GPU policy that found nothing (so the count of checks is visible)."""
    root = ET.Element("testsuites", name="gpufleet plan-check")
    for origin in ("gpufleet", "checkov"):
        findings = [f for f in _sorted(result.findings) if f.origin == origin]
        if origin == "checkov" and result.checkov != "ran":
            continue
        suite = ET.SubElement(root, "testsuite", name=f"plan-check.{origin}")
        cases = failures = skipped = 0
        for f in findings:
            case = ET.SubElement(
                suite, "testcase", classname=f"{origin}.{f.policy}", name=f"{f.stack}/{f.address}"
            )
            cases += 1
            if f.waived_by is not None:
                ET.SubElement(case, "skipped", message=f"waived: {f.waived_by.reason}")
                skipped += 1
            else:
                fail = ET.SubElement(
                    case, "failure", message=f"[{f.severity}] {f.title or f.policy}", type=f.severity
                )
                fail.text = f.message
                failures += 1
        if origin == "gpufleet":
            hit = {f.policy for f in findings}
            for pid, p in POLICIES.items():
                if pid not in hit:
                    ET.SubElement(suite, "testcase", classname=f"gpufleet.{pid}", name=p.title)
                    cases += 1
        suite.set("tests", str(cases))
        suite.set("failures", str(failures))
        suite.set("errors", "0")
        suite.set("skipped", str(skipped))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# ---------------------------------------------------------------------------------------------
# markdown


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(result: Result) -> str:
    s = summary(result)
    verdict = "passed" if result.passed else "FAILED"
    icon = ":white_check_mark:" if result.passed else ":x:"
    counts = ", ".join(f"{n} {sev}" for sev, n in reversed(list(result.counts().items())) if n) or "none"
    out = [
        f"## {icon} gpufleet plan-check {verdict}",
        "",
        f"{s['stacks']} stack(s), {s['resources']} resource(s); violations: {counts}; "
        f"{s['waived']} waived; failing at `--fail-on {result.fail_on}`: {s['failing']}; checkov "
        f"{result.checkov}.",
        "",
        f"Fleet: {_md(result.sources.fleet)}. Waivers: {_md(result.sources.waivers)}.",
        "",
    ]
    if result.violations:
        out += ["| severity | policy | stack | resource | finding |", "|---|---|---|---|---|"]
        for f in _sorted(result.violations):
            out.append(
                f"| {f.severity} | {f.policy} | {_md(f.stack)} | `{_md(f.address)}` | {_md(f.message)} |"
            )
        out.append("")
    if result.waived:
        out += [
            "<details><summary>Waived findings</summary>",
            "",
            "| policy | stack | resource | reason | expires |",
            "|---|---|---|---|---|",
        ]
        for f in _sorted(result.waived):
            w = f.waived_by
            out.append(
                f"| {f.policy} | {_md(f.stack)} | `{_md(f.address)}` | {_md(w.reason)} | {w.expires} |"
            )
        out += ["", "</details>", ""]
    for note in result.skipped_policies:
        out.append(f"- not checked: {note}")
    for w in result.unused_waivers:
        out.append(f"- unused waiver: {w.label}")
    for note in result.sources.notes:
        out.append(f"- note: {_md(note)}")
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# the table for people


def print_table(result: Result, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    style = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan"}
    if result.violations:
        table = Table(title="gpufleet plan-check", show_lines=False, expand=False)
        for col in ("severity", "policy", "stack", "resource", "finding"):
            table.add_column(col, overflow="fold")
        for f in _sorted(result.violations):
            # Addresses, messages and reasons come from the user's files: never rich markup.
            cells = (escape(f.policy), escape(f.stack), escape(f.address), escape(f.message))
            table.add_row(f"[{style[f.severity]}]{f.severity}[/]", *cells)
        console.print(table)
    if result.waived:
        console.print(f"[dim]{len(result.waived)} finding(s) waived:[/]")
        for f in _sorted(result.waived):
            console.print(
                f"[dim]  {escape(f.policy)} {escape(f.stack)} {escape(f.address)}: "
                f"{escape(f.waived_by.reason)} (until {f.waived_by.expires})[/]"
            )
    for note in result.skipped_policies:
        console.print(f"[dim]not checked: {escape(note)}[/]")
    for w in result.unused_waivers:
        console.print(f"[yellow]unused waiver:[/] {escape(w.label)}")
    for note in result.sources.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(f"fleet: {escape(result.sources.fleet)}")
    console.print(f"waivers: {escape(result.sources.waivers)}")
    counts = (
        ", ".join(f"{n} {sev}" for sev, n in reversed(list(result.counts().items())) if n) or "no violations"
    )
    verdict = "[bold green]passed[/]" if result.passed else "[bold red]failed[/]"
    console.print(
        f"{verdict}: {len(result.inputs.stacks)} stack(s), {len(result.inputs.changes)} resource(s); "
        f"{counts}; "
        f"{len(result.failing)} at or above --fail-on {result.fail_on}; checkov {result.checkov}; "
        f"{result.seconds:.2f}s"
    )


def severities_help() -> str:
    return "|".join(SEVERITIES)


def write(text: str, output: str | os.PathLike[str] | None) -> None:
    if output is None:
        import sys

        sys.stdout.write(text)
    else:
        Path(output).write_text(text, encoding="utf-8")
