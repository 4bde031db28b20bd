"""gpufleet simulate: replay a trace through the fleet in virtual time (engine model + router policy)."""

from __future__ import annotations

from pathlib import Path

import typer
from gpufleet.cli.common import DEFAULT_FLEET, EXIT_BAD_INPUT, EXIT_INTERRUPTED, fail

POLICIES = ("headroom", "round-robin", "least-outstanding")


def _workload(trace: str, load_scale: float, start: float, duration: float | None, seed: int):
    """Items from a trace file, or from a built-in profile written `builtin:conv` / `builtin:code`."""
    from gpufleet.serving import loadgen

    if trace.startswith("builtin:"):
        return loadgen.synthetic(trace.split(":", 1)[1], duration or 3600.0, load_scale, seed)
    return loadgen.from_trace(Path(trace), load_scale=load_scale, start_s=start, duration_s=duration)


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    def simulate(
        trace: str = typer.Option(
            ...,
            "--trace",
            "-t",
            help="trace file (Azure CSV or Mooncake JSONL[.gz]), or builtin:conv / builtin:code",
        ),
        fleet: Path = typer.Option(DEFAULT_FLEET, "--fleet", "-f", help="fleet file"),
        policy: list[str] = typer.Option(
            ["headroom"],
            "--policy",
            "-p",
            help="headroom, round-robin, least-outstanding or all (repeat to compare)",
        ),
        load_scale: list[float] = typer.Option(
            [1.0], "--load-scale", "-x", help="x the trace's rate (repeat)"
        ),
        fail_at: list[str] = typer.Option(
            [], "--fail", help="REGION@SECONDS[+DURATION]: the region's engines die then (and come back)"
        ),
        start: float = typer.Option(0.0, "--start", min=0, help="start of the trace slice, trace seconds"),
        duration: float | None = typer.Option(
            None, "--duration", min=1, help="length of the slice, trace seconds"
        ),
        engines_per_region: int | None = typer.Option(
            None,
            "--engines-per-region",
            min=1,
            help="cap engines per region (default: nodes.max x GPUs / tp)",
        ),
        clients: str = typer.Option(
            "uniform", "--clients", help="arrivals over regions: uniform or capacity"
        ),
        seed: int = typer.Option(0, "--seed"),
        as_json: bool = typer.Option(False, "--json", help="print the results as JSON"),
        report_dir: Path | None = typer.Option(
            None, "--report-dir", help="write report.md, results.json, plots"
        ),
    ) -> None:
        """Replay a trace through the fleet in virtual time: TTFT/TPOT, SLO goodput, preemptions, cost."""
        policies = list(POLICIES) if "all" in policy else policy
        bad = [p for p in policies if p not in POLICIES]
        if bad:
            fail(f"--policy {bad[0]!r}: one of {', '.join(POLICIES)} or all")
        if any(x <= 0 for x in load_scale):
            fail("--load-scale must be positive")
        if clients not in ("uniform", "capacity"):
            fail(f"--clients {clients!r}: uniform or capacity")
        from gpufleet.cli.common import console, load_fleet_or_exit
        from gpufleet.serving.loadgen import WorkloadError
        from gpufleet.serving.sim.core import Failure, SimConfig, SimError, Simulator

        spec = load_fleet_or_exit(fleet)
        try:
            failures = [Failure.parse(f) for f in fail_at]
        except SimError as exc:
            fail(str(exc))
        results = []
        try:
            for x in load_scale:
                items = _workload(trace, x, start, duration, seed)
                for p in policies:
                    sim = Simulator(
                        spec,
                        SimConfig(
                            policy=p,
                            failures=failures,
                            engines_per_region=engines_per_region,
                            clients=clients,
                            seed=seed,
                        ),
                    )
                    results.append((p, x, sim.run(items)))
        except (WorkloadError, SimError) as exc:
            fail(str(exc), EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        name = Path(trace).name if not trace.startswith("builtin:") else trace
        runs = [_run_result(name, p, x, failures, r) for p, x, r in results]
        if report_dir is not None:
            from gpufleet.serving.report import write_report

            path = write_report(
                runs,
                report_dir,
                title=f"gpufleet simulate: {name} on {spec.fleet}",
                notes=[f"fleet {fleet}", f"failures: {', '.join(map(str, failures)) or 'none'}"],
            )
        if as_json:
            import json

            from gpufleet.serving.report import _finite

            out = [
                {**run.to_dict(), "cost_notes": r.cost_notes, "routed": r.routed, "spills": r.spills}
                for run, (_, _, r) in zip(runs, results, strict=True)
            ]
            typer.echo(json.dumps(_finite(out), indent=1))
            return
        _print(runs, results, spec)
        if report_dir is not None:
            console().print(f"report: {path}")


def _run_result(trace: str, policy: str, load: float, failures, r):
    from gpufleet.serving.report import RunResult

    return RunResult(
        driver="sim",
        trace=trace,
        policy=policy,
        load_scale=load,
        summary=r.summary,
        failure=", ".join(map(str, failures)) or None,
        failed_during_failure=r.failed_during_failure,
        records=r.records,
        kv_series=r.kv_series,
        events=r.events,
        extra=r.extra(),
    )


def _print(runs, results, spec) -> None:
    from gpufleet.cli.common import console
    from rich.table import Table

    def ms(x):
        return "-" if x is None else ("inf" if x == float("inf") else f"{x * 1000:.0f}")

    t = Table(title=f"SLO: TTFT {spec.slo.ttft_ms:g} ms, TPOT {spec.slo.tpot_ms:g} ms (model time)")
    for col in (
        "policy",
        "load",
        "requests",
        "SLO %",
        "goodput/s",
        "TTFT p50/p99 ms",
        "TPOT p50/p99 ms",
        "failed",
        "429",
        "preempt",
        "recomputed tok",
        "$/M tok",
        "sim x",
    ):
        t.add_column(col, justify="right" if col not in ("policy",) else "left")
    for run, (_, _, r) in zip(runs, results, strict=True):
        s = r.summary
        cost = "-" if r.cost_per_million_tokens is None else f"{r.cost_per_million_tokens:.2f}"
        t.add_row(
            run.policy,
            f"x{run.load_scale:g}",
            str(s.requests),
            f"{100 * s.slo_attainment:.1f}",
            f"{s.goodput_rps:.2f}",
            f"{ms(s.ttft_p50_s)}/{ms(s.ttft_p99_s)}",
            f"{ms(s.tpot_p50_s)}/{ms(s.tpot_p99_s)}",
            str(s.failed),
            str(s.rejected),
            str(r.preemptions),
            str(r.recomputed_tokens),
            cost,
            f"{r.speed:.0f}",
        )
    c = console()
    c.print(t)
    last = results[-1][2]
    u = Table(title="per region (last run)")
    for col in ("region", "engines", "utilisation %", "routed here", "spilled out", "served"):
        u.add_column(col, justify="right" if col != "region" else "left")
    for key in last.utilisation:
        u.add_row(
            key,
            str(last.region_engines[key]),
            f"{100 * last.utilisation[key]:.1f}",
            str(last.routed[key]),
            str(last.spills[key]),
            str(last.summary.per_region.get(key, 0)),
        )
    c.print(u)
    for note in last.cost_notes:
        c.print(f"note: {note}")
    if last.events:
        c.print("events: " + "; ".join(f"{t:.0f}s {what}" for t, what in last.events))
