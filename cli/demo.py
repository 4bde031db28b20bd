"""gpufleet demo: the default policy and the best baseline, each over three emulated regions on
loopback, on the same load and region failure, live.

Exit codes: 0 done and the default fleet lost no request, 1 it lost some (they are listed), 2 bad
input, 3 the local fleet could not start, 130 interrupted."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer
from gpufleet.cli.common import DEFAULT_FLEET, EXIT_BAD_INPUT, EXIT_FINDINGS, EXIT_INTERRUPTED, EXIT_OK, fail


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        fleet: Path = typer.Option(
            DEFAULT_FLEET, "--fleet", "-f", help="fleet file (3 regions are taken from it)"
        ),
        duration: float = typer.Option(60.0, "--duration", "-d", help="wall seconds of load"),
        trace: Path | None = typer.Option(
            None, "--trace", help="replay this trace instead of the built-in load"
        ),
        short: bool = typer.Option(
            False, "--short", help="a 12-second run at lighter load (tests, a first look)"
        ),
        report_dir: Path = typer.Option(Path("results/demo"), "--report-dir", help="where the report goes"),
        region: list[str] = typer.Option(
            [], "--region", help="the 3 regions (default: one per cloud, 3 GPU types)"
        ),
        fail_region: str | None = typer.Option(None, "--fail-region", help="whose engines die half way"),
        load_scale: float | None = typer.Option(None, "--load-scale", help="x the profile's request rate"),
        time_scale: float = typer.Option(2.0, "--time-scale", help="engine seconds per wall second"),
        engines: int = typer.Option(1, "--engines-per-region", min=1, max=8),
        no_live: bool = typer.Option(False, "--no-live", help="no live dashboard, just the summary"),
        policy: str = typer.Option("default", "--policy", help="the policy routing per region (as deployed)"),
        baseline: str = typer.Option(
            "instance-aware", "--baseline",
            help="the policy beside it, given one router over every engine (its best case); none: no baseline",
        ),
    ) -> None:
        """Run the router's default policy and the best baseline side by side on this machine, on the
        same load, and watch both through a region failure."""
        from gpufleet.serving.router.policies import POLICIES

        if duration <= 0 or time_scale <= 0 or (load_scale is not None and load_scale <= 0):
            fail("--duration, --time-scale and --load-scale must be positive")
        for given, flag in ((policy, "--policy"), *(((baseline, "--baseline"),) if baseline != "none" else ())):
            if given not in POLICIES:
                fail(f"{flag} {given!r}: one of {', '.join(POLICIES)}" + (", none" if flag == "--baseline" else ""))
        if trace is not None and not trace.is_file():
            fail(f"--trace {trace}: no such file")
        import asyncio

        from gpufleet.cli.common import console, load_fleet_or_exit
        from gpufleet.serving.demo import DEMO_REGIONS, DemoConfig, run_demo
        from gpufleet.serving.fleetrun import FleetRunError, stall_warning
        from gpufleet.serving.loadgen import WorkloadError
        from gpufleet.serving.outcomes import summarize

        spec = load_fleet_or_exit(fleet)
        keys = {r.key for r in spec.regions}
        regions = tuple(region) or tuple(k for k in DEMO_REGIONS if k in keys)
        if not region and len(regions) < 2:  # a fleet without the example's regions: its first three
            regions = tuple(r.key for r in spec.regions[:3])
        unknown = [k for k in (*regions, *([fail_region] if fail_region else [])) if k not in keys]
        if unknown:
            fail(f"region {unknown[0]!r} is not in {fleet}; regions: {', '.join(sorted(keys))}")
        if fail_region and fail_region not in regions:
            fail(f"--fail-region {fail_region!r} is not one of the demo's regions: {', '.join(regions)}")
        cfg = DemoConfig(
            regions=regions,
            duration_s=12.0 if short and duration == 60.0 else duration,
            time_scale=time_scale,
            load_scale=load_scale or (1.0 if short else 3.0),
            trace=trace,
            engines_per_region=engines,
            fail_region=fail_region,
            live=not no_live,
            report_dir=report_dir,
            policy=policy,
            baseline=None if baseline == "none" else baseline,
        )
        out = console()
        try:
            with tempfile.TemporaryDirectory(prefix="gpufleet-demo-") as work:
                result = asyncio.run(run_demo(spec, cfg, Path(work), out))
        except KeyboardInterrupt:
            out.print("interrupted: every engine and router was stopped")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (FleetRunError, WorkloadError) as exc:
            fail(str(exc), EXIT_BAD_INPUT if isinstance(exc, WorkloadError) else 3)
        ttft, tpot = spec.slo.ttft_ms / 1000, spec.slo.tpot_ms / 1000
        span = cfg.duration_s * time_scale
        out.print(f"\nSLO: TTFT <= {spec.slo.ttft_ms:g} ms, TPOT <= {spec.slo.tpot_ms:g} ms; trace time throughout")
        summaries = []
        for arm in result.arms:
            s = summarize(arm.records, ttft, tpot, span)
            summaries.append(s)
            out.print(
                f"{arm.label} ({arm.title}): requests {s.requests}: {s.ok} ok, {s.failed} failed, "
                f"{s.rejected} refused (429); SLO attainment {100 * s.slo_attainment:.1f}%, goodput "
                f"{s.goodput_rps:.2f}/s; TTFT p50 {_ms(s.ttft_p50_s)}, p99 {_ms(s.ttft_p99_s)}; served "
                f"outside the client's region {s.spilled}; streams continued after a failure "
                f"{arm.continuations:.0f}"
            )
            if warning := stall_warning(arm.stalled_share):
                out.print(f"  [yellow]{arm.label}: {warning}[/yellow]")
        if len(summaries) == 2 and summaries[1].goodput_rps:
            a, b = result.arms
            out.print(f"goodput {a.label} / {b.label}: {summaries[0].goodput_rps / summaries[1].goodput_rps:.2f}x")
        out.print("events (trace time): " + "; ".join(f"t={t:.0f} s {what}" for t, what in result.events))
        for arm in result.arms:
            for r in [r for r in arm.records if r.outcome == "failed"][:10]:
                # Say why: a failed request is what the demo exists to rule out.
                out.print(f"{arm.label}: failed request {r.id} at t={r.arrival_s:.1f} s (arrived at "
                          f"{r.client_region}): {r.error}")  # fmt: skip
        out.print(f"full report: {result.report}")
        # The exit code speaks for the router as deployed (the first fleet): 1 if it lost a request.
        raise typer.Exit(EXIT_FINDINGS if summaries[0].failed else EXIT_OK)


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if x == float("inf") else f"{1000 * x:.0f} ms"
