"""The emulator keeps the engine model's time while it is busy: its steps follow each other in engine
time however late the event loop's timer wakes it (up to `server.CATCH_UP_S`), so an answer takes
what the model says. A timer about a millisecond late per step once made a busy engine 15-30 %
slower than its model at the HTTP bench's time scale."""

from __future__ import annotations

import pytest
from gpufleet.serving.engine.model import Engine, EngineConfig
from gpufleet.serving.engine.server import run_emulator_in_thread

from .conftest import req, run_to_end
from .http_util import post, sample, scrape


@pytest.mark.parametrize("time_scale", [2.0, 4.0])
def test_a_busy_emulator_answers_in_the_engine_models_time(time_scale):
    cfg = EngineConfig(model="llama-3.1-8b", gpu="H100-80GB")
    with run_emulator_in_thread(cfg, time_scale=time_scale) as h:
        status, answer = post(h.url + "/v1/completions", {"prompt": "lorem ipsum " * 50, "max_tokens": 300,
                                                         "ignore_eos": True})  # fmt: skip
        assert status == 200, answer
        prompt = answer["usage"]["prompt_tokens"]
        fams = scrape(h.url)
        e2e = sample(fams, "vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_sum")
    # the same request, alone, through the engine model: what the answer should take in engine time
    engine = Engine(cfg)
    engine.add_request(req("alone", prompt, 300))
    model_s, plans = run_to_end(engine, check=None)
    assert len(plans) >= 300
    assert e2e == pytest.approx(model_s, rel=0.05), (e2e, model_s)
