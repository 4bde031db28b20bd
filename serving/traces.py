"""Readers for the public request traces in ../shared/traces/, into one record type.

* Azure LLM inference trace 2023 (CSV: TIMESTAMP,ContextTokens,GeneratedTokens; wall-clock stamps
  like `2023-11-16 18:15:46.6805900`): token counts only, no prefix information.
* Mooncake (JSONL, gzip'd or not: timestamp in ms from start, input_length, output_length,
  hash_ids naming 512-token prompt blocks; equal ids mean a shared prefix).

    records = read_trace(TRACES / "AzureLLMInferenceTrace_conv.csv")
    part = time_window(records, 600, 900)          # [600 s, 900 s), arrivals rebased to 0
    ids = synthesize_prompt(rec)                   # token ids; shared hash_ids -> shared ids
    hashes = prompt_block_hashes(rec, 16)          # or: the engine's block hashes directly (fast)

Pure Python, standard library only.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class TraceRecord:
    arrival_s: float  # seconds from the trace's first request
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...] | None = None  # Mooncake hash_ids, one per 512-token block
    hash_block_tokens: int = MOONCAKE_BLOCK_TOKENS
    index: int = 0  # position in the file (a stable seed for synthesized prompts)


def _parse_azure_time(text: str) -> float:
    text = text.strip()
    head, _, frac = text.partition(".")
    dt = datetime.strptime(head, "%Y-%m-%d %H:%M:%S")
    return dt.timestamp() + (float("0." + frac) if frac else 0.0)


def _azure_records(path: Path, text: str) -> list[TraceRecord]:
    reader = csv.DictReader(io.StringIO(text))
    need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
    if not reader.fieldnames or not need <= set(reader.fieldnames):
        raise TraceError(
            f"{path}: neither an Azure trace CSV (columns {', '.join(sorted(need))}) "
            "nor Mooncake JSONL (one JSON object a line)"
        )
    out: list[TraceRecord] = []
    t0: float | None = None
    for i, row in enumerate(reader):
        try:
            t = _parse_azure_time(row["TIMESTAMP"])
            prompt, output = int(row["ContextTokens"]), int(row["GeneratedTokens"])
        except (ValueError, TypeError, AttributeError) as exc:
            raise TraceError(f"{path}:{i + 2}: {exc}") from None
        if t0 is None:
            t0 = t
        out.append(TraceRecord(t - t0, max(1, prompt), max(1, output), index=i))
    return out


def _mooncake_records(path: Path, text: str) -> list[TraceRecord]:
    out: list[TraceRecord] = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(
                TraceRecord(
                    arrival_s=float(d["timestamp"]) / 1000.0,
                    prompt_tokens=max(1, int(d["input_length"])),
                    output_tokens=max(1, int(d["output_length"])),
                    block_hashes=tuple(int(h) for h in d.get("hash_ids") or ()) or None,
                    index=i,
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TraceError(f"{path}:{i + 1}: {exc!r}") from None
    return out


def read_trace(path: str | Path) -> list[TraceRecord]:
    """Either format, told apart by content (gzip'd or not), sorted by arrival from 0.

    Raises TraceError naming the file (and line) for a missing, unreadable, empty or malformed trace.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc}") from None
    if text.lstrip()[:1] == "{":
        out = _mooncake_records(path, text)
    else:
        out = _azure_records(path, text)
    if not out:
        raise TraceError(f"{path}: the trace has no requests")
    t0 = min(r.arrival_s for r in out)
    return sorted((replace(r, arrival_s=r.arrival_s - t0) for r in out), key=lambda r: r.arrival_s)


def time_window(
    records: Iterable[TraceRecord], start_s: float, end_s: float | None = None, rebase: bool = True
) -> list[TraceRecord]:
    """Records with start_s <= arrival < end_s; with rebase, arrivals shift to start at 0."""
    out = [r for r in records if r.arrival_s >= start_s and (end_s is None or r.arrival_s < end_s)]
    if rebase:
        out = [replace(r, arrival_s=r.arrival_s - start_s) for r in out]
    return out


def scale_rate(records: Iterable[TraceRecord], factor: float) -> list[TraceRecord]:
    """factor x the request rate (arrival times divided by factor)."""
    if factor <= 0:
        raise ValueError("factor must be > 0")
    return [replace(r, arrival_s=r.arrival_s / factor) for r in records]


def _mix(a: int, b: int) -> int:
    x = (a * 0x9E3779B97F4A7C15 + b * 0xC2B2AE3D27D4EB4F + 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x


def synthesize_prompt(rec: TraceRecord, vocab: int = 128_000) -> list[int]:
    """Token ids of length rec.prompt_tokens. Records sharing leading hash_ids get identical token
    ids over those blocks (so the engine's prefix cache sees the shared prefix); records without
    hash_ids (Azure) get ids unique to the record (no sharing, which the Azure trace cannot tell)."""
    n = rec.prompt_tokens
    size = rec.hash_block_tokens
    ids: list[int] = []
    if rec.block_hashes:
        for hid in rec.block_hashes:
            take = min(size, n - len(ids))
            if take <= 0:
                break
            ids.extend(256 + _mix(hid + 1, i) % (vocab - 256) for i in range(take))
    seed = -(rec.index + 1)
    while len(ids) < n:
        ids.append(256 + _mix(seed, len(ids)) % (vocab - 256))
    return ids


def prompt_block_hashes(rec: TraceRecord, block_size: int = 16) -> list[int] | None:
    """The engine's chained block hashes for the prompt's full blocks, straight from hash_ids
    (no token ids): equal leading hash_ids give equal block hashes. None for records without
    hash_ids. Use either these or synthesize_prompt() in one run, not both (their hashes differ)."""
    if not rec.block_hashes:
        return None
    n_full = rec.prompt_tokens // block_size
    per = rec.hash_block_tokens // block_size if rec.hash_block_tokens >= block_size else 1
    out: list[int] = []
    parent = 0
    for i in range(n_full):
        j = i // per
        if j >= len(rec.block_hashes):
            break
        parent = hash((parent, rec.block_hashes[j], i))
        out.append(parent)
    return out


def iter_requests(
    records: Iterable[TraceRecord], block_size: int = 16, tokens: bool = False, prefix: str = "req"
) -> Iterator[tuple[float, object]]:
    """(arrival_s, engine Request) pairs for the virtual loop. tokens=True synthesizes token ids
    (slower; the HTTP path); otherwise prompt lengths plus block hashes from hash_ids."""
    from gpufleet.serving.engine.model import Request

    for i, rec in enumerate(records):
        if tokens:
            req = Request(
                f"{prefix}-{i}",
                prompt_token_ids=synthesize_prompt(rec),
                max_tokens=rec.output_tokens,
                ignore_eos=True,
            )
        else:
            req = Request(
                f"{prefix}-{i}",
                prompt_len=rec.prompt_tokens,
                max_tokens=rec.output_tokens,
                prompt_block_hashes=prompt_block_hashes(rec, block_size),
                ignore_eos=True,
            )
        yield rec.arrival_s, req
