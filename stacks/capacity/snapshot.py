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

Readers accept the same major version only, and say so clearly otherwise.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.stacks.capacity.model import CloudResult, RegionCapacity

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


def read_snapshot(path: str | Path) -> Snapshot:
    path = Path(path)
    try:
        if path.is_dir():
            raise SnapshotError(
                f"{path}: is a directory; give a snapshot file from `gpufleet capacity scan --out`"
            )
        if path.stat().st_size > MAX_SNAPSHOT_BYTES:
            raise SnapshotError(f"{path}: is larger than 32 MiB; not a capacity snapshot")
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SnapshotError(
            f"{path}: no such file; take one with `gpufleet capacity scan --out {path}`"
        ) from None
    except UnicodeDecodeError:
        raise SnapshotError(f"{path}: is not UTF-8 text; not a capacity snapshot") from None
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SnapshotError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    return snapshot_from_dict(doc, str(path))


def snapshot_from_dict(doc: Any, where: str = "<snapshot>") -> Snapshot:
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
        taken_at = str(doc["taken_at"])
        parse_time(taken_at)
        clouds = {c: CloudResult(**v) for c, v in (doc.get("clouds") or {}).items()}
        regions = [RegionCapacity.from_dict(r) for r in doc.get("regions") or []]
        gpus = [str(g) for g in doc.get("gpus") or []]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"{where}: malformed snapshot ({type(exc).__name__}: {exc})") from None
    return Snapshot(taken_at, gpus, clouds, regions)
