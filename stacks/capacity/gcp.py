"""GCP: where a GPU's accelerator and machine types are offered, and the GPU quotas (google-cloud-compute).

Calls (FACTS.md section 3), REST transport:
  AcceleratorTypesClient.aggregated_list   zones offering the accelerator (items keyed "zones/<zone>")
  MachineTypesClient.aggregated_list       zones offering each machine type (a3-highgpu-8g, ...)
  ProjectsClient.get                        global GPUS_ALL_REGIONS quota
  RegionsClient.list / RegionsClient.get    regions; per region quotas such as NVIDIA_H100_GPUS
GCP counts GPU quota in GPUs, so no vCPU conversion is needed. Credentials: application default
credentials; the project from --gcp-project, GOOGLE_CLOUD_PROJECT or the credentials.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gpufleet.stacks import catalog
from gpufleet.stacks.capacity.model import (
    CloudError,
    CloudResult,
    ErrorKind,
    InstanceOffer,
    Quota,
    RegionCapacity,
    choose_instance,
)
from gpufleet.stacks.capacity.scan import Caller, ScanOptions

if TYPE_CHECKING:
    from google.auth.credentials import Credentials

_THROTTLE_REASONS = {"rateLimitExceeded", "userRateLimitExceeded", "RATE_LIMIT_EXCEEDED", "quotaExceeded"}
_DISABLED_REASONS = {"accessNotConfigured", "SERVICE_DISABLED"}


def _reasons(exc: Any) -> set[str]:
    found = set()
    for e in getattr(exc, "errors", None) or ():
        if isinstance(e, dict) and e.get("reason"):
            found.add(str(e["reason"]))
    if getattr(exc, "reason", None):
        found.add(str(exc.reason))
    return found


def translate(exc: BaseException) -> CloudError:
    """google-api-core / google-auth / requests exceptions -> one line that says what to do."""
    if isinstance(exc, CloudError):
        return exc
    from google.api_core import exceptions as gex
    from google.auth import exceptions as gauth

    if isinstance(exc, (gauth.DefaultCredentialsError, gauth.RefreshError)):
        return CloudError(
            ErrorKind.no_credentials,
            "gcp: no usable credentials: run `gcloud auth application-default login` or set "
            f"GOOGLE_APPLICATION_CREDENTIALS ({str(exc).splitlines()[0][:160]})",
        )
    if isinstance(exc, gex.GoogleAPICallError):
        status = exc.code if isinstance(exc.code, int) else None
        reasons = _reasons(exc)
        text = (exc.message or "").strip().splitlines()[0][:200] if exc.message else type(exc).__name__
        if status == 429 or reasons & _THROTTLE_REASONS:
            return CloudError(ErrorKind.throttled, f"gcp: rate limited ({text})", status=status)
        if status == 403 and (
            reasons & _DISABLED_REASONS or "has not been used" in text or "is disabled" in text
        ):
            return CloudError(
                ErrorKind.not_enabled,
                "gcp: the Compute Engine API is not enabled for the project: "
                "`gcloud services enable compute.googleapis.com`",
                status=status,
            )
        if status == 403:
            return CloudError(
                ErrorKind.denied,
                f"gcp: access denied ({text}): grant the caller roles/compute.viewer on the project",
                status=status,
            )
        if status == 401:
            return CloudError(
                ErrorKind.no_credentials,
                "gcp: the credentials were rejected: `gcloud auth application-default login`",
                status=status,
            )
        if status == 404:
            return CloudError(
                ErrorKind.not_found,
                f"gcp: not found ({text}); check the project and region names",
                status=status,
            )
        if status is not None and status >= 500:
            return CloudError(ErrorKind.unreachable, f"gcp: server error {status} ({text})", status=status)
        return CloudError(ErrorKind.failed, f"gcp: {text}", status=status)
    try:
        import requests
    except ImportError:  # pragma: no cover - requests comes with google-auth
        pass
    else:
        if isinstance(exc, requests.Timeout):
            return CloudError(ErrorKind.timeout, "gcp: the API did not answer in time")
        if isinstance(exc, requests.ConnectionError):
            return CloudError(ErrorKind.unreachable, f"gcp: cannot reach the API ({type(exc).__name__})")
    return CloudError(ErrorKind.failed, f"gcp: {type(exc).__name__}: {exc}")


_SERVICES = {
    "AcceleratorTypesClient": "accelerator_types",
    "MachineTypesClient": "machine_types",
    "RegionsClient": "regions",
    "ProjectsClient": "projects",
}


def _last(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _region_of_zone(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


class GcpAdapter:
    cloud = "gcp"

    def __init__(self, opts: ScanOptions):
        self.opts = opts
        self.caller = Caller(translate, opts)
        self.project = ""
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._types = {g: catalog.instances_for_gpu("gcp", g) for g in opts.gpus}
        self._metrics = catalog.cloud_info("gcp").get("quota_metrics", {})
        self._region_quotas: dict[str, dict[str, tuple[float, float]]] = {}

    def _client(self, name: str) -> Any:
        with self._lock:
            if name not in self._clients:
                import importlib

                # Import only the service modules used: the whole compute_v1 package costs twice as long.
                module = importlib.import_module(f"google.cloud.compute_v1.services.{_SERVICES[name]}")
                kwargs: dict[str, Any] = {"credentials": self._credentials, "transport": "rest"}
                if self.opts.endpoints.get("gcp"):
                    # An http:// api_endpoint keeps its scheme in the REST transport (local emulator).
                    kwargs["client_options"] = {"api_endpoint": self.opts.endpoints["gcp"]}
                self._clients[name] = getattr(module, name)(**kwargs)
            return self._clients[name]

    def _kw(self) -> dict[str, Any]:
        # scan.Caller retries; the SDK's own retry would multiply the attempts.
        return {"timeout": self.opts.call_timeout_s, "retry": None}

    def connect(self) -> list[str]:
        try:
            import google.cloud.compute_v1.services.regions  # noqa: F401
        except ImportError as exc:
            raise CloudError(
                ErrorKind.sdk_missing,
                f"gcp: google-cloud-compute is not installed ({exc.name}): pip install 'gpufleet[clouds]'",
            ) from None
        project = (
            self.opts.gcp_project
            or os.environ.get("GOOGLE_CLOUD_PROJECT")
            or os.environ.get("CLOUDSDK_CORE_PROJECT")
        )
        if self.opts.endpoints.get("gcp"):
            from google.auth.credentials import AnonymousCredentials

            self._credentials: Credentials = AnonymousCredentials()
        else:
            import google.auth

            try:
                self._credentials, adc_project = google.auth.default(
                    scopes=["https://www.googleapis.com/auth/compute.readonly"]
                )
            except Exception as exc:  # noqa: BLE001 - translated
                raise translate(exc) from None
            project = project or adc_project
        if not project:
            raise CloudError(
                ErrorKind.bad_input, "gcp: no project: pass --gcp-project or set GOOGLE_CLOUD_PROJECT"
            )
        self.project = project
        if self.opts.regions is not None:
            return list(self.opts.regions)
        regions = self.caller.call(
            "regions.list",
            lambda: [r.name for r in self._client("RegionsClient").list(project=project, **self._kw())],
        )
        return sorted(regions)

    def cloud_jobs(self, regions: list[str]) -> dict[str, Callable[[], Any]]:
        accels = sorted({it.accelerator for its in self._types.values() for it in its if it.accelerator})
        machines = sorted({it.name for its in self._types.values() for it in its})
        if not machines:
            return {}
        return {
            "accelerator-types": lambda: self._aggregated("AcceleratorTypesClient", accels),
            "machine-types": lambda: self._aggregated("MachineTypesClient", machines),
            "project-quota": self._project_quota,
        }

    def scan_region(self, region: str) -> list[RegionCapacity]:
        doc = self.caller.call(
            "regions.get",
            self._client("RegionsClient").get,
            project=self.project,
            region=region,
            **self._kw(),
        )
        quotas = {q.metric: (float(q.limit), float(q.usage)) for q in doc.quotas}
        with self._lock:
            self._region_quotas[region] = quotas
        return [RegionCapacity("gcp", region, g) for g in self._types]

    def finish(self, rows, cloud_results, cloud_errors):
        result = CloudResult("gcp")
        for key in ("accelerator-types", "machine-types"):
            if key in cloud_errors:
                raise cloud_errors[key]  # without offerings the region quotas mean nothing
        if "project-quota" in cloud_errors:
            result.notes.append(f"GPUS_ALL_REGIONS not read: {cloud_errors['project-quota'].message}")
        accel_zones: dict[str, set[str]] = cloud_results.get("accelerator-types", {})
        machine_zones: dict[str, set[str]] = cloud_results.get("machine-types", {})
        global_q = cloud_results.get("project-quota")
        if global_q is not None:
            result.global_free_gpus = int(max(0.0, global_q[0] - global_q[1]))
        for row in rows:
            for it in self._types[row.gpu]:
                # A machine type is usable in a zone that offers both it and its accelerator.
                zones = {
                    z
                    for z in machine_zones.get(it.name, set()) & accel_zones.get(it.accelerator or "", set())
                    if _region_of_zone(z) == row.region
                }
                if zones:
                    row.offers.append(
                        InstanceOffer(
                            it.name,
                            it.gpus,
                            it.vcpus,
                            sorted(zones),
                            catalog.price("gcp", row.region, it.name),
                        )
                    )
            row.instance_type = choose_instance(row.offers)
            offer = row.offer
            quotas = self._region_quotas.get(row.region, {})
            if offer is not None:
                for tier_key, metric in self._metrics.get(row.gpu, {}).items():
                    tier = tier_key.replace("_", "-")
                    # A region that does not list the metric grants none of it.
                    figures = quotas.get(metric, (0.0, 0.0))
                    q = Quota.of(
                        metric, "gpu", figures[0], figures[1], per_node=offer.gpus, gpus_per_node=offer.gpus
                    )
                    if result.global_free_gpus is not None and q.free_gpus > result.global_free_gpus:
                        q.free_gpus = result.global_free_gpus // offer.gpus * offer.gpus
                        row.notes.append(
                            f"capped by the project's GPUS_ALL_REGIONS ({result.global_free_gpus} free)"
                        )
                    row.quota[tier] = q
        return rows, result

    def _aggregated(self, client_name: str, names: list[str]) -> dict[str, set[str]]:
        """name -> zones, from an aggregated list filtered to `names` (RE2 regex on `name`)."""
        if not names:
            return {}
        request = {
            "project": self.project,
            "filter": f'name eq "({"|".join(names)})"',
        }

        def run() -> dict[str, set[str]]:
            out: dict[str, set[str]] = {}
            pager = self._client(client_name).aggregated_list(request=request, **self._kw())
            for scope, scoped in pager:  # pages are fetched while iterating
                items = getattr(scoped, "accelerator_types", None)
                if items is None:
                    items = getattr(scoped, "machine_types", [])
                zone = scope.split("/", 1)[1] if scope.startswith("zones/") else scope
                for item in items:
                    if item.name in names:  # the filter is an optimisation; check again
                        out.setdefault(item.name, set()).add(_last(item.zone) if item.zone else zone)
            return out

        return self.caller.call(f"{client_name}.aggregated_list", run)

    def _project_quota(self) -> tuple[float, float] | None:
        doc = self.caller.call(
            "projects.get", self._client("ProjectsClient").get, project=self.project, **self._kw()
        )
        metric = catalog.cloud_info("gcp").get("global_quota", "GPUS_ALL_REGIONS")
        for q in doc.quotas:
            if q.metric == metric:
                return float(q.limit), float(q.usage)
        return None
