"""vLLM's Prometheus metrics for an emulated engine, with vLLM V1's names, labels and buckets.

Names, labels, bucket bounds, order and the moment each is observed follow vLLM 0.11.0's
vllm/v1/metrics/loggers.py (PrometheusStatLogger) and vllm/v1/metrics/stats.py (IterationStats):
every engine series carries `model_name` and `engine`; `vllm:cache_config_info` carries the cache
config in its labels plus `engine` (no `model_name`). Counters are exposed with `_total`, histograms
with `_bucket`/`_sum`/`_count`, numbers as prometheus_client writes them. Times are engine time
(scaled or virtual). Left out: prometheus_client's `_created` series and the process/HTTP metrics.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator

from gpufleet.serving.engine.model import Engine, Request, ResolvedConfig, StepPlan
from prometheus_client.utils import floatToGoString

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
# inter_token_latency, its deprecated twin time_per_output_token, request_time_per_output_token
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)
# vllm/v1/engine/__init__.py FinishReason at v0.11.0: STOP, LENGTH, ABORT (no "error")
FINISH_REASONS = ("stop", "length", "abort")


def build_1_2_5_buckets(max_value: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 buckets up to max_value (request_prompt_tokens, request_generation_tokens)."""
    out: list[float] = []
    exp = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > max_value:
                return tuple(out)
            out.append(float(v))
        exp += 1


def cache_config_labels(cfg: ResolvedConfig, engine_index: str = "0") -> dict[str, str]:
    """`vllm:cache_config_info`'s labels: CacheConfig.metrics_info() of vLLM 0.11.0
    (vllm/config/cache.py: str() of every attribute in declaration order, then swap_space_bytes set
    in __post_init__), plus `engine` last (vllm/v1/metrics/loggers.py, log_metrics_info). The API
    server process never learns num_cpu_blocks, so it stays "None" there."""
    swap_space = 4.0  # GiB, vLLM's default (a pydantic float, so "4.0")
    return {
        "block_size": str(cfg.block_size),
        "gpu_memory_utilization": str(float(cfg.gpu_memory_utilization)),
        "swap_space": str(swap_space),
        "cache_dtype": str(cfg.kv_cache_dtype),
        "is_attention_free": "False",
        "num_gpu_blocks_override": str(cfg.num_gpu_blocks_override),
        "sliding_window": "None",
        "enable_prefix_caching": str(bool(cfg.enable_prefix_caching)),
        "prefix_caching_hash_algo": "sha256",  # vLLM's default; "builtin" is no longer valid
        "cpu_offload_gb": "0.0",
        "calculate_kv_scales": "False",
        "cpu_kvcache_space_bytes": "None",
        "mamba_page_size_padded": "None",
        "mamba_cache_dtype": "auto",
        "mamba_ssm_cache_dtype": "auto",
        "num_gpu_blocks": str(cfg.num_gpu_blocks),
        "num_cpu_blocks": "None",
        "kv_sharing_fast_prefill": "False",
        "kv_cache_memory_bytes": "None",
        "swap_space_bytes": str(swap_space * (1 << 30)),
        "engine": engine_index,
    }


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += n
        self.sum += v * n
        self.count += n

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for b, c in zip(self.bounds, self.counts, strict=False):
            acc += c
            out.append((floatToGoString(b), acc))
        out.append(("+Inf", self.count))
        return out


