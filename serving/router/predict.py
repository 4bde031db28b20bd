"""Predicted TTFT and TPOT, in seconds, of one request on one engine: the predicting policy's model.

The step times are the engine model's own (serving/engine/model.py `plan_step`, the roofline the
emulator and the simulator step with, calibrated in calibration.yaml); nothing here restates its
formulas. What this module adds is the queueing arithmetic around them:

    TTFT = round trip + s x (queued prefill + this prompt's uncached part, through chunked steps
           that also carry the running batch's decode tokens)
    TPOT = f x (decode step with the running batch + this request)
           + this request's share of the prefill work that will interleave with it

and the online correction, both from the engine's own recent inter-token latency (vLLM's
`inter_token_latency_seconds` histogram deltas, `policy.recent_pace`): `s` is it over the model's
step for what the engine ran in the interval (its decode batch, plus the prompt tokens it prefilled,
from `prompt_tokens_total`, spread over the interval's steps), so an engine slower than its catalog
figure (a throttled GPU, a noisy neighbour, a wrong calibration) is seen as slower; `f` is it over
the pure decode step, so the prefill work that typically interleaves on that engine counts in its
TPOT. Both are smoothed (EWMA) and bounded.

A third correction is an offset on the TTFT: what the router measures for the requests it sends to
an engine (from its send to the first token back, in engine seconds) less what it predicted, tracked
at its median (each observation moves it a small step toward the residual, `OFFSET_STEP` of the
prediction: robust to the one request in ten that waited behind a burst) and never below 0. It is
the latency the engine model leaves out: the hops to the engine and back, the wait for the engine's
current step to end, the engine's own HTTP and tokenizing. Only the router that sends to an engine
measures it; a peer's engines are predicted with the offset their own router measured, which its
summary carries (`ttft_offset`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine model is imported where used: it is heavy for the router
    from gpufleet.serving.engine.model import ResolvedConfig

# Bounds of the online correction: a ratio outside is a broken sample, not an engine.
MIN_FACTOR, MAX_FACTOR = 0.5, 5.0
# The pace is a window of one scrape interval while a reply's TPOT is its mean over many: a burst's
# pace is a transient, and letting it mark the engine that absorbs the burst as slow moves the queue
# onto slower GPUs (in the simulator this cost 2-4 points of SLO attainment at the 90% load). So
# the pace may at most double the model's decode step; a slow engine still shows in `speed`.
MAX_PACE = 2.0
EWMA = 0.3  # weight of the newest ratio
# The TTFT offset: each observation moves it this fraction of the request's prediction (at least
# OFFSET_FLOOR_S of it) toward the residual; it stays within [0, MAX_OFFSET_S].
OFFSET_STEP = 0.05
OFFSET_FLOOR_S = 0.02
MAX_OFFSET_S = 1.0


@dataclass(frozen=True, eq=False)
class EngineProfile:
    """One engine shape (model, GPU type, tensor-parallel size, batching limits) and its step times,
    from the engine model. Build with `profile_for`; shared by every engine of that shape."""

    key: str
    cfg: ResolvedConfig
    chunk: int  # max_num_batched_tokens: the prefill chunk of one step
    max_num_seqs: int
    block_size: int
    capacity_tokens: float
    flops_s: float  # dense bf16 FLOP/s of one GPU x TP (the instance-aware baseline's target rate)
    d0: float  # decode step = d0 + dn x sequences + dk x context tokens (plan_step; exact when the
    dn: float  # model's memory and compute times add, overlap 0 as calibrated, else a secant)
    dk: float
    q_rate: float  # seconds per queued prompt token, prefilled in full chunks (compute + its share of steps)

    def decode_step(self, seqs: float, ctx_tokens: float) -> float:
        return self.d0 + self.dn * seqs + self.dk * ctx_tokens

    def prefill_s(self, tokens: int, cached: int = 0) -> float:
        """Seconds to prefill `tokens` prompt tokens of which `cached` are in the prefix cache, alone,
        in chunks of `chunk` tokens (each chunk one step of the engine model)."""
        q = self.block_size
        return _prefill(self, -(-max(0, tokens) // q), max(0, cached) // q)


@lru_cache(maxsize=65536)
def _prefill(profile: EngineProfile, blocks: int, cached_blocks: int) -> float:
    from gpufleet.serving.engine.model import plan_step

    bs = profile.block_size
    done, end, total = cached_blocks * bs, blocks * bs, 0.0
    done = min(done, max(0, end - 1))  # vLLM recomputes at least the last token
    while done < end:
        n = min(profile.chunk, end - done)
        total += plan_step(profile.cfg, n, done + n, n * (done + n / 2), 1).step_time(0)
        done += n
    return total


@lru_cache(maxsize=256)
def _profile(model: str, gpu: str, tp: int, max_model_len: int | None, num_gpu_blocks: int | None,
             kv_cache_dtype: str) -> EngineProfile:  # fmt: skip
    from gpufleet.serving.engine.model import EngineConfig, resolve

    cfg = resolve(EngineConfig(model=model, gpu=gpu, tensor_parallel_size=tp, max_model_len=max_model_len,
                               num_gpu_blocks=num_gpu_blocks, kv_cache_dtype=kv_cache_dtype))  # fmt: skip
    return from_resolved(cfg)


def profile_for(model: str, gpu: str, tp: int = 1, max_model_len: int | None = None,
                num_gpu_blocks: int | None = None, kv_cache_dtype: str = "auto") -> EngineProfile:  # fmt: skip
    """The profile of an engine serving `model` on `gpu` x `tp` (catalog keys), cached."""
    return _profile(model, gpu, tp, max_model_len, num_gpu_blocks, kv_cache_dtype)


_FROM_RESOLVED: dict[int, EngineProfile] = {}


def from_resolved(cfg) -> EngineProfile:
    """The profile of a resolved engine config (engine.model.ResolvedConfig), cached per object."""
    hit = _FROM_RESOLVED.get(id(cfg))
    if hit is not None and hit.cfg is cfg:
        return hit
    from gpufleet.serving.engine.model import plan_step

    def decode(n: int, ctx: int) -> float:
        # n sequences, ctx context tokens in all: each reads its context and writes one token
        return plan_step(cfg, n, ctx + n, float(ctx), n).step_time(0)

    base = decode(1, 0)
    dn = decode(65, 0) - decode(1, 0)
    dk = (decode(1, 65536) - base) / 65536
    chunk = cfg.max_num_batched_tokens
    prof = EngineProfile(
        key=f"{cfg.model_key}@{cfg.gpu_key}x{cfg.tensor_parallel_size}",
        cfg=cfg,
        chunk=chunk,
        max_num_seqs=cfg.max_num_seqs,
        block_size=cfg.block_size,
        capacity_tokens=float(cfg.kv_capacity_tokens),
        flops_s=cfg.flops_s * cfg.tensor_parallel_size,
        d0=base - dn / 64,
        dn=dn / 64,
        dk=dk,
        q_rate=plan_step(cfg, chunk, chunk, chunk * chunk / 2, 1).step_time(0) / chunk,
    )
    _FROM_RESOLVED[id(cfg)] = prof
    return prof


@dataclass
class Correction:
    """Per-engine online correction from the engine's own histograms (see the module text)."""

    speed: float = 1.0  # s: observed ITL / the model's step for what the engine ran (decode + prefill)
    pace: float = 1.0  # f: observed ITL / the model's pure decode step (prefill interleaving included)
    seen_at: float | None = None  # the sample these were last updated from
    offset_s: float = 0.0  # the TTFT the router measured less what it predicted, at the median

    def observe_ttft(self, predicted_s: float, measured_s: float) -> None:
        """A request the router sent here got its first token `measured_s` after the send (engine
        seconds); the policy had predicted `predicted_s`, this offset included."""
        if not (math.isfinite(predicted_s) and math.isfinite(measured_s)):
            return
        step = OFFSET_STEP * max(predicted_s - self.offset_s, OFFSET_FLOOR_S)
        if measured_s > predicted_s:
            self.offset_s = min(MAX_OFFSET_S, self.offset_s + step)
        elif measured_s < predicted_s:
            self.offset_s = max(0.0, self.offset_s - step)

    def update(self, observed_itl_s: float | None, step_s: float, decode_step_s: float) -> None:
        if observed_itl_s is None or step_s <= 0 or not math.isfinite(observed_itl_s):
            return
        self.speed += EWMA * (min(MAX_FACTOR, max(MIN_FACTOR, observed_itl_s / step_s)) - self.speed)
        ratio = observed_itl_s / decode_step_s
        self.pace += EWMA * (min(MAX_PACE, max(MIN_FACTOR, ratio)) - self.pace)


