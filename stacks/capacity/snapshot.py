"""The capacity snapshot file: what a scan found, stamped with when, in a versioned JSON schema.

    {
      "schema": "gpufleet.capacity/v1",
      "taken_at": "2026-01-31T12:00:00Z",          UTC, ISO 8601
      "gpus": ["H100-80GB"],
      "clouds": {"aws": {"status": "ok|partial|error|skipped", "error": {"kind", "message"} | null,
                         "regions_scanned": 30, "region_errors": {"<region>": {"kind", "message"}},
                         "global_free_gpus": null | int, "notes": [...]}},
      "regions": [{"cloud", "region", "gpu", "offered", "zones", "instance_type",
                   "offers": [{"name", "gpus", "vcpus", "zones", "price"}],
                   "quota": {"on-demand": {"name", "unit", "limit", "used", "limit_gpus", "free_gpus"},
                             "spot": {...}},
                   "spot_score", "obtainable_gpus", "obtainable_spot_gpus", "price_per_gpu_hour", "notes"}]
    }

Readers accept the same major version only, and say so clearly otherwise. Every value is checked
(strict types: a price is a number, not "3.5"; counts are whole and >= 0; numbers are finite), and
an error names the file, line and column, and the field.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from gpufleet.stacks.capacity.model import CloudResult, InstanceOffer, Quota, RegionCapacity
from gpufleet.stacks.readers import (
    ReadError,
    decode_utf8,
    dotted,
    json_position,
    parse_json,
    read_bytes,
    schema_message,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA = "gpufleet.capacity/v1"
MAX_SNAPSHOT_BYTES = 32 * 1024 * 1024


class SnapshotError(ValueError):
    """A snapshot file that cannot be used; the message names the file and the problem."""


@dataclass
class Snapshot:
    taken_at: str
    gpus: list[str]
    clouds: dict[str, CloudResult]
    regions: list[RegionCapacity] = field(default_factory=list)

    @staticmethod
    def now() -> str:
        return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")

    def age(self) -> dt.timedelta:
        return dt.datetime.now(dt.UTC) - parse_time(self.taken_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "taken_at": self.taken_at,
            "gpus": list(self.gpus),
            "clouds": {c: asdict(r) for c, r in self.clouds.items()},
            "regions": [r.to_dict() for r in self.regions],
        }

    def find(self, cloud: str, region: str, gpu: str) -> RegionCapacity | None:
        return next((r for r in self.regions if (r.cloud, r.region, r.gpu) == (cloud, region, gpu)), None)


def parse_time(text: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def write_snapshot(snap: Snapshot, path: str | Path) -> None:
    """Write atomically, so a reader never sees half a file."""
    path = Path(path)
    text = json.dumps(snap.to_dict(), indent=2, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# The file's shape, checked strictly; the dataclasses in model.py are what the code works with.
# Keys the writer derives (offered, zones, obtainable_gpus, price_per_gpu_hour) are ignored on read.
class _Doc(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class _QuotaDoc(_Doc):
    name: str
    unit: Literal["vcpu", "gpu"]
    limit: float = Field(ge=0)
    used: float | None = Field(ge=0)
    limit_gpus: int = Field(ge=0)
    free_gpus: int = Field(ge=0)


class _OfferDoc(_Doc):
    name: str
    gpus: int = Field(ge=1)
    vcpus: int = Field(ge=0)
    zones: list[str]
    price: float | None = Field(ge=0, description="USD per node-hour")


class _RegionDoc(_Doc):
    cloud: str
    region: str
    gpu: str
    offers: list[_OfferDoc] = []
    instance_type: str | None = None
    quota: dict[str, _QuotaDoc] = {}
    spot_score: int | None = Field(None, ge=0, le=10)
    notes: list[str] = []


class _CloudDoc(_Doc):
    model_config = ConfigDict(extra="forbid")
    cloud: str
    status: Literal["ok", "partial", "error", "skipped"] = "ok"
    error: dict[str, str] | None = None
    regions_scanned: int = Field(0, ge=0)
    region_errors: dict[str, dict[str, str]] = {}
    global_free_gpus: int | None = Field(None, ge=0)
    notes: list[str] = []


class _SnapshotDoc(_Doc):
    schema_: str = Field(alias="schema")
    taken_at: str
    gpus: list[str] | None = None
    clouds: dict[str, _CloudDoc] | None = None
    regions: list[_RegionDoc] | None = None


def read_snapshot(path: str | Path) -> Snapshot:
    path = Path(path)
    try:
        raw = read_bytes(path, MAX_SNAPSHOT_BYTES, "capacity snapshot from `gpufleet capacity scan --out`")
        text = decode_utf8(raw, str(path))
        doc = parse_json(text, str(path))
    except ReadError as exc:
        if exc.code == "missing":
            raise SnapshotError(f"{path}: no such file; take one with `gpufleet capacity scan --out {path}`") from None
        raise SnapshotError(str(exc)) from None
    return snapshot_from_dict(doc, str(path), text)


def snapshot_from_dict(doc: Any, where: str = "<snapshot>", text: str | None = None) -> Snapshot:
    """A Snapshot from parsed JSON; `text`, when given, lets errors say line and column."""
    if not isinstance(doc, dict):
        raise SnapshotError(f"{where}: a snapshot is a JSON object, not {type(doc).__name__}")
    schema = doc.get("schema")
    if not isinstance(schema, str) or not schema.startswith("gpufleet.capacity/"):
        raise SnapshotError(f'{where}: not a gpufleet capacity snapshot (no "schema": "{SCHEMA}")')
    if schema != SCHEMA:
        raise SnapshotError(
            f"{where}: schema {schema!r} is not supported; this gpufleet reads {SCHEMA!r}: "
            "take a new snapshot with `gpufleet capacity scan --out FILE`"
        )
    try:
        d = _SnapshotDoc.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple("schema" if p == "schema_" else p for p in err["loc"])
        at = json_position(text, loc) if text is not None else None
        place = f"{where}:{at[0]}:{at[1]}" if at else where
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise SnapshotError(f"{place}: {dotted(loc)}: {schema_message(err)}{more}") from None
    try:
        parse_time(d.taken_at)
    except ValueError:
        raise SnapshotError(f"{where}: taken_at {d.taken_at[:40]!r} is not an ISO 8601 time") from None
    clouds = {c: CloudResult(**v.model_dump()) for c, v in (d.clouds or {}).items()}
    regions = [
        RegionCapacity(
            cloud=r.cloud,
            region=r.region,
            gpu=r.gpu,
            offers=[InstanceOffer(**o.model_dump()) for o in r.offers],
            instance_type=r.instance_type,
            quota={tier: Quota(**q.model_dump()) for tier, q in r.quota.items()},
            spot_score=r.spot_score,
            notes=list(r.notes),
        )
        for r in d.regions or []
    ]
    return Snapshot(d.taken_at, list(d.gpus or []), clouds, regions)
