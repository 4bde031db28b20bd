"""Per-request outcomes and their summary, shared by the simulator, the HTTP bench and the demo.

Both drivers produce the same `RequestRecord`s, so one `summarize` computes SLO goodput, latency
percentiles and failures for either, and the simulator/HTTP agreement test compares like with like.
All times are MODEL time (seconds as the engines experience them): the HTTP drivers multiply
wall-clock measurements by the time scale before recording them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

# Outcomes a request can end with.
OK = "ok"  # a complete answer
REJECTED = "rejected"  # 429 / queue full: the fleet said no, cleanly
FAILED = "failed"  # connect error, 5xx, broken stream, timeout: the client lost the request


@dataclass
class RequestRecord:
    id: int
    arrival_s: float  # when the client sent it, model seconds from the start of the run
    prompt_tokens: int
    max_tokens: int
    client_region: str | None = None
    outcome: str = FAILED
    ttft_s: float | None = None
    tpot_s: float | None = None  # mean time per output token after the first
    e2e_s: float | None = None
    output_tokens: int = 0
    region: str | None = None  # region that served it (where the driver can tell)
    spilled: bool = False  # served outside the region it arrived at
    continued: bool = False  # a broken stream was continued on another engine
    error: str | None = None
    # the TTFT the router's policy predicted for the engine it chose (model seconds), where it said
    predicted_ttft_s: float | None = None
    # how long it had waited at the routers when it was sent to that engine (model seconds): the
    # prediction is made then, the client's TTFT counts from before
    sent_after_s: float | None = None

    def meets(self, ttft_slo_s: float, tpot_slo_s: float) -> bool:
        """Within SLO: answered completely, first token and every-token pace under the targets."""
        if self.outcome != OK or self.ttft_s is None or self.ttft_s > ttft_slo_s:
            return False
        return self.tpot_s is None or self.tpot_s <= tpot_slo_s

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    if ordered[hi] == ordered[lo] or math.isinf(ordered[hi]):
        return ordered[lo] if pos == lo else ordered[hi]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Summary:
    requests: int
    ok: int
    rejected: int
    failed: int
    within_slo: int
    duration_s: float
    slo_attainment: float  # within_slo / requests
    goodput_rps: float  # requests within SLO per model second
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p99_s: float | None
    spilled: int
    continued: int
    output_tokens: int
    prompt_tokens: int
    per_region: dict[str, int] = field(default_factory=dict)  # served requests per region

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    records: Iterable[RequestRecord], ttft_slo_s: float, tpot_slo_s: float, duration_s: float | None = None
) -> Summary:
    """Aggregate records. A request that never got its first token counts at infinite TTFT in the
    percentiles, so a run that loses requests cannot look fast."""
    recs = list(records)
    n = len(recs)
    if duration_s is None:
        duration_s = max((r.arrival_s for r in recs), default=0.0) or 1.0
    ttfts = [r.ttft_s if (r.outcome == OK and r.ttft_s is not None) else math.inf for r in recs]
    tpots = [r.tpot_s for r in recs if r.outcome == OK and r.tpot_s is not None]
    within = sum(1 for r in recs if r.meets(ttft_slo_s, tpot_slo_s))
    per_region: dict[str, int] = {}
    for r in recs:
        if r.outcome == OK and r.region:
            per_region[r.region] = per_region.get(r.region, 0) + 1
    return Summary(
        requests=n,
        ok=sum(1 for r in recs if r.outcome == OK),
        rejected=sum(1 for r in recs if r.outcome == REJECTED),
        failed=sum(1 for r in recs if r.outcome == FAILED),
        within_slo=within,
        duration_s=duration_s,
        slo_attainment=within / n if n else 0.0,
        goodput_rps=within / duration_s if duration_s > 0 else 0.0,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p90_s=percentile(ttfts, 90),
        ttft_p99_s=percentile(ttfts, 99),
        tpot_p50_s=percentile(tpots, 50),
        tpot_p99_s=percentile(tpots, 99),
        spilled=sum(1 for r in recs if r.spilled),
        continued=sum(1 for r in recs if r.continued),
        output_tokens=sum(r.output_tokens for r in recs if r.outcome == OK),
        prompt_tokens=sum(r.prompt_tokens for r in recs if r.outcome == OK),
        per_region=dict(sorted(per_region.items())),
    )
