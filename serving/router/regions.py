"""Regions: each router publishes its region's summary; peers read it and forward what does not fit.

The summary endpoint is authenticated with the fleet's admin token (peers share it). A forwarded
request carries the hop header (parsing.HOP_HEADER); the receiving router routes it only to its own
engines, so a request crosses at most one region boundary and cannot loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from gpufleet.serving.router.admin import authorize
from gpufleet.serving.router.errors import HttpError

if TYPE_CHECKING:
    from gpufleet.serving.router.gateway import Router

SUMMARY_PATH = "/router/v1/summary"


def add_routes(app: web.Application, router: Router) -> None:
    async def summary(request: web.Request) -> web.Response:
        try:
            authorize(request, router.config.admin_token)
        except HttpError as exc:
            return exc.response()
        return web.json_response(router.local_summary(router.clock()))

    app.router.add_get(SUMMARY_PATH, summary)


class PeerReader:
    """Polls every peer router's summary; a peer that does not answer is forgotten (not forwarded to)."""

    def __init__(self, router: Router, interval_s: float, timeout_s: float) -> None:
        self.router = router
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    async def _read(self, session: aiohttp.ClientSession, key: str, url: str) -> None:
        started = time.monotonic()
        try:
            async with session.get(url + SUMMARY_PATH) as resp:
                if resp.status != 200:
                    raise ValueError(f"answered {resp.status}")
                data = await resp.json(content_type=None)
            if not isinstance(data, dict) or data.get("region") != key:
                raise ValueError("summary is not this peer's")
            now = self.router.clock()
            self.router.peer_summaries[key] = (now, data)
            # the round trip a forwarded request pays (the predictor adds it to a peer's TTFT), smoothed
            rtt = time.monotonic() - started
            old = self.router.peer_rtt.get(key)
            self.router.peer_rtt[key] = rtt if old is None else old + 0.3 * (rtt - old)
            # The summary covers what we forwarded before its data was taken.
            age = data.get("data_age_s")
            self.router.ledger.covered(key, now - (float(age) if isinstance(age, int | float) else 0.0))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            self.router.peer_summaries.pop(key, None)

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.router.config.admin_token}"}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            while True:
                started = time.monotonic()
                peers = self.router.config.peers
                await asyncio.gather(
                    *(self._read(session, p.key, p.router_url) for p in peers if p.router_url)
                )
                await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))
