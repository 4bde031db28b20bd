"""vLLM's Prometheus metrics for an emulated engine, with vLLM V1's CURRENT names, labels and buckets.

Names, labels and bucket bounds after vllm/v1/metrics/loggers.py (PrometheusStatLogger) and
FACTS.md section 1: every engine series carries `model_name` and `engine`; `vllm:cache_config_info`
carries the cache config in its labels plus `engine` (no `model_name`). Counters are exposed with
`_total`, histograms with `_bucket`/`_sum`/`_count`. Times are engine time (scaled or virtual).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator

from gpufleet.serving.engine.model import Engine, Request

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
FINISH_REASONS = ("stop", "length", "abort", "error")


def build_1_2_5_buckets(max_value: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 buckets up to max_value (request_prompt_tokens, request_generation_tokens)."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > max_value:
                return tuple(out)
            out.append(float(v))
        exp += 1


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
        out, acc = [], 0
        for b, c in zip(self.bounds, self.counts, strict=False):
            acc += c
            out.append((repr(float(b)), acc))
        out.append(("+Inf", self.count))
        return out


class EngineMetrics:
    """Listens to one Engine and renders its /metrics text."""

    def __init__(self, engine: Engine, model_name: str, engine_index: str = "0") -> None:
        self.engine = engine
        self.model_name = model_name
        self.engine_index = engine_index
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.tpot = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue = Histogram(REQUEST_LATENCY_BUCKETS)
        self.prefill = Histogram(REQUEST_LATENCY_BUCKETS)
        self.decode = Histogram(REQUEST_LATENCY_BUCKETS)
        self.inference = Histogram(REQUEST_LATENCY_BUCKETS)
        token_buckets = build_1_2_5_buckets(engine.cfg.max_model_len)
        self.prompt_hist = Histogram(token_buckets)
        self.gen_hist = Histogram(token_buckets)
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        engine.finish_listeners.append(self._on_finish)

    def observe_tokens(self, req: Request, n: int, now: float) -> None:
        """Inter-token latency: call from on_token (the server does; a step of n tokens adds n)."""
        last = getattr(req, "_metrics_last", None)
        if last is not None and n > 0:
            self.itl.observe((now - last) / n, n)
        req._metrics_last = now  # type: ignore[attr-defined]

    def _on_finish(self, req: Request) -> None:
        reason = req.finish_reason or "abort"
        self.success[reason] = self.success.get(reason, 0) + 1
        if req.first_token_time is None or req.finish_time is None:
            return
        arrival = req.arrival_time
        sched = req.scheduled_time if req.scheduled_time is not None else arrival
        self.ttft.observe(max(0.0, req.first_token_time - arrival))
        self.e2e.observe(max(0.0, req.finish_time - arrival))
        self.queue.observe(max(0.0, sched - arrival))
        self.prefill.observe(max(0.0, req.first_token_time - sched))
        self.decode.observe(max(0.0, req.finish_time - req.first_token_time))
        self.inference.observe(max(0.0, req.finish_time - sched))
        if req.num_output_tokens > 1:
            self.tpot.observe((req.finish_time - req.first_token_time) / (req.num_output_tokens - 1))
        self.prompt_hist.observe(req.prompt_len)
        self.gen_hist.observe(req.num_output_tokens)

    # -- rendering -----------------------------------------------------------------------------

    def _labels(self, extra: dict[str, str] | None = None) -> str:
        labels = {"engine": self.engine_index, "model_name": self.model_name}
        if extra:
            labels.update(extra)
        return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items()) + "}"

    def render(self) -> str:
        return "".join(self._lines())

    def _lines(self) -> Iterator[str]:
        e = self.engine
        cfg = e.cfg
        lab = self._labels()

        def gauge(name: str, doc: str, value: float) -> Iterator[str]:
            yield f"# HELP {name} {doc}\n# TYPE {name} gauge\n{name}{lab} {float(value)!r}\n"

        def counter(name: str, doc: str, value: float) -> Iterator[str]:
            # text format 0.0.4 as prometheus_client writes a Counter: HELP/TYPE carry the _total name
            yield f"# HELP {name}_total {doc}\n# TYPE {name}_total counter\n"
            yield f"{name}_total{lab} {float(value)!r}\n"

        def hist(name: str, doc: str, h: Histogram) -> Iterator[str]:
            yield f"# HELP {name} {doc}\n# TYPE {name} histogram\n"
            base = lab[:-1]
            for le, c in h.cumulative():
                yield f'{name}_bucket{base},le="{le}"}} {float(c)!r}\n'
            yield f"{name}_count{lab} {float(h.count)!r}\n{name}_sum{lab} {float(h.sum)!r}\n"

        yield from gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", e.num_running
        )
        yield from gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", e.num_waiting
        )
        yield from gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", e.kv_cache_usage
        )
        yield from counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", e.num_preemptions
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
        yield from counter("vllm:prompt_tokens", "Number of prefill tokens processed.", e.prompt_tokens_total)
        yield from counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", e.generation_tokens_total
        )
        name = "vllm:request_success"
        yield f"# HELP {name}_total Count of successfully processed requests.\n# TYPE {name}_total counter\n"
        for reason, n in self.success.items():
            yield f"{name}_total{self._labels({'finished_reason': reason})} {float(n)!r}\n"
        yield from hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", self.prompt_hist)
        yield from hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", self.gen_hist
        )
        yield from hist(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft
        )
        yield from hist(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl
        )
        yield from hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            self.tpot,
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
        info = {
            "block_size": str(cfg.block_size),
            "cache_dtype": cfg.kv_cache_dtype,
            "calculate_kv_scales": "False",
            "enable_prefix_caching": str(cfg.enable_prefix_caching),
            "engine": self.engine_index,
            "gpu_memory_utilization": str(cfg.gpu_memory_utilization),
            "is_attention_free": "False",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(cfg.num_gpu_blocks),
            "num_gpu_blocks_override": "None",
            "prefix_caching_hash_algo": "builtin",
            "sliding_window": "None",
            "swap_space": "4",
        }
        labels = "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in info.items()) + "}"
        yield (
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
            f"# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{labels} 1.0\n"
        )


def garbage_metrics() -> str:
    """What the 'garbage /metrics' fault serves: not Prometheus text."""
    junk = "".join(random.choice('{}=#"\\ abcxyz0123') for _ in range(200))
    return f'vllm:kv_cache_usage_perc{{engine="0" model_name= NaNx\n{junk}\n<html>502 Bad Gateway</html>\n'


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
