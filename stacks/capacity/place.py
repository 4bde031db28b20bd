"""Placement advice: which regions to ask for N GPUs, from a capacity snapshot.

Cheapest per GPU-hour first; spread over at least two regions where the snapshot allows it (a region
that runs out, fails or is drained then leaves the fleet with capacity); whole nodes only; GCP's
project-wide GPUS_ALL_REGIONS is honoured across regions. The result renders as fleet-file region
entries, and can be appended to a fleet file without disturbing the rest of it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gpufleet.stacks.capacity.model import RegionCapacity
from gpufleet.stacks.capacity.snapshot import Snapshot


class PlacementError(Exception):
    """Not enough obtainable GPUs; `obtainable` says how many there are."""

    def __init__(self, message: str, obtainable: int):
        super().__init__(message)
        self.obtainable = obtainable


class FleetWriteError(Exception):
    """The fleet file cannot take the entries; the message (and `problems`) say why."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


@dataclass
class Pick:
    row: RegionCapacity
    nodes: int

    @property
    def gpus(self) -> int:
        return self.nodes * _gpus_per_node(self.row)

    @property
    def cost_per_hour(self) -> float | None:
        p = self.row.price
        return None if p is None else p * self.nodes


@dataclass
class Placement:
    gpu: str
    wanted: int
    tier: str
    picks: list[Pick]

    @property
    def gpus(self) -> int:
        return sum(p.gpus for p in self.picks)

    @property
    def cost_per_hour(self) -> float | None:
        costs = [c for p in self.picks if (c := p.cost_per_hour) is not None]
        return sum(costs) if len(costs) == len(self.picks) else None


def _gpus_per_node(row: RegionCapacity) -> int:
    assert row.offer is not None  # candidates() keeps only rows with an offer
    return row.offer.gpus


def candidates(
    snap: Snapshot,
    gpu: str,
    *,
    tier: str = "on-demand",
    max_price: float | None = None,
    clouds: list[str] | None = None,
    exclude: set[tuple[str, str]] | None = None,
) -> list[RegionCapacity]:
    """Regions that can give at least one node, cheapest per GPU first (unpriced last)."""
    out = []
    for r in snap.regions:
        if r.gpu != gpu or (clouds and r.cloud not in clouds) or (exclude and (r.cloud, r.region) in exclude):
            continue
        if r.obtainable(tier) <= 0 or r.offer is None or r.obtainable(tier) < r.offer.gpus:
            continue
        if max_price is not None and (r.price_per_gpu is None or r.price_per_gpu > max_price):
            continue
        out.append(r)
    return sorted(
        out,
        key=lambda r: (
            r.price_per_gpu is None,
            r.price_per_gpu or 0.0,
            -r.obtainable(tier),
            r.cloud,
            r.region,
        ),
    )