@dataclass
class Corrections:
    """The corrections of every engine a policy has seen, keyed by engine id."""

    by_engine: dict[str, Correction] = field(default_factory=dict)

    def observe_ttft(self, engine_id: str, predicted_s: float, measured_s: float) -> None:
        """What a request sent to `engine_id` measured against its prediction (`Correction.observe_ttft`)."""
        c = self.by_engine.get(engine_id)
        if c is None:
            c = self.by_engine[engine_id] = Correction()
        c.observe_ttft(predicted_s, measured_s)

    def observe(self, engine) -> Correction:
        """Update from a fresh sample of `engine` (a policy.EngineView), once per sample: its mean
        inter-token latency against the model's step for the batch it ran, with the prompt tokens
        it prefilled in the interval spread over the interval's steps (chunked prefill shares them)."""
        c = self.by_engine.get(engine.id)
        if c is None:
            c = self.by_engine[engine.id] = Correction()
        if engine.sampled_at is not None and engine.sampled_at != c.seen_at:
            c.seen_at = engine.sampled_at
            prof = engine.profile
            if prof is not None and engine.running > 0 and engine.recent_itl_s is not None:
                ctx = engine.kv_usage * prof.capacity_tokens
                decode = prof.decode_step(engine.running, ctx)
                step = decode
                prefilled = engine.recent_prompt_tokens or 0.0
                if prefilled and engine.recent_itl_tokens:
                    steps = max(1.0, engine.recent_itl_tokens / engine.running)
                    step += prefilled * prof.q_rate / steps
                c.update(engine.recent_itl_s, step, decode)
        return c


