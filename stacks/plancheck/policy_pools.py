"""Policies on the GPU pools themselves: taint, scale to zero, reservations, quota, offer, and
destructive changes (GPU001 .. GPU005, GPU011)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterator

from gpufleet.stacks import catalog
from gpufleet.stacks.plancheck.capacity import tier_of
from gpufleet.stacks.plancheck.inputs import ResourceChange, first
from gpufleet.stacks.plancheck.policy_base import (
    Context,
    Finding,
    Policy,
    finding,
    live_pools,
    policy,
    where,
)
from gpufleet.stacks.plancheck.pools import CLUSTER_TYPES, POOL_TYPES, GpuPool, Topology


@policy(
    Policy(
        id="GPU001",
        title="GPU pools carry the nvidia.com/gpu NoSchedule taint",
        severity="high",
        rationale=(
            "Without the taint, ordinary pods (system add-ons, the router, batch jobs) land on GPU nodes, "
            "take "
            "their CPU and memory, and keep the autoscaler from scaling the most expensive nodes back to "
            "zero. "
            "Serving pods tolerate the taint; nothing else should. GKE adds the taint on its own only when "
            "the "
            "cluster also has non-GPU pools, so the pack asks for it explicitly on every cloud."
        ),
        fix=(
            "add the taint nvidia.com/gpu=present:NoSchedule (aws_eks_node_group taint "
            '{effect = "NO_SCHEDULE"}; google_container_node_pool node_config.taint; azurerm '
            'node_taints = ["nvidia.com/gpu=present:NoSchedule"])'
        ),
    )
)
def _gpu_taint(ctx: Context) -> Iterator[Finding]:
    for pool in live_pools(ctx.topology.pools):
        if pool.taints is None:
            continue  # known only after apply
        if not any(t.is_gpu_noschedule for t in pool.taints):
            have = ", ".join(f"{t.key}:{t.effect}" for t in pool.taints) or "none"
            yield finding("GPU001", pool.change, f"GPU pool has no nvidia.com/gpu NoSchedule taint (taints: {have})")


@policy(
    Policy(
        id="GPU002",
        title="GPU pools can scale to zero",
        severity="medium",
        rationale=(
            "GPU nodes cost tens of dollars an hour each. A pool whose minimum is above zero (or that does "
            "not "
            "autoscale) pays for idle GPUs around the clock; the router spills traffic to other regions, "
            "so an "
            "idle region may go to zero."
        ),
        fix=(
            "set the minimum to 0 and enable autoscaling (aws scaling_config.min_size = 0; gcp autoscaling "
            "{total_min_node_count = 0}; azure auto_scaling_enabled = true, min_count = 0)"
        ),
    )
)
def _scale_to_zero(ctx: Context) -> Iterator[Finding]:
    for pool in live_pools(ctx.topology.pools):
        rc = pool.change
        if pool.cloud == "gcp" and not first(rc.values.get("autoscaling")):
            yield finding("GPU002", rc, "GPU pool has no autoscaling block, so its size is fixed")
        elif pool.notes:
            yield finding("GPU002", rc, "GPU pool: " + "; ".join(pool.notes))
        elif pool.min_nodes is not None and pool.min_nodes > 0:
            yield finding("GPU002", rc, f"GPU pool keeps at least {pool.min_nodes} node(s) running", min=pool.min_nodes)


@policy(
    Policy(
        id="GPU003",
        title="Capacity-block, reservation and flex-start pools pin one zone",
        severity="high",
        rationale=(
            "A capacity block, a specific reservation or a flex-start/queued request is granted in ONE "
            "zone. A "
            "pool spread over several zones launches nodes in zones where the reservation does not exist: "
            "they "
            "fail with capacity errors or silently fall back to on-demand prices."
        ),
        fix=(
            "give the pool exactly one zone, the reservation's (aws: one subnet_ids entry; gcp: one "
            'node_locations entry; azure: zones = ["<zone>"])'
        ),
    )
)
def _reservation_one_zone(ctx: Context) -> Iterator[Finding]:
    for pool in live_pools(ctx.topology.pools):
        if not pool.pins_one_zone_required or pool.zones is None:
            continue
        if len(pool.zones) != 1:
            spread = f"{len(pool.zones)} zones/subnets" if pool.zones else "no zone (the whole region)"
            yield finding("GPU003", pool.change, f"{pool.capacity} GPU pool spans {spread}", zones=pool.zones)


@policy(
    Policy(
        id="GPU004",
        title="Max GPUs per region fit the quota of the capacity snapshot",
        severity="high",
        rationale=(
            "Quota, not code, caps a GPU fleet. A region whose pools may grow past the quota fails at "
            "scale-up "
            "time (VcpuLimitExceeded, QUOTA_EXCEEDED), which is exactly when the traffic needs it. "
            "Checking max "
            "nodes against the snapshot's free quota moves the failure to the pull request."
        ),
        fix="lower the pools' max nodes, request a quota increase, or move GPUs to a region with quota",
        needs="capacity",
    )
)
def _quota(ctx: Context) -> Iterator[Finding]:
    if ctx.capacity is None:
        return
    groups: dict[tuple[str, str, str, str], list[GpuPool]] = defaultdict(list)
    for pool in live_pools(ctx.topology.pools):
        if pool.region and pool.gpu and pool.max_gpus is not None:
            groups[(pool.cloud, pool.region, pool.gpu, tier_of(pool.capacity))].append(pool)
    for (cloud, region, gpu, tier), pools in sorted(groups.items()):
        quota = ctx.capacity.quota(cloud, region, gpu, tier)
        if quota is None:
            continue
        want = sum(p.max_gpus or 0 for p in pools)
        if want > quota.free_gpus:
            for pool in pools:
                yield finding(
                    "GPU004",
                    pool.change,
                    f"{cloud} {region} may scale to {want} {gpu} GPUs ({tier}) but the snapshot leaves "
                    f"{quota.free_gpus} of {quota.limit_gpus} free",
                    want=want,
                    free=quota.free_gpus,
                )


@policy(
    Policy(
        id="GPU005",
        title="The GPU type is offered in the pool's region and zones",
        severity="high",
        rationale=(
            "GPU instance types are sold in a few zones of a few regions. A pool asking for one where it "
            "is not "
            "offered never gets a node (Unsupported, SkuNotAvailable, ZONE_RESOURCE_POOL_EXHAUSTED). With a "
            "snapshot the pack checks the region and each zone; without one it checks the catalog: the "
            "instance "
            "type exists on that cloud and carries the GPU the pool declares."
        ),
        fix=(
            "pick a region/zone that offers the type (`gpufleet capacity place`), or an instance type of the "
            "catalog (gcp: guest_accelerator type and count must match the machine type)"
        ),
    )
)
def _offered(ctx: Context) -> Iterator[Finding]:
    for pool in live_pools(ctx.topology.pools):
        rc = pool.change
        if pool.instance_type is None:
            continue
        table = catalog.instance_types(pool.cloud)
        it = table.get(pool.instance_type)
        if it is None:
            yield finding(
                "GPU005",
                rc,
                f"{pool.cloud} instance type {pool.instance_type} is not a GPU type of the catalog",
            )
            continue
        if pool.cloud == "gcp" and pool.accelerator is not None:
            if pool.accelerator != it.accelerator or (
                pool.accelerator_count is not None and pool.accelerator_count != it.gpus
            ):
                yield finding(
                    "GPU005",
                    rc,
                    f"{it.name} comes with {it.gpus} x {it.accelerator}, the pool asks for "
                    f"{pool.accelerator_count} x {pool.accelerator}",
                )
        if ctx.capacity is None or pool.region is None:
            continue
        in_region = ctx.capacity.offered(pool.cloud, pool.region, it.gpu, it.name)
        if in_region is False:
            yield finding("GPU005", rc, f"{it.name} is not offered in {pool.cloud} {pool.region} (snapshot)")
            continue
        for zone in _zone_names(pool):
            if ctx.capacity.offered(pool.cloud, pool.region, it.gpu, it.name, zone) is False:
                yield finding("GPU005", rc, f"{it.name} is not offered in zone {zone} (snapshot)", zone=zone)


def _zone_names(pool: GpuPool) -> list[str]:
    """Zones named by the pool itself (AWS pools name subnets, not zones: nothing to check there)."""
    if pool.cloud == "aws" or not pool.zones:
        return []
    return pool.zones  # GCP: us-central1-a; Azure: "1", "2", "3", as the snapshot lists them


@policy(
    Policy(
        id="GPU011",
        title="Destructive changes to GPU pools and clusters are called out",
        severity="high",
        rationale=(
            "Deleting or replacing a GPU pool or cluster drains its GPUs: in-flight requests fail over, KV "
            "caches "
            "are lost, and the GPUs may not come back (stockouts, quota taken by others). Replacement is "
            "often "
            "an accident of a force-new attribute. The finding says how many GPUs the region would lose so "
            "the "
            "reviewer can judge; an intended change is waived with a reason and an expiry."
        ),
        fix=(
            "if unintended, revert the attribute that forces replacement (see the plan's replace_paths); if "
            "intended, drain the region first (`gpufleet failover drain`) and add a dated waiver"
        ),
    )
)
def _destructive(ctx: Context) -> Iterator[Finding]:
    topo = ctx.topology
    for rc in ctx.inputs.changes:
        if not rc.is_destructive or rc.mode != "managed":
            continue
        if rc.type in POOL_TYPES:
            old = _before_pool(topo, rc)
            if old is None:
                continue  # not a GPU pool
            lost = old.max_gpus
            lose = f"up to {lost} {old.gpu or 'GPU'} GPUs" if lost is not None else "its GPUs (count unknown)"
            yield finding(
                "GPU011",
                rc,
                f"{rc.action_label} of a GPU pool: {where(old)} loses {lose}{_swap_note(rc)}",
                gpus_lost=lost,
            )
        elif rc.type in CLUSTER_TYPES:
            pools = [p for p in (_before_pool(topo, o) for o in topo.in_stack(rc.stack) if o.type in POOL_TYPES) if p]
            lost = sum(p.max_gpus or 0 for p in pools)
            region = topo.region(rc) or "(region unknown)"
            yield finding(
                "GPU011",
                rc,
                f"{rc.action_label} of a cluster: {region} loses all {lost} GPUs of its {len(pools)} GPU "
                "pool(s)"
                f"{_swap_note(rc)}",
                severity="critical",
                gpus_lost=lost,
            )


def _before_pool(topo: Topology, rc: ResourceChange) -> GpuPool | None:
    if rc.before is None:
        return None
    return topo._pool(dataclasses.replace(rc, after=None, after_unknown={}, actions=("delete",)))


def _swap_note(rc: ResourceChange) -> str:
    if rc.actions == ("create", "delete"):
        return " (create before delete: the new one needs its own quota while the old one still runs)"
    return ""
