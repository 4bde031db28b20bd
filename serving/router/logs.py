"""Bounded logs: the same error repeated is counted, not printed each time.

Under a flood (a scanner sending garbage, clients at the file-descriptor limit) aiohttp and asyncio
log one line, often with a traceback, per event; the issue saw 47 MB in 25 s. `RepeatFilter` lets the
first record of a kind through (logger, level, message template, exception type), drops the repeats
for `window_s`, and then says how many it dropped: on the next record of that kind, or from `flush`
(the router calls it every window), as one line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

WINDOW_S = 60.0
MAX_KINDS = 512  # distinct kinds remembered; the oldest are forgotten past this
# The loggers a router's process writes through: asyncio (accept errors, task errors), aiohttp's
# server and client, and the router's own.
LOGGERS = ("asyncio", "aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.client",
           "aiohttp.internal", "gpufleet.router")  # fmt: skip

_Key = tuple[str, int, str, str]


class RepeatFilter(logging.Filter):
    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock
        self._kinds: dict[_Key, list] = {}  # kind -> [window start, repeats dropped, a sample record]
        self.dropped = 0  # over the filter's life

    @staticmethod
    def _key(record: logging.LogRecord) -> _Key:
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        return (record.name, record.levelno, str(record.msg)[:200], exc)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_gpufleet_summary", False):
            return True
        key = self._key(record)
        now = self.clock()
        kind = self._kinds.get(key)
        if kind is not None and now - kind[0] < self.window_s:
            kind[1] += 1
            self.dropped += 1
            return False
        repeats = kind[1] if kind is not None else 0
        self._kinds.pop(key, None)
        self._kinds[key] = [now, 0, record]
        if len(self._kinds) > MAX_KINDS:
            del self._kinds[next(iter(self._kinds))]  # dicts keep insertion order: the oldest
        if repeats and isinstance(record.msg, str):
            record.msg = f"{record.msg} [and {repeats} more like this in the {self.window_s:g} s before]"
        return True

    def flush(self) -> None:
        """Report the kinds whose window has passed with repeats dropped, one line each."""
        now = self.clock()
        for key, kind in list(self._kinds.items()):
            start, repeats, sample = kind
            if repeats and now - start >= self.window_s:
                kind[0], kind[1] = now, 0
                logging.getLogger(key[0]).log(
                    key[1],
                    "%s [repeated %d more times in %.0f s]",
                    sample.getMessage()[:200],
                    repeats,
                    now - start,
                    extra={"_gpufleet_summary": True},
                )


_installed: RepeatFilter | None = None


def install(window_s: float = WINDOW_S) -> RepeatFilter:
    """Put one shared RepeatFilter on the loggers a router writes through (once per process: several
    routers in one process, as in the tests, share it)."""
    global _installed
    if _installed is None:
        _installed = RepeatFilter(window_s)
        for name in LOGGERS:
            logging.getLogger(name).addFilter(_installed)
    return _installed
