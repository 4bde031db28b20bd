"""`python -m gpufleet.serving.engine ...`: the emulator without the Typer front door (for subprocesses).

Same flags as `gpufleet engine emulate`. Prints `listening on http://HOST:PORT` once serving.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpufleet.serving.engine", description=__doc__)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--gpu", default="H100")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--num-gpu-blocks", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--admin-token-env", default=None)
    ap.add_argument("--fault", action="append", default=[])
    # vLLM's flag (vllm/entrypoints/openai/cli_args.py, off by default): GET /load counts requests
    ap.add_argument("--enable-server-load-tracking", action="store_true")
    a = ap.parse_args(argv)
    from gpufleet.serving.engine.faults import FaultError
    from gpufleet.serving.engine.model import EngineConfig
    from gpufleet.serving.engine.server import EmulatorError, serve_forever

    token = os.environ.get(a.admin_token_env) if a.admin_token_env else None
    if a.admin_token_env and not token:
        print(f"error: environment variable {a.admin_token_env} is not set", file=sys.stderr)
        return 2
    config = EngineConfig(
        model=a.model,
        gpu=a.gpu,
        tensor_parallel_size=a.tp,
        max_model_len=a.max_model_len,
        num_gpu_blocks=a.num_gpu_blocks,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        served_model_name=a.served_model_name,
    )
    try:
        serve_forever(
            config,
            host=a.host,
            port=a.port,
            time_scale=a.time_scale,
            admin_token=token,
            faults=a.fault,
            enable_server_load_tracking=a.enable_server_load_tracking,
        )
    except (EmulatorError, FaultError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
