"""Azure: which VM sizes a region offers this subscription, and the family vCPU quotas (azure-mgmt-compute).

Calls (FACTS.md section 3), per region:
  resource_skus.list(filter="location eq '<region>'")  sizes, zones, capabilities (GPUs, vCPUs), restrictions
  usage.list(location)                                  per family vCPU quota; `cores` regional total;
                                                        `lowPriorityCores` is the spot quota of every family
Credentials: DefaultAzureCredential; the subscription from --azure-subscription or AZURE_SUBSCRIPTION_ID.
Regions: Azure has no region listing in azure-mgmt-compute, so the default set is the catalog's
(clouds.yaml azure.regions); --regions overrides it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

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

ARM_SCOPE = "https://management.azure.com/.default"


def translate(exc: BaseException) -> CloudError:
    """azure-core exceptions -> one line that says what to do."""
    if isinstance(exc, CloudError):
        return exc
    from azure.core import exceptions as ax

    if isinstance(exc, ax.ClientAuthenticationError):
        return CloudError(
            ErrorKind.no_credentials,
            "azure: no usable credentials: run `az login`, or set AZURE_CLIENT_ID, AZURE_TENANT_ID "
            "and AZURE_CLIENT_SECRET",
            status=getattr(exc, "status_code", None),
        )
    if isinstance(exc, ax.HttpResponseError):
        status = exc.status_code
        code = exc.error.code if exc.error is not None and exc.error.code else ""
        text = (exc.error.message if exc.error is not None and exc.error.message else exc.reason or "") or ""
        text = text.strip().splitlines()[0][:200] if text.strip() else ""
        if status == 429 or code in (
            "TooManyRequests",
            "SubscriptionRequestsThrottled",
            "OperationNotAllowed429",
        ):
            return CloudError(ErrorKind.throttled, f"azure: throttled ({code or status})", status=status)
        if code in ("MissingSubscriptionRegistration", "SubscriptionNotRegistered"):
            return CloudError(
                ErrorKind.not_enabled,
                "azure: the subscription is not registered for Microsoft.Compute: "
                "`az provider register --namespace Microsoft.Compute`",
                status=status,
            )
        if status == 403 or code in ("AuthorizationFailed", "LinkedAuthorizationFailed"):
            return CloudError(
                ErrorKind.denied,
                f"azure: access denied ({code or status}): give the caller the Reader role on the "
                "subscription",
                status=status,
            )
        if code in ("SubscriptionNotFound", "InvalidSubscriptionId"):
            return CloudError(
                ErrorKind.bad_input,
                f"azure: subscription not found ({code}): check --azure-subscription / AZURE_SUBSCRIPTION_ID",
                status=status,
            )
        if status == 404 or code in ("NoRegisteredProviderFound", "LocationNotAvailableForResourceType"):
            return CloudError(ErrorKind.not_found, f"azure: {code or status}: {text}", status=status)
        if status is not None and status >= 500:
            return CloudError(ErrorKind.unreachable, f"azure: server error {status} ({code})", status=status)
        return CloudError(ErrorKind.failed, f"azure: {code or status}: {text}", status=status)
    timeouts = tuple(
        getattr(ax, n)
        for n in ("ServiceRequestTimeoutError", "ServiceResponseTimeoutError")
        if hasattr(ax, n)
    )
    if timeouts and isinstance(exc, timeouts):
        return CloudError(ErrorKind.timeout, "azure: the API did not answer in time")
    if isinstance(exc, (ax.ServiceRequestError, ax.ServiceResponseError)):
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            return CloudError(ErrorKind.timeout, "azure: the API did not answer in time")
        return CloudError(ErrorKind.unreachable, f"azure: cannot reach the API ({type(exc).__name__})")
    return CloudError(ErrorKind.failed, f"azure: {type(exc).__name__}: {exc}")


class _StaticToken:
    """A fixed bearer token: only for a local emulator endpoint, never for Azure itself."""

    def get_token(self, *scopes: str, **kwargs: Any):
        from azure.core.credentials import AccessToken

        return AccessToken("emulator-token", int(time.time()) + 3600)


class AzureAdapter:
    cloud = "azure"

    def __init__(self, opts: ScanOptions):
        self.opts = opts
        self.caller = Caller(translate, opts)
        self._client: Any = None
        self._lock = threading.Lock()
        self._types = {g: catalog.instances_for_gpu("azure", g) for g in opts.gpus}

    def _call_kw(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "connection_timeout": min(5.0, self.opts.call_timeout_s),
            "read_timeout": self.opts.call_timeout_s,
        }
        if self.opts.endpoints.get("azure", "").startswith("http://"):
            # azure-core refuses bearer tokens over plain http; a loopback emulator has no TLS.
            kw["enforce_https"] = False
        return kw

    def connect(self) -> list[str]:
        try:
            from azure.mgmt.compute import ComputeManagementClient
        except ImportError as exc:
            raise CloudError(
                ErrorKind.sdk_missing,
                f"azure: azure-mgmt-compute is not installed ({exc.name}): pip install 'gpufleet[clouds]'",
            ) from None
        subscription = self.opts.azure_subscription or os.environ.get("AZURE_SUBSCRIPTION_ID")
        if not subscription:
            raise CloudError(
                ErrorKind.no_credentials,
                "azure: no subscription: pass --azure-subscription or set AZURE_SUBSCRIPTION_ID",
            )
        endpoint = self.opts.endpoints.get("azure")
        kwargs: dict[str, Any] = {"retry_total": 0}  # scan.Caller retries
        if endpoint:
            credential: Any = _StaticToken()
            kwargs["base_url"] = endpoint
        else:
            try:
                from azure.identity import DefaultAzureCredential
            except ImportError as exc:
                raise CloudError(
                    ErrorKind.sdk_missing,
                    f"azure: azure-identity is not installed ({exc.name}): pip install 'gpufleet[clouds]'",
                ) from None
            credential = DefaultAzureCredential()
            # Fail here, once, rather than in every region.
            self.caller.call("get_token", credential.get_token, ARM_SCOPE)
        self._client = ComputeManagementClient(credential, subscription, **kwargs)
        if self.opts.regions is not None:
            return list(self.opts.regions)
        return list(catalog.cloud_info("azure").get("regions", []))

    def cloud_jobs(self, regions: list[str]) -> dict[str, Callable[[], Any]]:
        return {}

    def scan_region(self, region: str) -> list[RegionCapacity]:
        wanted = {it.name.lower(): it for its in self._types.values() for it in its}
        skus = self.caller.call(
            "resource_skus.list",
            lambda: [
                s
                for s in self._client.resource_skus.list(filter=f"location eq '{region}'", **self._call_kw())
                if (s.resource_type or "").lower() == "virtualmachines" and (s.name or "").lower() in wanted
            ],
        )
        usages = self.caller.call(
            "usage.list", lambda: list(self._client.usage.list(region, **self._call_kw()))
        )
        quota = {
            (u.name.value or "").lower(): (float(u.limit), float(u.current_value)) for u in usages if u.name
        }
        found: dict[str, tuple[list[str], int, int, list[str]]] = {}
        for sku in skus:
            zones, notes = self._zones(sku, region)
            caps = {c.name: c.value for c in (sku.capabilities or [])}
            if zones is None:
                found[sku.name.lower()] = ([], 0, 0, notes)
                continue
            found[sku.name.lower()] = (
                zones,
                int(float(caps.get("GPUs", 0) or 0)),
                int(float(caps.get("vCPUs", 0) or 0)),
                notes,
            )
        rows = []
        cores = quota.get("cores")
        for g, its in self._types.items():
            row = RegionCapacity("azure", region, g)
            for it in its:
                if it.name.lower() not in found:
                    continue
                zones, gpus, vcpus, notes = found[it.name.lower()]
                row.notes.extend(notes)
                if not notes or zones:
                    row.offers.append(
                        InstanceOffer(
                            it.name,
                            gpus or it.gpus,
                            vcpus or it.vcpus,
                            zones,
                            catalog.price("azure", region, it.name),
                        )
                    )
            row.instance_type = choose_instance(row.offers)
            offer = row.offer
            if offer is not None:
                it = catalog.instance_type("azure", offer.name)
                family = it.family or ""
                fam = quota.get(family.lower())
                if fam is not None:
                    q = Quota.of(
                        family, "vcpu", fam[0], fam[1], per_node=offer.vcpus, gpus_per_node=offer.gpus
                    )
                    if cores is not None:
                        # The regional vCPU total caps every family.
                        regional = Quota.of(
                            "cores",
                            "vcpu",
                            cores[0],
                            cores[1],
                            per_node=offer.vcpus,
                            gpus_per_node=offer.gpus,
                        )
                        if regional.free_gpus < q.free_gpus:
                            q.free_gpus = regional.free_gpus
                            row.notes.append(
                                f"capped by the regional vCPU quota (cores: {cores[0] - cores[1]:g} free)"
                            )
                    row.quota["on-demand"] = q
                spot_name = catalog.cloud_info("azure").get("spot_quota", "lowPriorityCores")
                spot = quota.get(spot_name.lower())
                if spot is not None:
                    row.quota["spot"] = Quota.of(
                        spot_name, "vcpu", spot[0], spot[1], per_node=offer.vcpus, gpus_per_node=offer.gpus
                    )
            rows.append(row)
        return rows

    def finish(self, rows, cloud_results, cloud_errors):
        return rows, CloudResult("azure")

    @staticmethod
    def _zones(sku: Any, region: str) -> tuple[list[str] | None, list[str]]:
        """Zones the subscription may use; None where the size is closed to it in the whole region."""
        zones: set[str] = set()
        for info in sku.location_info or []:
            if (info.location or "").lower() == region.lower():
                zones.update(info.zones or [])
        notes = []
        for r in sku.restrictions or []:
            # The SDK hands enums back; their .value is the wire string.
            reason = str(getattr(r.reason_code, "value", r.reason_code) or "restricted")
            if (r.type or "").lower() == "location":
                notes.append(f"{sku.name} is not available to this subscription in {region} ({reason})")
                return None, notes
            if (r.type or "").lower() == "zone" and r.restriction_info is not None:
                blocked = set(r.restriction_info.zones or [])
                zones -= blocked
                notes.append(f"{sku.name}: zones {', '.join(sorted(blocked))} restricted ({reason})")
        return sorted(zones), notes
