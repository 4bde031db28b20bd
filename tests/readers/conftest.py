"""Helpers for the file-reader tests: bound each call in time, run the CLI in-process, make FIFOs."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


class Hung(BaseException):
    """A call ran past its time bound (BaseException: nothing on the way may swallow it)."""


@contextmanager
def _bounded(seconds: float) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def bounded() -> Callable:
    """`with bounded(5): ...` raises Hung if the block takes longer (SIGALRM, main thread)."""
    return _bounded


def _run(args: list[str], seconds: float = 30.0):
    from gpufleet.cli.app import app
    from typer.testing import CliRunner

    with _bounded(seconds):
        result = CliRunner().invoke(app, args)
    text = result.output
    stderr = getattr(result, "stderr", "") or ""
    if stderr not in text:
        text += stderr
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not crashed, f"{args} raised {result.exception!r}:\n{text}"
    assert "Traceback" not in text, text
    return result.exit_code, text


@pytest.fixture(scope="session")
def run_cli() -> Callable:
    """run_cli([...]) -> (exit code, stdout + stderr): the real CLI in-process, bounded in time, and
    failing the test on any exception other than a clean exit."""
    return _run


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "pipe.yaml"
    os.mkfifo(path)
    return path
