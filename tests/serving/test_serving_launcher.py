"""The launcher: GPU probe, engine arithmetic against hand-computed values, and `engine launch --dry-run`.

Expected numbers are worked out here from FACTS.md section 1 and serving/sizing.py's constants
(1 GiB non-torch memory per GPU, activations = batched tokens x hidden x 24 / tp), written as
literal arithmetic so a change in the code cannot move the expectation with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from gpufleet.serving import gpu_probe
from gpufleet.serving.gpu_probe import GpuInfo, ProbeError, parse_fake, parse_nvidia_smi
from gpufleet.serving.launcher import LaunchError, plan_launch
from gpufleet.stacks.fleetfile import parse_fleet

MIB = 1024**2
# Total memory as the driver reports it (nvidia-smi memory.total, MiB).
H100_TOTAL = 81559 * MIB  # NVIDIA H100 80GB HBM3 = 85520809984 bytes
A100_TOTAL = 81920 * MIB  # NVIDIA A100-SXM4-80GB = 85899345920 bytes
L4_TOTAL = 23034 * MIB  # NVIDIA L4 = 24152899584 bytes
GIB = 1024**3
NON_TORCH = 1 * GIB


def fleet(model: str, max_model_len: int, tp: int, cloud: str, region: str, gpu: str, extra: str = ""):
    text = (
        textwrap.dedent(f"""\
        fleet: tf
        models:
          - name: m
            catalog: {model}
            max_model_len: {max_model_len}
            tensor_parallel_size: {tp}
        """)
        + textwrap.indent(extra, "    ")
        + textwrap.dedent(f"""\
        regions:
          - cloud: {cloud}
            region: {region}
            gpu: {gpu}
            nodes: {{max: 1}}
        """)
    )
    return parse_fleet(text)


def gpus(name: str, total: int, n: int, free: int | None = None) -> list[GpuInfo]:
    return [GpuInfo(i, name, total, total - 512 * MIB if free is None else free) for i in range(n)]


def arg(command: tuple[str, ...], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_llama_8b_on_one_h100():
    f = fleet("llama-3.1-8b", 32768, 1, "aws", "us-east-1", "H100-80GB")
    plan = plan_launch(f, gpus("NVIDIA H100 80GB HBM3", H100_TOTAL, 1))
    usable = int(85520809984 * 0.9)  # 76968728985
    weights = int(8.03e9 * 2)  # 16060000000 (bf16)
    activations = 8192 * 4096 * 24  # H100 >= 70 GiB, not A100: 8192 batched tokens; hidden 4096
    kv = usable - weights - activations - NON_TORCH  # 59029680793 bytes = 55.0 GiB
    per_token = 2 * 32 * 8 * 128 * 2  # 131072 = 128 KiB (FACTS.md)
    blocks = kv // (per_token * 16)
    assert (kv, blocks) == (59029680793, 28147)
    e = plan.engine
    assert (e.weight_bytes_per_gpu, e.kv_bytes_per_token, e.kv_cache_bytes_per_gpu) == (
        weights,
        per_token,
        kv,
    )
    assert e.num_gpu_blocks == blocks and e.kv_tokens == 450352
    assert round(e.full_length_sequences, 1) == 13.7  # 450352 / 32768
    c = plan.command
    assert arg(c, "--max-model-len") == "32768" and arg(c, "--max-num-seqs") == "1024"
    assert arg(c, "--tensor-parallel-size") == "1" and arg(c, "--gpu-memory-utilization") == "0.90"
    assert "--kv-cache-dtype" not in c


def test_llama_70b_on_four_h100():
    f = fleet("llama-3.1-70b", 32768, 4, "aws", "us-east-1", "H100-80GB")
    plan = plan_launch(f, gpus("NVIDIA H100 80GB HBM3", H100_TOTAL, 8))
    weights = int(70.6e9 * 2) // 4  # 35300000000 per GPU
    activations = 8192 * 8192 * 24 // 4  # 402653184
    kv = int(85520809984 * 0.9) - weights - activations - NON_TORCH  # 40192333977
    per_token = 2 * 80 * (8 // 4) * 128 * 2  # 81920 = 80 KiB per GPU shard
    blocks = kv // (per_token * 16)
    assert (kv, blocks) == (40192333977, 30664)
    assert plan.engine.num_gpu_blocks == blocks and plan.engine.kv_bytes_per_token == per_token
    assert len(plan.gpus) == 4 and any("using the first 4" in n for n in plan.notes)
    assert arg(plan.command, "--tensor-parallel-size") == "4"
    assert arg(plan.command, "--max-num-seqs") == "1024"


def test_llama_70b_on_eight_a100():
    f = fleet("llama-3.1-70b", 32768, 8, "aws", "us-east-1", "A100-80GB")
    plan = plan_launch(f, gpus("NVIDIA A100-SXM4-80GB", A100_TOTAL, 8))
    usable = int(85899345920 * 0.9)  # 77309411328
    weights = int(70.6e9 * 2) // 8  # 17650000000
    activations = 2048 * 8192 * 24 // 8  # A100: vLLM's smaller defaults, 2048 batched tokens
    kv = usable - weights - activations - NON_TORCH  # 58535337856
    per_token = 2 * 80 * 1 * 128 * 2  # 40960: one KV head per shard
    blocks = kv // (per_token * 16)
    assert (kv, blocks) == (58535337856, 89317)
    assert plan.engine.num_gpu_blocks == blocks
    c = plan.command
    assert arg(c, "--max-num-seqs") == "256" and arg(c, "--max-num-batched-tokens") == "2048"
    assert arg(c, "--tensor-parallel-size") == "8"


# Llama-3.1-8B on one L4: 4402541209 bytes of KV cache = 2099 blocks = 33584 tokens.
L4_KV = int(24152899584 * 0.9) - int(8.03e9 * 2) - 2048 * 4096 * 24 - NON_TORCH
L4_TOKENS = L4_KV // (131072 * 16) * 16


def test_llama_8b_on_l4_fits_32k_only_just():
    assert (L4_KV, L4_TOKENS) == (4402541209, 33584)
    f = fleet("llama-3.1-8b", 32768, 1, "gcp", "europe-west4", "L4")
    plan = plan_launch(f, gpus("NVIDIA L4", L4_TOTAL, 1))
    assert plan.engine.kv_tokens == L4_TOKENS  # 1.02 sequences of 32768
    assert arg(plan.command, "--max-model-len") == "32768"


def test_llama_8b_on_l4_refuses_64k_with_the_numbers():
    f = fleet("llama-3.1-8b", 65536, 1, "gcp", "europe-west4", "L4")
    with pytest.raises(LaunchError) as err:
        plan_launch(f, gpus("NVIDIA L4", L4_TOTAL, 1))
    assert err.value.code == 3
    msg = str(err.value)
    assert "65536" in msg and "33584 tokens" in msg and "8.00 GiB" in msg  # 65536 x 128 KiB
    assert "--allow-shorter-max-model-len" in msg


def test_llama_8b_on_l4_chooses_a_shorter_max_model_len_when_allowed():
    f = fleet("llama-3.1-8b", 65536, 1, "gcp", "europe-west4", "L4")
    plan = plan_launch(f, gpus("NVIDIA L4", L4_TOTAL, 1), allow_shorter_max_model_len=True)
    assert arg(plan.command, "--max-model-len") == str(33584 // 1024 * 1024) == "32768"
    assert any("instead of 65536" in n for n in plan.engine.notes)


def test_llama_8b_on_l4_chooses_fp8_when_the_fleet_allows():
    f = fleet("llama-3.1-8b", 65536, 1, "gcp", "europe-west4", "L4")
    f = f.model_copy(update={"models": [f.models[0].model_copy(update={"allow_fp8_kv_cache": True})]})
    plan = plan_launch(f, gpus("NVIDIA L4", L4_TOTAL, 1))
    per_token = 2 * 32 * 8 * 128 * 1  # fp8: one byte per value, 64 KiB per token
    assert plan.engine.num_gpu_blocks == L4_KV // (per_token * 16) == 4198  # 67168 tokens >= 65536
    assert arg(plan.command, "--kv-cache-dtype") == "fp8" and arg(plan.command, "--max-model-len") == "65536"


def test_weights_that_do_not_fit_are_refused_even_when_shortening_is_allowed():
    f = fleet("llama-3.1-70b", 8192, 1, "aws", "us-east-1", "H100-80GB")
    with pytest.raises(LaunchError) as err:
        plan_launch(f, gpus("NVIDIA H100 80GB HBM3", H100_TOTAL, 1), allow_shorter_max_model_len=True)
    assert err.value.code == 3 and "weights 131.5 GiB" in str(err.value)  # 141.2e9 bytes


def test_too_few_gpus_for_tensor_parallelism():
    f = fleet("llama-3.1-70b", 8192, 4, "aws", "us-east-1", "H100-80GB")
    with pytest.raises(LaunchError, match="needs tensor_parallel_size 4 GPUs; 2 visible") as err:
        plan_launch(f, gpus("NVIDIA H100 80GB HBM3", H100_TOTAL, 2))
    assert err.value.code == 3


def test_busy_gpu_lowers_utilization_to_what_is_free():
    f = fleet("llama-3.1-8b", 8192, 1, "aws", "us-east-1", "H100-80GB")
    plan = plan_launch(f, gpus("NVIDIA H100 80GB HBM3", H100_TOTAL, 1, free=H100_TOTAL // 2 + 1))
    assert arg(plan.command, "--gpu-memory-utilization") == "0.49"  # floor(50.0%) - 1 point of margin


def test_unknown_model_or_region_is_bad_input():
    f = fleet("llama-3.1-8b", 8192, 1, "aws", "us-east-1", "H100-80GB")
    for kwargs in ({"model": "nope"}, {"region": "aws-nowhere-1"}):
        with pytest.raises(LaunchError) as err:
            plan_launch(f, gpus("NVIDIA H100 80GB HBM3", H100_TOTAL, 1), **kwargs)
        assert err.value.code == 2


def test_probe_parsers():
    smi = "NVIDIA H100 80GB HBM3, 81559, 81003\nNVIDIA H100 80GB HBM3, 81559, 1024\n"
    parsed = parse_nvidia_smi(smi)
    assert [g.total_bytes for g in parsed] == [H100_TOTAL, H100_TOTAL] and parsed[1].free_bytes == 1024 * MIB
    assert parse_fake('[{"name": "X", "total": 10}]', "t")[0].free_bytes == 10
    for bad in ("nope", "{}", '[{"name": "X", "total": 10, "free": 11}]', '[{"total": 1}]'):
        with pytest.raises(ProbeError):
            parse_fake(bad, "t")


def test_probe_falls_back_in_order_and_reports_why(monkeypatch):
    def broken():
        raise RuntimeError("NVML_ERROR_DRIVER_NOT_LOADED")

    def missing():
        raise ImportError("x", name="torch")

    smi = (GpuInfo(0, "NVIDIA L4", L4_TOTAL, L4_TOTAL),)
    monkeypatch.setattr(
        gpu_probe, "PROBES", (("torch", missing), ("nvml", broken), ("nvidia-smi", lambda: smi))
    )
    found = gpu_probe.probe(env={})
    assert found.source == "nvidia-smi" and found.gpus == smi
    assert found.tried == (
        "torch: torch is not installed",
        "nvml: RuntimeError: NVML_ERROR_DRIVER_NOT_LOADED",
    )


def test_no_gpu_exits_3_with_a_clear_message(monkeypatch, example_fleet_path):
    from gpufleet.cli.app import app
    from typer.testing import CliRunner

    monkeypatch.delenv(gpu_probe.FAKE_ENV, raising=False)
    monkeypatch.setattr(gpu_probe, "PROBES", (("torch", lambda: ()),))
    result = CliRunner().invoke(app, ["engine", "launch", "--fleet", str(example_fleet_path), "--dry-run"])
    assert result.exit_code == 3
    assert "no GPU is visible" in result.output and "torch: no CUDA device visible" in result.output


def _launch(args: list[str], fake: list[dict] | None, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != gpu_probe.FAKE_ENV}
    if fake is not None:
        env[gpu_probe.FAKE_ENV] = json.dumps(fake)
    cmd = [sys.executable, "-m", "gpufleet.cli.app", "engine", "launch", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_dry_run_end_to_end_prints_the_plan_and_the_vllm_command(repo_root):
    fake = [{"name": "NVIDIA H100 80GB HBM3", "total": H100_TOTAL, "free": H100_TOTAL - 600 * MIB}]
    done = _launch(["--fleet", "fleet.yaml", "--region", "aws-us-east-1", "--dry-run"], fake, repo_root)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "GPU probe: env, 1 GPU(s)" in out
    assert "blocks: 28147 x 16 tokens = 450352 tokens" in out  # the arithmetic is printed
    line = next(ln for ln in out.splitlines() if ln.startswith("dry run: "))
    assert line.removeprefix("dry run: ").split() == [
        "vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct",
        "--served-model-name", "llama-3.1-8b", "--host", "0.0.0.0", "--port", "8000",
        "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.90", "--max-model-len", "32768",
        "--max-num-seqs", "1024", "--max-num-batched-tokens", "8192", "--block-size", "16",
    ]  # fmt: skip


def test_dry_run_end_to_end_probe_file_and_refusal(tmp_path, repo_root):
    probe = tmp_path / "gpus.json"
    probe.write_text(json.dumps([{"name": "NVIDIA L4", "total": L4_TOTAL, "free": L4_TOTAL}]))
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        "fleet: tf\nmodels: [{name: m, catalog: llama-3.1-8b, max_model_len: 65536}]\n"
        "regions: [{cloud: gcp, region: europe-west4, gpu: L4, nodes: {max: 1}}]\n"
    )
    refused = _launch(["--fleet", str(fleet_file), "--probe-file", str(probe), "--dry-run"], None, repo_root)
    assert refused.returncode == 3 and "refusing to start" in refused.stderr
    shorter = _launch(
        [
            "--fleet",
            str(fleet_file),
            "--probe-file",
            str(probe),
            "--dry-run",
            "--allow-shorter-max-model-len",
        ],
        None,
        repo_root,
    )
    assert shorter.returncode == 0, shorter.stderr
    assert "--max-model-len 32768" in shorter.stdout and "instead of 65536" in shorter.stdout


def _dockerfile(repo_root) -> tuple[dict[str, str], list[str], list[str] | None]:
    """The serving image's ENV, ENTRYPOINT and CMD (None when it has none), read from the Dockerfile."""
    import shlex
    from pathlib import Path

    text = (Path(repo_root) / "serving" / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    cmd = None
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "CMD":
            cmd = json.loads(rest)
    return env, entrypoint, cmd


def test_docker_run_image_with_region_only_finds_the_fleet(repo_root, example_fleet_path, tmp_path):
    """`docker run <image> --region X` replaces CMD, so the image's fleet path must not live there."""
    from pathlib import Path

    from gpufleet.serving.launcher import FLEET_ENV, IMAGE_FLEET

    env, entrypoint, cmd = _dockerfile(repo_root)
    assert entrypoint == ["gpufleet", "engine", "launch"]
    assert env.get(FLEET_ENV) == IMAGE_FLEET and (cmd is None or "--fleet" not in cmd)
    # The container: the image's ENV with the fleet mounted at IMAGE_FLEET (here: a copy elsewhere), run
    # in a folder without fleet.yaml (the image's WORKDIR, /home/gpufleet), with `--region` alone.
    mounted = tmp_path / "etc-gpufleet" / "fleet.yaml"
    mounted.parent.mkdir()
    mounted.write_text(example_fleet_path.read_text())
    home = tmp_path / "home"
    home.mkdir()
    run_env = {k: v for k, v in os.environ.items() if k not in (gpu_probe.FAKE_ENV, FLEET_ENV)}
    run_env |= {k: v for k, v in env.items() if k not in ("HOME", "HF_HOME")} | {FLEET_ENV: str(mounted)}
    h100 = {"name": "NVIDIA H100 80GB HBM3", "total": H100_TOTAL, "free": H100_TOTAL}
    run_env[gpu_probe.FAKE_ENV] = json.dumps([h100])
    cli = [sys.executable, "-m", "gpufleet.cli.app", *entrypoint[1:]]
    done = subprocess.run(
        [*cli, *(cmd or []), "--region", "aws-us-east-1", "--dry-run"],
        capture_output=True, text=True, env=run_env, cwd=home, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "model llama-3.1-8b (meta-llama/Llama-3.1-8B-Instruct) in aws-us-east-1" in done.stdout
    # Nothing mounted: exit 2, naming the path, where it came from and how to mount it.
    if Path(IMAGE_FLEET).exists():
        pytest.skip(f"{IMAGE_FLEET} exists on this machine")
    run_env[FLEET_ENV] = IMAGE_FLEET
    missing = subprocess.run(
        [*cli, "--region", "aws-us-east-1", "--dry-run"],
        capture_output=True, text=True, env=run_env, cwd=home, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 2
    assert f"fleet file {IMAGE_FLEET} does not exist (from {FLEET_ENV})" in missing.stderr
    assert f"-v $PWD/fleet.yaml:{IMAGE_FLEET}" in missing.stderr and "Traceback" not in missing.stderr
