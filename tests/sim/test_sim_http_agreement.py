"""The simulator and the HTTP bench agree: same trace slice, fleet and policy, SLO goodput within 10%.

The slice is small and time-scaled (60 s of the Azure conversation trace at x2 speed); engines are
shrunk to 512 KV blocks so that three of them saturate at a rate loopback HTTP carries easily, and
the run lands in the interesting regime (SLO attainment well below 100%).
"""

from __future__ import annotations

import pytest
from gpufleet.serving import loadgen
from gpufleet.serving.bench import Setup, http_run, sim_run

REGIONS = ("aws-us-west-2", "gcp-us-central1", "azure-eastus")
BLOCKS = 512


@pytest.fixture(scope="module")
def slice_items(traces_dir):
    items = loadgen.from_trace(traces_dir / "AzureLLMInferenceTrace_conv.csv", duration_s=60)
    # prompt + output must fit one shrunken engine (512 blocks x 16 tokens)
    items = loadgen.clip(items, BLOCKS * 16 // 2)
    return loadgen.assign_clients(items, list(REGIONS))


@pytest.mark.parametrize("policy", ["round-robin", "headroom", "default"])
def test_goodput_agrees(policy, slice_items, example_fleet, tmp_path):
    setup = Setup(example_fleet, REGIONS, engines_per_region=1, num_gpu_blocks=BLOCKS)
    sim = sim_run(setup, slice_items, policy, "conv", 1.0).summary
    http = http_run(setup, slice_items, policy, "conv", 1.0, time_scale=2.0, workdir=tmp_path).summary
    assert sim.requests == http.requests == len(slice_items)
    assert 0.3 < sim.slo_attainment < 0.95, "the slice should load the fleet past its SLO"
    assert http.goodput_rps == pytest.approx(sim.goodput_rps, rel=0.10), (sim, http)


def test_the_peer_router_serves_the_same_slice(slice_items, example_fleet, tmp_path):
    """`gpufleet bench`'s side-by-side: the same engines behind vllm-router (its power_of_two
    policy), every request of the slice answered through it."""
    from gpufleet.serving.bench import peer_router_available
    from gpufleet.serving.outcomes import OK

    if not peer_router_available():
        pytest.skip("vllm-router is not installed (the dev extra installs it)")
    items = [i for i in slice_items if i.at_s < 20]
    setup = Setup(example_fleet, REGIONS, engines_per_region=1, num_gpu_blocks=BLOCKS)
    run = http_run(setup, items, "vllm-router:power_of_two", "conv", 1.0, time_scale=2.0, workdir=tmp_path)
    assert run.summary.requests == len(items)
    assert all(r.outcome == OK for r in run.records), [r.error for r in run.records if r.outcome != OK][:3]
    assert run.summary.output_tokens == sum(i.max_tokens for i in items)
