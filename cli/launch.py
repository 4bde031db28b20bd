"""gpufleet engine launch: probe the GPUs, size vLLM for them, print the arithmetic, exec `vllm serve`.

The serving image's ENTRYPOINT. `register_launch(engine_app)` adds the command to the `engine` group
(cli/engine.py). Only Typer and the standard library at top level.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import typer
from gpufleet.cli.common import DEFAULT_FLEET, EXIT_BAD_INPUT, EXIT_ENVIRONMENT, fail, load_fleet_or_exit


def launch(
    ctx: typer.Context,
    fleet: Path = typer.Option(
        DEFAULT_FLEET,
        "--fleet",
        "-f",
        envvar="GPUFLEET_FLEET",  # launcher.FLEET_ENV; the serving image sets it to /etc/gpufleet/fleet.yaml
        help="fleet file",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        envvar="GPUFLEET_MODEL",
        help="served model name; default: the region's model or the first",
    ),
    region: str | None = typer.Option(
        None, "--region", envvar="GPUFLEET_REGION", help="region id (<cloud>-<region>), to pick its model"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the vLLM command instead of running it"),
    probe_file: Path | None = typer.Option(
        None,
        "--probe-file",
        envvar="GPUFLEET_PROBE_FILE",
        help='JSON list of {"name", "total", "free"} (bytes) standing in for the GPU probe',
    ),
    gpu_memory_utilization: float = typer.Option(
        0.9,
        "--gpu-memory-utilization",
        min=0.1,
        max=0.99,
        help="fraction of each GPU's total memory for vLLM",
    ),
    allow_shorter: bool = typer.Option(
        False,
        "--allow-shorter-max-model-len",
        envvar="GPUFLEET_ALLOW_SHORTER_MAX_MODEL_LEN",
        help="when one full-length sequence does not fit, serve the longest max_model_len that does",
    ),
    host: str = typer.Option("0.0.0.0", "--host", help="address vLLM listens on"),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="vLLM's HTTP port"),
) -> None:
    """Probe the GPUs, size the engine for them, print the plan and exec vllm serve."""
    from gpufleet.serving.gpu_probe import ProbeError, probe
    from gpufleet.serving.launcher import LaunchError, missing_fleet, plan_launch

    if not fleet.exists():
        # by name: Typer carries its own copy of click's ParameterSource enum
        source = getattr(ctx.get_parameter_source("fleet"), "name", "")
        given_by = {"COMMANDLINE": "--fleet", "ENVIRONMENT": "env"}.get(source, "default")
        fail(missing_fleet(fleet, given_by), EXIT_BAD_INPUT)
    spec = load_fleet_or_exit(fleet)
    try:
        found = probe(probe_file)
    except ProbeError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    if not found.gpus:
        tried = "; ".join(found.tried) or "no probe ran"
        fail(
            f"no GPU is visible to this process ({tried}). On Kubernetes the pod needs an nvidia.com/gpu "
            "limit and a node with the NVIDIA device plugin; with Docker, --gpus all.",
            EXIT_ENVIRONMENT,
        )
    try:
        plan = plan_launch(
            spec,
            found.gpus,
            model=model,
            region=region,
            gpu_memory_utilization=gpu_memory_utilization,
            allow_shorter_max_model_len=allow_shorter,
            host=host,
            port=port,
        )
    except LaunchError as exc:
        fail(str(exc), exc.code)
    typer.echo(f"GPU probe: {found.source}, {len(found.gpus)} GPU(s)")
    for line in plan.explain():
        typer.echo(f"  {line}")
    command = list(plan.command)
    if dry_run:
        typer.echo(f"dry run: {shlex.join(command)}")
        return
    if shutil.which(command[0]) is None:
        fail(
            f"{command[0]!r} is not on PATH: run this inside the serving image, or use --dry-run",
            EXIT_ENVIRONMENT,
        )
    typer.echo(f"exec: {shlex.join(command)}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)  # vLLM replaces this process: signals and exit codes reach it directly


def register_launch(engine_app: typer.Typer) -> None:
    engine_app.command("launch")(launch)
