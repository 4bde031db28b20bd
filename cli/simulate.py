"""gpufleet simulate: replay a trace through the fleet in virtual time (engine model + router policy)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from gpufleet.cli.common import DEFAULT_FLEET, EXIT_BAD_INPUT, EXIT_INTERRUPTED, fail

# serving/router/policies/__init__.py POLICIES (kept literal: importing the registry loads the engine model)
POLICIES = ("default", "predictive", "headroom", "round-robin", "least-outstanding", "power-of-two",
            "prefix-affinity", "llm-d", "instance-aware", "kv-cost")  # fmt: skip
REACHES = ("regional", "global")
# The simulator steps every scrape interval until the last arrival, so the simulated span bounds its
# run time (a week is about 30 s on the example fleet, longer on big ones); a broken trace, or
# --load-scale 1e-300, must not mean years of steps.
MAX_SIM_SPAN_S = 7 * 86400.0


def _workload(trace: str, load_scale: float, start: float, duration: float | None, seed: int):
    """Items from a trace file, or from a built-in profile written `builtin:conv` / `builtin:code`."""
    from gpufleet.serving import loadgen

    if trace.startswith("builtin:"):
        return loadgen.synthetic(trace.split(":", 1)[1], duration or 3600.0, load_scale, seed)
    return loadgen.from_trace(Path(trace), load_scale=load_scale, start_s=start, duration_s=duration)


def _check_span(last_s: float, trace: str, load_scale: float) -> None:
    if not (math.isfinite(last_s) and last_s <= MAX_SIM_SPAN_S):
        fail(
            f"{trace} at --load-scale {load_scale:g} spans {last_s:.3g} s of simulated time, more than "
            f"{MAX_SIM_SPAN_S / 86400:.0f} days; pick a slice with --start/--duration or a higher --load-scale"
        )


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
            ["default"],
            "--policy",
            "-p",
            help=f"{', '.join(POLICIES)} or all (repeat to compare); default: what the router ships",
        ),
        reach: str = typer.Option(
            "regional", "--reach", help="regional: a router per region, peers by summary; global: one router "
            "over every engine, paying the inter-region round trip",
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
        policies = list(POLICIES[1:]) if "all" in policy else policy
        if reach not in REACHES:
            fail(f"--reach {reach!r}: regional or global")
        bad = [p for p in policies if p not in POLICIES]
        if bad:
            fail(f"--policy {bad[0]!r}: one of {', '.join(POLICIES)} or all")
        if not all(math.isfinite(x) and x > 0 for x in load_scale):
            fail("--load-scale must be a positive, finite number")
        if not math.isfinite(start) or (duration is not None and not math.isfinite(duration)):
            fail("--start and --duration must be finite numbers of seconds")
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
                if duration is not None:  # before a built-in profile generates that many arrivals
                    _check_span(duration / x, trace, x)
                items = _workload(trace, x, start, duration, seed)
                _check_span(max((it.at_s for it in items), default=0.0), trace, x)
                for p in policies:
                    sim = Simulator(
                        spec,
                        SimConfig(
                            policy=p,
                            failures=failures,
                            engines_per_region=engines_per_region,
                            clients=clients,
                            seed=seed,
                            reach=reach,
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
            console().print(f"report: {path}", markup=False)  # a user's path, not markup


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
        c.print(f"note: {note}", markup=False)
    if last.events:
        c.print("events: " + "; ".join(f"{t:.0f}s {what}" for t, what in last.events))
