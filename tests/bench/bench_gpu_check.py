"""On a machine with an NVIDIA GPU: the launcher's probe and plan, and the engine model's roofline
against the real chip.

    python tests/bench/bench_gpu_check.py [--out results/gpu/gpu_check.json]

1. The GPU probe through each of its three sources (torch.cuda, NVML, nvidia-smi): they must agree.
2. `gpufleet engine launch --dry-run` on the example fleet with the real probe: the plan it prints.
3. Roofline inputs: device-to-device copy bandwidth and a bf16 8192^3 matrix product, against the
   catalog's vendor figures (stacks/catalog/gpus.yaml) that the engine model divides by.
4. Llama-3.1-8B's linear layers (shapes from its config.json: hidden 4096, 32 query / 8 KV heads of
   128, intermediate 14336, vocabulary 128256), bf16 random weights, replayed as a CUDA graph at
   batch sizes from one decode token to a 8k-token prefill chunk, against the engine model's
   weight-streaming + matmul terms for the same GPU (serving/engine/model.py, calibration.yaml).
   This is a microbenchmark of the matmuls alone (no attention, no vLLM scheduler, no sampling), so
   it bounds the model's terms from below; it is not a vLLM measurement.

Without a GPU (or without torch) it prints why and exits 0, so `make bench` runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS = 4096, 32, 8, 128, 14336, 128256, 32
BATCHES = (1, 8, 32, 128, 256, 512, 2048, 8192)


def probes() -> dict:
    from gpufleet.serving.gpu_probe import PROBES

    out = {}
    for source, fn in PROBES:
        try:
            out[source] = [
                {
                    "name": g.name,
                    "total_gib": round(g.total_bytes / 2**30, 2),
                    "free_gib": round(g.free_bytes / 2**30, 2),
                }
                for g in fn()
            ]
        except Exception as exc:  # report what each source says, whatever it is
            out[source] = f"{type(exc).__name__}: {exc}"
    return out


def launcher_dry_run() -> str:
    cmd = [sys.executable, "-c", "from gpufleet.cli.app import main; main()", "engine", "launch",
           "--fleet", str(ROOT / "fleet.yaml"), "--dry-run"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "GPUFLEET_FAKE_GPUS"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return f"$ gpufleet engine launch --fleet fleet.yaml --dry-run   (exit {done.returncode})\n" + (
        done.stdout + done.stderr
    )


def _time_ms(torch, fn, reps: int) -> float:
    """Median of `reps` timings (CUDA events) after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def roofline_inputs(torch) -> dict:
    n = 2 * 2**30  # 2 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(torch, lambda: dst.copy_(src), 20)
    copy_tb_s = 2 * n / (ms / 1e3) / 1e12  # bytes read + written
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = _time_ms(torch, lambda: a @ b, 20)
    tflops = 2 * 8192**3 / (ms / 1e3) / 1e12
    return {"copy_tb_s_read_plus_write": round(copy_tb_s, 2), "bf16_gemm_8192_tflops": round(tflops, 1)}


def linear_stack(torch) -> list[dict]:
    """Time Llama-3.1-8B's 32 layers of linears + lm_head for each batch of tokens (CUDA graph)."""
    qkv = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    shapes = [(HIDDEN, qkv), (Q_HEADS * HEAD_DIM, HIDDEN), (HIDDEN, 2 * INTER), (INTER, HIDDEN)]
    layers = [[torch.randn(i, o, dtype=torch.bfloat16, device="cuda") * 0.02 for i, o in shapes]
              for _ in range(LAYERS)]  # fmt: skip
    head = torch.randn(HIDDEN, VOCAB, dtype=torch.bfloat16, device="cuda") * 0.02
    weight_bytes = 2 * (sum(i * o for i, o in shapes) * LAYERS + HIDDEN * VOCAB)
    out = []
    for n in BATCHES:
        x = torch.randn(n, HIDDEN, dtype=torch.bfloat16, device="cuda")

        def forward(x=x):
            h = x
            for wqkv, wo, wgu, wd in layers:
                h = (h @ wqkv)[:, : Q_HEADS * HEAD_DIM] @ wo
                h = (h @ wgu)[:, :INTER] @ wd
            return h[-1:] @ head  # vLLM computes logits for the last token of each sequence only

        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()  # warm-up on a side stream before capture, as torch's docs ask
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            forward()
        ms = _time_ms(torch, graph.replay, 30)
        flops = 2 * n * (weight_bytes / 2 - HIDDEN * VOCAB) + 2 * HIDDEN * VOCAB
        out.append({"tokens": n, "measured_ms": round(ms, 3), "tflops": round(flops / (ms / 1e3) / 1e12, 1)})
        del graph
    return [dict(r, weight_gib=round(weight_bytes / 2**30, 2)) for r in out]


def model_terms(gpu_key: str, tokens: int) -> dict:
    """The engine model's weight-streaming and matmul terms for one step of `tokens` tokens: its own
    StepPlan with no overhead and no attention (what this microbenchmark runs)."""
    from gpufleet.serving.engine.model import EngineConfig, StepPlan, resolve

    cfg = resolve(EngineConfig(model="llama-3.1-8b", gpu=gpu_key))
    c = cfg.cost
    plan = StepPlan(
        start=0.0, scheduled=[], steps=1, base=0.0,
        a=cfg.weight_bytes / (cfg.hbm_bytes_s * c.mem_efficiency), b=0.0,
        c=tokens * cfg.flops_per_token / (cfg.flops_s * c.compute_efficiency), d=0.0,
        overlap=c.overlap,
    )  # fmt: skip
    return {"model_ms": round(1e3 * plan.step_time(0), 3), "model_overhead_ms": round(1e3 * c.overhead_s, 3)}


def catalog_key(name: str) -> str | None:
    """The catalog GPU whose key or alias is a word of the device name ("NVIDIA H200" -> H200)."""
    from gpufleet.stacks import catalog

    words = set(name.casefold().replace("-", " ").split())
    for g in catalog.gpus().values():
        if any(k.casefold() in words for k in (g.key, *g.aliases)):
            return g.key
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "gpu" / "gpu_check.json")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("skipped: torch is not installed (this check runs on a GPU machine)")
        return 0
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU visible (this check runs on a GPU machine)")
        return 0
    t0 = time.perf_counter()
    report: dict = {"torch": torch.__version__, "cpu_cores": os.cpu_count()}
    report["probe"] = probes()
    print(json.dumps(report["probe"], indent=1))
    report["launcher"] = launcher_dry_run()
    print(report["launcher"])
    name = torch.cuda.get_device_name(0)
    key = catalog_key(name)
    report["gpu"] = {"name": name, "catalog_key": key}
    report["roofline_inputs"] = roofline_inputs(torch)
    if key:
        from gpufleet.stacks import catalog

        g = catalog.gpu(key)
        report["catalog"] = {"hbm_tb_s": g.hbm_tb_s, "bf16_tflops": g.bf16_tflops}
    rows = linear_stack(torch)
    if key:
        rows = [dict(r, **model_terms(key, r["tokens"])) for r in rows]
        for r in rows:
            r["model_over_measured"] = round(r["model_ms"] / r["measured_ms"], 2)
    report["llama_3_1_8b_linears"] = rows
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: v for k, v in report.items() if k not in ("probe", "launcher")}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
