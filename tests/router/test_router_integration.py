"""Three emulated regions on loopback (H100, L4, A100; different sizes), each with its engines (the real
engine emulator) and its own router. What the issue asks the router to show, end to end."""

from __future__ import annotations

import asyncio
import time

import pytest

from .harness import MODEL, TOKEN, FleetBed, RegionSpec, ask, router_metric, start_fleet

AWS, GCP, AZURE = "aws-us-east-1", "gcp-us-central1", "azure-eastus"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


def engine_requests(bed: FleetBed, region: str) -> int:
    """Requests an engine has seen (finished, running or waiting), summed over the region."""
    total = 0
    for e in bed[region].engines:
        st = e.engine.stats()
        total += st.num_finished + st.num_running + st.num_waiting
    return total


async def settle(bed: FleetBed, intervals: float = 3) -> None:
    await asyncio.sleep(intervals * bed.router_settings["scrape_interval_s"])


def test_spill_goes_where_the_headroom_is_within_slo(tmp_path):
    async def main():
        # A low time scale: the TTFT we measure in wall time includes this one process's CPU time
        # (routers, emulators and client share it), which the scale would magnify.
        # The headroom policy's placement (tiers, then room) is what this test pins; the default
        # (predictive) policy chooses by predicted time and is tested in test_router_predict.py.
        bed = await start_fleet(tmp_path, time_scale=4, router={"policy": "headroom"})
        try:
            # ~420 tokens each: AWS (2 x 1536) fits 6, so 24 at once fit only by spilling. Azure is
            # on-demand with 3 x 4096 tokens; GCP is spot: spills go to Azure, not GCP.
            answers = await asyncio.gather(
                *(ask(bed.session, bed[AWS].url, max_tokens=400) for _ in range(24))
            )
            assert all(a.complete and a.tokens == 400 for a in answers), [
                a.error for a in answers if not a.complete
            ]
            by_region = {k: sum(a.region == k for a in answers) for k in (AWS, GCP, AZURE)}
            assert 4 <= by_region[AWS] <= 6, by_region
            assert by_region[AZURE] == 24 - by_region[AWS] and by_region[GCP] == 0, by_region
            assert (
                await router_metric(bed.session, bed[AWS].url, "gpufleet_router_spills_total")
                == by_region[AZURE]
            )
            # Routing by headroom kept every engine out of KV exhaustion: no preemption anywhere.
            assert sum(e.engine.stats().num_preemptions for r in bed.regions.values() for e in r.engines) == 0
            # TTFT in engine time (the emulator runs time_scale x faster than the wall clock).
            ttfts = sorted(a.ttft_s * bed.time_scale * 1000 for a in answers)
            assert ttfts[-1] <= 2000, ttfts  # the fleet's SLO: ttft_ms 2000
        finally:
            await bed.close()

    run(main())


def test_region_killed_mid_run(tmp_path):
    async def main():
        bed = await start_fleet(tmp_path, time_scale=2)
        url = bed[AWS].url
        interval = bed.router_settings["scrape_interval_s"]
        try:
            streams = [
                asyncio.create_task(ask(bed.session, url, max_tokens=300, content=f"s{i}")) for i in range(6)
            ]
            # Wait until every stream runs on an AWS engine.
            until = time.monotonic() + 10
            while sum(e.engine.stats().num_running for e in bed[AWS].engines) < 6:
                assert time.monotonic() < until, "streams did not start"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # tokens are flowing
            later = [
                asyncio.create_task(ask(bed.session, url, max_tokens=20, content=f"n{i}")) for i in range(4)
            ]
            for e in bed[AWS].engines:  # the whole region goes away, open connections dropped
                await e.set_faults({"refuse_connections": True})
            killed = time.monotonic()
            more = []
            for i in range(12):
                more.append(asyncio.create_task(ask(bed.session, url, max_tokens=20, content=f"m{i}")))
                await asyncio.sleep(interval / 3)
                if abs(time.monotonic() - killed - 2 * interval) < interval / 3:
                    retries_at_2 = await router_metric(bed.session, url, "gpufleet_router_retries_total")
            done = await asyncio.gather(*streams, *later, *more)
            assert all(a.complete for a in done), [a.error for a in done if not a.complete]
            # In-flight streams: continued elsewhere, one stream each, the full length.
            for a in done[:6]:
                assert a.tokens == 300 and len(a.ids) == 1 and a.events_after_done == 0
            assert (
                await router_metric(bed.session, url, "gpufleet_router_continuations_total", outcome="ok")
                >= 6
            )
            # After two scrape intervals nothing is tried on the dead region any more.
            assert await router_metric(bed.session, url, "gpufleet_router_retries_total") == retries_at_2
            assert all(a.region in (GCP, AZURE) for a in done[10:])
        finally:
            await bed.close()

    run(main())


