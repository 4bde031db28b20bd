"""What every command shares: the console, exit codes, and turning bad input into a clean exit.

Exit codes (documented in the README):
  0  success
  1  the command ran and found problems (plan-check violations at --fail-on, failed requests)
  2  bad input: a fleet file, flag, snapshot or plan that cannot be used
  3  the environment lacks something: an optional extra not installed, no GPU, no credentials
  130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import typer

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 130

DEFAULT_FLEET = Path("fleet.yaml")

# Width when output is not a terminal (CI logs, pipes, make): rich's default of 80 columns cuts
# tables to `aws-us…`; $COLUMNS, when set, still wins.
PIPE_WIDTH = 200


def console(stderr: bool = False):
    """The console every command prints through.

    emoji=False: `fleet.yaml:100:3` must not become `fleet.yaml💯3` (rich reads `:100:` as an emoji
    code). Markup stays on for our own styling; user text goes through `escape` (see `error`).
    """
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False, soft_wrap=True, emoji=False)
    if not con.is_terminal and not os.environ.get("COLUMNS"):
        con.width = PIPE_WIDTH
    return con


def error(con, message: str, label: str = "error", style: str = "bold red") -> None:
    """Print `label: message` on `con`; the message is user text (paths, file contents), never markup."""
    from rich.markup import escape

    # escape: messages quote user input and patterns such as [a-z], which rich would eat as markup
    con.print(f"[{style}]{label}:[/] {escape(message)}", markup=True)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print one clear error line to stderr and exit with `code`."""
    error(console(stderr=True), message)
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
        err = console(stderr=True)
        for problem in exc.problems:
            error(err, str(problem))
        raise typer.Exit(EXIT_BAD_INPUT) from None
