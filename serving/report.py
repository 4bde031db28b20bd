"""Reports: a results folder with markdown tables, PNG plots and the raw numbers as JSON.

Input is a list of `RunResult`s, one per (driver, trace, policy, load, failure) experiment, from
the simulator or from the HTTP drivers alike. Output (in `out_dir`):
  report.md            the results table and the figures, linked
  results.json         every run's summary and extras (no per-request records)
  goodput_vs_load.png  SLO goodput against load, one line per policy, one panel per trace
  ttft_cdf.png         TTFT CDF per policy at one load
  kv_usage.png         KV-cache usage per region over time, for one run
  failure_timeline.png requests per second by outcome around a region failure
matplotlib is imported only when plotting (it is the `report` extra).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.serving import predictions
from gpufleet.serving.outcomes import FAILED, OK, REJECTED, RequestRecord, Summary


@dataclass
class RunResult:
    driver: str  # "sim" or "http"
    trace: str  # trace file name or built-in profile
    policy: str  # headroom, round-robin, least-outstanding, or a peer router's "vllm-router:power_of_two"
    load_scale: float
    summary: Summary
    failure: str | None = None  # "REGION@T" or None
    failed_during_failure: int = 0  # requests FAILED (not rejected) from the failure to its end
    records: list[RequestRecord] = field(default_factory=list)
    kv_series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # region -> (t, usage)
    events: list[tuple[float, str]] = field(default_factory=list)  # (t, what happened)
    extra: dict = field(default_factory=dict)  # preemptions, cost, utilisation, speed, ...

    @property
    def label(self) -> str:
        return f"{self.policy} x{self.load_scale:g}" + (f" fail {self.failure}" if self.failure else "")

    def to_dict(self) -> dict:
        return {
            "driver": self.driver,
            "trace": self.trace,
            "policy": self.policy,
            "load_scale": self.load_scale,
            "failure": self.failure,
            "failed_during_failure": self.failed_during_failure,
            "summary": _finite(self.summary.to_dict()),
            "events": self.events,
            "extra": _finite(self.extra),
        }


def _finite(value):
    """JSON has no infinity: a TTFT percentile of a run that lost requests becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if not math.isfinite(seconds):
        return "inf"
    return f"{seconds * 1000:.0f}"


def failed_between(records: Sequence[RequestRecord], start: float, end: float) -> int:
    """Requests sent in [start, end) that failed (a 429 is a clean answer, not a failure)."""
    return sum(1 for r in records if start <= r.arrival_s < end and r.outcome == FAILED)


# ---- targets ---------------------------------------------------------------------------------------

SLO_GOAL = 0.9  # the SLO attainment goal of DistServe's goodput
# serving/router/policies BASELINES (literal: the report is imported where the engine model is not)
BASELINE_NAMES = ("round-robin", "least-outstanding", "power-of-two", "prefix-affinity", "llm-d", "instance-aware",
                  "kv-cost")  # fmt: skip


@dataclass(frozen=True)
class SloCapacity:
    """The highest load a policy serves with at least `SLO_GOAL` of its requests within SLO.

    This is DistServe's goodput (Zhong et al., OSDI '24, section 1: "the maximum request rate that
    can be served adhering to the SLO attainment goal (say, 90%)"), read off one load sweep: linear
    between the last load that meets the goal and the first that does not. `bound` says how far the
    sweep pins it: "=" between two loads, ">=" when no load of the sweep fell below the goal, "<"
    when the lowest load already did."""

    load_scale: float | None
    rate_rps: float | None  # offered requests per second at that load
    bound: str

    def label(self) -> str:
        if self.load_scale is None or self.rate_rps is None:
            return "-"
        prefix = "" if self.bound == "=" else f"{self.bound} "
        return f"{prefix}{self.rate_rps:.2f} (x{self.load_scale:.2f})"


def slo_capacity(runs: Sequence[RunResult], goal: float = SLO_GOAL) -> SloCapacity:
    """From one policy's steady runs at several loads (one driver, one trace)."""
    pts = sorted((r.load_scale, r.summary.requests / r.summary.duration_s, r.summary.slo_attainment)
                 for r in runs if r.failure is None and r.summary.duration_s > 0)  # fmt: skip
    if not pts:
        return SloCapacity(None, None, "-")
    if pts[0][2] < goal:
        return SloCapacity(pts[0][0], pts[0][1], "<")
    for (x0, r0, a0), (x1, r1, a1) in zip(pts, pts[1:], strict=False):
        if a1 < goal:
            f = (a0 - goal) / (a0 - a1)
            return SloCapacity(x0 + f * (x1 - x0), r0 + f * (r1 - r0), "=")
    return SloCapacity(pts[-1][0], pts[-1][1], ">=")


