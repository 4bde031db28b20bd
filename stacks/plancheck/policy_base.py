"""The policy pack's machinery: `Policy`, `Finding`, the run `Context`, the registry and `evaluate`.

The policies themselves live in the `policy_*` modules, one per theme, and register themselves with
`@policy`; `policies` imports them all and is the public face (`from ...plancheck.policies import
POLICIES, evaluate`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpufleet.stacks.plancheck.capacity import CapacityView
from gpufleet.stacks.plancheck.inputs import Inputs, ResourceChange
from gpufleet.stacks.plancheck.pools import GpuPool, Topology
from gpufleet.stacks.plancheck.regions import Regions

if TYPE_CHECKING:
    from gpufleet.stacks.spec import Fleet

SEVERITIES = ("low", "medium", "high", "critical")


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


@dataclass(frozen=True)
class Policy:
    id: str
    title: str
    severity: str
    rationale: str
    fix: str
    needs: str | None = None  # "fleet" or "capacity" where the policy needs more than the plan
    # the fix as a finding of one cloud gets it, where the attributes differ per cloud (aws, gcp, azure)
    fix_by_cloud: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass
class Finding:
    policy: str
    severity: str
    stack: str
    address: str
    message: str  # what is wrong and how to fix it
    source: str = ""  # input file
    origin: str = "gpufleet"  # or "checkov"
    title: str = ""
    waived_by: Any = None  # a waivers.Waiver
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def waived(self) -> bool:
        return self.waived_by is not None


@dataclass
class Context:
    inputs: Inputs
    fleet: Fleet | None = None
    capacity: CapacityView | None = None
    today: dt.date = field(default_factory=dt.date.today)  # the day support windows are judged on
    topology: Topology = field(init=False)
    regions: Regions = field(init=False)  # stacks grouped by region key (<key>-cluster/-addons/-serving)
    notes: list[str] = field(init=False, default_factory=list)  # what policies could not check

    def __post_init__(self) -> None:
        self.topology = Topology(self.inputs, _fleet_stack_regions(self.fleet, self.inputs))
        self.regions = Regions(self.inputs)

    def not_checked(self, note: str) -> None:
        """Record what a policy skipped for lack of input (the report lists it)."""
        if note not in self.notes:
            self.notes.append(note)


def _fleet_stack_regions(fleet: Fleet | None, inputs: Inputs) -> dict[str, tuple[str, str]]:
    """Stack name -> (cloud, region) for stacks named after a fleet region (<cloud>-<region>-cluster)."""
    if fleet is None:
        return {}
    out = {}
    for stack in inputs.stacks:
        for r in fleet.regions:
            if stack == r.key or stack.startswith(r.key + "-"):
                out[stack] = (r.cloud.value, r.region)
    return out


PolicyCheck = Callable[[Context], Iterator[Finding]]
POLICIES: dict[str, Policy] = {}
_CHECKS: dict[str, PolicyCheck] = {}


def policy(p: Policy) -> Callable[[PolicyCheck], PolicyCheck]:
    def register(fn: PolicyCheck) -> PolicyCheck:
        POLICIES[p.id] = p
        _CHECKS[p.id] = fn
        return fn

    return register


def finding(
    pid: str,
    rc: ResourceChange,
    problem: str,
    severity: str | None = None,
    fix: str | None = None,
    cloud: str | None = None,
    **details: Any,
) -> Finding:
    p = POLICIES[pid]
    if fix is None and cloud in p.fix_by_cloud:
        fix = p.fix_by_cloud[cloud]
    return Finding(
        policy=pid,
        severity=severity or p.severity,
        stack=rc.stack,
        address=rc.address,
        message=f"{problem}. Fix: {fix or p.fix}",
        source=rc.source,
        title=p.title,
        details=details,
    )


def live_pools(pools: list[GpuPool]) -> list[GpuPool]:
    """Pools that exist after the change (a plain delete leaves nothing to check)."""
    return [p for p in pools if not p.change.is_delete and p.change.actions != ("forget",)]


def where(pool: GpuPool) -> str:
    return f"{pool.cloud} {pool.region or '(region unknown)'}"


def evaluate(ctx: Context, only: set[str] | None = None) -> list[Finding]:
    """Every policy's findings, in policy order."""
    out: list[Finding] = []
    for pid, check in sorted(_CHECKS.items()):
        if only is None or pid in only:
            out.extend(check(ctx))
    return out


def skipped(ctx: Context) -> list[str]:
    """Policies that could not run for lack of context, with what would enable them."""
    notes = []
    if ctx.fleet is None:
        notes.append("GPU006 (budget) and GPU007 (tags) need --fleet FILE")
    elif ctx.fleet.settings.budget_per_hour is None:
        notes.append("GPU006 (budget): the fleet file sets no settings.budget_per_hour")
    if ctx.capacity is None:
        notes.append("GPU004 (quota) and the zone part of GPU005 need --capacity SNAPSHOT")
    return notes + ctx.notes
