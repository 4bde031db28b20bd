"""The load generator: what requests arrive when (a workload), and sending them over real HTTP.

A workload is a list of `WorkItem`s (arrival time, prompt and output length, client region, prefix
blocks). It comes either from a built-in profile whose statistics follow a public trace, or from a
trace file replayed as it is. The same workload feeds the fleet simulator (virtual time) and the
HTTP drivers (bench, demo), which is what makes their results comparable.

Built-in profiles. The quantile tables below were computed from the Azure LLM inference trace 2023
(Azure Public Dataset, CC-BY-4.0; files AzureLLMInferenceTrace_conv.csv and _code.csv in
../shared/traces), published with Patel et al., "Splitwise: Efficient generative LLM inference using
phase splitting", ISCA 2024. They reproduce the paper's reported medians: conversation prompts 1020
tokens and outputs 129 tokens, coding prompts 1500 (trace: 1469) and outputs 13. Arrivals are a gamma
renewal process with the trace's mean rate and coefficient of variation of inter-arrival times
(conversation: 5.53 req/s, CV 1.09; coding: 2.57 req/s, CV 13.2 in the trace, which is bursts of
batch jobs; capped at 3 here so that a one-minute demo is not one burst and silence).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from gpufleet.serving.outcomes import FAILED, OK, REJECTED, RequestRecord

_QUANTILES = (0, 1, 2, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95, 97.5, 99,
              99.5, 99.9, 100)  # fmt: skip


@dataclass(frozen=True)
class Profile:
    name: str
    source: str
    rate_rps: float
    arrival_cv: float
    prompt_quantiles: tuple[int, ...]  # tokens at _QUANTILES
    output_quantiles: tuple[int, ...]


PROFILES: dict[str, Profile] = {
    "conv": Profile(
        name="conv",
        source="Azure LLM inference trace 2023, conversation (Patel et al., Splitwise, ISCA 2024)",
        rate_rps=5.53,
        arrival_cv=1.09,
        prompt_quantiles=(2, 29, 91, 181, 207, 372, 387, 396, 403, 414, 703, 984, 1020, 1045, 1071, 1097,
                          1130, 1189, 1315, 1877, 2735, 4083, 4092, 4142, 4831, 6212, 14050),
        output_quantiles=(7, 16, 24, 41, 54, 67, 77, 85, 91, 96, 103, 113, 129, 151, 177, 217, 384, 395,
                          400, 411, 424, 451, 522, 601, 644, 954, 1000),
    ),
    "code": Profile(
        name="code",
        source="Azure LLM inference trace 2023, code completion (Patel et al., Splitwise, ISCA 2024)",
        rate_rps=2.57,
        arrival_cv=3.0,
        prompt_quantiles=(3, 17, 35, 75, 147, 232, 385, 578, 770, 938, 1075, 1261, 1469, 1690, 1909, 2164,
                          2433, 2745, 3193, 3923, 5194, 7315, 7435, 7436, 7436, 7437, 7437),
        output_quantiles=(6, 6, 6, 6, 7, 7, 8, 9, 9, 10, 11, 12, 13, 14, 16, 18, 20, 24, 29, 39, 55, 90, 145,
                          252, 361, 831, 1899),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class WorkItem:
    id: int
    at_s: float  # arrival, model seconds from the start
    prompt_tokens: int
    max_tokens: int  # the output length; sent with ignore_eos so the engine generates exactly this
    client_region: str | None = None
    hash_ids: tuple[int, ...] = ()  # Mooncake: 512-token prompt blocks, equal ids share a prefix


class WorkloadError(ValueError):
    """A trace or profile that cannot be used; the message says why."""


def _quantile_sample(rng: random.Random, table: Sequence[int]) -> int:
    """Inverse-CDF sampling from a quantile table, log-linear between the tabulated points."""
    u = rng.random() * 100.0
    i = min(bisect.bisect_right(_QUANTILES, u), len(_QUANTILES) - 1)
    q0, q1 = _QUANTILES[i - 1], _QUANTILES[i]
    v0, v1 = math.log(table[i - 1]), math.log(table[i])
    frac = (u - q0) / (q1 - q0) if q1 > q0 else 0.0
    return max(1, round(math.exp(v0 + (v1 - v0) * frac)))


def synthetic(
    profile: str = "conv",
    duration_s: float = 60.0,
    load_scale: float = 1.0,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
) -> list[WorkItem]:
    """A workload drawn from a built-in profile: `load_scale` times the trace's request rate."""
    if profile not in PROFILES:
        raise WorkloadError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    if duration_s <= 0 or load_scale <= 0:
        raise WorkloadError("duration and load scale must be positive")
    p = PROFILES[profile]
    rng = random.Random(seed)
    shape = 1.0 / (p.arrival_cv**2)
    mean_gap = 1.0 / (p.rate_rps * load_scale)
    items: list[WorkItem] = []
    t = rng.gammavariate(shape, mean_gap / shape)
    while t < duration_s:
        prompt = _quantile_sample(rng, p.prompt_quantiles)
        output = _quantile_sample(rng, p.output_quantiles)
        if max_prompt_tokens:
            prompt = min(prompt, max_prompt_tokens)
        if max_output_tokens:
            output = min(output, max_output_tokens)
        items.append(WorkItem(id=len(items), at_s=t, prompt_tokens=prompt, max_tokens=output))
        t += rng.gammavariate(shape, mean_gap / shape)
    return items