@dataclass
class TargetCheck:
    trace: str
    driver: str
    capacity: dict[str, SloCapacity]  # policy -> rate at 90% SLO attainment (DistServe goodput)
    vs_round_robin: float | None  # headroom's rate at 90% SLO over round-robin's (target >= 1.3)
    vs_least_outstanding: float | None  # (target >= 1.1)
    failed_in_failure: int | None  # headroom policy, the failure run(s) (target 0)
    # The same-load comparison: goodput at the lowest load where round-robin's attainment is below
    # 90%. Bounded by 1 / round-robin's attainment there (goodput <= offered rate), so it depends
    # on the load grid; reported beside the capacity ratio, not as the target.
    load_scale: float | None = None
    same_load_vs_round_robin: float | None = None
    same_load_vs_least_outstanding: float | None = None
    # issue 13: the default policy running regional (as deployed) against the best baseline running
    # global (one router over every engine: its best case), at 90% SLO (target >= 1.15)
    best_baseline: str | None = None
    vs_best_baseline: float | None = None

    @property
    def met(self) -> bool:
        return (
            self.vs_round_robin is not None
            and self.vs_round_robin >= 1.3
            and self.vs_least_outstanding is not None
            and self.vs_least_outstanding >= 1.1
            and self.failed_in_failure == 0
        )


def _capacity_ratio(mine: SloCapacity, base: SloCapacity) -> float | None:
    """Headroom's capacity over a baseline's; None unless the baseline's is pinned and headroom's is
    pinned or a lower bound (then the ratio is a lower bound too, which is what a target needs)."""
    if base.bound != "=" or mine.bound not in ("=", ">=") or not base.rate_rps or mine.rate_rps is None:
        return None
    return mine.rate_rps / base.rate_rps


def _global_baseline(label: str) -> bool:
    """A baseline at its best reach: ours at global reach, or the peer router (one global router)."""
    return (label.endswith("@global") and label.split("@")[0] in BASELINE_NAMES) or label.startswith("vllm-router:")


def check_targets(runs: Sequence[RunResult]) -> list[TargetCheck]:
    """Per (driver, trace): each policy's rate at 90% SLO attainment, headroom's over the
    baselines', the failed requests through the region failure, and the same-load comparison."""
    out = []
    for driver, trace in sorted({(r.driver, r.trace) for r in runs}):
        mine = [r for r in runs if r.driver == driver and r.trace == trace]
        policies = sorted({r.policy for r in mine}, key=_policy_order)
        cap = {p: slo_capacity([r for r in mine if r.policy == p]) for p in policies}
        none = SloCapacity(None, None, "-")
        h, rr, lo = (cap.get(p, none) for p in ("headroom", "round-robin", "least-outstanding"))
        steady = {(r.policy, r.load_scale): r for r in mine if r.failure is None}
        rr_loads = sorted(load for (p, load) in steady if p == "round-robin")
        load = next((x for x in rr_loads if steady[("round-robin", x)].summary.slo_attainment < SLO_GOAL), None)

        def good(policy: str, load=load, steady=steady) -> float | None:
            r = steady.get((policy, load))
            return None if r is None else r.summary.goodput_rps

        gh, grr, glo = good("headroom"), good("round-robin"), good("least-outstanding")
        mine_label = next((p for p in ("default@regional", "default") if p in cap), None)
        # the baselines at global reach, and the peer router (always one router over every engine)
        globals_ = {p: c for p, c in cap.items() if _global_baseline(p)}
        best = max(globals_, key=lambda p: globals_[p].rate_rps or 0.0) if globals_ else None
        fails = [r.failed_during_failure for r in mine if r.failure and r.policy == "headroom"]
        out.append(
            TargetCheck(
                trace=trace,
                driver=driver,
                capacity=cap,
                vs_round_robin=_capacity_ratio(h, rr),
                vs_least_outstanding=_capacity_ratio(h, lo),
                failed_in_failure=max(fails) if fails else None,
                load_scale=load,
                same_load_vs_round_robin=(gh / grr) if gh is not None and grr else None,
                same_load_vs_least_outstanding=(gh / glo) if gh is not None and glo else None,
                best_baseline=best,
                vs_best_baseline=(_capacity_ratio(cap[mine_label], cap[best]) if best and mine_label else None),
            )
        )
    return out


# ---- markdown --------------------------------------------------------------------------------------


