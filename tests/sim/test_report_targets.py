"""The report's target arithmetic: the rate at 90% SLO attainment (DistServe's goodput) read off a
load sweep, and the headroom-over-baseline ratios built on it."""

from __future__ import annotations

import pytest
from gpufleet.serving.outcomes import OK, RequestRecord, summarize
from gpufleet.serving.report import RunResult, check_targets, slo_capacity, write_report

DURATION = 100.0  # model seconds per run; 10 requests per second at x1


def run(policy: str, load: float, attainment: float, failure: str | None = None, failed: int = 0) -> RunResult:
    n = int(10 * load * DURATION)
    good = round(attainment * n)
    recs = [
        RequestRecord(id=i, arrival_s=i * DURATION / n, prompt_tokens=10, max_tokens=10, outcome=OK,
                      ttft_s=0.1 if i < good else 5.0, tpot_s=0.01)
        for i in range(n)
    ]  # fmt: skip
    s = summarize(recs, ttft_slo_s=2.0, tpot_slo_s=0.1, duration_s=DURATION)
    return RunResult("sim", "t", policy, load, s, failure=failure, failed_during_failure=failed)


def sweep(policy: str, attainments: dict[float, float]) -> list[RunResult]:
    return [run(policy, x, a) for x, a in attainments.items()]


def test_rate_is_interpolated_between_the_loads_around_90_percent():
    cap = slo_capacity(sweep("round-robin", {1: 1.0, 2: 0.97, 2.25: 0.83, 3: 0.5}))
    assert cap.bound == "="
    assert cap.load_scale == pytest.approx(2 + 0.25 * (0.97 - 0.9) / (0.97 - 0.83), rel=1e-3)
    assert cap.rate_rps == pytest.approx(10 * cap.load_scale)
    # A later recovery above 90% does not count: the first crossing is the capacity.
    assert slo_capacity(sweep("x", {1: 0.95, 2: 0.85, 3: 0.95})).load_scale == pytest.approx(1.5)


def test_bounds_when_the_sweep_does_not_bracket_90_percent():
    never = slo_capacity(sweep("headroom", {1: 1.0, 2: 0.99}))
    assert (never.bound, never.load_scale) == (">=", 2)
    always = slo_capacity(sweep("round-robin", {1: 0.8, 2: 0.5}))
    assert (always.bound, always.load_scale) == ("<", 1)
    assert slo_capacity([]).label() == "-"


def test_targets_compare_rates_at_90_percent_not_goodput_at_one_load():
    runs = [
        *sweep("round-robin", {1: 1.0, 2: 0.97, 2.25: 0.82, 2.5: 0.6, 3: 0.4}),
        *sweep("least-outstanding", {1: 1.0, 2: 0.97, 2.25: 0.82, 2.5: 0.6, 3: 0.4}),
        *sweep("headroom", {1: 1.0, 2: 1.0, 2.25: 0.995, 2.5: 0.98, 3: 0.86}),
        run("headroom", 2.25, 0.7, failure="gcp@33+33", failed=0),
    ]
    (c,) = check_targets(runs)
    rr = 2 + 0.25 * 0.07 / 0.15
    h = 2.5 + 0.5 * 0.08 / 0.12
    assert c.vs_round_robin == pytest.approx(h / rr)  # ~1.36: met
    assert c.vs_least_outstanding == pytest.approx(h / rr)
    assert c.failed_in_failure == 0 and c.met
    # The same-load view at x2.25 is capped by 1 / 0.82 whatever headroom does.
    assert c.load_scale == 2.25
    assert c.same_load_vs_round_robin == pytest.approx(0.995 / 0.82, rel=1e-3)
    assert c.same_load_vs_round_robin < 1 / 0.82 + 1e-9
    # A failed request during the failure, or a baseline that never crosses, is not met.
    assert not check_targets([*runs[:-1], run("headroom", 2.25, 0.7, failure="g@1", failed=1)])[0].met
    flat = [*sweep("round-robin", {1: 1.0, 2: 0.95}), *sweep("headroom", {1: 1.0, 2: 1.0})]
    assert check_targets(flat)[0].vs_round_robin is None


