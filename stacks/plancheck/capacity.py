"""The two questions the policy pack asks of a capacity snapshot: how many GPUs of a type may a
region still get (quota), and is an instance type offered in a region or zone.

The snapshot is the file `gpufleet capacity scan --out FILE` writes (schema `gpufleet.capacity/v1`,
see stacks/capacity/snapshot.py). It is read through that module's `read_snapshot`; where the
capacity package is not importable, a minimal reader takes the same few fields straight from the
JSON: `regions[].{cloud, region, gpu, offers[].{name, zones}, quota.{<tier>: {limit_gpus, free_gpus}}}`.
Quotas are already converted to GPUs by the scan (FACTS.md section 3).

A (cloud, region, GPU type) the snapshot does not mention is "not known", never "not offered": a
snapshot of two regions says nothing about a third.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.stacks.plancheck.inputs import InputError

SCHEMA = "gpufleet.capacity/v1"
SNAPSHOT_HINT = (
    "expected a capacity snapshot from `gpufleet capacity scan --out FILE` (schema gpufleet.capacity/v1)"
)


@dataclass(frozen=True)
class Quota:
    tier: str
    limit_gpus: int
    free_gpus: int


@dataclass
class CapacityView:
    source: str
    # (cloud, region, gpu) -> tier -> quota
    quotas: dict[tuple[str, str, str], dict[str, Quota]] = field(default_factory=dict)
    # (cloud, region, gpu) -> instance type -> zones offering it (empty set: offered, zones not listed)
    offers: dict[tuple[str, str, str], dict[str, set[str]]] = field(default_factory=dict)

    def quota(self, cloud: str, region: str, gpu: str, tier: str) -> Quota | None:
        return self.quotas.get((cloud, region, gpu), {}).get(tier)

    def offered(
        self, cloud: str, region: str, gpu: str, instance_type: str, zone: str | None = None
    ) -> bool | None:
        """True/False where the snapshot scanned this GPU type in this region; None where it did not."""
        offers = self.offers.get((cloud, region, gpu))
        if offers is None:
            return None
        if instance_type not in offers:
            return False
        zones = offers[instance_type]
        if zone is None or not zones:
            return True
        return zone in zones


def tier_of(capacity: str) -> str:
    """A pool's capacity kind as a quota tier (GCP flex-start draws on preemptible quota)."""
    if capacity in ("spot", "flex-start"):
        return "spot"
    if capacity in ("reservation", "capacity-block"):
        return "reserved"  # reserved capacity is paid for already; the snapshot has no quota for it
    return "on-demand"


def load_capacity(path: Path) -> CapacityView:
    """Read a snapshot file; anything unusable raises InputError (exit 2)."""
    try:
        from gpufleet.stacks.capacity.snapshot import SnapshotError, read_snapshot
    except ImportError:
        return _minimal_reader(path)
    try:
        snap = read_snapshot(path)
    except SnapshotError as exc:
        raise InputError(f"{exc}; {SNAPSHOT_HINT}") from None
    view = CapacityView(source=str(path))
    for r in snap.regions:
        key = (r.cloud, r.region, r.gpu)
        view.offers[key] = {o.name: set(o.zones) for o in r.offers}
        view.quotas[key] = {
            tier: Quota(tier, int(q.limit_gpus), int(q.free_gpus)) for tier, q in r.quota.items()
        }
    return view


def _minimal_reader(path: Path) -> CapacityView:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; {SNAPSHOT_HINT}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as JSON ({exc}); {SNAPSHOT_HINT}") from None
    return parse_snapshot_doc(doc, str(path))


def parse_snapshot_doc(doc: Any, source: str) -> CapacityView:
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("regions"), list):
        raise InputError(f"{source}: not a capacity snapshot; {SNAPSHOT_HINT}")
    view = CapacityView(source=source)
    try:
        for r in doc["regions"]:
            key = (str(r["cloud"]), str(r["region"]), str(r["gpu"]))
            view.offers[key] = {
                str(o["name"]): {str(z) for z in o.get("zones") or []} for o in r.get("offers") or []
            }
            view.quotas[key] = {
                str(tier): Quota(str(tier), int(q["limit_gpus"]), int(q["free_gpus"]))
                for tier, q in (r.get("quota") or {}).items()
            }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(
            f"{source}: malformed snapshot entry ({type(exc).__name__}: {exc}); {SNAPSHOT_HINT}"
        ) from None
    return view
