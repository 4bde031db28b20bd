"""gpufleet synth: the fleet file to Terraform JSON, one stack per (cloud, region), into cdktf.out/.

cdktf.out/gpufleet.json records which fleet file that was, for `gpufleet plan-check` without --fleet.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from gpufleet.cli.common import (
    DEFAULT_FLEET,
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    console,
    fail,
    load_fleet_or_exit,
    need_extra,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def synth(
        fleet_file: Path = typer.Argument(DEFAULT_FLEET, help="fleet file to synthesize"),
        out: Path = typer.Option(
            Path("cdktf.out"), "--out", "-o", help="output folder (what `cdktn synth` writes)"
        ),
        as_json: bool = typer.Option(False, "--json", help="print the stacks and resource counts as JSON"),
        image: str | None = typer.Option(
            None,
            "--image",
            help="serving image the clusters pull (registry path, digest recommended); overrides serving.image",
        ),
    ) -> None:
        """Synthesize the fleet into Terraform JSON: a cluster stack per region (and the serving stacks)."""
        fleet = load_fleet_or_exit(fleet_file)
        if out.exists() and not out.is_dir():
            fail(f"--out {out} exists and is not a folder")
        err = console(stderr=True)
        started = time.monotonic()

        def progress(message: str) -> None:
            if not as_json:
                err.print(f"[dim]{time.monotonic() - started:5.1f}s[/] {message}", markup=True)

        try:
            from gpufleet.stacks.synth import synth_fleet
        except ImportError as exc:
            need_extra("cdk", exc)
        try:
            rows = synth_fleet(fleet, out, image=image, progress=progress, fleet_path=fleet_file)
        except ImportError as exc:  # a provider package missing from the 'cdk' extra
            need_extra("cdk", exc)
        except ValueError as exc:  # a fleet the clouds cannot build, e.g. one AWS zone for EKS
            fail(f"{fleet_file}: {exc}", EXIT_BAD_INPUT)
        except OSError as exc:
            fail(f"cannot write {out}: {exc.strerror or exc}", EXIT_ENVIRONMENT)
        elapsed = time.monotonic() - started
        if as_json:
            doc = {
                "fleet": fleet.fleet,
                "outdir": str(out),
                "seconds": round(elapsed, 2),
                "stacks": [
                    {
                        "name": r.name,
                        "resources": r.resources,
                        "data_sources": r.data_sources,
                        "outputs": r.outputs,
                        "resource_types": r.resource_types,
                    }
                    for r in rows
                ],
            }
            typer.echo(json.dumps(doc, indent=2))
            return
        from rich.table import Table

        table = Table(title=f"fleet {fleet.fleet}: {len(rows)} stacks in {out}/")
        for col in ("stack", "resources", "data sources", "outputs"):
            table.add_column(col, justify="left" if col == "stack" else "right")
        for r in rows:
            table.add_row(r.name, str(r.resources), str(r.data_sources), str(r.outputs))
        table.add_section()
        table.add_row(
            "total",
            str(sum(r.resources for r in rows)),
            str(sum(r.data_sources for r in rows)),
            str(sum(r.outputs for r in rows)),
        )
        out_console = console()
        out_console.print(table)
        out_console.print(
            f"[green]ok[/] synthesized in {elapsed:.1f}s; deploy a stack with "
            f"`cd {out}/stacks/<stack> && tofu init && tofu apply` (or terraform)"
        )