def test_drain_through_the_cli(tmp_path, monkeypatch):
    from gpufleet.cli.app import app
    from typer.testing import CliRunner

    monkeypatch.setenv("GPUFLEET_ADMIN_TOKEN", TOKEN)
    cli = CliRunner()

    async def main():
        # headroom keeps these three on GCP's own engines (it has room); the predictive default may
        # place them on a peer predicted faster, and this test is about draining GCP's in-flight work.
        bed = await start_fleet(tmp_path, time_scale=2, router={"policy": "headroom"})
        try:
            inflight = [asyncio.create_task(ask(bed.session, bed[GCP].url, max_tokens=150)) for _ in range(3)]
            while sum(e.engine.stats().num_running for e in bed[GCP].engines) < 3:
                await asyncio.sleep(0.02)
            res = await asyncio.to_thread(
                cli.invoke, app, ["failover", "drain", GCP, "--fleet", str(bed.fleet_path)]
            )
            assert res.exit_code == 0, res.output
            assert res.output.count(": ok") == 3
            seen = engine_requests(bed, GCP)
            new = await asyncio.gather(
                *(
                    ask(bed.session, bed[k].url, max_tokens=10, content=f"{k}{i}")
                    for k in (GCP, AWS)
                    for i in range(8)
                )
            )
            assert all(a.complete and a.region != GCP for a in new)
            assert engine_requests(bed, GCP) == seen  # no new request reached the drained region
            old = await asyncio.gather(*inflight)
            assert all(a.complete and a.region == GCP and a.tokens == 150 for a in old)
            status = await asyncio.to_thread(
                cli.invoke, app, ["status", "--fleet", str(bed.fleet_path), "--json"]
            )
            assert status.exit_code == 0, status.output
            assert GCP in status.output and '"drained_regions"' in status.output
            res = await asyncio.to_thread(
                cli.invoke, app, ["failover", "restore", GCP, "--fleet", str(bed.fleet_path)]
            )
            assert res.exit_code == 0, res.output
            back = await ask(bed.session, bed[GCP].url, max_tokens=5)
            assert back.complete and back.region == GCP
        finally:
            await bed.close()

    run(main())


def test_garbage_and_stale_metrics_neither_crash_nor_attract(tmp_path):
    async def main():
        bed = await start_fleet(tmp_path, time_scale=20)
        aws = bed[AWS]
        try:
            sick, well = aws.engines
            await sick.set_faults({"garbage_metrics": True})
            await settle(bed)
            before = sick.engine.stats().num_finished
            answers = await asyncio.gather(*(ask(bed.session, aws.url, max_tokens=8) for _ in range(10)))
            assert all(a.complete and a.region == AWS for a in answers)
            assert sick.engine.stats().num_finished == before
            async with bed.session.get(aws.url + "/admin/v1/state", headers=ADMIN) as r:
                rows = {e["engine"]: e for e in (await r.json())["engines"]}
            assert rows[sick.url]["healthy"] is False and "MetricsError" in rows[sick.url]["error"]
            async with bed.session.get(aws.url + "/metrics") as r:
                assert r.status == 200 and "gpufleet_router_engine_up" in await r.text()
            # Stale: the router's scraper stalls; once its data is older than stale_after_s the
            # region counts as full and traffic goes to the peers.
            await sick.set_faults({"clear": True})
            aws.router._tasks[0].cancel()  # the scrape loop
            await asyncio.sleep(bed.router_settings["stale_after_s"] + 0.1)
            seen = engine_requests(bed, AWS)
            answers = await asyncio.gather(*(ask(bed.session, aws.url, max_tokens=8) for _ in range(6)))
            assert all(a.complete and a.region in (GCP, AZURE) for a in answers)
            assert engine_requests(bed, AWS) == seen
        finally:
            await bed.close()

    run(main())


