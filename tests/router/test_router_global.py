"""Global reach: one router over every region's engines (the baselines' best case, which the demo
and `gpufleet bench` compare the default against), over real sockets with emulated engines."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from gpufleet.serving.router.config import ConfigError, build_config
from gpufleet.serving.router.gateway import Router
from gpufleet.stacks.fleetfile import load_fleet

from tests.router.harness import TOKEN, ask, start_fleet

ENV = {"GPUFLEET_ADMIN_TOKEN": TOKEN}


def _with_engines(fleet, urls_by_region):
    regions = []
    for r in fleet.regions:
        update = {"engines": urls_by_region.get(r.key, [])}
        regions.append(r.model_copy(update={"endpoints": r.endpoints.model_copy(update=update)}))
    return fleet.model_copy(update={"regions": regions})


def test_global_config_lists_every_engine_with_its_region(example_fleet):
    urls = {"aws-us-west-2": ["http://10.0.0.1:8000"], "gcp-us-central1": ["http://10.0.1.1:8000",
            "http://10.0.1.2:8000"]}  # fmt: skip
    fleet = _with_engines(example_fleet, urls)
    regional = build_config(fleet, "aws-us-west-2", ENV)
    assert regional.region.engines == ("http://10.0.0.1:8000",) and not regional.engine_regions
    cfg = build_config(fleet, "aws-us-west-2", ENV, reach="global")
    assert set(cfg.region.engines) == {u for us in urls.values() for u in us}
    assert cfg.engine_regions == {u: k for k, us in urls.items() for u in us}
    assert cfg.peers == []  # every engine is its own: no region is reached through a peer


def test_global_config_refuses_what_it_cannot_serve(example_fleet):
    with pytest.raises(ConfigError, match="reach 'planet'"):
        build_config(example_fleet, "aws-us-west-2", ENV, reach="planet")
    fleet = _with_engines(example_fleet, {"aws-us-west-2": ["http://10.0.0.1:8000"]})
    regions = [
        r.model_copy(update={"endpoints": r.endpoints.model_copy(update={"engines_dns": "vllm.svc:8000"})})
        if r.key == "gcp-us-central1" else r
        for r in fleet.regions
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="global reach needs every region's engine URLs.*gcp-us-central1"):
        build_config(fleet.model_copy(update={"regions": regions}), "aws-us-west-2", ENV, reach="global")


def test_one_global_router_serves_every_region_and_each_engine_keeps_its_gpu(tmp_path):
    async def main():
        bed = await start_fleet(tmp_path)
        fleet = load_fleet(bed.fleet_path)
        home = next(iter(bed.regions))
        router = Router(build_config(fleet, home, ENV, reach="global"))
        url = f"http://127.0.0.1:{await router.start('127.0.0.1', 0)}"
        try:
            for _ in range(100):  # first samples of every engine
                if all(st.sample is not None for st in router.scraper.engines.values()):
                    break
                await asyncio.sleep(0.05)
            now = router.clock()
            views = router.engine_views(now)
            # every engine of the fleet, under its own region and with its own GPU's step times
            by_region = {k: {e.url for e in b.engines} for k, b in bed.regions.items()}
            assert {v.id for v in views} == set().union(*by_region.values())
            for v in views:
                assert v.id in by_region[v.region]
                assert v.profile is not None and f"@{bed.regions[v.region].spec.gpu}x" in v.profile.key, v.profile
            assert all(r.local and not r.remote for r in router.region_views(now))
            # Enough concurrent requests that no single engine takes them all: they land in
            # several regions, each answer naming the region of the engine that served it.
            answers = await asyncio.gather(*(ask(bed.session, url, max_tokens=24) for _ in range(24)))
            assert all(a.complete for a in answers), [a.error for a in answers if not a.complete]
            served = Counter(a.region for a in answers)
            assert len(served) >= 2 and set(served) <= set(bed.regions), served
            # a region's engines gone: the rest of the fleet serves, nothing fails
            for e in bed.regions[home].engines:
                await e.stop()
            await asyncio.sleep(0.5)
            answers = await asyncio.gather(*(ask(bed.session, url, max_tokens=8) for _ in range(8)))
            assert all(a.complete and a.region != home for a in answers), [(a.region, a.error) for a in answers]
        finally:
            await router.close()
            await bed.close()

    asyncio.run(main())
