"""One plan-check run: inputs + context -> GPU pack + checkov -> waivers -> a `Result`.

Where the context comes from when no flag names it: the waiver file is `waivers.yaml` in the working
directory (as checkov finds `.checkov.yaml` there), and the fleet is the one `gpufleet synth` recorded
in the synthesized folder (`gpufleet.json`). Each report says which files were used.
"""

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


WAIVERS_FILE = "waivers.yaml"


@dataclass
class Sources:
    """Which fleet and waiver files a run used and why: one line each in every report, plus notes
    about what was found but not used (a recorded fleet file that is missing or changed)."""

    fleet: str = "none"
    waivers: str = "none"
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    inputs: Inputs
    findings: list[Finding]
    fail_on: str
    skipped_policies: list[str] = field(default_factory=list)
    unused_waivers: list[Waiver] = field(default_factory=list)
    checkov: str = "skipped"  # "ran" | "skipped"
    seconds: float = 0.0
    sources: Sources = field(default_factory=Sources)

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
    sources: Sources | None = None,
) -> Result:
    """Raises InputError for unusable input and CheckovUnavailable when checkov cannot run.

    `today` is the day waiver expiries and Kubernetes support windows (GPU012) are judged on.
    `sources` says where `fleet` and `waivers` came from (`find_waivers`, `recorded_fleet`); without
    it the report names what was passed."""
    started = time.perf_counter()
    inputs = load(paths)
    if isinstance(capacity, Path):
        capacity = load_capacity(capacity)
    if sources is None:
        sources = Sources(
            fleet=fleet.fleet if fleet is not None else "none",
            waivers=str(waivers) if isinstance(waivers, Path) else f"{len(waivers or [])} given",
        )
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
        sources=sources,
    )


def find_waivers(given: Path | None, *, skip: bool = False, cwd: Path | None = None) -> tuple[Path | None, str]:
    """The waiver file to use and the report's line about it: `given` (--waivers), else
    `waivers.yaml` in the working directory unless `skip` (--no-waivers), as checkov looks for its
    `.checkov.yaml` in the working directory (checkov 3.3.30, checkov/common/util/config_utils.py,
    get_default_config_paths; checkov also tries the scanned --directory and home, which plan-check
    does not: a waiver file is a reviewed part of the repository, not a personal setting)."""
    if given is not None:
        return given, f"{given} (--waivers)"
    if skip:
        return None, "none (--no-waivers)"
    found = (cwd or Path.cwd()) / WAIVERS_FILE
    if found.is_file():
        line = f"{WAIVERS_FILE} (found in the working directory; --no-waivers ignores it)"
        return (found if cwd is not None else Path(WAIVERS_FILE)), line
    return None, f"none (no --waivers, and no {WAIVERS_FILE} in the working directory)"


def recorded_fleet(paths: list[str | Path]) -> tuple[Fleet | None, str, list[str]]:
    """The fleet file the inputs were synthesized from, for a run without --fleet: (fleet, the
    report's line, notes). A record that is missing, unreadable, ambiguous, or names a file that is
    gone or no longer valid is a note, never an error: the fleet's policies are then listed as not
    checked."""
    from gpufleet.stacks.synth import FleetRecord, read_fleet_record

    records: dict[Path, FleetRecord] = {}
    notes: list[str] = []
    for folder in _synth_folders(paths):
        try:
            rec = read_fleet_record(folder)
        except ValueError as exc:
            notes.append(f"fleet record not used: {exc}")
            continue
        if rec is not None:
            records.setdefault(rec.fleet, rec)
    if not records:
        return None, "none (no --fleet, and no gpufleet.json from `gpufleet synth` beside the inputs)", notes
    if len(records) > 1:
        names = ", ".join(_shown(p) for p in sorted(records))
        notes.append(f"the inputs were synthesized from different fleet files ({names}): pass --fleet FILE")
        return None, "none (the inputs' fleet records disagree)", notes
    rec = next(iter(records.values()))
    shown, recorded_in = _shown(rec.fleet), _shown(rec.record)
    if not rec.fleet.is_file():
        notes.append(
            f"{recorded_in} says the stacks were synthesized from {shown}, which does not exist now: "
            "pass --fleet FILE"
        )
        return None, f"none ({shown}, recorded by gpufleet synth, is missing)", notes
    if rec.changed:
        notes.append(
            f"{shown} changed since the stacks were synthesized from it: the fleet policies judge the file "
            "as it is now; run `gpufleet synth` again so the stacks match it"
        )
    from gpufleet.stacks.fleetfile import FleetFileError, load_fleet

    try:
        fleet = load_fleet(rec.fleet)
    except FleetFileError as exc:
        first = exc.problems[0] if exc.problems else "invalid"
        notes.append(f"{shown}, recorded by gpufleet synth, cannot be loaded now ({first}): pass --fleet FILE")
        return None, f"none ({shown} is not a valid fleet file now)", notes
    return fleet, f"{shown} (recorded by gpufleet synth in {recorded_in})", notes


def _synth_folders(paths: list[str | Path]) -> list[Path]:
    """Synthesized folders (manifest.json) at or up to two levels above each input: cdktf.out itself,
    a stack folder in it, or a cdk.tf.json or `tofu show -json` plan inside a stack folder."""
    out: list[Path] = []
    for p in map(Path, paths):
        start = p if p.is_dir() else p.parent
        for d in (start.resolve(), *list(start.resolve().parents)[:2]):
            if (d / "manifest.json").is_file():
                if d not in out:
                    out.append(d)
                break
    return out


def _shown(path: Path) -> str:
    """A path as a person would type it here: relative to the working directory where it is below it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)
