"""Soak: 10,000 small, time-scaled requests through the routers while faults come and go on the
engines (503s, broken streams, refused connections, garbage metrics). Every request must end in
exactly one complete answer or one clean error; the test counts both."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter

from .harness import THREE, RegionSpec, ask, start_fleet

N = int(os.environ.get("SOAK_N", "10000"))
CONCURRENCY = 48
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
                a = await ask(
                    bed.session,
                    urls[i % len(urls)],
                    content=f"soak {i}",
                    max_tokens=4,
                    stream=stream,
                    chat=i % 2 == 0,
                )
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
        finally:
            await bed.close()
        answered = (
            outcomes["complete"]
            + outcomes["BROKEN"]
            + sum(v for k, v in outcomes.items() if k.startswith("clean error"))
        )
        print(f"soak: {dict(outcomes)} in {elapsed:.1f} s")
        assert answered == N
        assert outcomes["BROKEN"] == 0
        assert outcomes["faults injected"] >= 10
        assert outcomes["complete"] >= 0.97 * N, outcomes

    asyncio.run(main())
