"""gpufleet validate: check a fleet file and print what it describes."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from gpufleet.cli.common import DEFAULT_FLEET, EXIT_BAD_INPUT, console, error, fail, load_fleet_or_exit


def fleet_summary(fleet) -> list[dict]:
    """One row per region: what it runs, how many GPUs at max, what that costs."""
    rows = []
    for r in fleet.regions:
        model = fleet.model_for(r)
        it = r.instance(model.tensor_parallel_size)
        cost = fleet.cost_per_hour_at_max(r)
        rows.append(
            {
                "region": r.key,
                "cloud": r.cloud.value,
                "location": r.region,
                "gpu": r.gpu,
                "instance_type": it.name,
                "gpus_per_node": it.gpus,
                "nodes_min": r.nodes.min,
                "nodes_max": r.nodes.max,
                "gpus_at_max": fleet.gpus_at_max(r),
                "tier": r.capacity.tier.value,
                "residency": r.residency,
                "model": model.name,
                "usd_per_hour_at_max": cost,
            }
        )
    return rows


def register(app: typer.Typer) -> None:
    @app.command()
    def validate(
        fleet_file: Path = typer.Argument(DEFAULT_FLEET, help="fleet file to check"),
        capacity: Path | None = typer.Option(
            None, "--capacity", help="capacity snapshot (from `gpufleet capacity scan`) to check quotas against"
        ),
        as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    ) -> None:
        """Validate a fleet file: schema, catalog (GPU types, instance types, models) and consistency."""
        fleet = load_fleet_or_exit(fleet_file)
        rows = fleet_summary(fleet)
        warnings: list[str] = []
        if capacity is not None:
            from gpufleet.stacks.capacity_check import SnapshotError, check_fleet_against_snapshot

            try:
                warnings = check_fleet_against_snapshot(fleet, capacity)
            except SnapshotError as exc:
                fail(str(exc), EXIT_BAD_INPUT)
        total_cost = sum(r["usd_per_hour_at_max"] or 0 for r in rows)
        unpriced = [r["region"] for r in rows if r["usd_per_hour_at_max"] is None]
        budget = fleet.settings.budget_per_hour
        if budget is not None and total_cost > budget:
            warnings.append(f"cost at max nodes ${total_cost:,.2f}/h exceeds budget_per_hour ${budget:,.2f}")
        if unpriced:
            warnings.append(f"no catalog price for {', '.join(unpriced)}; their cost is not counted")
        if as_json:
            doc = {"fleet": fleet.fleet, "regions": rows, "usd_per_hour_at_max": total_cost, "warnings": warnings}
            typer.echo(json.dumps(doc, indent=2))
            return
        from rich.markup import escape
        from rich.table import Table

        out = console()
        models = escape(", ".join(m.name for m in fleet.models))
        table = Table(title=f"fleet {fleet.fleet}: {len(rows)} regions, models {models}")
        for col in ("region", "gpu", "instance", "nodes", "GPUs at max", "tier", "residency", "$/h at max"):
            # fold, not "…": a name cut short is worse than one on two lines
            table.add_column(
                col, justify="right" if col in ("nodes", "GPUs at max", "$/h at max") else "left", overflow="fold"
            )
        for r in rows:
            cost = "-" if r["usd_per_hour_at_max"] is None else f"{r['usd_per_hour_at_max']:,.2f}"
            table.add_row(
                r["region"],
                r["gpu"],
                f"{r['instance_type']} ({r['gpus_per_node']})",
                f"{r['nodes_min']}..{r['nodes_max']}",
                str(r["gpus_at_max"]),
                r["tier"],
                r["residency"] or "-",
                cost,
            )
        table.add_section()
        table.add_row("total", "", "", "", str(sum(r["gpus_at_max"] for r in rows)), "", "", f"{total_cost:,.2f}")
        out.print(table)
        for w in warnings:
            error(out, w, "warning", "yellow")
        out.print(f"[green]ok[/] {escape(str(fleet_file))} is a valid fleet file")