def ttft_offset(engine, corr: Correction) -> float:
    """The TTFT offset to predict `engine` (a policy.EngineView) with: for a peer's engine the one its
    own router measured (the summary carries it: only the router that sends there measures), else
    this router's."""
    theirs = engine.ttft_offset_s
    return corr.offset_s if theirs is None else theirs


def offset_of(policy, engine_id: str) -> float | None:
    """The TTFT offset `policy` keeps for `engine_id`, for a region summary; None: it keeps none."""
    corrections = getattr(policy, "corrections", None)
    c = corrections.by_engine.get(engine_id) if isinstance(corrections, Corrections) else None
    return None if c is None else c.offset_s


@dataclass(frozen=True, slots=True)
class Prediction:
    ttft_s: float
    tpot_s: float
    running_tpot_before_s: float  # the running batch's pace now (corrected)
    running_tpot_after_s: float  # and with this request in it


def predict(profile: EngineProfile, *, running: int, ctx_tokens: float, queued_prefill: float,
            prompt: int, cached: int, max_tokens: int, rtt_s: float, corr: Correction,
            running_remaining: float | None = None) -> Prediction:  # fmt: skip
    """TTFT and TPOT of a request of `prompt` tokens (`cached` of them in the engine's prefix cache)
    and `max_tokens` output on an engine in this state (see the module text)."""
    return Prediction(*estimate(profile, running, ctx_tokens, queued_prefill, profile.prefill_s(prompt, cached),
                                max(0, prompt - cached), prompt, max_tokens, rtt_s + corr.offset_s, corr.speed,
                                corr.pace, running_remaining))  # fmt: skip


def estimate(profile: EngineProfile, running: int, ctx: float, queued: float, own_s: float, new: int, prompt: int,
             max_tokens: int, rtt_s: float, speed: float, pace: float,
             remaining: float | None = None) -> tuple[float, float, float, float]:  # fmt: skip
    """`predict`'s arithmetic with the request's own prefill time (`own_s`, for `new` uncached tokens)
    given: positional and tuple-valued, for the policy's loop over every engine."""
    # prefill: queued prompts ahead of it (full chunks), then its own; each step also carries the
    # running batch's decode tokens, which cost their KV reads and take room in the chunk
    d0, dn, dk = profile.d0, profile.dn, profile.dk
    room = profile.chunk - running
    work = queued + new
    steps = -(-work // room) if work and room > 0 else (work or 1)
    ttft = rtt_s + speed * (queued * profile.q_rate + own_s + steps * (dn * running + dk * ctx))
    before = pace * (d0 + dn * running + dk * ctx) if running else 0.0
    out = max_tokens if max_tokens > 1 else 1
    after = pace * (d0 + dn * (running + 1) + dk * (ctx + prompt + out / 2))
    # this request's prefill stalls every running request once: spread over the tokens they have left
    # (`remaining`, e.g. from the router's ledger; else this request's own length, the workload's guess)
    left = remaining if remaining is not None and remaining >= 1 else out
    return ttft, after, before, after + speed * own_s / left
