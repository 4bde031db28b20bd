"""Which GPUs this process can see: name, total and free memory of each.

Three ways in, tried in order, because the serving image has torch but a debugging shell may not:
  1. torch.cuda: `get_device_name` and `mem_get_info` (free, total), what vLLM itself sizes against
  2. NVML through nvidia-ml-py (`pynvml`)
  3. `nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader,nounits` (MiB)

Tests and dry runs on machines without a GPU inject the answer instead: the environment variable
GPUFLEET_FAKE_GPUS (JSON) or a probe file with the same JSON, a list of
`{"name": "NVIDIA H100 80GB HBM3", "total": <bytes>, "free": <bytes>}`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

FAKE_ENV = "GPUFLEET_FAKE_GPUS"
MIB = 1024**2


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class ProbeResult:
    gpus: tuple[GpuInfo, ...]
    source: str  # torch, nvml, nvidia-smi, env, file
    tried: tuple[str, ...] = ()  # why the earlier sources gave nothing


class ProbeError(Exception):
    """The probe input itself is unusable (bad JSON in the fake); distinct from 'no GPU'."""


def parse_fake(text: str, origin: str) -> tuple[GpuInfo, ...]:
    """Parse the injected GPU list; ProbeError names what is wrong."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProbeError(f"{origin} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(raw, list):
        raise ProbeError(f"{origin} must be a JSON list of {{name, total, free}} objects")
    gpus = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProbeError(f"{origin}[{i}] needs a string 'name'")
        total = item.get("total")
        free = item.get("free", total)
        if not isinstance(total, int) or not isinstance(free, int) or total <= 0 or not 0 <= free <= total:
            raise ProbeError(
                f"{origin}[{i}] needs integer bytes with 0 <= free <= total (got {total!r}, {free!r})"
            )
        gpus.append(GpuInfo(index=i, name=item["name"], total_bytes=total, free_bytes=free))
    return tuple(gpus)


def _torch() -> tuple[GpuInfo, ...]:
    import torch  # heavy: only here

    if not torch.cuda.is_available():
        return ()
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(GpuInfo(i, torch.cuda.get_device_name(i), int(total), int(free)))
    return tuple(out)


def _nvml() -> tuple[GpuInfo, ...]:
    import pynvml

    pynvml.nvmlInit()
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            text = name.decode() if isinstance(name, bytes) else name  # bytes before nvidia-ml-py 11.515
            out.append(GpuInfo(i, text, int(mem.total), int(mem.free)))
        return tuple(out)
    finally:
        pynvml.nvmlShutdown()


def parse_nvidia_smi(text: str) -> tuple[GpuInfo, ...]:
    """Lines `name, total MiB, free MiB` (csv, noheader, nounits)."""
    out: list[GpuInfo] = []
    for line in text.strip().splitlines():
        name, total, free = (part.strip() for part in line.rsplit(",", 2))
        out.append(GpuInfo(len(out), name, int(total) * MIB, int(free) * MIB))
    return tuple(out)


def _nvidia_smi() -> tuple[GpuInfo, ...]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise FileNotFoundError("nvidia-smi is not on PATH")
    cmd = [exe, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
    return parse_nvidia_smi(done.stdout)


PROBES: tuple[tuple[str, Callable[[], tuple[GpuInfo, ...]]], ...] = (
    ("torch", _torch),
    ("nvml", _nvml),
    ("nvidia-smi", _nvidia_smi),
)


def probe(probe_file: Path | None = None, env: Mapping[str, str] | None = None) -> ProbeResult:
    """The visible GPUs; an empty `gpus` with `tried` explaining each source when there are none."""
    env = os.environ if env is None else env
    if probe_file is not None:
        try:
            text = probe_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProbeError(f"cannot read probe file {probe_file}: {exc.strerror or exc}") from None
        return ProbeResult(parse_fake(text, str(probe_file)), "file")
    if env.get(FAKE_ENV):
        return ProbeResult(parse_fake(env[FAKE_ENV], FAKE_ENV), "env")
    tried = []
    for source, fn in PROBES:
        try:
            gpus = fn()
        except ImportError as exc:
            tried.append(f"{source}: {exc.name or exc} is not installed")
            continue
        except Exception as exc:  # a broken driver shows up as many exception types; report, go on
            tried.append(f"{source}: {type(exc).__name__}: {str(exc).strip()[:200]}")
            continue
        if gpus:
            return ProbeResult(gpus, source, tuple(tried))
        tried.append(f"{source}: no CUDA device visible")
    return ProbeResult((), "none", tuple(tried))
