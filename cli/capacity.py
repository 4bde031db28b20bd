"""gpufleet capacity: find where GPUs can be had (scan) and where to ask for them (place).

Exit codes:
  scan   0 every requested cloud scanned; 1 some cloud or region failed (the rest is in the snapshot);
         2 bad input (unknown GPU, cloud or region name, bad flag); 3 no cloud could be scanned
         (no credentials, access denied, SDK missing, unreachable); 130 interrupted
  place  0 placed; 1 not enough obtainable GPUs; 2 bad input (snapshot, flags, a fleet file that
         cannot take the entries)

Local emulators (tests, benchmarks): boto3 honours AWS_ENDPOINT_URL; GPUFLEET_GCP_ENDPOINT and
GPUFLEET_AZURE_ENDPOINT point the Google and Azure SDKs at an http://127.0.0.1:PORT server with
anonymous / static-token credentials.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from gpufleet.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_FINDINGS,
    EXIT_INTERRUPTED,
    console,
    error,
    fail,
)

DEFAULT_SNAPSHOT = Path("capacity-snapshot.json")
ALL_CLOUDS = ("aws", "gcp", "azure")

capacity_app = typer.Typer(
    help="Where GPUs can be had: scan the clouds, then place a fleet.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _clouds(value: str | None) -> list[str]:
    clouds = _split([value]) if value else list(ALL_CLOUDS)
    bad = [c for c in clouds if c not in ALL_CLOUDS]
    if bad or not clouds:
        fail(f"--clouds: unknown cloud {', '.join(bad) or '(none)'}; use a comma list of aws, gcp, azure")
    return list(dict.fromkeys(clouds))


def _gpus(values: list[str] | None) -> list[str]:
    from gpufleet.stacks.catalog import CatalogError, gpu

    out = []
    for g in _split(values) or ["H100-80GB"]:
        try:
            out.append(gpu(g).key)
        except CatalogError as exc:
            fail(f"--gpu: {exc}")
    return list(dict.fromkeys(out))


def _endpoints() -> dict[str, str]:
    found = {}
    for cloud, var in (("gcp", "GPUFLEET_GCP_ENDPOINT"), ("azure", "GPUFLEET_AZURE_ENDPOINT")):
        if os.environ.get(var):
            found[cloud] = os.environ[var]
    return found


def _exit_code(result) -> int:
    if result.all_failed:
        return EXIT_ENVIRONMENT
    return EXIT_FINDINGS if result.any_failed else 0


@capacity_app.command("scan")
def scan_cmd(
    gpu: list[str] = typer.Option(
        None, "--gpu", help="GPU type(s), repeat or comma-separate (default H100-80GB)"
    ),
    clouds: str = typer.Option(None, "--clouds", help="comma list of aws, gcp, azure (default all three)"),
    regions: str = typer.Option(None, "--regions", help="comma list of regions, any cloud's (default: all)"),
    as_json: bool = typer.Option(False, "--json", help="print the snapshot JSON instead of a table"),
    out: Path = typer.Option(DEFAULT_SNAPSHOT, "--out", help="where to save the snapshot"),
    concurrency: int = typer.Option(24, "--concurrency", min=1, max=128, help="API calls in flight at once"),
    timeout: float = typer.Option(20.0, "--timeout", min=0.1, max=600, help="seconds per API call"),
    attempts: int = typer.Option(
        4, "--attempts", min=1, max=10, help="tries per API call (throttling, timeouts)"
    ),
    gcp_project: str = typer.Option(
        None, "--gcp-project", help="GCP project (default GOOGLE_CLOUD_PROJECT / ADC)"
    ),
    azure_subscription: str = typer.Option(
        None, "--azure-subscription", help="default AZURE_SUBSCRIPTION_ID"
    ),
) -> None:
    """Scan AWS, GCP and Azure for a GPU type: zones offering it, quota left in GPUs, spot score, price."""
    from gpufleet.stacks.capacity.model import cloud_of_region
    from gpufleet.stacks.capacity.scan import ScanOptions, scan
    from gpufleet.stacks.capacity.snapshot import Snapshot, write_snapshot

    gpus = _gpus(gpu)
    wanted = _clouds(clouds)
    region_list = None
    if regions is not None:
        region_list = _split([regions])
        if not region_list:
            fail("--regions: give at least one region name")
        unknown = [r for r in region_list if cloud_of_region(r) is None]
        if unknown:
            fail(
                f"--regions: {', '.join(unknown)} is not a region name of AWS (us-east-1), GCP (us-central1) "
                "or Azure (eastus)"
            )
    if out.is_dir():
        fail(f"--out: {out} is a directory; give a file name")
    if not out.parent.exists():
        fail(f"--out: folder {out.parent} does not exist")
    err = console(stderr=True)
    adapters, skipped = [], []
    from gpufleet.stacks.capacity.scan import make_adapter

    for cloud in wanted:
        own = None if region_list is None else [r for r in region_list if cloud_of_region(r) == cloud]
        if own == []:
            skipped.append(cloud)
            continue
        opts = ScanOptions(
            gpus=gpus,
            clouds=[cloud],
            regions=own,
            concurrency=concurrency,
            call_timeout_s=timeout,
            attempts=attempts,
            gcp_project=gcp_project,
            azure_subscription=azure_subscription,
            endpoints=_endpoints(),
        )
        adapters.append(make_adapter(cloud, opts))
    if not adapters:
        fail(f"--regions names no region of {', '.join(wanted)}")
    opts = ScanOptions(
        gpus=gpus,
        clouds=[a.cloud for a in adapters],
        concurrency=concurrency,
        call_timeout_s=timeout,
        attempts=attempts,
    )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
            disable=as_json and not err.is_terminal,
        ) as bar:
            task = bar.add_task(f"scanning {', '.join(a.cloud for a in adapters)}", total=len(adapters))

            def progress(what: str, done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, description=f"scanning: {what}")

            result = scan(opts, progress, adapters)
    except KeyboardInterrupt:
        err.print("interrupted; no snapshot written")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    from gpufleet.stacks.capacity.model import CloudResult

    clouds_state = dict(result.clouds)
    for cloud in skipped:
        clouds_state[cloud] = CloudResult(
            cloud, status="skipped", notes=["no region of this cloud in --regions"]
        )
    snap = Snapshot(Snapshot.now(), gpus, clouds_state, result.rows)
    try:
        write_snapshot(snap, out)
    except OSError as exc:
        fail(f"--out: cannot write {out}: {exc.strerror}", EXIT_BAD_INPUT)
    if as_json:
        typer.echo(json.dumps(snap.to_dict(), indent=2))
    else:
        _print_scan(snap, result)
    for cloud, state in clouds_state.items():
        if state.error:
            err.print(f"[red]{cloud}: {state.error['kind']}:[/] {state.error['message']}", markup=True)
        for region, e in state.region_errors.items():
            if state.status != "error":
                err.print(f"[yellow]{cloud} {region}: {e['kind']}:[/] {e['message']}", markup=True)
        for note in state.notes:
            err.print(f"[yellow]{cloud}:[/] {note}", markup=True)
    err.print(
        f"snapshot written to {out} ({len(snap.regions)} rows, {result.seconds:.1f} s, "
        f"{result.retries} retries)"
    )
    raise typer.Exit(_exit_code(result))


def _print_scan(snap, result) -> None:
    from rich.table import Table

    rows = sorted(
        snap.regions,
        key=lambda r: (
            -r.obtainable("on-demand"),
            r.price_per_gpu is None,
            r.price_per_gpu or 0,
            r.cloud,
            r.region,
        ),
    )
    table = Table(title=f"GPU capacity {', '.join(snap.gpus)} at {snap.taken_at}")
    for col in (
        "cloud",
        "region",
        "gpu",
        "instance",
        "zones",
        "on-demand quota",
        "obtainable GPUs",
        "spot GPUs",
        "spot score",
        "$/GPU-h",
    ):
        table.add_column(
            col,
            justify="right" if col in ("obtainable GPUs", "spot GPUs", "spot score", "$/GPU-h") else "left",
        )
    for r in rows:
        q = r.quota.get("on-demand")
        if q is None:
            quota = "unknown" if r.offered else "-"
        else:
            used = "?" if q.used is None else f"{q.used:g}"
            quota = f"{used}/{q.limit:g} {q.unit}s"
        table.add_row(
            r.cloud,
            r.region,
            r.gpu,
            r.instance_type or "not offered",
            ",".join(z.rsplit("-", 1)[-1] for z in r.zones) or "-",
            quota,
            str(r.obtainable("on-demand")),
            str(r.obtainable("spot")),
            "-" if r.spot_score is None else str(r.spot_score),
            "-" if r.price_per_gpu is None else f"{r.price_per_gpu:,.2f}",
        )
    console().print(table)
    total = sum(r.obtainable("on-demand") for r in snap.regions)
    console().print(f"obtainable on-demand GPUs in total: {total}")


@capacity_app.command("place")
def place_cmd(
    gpu: str = typer.Option(..., "--gpu", help="GPU type, e.g. H100-80GB"),
    gpus: int = typer.Option(..., "--gpus", help="how many GPUs the fleet needs"),
    max_price: float = typer.Option(None, "--max-price", help="highest USD per GPU-hour to accept"),
    clouds: str = typer.Option(None, "--clouds", help="comma list of aws, gcp, azure (default all)"),
    snapshot: Path = typer.Option(
        DEFAULT_SNAPSHOT, "--snapshot", help="snapshot from `gpufleet capacity scan`"
    ),
    tier: str = typer.Option("on-demand", "--tier", help="on-demand or spot quota"),
    write: Path = typer.Option(None, "--write", help="append the region entries to this fleet file"),
    as_json: bool = typer.Option(False, "--json", help="print the placement as JSON"),
) -> None:
    """Choose regions whose obtainable GPUs add up to N, cheapest first, over two or more regions."""
    from gpufleet.stacks.capacity.place import (
        FleetWriteError,
        PlacementError,
        append_to_fleet,
        fleet_regions,
        place,
        render_entries,
    )
    from gpufleet.stacks.capacity.snapshot import SnapshotError, read_snapshot

    gpu_key = _gpus([gpu])[0]
    if gpus <= 0:
        fail(f"--gpus must be at least 1, not {gpus}")
    if max_price is not None and not max_price > 0:
        fail(f"--max-price must be a positive USD per GPU-hour, not {max_price:g}")
    if tier not in ("on-demand", "spot"):
        fail(f"--tier: {tier!r}; use on-demand or spot")
    wanted = _clouds(clouds) if clouds else None
    try:
        snap = read_snapshot(snapshot)
    except SnapshotError as exc:
        fail(str(exc))
    if gpu_key not in snap.gpus:
        fail(
            f"snapshot {snapshot} has no scan of {gpu_key} (it has {', '.join(snap.gpus) or 'none'}): "
            f"run `gpufleet capacity scan --gpu {gpu_key}`"
        )
    exclude: set[tuple[str, str]] = set()
    err = console(stderr=True)
    if write is not None:
        try:
            exclude = fleet_regions(write)
        except FleetWriteError as exc:
            for p in exc.problems:
                error(err, p)
            fail(str(exc))
    try:
        placement = place(snap, gpu_key, gpus, tier=tier, max_price=max_price, clouds=wanted, exclude=exclude)
    except PlacementError as exc:
        fail(str(exc), EXIT_FINDINGS)
    entries = render_entries(placement, taken_at=snap.taken_at)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "gpu": gpu_key,
                    "gpus": placement.gpus,
                    "wanted": gpus,
                    "tier": tier,
                    "usd_per_hour": placement.cost_per_hour,
                    "snapshot_taken_at": snap.taken_at,
                    "regions": [
                        {
                            "cloud": p.row.cloud,
                            "region": p.row.region,
                            "instance_type": p.row.instance_type,
                            "nodes": p.nodes,
                            "gpus": p.gpus,
                            "zones": p.row.zones,
                            "usd_per_hour": p.cost_per_hour,
                        }
                        for p in placement.picks
                    ],
                    "fleet_entries": entries,
                },
                indent=2,
            )
        )
    else:
        out = console()
        cost = placement.cost_per_hour
        out.print(
            f"{placement.gpus} x {gpu_key} ({tier}) over {len(placement.picks)} region(s)"
            + (f", ${cost:,.2f}/h at max" if cost is not None else "")
            + f"; snapshot {snap.taken_at}"
        )
        if len(placement.picks) == 1:
            out.print(
                "[yellow]note:[/] only one region has room; the fleet has no second region to fall back on",
                markup=True,
            )
        typer.echo("regions:")
        typer.echo(entries, nl=False)
    if write is not None:
        try:
            append_to_fleet(write, placement, taken_at=snap.taken_at)
        except FleetWriteError as exc:
            for p in exc.problems:
                error(err, p)
            fail(str(exc))
        err.print(f"added {len(placement.picks)} region(s) to {write}", markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(capacity_app, name="capacity")