def from_trace(
    path: Path,
    load_scale: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
    limit: int | None = None,
) -> list[WorkItem]:
    """Replay a trace file as a workload.

    `load_scale` compresses the arrival times (2.0 = twice the rate); `start_s`/`duration_s` cut a
    slice of the trace's own timeline (before scaling), which is then shifted to start at 0.
    """
    if load_scale <= 0:
        raise WorkloadError("load scale must be positive")
    from gpufleet.serving.traces import TraceError, read_trace

    try:
        rows = read_trace(path)
    except TraceError as exc:
        raise WorkloadError(f"trace {exc}") from None
    items: list[WorkItem] = []
    end = None if duration_s is None else start_s + duration_s
    for row in rows:
        if row.arrival_s < start_s:
            continue
        if end is not None and row.arrival_s >= end:
            break
        items.append(
            WorkItem(
                id=len(items),
                at_s=(row.arrival_s - start_s) / load_scale,
                prompt_tokens=row.prompt_tokens,
                max_tokens=row.output_tokens,
                hash_ids=row.block_hashes or (),
            )
        )
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise WorkloadError(f"trace {path} has no requests in the selected slice")
    return items


def assign_clients(items: Sequence[WorkItem], regions: Sequence[str], weights: Sequence[float] | None = None,
                   seed: int = 0) -> list[WorkItem]:
    """Give each request the region its client is nearest to (the router it arrives at)."""
    if not regions:
        raise WorkloadError("no client regions")
    rng = random.Random(seed ^ 0x5EED)
    w = list(weights) if weights else [1.0] * len(regions)
    return [replace(it, client_region=rng.choices(regions, w)[0]) for it in items]


