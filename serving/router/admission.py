"""Admission: candidates now, or a short wait in the bounded queue, or an answer that says why not.

When the policy finds no candidate the answer depends on whether waiting can help:
- 400 when nothing could ever serve the request: its demand (prompt estimate + max_tokens) is past
  the KV capacity of every engine that may take it (all of them known), or no region serves its
  model with its residency;
- 503 (at once, no queueing) when no engine that may take it is up;
- otherwise it waits up to `queue_wait_s` for room (`queue_max` at most wait), then 429 +
  Retry-After. A request forwarded by a peer does not wait for room: the origin has other
  candidates. When room comes the policy is asked with the time the request has waited, and its
  late binding applies as to any other request (held, or refused once its TTFT slack is spent),
  as in the simulator.

When the policy holds a request (late binding, `Candidate.hold_s`: no engine can start its prefill
in its next step), it waits here, a forwarded one too (this router sees its own engines' prefills
complete; the origin would not), in line: when a prefill or an answer completes here the oldest
held requests are asked about again (`Router.wake_held`), and all of them at every scrape round.
Once its TTFT slack is spent, or with the queue full, it is refused: 429 + Retry-After.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from gpufleet.serving.router.config import RegionInfo
from gpufleet.serving.router.errors import HttpError
from gpufleet.serving.router.parsing import Job
from gpufleet.serving.router.policy import Candidate, RoutedRequest

if TYPE_CHECKING:
    from gpufleet.serving.router.gateway import Router


def retry_after(router: Router) -> dict[str, str]:
    s = router.config.settings
    return {"Retry-After": str(max(1, math.ceil(s.queue_wait_s or s.scrape_interval_s)))}


def _eligible(router: Router, routed: RoutedRequest) -> Iterator[RegionInfo]:
    """The regions this request may be served in: its residency and model, and peers only when it
    may be forwarded (and the peer has a router to forward to)."""
    for key, info in router.config.regions.items():
        if routed.residency is not None and info.residency != routed.residency:
            continue
        if routed.model is not None and routed.model not in info.models:
            continue
        if key != router.region and (not routed.allow_remote or not info.router_url):
            continue
        yield info


def unservable(router: Router, routed: RoutedRequest) -> str | None:
    """Why nothing will ever serve this request, or None (also when that is not known: an engine not
    reported yet, a peer without a summary, a region at zero engines that may grow)."""
    regions = list(_eligible(router, routed))
    if not regions:
        return f"no region of this fleet serves model {routed.model!r} with residency {routed.residency!r}"
    largest = 0.0
    for info in regions:
        if info.key == router.region:
            states = list(router.scraper.engines.values())
            if not states or any(st.sample is None for st in states):
                return None
            largest = max(largest, *(float(st.sample.capacity_tokens) for st in states if st.sample))
        else:
            summary = router.peer_summaries.get(info.key)
            cap = summary[1].get("largest_capacity_tokens") if summary is not None else None
            if not isinstance(cap, int | float) or cap <= 0:
                return None
            largest = max(largest, float(cap))
    if routed.need_tokens > largest:
        return (
            f"the request needs about {routed.need_tokens} tokens of KV cache (its prompt, estimated, plus "
            f"max_tokens), more than any engine that may serve it holds (at most {int(largest)})"
        )
    return None


def anything_up(router: Router, routed: RoutedRequest) -> bool:
    """Is any engine that may take this request up (its last scrape answered; drained or breaker-open
    engines count: waiting can bring them back)?"""
    for info in _eligible(router, routed):
        if info.key == router.region:
            if any(st.healthy for st in router.scraper.engines.values()):
                return True
        else:
            summary = router.peer_summaries.get(info.key)
            if summary is not None and summary[1].get("healthy_engines", 0):
                return True
    return False


def _nothing_up() -> HttpError:
    return HttpError(
        503,
        "no engine that may serve this request is up (local engines down, no peer region answering)",
        "service_unavailable",
    )


async def admit(router: Router, job: Job) -> list[Candidate]:
    """Candidates now, or after a short wait in the bounded queue, or HttpError (400, 503, 429)."""
    cands = router.choose(job.routed)
    if cands:
        return cands if cands[0].hold_s is None else await hold(router, job, job.routed, cands[0].hold_s)
    why = unservable(router, job.routed)
    if why:
        raise HttpError(400, why)
    return await wait_for_room(router, job, job.routed)


async def wait_for_room(router: Router, job: Job, routed: RoutedRequest) -> list[Candidate]:
    """Nothing has room for `routed` (the job's request, less the targets that failed it): wait in
    the bounded queue until the policy finds a candidate, until `job.room_until` (`queue_wait_s`
    after it arrived, whether nothing had room at once or a full peer refused it later; a forwarded
    request does not wait: its origin has other candidates), or HttpError (503 with nothing up, 429)."""
    if not anything_up(router, routed):
        raise _nothing_up()
    s = router.config.settings
    if router.clock() >= job.room_until or router.queued >= s.queue_max:
        refused(router, job)
        raise HttpError(429, "no engine has room for this request now; retry later", headers=retry_after(router))
    router.queued += 1
    router.queued_tokens += job.routed.need_tokens
    cands = []
    try:
        while (left := job.room_until - router.clock()) > 0:
            try:
                await asyncio.wait_for(router.room_event().wait(), left)
            except TimeoutError:
                pass
            # asked as the simulator asks: with the time it has waited, so that the policy's late
            # binding holds it (or refuses it, its TTFT slack spent) rather than sending it late
            cands = router.choose(replace(routed, waited_s=waited_s(job, s.time_scale)))
            if cands:
                break
    finally:
        router.queued -= 1
        router.queued_tokens -= job.routed.need_tokens
    if cands:
        return cands if cands[0].hold_s is None else await hold(router, job, routed, cands[0].hold_s)
    if not anything_up(router, routed):
        raise _nothing_up()
    refused(router, job)
    raise HttpError(429, "no engine has room for this request now; retry later", headers=retry_after(router))


def waited_s(job: Job, time_scale: float, at: float | None = None) -> float:
    """Engine seconds the request has waited since it reached the fleet, now or `at` (perf_counter):
    this router's wait, in wall seconds x the time scale, plus its origin router's (WAITED_HEADER)."""
    return job.routed.waited_s + ((time.perf_counter() if at is None else at) - job.received) * time_scale


async def hold(router: Router, job: Job, routed: RoutedRequest, hold_s: float) -> list[Candidate]:
    """Late binding: wait (at most `hold_s` engine seconds, the request's TTFT slack) until the policy
    would send `routed` (the job's request, with any exclusions of failed attempts); 429 after."""
    s = router.config.settings
    if hold_s > 0 and router.queued < s.queue_max:
        router.queued += 1
        router.queued_tokens += job.routed.need_tokens
        try:
            until = min(job.deadline, router.clock() + hold_s / s.time_scale)
            order = router.held_order()  # its place in line, kept while it waits
            while (left := until - router.clock()) > 0:
                try:
                    await asyncio.wait_for(router.held_waiter(order), left)
                except TimeoutError:
                    pass
                cands = router.choose(replace(routed, waited_s=waited_s(job, s.time_scale)))
                if cands:
                    again = cands[0].hold_s
                    if again is None:
                        router.metrics.held.labels("sent").inc()
                        router.wake_held(1)  # its look passes to the next in line
                        return cands
                    if again <= 0:
                        break
        finally:
            router.queued -= 1
            router.queued_tokens -= job.routed.need_tokens
    router.metrics.held.labels("refused").inc()
    refused(router, job)
    raise HttpError(
        429,
        "the fleet is busy: no engine could start this request in time to meet its time-to-first-token "
        "target; retry later",
        headers=retry_after(router),
    )


def refused(router: Router, job: Job) -> None:
    """A 429: no room. Unless the region is drained, it is demand for more engines (/scale)."""
    router.metrics.rejected.inc()
    if router.region not in router.drained_regions:
        router.unmet.refused(job.routed.need_tokens, router.clock())
