"""checkov's generic checks, run as a subprocess, folded into the same findings as the GPU pack.

checkov pins its own dependencies, so it lives in its own virtual environment (`.venv-tools`, made by
`make setup`) and is run, never imported. Frameworks (FACTS.md section 5): `terraform_json` for
cdk.tf.json files, `terraform_plan` for `show -json` plans; the plan path is the robust one (checkov
has crashed on some cdk.tf.json). `--skip-download` keeps it from calling home: offline it would
only warn, and the severities it would fetch need a Prisma Cloud key anyway.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from gpufleet.stacks.plancheck.inputs import Inputs
from gpufleet.stacks.plancheck.policies import Finding

# checkov reports no severity without a Prisma Cloud key; its findings then count as this one.
DEFAULT_SEVERITY = "medium"
TIMEOUT_S = 900
_SEVERITY = {"LOW": "low", "MEDIUM": "medium", "HIGH": "high", "CRITICAL": "critical", "INFO": "low"}
_CLASS_PREFIX = {".aws.": "aws_", ".gcp.": "google_", ".azure.": "azurerm_", ".kubernetes.": "kubernetes_"}


class CheckovUnavailable(RuntimeError):
    """checkov is not installed, or did not run to the end; the message says what to do."""


def find_checkov(repo_root: Path | None = None) -> str | None:
    """`.venv-tools/bin/checkov` of the repository (or the current directory), else checkov on PATH."""
    candidates = []
    if repo_root is not None:
        candidates.append(repo_root / ".venv-tools" / "bin" / "checkov")
    candidates.append(Path.cwd() / ".venv-tools" / "bin" / "checkov")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("checkov")


def run_checkov(inputs: Inputs, binary: str | None = None, timeout_s: float = TIMEOUT_S) -> list[Finding]:
    exe = binary or find_checkov(Path(__file__).resolve().parents[2])
    if exe is None:
        raise CheckovUnavailable(
            "checkov is not installed: run `make setup` (it installs checkov into .venv-tools), or "
            "`pip install checkov` somewhere on PATH, or pass --skip-checkov"
        )
    by_framework: dict[str, list[Path]] = {}
    for framework, path in inputs.scan_targets:
        by_framework.setdefault(framework, []).append(path)
    stack_of = {str(Path(p).resolve()): stack for stack, info in inputs.stacks.items() for p in [info.source]}
    findings: list[Finding] = []
    for framework, files in sorted(by_framework.items()):
        report = _invoke(exe, framework, files, timeout_s)
        findings.extend(parse_report(report, stack_of))
    return findings


def _invoke(exe: str, framework: str, files: list[Path], timeout_s: float) -> Any:
    cmd = [exe, "--framework", framework, "-o", "json", "--quiet", "--compact", "--skip-download"]
    for f in files:
        cmd += ["-f", str(f)]
    env = dict(os.environ, LOG_LEVEL="ERROR")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except FileNotFoundError:
        raise CheckovUnavailable(
            f"checkov not found at {exe}; run `make setup` or pass --skip-checkov"
        ) from None
    except subprocess.TimeoutExpired:
        raise CheckovUnavailable(
            f"checkov ran longer than {timeout_s:.0f} s on {len(files)} file(s)"
        ) from None
    # checkov exits 1 when a check failed; anything else, or output that is not JSON, is a crash
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        report = None
    if proc.returncode not in (0, 1) or report is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        hint = (
            " (checkov has crashed on some cdk.tf.json: scan `tofu show -json` plans instead)"
            if (framework == "terraform_json")
            else ""
        )
        raise CheckovUnavailable(
            f"checkov ({framework}) failed with exit code {proc.returncode}{hint}:\n{tail}"
        )
    return report


def parse_report(report: Any, stack_of: dict[str, str]) -> list[Finding]:
    """checkov's `-o json` (one object per framework, or a list of them) -> findings."""
    reports = report if isinstance(report, list) else [report]
    out: list[Finding] = []
    lines_cache: dict[str, list[str]] = {}
    for rep in reports:
        if not isinstance(rep, dict):
            continue
        framework = str(rep.get("check_type", ""))
        results = rep.get("results") or {}
        for check in results.get("failed_checks") or []:
            path = str(check.get("file_abs_path") or check.get("file_path") or "")
            resolved = str(Path(path).resolve()) if path else ""
            stack = stack_of.get(resolved, Path(path).parent.name if path else "?")
            address = _address(check, framework, resolved, lines_cache)
            severity = _SEVERITY.get(str(check.get("severity") or "").upper(), DEFAULT_SEVERITY)
            guideline = check.get("guideline")
            fix = f" Guide: {guideline}" if guideline else ""
            out.append(
                Finding(
                    policy=str(check.get("check_id")),
                    severity=severity,
                    stack=stack,
                    address=address,
                    message=f"{check.get('check_name', 'checkov check failed')}.{fix}",
                    source=path,
                    origin="checkov",
                    title=str(check.get("check_name", "")),
                    details={"check_class": check.get("check_class"), "lines": check.get("file_line_range")},
                )
            )
    return out


def _address(check: dict[str, Any], framework: str, path: str, cache: dict[str, list[str]]) -> str:
    """A Terraform address. Plans give it; for terraform_json checkov says only `resource.<name>`."""
    resource = str(check.get("resource_address") or check.get("resource") or "")
    if framework != "terraform_json" or not resource.startswith("resource."):
        return resource
    name = resource.removeprefix("resource.")
    if path not in cache:
        try:
            cache[path] = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError:
            cache[path] = []
    rtype = _type_at(cache[path], name, check.get("file_line_range"), str(check.get("check_class", "")))
    return f"{rtype}.{name}" if rtype else resource


def _type_at(lines: list[str], name: str, line_range: Any, check_class: str) -> str | None:
    """The resource type whose `"<name>": {` key opens at checkov's first line (pretty-printed JSON)."""
    start = line_range[0] if isinstance(line_range, list) and line_range else None
    key = re.compile(r'^(\s*)"([^"]+)":\s*\{')
    resource_indent = type_indent = name_indent = None
    current_type = None
    for lineno, line in enumerate(lines, start=1):
        m = key.match(line)
        if not m:
            continue
        indent, k = len(m.group(1)), m.group(2)
        if resource_indent is None:
            if k == "resource":
                resource_indent = indent
            continue
        if indent <= resource_indent:
            break  # past the resource section
        if type_indent is None:
            type_indent = indent
        if indent == type_indent:
            current_type = k
            continue
        if name_indent is None:
            name_indent = indent
        if indent == name_indent and k == name and current_type and (start is None or start == lineno):
            return current_type
    # not pretty-printed as expected: fall back on the check's module (...checks.resource.aws.X -> aws_*)
    for part, prefix in _CLASS_PREFIX.items():
        if part in check_class:
            return prefix + "*"
    return None