def _allocate(
    rows: list[RegionCapacity], wanted: int, tier: str, cap: int | None, global_free: dict[str, int]
) -> tuple[list[Pick], int]:
    left = dict(global_free)
    remaining = wanted
    picks = []
    for r in rows:
        if remaining <= 0:
            break
        per_node = _gpus_per_node(r)
        avail = r.obtainable(tier)
        if cap is not None:
            avail = min(avail, max(per_node, math.ceil(cap / per_node) * per_node))
        if r.cloud in left:
            avail = min(avail, left[r.cloud])
        nodes = min(math.ceil(remaining / per_node), avail // per_node)
        if nodes <= 0:
            continue
        picks.append(Pick(r, nodes))
        remaining -= nodes * per_node
        if r.cloud in left:
            left[r.cloud] -= nodes * per_node
    return picks, remaining


def place(
    snap: Snapshot,
    gpu: str,
    gpus: int,
    *,
    tier: str = "on-demand",
    max_price: float | None = None,
    clouds: list[str] | None = None,
    exclude: set[tuple[str, str]] | None = None,
) -> Placement:
    rows = candidates(snap, gpu, tier=tier, max_price=max_price, clouds=clouds, exclude=exclude)
    global_free = {c: r.global_free_gpus for c, r in snap.clouds.items() if r.global_free_gpus is not None}
    if len(rows) >= 2:
        # First try with no region holding more than half: spread, still cheapest first.
        picks, remaining = _allocate(rows, gpus, tier, math.ceil(gpus / 2), global_free)
        if remaining <= 0 and len(picks) >= 2:
            return Placement(gpu, gpus, tier, picks)
    picks, remaining = _allocate(rows, gpus, tier, None, global_free)
    if remaining > 0:
        have = gpus - remaining
        where = f" at or under ${max_price:g} per GPU-hour" if max_price is not None else ""
        scope = f" on {', '.join(clouds)}" if clouds else ""
        raise PlacementError(
            f"only {have} of {gpus} {gpu} GPUs are obtainable ({tier}){scope}{where} "
            f"in snapshot {snap.taken_at} "
            f"({len(rows)} regions with room); ask for a quota increase, allow more clouds or a higher "
            "--max-price, or take a fresh snapshot",
            have,
        )
    return Placement(gpu, gpus, tier, picks)


def render_entries(placement: Placement, indent: int = 2, taken_at: str = "") -> str:
    """Fleet-file region entries, one block per pick, with the dash at column `indent`."""
    pad = " " * indent
    lines = []
    for p in placement.picks:
        r = p.row
        cost = f", ${p.cost_per_hour:,.2f}/h at max" if p.cost_per_hour is not None else ", price unknown"
        stamp = f" (snapshot {taken_at})" if taken_at else ""
        lines.append(
            f"{pad}# gpufleet capacity place: {p.gpus} x {r.gpu} in {r.cloud} {r.region}{cost}{stamp}"
        )
        lines.append(f"{pad}- cloud: {r.cloud}")
        lines.append(f"{pad}  region: {r.region}")
        if r.zones:
            lines.append(f"{pad}  zones: {json.dumps(r.zones)}")
        lines.append(f"{pad}  gpu: {r.gpu}")
        lines.append(f"{pad}  instance_type: {r.instance_type}")
        lines.append(f"{pad}  nodes: {{min: 0, max: {p.nodes}}}")
        lines.append(f"{pad}  capacity: {{tier: {placement.tier}}}")
    return "\n".join(lines) + "\n"


def fleet_regions(path: Path) -> set[tuple[str, str]]:
    """(cloud, region) pairs a fleet file already has, so placement skips them."""
    from gpufleet.stacks.fleetfile import FleetFileError, load_fleet

    try:
        fleet = load_fleet(path)
    except FleetFileError as exc:
        raise FleetWriteError(f"{path} is not a valid fleet file", [str(p) for p in exc.problems]) from None
    return {(r.cloud.value, r.region) for r in fleet.regions}


def append_to_fleet(path: Path, placement: Placement, taken_at: str = "") -> str:
    """Add the placement's regions to the fleet file's `regions:` list; everything else stays as it was.

    The result is validated before it replaces the file; returns the new text.
    """
    import yaml
    from gpufleet.stacks.fleetfile import MAX_FLEET_BYTES, FleetFileError, parse_fleet
    from gpufleet.stacks.readers import ReadError, decode_utf8, load_yaml, read_bytes

    try:
        text = decode_utf8(read_bytes(path, MAX_FLEET_BYTES, "fleet YAML file"), str(path))
        _, root = load_yaml(text, str(path))
    except ReadError as exc:
        if exc.code == "missing":
            raise FleetWriteError(f"{path}: no such file; --write adds regions to an existing fleet file") from None
        raise FleetWriteError(f"{path}: cannot take the entries", [str(exc)]) from None
    if not isinstance(root, yaml.MappingNode):
        raise FleetWriteError(f"{path}: is not a fleet file (a mapping with fleet, models, regions)")
    seq = next((v for k, v in root.value if getattr(k, "value", None) == "regions"), None)
    if not isinstance(seq, yaml.SequenceNode) or seq.flow_style or not seq.value:
        raise FleetWriteError(
            f"{path}: `regions:` must be a block list (one `- cloud: ...` entry per region) "
            "to add entries to it; add the printed entries by hand"
        )
    last = seq.value[-1]
    first_line = text.splitlines()[seq.value[0].start_mark.line]
    dash = first_line.find("-")
    end = last.end_mark.index
    while end > 0 and text[end - 1] in " \t\r\n":
        end -= 1
    line_end = text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end
    block = render_entries(placement, indent=max(dash, 0), taken_at=taken_at)
    new_text = text[:line_end] + "\n" + block.rstrip("\n") + text[line_end:]
    if not new_text.endswith("\n"):
        new_text += "\n"
    try:
        parse_fleet(new_text, str(path))
    except FleetFileError as exc:
        raise FleetWriteError(
            f"{path}: the fleet would not be valid with these regions; left unchanged",
            [str(p) for p in exc.problems],
        ) from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new_text)
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return new_text