def test_broken_streams_continue_as_one_stream(tmp_path):
    async def main():
        bed = await start_fleet(tmp_path, time_scale=20)
        aws = bed[AWS]
        try:
            await aws.engines[0].set_faults({"break_stream_after_tokens": 5})
            answers = await asyncio.gather(
                *(
                    ask(bed.session, aws.url, max_tokens=40, chat=i % 2 == 0, content=f"q{i}")
                    for i in range(8)
                )
            )
            assert all(a.complete and a.tokens == 40 and len(a.ids) == 1 for a in answers)
            assert (
                await router_metric(bed.session, aws.url, "gpufleet_router_continuations_total", outcome="ok")
                >= 1
            )
            # Every engine of the fleet breaks streams: the client gets an error event, then [DONE].
            for r in bed.regions.values():
                for e in r.engines:
                    await e.set_faults({"break_stream_after_tokens": 3})
            a = await ask(bed.session, aws.url, max_tokens=50)
            assert a.status == 200 and a.error and a.done and a.events_after_done == 0 and not a.complete
        finally:
            await bed.close()

    run(main())


def test_failover_before_first_byte_and_bad_input(tmp_path):
    async def main():
        bed = await start_fleet(tmp_path, time_scale=20, router={"max_body_bytes": 65536})
        aws = bed[AWS]
        s = bed.session
        try:
            await aws.engines[0].set_faults({"status_503": True})  # its /metrics answers 503 too
            await aws.engines[1].set_faults({"hang": True})
            answers = await asyncio.gather(
                *(ask(bed.session, aws.url, max_tokens=4, stream=i % 2 == 0) for i in range(6))
            )
            assert all(a.complete and a.region in (GCP, AZURE) for a in answers)

            async def status_and_error(method, path, **kw):
                async with s.request(method, aws.url + path, **kw) as r:
                    body = await r.json(content_type=None)
                    return r.status, body["error"]["type"], r.headers

            assert (await status_and_error("POST", "/v1/chat/completions", data=b"{nope"))[0] == 400
            assert (await status_and_error("POST", "/v1/completions", json=[1, 2]))[0] == 400
            big = {"model": MODEL, "prompt": "x" * 70000}
            assert (await status_and_error("POST", "/v1/completions", json=big))[0] == 413
            code, kind, _ = await status_and_error(
                "POST", "/v1/completions", json={"model": "gpt-9", "prompt": "hi"}
            )
            assert (code, kind) == (404, "NotFoundError")
            code, kind, headers = await status_and_error("GET", "/admin/v1/state")
            assert (code, kind, headers["WWW-Authenticate"]) == (401, "authentication_error", "Bearer")
            wrong = {"Authorization": "Bearer " + "x" * len(TOKEN)}
            assert (await status_and_error("POST", "/admin/v1/drain", json={"region": GCP}, headers=wrong))[
                0
            ] == 401
            assert (await status_and_error("GET", "/router/v1/summary"))[0] == 401
            async with s.get(aws.url + "/v1/models") as r:
                assert (await r.json())["data"][0]["id"] == MODEL
            async with s.get(aws.url + "/health") as r:
                assert r.status == 200
        finally:
            await bed.close()

    run(main())


def test_queue_then_429_with_retry_after(tmp_path):
    async def main():
        bed = await start_fleet(tmp_path, time_scale=20, router={"queue_wait_s": 0.3})
        url = bed[AWS].url
        try:
            for key in (AWS, GCP, AZURE):  # no room anywhere
                async with bed.session.post(
                    url + "/admin/v1/drain", json={"region": key}, headers=ADMIN
                ) as r:
                    assert r.status == 200
            start = time.monotonic()
            async with bed.session.post(
                url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5}
            ) as r:
                assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
                assert (await r.json())["error"]["type"] == "rate_limit_error"
            assert time.monotonic() - start >= 0.3  # it waited in the queue first
            # Room comes back while a request waits: it is served, not refused.
            waiting = asyncio.create_task(ask(bed.session, url, max_tokens=4))
            await asyncio.sleep(0.1)
            async with bed.session.post(url + "/admin/v1/restore", json={"region": AWS}, headers=ADMIN) as r:
                assert r.status == 200
            assert (await waiting).complete
            too_long = await ask(bed.session, url, max_tokens=5000)
            assert too_long.status == 400
        finally:
            await bed.close()

    run(main())


@pytest.mark.parametrize("missing", ["env", "short"])
def test_router_serve_refuses_to_start_without_a_token(tmp_path, monkeypatch, missing):
    from gpufleet.cli.app import app
    from typer.testing import CliRunner

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "fleet: tok\nmodels: [{name: m, catalog: llama-3.1-8b}]\n"
        "regions: [{cloud: aws, region: us-east-1, gpu: H100-80GB, nodes: {max: 1},"
        " endpoints: {engines: ['http://127.0.0.1:9']}}]\n"
    )
    monkeypatch.delenv("GPUFLEET_ADMIN_TOKEN", raising=False)
    if missing == "short":
        monkeypatch.setenv("GPUFLEET_ADMIN_TOKEN", "abc")
    res = CliRunner().invoke(app, ["router", "serve", "--fleet", str(fleet), "--region", "aws-us-east-1"])
    assert res.exit_code == 3, res.output
    assert "admin token" in res.output


