"""What a capacity scan finds, in one shape for all three clouds.

The clouds count quota in different units (AWS: vCPUs per instance family, GCP: GPUs per region,
Azure: vCPUs per VM family; FACTS.md section 3). Every figure here is kept in the cloud's own unit
AND converted to GPUs through the catalog's vCPUs per GPU, so placement can add them up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class ErrorKind(StrEnum):
    """Why a call or a whole cloud failed; decides retrying and the advice printed."""

    no_credentials = "no-credentials"
    denied = "access-denied"
    not_enabled = "api-not-enabled"
    throttled = "throttled"
    timeout = "timeout"
    unreachable = "unreachable"
    not_found = "not-found"
    sdk_missing = "sdk-missing"
    bad_input = "bad-input"
    failed = "failed"

    @property
    def retryable(self) -> bool:
        return self in (ErrorKind.throttled, ErrorKind.timeout, ErrorKind.unreachable)


class CloudError(Exception):
    """A cloud API failure already translated into one line that says what to do."""

    def __init__(self, kind: ErrorKind, message: str, *, status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "message": self.message}


@dataclass
class Quota:
    """One quota, in the cloud's unit and in GPUs of the region's instance type."""

    name: str  # AWS quota code, GCP metric, Azure family
    unit: str  # "vcpu" or "gpu"
    limit: float
    used: float | None  # None where the cloud did not say
    limit_gpus: int
    free_gpus: int  # whole nodes' worth of GPUs that still fit under the limit

    @staticmethod
    def of(
        name: str, unit: str, limit: float, used: float | None, *, per_node: float, gpus_per_node: int
    ) -> Quota:
        """Convert a quota counted in `unit` (per_node = that unit per node) into whole nodes of GPUs."""
        free = max(0.0, limit - (used or 0.0))
        nodes_limit = int(limit // per_node) if per_node > 0 else 0
        nodes_free = int(free // per_node) if per_node > 0 else 0
        return Quota(name, unit, limit, used, nodes_limit * gpus_per_node, nodes_free * gpus_per_node)


@dataclass
class InstanceOffer:
    name: str
    gpus: int
    vcpus: int
    zones: list[str]
    price: float | None  # USD per node-hour, from the catalog

    @property
    def price_per_gpu(self) -> float | None:
        return None if self.price is None else self.price / self.gpus


@dataclass
class RegionCapacity:
    """One (cloud, region, GPU type): where it is offered, how much quota is left, what it costs."""

    cloud: str
    region: str
    gpu: str
    offers: list[InstanceOffer] = field(default_factory=list)
    instance_type: str | None = None  # the one placement would use
    quota: dict[str, Quota] = field(default_factory=dict)  # tier ("on-demand", "spot") -> quota
    spot_score: int | None = None  # AWS spot placement score 1..10
    notes: list[str] = field(default_factory=list)

    @property
    def offered(self) -> bool:
        return bool(self.offers)

    @property
    def zones(self) -> list[str]:
        return sorted({z for o in self.offers if o.name == self.instance_type for z in o.zones})

    @property
    def offer(self) -> InstanceOffer | None:
        return next((o for o in self.offers if o.name == self.instance_type), None)

    def obtainable(self, tier: str = "on-demand") -> int:
        """GPUs one could still start here: 0 where not offered; quota-bound otherwise."""
        if not self.offered:
            return 0
        q = self.quota.get(tier)
        return q.free_gpus if q is not None else 0

    @property
    def price(self) -> float | None:
        o = self.offer
        return o.price if o else None

    @property
    def price_per_gpu(self) -> float | None:
        o = self.offer
        return o.price_per_gpu if o else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["offered"] = self.offered
        d["zones"] = self.zones
        d["obtainable_gpus"] = self.obtainable("on-demand")
        d["obtainable_spot_gpus"] = self.obtainable("spot")
        d["price_per_gpu_hour"] = self.price_per_gpu
        return d


@dataclass
class CloudResult:
    """How one cloud's scan went, plus limits that span its regions (GCP's GPUS_ALL_REGIONS)."""

    cloud: str
    status: str = "ok"  # ok | partial | error | skipped
    error: dict[str, Any] | None = None
    regions_scanned: int = 0
    region_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    global_free_gpus: int | None = None
    notes: list[str] = field(default_factory=list)


def choose_instance(offers: list[InstanceOffer]) -> str | None:
    """The instance type placement uses: cheapest per GPU where priced, else the smallest offered.

    The smallest matches the fleet spec's default (catalog.default_instance) when nothing is priced.
    """
    if not offers:
        return None
    priced = [o for o in offers if o.price is not None]
    if priced:
        return min(priced, key=lambda o: (o.price_per_gpu, o.gpus, o.name)).name
    return min(offers, key=lambda o: (o.gpus, o.name)).name


# Region names look different on each cloud, so a mixed --regions list can be split without asking.
_REGION_PATTERNS = {
    "aws": r"[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d",  # us-east-1, us-gov-west-1
    "gcp": r"[a-z]+-[a-z]+\d+",  # us-central1, europe-west4
    "azure": r"[a-z]+[a-z0-9]*",  # eastus, westeurope, swedencentral
}


def cloud_of_region(region: str) -> str | None:
    import re

    for cloud, pattern in _REGION_PATTERNS.items():
        if re.fullmatch(pattern, region):
            return cloud
    return None
