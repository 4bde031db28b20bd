"""The `gpufleet` command: the Typer front door.

Each command group lives in its own module and registers itself here. Modules import only Typer
and the standard library at top level, so `gpufleet --help` stays fast; the work (pydantic, cdktn,
cloud SDKs, aiohttp) is imported inside the command that needs it.
"""

from __future__ import annotations

import typer
from gpufleet.cli import (
    bench,
    capacity,
    demo,
    engine,
    manifests,
    plan_check,
    router,
    simulate,
    synth,
    validate,
)

app = typer.Typer(
    name="gpufleet",
    help="GPU fleets over AWS, GCP and Azure from one fleet file, routed by KV-cache headroom.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)



@app.callback()
def _root() -> None:
    """GPU fleets over AWS, GCP and Azure from one fleet file, routed by KV-cache headroom."""


for module in (validate, synth, manifests, capacity, plan_check, engine, router, simulate, bench, demo):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