def test_a_queued_request_waits_for_its_first_token_until_its_deadline(tmp_path):
    """The idle timeout is for silence mid-stream. A request waiting in an engine's queue for its first
    token is not broken: it may wait until its deadline (request_timeout_s), however short
    idle_timeout_s is."""

    async def main():
        one = (RegionSpec("aws", "us-east-1", "H100-80GB", engines=1, blocks=512, max_num_seqs=1),)
        bed = await start_fleet(tmp_path, one, time_scale=2.0, router={"idle_timeout_s": 0.4})
        try:
            url = bed[AWS].url
            # The engine runs one sequence at a time: the second request waits for the first to finish.
            first = asyncio.create_task(ask(bed.session, url, max_tokens=300))
            await asyncio.sleep(0.05)
            second = await ask(bed.session, url, max_tokens=8)
            first = await first
            assert first.complete and first.tokens == 300
            assert second.complete, second.error
            assert second.tokens == 8
            # It really waited longer than the idle timeout for its first token, and was never retried.
            assert second.ttft_s is not None and second.ttft_s > 0.4 * 2
            assert await router_metric(bed.session, url, "gpufleet_router_retries_total") == 0
        finally:
            await bed.close()

    run(main())


FORWARDING = (
    # Too small for the request: the origin forwards it.
    RegionSpec("aws", "us-east-1", "H100-80GB", engines=1, blocks=2),
    # The preferred peer (on-demand, most room): where the tests break its streams.
    RegionSpec("gcp", "us-central1", "H100-80GB", engines=1, blocks=512, instance_type="a3-highgpu-1g"),
    # The last resort (spot): where the origin continues.
    RegionSpec(
        "azure", "eastus", "A100-80GB", engines=1, blocks=256, tier="spot", instance_type="Standard_NC24ads_A100_v4",
    ),  # fmt: skip
)


async def _broken_at_the_peer(tmp_path, break_after: int, content: str, **fleet) -> tuple:
    """One request into FORWARDING's origin, forwarded to gcp, whose engine breaks every stream after
    `break_after` tokens: (the client's answer, requests gcp's and azure's engines got, continuations
    the origin completed)."""
    bed = await start_fleet(tmp_path, FORWARDING, **fleet)
    try:
        await bed[GCP].engines[0].set_faults({"break_stream_after_tokens": break_after})
        await settle(bed)
        a = await ask(bed.session, bed[AWS].url, max_tokens=40, content=content)
        ok = await router_metric(bed.session, bed[AWS].url, "gpufleet_router_continuations_total", outcome="ok")
        return a, engine_requests(bed, GCP), engine_requests(bed, AZURE), ok
    finally:
        await bed.close()


def test_a_forwarded_stream_broken_in_the_peer_region_is_continued_by_the_origin(tmp_path):
    """A peer that received a forwarded request may not hop again; when its engine breaks the stream
    and it has no other engine, the ORIGIN router (which owns the client's stream) continues it in a
    third region, and the client still sees one complete stream."""
    a, gcp, azure, continued = run(_broken_at_the_peer(tmp_path, 5, "forwarded then broken", time_scale=20))
    assert a.complete, a.error
    assert a.tokens == 40 and len(a.ids) == 1
    assert gcp >= 1 and azure >= 1 and continued >= 1


async def _fill_azure_behind_the_origins_back(bed: FleetBed) -> asyncio.Task:
    """Fill azure (FORWARDING's last resort) just after the origin read its summary, so that the origin
    still sees room there for ~2 s (rounds of 2 s): a request of ~4,000 of azure's 4,080 tokens for
    ~2 s, after which a ~400-token request would outgrow what is left. Returns the filler's task
    once azure's engine has it."""
    origin = bed[AWS].router
    read_at = origin.peer_summaries[AZURE][0]
    while origin.peer_summaries[AZURE][0] == read_at:
        await asyncio.sleep(0.005)
    # Every router's rounds start together: azure scrapes its engine about now too. Away from that,
    # so azure's view of the filler is its router's own account, not a scrape taken halfway through
    # its prefill.
    await asyncio.sleep(0.5)
    filler = asyncio.create_task(ask(bed.session, bed[AZURE].url, content="gpu " * 3570, max_tokens=400))
    while engine_requests(bed, AZURE) == 0:
        await asyncio.sleep(0.002)
    return filler


