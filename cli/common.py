"""What every command shares: the console, exit codes, and turning bad input into a clean exit.

Exit codes (documented in the README):
  0  success
  1  the command ran and found problems (plan-check violations at --fail-on, failed requests)
  2  bad input: a fleet file, flag, snapshot or plan that cannot be used
  3  the environment lacks something: an optional extra not installed, no GPU, no credentials
  130 interrupted (Ctrl-C)
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 130

DEFAULT_FLEET = Path("fleet.yaml")


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print one clear error line to stderr and exit with `code`."""
    from rich.markup import escape

    # escape: messages quote user input and patterns such as [a-z], which rich would eat as markup
    console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", markup=True)
    raise typer.Exit(code)


def need_extra(extra: str, exc: ImportError) -> NoReturn:
    fail(
        f"this command needs the '{extra}' extra ({exc.name} is not installed): pip install 'gpufleet[{extra}]'",
        EXIT_ENVIRONMENT,
    )


def load_fleet_or_exit(path: Path):
    """The validated Fleet, or the file's problems on stderr and exit 2."""
    from gpufleet.stacks.fleetfile import FleetFileError, load_fleet

    try:
        return load_fleet(path)
    except FleetFileError as exc:
        from rich.markup import escape

        err = console(stderr=True)
        for problem in exc.problems:
            err.print(f"[bold red]error:[/] {escape(str(problem))}", markup=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
