"""Soak: 10,000 small, time-scaled requests through the routers while faults come and go on the
engines (503s, broken streams, refused connections, garbage metrics), and some clients hang up
before their answer is done. Every request must end in exactly one complete answer, one clean error,
or a cancellation by its client; the test counts all three, and the routers must have counted the
cancellations they saw as `client_cancelled` and left no generation running for them."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter

from .harness import THREE, RegionSpec, ask, router_metric, start_fleet

N = int(os.environ.get("SOAK_N", "10000"))
CONCURRENCY = 48
CANCEL_EVERY = 40  # one request in 40 is abandoned by its client after a few milliseconds
FAULTS = (
    {"status_503": True},
    {"break_stream_after_tokens": 2},
    {"refuse_connections": 0.4},
    {"garbage_metrics": True},
)


def test_soak_every_request_gets_one_answer(tmp_path):
    # Small caches are not the point here; roomy engines keep 429s rare.
    specs = tuple(RegionSpec(**{**s.__dict__, "blocks": 1024}) for s in THREE)

    async def main():
        bed = await start_fleet(tmp_path, specs=specs, time_scale=200, router={"queue_wait_s": 2.0})
        urls = [r.url for r in bed.regions.values()]
        engines = [e for r in bed.regions.values() for e in r.engines]
        outcomes: Counter[str] = Counter()
        rng = random.Random(5)
        stop = asyncio.Event()

        async def chaos():
            # One engine at a time is sick; a new one every 150 ms.
            sick = None
            while not stop.is_set():
                if sick is not None:
                    await sick.set_faults({"clear": True})
                sick = rng.choice(engines)
                await sick.set_faults(dict(rng.choice(FAULTS)))
                outcomes["faults injected"] += 1
                await asyncio.sleep(0.15)
            if sick is not None:
                await sick.set_faults({"clear": True})

        async def client(worker: int):
            for i in range(worker, N, CONCURRENCY):
                stream = i % 3 != 0
                asking = ask(
                    bed.session,
                    urls[i % len(urls)],
                    content=f"soak {i}",
                    max_tokens=64 if i % CANCEL_EVERY == 0 else 4,
                    stream=stream,
                    chat=i % 2 == 0,
                )
                if i % CANCEL_EVERY == 0:
                    try:  # the client hangs up (its connection closes) after a few milliseconds
                        await asyncio.wait_for(asking, rng.uniform(0.002, 0.02))
                        outcomes["finished before its client left"] += 1
                    except TimeoutError:
                        outcomes["cancelled by client"] += 1
                    continue
                a = await asking
                if (
                    a.complete
                    and a.tokens == 4
                    and a.events_after_done == 0
                    and (not stream or len(a.ids) == 1)
                ):
                    outcomes["complete"] += 1
                elif a.clean_error and a.events_after_done == 0:
                    outcomes[f"clean error {a.status}"] += 1
                    outcomes[f"msg {a.error[:60]}"] += 1
                else:
                    outcomes["BROKEN"] += 1

        try:
            start = time.monotonic()
            chaos_task = asyncio.create_task(chaos())
            await asyncio.gather(*(client(w) for w in range(CONCURRENCY)))
            stop.set()
            await chaos_task
            elapsed = time.monotonic() - start
            await asyncio.sleep(0.5)  # the routers see the last hang-ups; the engines abort them
            counted = 0.0
            for url in urls:
                counted += await router_metric(
                    bed.session, url, "gpufleet_router_requests_total", outcome="client_cancelled"
                )
            still_running = sum(e.engine.stats().num_running + e.engine.stats().num_waiting for e in engines)
        finally:
            await bed.close()
        answered = (
            outcomes["complete"]
            + outcomes["BROKEN"]
            + sum(v for k, v in outcomes.items() if k.startswith("clean error"))
        )
        cancelled = outcomes["cancelled by client"] + outcomes["finished before its client left"]
        print(f"soak: {dict(outcomes)}, routers counted {counted:.0f} client cancellations, in {elapsed:.1f} s")
        assert answered + cancelled == N
        assert outcomes["BROKEN"] == 0
        assert outcomes["faults injected"] >= 10
        assert outcomes["complete"] >= 0.97 * (N - cancelled), outcomes
        # A hang-up the router saw is counted as such (one it did not see came after its answer).
        assert 0 < counted <= outcomes["cancelled by client"], (counted, outcomes)
        assert still_running == 0  # no engine still generates for a client that left

    asyncio.run(main())
