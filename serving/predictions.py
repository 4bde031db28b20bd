"""The predicting policy's TTFT against the TTFT then measured, per GPU type: a table and a plot.

Two sources give the pairs: the simulator's decision log (tests/bench/results_sim.py) and an HTTP
bench run, where each answer carries the prediction the router made for it (the load generator
asks with `X-Gpufleet-Explain: 1`; the router answers `X-Gpufleet-Predicted-Ttft-Ms`). Both are in
model seconds. matplotlib is imported only to plot.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gpufleet.serving.outcomes import OK

if TYPE_CHECKING:
    from gpufleet.serving.report import RunResult

Points = dict[str, list[tuple[float, float]]]  # label -> [(predicted s, measured s)]
CLOSE = (0.8, 1.25)  # predicted / measured counted as close


def http_points(runs: Sequence[RunResult], less_router_wait: bool = False) -> Points:
    """Pairs from HTTP runs without a failure, by GPU type of the region that served (the run's
    `extra["gpu"]`) and policy, over all loads; continued or failed requests are left out. With
    `less_router_wait` the measured TTFT is counted from the send to the engine (less the time the
    request had waited at the routers, which the answer says) and requests without that are left out."""
    points: Points = {}
    for run in runs:
        if run.driver != "http" or run.failure is not None:
            continue
        gpu = run.extra.get("gpu") or {}
        for rec in run.records:
            if rec.predicted_ttft_s is None or rec.ttft_s is None or rec.continued or rec.outcome != OK:
                continue
            measured = rec.ttft_s
            if less_router_wait:
                if rec.sent_after_s is None:
                    continue
                measured -= rec.sent_after_s
            label = f"{gpu.get(rec.region, rec.region)} ({run.policy})"
            points.setdefault(label, []).append((rec.predicted_ttft_s, measured))
    return points


def table(points: Points) -> list[str]:
    """A markdown table: per label, requests, median predicted / measured, the share within CLOSE."""
    lines = [f"| GPU (run) | requests | median predicted / measured | within {CLOSE[0]}-{CLOSE[1]}x |",
             "|---|---|---|---|"]  # fmt: skip
    for label, pts in sorted(points.items()):
        ratios = [p / m for p, m in pts if m > 0]
        if not ratios:
            continue
        close = sum(1 for r in ratios if CLOSE[0] <= r <= CLOSE[1]) / len(ratios)
        lines.append(f"| {label} | {len(pts)} | {statistics.median(ratios):.2f} | {100 * close:.0f}% |")
    return lines


def plot(points: Points, path: Path, measured_label: str) -> None:
    """Predicted against measured TTFT, log-log, one colour per label, the diagonal in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for label, pts in sorted(points.items()):
        ax.scatter([m for _, m in pts], [p for p, _ in pts], s=4, alpha=0.5, label=label)
    hi = max((max(p, m) for pts in points.values() for p, m in pts), default=1.0)
    lo = min((min(p, m) for pts in points.values() for p, m in pts if min(p, m) > 0), default=0.01)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(measured_label)
    ax.set_ylabel("predicted TTFT at the decision, s")
    ax.legend(fontsize=7, markerscale=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
