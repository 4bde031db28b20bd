"""The serving image's entrypoint logic: from the fleet's model entry and the GPUs found, the vLLM command.

Steps: pick the model (by name, by region, or the fleet's first); take the first
`tensor_parallel_size` visible GPUs; lower `--gpu-memory-utilization` when less memory is free than
it asks for (vLLM refuses to start otherwise); size the engine with `sizing.fit_engine`; and build
`vllm serve <hf_id> ...`. The CLI (`gpufleet engine launch`) prints the plan and execs the command.
No heavy imports here: the probe imports torch or NVML only when it runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpufleet.serving.gpu_probe import GpuInfo
from gpufleet.serving.sizing import EnginePlan, fit_engine

if TYPE_CHECKING:
    from gpufleet.stacks.spec import Fleet, ModelSpec, Region

VLLM_PORT = 8000  # vLLM's default; the Kubernetes probes and Services use the same number
DEFAULT_UTILIZATION = 0.9
# The fleet file without --fleet. The serving image sets it (serving/Dockerfile), because
# `docker run <image> --region X` replaces CMD: a --fleet there would be lost.
FLEET_ENV = "GPUFLEET_FLEET"
IMAGE_FLEET = "/etc/gpufleet/fleet.yaml"


class LaunchError(Exception):
    """The launch cannot go on; `code` is the CLI exit code (2 bad input, 3 environment)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LaunchPlan:
    model: ModelSpec
    region: Region | None
    gpus: tuple[GpuInfo, ...]  # the GPUs the engine uses
    engine: EnginePlan
    command: tuple[str, ...]
    notes: tuple[str, ...]

    def explain(self) -> list[str]:
        where = f" in {self.region.key}" if self.region else ""
        lines = [f"model {self.model.name} ({self.engine.model.hf_id}){where}"]
        for g in self.gpus:
            lines.append(
                f"GPU {g.index}: {g.name}, total {g.total_bytes / 1024**3:.1f} GiB, "
                f"free {g.free_bytes / 1024**3:.1f} GiB"
            )
        return lines + list(self.notes) + self.engine.explain()


def missing_fleet(path: Path, given_by: str) -> str:
    """What to say when the fleet file is not there. `given_by`: "--fleet", "env" or "default"."""
    if given_by == "--fleet":
        return f"fleet file {path} (--fleet) does not exist"
    origin = f"from {FLEET_ENV}" if given_by == "env" else f"the default; --fleet or {FLEET_ENV} names another"
    return (
        f"fleet file {path} does not exist ({origin}): mount it, e.g. `docker run -v "
        f"$PWD/fleet.yaml:{IMAGE_FLEET} <image> --region <id>` (on Kubernetes the serving stacks mount it "
        "from a ConfigMap)"
    )


def select_model(fleet: Fleet, model: str | None, region: str | None) -> tuple[ModelSpec, Region | None]:
    """The model entry to serve; LaunchError(code 2) names the choices when a name is unknown."""
    reg = None
    if region is not None:
        try:
            reg = fleet.region(region)
        except KeyError as exc:
            raise LaunchError(str(exc.args[0]), 2) from None
    if model is None:
        return (fleet.model_for(reg) if reg else fleet.models[0]), reg
    for m in fleet.models:
        if m.name == model:
            return m, reg
    names = ", ".join(m.name for m in fleet.models)
    raise LaunchError(f"no model {model!r} in fleet {fleet.fleet!r}; models: {names}", 2)


def effective_utilization(gpus: Sequence[GpuInfo], wanted: float) -> tuple[float, str | None]:
    """`wanted`, or less when a GPU has less free memory than wanted x total (rounded down to 0.01)."""
    free_fraction = min(g.free_bytes / g.total_bytes for g in gpus)
    if free_fraction >= wanted:
        return wanted, None
    lowered = math.floor(free_fraction * 100) / 100 - 0.01  # vLLM needs the requested bytes free; margin
    note = (
        f"only {free_fraction:.1%} of GPU memory is free (another process holds the rest): "
        f"--gpu-memory-utilization lowered from {wanted:.2f} to {lowered:.2f}"
    )
    return lowered, note


def plan_launch(
    fleet: Fleet,
    gpus: Sequence[GpuInfo],
    *,
    model: str | None = None,
    region: str | None = None,
    gpu_memory_utilization: float = DEFAULT_UTILIZATION,
    allow_shorter_max_model_len: bool = False,
    host: str = "0.0.0.0",
    port: int = VLLM_PORT,
) -> LaunchPlan:
    """Size the engine for the GPUs found and build the vLLM command; LaunchError when it cannot."""
    from gpufleet.serving.sizing import SizingError

    spec, reg = select_model(fleet, model, region)
    tp = spec.tensor_parallel_size
    if not gpus:
        raise LaunchError("no GPU is visible", 3)
    if len(gpus) < tp:
        raise LaunchError(
            f"model {spec.name} needs tensor_parallel_size {tp} GPUs; {len(gpus)} visible "
            f"({', '.join(g.name for g in gpus)})",
            3,
        )
    used = tuple(gpus[:tp])
    notes: list[str] = []
    if len(gpus) > tp:
        notes.append(f"{len(gpus)} GPUs visible; using the first {tp} (tensor_parallel_size {tp})")
    if len({g.name for g in used}) > 1:
        notes.append("the GPUs differ; sizing against the smallest")
    smallest = min(used, key=lambda g: g.total_bytes)
    util, note = effective_utilization(used, gpu_memory_utilization)
    if note:
        notes.append(note)
    if util <= 0.05:
        raise LaunchError(f"almost no GPU memory is free on {smallest.name}: {note}", 3)
    if reg is not None:
        from gpufleet.stacks.catalog import gpu as catalog_gpu

        expected = catalog_gpu(reg.gpu)
        names = (reg.gpu.split("-")[0], *expected.aliases)
        if not any(n.casefold() in smallest.name.casefold() for n in names):
            notes.append(
                f"region {reg.key} expects {expected.key} GPUs but found {smallest.name}; "
                "sizing for what is here"
            )
    try:
        engine = fit_engine(
            spec.shape,
            smallest.total_bytes,
            smallest.name,
            tensor_parallel_size=tp,
            gpu_memory_utilization=util,
            max_model_len=spec.max_model_len,
            kv_cache_dtype=spec.kv_cache_dtype,
            allow_fp8_kv_cache=spec.allow_fp8_kv_cache,
            allow_shorter_max_model_len=allow_shorter_max_model_len,
        )
    except SizingError as exc:
        hint = ""
        if exc.kv_tokens and not allow_shorter_max_model_len:
            hint = " (--allow-shorter-max-model-len lets the launcher shorten max_model_len to what fits)"
        raise LaunchError(f"refusing to start: {exc}{hint}", 3) from None
    command = (
        "vllm", "serve", engine.model.hf_id,
        "--served-model-name", spec.name,
        "--host", host,
        "--port", str(port),
        *engine.vllm_args(),
    )  # fmt: skip
    return LaunchPlan(spec, reg, used, engine, command, tuple(notes))