def clip(items: Sequence[WorkItem], max_model_len: int) -> list[WorkItem]:
    """Shorten requests that could never fit one engine's context (prompt + output <= max_model_len)."""
    out = []
    for it in items:
        if it.prompt_tokens + it.max_tokens <= max_model_len:
            out.append(it)
            continue
        out_tokens = min(it.max_tokens, max(1, max_model_len // 8))
        prompt = max(1, min(it.prompt_tokens, max_model_len - out_tokens))
        keep = prompt // 512 if it.hash_ids else 0
        out.append(replace(it, prompt_tokens=prompt, max_tokens=out_tokens, hash_ids=it.hash_ids[:keep]))
    return out


# ---------------------------------------------------------------------------------------------
# Over real HTTP


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _words(seed: int, n: int) -> list[str]:
    """n pseudo-random 3-letter words; " xyz" is exactly one token of the emulator's tokenizer
    (whitespace plus up to 4 characters per piece) and about one token of a real BPE."""
    rng = random.Random(seed)
    return [" " + "".join(rng.choices(_LETTERS, k=3)) for _ in range(n)]


def prompt_text(item: WorkItem) -> str:
    """Prompt text of `prompt_tokens` tokens. Mooncake prefix blocks become 512 words fixed by the
    block id, so requests that share hash_ids share a text (and token) prefix and hit the prefix
    cache; the rest is unique to the request."""
    out: list[str] = []
    for h in item.hash_ids:
        if len(out) + 512 > item.prompt_tokens:
            break
        out += _words(0x5EED0000 + h, 512)
    out += _words(item.id * 7919 + 17, item.prompt_tokens - len(out))
    return "".join(out)


def _ms_header(headers, name: str) -> float | None:
    """A router's milliseconds header in seconds; None: absent or not a number."""
    value = headers.get(name)
    try:
        return None if value is None else float(value) / 1000
    except ValueError:
        return None


async def run_http(
    items: Sequence[WorkItem],
    targets: dict[str, str],
    model: str,
    time_scale: float = 1.0,
    request_timeout_s: float = 120.0,
    on_done: Callable[[RequestRecord], None] | None = None,
    stop: Callable[[], bool] | None = None,
    max_in_flight: int = 2048,
) -> list[RequestRecord]:
    """Send each item at its arrival time (scaled) as a streaming completion, record the outcome.

    `targets` maps client region -> base URL; items without a client region go to the first target.
    Latencies are recorded in model time: wall seconds x `time_scale`.
    """
    import asyncio
    import json
    import time

    import aiohttp

    if not targets:
        raise WorkloadError("no targets to send requests to")
    default = next(iter(targets))
    records: list[RequestRecord] = []
    limit = asyncio.Semaphore(max_in_flight)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=5)
    connector = aiohttp.TCPConnector(limit=max_in_flight, force_close=False)
    t0 = time.perf_counter()

    async def one(session: aiohttp.ClientSession, item: WorkItem) -> None:
        region = item.client_region if item.client_region in targets else default
        rec = RequestRecord(
            id=item.id, arrival_s=item.at_s, prompt_tokens=item.prompt_tokens, max_tokens=item.max_tokens,
            client_region=region,
        )  # fmt: skip
        body = {
            "model": model,
            "prompt": prompt_text(item),
            "max_tokens": item.max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with limit:
            sent = time.perf_counter()
            first = last = None
            tokens = 0
            try:
                async with session.post(targets[region] + "/v1/completions", json=body,
                                        headers={"X-Gpufleet-Explain": "1"}) as resp:  # fmt: skip
                    rec.region = resp.headers.get("x-gpufleet-region") or None
                    rec.predicted_ttft_s = _ms_header(resp.headers, "x-gpufleet-predicted-ttft-ms")
                    rec.sent_after_s = _ms_header(resp.headers, "x-gpufleet-sent-after-ms")
                    if resp.status == 429:
                        rec.outcome, rec.error = REJECTED, "429"
                        return
                    if resp.status != 200:
                        rec.outcome, rec.error = FAILED, f"http {resp.status}"
                        return
                    done = False
                    async for raw in resp.content:
                        line = raw.strip()
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            done = True
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            rec.error = str(chunk["error"])[:200]
                            break
                        choices = chunk.get("choices") or []
                        if choices and choices[0].get("text"):
                            now = time.perf_counter()
                            first = first or now
                            last = now
                            tokens += 1
                        usage = chunk.get("usage")
                        if usage and usage.get("completion_tokens") is not None:
                            tokens = max(tokens, int(usage["completion_tokens"]))
                        gf = chunk.get("gpufleet") or {}
                        rec.region = gf.get("region", rec.region)
                        rec.continued = rec.continued or bool(gf.get("continued"))
                    rec.outcome = OK if done and first is not None and rec.error is None else FAILED
                    if rec.outcome == FAILED and rec.error is None:
                        rec.error = "stream ended early"
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                rec.outcome, rec.error = FAILED, f"{type(exc).__name__}: {exc}"[:200]
            finally:
                if first is not None:
                    rec.ttft_s = (first - sent) * time_scale
                    rec.e2e_s = ((last or first) - sent) * time_scale
                    if tokens > 1 and last is not None:
                        rec.tpot_s = (last - first) * time_scale / (tokens - 1)
                rec.output_tokens = tokens
                if rec.region and rec.client_region:
                    rec.spilled = rec.region != rec.client_region
                records.append(rec)
                if on_done:
                    on_done(rec)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = []
        for item in sorted(items, key=lambda i: i.at_s):
            if stop and stop():
                break
            delay = item.at_s / time_scale - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, item)))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    return sorted(records, key=lambda r: r.id)
