"""Engine signals: scrape each engine's /metrics on an interval, parse what routing needs.

Metric names and formats are vLLM's (V1 engine; docs/FACTS.md section 1). Both the current and the
previous name of a renamed series are read, because vLLM deprecates a name in X.Y, hides it in
X.Y+1 and removes it in X.Y+2, and a fleet runs mixed versions during upgrades.

The request path never waits on a scrape: scrapes run in their own task and replace the engine's
`Sample`; the policy reads the latest one and its age.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
from gpufleet.serving.router.policy import recent_pace

# Current name first; the previous one is a fallback for older engines.
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
PREEMPTIONS = "vllm:num_preemptions_total"
CACHE_CONFIG = "vllm:cache_config_info"
# The inter-token latency histogram's _sum and _count: the engine's recent decode pace.
ITL_SUM = ("vllm:inter_token_latency_seconds_sum", "vllm:time_per_output_token_seconds_sum")
ITL_COUNT = ("vllm:inter_token_latency_seconds_count", "vllm:time_per_output_token_seconds_count")
PROMPT_TOKENS = ("vllm:prompt_tokens_total",)  # counter: prompt tokens prefilled

_WANTED = frozenset(
    (*KV_USAGE, *PREFIX_QUERIES, *PREFIX_HITS, *ITL_SUM, *ITL_COUNT, *PROMPT_TOKENS, RUNNING, WAITING, PREEMPTIONS,
     CACHE_CONFIG)
)
MAX_METRICS_BYTES = 4 * 1024 * 1024


class MetricsError(ValueError):
    """The /metrics text lacks what routing needs, or is not Prometheus text at all."""


@dataclass(frozen=True, slots=True)
class Sample:
    """What one scrape of one engine said. Values are summed over its engine cores (data parallel;
    each core's num_gpu_blocks is its share of the sum vLLM reports: `parse_metrics`)."""

    kv_usage: float  # 0..1, the busiest view over cores weighted by blocks
    num_gpu_blocks: int
    block_size: int
    free_tokens: float
    running: int
    waiting: int
    preemptions_total: float
    prefix_queries_total: float
    prefix_hits_total: float
    models: frozenset[str]
    taken_at: float  # monotonic seconds
    itl_seconds_total: float = 0.0  # inter-token latency histogram _sum (engine seconds)
    itl_tokens_total: float = 0.0  # and its _count (tokens)
    prompt_tokens_total: float = 0.0  # vllm:prompt_tokens_total

    @property
    def capacity_tokens(self) -> int:
        """The tokens one request may grow to: block 0 is vLLM's null block, never handed out. A
        request past this stalls the engine (vllm-project/vllm#35541), so nothing larger is sent."""
        return max(self.num_gpu_blocks - 1, 0) * self.block_size


def _parse_labels(text: str) -> dict[str, str]:
    """Prometheus label set `a="x",b="y"` (escapes \\" \\\\ \\n handled)."""
    labels: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        eq = text.find("=", i)
        if eq < 0:
            break
        name = text[i:eq].strip()
        if eq + 1 >= n or text[eq + 1] != '"':
            raise MetricsError(f"bad label value for {name!r}")
        j, out = eq + 2, []
        while j < n and text[j] != '"':
            if text[j] == "\\" and j + 1 < n:
                out.append({"n": "\n"}.get(text[j + 1], text[j + 1]))
                j += 2
            else:
                out.append(text[j])
                j += 1
        if j >= n:
            raise MetricsError("unterminated label value")
        labels[name] = "".join(out)
        i = j + 1
    return labels


def parse_metrics(text: str, taken_at: float) -> Sample:
    """Parse vLLM's Prometheus text into a `Sample`; raise `MetricsError` when it cannot be used.

    Only the series routing needs are looked at (a cheap prefix test per line), so a scrape of a
    busy engine with many histogram buckets costs little.
    """
    # per engine core ("engine" label): value per series name
    cores: dict[str, dict[str, float]] = {}
    config: dict[str, tuple[int, int]] = {}
    models: set[str] = set()
    for raw in text.splitlines():
        if not raw.startswith("vllm:"):
            continue
        brace = raw.find("{")
        space = raw.find(" ")
        if space < 0:
            continue
        if 0 <= brace < space:
            name = raw[:brace]
            if name not in _WANTED:  # e.g. histogram buckets: skip before the label parse
                continue
            close = raw.rfind("}")
            if close < brace:
                raise MetricsError(f"unbalanced braces in {raw[:80]!r}")
            labels = _parse_labels(raw[brace + 1 : close])
            rest = raw[close + 1 :].split()
        else:
            name = raw[:space]
            labels = {}
            rest = raw[space:].split()
        if name not in _WANTED:
            continue
        if not rest:
            raise MetricsError(f"no value in {raw[:80]!r}")
        try:
            value = float(rest[0])
        except ValueError:
            raise MetricsError(f"bad value in {raw[:80]!r}") from None
        if math.isnan(value) or math.isinf(value):
            raise MetricsError(f"non-finite value in {raw[:80]!r}")
        core = labels.get("engine", "0")
        if name == CACHE_CONFIG:
            try:
                config[core] = (int(float(labels["num_gpu_blocks"])), int(float(labels["block_size"])))
            except (KeyError, ValueError):
                raise MetricsError("vllm:cache_config_info lacks num_gpu_blocks or block_size") from None
            continue
        if "model_name" in labels:
            models.add(labels["model_name"])
        series = cores.setdefault(core, {})
        series[name] = series.get(name, 0.0) + value  # e.g. request_success by finished_reason

    if not config:
        raise MetricsError("no vllm:cache_config_info (num_gpu_blocks, block_size)")
    # Under data parallelism vLLM labels every engine core's cache_config_info with the SUM of
    # num_gpu_blocks over the cores (vllm/v1/engine/utils.py, wait_for_engine_startup: "Sum values
    # from all engines in DP case", v0.11.0; vllm/v1/metrics/loggers.py then emits that one
    # cache_config per engine index): each core has its share.
    cores_n = len(config)
    if cores_n > 1:
        config = {core: (blocks // cores_n, bsize) for core, (blocks, bsize) in config.items()}
    free = used = 0.0
    blocks = 0
    block_size = 0
    totals = dict.fromkeys(("running", "waiting", "pre", "pq", "ph", "itl_s", "itl_n", "pt"), 0.0)
    for core, (n_blocks, bsize) in config.items():
        series = cores.get(core, {})
        usage = _first(series, KV_USAGE)
        if usage is None:
            raise MetricsError(f"no kv cache usage (vllm:kv_cache_usage_perc) for engine {core!r}")
        if not 0.0 <= usage <= 1.0 or n_blocks < 0 or bsize <= 0:
            raise MetricsError(f"out of range: usage {usage}, blocks {n_blocks}, block size {bsize}")
        usable = max(n_blocks - 1, 0) * bsize  # usage = 1 - free / (blocks - 1): the null block
        free += (1.0 - usage) * usable
        used += usage * usable
        blocks += n_blocks
        block_size = max(block_size, bsize)
        totals["running"] += series.get(RUNNING, 0.0)
        totals["waiting"] += series.get(WAITING, 0.0)
        totals["pre"] += series.get(PREEMPTIONS, 0.0)
        totals["pq"] += _first(series, PREFIX_QUERIES) or 0.0
        totals["ph"] += _first(series, PREFIX_HITS) or 0.0
        totals["itl_s"] += _first(series, ITL_SUM) or 0.0
        totals["itl_n"] += _first(series, ITL_COUNT) or 0.0
        totals["pt"] += _first(series, PROMPT_TOKENS) or 0.0
    capacity = free + used
    return Sample(
        kv_usage=used / capacity if capacity else 1.0,
        num_gpu_blocks=blocks,
        block_size=block_size,
        free_tokens=free,
        running=int(totals["running"]),
        waiting=int(totals["waiting"]),
        preemptions_total=totals["pre"],
        prefix_queries_total=totals["pq"],
        prefix_hits_total=totals["ph"],
        models=frozenset(models),
        taken_at=taken_at,
        itl_seconds_total=totals["itl_s"],
        itl_tokens_total=totals["itl_n"],
        prompt_tokens_total=totals["pt"],
    )


def _first(series: dict[str, float], names: tuple[str, ...]) -> float | None:
    for n in names:
        if n in series:
            return series[n]
    return None


@dataclass(slots=True)
class EngineState:
    """The scraper's record of one engine: its latest good sample and how the last scrape went."""

    url: str
    sample: Sample | None = None
    previous: Sample | None = None
    healthy: bool = False  # the last scrape answered and parsed
    error: str | None = "not scraped yet"
    last_scrape_at: float | None = None
    scrape_seconds: float = 0.0  # wall time of the last scrape (fetch + parse)
    failures: int = 0
    recent_itl_s: float | None = None  # decode pace between the last two samples (policy.recent_pace)
    # prompt tokens prefilled and output tokens timed between the last two samples (None: unknown)
    recent_prompt_tokens: float | None = None
    recent_itl_tokens: float | None = None

    def record(self, sample: Sample) -> None:
        prev = self.sample
        self.previous, self.sample = prev, sample
        self.healthy, self.error, self.failures = True, None, 0
        self.recent_itl_s = (
            None
            if prev is None
            else recent_pace(
                prev.itl_seconds_total, prev.itl_tokens_total, sample.itl_seconds_total,
                sample.itl_tokens_total, sample.running, self.recent_itl_s,
            )  # fmt: skip
        )
        if prev is not None and sample.prompt_tokens_total >= prev.prompt_tokens_total:
            self.recent_prompt_tokens = sample.prompt_tokens_total - prev.prompt_tokens_total
            self.recent_itl_tokens = (
                sample.itl_tokens_total - prev.itl_tokens_total
                if sample.itl_tokens_total >= prev.itl_tokens_total else None
            )
        else:
            self.recent_prompt_tokens = self.recent_itl_tokens = None

    def fail(self, error: str) -> None:
        self.healthy, self.error = False, error
        self.failures += 1

    def rates(self) -> tuple[float | None, float | None]:
        """(preemptions per second, prefix cache hit rate) between the last two samples."""
        s, p = self.sample, self.previous
        if s is None or p is None or s.taken_at <= p.taken_at:
            return None, None
        preempt = max(0.0, s.preemptions_total - p.preemptions_total) / (s.taken_at - p.taken_at)
        dq = s.prefix_queries_total - p.prefix_queries_total
        hit = (s.prefix_hits_total - p.prefix_hits_total) / dq if dq > 0 else None
        return preempt, hit


@dataclass
class Scraper:
    """Scrapes a changing set of engines concurrently, every `interval_s`, each within `timeout_s`."""

    interval_s: float = 1.0
    timeout_s: float = 0.5
    engines: dict[str, EngineState] = field(default_factory=dict)
    on_round: Callable[[], None] | None = None  # called after each round (wakes the queue)
    on_sample: Callable[[str, Sample], None] | None = None
    rounds: int = 0
    _session: aiohttp.ClientSession | None = None

    def set_engines(self, urls: Iterable[str]) -> None:
        urls = list(dict.fromkeys(u.rstrip("/") for u in urls))
        for u in urls:
            self.engines.setdefault(u, EngineState(u))
        for gone in set(self.engines) - set(urls):
            del self.engines[gone]

    async def scrape_one(self, state: EngineState) -> None:
        assert self._session is not None
        start = time.monotonic()
        try:
            async with self._session.get(f"{state.url}/metrics") as resp:
                if resp.status != 200:
                    raise MetricsError(f"/metrics answered {resp.status}")
                body = await resp.content.read(MAX_METRICS_BYTES + 1)
                if len(body) > MAX_METRICS_BYTES:
                    raise MetricsError("/metrics is larger than 4 MiB")
            taken = time.monotonic()
            sample = parse_metrics(body.decode("utf-8", "replace"), taken)
        except (aiohttp.ClientError, TimeoutError, OSError, MetricsError, UnicodeError) as exc:
            state.fail(f"{type(exc).__name__}: {exc}"[:200])
        else:
            state.record(sample)
            if self.on_sample is not None:
                self.on_sample(state.url, sample)
        finally:
            state.last_scrape_at = time.monotonic()
            state.scrape_seconds = state.last_scrape_at - start

    async def scrape_all(self) -> None:
        states = list(self.engines.values())
        if states:
            await asyncio.gather(*(self.scrape_one(s) for s in states))
        self.rounds += 1
        if self.on_round is not None:
            self.on_round()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, enable_cleanup_closed=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            self._session = session
            while True:
                started = time.monotonic()
                await self.scrape_all()
                # Fixed cadence: a slow round does not push every later round back.
                await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))


async def resolve_engines(host_port: str, scheme: str = "http") -> list[str]:
    """The engines behind a DNS name: one base URL per A record (IPv4, as Kubernetes headless
    services publish them)."""
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"engines_dns must be host:port, not {host_port!r}")
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM)
    addrs = sorted({info[4][0] for info in infos})
    return [f"{scheme}://{a}:{port}" for a in addrs]
