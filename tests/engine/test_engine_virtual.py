"""The virtual-time face, the trace readers and the CLI/subprocess start."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import urllib.request

import pytest
from gpufleet.serving import traces
from gpufleet.serving.engine.model import Engine, EngineConfig, Request, leak_check
from gpufleet.serving.engine.virtual import VirtualEngine, VirtualLoop, replay

from .conftest import run_to_end


def _requests(n: int):
    return [
        Request(f"r{i}", prompt_len=30 + 17 * i, max_tokens=20 + 9 * i, ignore_eos=True) for i in range(n)
    ]


def _both_drivers(cfg: EngineConfig, n: int = 6):
    """The same requests through the model stepped by hand and through the virtual loop (windows)."""
    by_hand = Engine(cfg)
    ref = _requests(n)
    for r in ref:
        by_hand.add_request(r, 0.0)
    run_to_end(by_hand)
    loop = VirtualLoop()
    ve = VirtualEngine(loop, cfg, max_window_steps=128)
    mine = _requests(n)
    for r in mine:
        loop.submit(ve, r)
    loop.run()
    return by_hand, ref, ve, mine


def test_loop_runs_events_in_time_order():
    loop = VirtualLoop()
    seen = []
    loop.schedule(2.0, seen.append, "b")
    loop.schedule(1.0, seen.append, "a")
    loop.call_later(3.0, seen.append, "c")
    loop.run(until=2.5)
    assert seen == ["a", "b"] and loop.now == 2.5
    loop.run()
    assert seen == ["a", "b", "c"]


def test_virtual_engine_matches_stepping_the_model_by_hand():
    """Same model, two drivers: the virtual loop with windows gives the step-by-step times."""
    cfg = EngineConfig(num_gpu_blocks=60, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=1024)
    _, ref, ve, mine = _both_drivers(cfg)
    leak_check(ve.engine)
    for a, b in zip(ref, mine, strict=True):
        assert b.finish_time == pytest.approx(a.finish_time, abs=1e-9)
        assert b.first_token_time == pytest.approx(a.first_token_time, abs=1e-9)


def test_inter_token_latency_counters_are_what_vllms_histogram_adds_up():
    """The pace signal's source: _sum is, per request, the time from its first to its last token
    (every gap after the first token, preemption stalls included) and _count the tokens after the
    first; the same whether the engine is stepped by hand or in windows."""
    cfg = EngineConfig(num_gpu_blocks=20, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=1024)
    by_hand, ref, ve, _ = _both_drivers(cfg)
    assert by_hand.num_preemptions > 0  # the small cache makes stalls part of the sum
    st = by_hand.stats()
    assert st.itl_tokens_total == sum(r.num_output_tokens - 1 for r in ref)
    assert st.itl_seconds_total == pytest.approx(sum(r.last_token_time - r.first_token_time for r in ref))
    assert ve.engine.stats().itl_tokens_total == st.itl_tokens_total
    assert ve.engine.stats().itl_seconds_total == pytest.approx(st.itl_seconds_total, abs=1e-9)


def test_an_arrival_mid_window_is_admitted_at_the_next_step_boundary():
    cfg = EngineConfig(num_gpu_blocks=200, max_model_len=2048)

    def run(max_window: int) -> tuple[float, float]:
        loop = VirtualLoop()
        ve = VirtualEngine(loop, cfg, max_window_steps=max_window)
        loop.submit(ve, Request("long", prompt_len=100, max_tokens=400, ignore_eos=True))
        late = Request("late", prompt_len=50, max_tokens=5, ignore_eos=True)
        loop.schedule(0.5, loop.submit, ve, late)
        loop.run()
        return late.first_token_time, late.finish_time

    step_by_step = run(1)
    windowed = run(256)
    assert windowed == pytest.approx(step_by_step, abs=1e-9)


def test_callbacks_and_router_choice_over_many_engines():
    loop = VirtualLoop()
    cfg = EngineConfig(num_gpu_blocks=100, max_model_len=1024)
    engines = [VirtualEngine(loop, cfg, name=f"e{i}") for i in range(3)]
    firsts, done, tokens = [], [], []

    def choose(req, engs):
        return min(engs, key=lambda e: (e.stats().num_running + e.stats().num_waiting, e.name))

    arrivals = [(0.01 * i, Request(f"q{i}", prompt_len=40, max_tokens=10, ignore_eos=True)) for i in range(9)]
    for _, r in arrivals:
        r.on_first_token = lambda req, t: firsts.append(req.request_id)
        r.on_token = lambda req, n, t: tokens.append(n)
    replay(loop, engines, arrivals, choose, on_finish=lambda req, t: done.append((req.request_id, t)))
    loop.run()
    assert len(done) == 9 and len(firsts) == 9 and sum(tokens) == 90
    assert sum(e.engine.num_finished for e in engines) == 9 and all(e.engine.num_finished for e in engines)
    stats = engines[0].stats()
    assert stats.kv_cache_usage == 0.0 and stats.num_gpu_blocks == 100 and stats.block_size == 16
    assert stats.free_tokens == 99 * 16  # every block but the null block


def test_azure_and_mooncake_readers(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n"
    )
    recs = traces.read_trace(csv)
    assert [r.prompt_tokens for r in recs] == [374, 396]
    assert recs[0].arrival_s == 0.0 and recs[1].arrival_s == pytest.approx(4.314579, abs=1e-5)
    mc = tmp_path / "m.jsonl.gz"
    rows = [
        {"timestamp": 0, "input_length": 1100, "output_length": 6, "hash_ids": [0, 1, 2]},
        {"timestamp": 1500, "input_length": 700, "output_length": 4, "hash_ids": [0, 9]},
    ]
    with gzip.open(mc, "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))
    a, b = traces.read_trace(mc)
    assert b.arrival_s == 1.5 and a.block_hashes == (0, 1, 2)
    ta, tb = traces.synthesize_prompt(a), traces.synthesize_prompt(b)
    assert len(ta) == 1100 and len(tb) == 700
    assert ta[:512] == tb[:512] and ta[512:700] != tb[512:700]
    ha, hb = traces.prompt_block_hashes(a, 16), traces.prompt_block_hashes(b, 16)
    assert ha[:32] == hb[:32] and ha[32] != hb[32]
    assert [r.arrival_s for r in traces.time_window([a, b], 1.0, 2.0)] == [0.5]
    assert traces.scale_rate([b], 3)[0].arrival_s == 0.5
    with pytest.raises(traces.TraceError):
        traces.read_trace(tmp_path / "missing.csv")


def test_mooncake_prefixes_hit_the_engine_cache():
    a = traces.TraceRecord(0.0, 1100, 3, (0, 1, 2))
    b = traces.TraceRecord(1.0, 1100, 3, (0, 1, 7))
    loop = VirtualLoop()
    ve = VirtualEngine(loop, EngineConfig(num_gpu_blocks=500, max_model_len=4096))
    reqs = list(traces.iter_requests([a, b]))
    replay(loop, [ve], reqs)
    loop.run()
    assert ve.engine.prefix_cache_hits == 1024


def test_public_traces_read(traces_dir):
    conv = traces.read_trace(traces_dir / "AzureLLMInferenceTrace_conv.csv")
    assert len(conv) == 19366 and conv[0].arrival_s == 0.0
    mc = traces.read_trace(traces_dir / "mooncake_synthetic_trace.jsonl.gz")
    assert len(mc) == 3993 and mc[0].block_hashes


def test_cli_rejects_bad_input_with_exit_2():
    from gpufleet.cli.app import app
    from typer.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(app, ["engine", "emulate", "--model", "no-such-model", "--port", "0"])
    assert result.exit_code == 2 and "unknown model" in result.output
    result = runner.invoke(app, ["engine", "emulate", "--fault", "explode"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["engine", "emulate", "--model", "llama-3.1-70b", "--gpu", "L4"])
    assert result.exit_code == 2 and "does not fit" in result.output


def test_spawn_emulator_as_a_subprocess():
    from gpufleet.serving.engine.server import spawn_emulator

    with spawn_emulator(["--num-gpu-blocks", "64", "--max-model-len", "1024", "--time-scale", "50"]) as emu:
        with urllib.request.urlopen(emu.url + "/v1/models", timeout=5) as r:
            assert json.loads(r.read())["data"][0]["max_model_len"] == 1024
        rq = urllib.request.Request(
            emu.url + "/admin/faults",
            data=b'{"status_503": true}',
            headers={"Authorization": f"Bearer {emu.admin_token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(rq, timeout=5) as r:
            assert json.loads(r.read())["status_503"] is True


def test_module_entry_point_exits_2_on_bad_model():
    out = subprocess.run(
        [sys.executable, "-m", "gpufleet.serving.engine", "--model", "nope", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "unknown model" in out.stderr
