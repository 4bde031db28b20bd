"""What the policies reason about: GPU pools and clusters, read out of provider resources.

The three clouds spell a GPU node pool differently (FACTS.md section 2); this module turns an
`aws_eks_node_group`, a `google_container_node_pool` or an `azurerm_kubernetes_cluster_node_pool`
into one `GpuPool` record: instance type, GPUs per node, node range, taints, capacity kind, zones and
region. Values the plan does not know yet (tokens, `after_unknown`) stay None, and the policies skip
what they cannot decide rather than guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from gpufleet.stacks import catalog
from gpufleet.stacks.plancheck.inputs import Inputs, ResourceChange, blocks, dig, first, text_or

POOL_TYPES = {
    "aws_eks_node_group": "aws",
    "google_container_node_pool": "gcp",
    "azurerm_kubernetes_cluster_node_pool": "azure",
}
CLUSTER_TYPES = {
    "aws_eks_cluster": "aws",
    "google_container_cluster": "gcp",
    "azurerm_kubernetes_cluster": "azure",
}
GPU_TAINT_KEY = "nvidia.com/gpu"
_TOKEN_REF = re.compile(r"\$\{([a-z0-9_]+)\.([A-Za-z0-9_-]+)\.")
_GCP_ZONE = re.compile(r"^([a-z]+-[a-z]+\d+)-[a-z]$")


@dataclass(frozen=True)
class Taint:
    key: str
    value: str | None
    effect: str  # normalised to Kubernetes spelling: NoSchedule, PreferNoSchedule, NoExecute

    @property
    def is_gpu_noschedule(self) -> bool:
        return self.key == GPU_TAINT_KEY and self.effect == "NoSchedule"


@dataclass
class GpuPool:
    change: ResourceChange
    cloud: str
    region: str | None
    instance_type: str | None
    gpu: str | None  # catalog key
    gpus_per_node: int | None
    min_nodes: int | None
    max_nodes: int | None
    taints: list[Taint] | None  # None: not known (e.g. computed)
    capacity: str  # on-demand | spot | reservation | capacity-block | flex-start
    zones: list[str] | None  # None: the plan does not say; for AWS one entry per subnet
    accelerator: str | None = None  # GCP guest_accelerator type
    accelerator_count: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def max_gpus(self) -> int | None:
        if self.max_nodes is None or self.gpus_per_node is None:
            return None
        return self.max_nodes * self.gpus_per_node

    @property
    def pins_one_zone_required(self) -> bool:
        return self.capacity in ("reservation", "capacity-block", "flex-start")


_EFFECTS = {
    "NO_SCHEDULE": "NoSchedule",
    "NOSCHEDULE": "NoSchedule",
    "PREFER_NO_SCHEDULE": "PreferNoSchedule",
    "PREFERNOSCHEDULE": "PreferNoSchedule",
    "NO_EXECUTE": "NoExecute",
    "NOEXECUTE": "NoExecute",
}


def effect_name(raw: Any) -> str:
    """A taint effect in Kubernetes spelling (NO_SCHEDULE, as EKS writes it, -> NoSchedule)."""
    text = str(raw or "")
    return _EFFECTS.get(text.upper().replace("-", "_"), text)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None  # a token or unknown


def truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _str_list(value: Any) -> list[str] | None:
    if isinstance(value, list):
        return [str(v) if v is not None else "(known after apply)" for v in value]
    return None


def region_of(zone_or_region: str | None, cloud: str) -> str | None:
    if not zone_or_region:
        return None
    if cloud == "gcp":
        m = _GCP_ZONE.match(zone_or_region)
        return m.group(1) if m else zone_or_region
    return zone_or_region


class Topology:
    """GPU pools and clusters of all stacks, and each stack's cloud and region."""

    def __init__(self, inputs: Inputs, stack_regions: dict[str, tuple[str, str]] | None = None):
        self.inputs = inputs
        self._by_stack: dict[str, list[ResourceChange]] = {}
        for rc in inputs.changes:
            self._by_stack.setdefault(rc.stack, []).append(rc)
        # fallback from the fleet: stack name -> (cloud, region)
        self._fleet_regions = stack_regions or {}
        self.regions = {stack: self._stack_region(stack) for stack in self._by_stack}
        self.pools: list[GpuPool] = []
        self.non_gpu_pools: list[ResourceChange] = []
        for rc in inputs.changes:
            if rc.type in POOL_TYPES and rc.mode == "managed":
                pool = self._pool(rc)
                if pool is not None:
                    self.pools.append(pool)
                else:
                    self.non_gpu_pools.append(rc)
        self.clusters = [rc for rc in inputs.changes if rc.type in CLUSTER_TYPES and rc.mode == "managed"]

    def in_stack(self, stack: str) -> list[ResourceChange]:
        return self._by_stack.get(stack, [])

    # -- regions ------------------------------------------------------------------------------
    def _stack_region(self, stack: str) -> tuple[str, str] | None:
        info = self.inputs.stacks.get(stack)
        for rc in self.in_stack(stack):
            v = rc.values
            if rc.type == "google_container_cluster" and isinstance(v.get("location"), str):
                return ("gcp", region_of(v["location"], "gcp") or v["location"])
            if rc.type == "azurerm_kubernetes_cluster" and isinstance(v.get("location"), str):
                return ("azure", _azure_region(v["location"]))
        if info is not None:
            if "aws" in info.provider_regions:
                return ("aws", info.provider_regions["aws"])
            if "google" in info.provider_regions:
                return ("gcp", info.provider_regions["google"])
            for name, region in info.provider_regions.items():  # plan JSON: registry.../hashicorp/aws
                if name.endswith("/aws"):
                    return ("aws", region)
        return self._fleet_regions.get(stack)

    def region(self, rc: ResourceChange) -> str | None:
        found = self.regions.get(rc.stack)
        return found[1] if found else None

    # -- pools --------------------------------------------------------------------------------
    def _pool(self, rc: ResourceChange) -> GpuPool | None:
        cloud = POOL_TYPES[rc.type]
        if cloud == "aws":
            return self._aws_pool(rc)
        if cloud == "gcp":
            return self._gcp_pool(rc)
        return self._azure_pool(rc)

    def _referenced(self, rc: ResourceChange, value: Any, rtype: str) -> ResourceChange | None:
        """The resource a cdktf token like ${aws_launch_template.gpu-lt.id} points at, in the same stack."""
        if isinstance(value, str):
            m = _TOKEN_REF.search(value)
            if m and m.group(1) == rtype:
                for other in self.in_stack(rc.stack):
                    if other.type == rtype and other.name == m.group(2):
                        return other
        return None

    def _aws_pool(self, rc: ResourceChange) -> GpuPool | None:
        v = rc.values
        types = _str_list(v.get("instance_types")) or []
        lt_block = first(v.get("launch_template"))
        lt = self._referenced(rc, lt_block.get("id") or lt_block.get("name"), "aws_launch_template")
        if lt is None and lt_block and not types:
            # plans leave references unresolved; a stack with one templated instance type is unambiguous
            typed = [
                o
                for o in self.in_stack(rc.stack)
                if o.type == "aws_launch_template" and isinstance(o.values.get("instance_type"), str)
            ]
            lt = typed[0] if len(typed) == 1 else None
        if not types and lt is not None and isinstance(lt.values.get("instance_type"), str):
            types = [lt.values["instance_type"]]
        ami = str(v.get("ami_type") or "")
        known = [catalog.instance_types("aws")[t] for t in types if t in catalog.instance_types("aws")]
        if not known and "NVIDIA" not in ami and "GPU" not in ami:
            return None
        it = known[0] if known else None
        scaling = first(v.get("scaling_config"))
        taints = (
            None
            if _unknown(rc, "taint")
            else [
                Taint(str(t.get("key")), t.get("value"), effect_name(t.get("effect")))
                for t in blocks(v.get("taint"))
            ]
        )
        capacity_type = str(v.get("capacity_type") or "ON_DEMAND").upper()
        capacity = {"SPOT": "spot", "CAPACITY_BLOCK": "capacity-block"}.get(capacity_type, "on-demand")
        if (
            capacity == "on-demand"
            and lt is not None
            and dig(
                lt.values,
                "capacity_reservation_specification",
                "capacity_reservation_target",
                "capacity_reservation_id",
            )
        ):
            capacity = "reservation"
        return GpuPool(
            change=rc,
            cloud="aws",
            region=self.region(rc),
            instance_type=it.name if it else (types[0] if types else None),
            gpu=it.gpu if it else None,
            gpus_per_node=it.gpus if it else None,
            min_nodes=_int(scaling.get("min_size")),
            max_nodes=_int(scaling.get("max_size")),
            taints=taints,
            capacity=capacity,
            zones=None if _unknown(rc, "subnet_ids") else _str_list(v.get("subnet_ids")),
        )

    def _gcp_pool(self, rc: ResourceChange) -> GpuPool | None:
        v = rc.values
        node = first(v.get("node_config"))
        machine = node.get("machine_type")
        accels = blocks(node.get("guest_accelerator"))
        table = catalog.instance_types("gcp")
        it = table.get(machine) if isinstance(machine, str) else None
        if it is None and not accels:
            return None
        accel_type = str(accels[0].get("type")) if accels and accels[0].get("type") else None
        accel_count = _int(accels[0].get("count")) if accels else None
        gpu_key = it.gpu if it else _gpu_from_accelerator(accel_type)
        locations = None if _unknown(rc, "node_locations") else _str_list(v.get("node_locations"))
        location = text_or(v.get("location"), None)
        if not locations and location and _GCP_ZONE.match(location):
            locations = [location]  # a zonal pool
        auto = first(v.get("autoscaling"))
        fixed = _int(v.get("node_count"))
        zones_n = len(locations) if locations else 1
        if auto:
            lo = _int(auto.get("total_min_node_count"))
            hi = _int(auto.get("total_max_node_count"))
            # min/max_node_count are per zone; the pool's total is that times its zones
            per_zone_lo, per_zone_hi = _int(auto.get("min_node_count")), _int(auto.get("max_node_count"))
            if lo is None and per_zone_lo is not None:
                lo = per_zone_lo * zones_n
            if hi is None and per_zone_hi is not None:
                hi = per_zone_hi * zones_n
        else:
            initial = fixed if fixed is not None else _int(v.get("initial_node_count"))
            lo = hi = None if initial is None else initial * zones_n
        taints = (
            None
            if _unknown(rc, "node_config")
            else [
                Taint(str(t.get("key")), t.get("value"), effect_name(t.get("effect")))
                for t in blocks(node.get("taint"))
            ]
        )
        capacity = "spot" if truthy(node.get("spot")) or truthy(node.get("preemptible")) else "on-demand"
        affinity = first(node.get("reservation_affinity"))
        if str(affinity.get("consume_reservation_type", "")).upper() == "SPECIFIC_RESERVATION":
            capacity = "reservation"
        if truthy(dig(v, "queued_provisioning", "enabled")) or truthy(node.get("flex_start")):
            capacity = "flex-start"
        return GpuPool(
            change=rc,
            cloud="gcp",
            region=region_of(location, "gcp") or self.region(rc),
            instance_type=machine if isinstance(machine, str) else None,
            gpu=gpu_key,
            gpus_per_node=it.gpus if it else accel_count,
            min_nodes=lo,
            max_nodes=hi,
            taints=taints,
            capacity=capacity,
            zones=locations,
            accelerator=accel_type,
            accelerator_count=accel_count,
        )

    def _azure_pool(self, rc: ResourceChange) -> GpuPool | None:
        v = rc.values
        size = v.get("vm_size")
        it = catalog.instance_types("azure").get(size) if isinstance(size, str) else None
        n_series = isinstance(size, str) and size.startswith("Standard_N")
        if it is None and not n_series and v.get("gpu_driver") is None:
            return None
        autoscale = truthy(v.get("auto_scaling_enabled")) or truthy(v.get("enable_auto_scaling"))
        if autoscale:
            lo, hi = _int(v.get("min_count")), _int(v.get("max_count"))
        else:
            lo = hi = _int(v.get("node_count"))
        taints = None
        if not _unknown(rc, "node_taints"):
            taints = [parse_k8s_taint(t) for t in (_str_list(v.get("node_taints")) or [])]
        capacity = "spot" if str(v.get("priority", "")).lower() == "spot" else "on-demand"
        if v.get("capacity_reservation_group_id"):
            capacity = "reservation"
        pool = GpuPool(
            change=rc,
            cloud="azure",
            region=self.region(rc),
            instance_type=size if isinstance(size, str) else None,
            gpu=it.gpu if it else None,
            gpus_per_node=it.gpus if it else None,
            min_nodes=lo,
            max_nodes=hi,
            taints=taints,
            capacity=capacity,
            zones=None if _unknown(rc, "zones") else _str_list(v.get("zones")),
        )
        if not autoscale:
            pool.notes.append("autoscaling is off (auto_scaling_enabled is not true)")
        return pool

    def pools_in_stack(self, stack: str) -> list[GpuPool]:
        return [p for p in self.pools if p.change.stack == stack]


def _unknown(rc: ResourceChange, key: str) -> bool:
    """True where the plan says the attribute is known only after apply."""
    return rc.after is not None and rc.after_unknown.get(key) is True


def parse_k8s_taint(text: str) -> Taint:
    # "key=value:Effect" or "key:Effect"
    body, _, effect = text.rpartition(":")
    if not body:
        return Taint(text, None, "")
    key, _, value = body.partition("=")
    return Taint(key, value or None, effect_name(effect))


def _gpu_from_accelerator(accel: str | None) -> str | None:
    if not accel:
        return None
    try:
        return catalog.gpu(accel).key
    except catalog.CatalogError:
        return None


def _azure_region(location: str) -> str:
    # Azure accepts "East US" as well as "eastus"; the catalog uses the short form
    return location.replace(" ", "").lower()