class EngineMetrics:
    """Listens to one Engine and renders its /metrics text.

    When vLLM 0.11 observes what (vllm/v1/metrics/stats.py, IterationStats): time to first token,
    inter-token latency and iteration tokens as each output comes out of a step; the per-request
    histograms and request_success when a request FINISHES (stop or length). A request the client
    aborts records no finished stats: vllm/v1/engine/output_processor.py abort_requests drops it.
    """

    def __init__(self, engine: Engine, model_name: str, engine_index: str = "0") -> None:
        self.engine = engine
        self.model_name = model_name
        self.engine_index = engine_index
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.tpot_deprecated = Histogram(ITL_BUCKETS)  # time_per_output_token_seconds, same samples
        self.request_tpot = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue = Histogram(REQUEST_LATENCY_BUCKETS)
        self.prefill = Histogram(REQUEST_LATENCY_BUCKETS)
        self.decode = Histogram(REQUEST_LATENCY_BUCKETS)
        self.inference = Histogram(REQUEST_LATENCY_BUCKETS)
        self.iteration_tokens = Histogram(ITERATION_TOKENS_BUCKETS)
        self.params_n = Histogram(N_BUCKETS)
        token_buckets = build_1_2_5_buckets(engine.cfg.max_model_len)
        self.prompt_hist = Histogram(token_buckets)
        self.gen_hist = Histogram(token_buckets)
        self.max_gen_hist = Histogram(token_buckets)
        self.max_tokens_hist = Histogram(token_buckets)
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        self._step_tokens = 0  # prompt + generated tokens of the outputs of the step being committed
        engine.token_listeners.append(self._on_tokens)
        engine.step_listeners.append(self._on_step)
        engine.finish_listeners.append(self._on_finish)

    def _on_tokens(self, req: Request, n: int, now: float, prev: float | None) -> None:
        if prev is None:
            # the first output: TTFT now, not at the finish, and the whole prompt counts in the
            # step's tokens (IterationStats.update_from_output, is_prefilling)
            self.ttft.observe(max(0.0, now - req.arrival_time))
            self._step_tokens += req.prompt_len + n
        else:
            # one gap per output; a window of n decode steps adds its n equal gaps
            gap = (now - prev) / n
            self.itl.observe(gap, n)
            self.tpot_deprecated.observe(gap, n)
            self._step_tokens += n

    def _on_step(self, plan: StepPlan, now: float, steps: int) -> None:
        # iteration_tokens_total: one sample per step that produced outputs (AsyncLLM makes an
        # IterationStats only for a batch with outputs); a window's steps are alike
        if self._step_tokens:
            self.iteration_tokens.observe(self._step_tokens / steps, steps)
            self._step_tokens = 0

    def _on_finish(self, req: Request) -> None:
        reason = req.finish_reason
        if reason is None or reason == "abort" or req.first_token_time is None or req.finish_time is None:
            return  # a client abort: no finished stats in vLLM
        self.success[reason] += 1
        arrival = req.arrival_time
        sched = req.scheduled_time if req.scheduled_time is not None else arrival
        first, last = req.first_token_time, req.finish_time
        self.e2e.observe(max(0.0, last - arrival))
        self.queue.observe(max(0.0, sched - arrival))
        self.prefill.observe(max(0.0, first - sched))
        self.decode.observe(max(0.0, last - first))
        self.inference.observe(max(0.0, last - sched))
        n_out = req.num_output_tokens
        self.request_tpot.observe((last - first) / (n_out - 1) if n_out > 1 else 0.0)
        self.prompt_hist.observe(req.prompt_len)
        self.gen_hist.observe(n_out)
        self.max_tokens_hist.observe(req.max_tokens)  # SamplingParams.max_tokens, as resolved
        self.max_gen_hist.observe(n_out)  # n = 1: the only sequence's length
        self.params_n.observe(1)

    # -- rendering -----------------------------------------------------------------------------

    def _labels(self, extra: dict[str, str] | None = None) -> str:
        labels = {"engine": self.engine_index, "model_name": self.model_name}
        if extra:
            labels.update(extra)
        return _label_text(labels)

    def render(self) -> str:
        return "".join(self._lines())

    def _lines(self) -> Iterator[str]:
        e = self.engine
        lab = self._labels()

        def gauge(name: str, doc: str, value: float) -> Iterator[str]:
            yield f"# HELP {name} {doc}\n# TYPE {name} gauge\n{name}{lab} {floatToGoString(value)}\n"

        def counter(name: str, doc: str, value: float) -> Iterator[str]:
            # text format 0.0.4 as prometheus_client writes a Counter: HELP/TYPE carry the _total name
            yield f"# HELP {name}_total {doc}\n# TYPE {name}_total counter\n"
            yield f"{name}_total{lab} {floatToGoString(value)}\n"

        def hist(name: str, doc: str, h: Histogram) -> Iterator[str]:
            yield f"# HELP {name} {doc}\n# TYPE {name} histogram\n"
            for le, c in h.cumulative():
                yield f"{name}_bucket{self._labels({'le': le})} {floatToGoString(c)}\n"
            yield f"{name}_count{lab} {floatToGoString(h.count)}\n{name}_sum{lab} {floatToGoString(h.sum)}\n"

        # In PrometheusStatLogger.__init__'s order (vllm/v1/metrics/loggers.py at v0.11.0).
        yield from gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", e.num_running
        )
        yield from gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", e.num_waiting
        )
        # Deprecated names vLLM 0.11 still registers but sets only with --show-hidden-metrics-for-
        # version: they read 0 (a reader of the old names learns nothing there either).
        yield from gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
            0.0,
        )
        yield from counter(
            "vllm:gpu_prefix_cache_queries",
            "GPU prefix cache queries, in terms of number of queriedtokens. "
            "DEPRECATED: Use vllm:prefix_cache_queries instead.",
            0.0,
        )
        yield from counter(
            "vllm:gpu_prefix_cache_hits",
            "GPU prefix cache hits, in terms of number of cached tokens. "
            "DEPRECATED: Use vllm:prefix_cache_hits instead.",
            0.0,
        )
        yield from gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", e.kv_cache_usage
        )
        yield from counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            e.prefix_cache_queries,
        )
        yield from counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            e.prefix_cache_hits,
        )
        yield from counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", e.num_preemptions
        )
        yield from counter("vllm:prompt_tokens", "Number of prefill tokens processed.", e.prompt_tokens_total)
        yield from counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", e.generation_tokens_total
        )
        name = "vllm:request_success"
        yield f"# HELP {name}_total Count of successfully processed requests.\n# TYPE {name}_total counter\n"
        for reason, n in self.success.items():
            yield f"{name}_total{self._labels({'finished_reason': reason})} {floatToGoString(n)}\n"
        yield from hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", self.prompt_hist)
        yield from hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", self.gen_hist
        )
        yield from hist(
            "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", self.iteration_tokens
        )
        yield from hist(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            self.max_gen_hist,
        )
        yield from hist("vllm:request_params_n", "Histogram of the n request parameter.", self.params_n)
        yield from hist(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            self.max_tokens_hist,
        )
        yield from hist(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft
        )
        # deprecated in 0.11 (renamed inter_token_latency_seconds), still emitted with the same samples
        yield from hist(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.DEPRECATED: Use vllm:inter_token_latency_seconds instead.",
            self.tpot_deprecated,
        )
        yield from hist(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl
        )
        yield from hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            self.request_tpot,
        )
        yield from hist(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.e2e
        )
        yield from hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            self.queue,
        )
        yield from hist(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            self.inference,
        )
        yield from hist(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            self.prefill,
        )
        yield from hist(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            self.decode,
        )
        labels = _label_text(cache_config_labels(e.cfg, self.engine_index))
        yield (
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
            f"# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{labels} 1.0\n"
        )


def garbage_metrics() -> str:
    """What the 'garbage /metrics' fault serves: not Prometheus text."""
    junk = "".join(random.choice('{}=#"\\ abcxyz0123') for _ in range(200))
    return f'vllm:kv_cache_usage_perc{{engine="0" model_name= NaNx\n{junk}\n<html>502 Bad Gateway</html>\n'


def _label_text(labels: dict[str, str]) -> str:
    """`{a="x",b="y"}` with the names sorted, as prometheus_client's generate_latest writes them."""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(labels.items())) + "}"


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
