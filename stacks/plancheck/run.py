"""One plan-check run: inputs + context -> GPU pack + checkov -> waivers -> a `Result`."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gpufleet.stacks.plancheck import policies
from gpufleet.stacks.plancheck.capacity import CapacityView, load_capacity
from gpufleet.stacks.plancheck.inputs import Inputs, load
from gpufleet.stacks.plancheck.policies import Context, Finding, severity_rank
from gpufleet.stacks.plancheck.waivers import Waiver, apply_waivers, load_waivers

if TYPE_CHECKING:
    from gpufleet.stacks.spec import Fleet


@dataclass
class Result:
    inputs: Inputs
    findings: list[Finding]
    fail_on: str
    skipped_policies: list[str] = field(default_factory=list)
    unused_waivers: list[Waiver] = field(default_factory=list)
    checkov: str = "skipped"  # "ran" | "skipped"
    seconds: float = 0.0

    @property
    def violations(self) -> list[Finding]:
        return [f for f in self.findings if not f.waived]

    @property
    def waived(self) -> list[Finding]:
        return [f for f in self.findings if f.waived]

    @property
    def failing(self) -> list[Finding]:
        limit = severity_rank(self.fail_on)
        return [f for f in self.violations if severity_rank(f.severity) >= limit]

    @property
    def passed(self) -> bool:
        return not self.failing

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in policies.SEVERITIES}
        for f in self.violations:
            out[f.severity] += 1
        return out


def check(
    paths: list[str | Path],
    *,
    fleet: Fleet | None = None,
    capacity: CapacityView | Path | None = None,
    waivers: list[Waiver] | Path | None = None,
    fail_on: str = "medium",
    run_checkov: bool = True,
    checkov_binary: str | None = None,
    today: dt.date | None = None,
) -> Result:
    """Raises InputError for unusable input and CheckovUnavailable when checkov cannot run.

    `today` is the day waiver expiries and Kubernetes support windows (GPU012) are judged on."""
    started = time.perf_counter()
    inputs = load(paths)
    if isinstance(capacity, Path):
        capacity = load_capacity(capacity)
    if isinstance(waivers, Path):
        waivers = load_waivers(waivers)
    today = today or dt.date.today()
    ctx = Context(inputs=inputs, fleet=fleet, capacity=capacity, today=today)
    findings = policies.evaluate(ctx)
    checkov_state = "skipped"
    if run_checkov:
        from gpufleet.stacks.plancheck.checkov import run_checkov as _run

        findings.extend(_run(inputs, checkov_binary))
        checkov_state = "ran"
    findings, unused = apply_waivers(findings, waivers or [], today)
    return Result(
        inputs=inputs,
        findings=findings,
        fail_on=fail_on,
        skipped_policies=policies.skipped(ctx),
        unused_waivers=unused,
        checkov=checkov_state,
        seconds=time.perf_counter() - started,
    )