def test_a_continuation_refused_by_a_full_peer_is_asked_again_once_room_comes(tmp_path):
    """The only region left to continue a stream answers 429: full for a moment, not broken. The
    origin asks it again after the next round instead of dropping it for good and breaking the
    client's stream (what `gpufleet demo` showed through its region failure). It waits for room up
    to idle_timeout_s from the break, not queue_wait_s: a new request's wait ends in a clean 429,
    a broken stream's in a lost request."""

    async def main():
        # Slow rounds: the origin's view of azure stays as it was (room) while azure fills up. A low
        # time scale: the filler's prefill and first tokens (after which azure's router counts only
        # what it has yet to grow, against a sample taken before it) take ~0.2 s, several times the
        # continuation's way to azure.
        # No wait for a new request (queue_wait_s 0): the continuation's wait is idle_timeout_s's.
        slow = {"scrape_interval_s": 2.0, "stale_after_s": 6.0, "queue_wait_s": 0.0, "idle_timeout_s": 6.0}
        bed = await start_fleet(tmp_path, FORWARDING, time_scale=2, router=slow)
        try:
            await bed.wait_ready()
            await bed[GCP].engines[0].set_faults({"break_stream_after_tokens": 5})
            filler = await _fill_azure_behind_the_origins_back(bed)
            a = await ask(bed.session, bed[AWS].url, max_tokens=400, content="continued where room comes")
            assert (await filler).complete
            assert a.complete, a.error
            assert a.tokens == 400 and len(a.ids) == 1
            # azure did refuse it while full, and then served it
            assert await router_metric(bed.session, bed[AZURE].url, "gpufleet_router_rejected_total") >= 1
            assert engine_requests(bed, AZURE) == 2
            ok = await router_metric(bed.session, bed[AWS].url, "gpufleet_router_continuations_total", outcome="ok")
            assert ok == 1
        finally:
            await bed.close()

    run(main())


def test_a_request_refused_by_a_full_peer_waits_for_room_instead_of_a_429(tmp_path):
    """A new request forwarded to a peer whose summary said room, and which filled up meanwhile, gets
    that peer's 429 (full, not broken). With no other candidate the origin waits for room as its
    admission would have (queue_wait_s from the arrival), asks the peer again after its next round,
    and the request is served, where it used to end with a 429 at once."""

    async def main():
        # As in the continuation test above: slow rounds, so that the origin's view of azure stays as
        # it was (room) while azure fills up; a TTFT target the wait cannot spend.
        slow = {"scrape_interval_s": 2.0, "stale_after_s": 6.0, "queue_wait_s": 6.0}
        bed = await start_fleet(tmp_path, FORWARDING, time_scale=2, router=slow, slo_ttft_ms=30_000)
        try:
            await bed.wait_ready()
            async with bed.session.post(bed[AWS].url + "/admin/v1/drain", json={"region": GCP}, headers=ADMIN) as r:
                assert r.status == 200  # azure is the only region with room for it
            filler = await _fill_azure_behind_the_origins_back(bed)
            a = await ask(bed.session, bed[AWS].url, max_tokens=400, content="served once room comes")
            assert (await filler).complete
            assert a.status == 200 and a.complete, (a.status, a.error)
            assert a.tokens == 400
            # azure did refuse it while full, then served it; the origin refused nothing
            assert await router_metric(bed.session, bed[AZURE].url, "gpufleet_router_rejected_total") >= 1
            assert await router_metric(bed.session, bed[AWS].url, "gpufleet_router_rejected_total") == 0
            assert engine_requests(bed, AZURE) == 2
        finally:
            await bed.close()

    run(main())


def test_a_stream_continued_at_a_peer_is_not_refused_for_its_age(tmp_path):
    """A continuation forwarded to a peer is the fleet's to finish, late or not: its engine failed,
    not its client. Its age is not counted against its TTFT (the waited header says 0); counted, the
    peer took it for a request that can no longer meet its TTFT SLO, refused it, and the stream broke."""
    # TTFT SLO 150 ms; in real time the stream's first 20 tokens take longer than that
    a, _, azure, continued = run(
        _broken_at_the_peer(tmp_path, 20, "continued past its TTFT target", time_scale=1, slo_ttft_ms=150)
    )
    assert a.complete, a.error
    assert a.tokens == 40 and len(a.ids) == 1
    assert azure >= 1 and continued >= 1
