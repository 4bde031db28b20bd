"""Readers for the public request traces in ../shared/traces/, into one record type.

* Azure LLM inference trace 2023 (CSV: TIMESTAMP,ContextTokens,GeneratedTokens; wall-clock stamps
  like `2023-11-16 18:15:46.6805900`): token counts only, no prefix information.
* Mooncake (JSONL, gzip'd or not: timestamp in ms from start, input_length, output_length,
  hash_ids naming 512-token prompt blocks; equal ids mean a shared prefix).

    records = read_trace(TRACES / "AzureLLMInferenceTrace_conv.csv")
    part = time_window(records, 600, 900)          # [600 s, 900 s), arrivals rebased to 0
    ids = synthesize_prompt(rec)                   # token ids; shared hash_ids -> shared ids
    hashes = prompt_block_hashes(rec, 16)          # or: the engine's block hashes directly (fast)

Pure Python, standard library only (and gpufleet's bounded file readers). Every value is checked:
a timestamp must be a finite number within MAX_TRACE_SPAN_S of the first, token counts whole numbers
from 0 to MAX_TOKENS (0 counts as 1), hash ids whole numbers >= 0.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from gpufleet.stacks.readers import ReadError, decode_utf8, gunzip, parse_json, read_bytes

MOONCAKE_BLOCK_TOKENS = 512
MAX_TRACE_BYTES = 256 * 1024 * 1024  # on disk, and again once decompressed
MAX_TRACE_SPAN_S = 366 * 86400.0  # a request trace covers hours or days; 1e308 ms is a broken file
MAX_TOKENS = 10_000_000  # past any model's context window
_AZURE_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,9})?", re.ASCII)
_COUNT = re.compile(r"\d{1,9}", re.ASCII)


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
    if not _AZURE_TIME.fullmatch(text):
        raise ValueError(f"TIMESTAMP {text[:40]!r} is not YYYY-MM-DD HH:MM:SS[.fraction]")
    head, _, frac = text.partition(".")
    dt = datetime.strptime(head, "%Y-%m-%d %H:%M:%S")
    return dt.timestamp() + (float("0." + frac) if frac else 0.0)


def _azure_count(text: str | None, column: str) -> int:
    value = (text or "").strip()
    if not _COUNT.fullmatch(value) or int(value) > MAX_TOKENS:
        raise ValueError(f"{column} {value[:40]!r} is not a token count (a whole number 0..{MAX_TOKENS})")
    return int(value)


def _mooncake_number(d: dict[str, Any], key: str, whole: bool) -> float:
    """d[key] as a finite number >= 0 (a whole one where `whole`); at most MAX_TOKENS for counts."""
    if key not in d:
        raise ValueError(f"no {key!r}")
    value = d[key]
    # a bool is an int to Python, and a string is not a number: both mean a broken file
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} is {value!r}, not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0 or (whole and number > MAX_TOKENS):
        bound = f" and at most {MAX_TOKENS}" if whole else ""
        raise ValueError(f"{key} is {str(value)[:40]}; it must be a finite number >= 0{bound}")
    if whole and not number.is_integer():
        raise ValueError(f"{key} is {value!r}, not a whole number of tokens")
    return number


def _azure_records(path: Path, text: str) -> list[TraceRecord]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
    try:
        fields = reader.fieldnames
    except csv.Error as exc:
        raise TraceError(f"{path}:1: not a CSV header: {exc}") from None
    if not fields or not need <= set(fields):
        raise TraceError(
            f"{path}: neither an Azure trace CSV (columns {', '.join(sorted(need))}) "
            "nor Mooncake JSONL (one JSON object a line)"
        )
    out: list[TraceRecord] = []
    t0: float | None = None
    try:
        for i, row in enumerate(reader):
            try:
                t = _parse_azure_time(row["TIMESTAMP"] or "")
                prompt = _azure_count(row["ContextTokens"], "ContextTokens")
                output = _azure_count(row["GeneratedTokens"], "GeneratedTokens")
            except (ValueError, TypeError, AttributeError, OverflowError) as exc:
                raise TraceError(f"{path}:{reader.line_num}: {exc}") from None
            if t0 is None:
                t0 = t
            out.append(TraceRecord(t - t0, max(1, prompt), max(1, output), index=i))
    except csv.Error as exc:  # a field past csv's size limit; raised before the line is counted
        raise TraceError(f"{path}:{reader.line_num + 1}: not valid CSV: {exc}") from None
    return out


def _mooncake_records(path: Path, text: str) -> list[TraceRecord]:
    out: list[TraceRecord] = []
    for i, line in enumerate(text.split("\n")):  # "\n" only, so line numbers match an editor's
        if not line.strip():
            continue
        try:
            d = parse_json(line, str(path), first_line=i + 1)
        except ReadError as exc:
            raise TraceError(str(exc)) from None
        try:
            if not isinstance(d, dict):
                raise ValueError(f"a JSON {type(d).__name__}, not an object")
            hashes = d.get("hash_ids")
            if hashes is not None and not isinstance(hashes, list):
                raise ValueError(f"hash_ids is {hashes!r}, not a list")
            for h in hashes or ():
                if isinstance(h, bool) or not isinstance(h, int) or h < 0:
                    raise ValueError(f"hash_ids holds {h!r}, not a whole number >= 0")
            out.append(
                TraceRecord(
                    arrival_s=_mooncake_number(d, "timestamp", whole=False) / 1000.0,
                    prompt_tokens=max(1, int(_mooncake_number(d, "input_length", whole=True))),
                    output_tokens=max(1, int(_mooncake_number(d, "output_length", whole=True))),
                    block_hashes=tuple(hashes or ()) or None,
                    index=i,
                )
            )
        except ValueError as exc:
            raise TraceError(f"{path}:{i + 1}: {exc}") from None
    return out


def read_trace(path: str | Path) -> list[TraceRecord]:
    """Either format, told apart by content (gzip'd or not), sorted by arrival from 0.

    Raises TraceError naming the file (and line) for a missing, unreadable, empty or malformed trace.
    """
    path = Path(path)
    try:
        raw = read_bytes(path, MAX_TRACE_BYTES, "trace file")
        if raw[:2] == b"\x1f\x8b":
            raw = gunzip(raw, str(path), MAX_TRACE_BYTES)
        text = decode_utf8(raw, str(path))
    except ReadError as exc:
        raise TraceError(str(exc)) from None
    if text.lstrip()[:1] == "{":
        out = _mooncake_records(path, text)
    else:
        out = _azure_records(path, text)
    if not out:
        raise TraceError(f"{path}: the trace has no requests")
    t0 = min(r.arrival_s for r in out)
    span = max(r.arrival_s for r in out) - t0
    if not span <= MAX_TRACE_SPAN_S:
        raise TraceError(
            f"{path}: the requests span {span:.3g} s, more than {MAX_TRACE_SPAN_S / 86400:.0f} days; "
            "a timestamp is broken"
        )
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
