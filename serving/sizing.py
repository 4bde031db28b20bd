"""Engine sizing from GPU memory: how many KV blocks an engine gets, and what vLLM arguments follow.

One piece of arithmetic (FACTS.md section 1) serves the launcher (real GPUs), the engine emulator
and the simulator (catalog GPUs):

  KV memory per GPU = total * gpu_memory_utilization - weights / tp - activations - non-torch
  KV bytes per token per GPU = 2 * layers * (kv_heads / tp) * head_dim * dtype_bytes
  num_gpu_blocks = KV memory // (KV bytes per token * block_size)

Pure Python, no imports beyond the catalog records.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from gpufleet.stacks.catalog import GIB, Model

# Memory vLLM holds outside weights and KV: CUDA context, NCCL and CUDA-graph buffers. Measured
# profiles of vLLM V1 put it near 1 GiB per GPU on Hopper at default settings.
NON_TORCH_BYTES = int(1.0 * GIB)
# Peak activation bytes per batched token in the profiling pass, as a multiple of hidden_size:
# the MLP intermediate (about 3.5x hidden for Llama shapes) plus logits and attention scratch, bf16.
ACTIVATION_FACTOR = 24

KV_DTYPE_BYTES = {"auto": 2, "bf16": 2, "fp16": 2, "fp8": 1}


class SizingError(ValueError):
    """The model does not fit; the message carries the numbers.

    `kv_tokens` is set when the weights fit but one full-length sequence does not: the KV tokens the
    engine would have, so a caller may pick a shorter max_model_len (see `fit_engine`).
    """

    def __init__(self, message: str, *, kv_tokens: int | None = None):
        super().__init__(message)
        self.kv_tokens = kv_tokens


def batching_defaults(gpu_memory_bytes: int, gpu_name: str) -> tuple[int, int]:
    """vLLM's OpenAI-server defaults: (max_num_batched_tokens, max_num_seqs)."""
    if gpu_memory_bytes >= 70 * GIB and "A100" not in gpu_name.upper():
        return 8192, 1024
    return 2048, 256


@dataclass(frozen=True)
class EnginePlan:
    model: Model
    gpu_name: str
    gpu_memory_bytes: int
    tensor_parallel_size: int
    gpu_memory_utilization: float
    kv_cache_dtype: str
    block_size: int
    weight_bytes_per_gpu: int
    activation_bytes: int
    non_torch_bytes: int
    kv_bytes_per_token: int  # per GPU shard
    kv_cache_bytes_per_gpu: int
    num_gpu_blocks: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    notes: tuple[str, ...] = field(default=())

    @property
    def kv_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size

    @property
    def full_length_sequences(self) -> float:
        return self.kv_tokens / self.max_model_len

    def vllm_args(self) -> list[str]:
        args = [
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--gpu-memory-utilization", f"{self.gpu_memory_utilization:.2f}",
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--block-size", str(self.block_size),
        ]  # fmt: skip
        if self.kv_cache_dtype == "fp8":
            args += ["--kv-cache-dtype", "fp8"]
        return args

    def explain(self) -> list[str]:
        """The arithmetic, line by line, as the launcher prints it."""
        g = GIB
        usable = self.gpu_memory_bytes * self.gpu_memory_utilization
        lines = [
            f"GPU: {self.gpu_name}, {self.gpu_memory_bytes / g:.1f} GiB x {self.tensor_parallel_size}",
            f"usable per GPU: {self.gpu_memory_bytes / g:.1f} GiB x {self.gpu_memory_utilization:.2f} "
            f"= {usable / g:.1f} GiB",
            f"weights per GPU: {self.model.params_b:g}B params x 2 bytes / tp {self.tensor_parallel_size} "
            f"= {self.weight_bytes_per_gpu / g:.1f} GiB",
            f"activations + non-torch: {self.activation_bytes / g:.2f} + {self.non_torch_bytes / g:.2f} GiB",
            f"KV cache per GPU: {self.kv_cache_bytes_per_gpu / g:.1f} GiB",
            f"KV bytes per token per GPU: 2 x {self.model.layers} layers x {self.model.kv_heads}/"
            f"{self.tensor_parallel_size} kv heads x {self.model.head_dim} x "
            f"{KV_DTYPE_BYTES[self.kv_cache_dtype]} bytes = {self.kv_bytes_per_token / 1024:g} KiB",
            f"blocks: {self.num_gpu_blocks} x {self.block_size} tokens = {self.kv_tokens} tokens "
            f"= {self.full_length_sequences:.1f} sequences of max_model_len {self.max_model_len}",
            f"batching: max_num_seqs {self.max_num_seqs}, "
            f"max_num_batched_tokens {self.max_num_batched_tokens}",
        ]
        return lines + list(self.notes)


