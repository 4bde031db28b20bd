"""Child processes that never outlive their parent: process groups, atexit, signal handlers.

Every child starts in its own session (so its own process group): killing the group takes its
children too. The supervisor kills all groups it started on `close()`, at interpreter exit, and on
SIGTERM/SIGHUP; Ctrl-C (SIGINT) raises KeyboardInterrupt in the parent as usual, and the caller's
`with` block (or atexit) cleans up.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import BinaryIO, NoReturn


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (reads /proc, no psutil needed)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X")


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid`, from /proc/*/stat parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if pid_alive(c):
                out.append(c)
                todo.append(c)
    return out


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Supervisor:
    """Starts children in their own process groups and guarantees they are gone on exit."""

    log_dir: Path | None = None
    children: dict[str, Child] = field(default_factory=dict)
    _closed: bool = False
    _previous: dict[int, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        atexit.register(self.close)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # not the main thread: atexit still covers us
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> NoReturn:
        self.close()
        # Exit as the signal would have: 128 + its number.
        raise SystemExit(128 + signum)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        if name in self.children and self.children[name].alive():
            raise RuntimeError(f"{name} is already running (pid {self.children[name].pid})")
        log_file = None
        out: int | BinaryIO = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_file = self.log_dir / f"{name}.log"
            out = open(log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # own process group: one killpg takes its children too
                close_fds=True,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        child = Child(name=name, argv=list(argv), proc=proc, log=log_file)
        self.children[name] = child
        return child

    def kill(self, name: str, sig: int = signal.SIGKILL, wait_s: float = 5.0) -> None:
        """Signal one child's whole process group and reap it."""
        child = self.children.get(name)
        if child is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)
        try:
            child.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            child.proc.wait(timeout=wait_s)

    def pids(self) -> list[int]:
        return [c.pid for c in self.children.values()]

    def close(self, grace_s: float = 3.0) -> None:
        """SIGTERM every group, give them `grace_s` to exit, SIGKILL what is left, reap all."""
        if self._closed:
            return
        self._closed = True
        live = [c for c in self.children.values() if c.alive()]
        for c in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in live:
            try:
                c.proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for c in self.children.values():
            # The group may hold grandchildren even when the leader has exited.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=grace_s)
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)  # type: ignore[arg-type]
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def python_argv(*args: str) -> list[str]:
    """Run a gpufleet command with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "gpufleet.cli.app", *args]
