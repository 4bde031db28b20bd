"""`gpufleet validate --capacity SNAPSHOT`: compare a fleet with what a capacity scan found.

Warnings, not errors: a snapshot is a point in time, and quota can be raised before apply.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from gpufleet.stacks.capacity.snapshot import Snapshot, SnapshotError, read_snapshot

__all__ = ["SnapshotError", "check_fleet_against_snapshot", "check_fleet"]

STALE_AFTER = dt.timedelta(days=7)


def check_fleet_against_snapshot(fleet, snapshot_path: str | Path) -> list[str]:
    """Warnings for `fleet` against the snapshot file; raises SnapshotError for a bad file."""
    return check_fleet(fleet, read_snapshot(snapshot_path))


def check_fleet(fleet, snap: Snapshot) -> list[str]:
    warnings: list[str] = []
    age = snap.age()
    if age > STALE_AFTER:
        warnings.append(f"capacity snapshot is {age.days} days old (taken {snap.taken_at}); take a fresh one")
    for r in fleet.regions:
        cloud, gpu = r.cloud.value, r.gpu
        model = fleet.model_for(r)
        it = r.instance(model.tensor_parallel_size)
        key = f"{r.key} ({cloud} {r.region})"
        row = snap.find(cloud, r.region, gpu)
        if row is None:
            state = snap.clouds.get(cloud)
            why = f": {state.error['message']}" if state and state.error else ""
            if gpu not in snap.gpus:
                warnings.append(f"{key}: the snapshot did not scan {gpu}; not checked")
            else:
                warnings.append(f"{key}: not in the capacity snapshot{why}; not checked")
            continue
        if not row.offered:
            warnings.append(
                f"{key}: {gpu} is not offered there (no zone offers "
                f"{', '.join(i.name for i in _catalog_types(cloud, gpu))})"
            )
            continue
        offer = next((o for o in row.offers if o.name == it.name), None)
        if offer is None:
            warnings.append(
                f"{key}: instance type {it.name} is not offered there; offered: "
                f"{', '.join(o.name for o in row.offers)}"
            )
            continue
        missing = sorted(set(r.zones) - set(offer.zones))
        if missing:
            warnings.append(
                f"{key}: {it.name} is not offered in zone(s) {', '.join(missing)}; "
                f"offered in {', '.join(offer.zones) or 'no zone'}"
            )
        tier = r.capacity.tier.value
        if tier == "reserved":
            continue  # a reservation brings its own capacity
        quota = row.quota.get(tier)
        need_gpus = r.nodes.max * offer.gpus
        if quota is None:
            warnings.append(f"{key}: the snapshot has no {tier} quota figure; not checked")
            continue
        # The quota's unit per node: vCPUs on AWS and Azure, GPUs on GCP.
        per_node = offer.vcpus if quota.unit == "vcpu" else offer.gpus
        free_units = quota.limit - (quota.used or 0)
        if offer.name == row.instance_type:
            # free_gpus already folds in caps beyond the quota itself (Azure cores, GCP GPUS_ALL_REGIONS).
            allowed_nodes = quota.free_gpus // offer.gpus
        else:
            allowed_nodes = int(max(0.0, free_units) // per_node)
        if r.nodes.max > allowed_nodes:
            warnings.append(
                f"{key}: nodes.max {r.nodes.max} x {it.name} needs {need_gpus} GPUs "
                f"({r.nodes.max * per_node:g} {quota.unit}s of {tier} quota {quota.name}); "
                f"the quota leaves room for {allowed_nodes} node(s) ({free_units:g} {quota.unit}s free)"
            )
    return warnings


def _catalog_types(cloud: str, gpu: str):
    from gpufleet.stacks import catalog

    return catalog.instances_for_gpu(cloud, gpu)
