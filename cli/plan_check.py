"""gpufleet plan-check: the GPU policy pack (+ checkov) over synthesized stacks or `show -json` plans.

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
            None, "--fleet", help="fleet file: enables the budget (GPU006) and tag (GPU007) policies"
        ),
        capacity: Path | None = typer.Option(
            None,
            "--capacity",
            help="capacity snapshot (`gpufleet capacity scan --out`): quota and zone checks",
        ),
        waivers: Path | None = typer.Option(
            None, "--waivers", help="waiver file (YAML; see docs/plan-check.md)"
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
        from gpufleet.stacks.plancheck.run import check

        fleet = load_fleet_or_exit(fleet_file) if fleet_file is not None else None
        try:
            result = check(
                list(paths),
                fleet=fleet,
                capacity=capacity,
                waivers=waivers,
                fail_on=fail_on.value,
                run_checkov=not skip_checkov,
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
