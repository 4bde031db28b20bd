"""Fit the step-time factors of the engine model to published vLLM measurements.

    python -m gpufleet.serving.engine.calibrate          # print the table (current factors)
    python -m gpufleet.serving.engine.calibrate --fit    # grid-fit, print the new factors + table

Each published point is replayed in virtual time through the SAME engine model (closed loop at the
published concurrency, the published input/output lengths, ignore_eos), and the emulator's figure
is compared with the published one. The points and their sources live in calibration.yaml.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass, field

from gpufleet.serving.engine.model import EngineConfig, Request, StepCost, calibration
from gpufleet.serving.engine.virtual import VirtualEngine, VirtualLoop


@dataclass
class _Tally:
    """What the closed-loop client has sent and seen so far."""

    sent: int = 0
    out: int = 0
    last: float = 0.0
    tpot: list[float] = field(default_factory=list)


def simulate_point(point: dict, cost: StepCost) -> float:
    """The emulator's figure for one published point (same unit as point['published'])."""
    cfg = EngineConfig(
        model=point["model"],
        gpu=point["gpu"],
        max_model_len=point.get("max_model_len", 4096),
        max_num_seqs=point.get("max_num_seqs"),
        step_cost=cost,
        gpu_memory_gib=point.get("gpu_memory_gib"),
        hbm_tb_s=point.get("hbm_tb_s"),
        bf16_tflops=point.get("bf16_tflops"),
    )
    loop = VirtualLoop()
    eng = VirtualEngine(loop, cfg)
    conc, total = int(point["concurrency"]), int(point["num_prompts"])
    isl, osl = int(point["input_len"]), int(point["output_len"])
    state = _Tally()

    def finish(req: Request, t: float) -> None:
        state.out += req.num_output_tokens
        state.last = t
        if req.num_output_tokens > 1:
            assert req.first_token_time is not None  # set when the first output token was made
            state.tpot.append((t - req.first_token_time) / (req.num_output_tokens - 1))
        send()

    def send() -> None:
        if state.sent < total:
            i = state.sent
            state.sent += 1
            # distinct prompts: no prefix sharing (random-token benchmarks)
            loop.submit(
                eng, Request(f"p{i}", prompt_len=isl, max_tokens=osl, ignore_eos=True), on_finish=finish
            )

    for _ in range(min(conc, total)):
        send()
    loop.run()
    if point["metric"] == "output_tok_s":
        return state.out / state.last
    if point["metric"] == "tpot_ms":
        tp = sorted(state.tpot)
        return 1000 * tp[len(tp) // 2]
    raise ValueError(f"unknown metric {point['metric']!r}")


def table(cost: StepCost) -> list[tuple[dict, float, float]]:
    rows = []
    for p in calibration()["points"]:
        got = simulate_point(p, cost)
        rows.append((p, got, (got - p["published"]) / p["published"]))
    return rows


def fit() -> StepCost:
    """Grid search minimising the mean squared relative error over the points."""
    best, best_err = None, float("inf")
    for mem, comp, over, ovl in itertools.product(
        (0.7, 0.8, 0.9), (0.45, 0.6, 0.75), (0.001, 0.002, 0.004, 0.006), (1.0, 0.5, 0.0)
    ):
        cost = StepCost(mem_efficiency=mem, compute_efficiency=comp, overhead_s=over, overlap=ovl)
        err = sum(e * e for _, _, e in table(cost))
        if err < best_err:
            best, best_err = cost, err
    assert best is not None
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", action="store_true")
    a = ap.parse_args(argv)
    d = calibration()["default"]
    cost = fit() if a.fit else StepCost(**d)
    print(
        f"factors: mem_efficiency={cost.mem_efficiency} compute_efficiency={cost.compute_efficiency} "
        f"overhead_s={cost.overhead_s} overlap={cost.overlap}"
    )
    print("| point | published | emulator | error |\n|---|---|---|---|")
    errs = []
    for p, got, err in table(cost):
        errs.append(abs(err))
        print(f"| {p['name']} | {p['published']:g} {p['metric']} | {got:.1f} | {100 * err:+.1f}% |")
    print(f"mean |error| {100 * sum(errs) / len(errs):.1f}%, max {100 * max(errs):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
