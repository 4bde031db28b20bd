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


def test_a_stalled_emulator_says_so_and_the_bench_reads_it():
    """When the process falls behind (here its loop is blocked 0.3 s mid-answer), the engine seconds
    its steps started late are counted and exposed; `LocalFleet.stalled_share` reads them from each
    engine's /metrics, and above STALL_WARN the bench and the demo warn that the machine, not the
    routing, set the latencies. A quiet engine reports nothing of the kind."""
    import threading
    import time
    from types import SimpleNamespace

    from gpufleet.serving.fleetrun import STALL_WARN, LocalFleet, stall_warning

    cfg = EngineConfig(model="llama-3.1-8b", gpu="H100-80GB")
    with run_emulator_in_thread(cfg, time_scale=10) as stalled, run_emulator_in_thread(cfg, time_scale=10) as quiet:
        body = {"prompt": "p", "max_tokens": 300, "ignore_eos": True}
        answer = threading.Thread(target=post, args=(stalled.url + "/v1/completions", body))
        answer.start()
        while stalled.engine.num_running == 0:
            time.sleep(0.005)
        stalled.loop.call_soon_threadsafe(time.sleep, 0.3)
        answer.join(30)
        server = stalled.server
        assert 0.3 * 10 * 0.8 <= server.stalled_s <= (0.3 + 0.3) * 10, server.stalled_s
        assert server.busy_s > 1.0  # 300 decode steps of the model

        share = LocalFleet.stalled_share(SimpleNamespace(engine_urls={"r": [stalled.url]}))  # type: ignore[arg-type]
        assert share == pytest.approx(server.stalled_s / (server.busy_s + server.stalled_s), rel=0.01)
        assert share > STALL_WARN and "fell behind" in (stall_warning(share) or "")
        idle = LocalFleet.stalled_share(SimpleNamespace(engine_urls={"r": [quiet.url]}))  # type: ignore[arg-type]
        assert idle == 0.0 and stall_warning(idle) is None
    gone = LocalFleet.stalled_share(SimpleNamespace(engine_urls={"r": [stalled.url]}))  # type: ignore[arg-type]
    assert gone is None  # no engine answered
