"""gpufleet plan-check: the GPU policy pack (+ checkov) over synthesized stacks or `show -json` plans.

Without --waivers, `waivers.yaml` in the working directory is used (--no-waivers: none); without
--fleet, the fleet file `gpufleet synth` recorded in the synthesized folder. The report names both.

Exit codes: 0 clean, 1 violations at or above --fail-on (or an expired waiver), 2 bad input
(a path, plan, fleet file, snapshot or waiver file that cannot be used), 3 checkov missing or broken.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer


class Format(StrEnum):
    table = "table"
    json = "json"
    sarif = "sarif"
    junit = "junit"
    markdown = "markdown"


class Severity(StrEnum):
    low = "low"
    medium = "medium"
    high = "high"
    critical = "critical"


def register(app: typer.Typer) -> None:
    @app.command("plan-check")
    def plan_check(
        paths: list[Path] = typer.Argument(
            ..., help="cdktf.out directories, cdk.tf.json files, or plans from `tofu show -json PLAN`"
        ),
        fleet_file: Path | None = typer.Option(
            None,
            "--fleet",
            help="fleet file: enables the budget (GPU006) and tag (GPU007) policies; default: the one "
            "`gpufleet synth` recorded in the synthesized folder (gpufleet.json)",
        ),
        capacity: Path | None = typer.Option(
            None,
            "--capacity",
            help="capacity snapshot (`gpufleet capacity scan --out`): quota and zone checks",
        ),
        waivers: Path | None = typer.Option(
            None,
            "--waivers",
            help="waiver file (YAML; see docs/plan-check.md); default: waivers.yaml in the working directory",
        ),
        no_waivers: bool = typer.Option(
            False, "--no-waivers", help="use no waiver file, not even waivers.yaml in the working directory"
        ),
        fmt: Format = typer.Option(Format.table, "--format", help="output format"),
        output: Path | None = typer.Option(
            None, "--output", "-o", help="write the report here instead of stdout"
        ),
        fail_on: Severity = typer.Option(
            Severity.medium, "--fail-on", help="exit 1 when a violation has this severity or higher"
        ),
        skip_checkov: bool = typer.Option(False, "--skip-checkov", help="run only the GPU policy pack"),
    ) -> None:
        """Check synthesized stacks or Terraform/OpenTofu plans against the GPU policy pack (+ checkov)."""
        from gpufleet.cli.common import (
            EXIT_BAD_INPUT,
            EXIT_ENVIRONMENT,
            EXIT_FINDINGS,
            console,
            fail,
            load_fleet_or_exit,
        )
        from gpufleet.stacks.plancheck import report
        from gpufleet.stacks.plancheck.checkov import CheckovUnavailable
        from gpufleet.stacks.plancheck.inputs import InputError
        from gpufleet.stacks.plancheck.run import Sources, check, find_waivers, recorded_fleet

        if waivers is not None and no_waivers:
            fail("--waivers and --no-waivers contradict each other: give one", EXIT_BAD_INPUT)
        waiver_file, waivers_line = find_waivers(waivers, skip=no_waivers)
        notes: list[str]
        if fleet_file is not None:
            fleet, fleet_line, notes = load_fleet_or_exit(fleet_file), f"{fleet_file} (--fleet)", []
        else:
            fleet, fleet_line, notes = recorded_fleet(list(paths))
        try:
            result = check(
                list(paths),
                fleet=fleet,
                capacity=capacity,
                waivers=waiver_file,
                fail_on=fail_on.value,
                run_checkov=not skip_checkov,
                sources=Sources(fleet=fleet_line, waivers=waivers_line, notes=notes),
            )
        except InputError as exc:
            fail(str(exc), EXIT_BAD_INPUT)
        except CheckovUnavailable as exc:
            fail(str(exc), EXIT_ENVIRONMENT)
        if fmt is Format.table:
            if output is not None:
                fail("--output needs a machine format: --format json|sarif|junit|markdown", EXIT_BAD_INPUT)
            report.print_table(result, console())
        else:
            try:
                report.write(report.render(result, fmt.value), output)
            except OSError as exc:
                fail(f"cannot write {output}: {exc.strerror or exc}", EXIT_BAD_INPUT)
            if output is not None:
                # the verdict still reaches the log when the report goes to a file
                state = "passed" if result.passed else "failed"
                console(stderr=True).print(
                    f"plan-check {state}: {len(result.violations)} violation(s), {len(result.failing)} at or "
                    f"above --fail-on {result.fail_on}; report in {output}"
                )
        if not result.passed:
            raise typer.Exit(EXIT_FINDINGS)