def test_report_shows_the_rate_table_and_the_verdict(tmp_path):
    runs = [
        *sweep("round-robin", {1: 1.0, 2: 0.8}),
        *sweep("least-outstanding", {1: 1.0, 2: 0.8}),
        *sweep("headroom", {1: 1.0, 2: 0.99, 3: 0.7}),
        *sweep("vllm-router:power_of_two", {1: 1.0, 2: 0.85}),
    ]
    path = write_report(runs, tmp_path, plots=False)
    text = path.read_text()
    assert "## Rate at 90% SLO attainment" in text
    assert "vllm-router:power_of_two" in text.split("## Rate at 90% SLO attainment")[1]
    # round-robin x1.5, headroom x(2 + 0.09 / 0.29): 1.54x; no failure run, so not met
    assert "| sim | t | 1.54x | 1.54x | - | no |" in text
    assert '"met": false' in (tmp_path / "results.json").read_text()


def test_default_regional_is_compared_with_the_best_global_baseline():
    runs = [
        *sweep("default@regional", {1: 1.0, 2: 0.99, 3: 0.95, 4: 0.8}),
        *sweep("least-outstanding@global", {1: 1.0, 2: 0.95, 3: 0.85}),
        *sweep("instance-aware@global", {1: 1.0, 2: 0.97, 3: 0.88}),
        *sweep("default@global", {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.95, 5: 0.5}),  # not a baseline
    ]
    (c,) = check_targets(runs)
    assert c.best_baseline == "instance-aware@global"
    ia = 2 + 1 * 0.07 / 0.09
    assert c.vs_best_baseline == pytest.approx((3 + 0.05 / 0.15) / ia)


def test_the_report_compares_the_routers_predictions_with_what_the_client_measured(tmp_path):
    """HTTP runs whose answers said the router's predicted TTFT get a table per GPU type and a plot;
    continued or failed requests and runs through a failure are left out."""
    recs = [
        RequestRecord(id=i, arrival_s=i, prompt_tokens=10, max_tokens=10, outcome=OK, region="r-h100",
                      ttft_s=0.2, tpot_s=0.01, predicted_ttft_s=0.2 * (1.1 if i % 2 else 3.0),
                      sent_after_s=0.1 if i < 8 else None)
        for i in range(10)
    ]  # fmt: skip
    recs.append(RequestRecord(id=10, arrival_s=10, prompt_tokens=10, max_tokens=10, outcome=OK, region="r-h100",
                              ttft_s=0.2, predicted_ttft_s=50.0, continued=True))  # fmt: skip
    s = summarize(recs, ttft_slo_s=2.0, tpot_slo_s=0.1, duration_s=DURATION)
    steady = RunResult("http", "t", "default", 1.0, s, records=recs, extra={"gpu": {"r-h100": "H100-80GB"}})
    failing = RunResult("http", "t", "default", 1.0, s, failure="r-h100 down", records=recs,
                        extra={"gpu": {"r-h100": "H100-80GB"}})  # fmt: skip
    text = write_report([steady, failing], tmp_path).read_text()
    assert "## Predicted against measured TTFT (HTTP)" in text
    # ten requests (not the continued one), median of 1.1 and 3.0 -> 2.05, half within 0.8-1.25x
    assert "| H100-80GB (default) | 10 | 2.05 | 50% |" in text
    # from the send: the eight that said their wait (0.1 s of the 0.2), predicted 0.22 or 0.6 s
    # against 0.1 s: median of 2.2 and 6.0 -> 4.10, none within 0.8-1.25x
    assert "| H100-80GB (default) | 8 | 4.10 | 0% |" in text
    assert (tmp_path / "predicted_ttft.png").stat().st_size > 0
    plain = write_report([run("default", 1.0, 1.0)], tmp_path / "plain").read_text()
    assert "Predicted against measured" not in plain
