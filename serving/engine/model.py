"""The engine model: vLLM V1's paged KV cache, prefix cache and scheduler, and a roofline step time.

Pure Python, no I/O, no clock: the caller says what time it is. Two drivers use this ONE model:
the HTTP server (`server.py`, real time scaled by `--time-scale`) and the virtual-time loop
(`virtual.py`, a discrete-event loop for the fleet simulator). Neither forks scheduling logic.

What is modelled, after vLLM V1 (vllm/v1/core/sched/scheduler.py, vllm/v1/core/kv_cache_manager.py,
vllm/v1/core/block_pool.py; FACTS.md section 1):

* KV cache: `num_gpu_blocks` blocks of `block_size` tokens. Block 0 is the null block vLLM reserves,
  so `total_blocks = num_gpu_blocks - 1` are usable and
  `kv_cache_usage = 1 - free / (num_gpu_blocks - 1)` (evictable cached blocks count as free).
* Prefix caching: every FULL block gets a hash chained with its parent's hash. Freed blocks keep
  their hash and sit in the free queue (LRU: freed blocks go to the tail, a request's blocks in
  reverse order so its tail is evicted first; allocation pops from the head and evicts the hash).
  A lookup is capped at `num_tokens - 1` tokens and counts `queries += num_tokens`,
  `hits += cached tokens` EVERY time a waiting request is looked up: preempted requests again, and
  a head that then does not fit (vLLM's KVCacheManager.get_computed_blocks).
* Scheduling: running requests first (decode-first), each asking `num_tokens - num_computed` tokens
  capped by the remaining token budget (chunked prefill); when a block cannot be had the NEWEST
  running request is preempted by recompute (its blocks freed, `num_computed = 0`) and put at the
  FRONT of the waiting queue; then, if nothing was preempted this step, waiting requests are admitted
  in order while `max_num_seqs` and the token budget allow.
* Step time: `overhead + seq_overhead x sequences + max(bytes / (HBM * mem_eff), flops / (bf16 *
  compute_eff))` per GPU, with bytes = weights + KV read, flops = 2 x params x tokens + attention,
  plus a tensor-parallel all-reduce cost; the factors come from `calibration.yaml`.

Fast-forward: when a step is pure decode with nothing admissible waiting, the next steps up to the
next finish are structurally identical; `schedule(max_steps=k)` plans them as one window whose
blocks are checked up front and allocated at commit, so it is exact (no preemption can occur in
it) and a caller can truncate it (`commit(plan, steps=j)`) when a new request arrives.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class StepCost:
    """Roofline factors for one GPU type (fitted in calibration.yaml)."""

    mem_efficiency: float = 0.85
    compute_efficiency: float = 0.55
    overhead_s: float = 0.0015
    tp_allreduce_s_per_layer: float = 1.5e-5
    # 1: memory and compute overlap fully (pure roofline, max); 0: they add up (no overlap)
    overlap: float = 1.0
    # per sequence in the step: the scheduler, sampling and per-request kernels' launch cost, which
    # a big decode batch pays and the matmul roofline leaves out
    seq_overhead_s: float = 0.0


@cache
def calibration() -> dict:
    """The calibration table beside this module (factors, sources, errors)."""
    import yaml

    return yaml.safe_load((Path(__file__).with_name("calibration.yaml")).read_text(encoding="utf-8"))


def step_cost_for(gpu_key: str) -> StepCost:
    table = calibration()
    factors = dict(table["default"])
    factors.update(table.get("per_gpu", {}).get(gpu_key, {}))
    return StepCost(**factors)


@dataclass(frozen=True)
class EngineConfig:
    """What one emulated engine is: the same knobs as `vllm serve`, sized by serving/sizing.py."""

    model: str = "llama-3.1-8b"
    gpu: str = "H100"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    num_gpu_blocks: int | None = None  # override the sizing (tests, small engines)
    served_model_name: str | None = None  # what /v1/models and the model_name label say
    step_cost: StepCost | None = None  # override the calibrated factors
    # override the catalog GPU's figures (a GPU the catalog lacks, e.g. A100-40GB in calibration)
    gpu_memory_gib: float | None = None
    hbm_tb_s: float | None = None
    bf16_tflops: float | None = None


@dataclass(frozen=True)
class ResolvedConfig:
    """EngineConfig with every number filled in from the catalog and the sizing code."""

    model_key: str
    served_model_name: str
    gpu_key: str
    gpu_name: str
    tensor_parallel_size: int
    num_gpu_blocks: int
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    kv_cache_dtype: str
    enable_prefix_caching: bool
    # roofline inputs, per GPU
    weight_bytes: float
    kv_bytes_per_token: float
    flops_per_token: float
    attn_flops_per_token_ctx: float  # x context length
    hbm_bytes_s: float
    flops_s: float
    tp_allreduce_s: float
    cost: StepCost
    model_path: str = ""  # what `vllm serve` was given (the HF id): /v1/models' root
    num_gpu_blocks_override: int | None = None  # --num-gpu-blocks-override, when given

    @property
    def kv_capacity_tokens(self) -> int:
        """Usable KV tokens: every block but the null block. A request past this stalls the engine,
        as in vLLM (vllm-project/vllm#35541)."""
        return kv_capacity_tokens(self.num_gpu_blocks, self.block_size)


def kv_capacity_tokens(num_gpu_blocks: int, block_size: int) -> int:
    """The tokens one engine's KV cache holds for requests: block 0 is vLLM's null block."""
    return max(num_gpu_blocks - 1, 0) * block_size


def resolve(config: EngineConfig) -> ResolvedConfig:
    """Size the engine through serving/sizing.py (one sizing code for launcher, emulator, simulator).

    Raises `gpufleet.stacks.catalog.CatalogError` for unknown keys and
    `gpufleet.serving.sizing.SizingError` when the model does not fit.
    """
    import dataclasses

    from gpufleet.serving.sizing import KV_DTYPE_BYTES, plan_engine
    from gpufleet.stacks import catalog

    model = catalog.model(config.model)
    gpu = catalog.gpu(config.gpu)
    if (config.gpu_memory_gib, config.hbm_tb_s, config.bf16_tflops) != (None, None, None):
        gpu = dataclasses.replace(
            gpu,
            memory_gib=gpu.memory_gib if config.gpu_memory_gib is None else config.gpu_memory_gib,
            hbm_tb_s=gpu.hbm_tb_s if config.hbm_tb_s is None else config.hbm_tb_s,
            bf16_tflops=gpu.bf16_tflops if config.bf16_tflops is None else config.bf16_tflops,
        )
    tp = config.tensor_parallel_size
    if tp < 1:
        raise ValueError("tensor_parallel_size must be at least 1")
    plan = plan_engine(
        model,
        gpu.memory_bytes,
        gpu.name,
        tensor_parallel_size=tp,
        gpu_memory_utilization=config.gpu_memory_utilization,
        max_model_len=config.max_model_len,
        kv_cache_dtype=config.kv_cache_dtype,
        block_size=config.block_size,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
    )
    blocks = config.num_gpu_blocks or plan.num_gpu_blocks
    if blocks < 2:
        raise ValueError("num_gpu_blocks must be at least 2 (block 0 is the null block)")
    cost = config.step_cost or step_cost_for(gpu.key)
    heads_dim = model.hidden_size  # query heads x head_dim for Llama-shaped models
    return ResolvedConfig(
        model_key=model.key,
        served_model_name=config.served_model_name or model.hf_id,
        gpu_key=gpu.key,
        gpu_name=gpu.name,
        tensor_parallel_size=tp,
        num_gpu_blocks=blocks,
        block_size=plan.block_size,
        max_model_len=plan.max_model_len,
        max_num_seqs=min(plan.max_num_seqs, blocks),
        max_num_batched_tokens=plan.max_num_batched_tokens,
        gpu_memory_utilization=plan.gpu_memory_utilization,
        kv_cache_dtype=plan.kv_cache_dtype,
        enable_prefix_caching=config.enable_prefix_caching,
        weight_bytes=plan.weight_bytes_per_gpu,
        kv_bytes_per_token=model.kv_bytes_per_token(KV_DTYPE_BYTES[plan.kv_cache_dtype], tp),
        flops_per_token=model.flops_per_token / tp,
        attn_flops_per_token_ctx=4.0 * model.layers * heads_dim / tp,
        hbm_bytes_s=gpu.hbm_tb_s * 1e12,
        flops_s=gpu.bf16_tflops * 1e12,
        tp_allreduce_s=(2 * model.layers * cost.tp_allreduce_s_per_layer) if tp > 1 else 0.0,
        cost=cost,
        model_path=model.hf_id,
        num_gpu_blocks_override=config.num_gpu_blocks,
    )


# ----------------------------------------------------------------------------------------------
# Requests

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"

# Deterministic filler: output token i of a request is FILLER[(seed + i) % len]. The ids are the
# tokenizer's ids for these pieces, so generated text re-tokenizes to the same ids (tokenizer.py).
_FILLER_COUNT = 64


def _block_hash(parent: int, tokens: Sequence[int]) -> int:
    # ints and tuples of ints hash the same in every process (no PYTHONHASHSEED randomisation)
    return hash((parent, tuple(tokens)))


@dataclass(eq=False)
class Request:
    """One request inside the engine.

    Give `prompt_token_ids` (the HTTP face), or `prompt_len` plus optional precomputed
    `prompt_block_hashes` (one per full block, chained; the trace replayer) for speed.
    `eos_after`: the request stops with finish_reason "stop" after this many tokens unless
    `ignore_eos`; otherwise it runs to `max_tokens` ("length").
    """

    request_id: str
    prompt_len: int = 0
    max_tokens: int = 16
    prompt_token_ids: list[int] | None = None
    prompt_block_hashes: list[int] | None = None
    eos_after: int | None = None
    ignore_eos: bool = False
    arrival_time: float = 0.0
    # callbacks (the driver calls them; the model only records)
    on_first_token: Callable[[Request, float], None] | None = None
    on_token: Callable[[Request, int, float], None] | None = None  # (request, n_new_tokens, t)
    on_finish: Callable[[Request, float], None] | None = None
    user_data: object = None
    # state
    status: str = WAITING
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit of the first scheduling
    finish_reason: str | None = None
    blocks: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    last_block_hash: int = 0
    output_token_ids: list[int] | None = None
    # timing (engine time)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_token_ids is not None:
            self.prompt_len = len(self.prompt_token_ids)
            self.output_token_ids = []
        if self.prompt_len < 1:
            raise ValueError("a request needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not self.seed:
            self.seed = self.prompt_len * 2654435761 % 9973

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.num_output_tokens

    @property
    def target_output_tokens(self) -> int:
        if self.eos_after is not None and not self.ignore_eos:
            return max(1, min(self.max_tokens, self.eos_after))
        return self.max_tokens

    def token_at(self, i: int) -> int:
        if i < self.prompt_len:
            return self.prompt_token_ids[i]  # type: ignore[index]
        return self.output_token_ids[i - self.prompt_len]  # type: ignore[index]


# ----------------------------------------------------------------------------------------------
# The KV block pool


class BlockPool:
    """`num_gpu_blocks` blocks; block 0 is the null block and never handed out."""

    def __init__(self, num_gpu_blocks: int, enable_caching: bool = True) -> None:
        self.num_gpu_blocks = num_gpu_blocks
        self.total = num_gpu_blocks - 1
        self.enable_caching = enable_caching
        self.ref = [0] * num_gpu_blocks
        self.hash_of: list[int | None] = [None] * num_gpu_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_gpu_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.total - len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.total

    def lookup(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """The longest run of cached blocks for these chained hashes (no side effects)."""
        hit: list[int] = []
        if not self.enable_caching:
            return hit
        cached = self.cached
        for h in hashes[:max_blocks]:
            b = cached.get(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def touch(self, blocks: Sequence[int]) -> None:
        ref, free = self.ref, self.free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks from the head of the free queue, evicting their cached hashes."""
        out = []
        free, ref, hash_of, cached = self.free, self.ref, self.hash_of, self.cached
        for _ in range(n):
            b, _ = free.popitem(last=False)
            h = hash_of[b]
            if h is not None:
                if cached.get(h) == b:
                    del cached[h]
                hash_of[b] = None
            ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference of each block, in reverse order (the tail is evicted first)."""
        ref, free = self.ref, self.free
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None

    def register(self, block: int, h: int) -> None:
        if not self.enable_caching or self.hash_of[block] is not None:
            return
        self.hash_of[block] = h
        self.cached.setdefault(h, block)

    def reset_prefix_cache(self) -> None:
        for h, b in list(self.cached.items()):
            if self.ref[b] == 0:
                self.hash_of[b] = None
                del self.cached[h]


# ----------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class EngineStats:
    """The public figures of one engine: what /metrics shows and what a router policy reads."""

    kv_cache_usage: float  # 0..1, vllm:kv_cache_usage_perc
    num_running: int
    num_waiting: int
    num_preemptions: int  # cumulative
    prefix_cache_queries: int  # cumulative, tokens
    prefix_cache_hits: int  # cumulative, tokens
    num_free_blocks: int
    num_gpu_blocks: int
    block_size: int
    waiting_tokens: int  # prompt tokens still to compute for the waiting queue
    prompt_tokens: int  # cumulative tokens prefilled
    generation_tokens: int  # cumulative tokens generated
    num_finished: int
    # inter-token latency, cumulative as vLLM's histogram (_sum seconds, _count tokens): the decode pace
    itl_seconds_total: float = 0.0
    itl_tokens_total: int = 0

    @property
    def capacity_tokens(self) -> int:
        """Usable KV tokens: every block but the null block (a request cannot grow past this)."""
        return kv_capacity_tokens(self.num_gpu_blocks, self.block_size)

    @property
    def free_tokens(self) -> float:
        """ARCHITECTURE.md's headroom before router accounting: (1 - usage) * usable tokens."""
        return (1.0 - self.kv_cache_usage) * self.capacity_tokens


@dataclass
class StepPlan:
    """One scheduled step, or a fast-forward window of `steps` identical decode steps.

    Step s (0-based) takes `(base + max(a + b*s, c + d*s)) * slow` seconds: memory time a + b*s and
    compute time c + d*s grow as the window's sequences grow by one token a step."""

    start: float
    scheduled: list[tuple[Request, int]]  # (request, tokens in the first step)
    steps: int
    base: float
    a: float
    b: float
    c: float
    d: float
    slow: float = 1.0
    overlap: float = 1.0
    # (tokens, hit tokens) of the waiting head looked up and left waiting: a window repeats the
    # lookup every step, as vLLM's scheduler would (its hits are those of the first step)
    lookup: tuple[int, int] | None = None

    @property
    def decode_window(self) -> bool:
        return self.steps > 1

    def step_time(self, s: int) -> float:
        m, k = self.a + self.b * s, self.c + self.d * s
        hi, lo = (m, k) if m > k else (k, m)
        return (self.base + hi + (1.0 - self.overlap) * lo) * self.slow

    def time_of(self, k: int) -> float:
        """Seconds the first k steps take (closed form: two arithmetic series)."""
        if k <= 0:
            return 0.0
        if k == 1:
            return self.step_time(0)

        def series(x0: float, dx: float, lo: int, hi: int) -> float:  # sum_{s=lo}^{hi-1} x0 + dx*s
            n = hi - lo
            return n * x0 + dx * (lo + hi - 1) * n / 2 if n > 0 else 0.0

        a, b, c, d = self.a, self.b, self.c, self.d
        first_mem = a >= c
        last_mem = a + b * (k - 1) >= c + d * (k - 1)
        if first_mem == last_mem:
            total = series(a, b, 0, k) if first_mem else series(c, d, 0, k)
        else:  # the lines cross once inside the window
            cross = min(k - 1, max(1, math.ceil((c - a) / (b - d))))
            if first_mem:
                total = series(a, b, 0, cross) + series(c, d, cross, k)
            else:
                total = series(c, d, 0, cross) + series(a, b, cross, k)
        if self.overlap < 1.0:  # + (1 - overlap) * sum(min) = sum(m) + sum(c) - sum(max)
            total += (1.0 - self.overlap) * (series(a, b, 0, k) + series(c, d, 0, k) - total)
        return (k * self.base + total) * self.slow

    def steps_done_by(self, elapsed: float) -> tuple[int, float]:
        """(j, t): the first step boundary at or after `elapsed` seconds into the window is the end
        of step j (1-based), at t seconds."""
        lo, hi = 1, self.steps
        while lo < hi:
            mid = (lo + hi) // 2
            if self.time_of(mid) >= elapsed:
                hi = mid
            else:
                lo = mid + 1
        return lo, self.time_of(lo)

    @property
    def duration(self) -> float:
        return self.time_of(self.steps)

    @property
    def durations(self) -> list[float]:
        return [self.step_time(s) for s in range(self.steps)]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


def plan_step(
    cfg: ResolvedConfig, tokens: int, ctx_read: float, attn: float, n_seqs: int, *, now: float = 0.0,
    scheduled: list | None = None, steps: int = 1, slow: float = 1.0,
) -> StepPlan:  # fmt: skip
    """The roofline of one step (or a window) from its totals: `tokens` computed, `ctx_read` KV tokens
    read and written, `attn` = sum of new tokens x the context they attend to, `n_seqs` sequences.
    The engine's scheduler and the router's predictor (serving/router/predict.py) both use it."""
    c = cfg.cost
    bw = cfg.hbm_bytes_s * c.mem_efficiency
    fl = cfg.flops_s * c.compute_efficiency
    kvb = cfg.kv_bytes_per_token
    attn_f = cfg.attn_flops_per_token_ctx
    return StepPlan(
        start=now,
        scheduled=scheduled if scheduled is not None else [],
        steps=steps,
        base=c.overhead_s + cfg.tp_allreduce_s + c.seq_overhead_s * n_seqs,
        a=(cfg.weight_bytes + ctx_read * kvb) / bw,
        b=n_seqs * kvb / bw,
        c=(tokens * cfg.flops_per_token + attn * attn_f) / fl,
        d=n_seqs * attn_f / fl,
        slow=slow,
        overlap=c.overlap,
    )


# ----------------------------------------------------------------------------------------------
# The engine


class Engine:
    """One vLLM engine core: add requests, `schedule()` a step, `commit()` it when its time is up.

    Public stats as attributes and `stats()`: kv_cache_usage, num_running, num_waiting,
    num_preemptions, prefix_cache_queries, prefix_cache_hits, num_free_blocks, num_gpu_blocks,
    block_size. Listeners for the metrics layer: `finish_listeners` (each finished request),
    `token_listeners` (each output), `step_listeners` (each commit).
    """

    def __init__(self, config: EngineConfig | ResolvedConfig | None = None, name: str = "engine") -> None:
        cfg = config if isinstance(config, ResolvedConfig) else resolve(config or EngineConfig())
        self.cfg = cfg
        self.name = name
        self.block_size = cfg.block_size
        self.num_gpu_blocks = cfg.num_gpu_blocks
        self.pool = BlockPool(cfg.num_gpu_blocks, cfg.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.itl_seconds_total = 0.0  # sum over output tokens after the first of the gap before them
        self.itl_tokens_total = 0
        self.num_finished = 0
        self.num_steps = 0
        self.busy_time = 0.0
        self.finish_listeners: list[Callable[[Request], None]] = []
        # (plan, end time, steps committed): after each commit
        self.step_listeners: list[Callable[[StepPlan, float, int], None]] = []
        # (request, new tokens, time, time of its previous token or None for its first): per output
        self.token_listeners: list[Callable[[Request, int, float, float | None], None]] = []
        self.slowdown = 1.0  # fault injection: step time multiplier

    # -- public stats ---------------------------------------------------------------------------

    @property
    def kv_cache_usage(self) -> float:
        return self.pool.usage()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def stats(self) -> EngineStats:
        return EngineStats(
            kv_cache_usage=self.pool.usage(),
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_free_blocks=self.pool.num_free,
            num_gpu_blocks=self.num_gpu_blocks,
            block_size=self.block_size,
            waiting_tokens=sum(r.num_tokens - r.num_computed_tokens for r in self.waiting),
            prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
            num_finished=self.num_finished,
            itl_seconds_total=self.itl_seconds_total,
            itl_tokens_total=self.itl_tokens_total,
        )

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- requests -------------------------------------------------------------------------------

    def validate(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why vLLM would reject this request up front, or None. The texts are vLLM 0.11's
        (vllm/entrypoints/openai/serving_engine.py, OpenAIServing._validate_input); the HTTP face
        words them per endpoint as vLLM does (server.py) before this guard is reached."""
        limit = self.cfg.max_model_len
        if prompt_len < 1:
            return "the prompt is empty"
        if prompt_len >= limit:
            return (
                f"This model's maximum context length is {limit} tokens. However, your request has "
                f"{prompt_len} input tokens. Please reduce the length of the input messages."
            )
        if prompt_len + max_tokens > limit:
            return (
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
                f"maximum context length is {limit} tokens and your request has {prompt_len} input "
                f"tokens ({max_tokens} > {limit} - {prompt_len})."
            )
        return None

    def add_request(self, req: Request, now: float = 0.0) -> Request:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        problem = self.validate(req.prompt_len, req.max_tokens)
        if problem:
            raise ValueError(problem)
        req.arrival_time = now if req.arrival_time == 0.0 else req.arrival_time
        if req.prompt_block_hashes is None and req.prompt_token_ids is not None and self.pool.enable_caching:
            req.prompt_block_hashes = self._hash_tokens(
                req.prompt_token_ids, req.prompt_len // self.block_size
            )
        req.status = WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)
        return req

    def abort(self, request_id: str, now: float = 0.0) -> bool:
        req = self.requests.get(request_id)
        if req is None or req.status == FINISHED:
            return False
        if req.status == RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._finish(req, "abort", now)
        return True

    def _hash_tokens(
        self, tokens: Sequence[int], n_blocks: int, parent: int = 0, start: int = 0
    ) -> list[int]:
        bs = self.block_size
        out = []
        for i in range(start, n_blocks):
            parent = _block_hash(parent, tokens[i * bs : (i + 1) * bs])
            out.append(parent)
        return out

    # -- scheduling -----------------------------------------------------------------------------

    def _try_allocate(self, req: Request, num_new: int) -> bool:
        """vLLM's allocate_slots for a running request: enough fresh blocks, or nothing."""
        need = -(-(req.num_computed_tokens + num_new) // self.block_size) - len(req.blocks)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        req.blocks.extend(self.pool.allocate(need))
        return True

    def _preempt(self, req: Request) -> None:
        """Preemption by recompute: drop the computed tokens, back to the FRONT of the queue."""
        self.pool.release(req.blocks)
        req.blocks = []
        req.num_hashed_blocks = 0
        req.num_computed_tokens = 0
        req.status = WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self, now: float, max_steps: int = 1) -> StepPlan | None:
        """Plan the next step (None when idle), allocating its blocks as vLLM's scheduler does.

        With max_steps > 1, a pure-decode step in which no waiting request was admitted becomes a
        window of up to max_steps identical steps, ending at the first finish; nothing can change
        inside it (no finish, no admission: running and budget are fixed and free blocks only
        shrink); the blocks of its later steps are checked now and allocated by commit()."""
        if not self.running and not self.waiting:
            return None
        cfg = self.cfg
        bs = self.block_size
        pool = self.pool
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted = False
        all_decode = True

        # 1. running requests, oldest first (decode-first)
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            num_new = min(
                req.num_tokens - req.num_computed_tokens, budget, cfg.max_model_len - req.num_computed_tokens
            )
            if num_new <= 0:
                i += 1
                continue
            ok = True
            while not self._try_allocate(req, num_new):
                victim = running.pop()  # the newest running request
                self._preempt(victim)
                preempted = True
                if victim is req:
                    ok = False
                    break
            if not ok:
                break
            scheduled.append((req, num_new))
            budget -= num_new
            if pool.enable_caching:
                self._cache_full_blocks(req, req.num_computed_tokens + num_new)
            if num_new != 1 or req.num_computed_tokens + 1 != req.num_tokens:
                all_decode = False
            i += 1
        if preempted:
            scheduled = [(r, n) for r, n in scheduled if r.status == RUNNING]

        # 2. waiting requests, in order, only when nothing was preempted in this step
        admitted = False
        lookup: tuple[int, int] | None = None
        if not preempted:
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
                req = waiting[0]
                hashes: Sequence[int] = ()
                if pool.enable_caching:
                    hashes = (
                        self._all_hashes(req) if req.num_output_tokens else (req.prompt_block_hashes or ())
                    )
                computed = pool.lookup(hashes, (req.num_tokens - 1) // bs) if hashes else []
                hit = len(computed) * bs
                if pool.enable_caching:
                    # every lookup counts, a preempted request's and a head that then does not fit
                    # (vllm/v1/core/kv_cache_manager.py at v0.11.0, get_computed_blocks, called by
                    # vllm/v1/core/sched/scheduler.py for each waiting request with no computed tokens)
                    self.prefix_cache_queries += req.num_tokens
                    self.prefix_cache_hits += hit
                num_new = min(req.num_tokens - hit, budget)
                need = -(-(hit + num_new) // bs) - len(computed)
                evictable = sum(1 for b in computed if pool.ref[b] == 0)
                if need > pool.num_free - evictable:
                    if pool.enable_caching:
                        lookup = (req.num_tokens, hit)
                    break  # the head cannot be had: nobody behind it jumps the queue
                if computed:
                    pool.touch(computed)
                    req.blocks.extend(computed)
                    req.last_block_hash = hashes[len(computed) - 1]
                if need > 0:
                    req.blocks.extend(pool.allocate(need))
                req.num_computed_tokens = hit
                req.num_hashed_blocks = len(computed)
                if req.scheduled_time is None:
                    req.num_cached_tokens = hit
                    req.scheduled_time = now
                waiting.popleft()
                req.status = RUNNING
                running.append(req)
                scheduled.append((req, num_new))
                budget -= num_new
                if pool.enable_caching:
                    self._cache_full_blocks(req, hit + num_new)
                admitted = True
                all_decode = False

        if not scheduled:
            return None
        steps = 1
        if max_steps > 1 and all_decode and not admitted and not preempted:
            steps = self._window(scheduled, max_steps)
        plan = self._plan(now, scheduled, steps)
        plan.lookup = lookup
        return plan

    def _window(self, scheduled: list[tuple[Request, int]], max_steps: int) -> int:
        """How many identical decode steps fit: up to the first finish and while free blocks last.
        The first step's blocks are already allocated; steps 2..k take blocks from the free queue."""
        k = max_steps
        max_len = self.cfg.max_model_len
        for req, _ in scheduled:
            k = min(k, req.target_output_tokens - req.num_output_tokens, max_len - req.num_tokens)
        bs = self.block_size
        free = self.pool.num_free
        while k > 1:
            need = 0
            for req, _ in scheduled:
                extra = -(-(req.num_computed_tokens + k) // bs) - len(req.blocks)
                if extra > 0:
                    need += extra
            if need <= free:
                break
            k -= max(1, k // 4)
        return max(k, 1)

    def _plan(self, now: float, scheduled: list[tuple[Request, int]], steps: int) -> StepPlan:
        """Roofline step time per GPU: overhead + max(memory time, compute time), x slowdown."""
        cfg = self.cfg
        tokens = 0
        ctx_read = 0  # KV tokens read (and written) by the step
        attn = 0.0  # sum of new tokens x the context they attend to
        for req, n in scheduled:
            tokens += n
            ctx = req.num_computed_tokens
            ctx_read += ctx + n
            attn += n * (ctx + n / 2)
        return plan_step(cfg, tokens, ctx_read, attn, len(scheduled), now=now, scheduled=scheduled,
                         steps=steps, slow=self.slowdown)  # fmt: skip

    def _all_hashes(self, req: Request) -> list[int]:
        """Chained hashes of every full block of prompt + output (a preempted request's lookup)."""
        n_full = req.num_tokens // self.block_size
        hashes = list(req.prompt_block_hashes or [])
        if len(hashes) >= n_full or req.output_token_ids is None or req.prompt_token_ids is None:
            return hashes[:n_full]
        tokens = list(req.prompt_token_ids) + list(req.output_token_ids)
        parent = hashes[-1] if hashes else 0
        return hashes + self._hash_tokens(tokens, n_full, parent, len(hashes))

    # -- committing a step ----------------------------------------------------------------------

    def commit(self, plan: StepPlan, now: float, steps: int | None = None) -> list[Request]:
        """Apply the plan's outcome at time `now` (its end, or earlier when a window is truncated to
        its first `steps` steps). Calls the requests' callbacks; returns the requests that finished."""
        k = plan.steps if steps is None else max(1, min(steps, plan.steps))
        finished: list[Request] = []
        bs = self.block_size
        pool = self.pool
        caching = pool.enable_caching
        max_len = self.cfg.max_model_len
        self.num_steps += k
        self.busy_time += plan.time_of(k)
        if k > 1 and plan.lookup is not None:  # the blocked head, looked up again each later step
            self.prefix_cache_queries += (k - 1) * plan.lookup[0]
            self.prefix_cache_hits += (k - 1) * plan.lookup[1]
        for req, n in plan.scheduled:
            if req.status != RUNNING:
                continue  # aborted while the step ran
            if k > 1:
                extra = -(-(req.num_computed_tokens + k) // bs) - len(req.blocks)
                if extra > 0:
                    req.blocks.extend(pool.allocate(extra))
                req.num_computed_tokens += k
                new = k
            else:
                req.num_computed_tokens += n
                if req.num_computed_tokens < req.num_tokens:
                    continue  # a prefill chunk short of the end: no token yet
                new = 1
            if req.num_output_tokens == 0:
                self.prompt_tokens_total += req.prompt_len
            self._append_output(req, new, now)
            if caching and k > 1:
                self._cache_full_blocks(req, req.num_computed_tokens)
            if req.num_output_tokens >= req.target_output_tokens or req.num_tokens >= max_len:
                reason = "length"
                if (
                    req.eos_after is not None
                    and not req.ignore_eos
                    and req.num_output_tokens >= req.eos_after
                ):
                    reason = "stop"
                self.running.remove(req)
                self._finish(req, reason, now)
                finished.append(req)
        for listener in self.step_listeners:
            listener(plan, now, k)
        return finished

    def _append_output(self, req: Request, new: int, now: float) -> None:
        first = req.num_output_tokens == 0
        if req.output_token_ids is not None:
            base = req.num_output_tokens + req.seed
            req.output_token_ids.extend(filler_token(base + j) for j in range(new))
        req.num_output_tokens += new
        self.generation_tokens_total += new
        prev = req.last_token_time
        if not first and prev is not None:
            # what vLLM's inter_token_latency_seconds histogram adds: the gap, over the new tokens
            self.itl_seconds_total += now - prev
            self.itl_tokens_total += new
        req.last_token_time = now
        for listener in self.token_listeners:
            listener(req, new, now, prev)
        if first and req.first_token_time is None:
            req.first_token_time = now
            if req.on_first_token:
                req.on_first_token(req, now)
        if req.on_token:
            req.on_token(req, new, now)

    def _cache_full_blocks(self, req: Request, upto: int) -> None:
        """Register the hashes of the blocks full once `upto` tokens are in: prompt blocks, and blocks
        holding output tokens when the token ids are known. Called at allocation, as vLLM's
        allocate_slots caches the blocks of the tokens scheduled in the step."""
        n_full = upto // self.block_size
        start = req.num_hashed_blocks
        if n_full <= start:
            return
        hashes = req.prompt_block_hashes or ()
        bs = self.block_size
        register = self.pool.register
        for i in range(start, n_full):
            if i < len(hashes):
                h = hashes[i]
            elif req.output_token_ids is not None and req.prompt_token_ids is not None:
                h = _block_hash(
                    req.last_block_hash if i else 0, [req.token_at(j) for j in range(i * bs, (i + 1) * bs)]
                )
            else:
                break
            req.last_block_hash = h
            register(req.blocks[i], h)
        req.num_hashed_blocks = n_full

    def _finish(self, req: Request, reason: str, now: float) -> None:
        self.pool.release(req.blocks)
        req.blocks = []
        req.status = FINISHED
        req.finish_reason = reason
        req.finish_time = now
        self.num_finished += 1
        self.requests.pop(req.request_id, None)
        for listener in self.finish_listeners:
            listener(req)
        if req.on_finish:
            req.on_finish(req, now)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()


# ----------------------------------------------------------------------------------------------
# Filler tokens (ids shared with tokenizer.py)


def filler_token(i: int) -> int:
    from gpufleet.serving.engine.tokenizer import FILLER_IDS

    return FILLER_IDS[i % len(FILLER_IDS)]


def leak_check(engine: Engine) -> None:
    """Assert the block accounting: free + used == total, and refs match the live requests."""
    pool = engine.pool
    refs = [0] * pool.num_gpu_blocks
    for req in engine.running:
        for b in req.blocks:
            refs[b] += 1
    for req in engine.waiting:
        assert not req.blocks, f"waiting request {req.request_id} holds blocks"
    assert refs == pool.ref, "block reference counts do not match the running requests"
    free = sum(1 for b in range(1, pool.num_gpu_blocks) if pool.ref[b] == 0)
    assert free == pool.num_free, f"free queue {pool.num_free} != blocks with no reference {free}"
    assert pool.num_free + pool.num_used == pool.total
    assert math.isclose(pool.usage(), 1 - pool.num_free / pool.total)
