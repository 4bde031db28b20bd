"""gpufleet engine: run an engine. `emulate` serves the vLLM emulator; `launch` (cli/launch.py, when
present) starts real vLLM.

Only Typer and the standard library at top level: the engine model and aiohttp load inside the command.
"""

from __future__ import annotations

import os

import typer
from gpufleet.cli.common import EXIT_BAD_INPUT, EXIT_INTERRUPTED, fail

engine_app = typer.Typer(
    name="engine",
    help="Run one engine: the vLLM emulator here, or real vLLM on a GPU node.",
    no_args_is_help=True,
)


@engine_app.command("emulate")
def emulate(
    model: str = typer.Option("llama-3.1-8b", "--model", help="Catalog model key or Hugging Face id."),
    gpu: str = typer.Option("H100", "--gpu", help="Catalog GPU key or alias (H100, H200, A100, L40S, L4)."),
    tp: int = typer.Option(1, "--tp", min=1, help="Tensor-parallel size (GPUs per engine)."),
    max_model_len: int | None = typer.Option(None, "--max-model-len", min=1, help="Context limit in tokens."),
    num_gpu_blocks: int | None = typer.Option(
        None, "--num-gpu-blocks", min=2, help="Override the sized KV block count (small engines for tests)."
    ),
    max_num_seqs: int | None = typer.Option(None, "--max-num-seqs", min=1),
    max_num_batched_tokens: int | None = typer.Option(None, "--max-num-batched-tokens", min=1),
    served_model_name: str | None = typer.Option(None, "--served-model-name", help="Name in /v1/models."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="0 picks a free port."),
    time_scale: float = typer.Option(1.0, "--time-scale", help="Run engine time this many times faster."),
    admin_token_env: str | None = typer.Option(
        None, "--admin-token-env", help="Environment variable holding the bearer token of POST /admin/faults."
    ),
    fault: list[str] = typer.Option(
        [],
        "--fault",
        help="Start with a fault: refuse[=SECONDS], hang, 503, slow=FACTOR, break-stream=N, garbage-metrics.",
    ),
    enable_server_load_tracking: bool = typer.Option(
        False,
        "--enable-server-load-tracking",
        help="GET /load counts requests in flight (vLLM's flag of the same name; off: it reports 0).",
    ),
) -> None:
    """Serve vLLM's HTTP API and metrics from an emulated engine (paged KV cache, batching, preemption)."""
    if time_scale <= 0:
        fail("--time-scale must be > 0")
    token = None
    if admin_token_env:
        token = os.environ.get(admin_token_env)
        if not token:
            fail(f"--admin-token-env {admin_token_env}: that environment variable is not set or empty")
    from gpufleet.serving.engine.faults import FaultError, parse_flag
    from gpufleet.serving.engine.model import EngineConfig
    from gpufleet.serving.engine.server import EmulatorError, serve_forever

    try:
        for spec in fault:
            parse_flag(spec)
    except FaultError as exc:
        fail(str(exc))
    config = EngineConfig(
        model=model,
        gpu=gpu,
        tensor_parallel_size=tp,
        max_model_len=max_model_len,
        num_gpu_blocks=num_gpu_blocks,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        served_model_name=served_model_name,
    )
    try:
        serve_forever(
            config,
            host=host,
            port=port,
            time_scale=time_scale,
            admin_token=token,
            faults=fault,
            enable_server_load_tracking=enable_server_load_tracking,
            announce=lambda line: typer.echo(line),
        )
    except EmulatorError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _register_launch() -> None:
    """`engine launch` lives in cli/launch.py (another module); add it when that module exists."""
    try:
        from gpufleet.cli import launch
    except ImportError as exc:
        if exc.name in ("gpufleet.cli.launch", "launch"):
            return  # not written yet
        raise
    register_launch = getattr(launch, "register_launch", None)
    if register_launch is not None:
        register_launch(engine_app)


def register(app: typer.Typer) -> None:
    _register_launch()
    app.add_typer(engine_app, name="engine")
