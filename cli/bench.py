"""gpufleet bench: the routing experiments over real HTTP (and in the simulator), with a report."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import typer
from gpufleet.cli.common import DEFAULT_FLEET, EXIT_BAD_INPUT, EXIT_INTERRUPTED, fail

# Over HTTP: the default as deployed (a router per region), against the simulator's best baselines
# given one router over every engine (their best case), and vllm-router beside them; in the
# simulator every registered policy runs, under either reach.
HTTP_RUNS = ("default@regional", "instance-aware@global", "least-outstanding@global")
SIM_POLICIES = ("default", "round-robin", "least-outstanding", "power-of-two", "prefix-affinity", "llm-d",
                "instance-aware", "kv-cost")  # fmt: skip
REACHES = ("regional", "global")
# ../shared/traces beside the repository (the traces are shared data, never copied in)
DEFAULT_TRACE = Path("..") / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        fleet: Path = typer.Option(DEFAULT_FLEET, "--fleet", "-f", help="fleet file"),
        trace: Path = typer.Option(DEFAULT_TRACE, "--trace", "-t", help="trace file to replay"),
        load: list[float] = typer.Option(
            [1.0, 2.0, 4.0], "--load-scale", "-x", help="x the trace rate (repeat)"
        ),
        duration: float = typer.Option(
            120.0, "--duration", help="seconds of the trace replayed, the same slice at every load"
        ),
        time_scale: float = typer.Option(2.0, "--time-scale", help="engine seconds per wall second"),
        region: list[str] = typer.Option([], "--region", help="regions (default: the demo's three)"),
        engines: int = typer.Option(1, "--engines-per-region", min=1, max=8),
        blocks: int | None = typer.Option(None, "--num-gpu-blocks", min=16, help="shrink engines (loopback)"),
        fail_region: str | None = typer.Option(
            None, "--fail-region", help="region whose engines die mid-run"
        ),
        sim: bool = typer.Option(True, "--sim/--no-sim", help="also run each experiment in the simulator"),
        http: bool = typer.Option(True, "--http/--no-http", help="run the experiments over HTTP"),
        peer: bool = typer.Option(True, "--peer/--no-peer", help="vllm-router side by side, where installed"),
        peer_policy: list[str] = typer.Option(
            [], "--peer-policy", help="vllm-router policy (repeat; default: power_of_two, cache_aware, kv_aware, "
            "sticky_least_loaded)",
        ),
        report_dir: Path = typer.Option(Path("results/bench"), "--report-dir"),
        http_run_names: list[str] = typer.Option(
            list(HTTP_RUNS), "--http-run",
            help="POLICY@REACH run over HTTP (repeat); reach regional (the default) or global",
        ),
        reach: list[str] = typer.Option(
            ["regional", "global"], "--reach", help="simulator reach, repeat: regional (a router per region, "
            "as deployed) and/or global (one router over every engine, paying the round trip)",
        ),
    ) -> None:
        """Every policy in the simulator (regional and global reach), and over HTTP the --http-run
        policies at their reach beside vllm-router as one global router, on the same trace slices."""
        if duration <= 0 or time_scale <= 0 or any(x <= 0 for x in load):
            fail("--duration, --time-scale and --load-scale must be positive")
        bad_reach = [r for r in reach if r not in REACHES]
        if bad_reach:
            fail(f"--reach {bad_reach[0]!r}: regional or global")
        http_runs = [(p_, r_ or "regional") for p_, _, r_ in (name.partition("@") for name in http_run_names)]
        from gpufleet.serving.router.policies import POLICIES

        for p_, r_ in http_runs:
            if p_ not in POLICIES or r_ not in REACHES:
                fail(f"--http-run {p_}@{r_}: POLICY@REACH, policy one of {', '.join(POLICIES)}, reach regional "
                     "or global")  # fmt: skip
        if not trace.is_file():
            fail(f"--trace {trace}: no such file (the public traces live in ../shared/traces)")
        from gpufleet.cli.common import console, load_fleet_or_exit
        from gpufleet.serving import loadgen
        from gpufleet.serving.bench import PEER_POLICIES, Setup, http_run, peer_router_available, sim_run
        from gpufleet.serving.demo import DEMO_REGIONS
        from gpufleet.serving.fleetrun import FleetRunError
        from gpufleet.serving.report import write_report

        bad_peer = [p for p in peer_policy if p not in PEER_POLICIES]
        if bad_peer:
            fail(f"--peer-policy {bad_peer[0]!r}: one of {', '.join(PEER_POLICIES)}")

        spec = load_fleet_or_exit(fleet)
        keys = {r.key for r in spec.regions}
        regions = tuple(region) or tuple(k for k in DEMO_REGIONS if k in keys) or tuple(sorted(keys)[:3])
        bad = [k for k in (*regions, *([fail_region] if fail_region else [])) if k not in keys]
        if bad:
            fail(f"region {bad[0]!r} is not in {fleet}; regions: {', '.join(sorted(keys))}")
        fail_region = fail_region or regions[1 % len(regions)]
        out = console()
        policies = [f"{p_}@{r_}" for p_, r_ in http_runs]
        notes = [
            f"fleet {fleet}: regions {', '.join(regions)}, {engines} engine(s) each"
            + (f", {blocks} KV blocks per engine" if blocks else ""),
            f"trace {trace.name}: its first {duration:g} s at every load (x the rate: {duration:g} / x model "
            f"seconds), HTTP time scale x{time_scale:g}",
        ]
        if peer and http:
            if peer_router_available():
                policies += [f"vllm-router:{p}" for p in peer_policy or PEER_POLICIES]
            else:
                notes.append("vllm-router is not installed (pip install vllm-router): no peer-router runs")
        runs = []
        try:
            with tempfile.TemporaryDirectory(prefix="gpufleet-bench-") as work:
                for x in load:
                    # the same requests at every load, arriving x times as fast
                    items = loadgen.from_trace(trace, load_scale=x, duration_s=duration)
                    span = duration / x  # model seconds
                    if blocks:
                        items = loadgen.clip(items, blocks * 16 // 2)
                    items = loadgen.assign_clients(items, list(regions))
                    failing = x == max(load)
                    for fail_it in (False, True) if failing else (False,):
                        setup = Setup(
                            spec,
                            regions,
                            engines,
                            blocks,
                            fail_region if fail_it else None,
                            span / 3 if fail_it else None,
                            span / 3 if fail_it else None,
                        )
                        if sim:
                            for r_ in reach:
                                for p in SIM_POLICIES:
                                    runs.append(sim_run(replace(setup, reach=r_), items, p, trace.name, x,
                                                        label=f"{p}@{r_}"))  # fmt: skip
                                    _line(out, runs[-1])
                        for p in policies if http else ():
                            name, _, r_ = p.partition("@")
                            runs.append(http_run(replace(setup, reach=r_ or "regional"), items, name, trace.name, x,
                                                 time_scale, Path(work) / p.replace(":", "-"), label=p))  # fmt: skip
                            _line(out, runs[-1])
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (FleetRunError, loadgen.WorkloadError) as exc:
            fail(str(exc), EXIT_BAD_INPUT if isinstance(exc, loadgen.WorkloadError) else 3)
        from gpufleet.serving.fleetrun import STALL_WARN

        behind = [r.policy for r in runs if (r.extra.get("emulator_stalled_share") or 0.0) > STALL_WARN]
        if behind:
            notes.append(f"emulated engines fell behind the time scale (stalled > {100 * STALL_WARN:.0f}% of "
                         f"their stepping) in: {', '.join(behind)}; those runs' latencies measure the machine")
        path = write_report(runs, report_dir, title="gpufleet bench", notes=notes)
        out.print(f"report: {path}")


def _line(out, run) -> None:
    s = run.summary
    p99 = "inf" if s.ttft_p99_s is None or s.ttft_p99_s == float("inf") else f"{1000 * s.ttft_p99_s:.0f} ms"
    out.print(
        f"{run.driver:4} {run.policy:26} x{run.load_scale:<4g} fail={run.failure or '-':28} "
        f"goodput {s.goodput_rps:6.2f}/s SLO {100 * s.slo_attainment:5.1f}% p99 TTFT {p99:>9} "
        f"failed {s.failed} (in failure {run.failed_during_failure}) 429 {s.rejected}"
    )
    from gpufleet.serving.fleetrun import stall_warning

    warning = stall_warning(run.extra.get("emulator_stalled_share"))
    if warning:
        out.print(f"     [yellow]{warning}[/yellow]")
