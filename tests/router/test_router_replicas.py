"""Two router replicas in front of the same engines share their reservations (replicas.py), so the
second does not book room the first has already promised."""

from __future__ import annotations

import asyncio

import aiohttp
from gpufleet.serving.router.config import build_config
from gpufleet.serving.router.gateway import Router
from gpufleet.serving.router.replicas import ReplicaReader
from gpufleet.stacks.fleetfile import load_fleet

from .harness import TOKEN, RegionSpec, ask, start_fleet

ONE = (RegionSpec("aws", "us-east-1", "H100-80GB", engines=2, blocks=96),)  # 2 x 1,536 tokens
AWS = "aws-us-east-1"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _second_replica(bed, share: bool) -> tuple[Router, str]:
    """Another router for the same region and engines; with `share`, each polls the other."""
    first = bed[AWS].router
    second = Router(
        build_config(load_fleet(bed.fleet_path), AWS, {"GPUFLEET_ADMIN_TOKEN": TOKEN}),
        replicas=[bed[AWS].url] if share else (),
    )
    url = f"http://127.0.0.1:{await second.start()}"
    if share:
        first._tasks.append(asyncio.create_task(ReplicaReader(first, [url]).run()))
    return second, url


async def _fill_then_ask_the_other(tmp_path, share: bool) -> tuple[int, list[int]]:
    """Six long streams through replica 1 (3 x ~405 tokens fill each engine), then six through
    replica 2 once they stream. Returns (engine preemptions, replica 2's statuses)."""
    bed = await start_fleet(tmp_path, ONE, time_scale=2, router={"queue_wait_s": 0.5})
    second, url = await _second_replica(bed, share)
    try:
        first = [asyncio.create_task(ask(bed.session, bed[AWS].url, max_tokens=400)) for _ in range(6)]
        while sum(e.engine.stats().num_running for e in bed[AWS].engines) < 6:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # a few scrapes and replica polls
        later = await asyncio.gather(*(ask(bed.session, url, max_tokens=400) for _ in range(6)))
        assert all(a.complete for a in await asyncio.gather(*first))
        preempted = sum(e.engine.stats().num_preemptions for e in bed[AWS].engines)
        return preempted, [a.status for a in later]
    finally:
        await second.close()
        await bed.close()


def test_replicas_share_reservations_and_do_not_double_book(tmp_path):
    preempted, statuses = run(_fill_then_ask_the_other(tmp_path, share=True))
    # Replica 2 sees replica 1's bookings: no room, so it waits and answers 429, and nothing is preempted.
    assert preempted == 0
    assert statuses.count(429) >= 4, statuses


def test_without_sharing_the_second_replica_double_books(tmp_path):
    # The same load with ledgers that do not know each other: the mechanism is what prevents it.
    preempted, statuses = run(_fill_then_ask_the_other(tmp_path, share=False))
    assert statuses.count(200) >= 3, statuses
    assert preempted > 0


def test_a_replica_publishes_its_own_reservations_only(tmp_path):
    async def main():
        bed = await start_fleet(tmp_path, ONE, time_scale=2)
        second, url = await _second_replica(bed, share=True)
        first = bed[AWS].router
        engine = bed[AWS].engines[0].url
        try:
            key = object()
            first.ledger.routed(engine, key, 1000.0, first.clock())
            first.outstanding[engine] = 1
            await asyncio.sleep(0.5)
            view = {v.id: v for v in second.engine_views(second.clock())}[engine]
            assert view.pending_tokens == 1000.0 and view.outstanding == 1
            # Replica 1 reads replica 2, which publishes only its own (none): no echo back.
            assert first.shared_pending.get(engine, 0.0) == 0.0
            async with bed.session.get(url + "/router/v1/summary", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                summary = await r.json()
            assert summary["reservations"] == {} and summary["replica"] == second.replica_id
            first.ledger.done(key)
            first.outstanding.pop(engine)
            await asyncio.sleep(0.5)
            view = {v.id: v for v in second.engine_views(second.clock())}[engine]
            assert view.pending_tokens == 0.0 and view.outstanding == 0
        finally:
            await second.close()
            await bed.close()

    run(main())


def test_a_replica_listed_among_its_siblings_skips_itself(tmp_path):
    async def main():
        bed = await start_fleet(tmp_path, ONE, time_scale=2)
        first = bed[AWS].router
        engine = bed[AWS].engines[0].url
        try:
            reader = ReplicaReader(first, [bed[AWS].url])  # a DNS name lists every replica, itself too
            first.ledger.routed(engine, object(), 1000.0, first.clock())
            first.outstanding[engine] = 1
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
                await reader._read(session, bed[AWS].url)
            reader.merge(first.clock())
            assert reader.seen == {} and first.shared_pending == {}
        finally:
            await bed.close()

    run(main())


def test_serve_refuses_bad_loop_and_replica_flags_with_exit_2():
    from gpufleet.cli.app import app
    from typer.testing import CliRunner

    for args, says in (
        (["--loop", "bad"], "--loop must be uvloop, asyncio or auto"),
        (["--replica", "foo"], "--replica must be an http:// or https:// URL"),
        (["--replicas-dns", "foo"], "--replicas-dns must be HOST:PORT"),
    ):
        res = CliRunner().invoke(app, ["router", "serve", "--region", "x", *args])
        assert res.exit_code == 2, res.output
        assert says in res.output and "Traceback" not in res.output