def results_table(runs: Sequence[RunResult]) -> str:
    """One row per (driver, trace, load, failure), columns goodput | p99 TTFT per policy."""
    policies = sorted({r.policy for r in runs}, key=_policy_order)
    head = ["driver", "trace", "load", "region failure"]
    for p in policies:
        head += [f"{p} goodput (req/s, SLO %)", f"{p} p99 TTFT ms", f"{p} failed in failure"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r.driver, r.trace, r.load_scale, r.failure or "") for r in runs})
    for driver, trace, load, failure in keys:
        row = [driver, trace, f"x{load:g}", failure or "none"]
        for p in policies:
            r = next(
                (x for x in runs if (x.driver, x.trace, x.load_scale, x.failure or "", x.policy)
                 == (driver, trace, load, failure, p)),
                None,
            )  # fmt: skip
            if r is None:
                row += ["", "", ""]
                continue
            s = r.summary
            row += [
                f"{s.goodput_rps:.2f} ({100 * s.slo_attainment:.0f}%)",
                _ms(s.ttft_p99_s),
                str(r.failed_during_failure) if r.failure else "-",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def capacity_table(checks: Sequence[TargetCheck]) -> str:
    """Each policy's rate at 90% SLO attainment (req/s, with the load), per driver and trace."""
    policies = sorted({p for c in checks for p in c.capacity}, key=_policy_order)
    lines = ["| driver | trace | " + " | ".join(policies) + " |", "|---|---|" + "---|" * len(policies)]
    for c in checks:
        cells = [c.capacity[p].label() if p in c.capacity else "" for p in policies]
        lines.append(f"| {c.driver} | {c.trace} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(checks: Sequence[TargetCheck]) -> str:
    lines = [
        "| driver | trace | headroom / round-robin at 90% SLO (>= 1.3) "
        "| headroom / least-outstanding at 90% SLO (>= 1.1) | failed in region failure (= 0) | met "
        "| same load: first where round-robin < 90% | goodput there, vs round-robin / least-outstanding |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c.driver} | {c.trace} | {_ratio(c.vs_round_robin)} | {_ratio(c.vs_least_outstanding)} "
            f"| {'-' if c.failed_in_failure is None else c.failed_in_failure} | {'yes' if c.met else 'no'} "
            f"| {'-' if c.load_scale is None else f'x{c.load_scale:g}'} "
            f"| {_ratio(c.same_load_vs_round_robin)} / {_ratio(c.same_load_vs_least_outstanding)} |"
        )
    return "\n".join(lines)


def side_by_side_table(runs: Sequence[RunResult]) -> str:
    """One column per run, one row per figure; the last column, the first run's over the second's."""
    rows: list[tuple[str, list[str], tuple[float, float] | None]] = []

    def row(name: str, cells: list[str], values: tuple[float, float] | None = None) -> None:
        rows.append((name, cells, values))

    ss = [r.summary for r in runs]
    pair = len(runs) == 2
    row("requests", [str(s.requests) for s in ss])
    row("within SLO", [f"{s.within_slo} ({100 * s.slo_attainment:.1f}%)" for s in ss],
        (ss[0].within_slo, ss[1].within_slo) if pair else None)  # fmt: skip
    row("goodput (req/s)", [f"{s.goodput_rps:.2f}" for s in ss],
        (ss[0].goodput_rps, ss[1].goodput_rps) if pair else None)  # fmt: skip
    row("TTFT p50 / p99 (ms)", [f"{_ms(s.ttft_p50_s)} / {_ms(s.ttft_p99_s)}" for s in ss])
    row("TPOT p50 (ms)", [_ms(s.tpot_p50_s) for s in ss])
    row("refused (429)", [str(s.rejected) for s in ss])
    row("failed", [str(s.failed) for s in ss])
    row("failed through the region failure", [str(r.failed_during_failure) if r.failure else "-" for r in runs])
    row("served outside the client's region", [str(s.spilled) for s in ss])
    # the routers count the streams they continued (the client sees one unbroken stream)
    row("streams continued after a failure",
        [_fmt(r.extra.get("continuations", s.continued)) for r, s in zip(runs, ss, strict=True)])  # fmt: skip
    head = ["", *(r.policy for r in runs)] + ([f"{runs[0].policy} / {runs[1].policy}"] if pair else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cells, values in rows:
        ratio = [] if not pair else ["-" if values is None or not values[1] else f"{values[0] / values[1]:.2f}x"]
        lines.append("| " + " | ".join([name, *cells, *ratio]) + " |")
    return "\n".join(lines)


def best_table(checks: Sequence[TargetCheck]) -> str:
    lines = ["| driver | trace | best baseline (global) | default@regional / it at 90% SLO (>= 1.15) |",
             "|---|---|---|---|"]  # fmt: skip
    for c in checks:
        lines.append(f"| {c.driver} | {c.trace} | {c.best_baseline or '-'} | {_ratio(c.vs_best_baseline)} |")
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _policy_order(p: str) -> tuple:
    base = ["headroom", "least-outstanding", "round-robin"]
    return (base.index(p) if p in base else len(base), p)


def write_report(
    runs: Sequence[RunResult],
    out_dir: Path,
    title: str = "gpufleet results",
    notes: Sequence[str] = (),
    timeline_run: RunResult | None = None,
    plots: bool = True,
    sweep: bool = True,
) -> Path:
    """Write report.md, results.json and the plots; returns the path of report.md.

    `sweep`: the runs are a load sweep (rates at 90% SLO, targets); False: runs of one load side by
    side (the demo), compared in one table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = check_targets(runs) if sweep else []
    figures: list[tuple[str, str]] = []
    if plots:
        figures = _plots(runs, out_dir, timeline_run, steady_only=sweep)
    md = [f"# {title}", ""]
    md += [f"- {n}" for n in notes]
    if not sweep:
        md += ["", "## Side by side", "",
               "The same requests at the same times into each setup. Trace time throughout (engine",
               "seconds). Goodput: requests within the SLO (TTFT and TPOT) per second. p99 TTFT counts",
               "lost requests as infinite. A 429 is a clean refusal that the client can retry; failed",
               "means the request was lost.", "",
               side_by_side_table(runs), ""]  # fmt: skip
    md += [] if not sweep else [
        "", "## Results", "",
        "Goodput: requests completed within the fleet's SLO (TTFT and TPOT) per second of model time,",
        "with the SLO attainment in brackets. p99 TTFT counts lost requests as infinite.", "",
        results_table(runs), "",
        "## Rate at 90% SLO attainment", "",
        "DistServe's goodput (OSDI '24): the highest request rate a policy serves with at least 90% of",
        "requests within SLO, read off the load sweep above (linear between the two loads around 90%;",
        "'>=' when no load of the sweep fell below 90%, '<' when the lowest already did).", "",
        capacity_table(checks), "",
    ]  # fmt: skip
    if sweep and {"headroom", "round-robin"} <= {r.policy for r in runs}:  # the earlier landing's targets
        md += [
            "## Targets for the headroom policy", "",
            "At 90% SLO attainment, headroom's rate over round-robin's and least-outstanding's, and the",
            "requests failed through the region failure. Beside it, the same-load comparison at the first",
            "load where round-robin falls below 90% (bounded by 1 / round-robin's attainment there).", "",
            targets_table(checks), "",
        ]  # fmt: skip
    md += [] if not sweep else [
        "## Default (regional) against the best baseline (global)", "",
        "The policy the router ships, one router per region as deployed, against the best of the",
        "baselines given one router over every engine (their best case), at 90% SLO (target >= 1.15).", "",
        best_table(checks), "",
    ]  # fmt: skip
    predicted = predictions.http_points(runs)
    if predicted:
        md += ["## Predicted against measured TTFT (HTTP)", "",
               "The TTFT the router's predicting policy expected of the engine it chose (said on each",
               "answer), against the TTFT the client then measured, per GPU type; steady runs only,",
               "continued streams left out.", "", *predictions.table(predicted), ""]  # fmt: skip
        from_send = predictions.http_points(runs, less_router_wait=True)
        if from_send:
            md += ["The same, with the measured TTFT counted from the request's send to its engine (less",
                   "the time it waited at the routers first, admission and late binding, which the",
                   "answer says): what the prediction, made at that send, is about.", "",
                   *predictions.table(from_send), ""]  # fmt: skip
        if plots:
            predictions.plot(predicted, out_dir / "predicted_ttft.png", "measured TTFT at the client, s (HTTP)")
            figures.append(("predicted_ttft.png", "Predicted against measured TTFT"))
    extras = [r for r in runs if r.extra]
    if extras:
        md += ["## Per-run details", "", "| run | driver | trace | details |", "|---|---|---|---|"]
        for r in extras:
            detail = ", ".join(f"{k}: {_fmt(v)}" for k, v in r.extra.items() if not isinstance(v, dict))
            md.append(f"| {r.label} | {r.driver} | {r.trace} | {detail} |")
        md.append("")
    for name, caption in figures:
        md += [f"### {caption}", "", f"![{caption}]({name})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    (out_dir / "results.json").write_text(
        json.dumps({"runs": [r.to_dict() for r in runs], "targets": [_finite(_check_dict(c)) for c in checks]},
                   indent=1),
        encoding="utf-8",
    )  # fmt: skip
    return path


def _check_dict(c: TargetCheck) -> dict:
    d = dict(c.__dict__)
    d["capacity"] = {p: cap.__dict__ for p, cap in c.capacity.items()}
    d["met"] = c.met
    return d


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


# ---- plots -----------------------------------------------------------------------------------------


def _plots(
    runs: Sequence[RunResult], out: Path, timeline_run: RunResult | None, steady_only: bool = True
) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: list[tuple[str, str]] = []
    steady = [r for r in runs if r.failure is None]
    groups = sorted({(r.driver, r.trace) for r in steady})
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
        for ax, (driver, trace) in zip(axes[0], groups, strict=True):
            mine = [r for r in steady if (r.driver, r.trace) == (driver, trace)]
            for policy in sorted({r.policy for r in mine}, key=_policy_order):
                pts = sorted((r.load_scale, r.summary.goodput_rps) for r in mine if r.policy == policy)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
            ax.set_title(f"{trace} ({driver})", fontsize=9)
            ax.set_xlabel("load (x trace rate)")
            ax.set_ylabel("goodput (req/s within SLO)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "goodput_vs_load.png", dpi=110)
        plt.close(fig)
        figures.append(("goodput_vs_load.png", "Goodput against load"))

    with_records = [r for r in (steady if steady_only else runs) if r.records]
    if with_records:
        # The CDF at the highest load that every policy ran, on the first (driver, trace).
        driver, trace = with_records[0].driver, with_records[0].trace
        mine = [r for r in with_records if (r.driver, r.trace) == (driver, trace)]
        load = max(r.load_scale for r in mine)
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in sorted((r for r in mine if r.load_scale == load), key=lambda r: _policy_order(r.policy)):
            ttfts = sorted(x.ttft_s for x in r.records if x.outcome == OK and x.ttft_s is not None)
            n = len(r.records)
            if ttfts and n:
                ax.step(ttfts, [(i + 1) / n for i in range(len(ttfts))], where="post", label=r.policy)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (s, model time)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"TTFT CDF, {trace} x{load:g} ({driver})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "ttft_cdf.png", dpi=110)
        plt.close(fig)
        figures.append(("ttft_cdf.png", "TTFT CDF"))

    run = timeline_run or next((r for r in runs if r.failure and r.kv_series), None)
    if run is not None and run.kv_series:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for region, series in sorted(run.kv_series.items()):
            ax.plot([t for t, _ in series], [100 * u for _, u in series], label=region, lw=1)
        for t, what in run.events:
            ax.axvline(t, color="grey", ls="--", lw=0.8)
            ax.text(t, 101, what, fontsize=6, rotation=0, va="bottom")
        ax.set_ylim(0, 110)
        ax.set_xlabel("time (s, model time)")
        ax.set_ylabel("KV cache usage %")
        ax.set_title(f"KV usage per region, {run.label} ({run.driver}, {run.trace})", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "kv_usage.png", dpi=110)
        plt.close(fig)
        figures.append(("kv_usage.png", "KV usage per region over time"))

    if run is not None and run.records:
        width = max(1.0, max(rec.arrival_s for rec in run.records) / 60)
        bins: dict[str, dict[int, int]] = {OK: {}, REJECTED: {}, FAILED: {}}
        for rec in run.records:
            b = int(rec.arrival_s // width)
            bins.setdefault(rec.outcome, {})
            bins[rec.outcome][b] = bins[rec.outcome].get(b, 0) + 1
        top = max((max(v) for v in bins.values() if v), default=0)
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for outcome, color in ((OK, "tab:green"), (REJECTED, "tab:orange"), (FAILED, "tab:red")):
            xs = range(top + 1)
            ax.plot([x * width for x in xs], [bins[outcome].get(x, 0) / width for x in xs], label=outcome,
                    color=color)  # fmt: skip
        for t, what in run.events:
            ax.axvline(t, color="grey", ls="--", lw=0.8)
            ax.text(t, 0, what, fontsize=6, va="bottom")
        ax.set_xlabel("request sent at (s, model time)")
        ax.set_ylabel("requests per second")
        ax.set_title(f"Outcomes around the region failure, {run.label} ({run.driver})", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "failure_timeline.png", dpi=110)
        plt.close(fig)
        figures.append(("failure_timeline.png", "Failure timeline"))
    return figures
