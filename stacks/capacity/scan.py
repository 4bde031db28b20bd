"""Run the per-cloud adapters in parallel, with bounded concurrency, timeouts and retries.

One thread pool serves all clouds. The main thread does the orchestration (connect each cloud,
then queue its region jobs and cloud-wide jobs as soon as it is connected), so no worker ever waits
on another and a slow or failing cloud never holds up the others. Every SDK call goes through
`Caller.call`, which retries throttling, timeouts and connection errors with exponential backoff
and full jitter, and turns everything else into one translated `CloudError`.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from gpufleet.stacks.capacity.model import CloudError, CloudResult, ErrorKind, RegionCapacity

T = TypeVar("T")


@dataclass
class ScanOptions:
    gpus: list[str]
    clouds: list[str] = field(default_factory=lambda: ["aws", "gcp", "azure"])
    regions: list[str] | None = None  # None: every region the cloud lists (Azure: the catalog's list)
    concurrency: int = 24
    call_timeout_s: float = 20.0
    attempts: int = 4  # tries per call, the first included
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    gcp_project: str | None = None
    azure_subscription: str | None = None
    endpoints: dict[str, str] = field(default_factory=dict)  # cloud -> local emulator URL (tests)


class Caller:
    """Calls one cloud's SDK with retries; `translate` maps the SDK's exceptions to CloudError."""

    def __init__(self, translate: Callable[[BaseException], CloudError], opts: ScanOptions):
        self._translate = translate
        self._opts = opts
        self.retries = 0
        self._lock = threading.Lock()

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        for attempt in range(1, self._opts.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except CloudError as exc:
                err = exc
            except Exception as exc:  # noqa: BLE001 - every SDK error is translated, never dumped
                err = self._translate(exc)
            if not err.kind.retryable or attempt == self._opts.attempts:
                if attempt > 1 and err.kind.retryable:
                    err = CloudError(
                        err.kind, f"{err.message} (gave up after {attempt} tries)", status=err.status
                    )
                raise err from None
            with self._lock:
                self.retries += 1
            # Full jitter: spreads retries of many parallel calls instead of retrying in lockstep.
            cap = min(self._opts.backoff_max_s, self._opts.backoff_base_s * 2 ** (attempt - 1))
            time.sleep(random.uniform(0, cap))
        raise AssertionError("unreachable")


class Adapter(Protocol):
    """One cloud. Methods run in worker threads; each raises CloudError on failure."""

    cloud: str

    def connect(self) -> list[str]:
        """Check SDK and credentials, build clients; return the regions to scan."""
        ...

    def cloud_jobs(self, regions: list[str]) -> dict[str, Callable[[], Any]]:
        """Cloud-wide calls (GCP aggregated lists, AWS spot scores), run in parallel with regions."""
        ...

    def scan_region(self, region: str) -> list[RegionCapacity]:
        """Offers and quotas of one region, one row per GPU type."""
        ...

    def finish(
        self, rows: list[RegionCapacity], cloud_results: dict[str, Any], cloud_errors: dict[str, CloudError]
    ) -> tuple[list[RegionCapacity], CloudResult]:
        """Merge the cloud-wide results into the region rows."""
        ...


@dataclass
class ScanResult:
    rows: list[RegionCapacity]
    clouds: dict[str, CloudResult]
    seconds: float
    retries: int

    @property
    def all_failed(self) -> bool:
        return all(c.status == "error" for c in self.clouds.values())

    @property
    def any_failed(self) -> bool:
        return any(c.status in ("error", "partial") for c in self.clouds.values())


Progress = Callable[[str, int, int], None]  # (what just finished, done, total)


def make_adapter(cloud: str, opts: ScanOptions) -> Adapter:
    if cloud == "aws":
        from gpufleet.stacks.capacity.aws import AwsAdapter

        return AwsAdapter(opts)
    if cloud == "gcp":
        from gpufleet.stacks.capacity.gcp import GcpAdapter

        return GcpAdapter(opts)
    if cloud == "azure":
        from gpufleet.stacks.capacity.azure import AzureAdapter

        return AzureAdapter(opts)
    raise CloudError(ErrorKind.bad_input, f"unknown cloud {cloud!r}; use aws, gcp or azure")


def scan(
    opts: ScanOptions,
    progress: Progress | None = None,
    adapters: Iterable[Adapter] | None = None,
) -> ScanResult:
    """Scan every cloud in `opts.clouds`; failures are recorded per cloud and region, never raised."""
    started = time.monotonic()
    adapters = list(adapters) if adapters is not None else [make_adapter(c, opts) for c in opts.clouds]
    results = {a.cloud: CloudResult(a.cloud) for a in adapters}
    rows: dict[str, list[RegionCapacity]] = {a.cloud: [] for a in adapters}
    cloud_out: dict[str, dict[str, Any]] = {a.cloud: {} for a in adapters}
    cloud_err: dict[str, dict[str, CloudError]] = {a.cloud: {} for a in adapters}
    pending_jobs: dict[str, int] = {}
    total = len(adapters)
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(what, done, total)

    with ThreadPoolExecutor(max_workers=max(1, opts.concurrency), thread_name_prefix="capacity") as pool:
        futures: dict[Future, tuple[str, Adapter, str]] = {}
        for a in adapters:
            futures[pool.submit(a.connect)] = ("connect", a, "")
        while futures:
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for fut in finished:
                kind, a, key = futures.pop(fut)
                res = results[a.cloud]
                exc = fut.exception()
                if exc is not None and not isinstance(exc, CloudError):
                    # An adapter bug must not take down the other clouds; say what happened.
                    exc = CloudError(ErrorKind.failed, f"{a.cloud}: {type(exc).__name__}: {exc}")
                if kind == "connect":
                    if exc is not None:
                        res.status = "error"
                        res.error = exc.as_dict()
                        tick(f"{a.cloud}: {exc.kind.value}")
                        continue
                    regions = fut.result()
                    jobs = a.cloud_jobs(regions)
                    total += len(regions) + len(jobs)
                    pending_jobs[a.cloud] = len(regions) + len(jobs)
                    for r in regions:
                        futures[pool.submit(a.scan_region, r)] = ("region", a, r)
                    for name, job in jobs.items():
                        futures[pool.submit(job)] = ("job", a, name)
                    tick(f"{a.cloud}: {len(regions)} regions")
                    if not pending_jobs[a.cloud]:
                        _finish(a, rows, cloud_out, cloud_err, results)
                    continue
                if kind == "region":
                    if exc is not None:
                        res.region_errors[key] = exc.as_dict()
                    else:
                        rows[a.cloud].extend(fut.result())
                        res.regions_scanned += 1
                else:
                    if exc is not None:
                        cloud_err[a.cloud][key] = exc
                    else:
                        cloud_out[a.cloud][key] = fut.result()
                tick(f"{a.cloud} {key}")
                pending_jobs[a.cloud] -= 1
                if pending_jobs[a.cloud] == 0:
                    _finish(a, rows, cloud_out, cloud_err, results)
    all_rows = [r for a in adapters for r in rows[a.cloud]]
    retries = sum(c.retries for a in adapters if isinstance(c := getattr(a, "caller", None), Caller))
    return ScanResult(all_rows, results, time.monotonic() - started, retries)


def _finish(a: Adapter, rows, cloud_out, cloud_err, results) -> None:
    res = results[a.cloud]
    try:
        merged, final = a.finish(rows[a.cloud], cloud_out[a.cloud], cloud_err[a.cloud])
    except CloudError as exc:
        res.status, res.error = "error", exc.as_dict()
        return
    rows[a.cloud] = merged
    final.regions_scanned = res.regions_scanned
    final.region_errors = res.region_errors
    if final.status == "ok" and res.region_errors:
        # Every region failing the same way (e.g. access denied everywhere) is a cloud failure.
        final.status = "error" if res.regions_scanned == 0 else "partial"
        if final.status == "error" and final.error is None:
            final.error = next(iter(res.region_errors.values()))
    results[a.cloud] = final
