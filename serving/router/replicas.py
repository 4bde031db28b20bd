"""Several router replicas for one region, sharing their reservations so they do not double-book.

Each router reserves a request's demand on its target engine until the engine's own metrics show
it (`OptimisticLedger`). With several replicas in front of the same engines, each would see only
its own reservations and admit into room another replica has already promised. So every replica
publishes its in-flight reservations per engine with its summary (`reservations`, `in_flight`,
`replica`: a random id per process), and reads its siblings' summaries every `POLL_S`; an
engine's view then subtracts the siblings' reservations as well as its own.

What a sibling reserved since its last summary is not known yet: the window of double-booking is
one poll (`POLL_S`, 0.2 s), not the scrape interval. A sibling that does not answer is dropped
after `stale_after_s` (its requests then count once the engines' metrics show them). Siblings are
named with `gpufleet router serve --replica URL` (repeatable) or `--replicas-dns HOST:PORT` (a
headless Service: every A record, this replica recognised by its id and skipped).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
from gpufleet.serving.router.regions import SUMMARY_PATH
from gpufleet.serving.router.signals import resolve_engines

if TYPE_CHECKING:
    from gpufleet.serving.router.gateway import Router

POLL_S = 0.2  # at most; never slower than the scrape interval


class ReplicaReader:
    """Polls the sibling replicas' summaries into `router.shared_pending` / `router.shared_in_flight`."""

    def __init__(self, router: Router, urls: Sequence[str] = (), dns: str | None = None) -> None:
        self.router = router
        self.urls = [u.rstrip("/") for u in urls]
        self.dns = dns
        s = router.config.settings
        self.interval_s = min(POLL_S, s.scrape_interval_s)
        self.timeout_s = s.scrape_timeout_s
        # url -> (received at, that replica's reservations per engine, its requests per engine)
        self.seen: dict[str, tuple[float, dict[str, float], dict[str, int]]] = {}

    async def _read(self, session: aiohttp.ClientSession, url: str) -> None:
        try:
            async with session.get(url + SUMMARY_PATH) as resp:
                if resp.status != 200:
                    raise ValueError(f"answered {resp.status}")
                data = await resp.json(content_type=None)
            if not isinstance(data, dict) or data.get("region") != self.router.region:
                raise ValueError("not a replica of this region")
            if data.get("replica") == self.router.replica_id:
                self.seen.pop(url, None)  # this replica itself (a DNS name lists every replica)
                return
            self.seen[url] = (self.router.clock(), _numbers(data.get("reservations"), float),
                              _numbers(data.get("in_flight"), int))  # fmt: skip
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            pass  # kept until stale: one missed poll must not forget a sibling's bookings

    def merge(self, now: float) -> None:
        """Sum the fresh siblings' figures per engine (a sibling silent for stale_after_s is dropped)."""
        stale = self.router.policy_config.stale_after_s
        pending: dict[str, float] = {}
        in_flight: dict[str, int] = {}
        for url, (received, tokens, counts) in list(self.seen.items()):
            if now - received > stale:
                del self.seen[url]
                continue
            for engine, n in tokens.items():
                pending[engine] = pending.get(engine, 0.0) + n
            for engine, k in counts.items():
                in_flight[engine] = in_flight.get(engine, 0) + k
        self.router.shared_pending = pending
        self.router.shared_in_flight = in_flight

    async def _urls(self) -> list[str]:
        if self.dns is None:
            return self.urls
        try:
            found = await resolve_engines(self.dns)
        except (OSError, ValueError):
            found = []
        return sorted({*self.urls, *found})

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.router.config.admin_token}"}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            urls = await self._urls()
            resolved = time.monotonic()
            while True:
                started = time.monotonic()
                if self.dns is not None and started - resolved >= self.router.config.settings.dns_refresh_s:
                    urls, resolved = await self._urls(), started
                await asyncio.gather(*(self._read(session, u) for u in urls))
                for gone in set(self.seen) - set(urls):
                    del self.seen[gone]
                self.merge(self.router.clock())
                await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))


def _numbers(value: Any, kind: type) -> dict[str, Any]:
    """A {engine URL: non-negative number} map from a summary; anything else is left out."""
    if not isinstance(value, dict):
        return {}
    return {
        k: kind(v)
        for k, v in value.items()
        if isinstance(k, str) and type(v) in (int, float) and v == v and 0 <= v < 1e15
    }