def plan_engine(
    model: Model,
    gpu_memory_bytes: int,
    gpu_name: str,
    *,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    kv_cache_dtype: str = "auto",
    block_size: int = 16,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
) -> EnginePlan:
    """Size one engine; raise SizingError when the weights or one full-length sequence do not fit."""
    if kv_cache_dtype not in KV_DTYPE_BYTES:
        raise SizingError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {', '.join(KV_DTYPE_BYTES)}")
    if model.kv_heads % tensor_parallel_size and tensor_parallel_size % model.kv_heads:
        raise SizingError(
            f"{model.kv_heads} KV heads cannot be split over tensor_parallel_size {tensor_parallel_size}"
        )
    default_tokens, default_seqs = batching_defaults(gpu_memory_bytes, gpu_name)
    batched = max_num_batched_tokens or default_tokens
    max_len = min(max_model_len or model.max_context, model.max_context)
    weights = model.weight_bytes() // tensor_parallel_size
    activations = batched * model.hidden_size * ACTIVATION_FACTOR // tensor_parallel_size
    usable = int(gpu_memory_bytes * gpu_memory_utilization)
    kv_bytes = usable - weights - activations - NON_TORCH_BYTES
    if kv_bytes <= 0:
        raise SizingError(
            f"{model.key} does not fit on {tensor_parallel_size} x {gpu_name}: "
            f"weights {weights / GIB:.1f} GiB + activations {activations / GIB:.1f} GiB "
            f"+ non-torch {NON_TORCH_BYTES / GIB:.1f} GiB per GPU exceed "
            f"{usable / GIB:.1f} GiB usable ({gpu_memory_bytes / GIB:.1f} GiB x {gpu_memory_utilization:.2f})"
        )
    per_token = model.kv_bytes_per_token(KV_DTYPE_BYTES[kv_cache_dtype], tensor_parallel_size)
    blocks = kv_bytes // (per_token * block_size)
    tokens = blocks * block_size
    if tokens < max_len:
        raise SizingError(
            f"one sequence of max_model_len {max_len} needs {max_len * per_token / GIB:.2f} GiB "
            "of KV cache per GPU; "
            f"{model.key} on {tensor_parallel_size} x {gpu_name} leaves {kv_bytes / GIB:.2f} GiB "
            f"({tokens} tokens at {per_token / 1024:g} KiB per token)",
            kv_tokens=tokens,
        )
    seqs = min(max_num_seqs or default_seqs, blocks)
    return EnginePlan(
        model=model,
        gpu_name=gpu_name,
        gpu_memory_bytes=gpu_memory_bytes,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        kv_cache_dtype=kv_cache_dtype,
        block_size=block_size,
        weight_bytes_per_gpu=weights,
        activation_bytes=activations,
        non_torch_bytes=NON_TORCH_BYTES,
        kv_bytes_per_token=per_token,
        kv_cache_bytes_per_gpu=kv_bytes,
        num_gpu_blocks=blocks,
        max_model_len=max_len,
        max_num_seqs=seqs,
        max_num_batched_tokens=max(batched, min(max_len, batched)),
    )


# A shortened max_model_len is rounded down to this many tokens, and never goes below the minimum:
# an engine that cannot take a 2k-token conversation is not worth starting.
SHORT_LEN_STEP = 1024
MIN_SHORT_MODEL_LEN = 2048


def fit_engine(
    model: Model,
    gpu_memory_bytes: int,
    gpu_name: str,
    *,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    kv_cache_dtype: str = "auto",
    allow_fp8_kv_cache: bool = False,
    allow_shorter_max_model_len: bool = False,
    block_size: int = 16,
) -> EnginePlan:
    """`plan_engine`, with the fall-backs the fleet allows when one full-length sequence does not fit.

    The ladder: the requested settings; then an fp8 KV cache (half the bytes per token) if
    `allow_fp8_kv_cache`; then the longest max_model_len that fits (rounded down to SHORT_LEN_STEP,
    at least MIN_SHORT_MODEL_LEN) if `allow_shorter_max_model_len`. Each step taken is a note in the
    plan. Weights that do not fit are never rescued: SizingError as from `plan_engine`.
    """

    def attempt(max_len: int | None, dtype: str) -> EnginePlan:
        return plan_engine(model, gpu_memory_bytes, gpu_name, tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_len,
                           kv_cache_dtype=dtype, block_size=block_size)

    try:
        return attempt(max_model_len, kv_cache_dtype)
    except SizingError as exc:
        if exc.kv_tokens is None:
            raise
        first = exc
    notes: list[str] = [f"requested settings do not fit: {first}"]
    dtype = kv_cache_dtype
    if allow_fp8_kv_cache and dtype != "fp8":
        dtype = "fp8"
        try:
            plan = attempt(max_model_len, dtype)
            return replace(plan, notes=(*notes, "chose --kv-cache-dtype fp8 (allow_fp8_kv_cache)"))
        except SizingError as exc:
            first = exc
            notes.append(f"fp8 KV cache does not fit either: {exc}")
    if not allow_shorter_max_model_len:
        raise SizingError(" / ".join(notes), kv_tokens=first.kv_tokens)
    shorter = (first.kv_tokens or 0) // SHORT_LEN_STEP * SHORT_LEN_STEP
    if shorter < MIN_SHORT_MODEL_LEN:
        raise SizingError(
            " / ".join(notes) + f" / the longest max_model_len that fits, {first.kv_tokens} tokens, is below "
            f"the minimum of {MIN_SHORT_MODEL_LEN}",
            kv_tokens=first.kv_tokens,
        )
    plan = attempt(shorter, dtype)
    asked = min(max_model_len or model.max_context, model.max_context)
    return replace(plan, notes=(*notes, f"chose max_model_len {shorter} instead of {asked}: "
                                        f"{first.kv_tokens} KV tokens fit, rounded down to {SHORT_LEN_STEP}"))
