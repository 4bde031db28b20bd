"""The virtual-time face of the engine: a discrete-event loop with no sockets and no sleeps.

It drives the SAME `Engine` model as the HTTP server (model.py), so the simulator and the server
never fork scheduling logic. A fleet simulator builds one `VirtualLoop`, any number of
`VirtualEngine`s on it, schedules arrivals, and lets a router policy pick an engine per request from
each engine's `stats()`:

    loop = VirtualLoop()
    cfg = EngineConfig(model="llama-3.1-8b", gpu="H100")
    engines = [VirtualEngine(loop, cfg, name=f"e{i}") for i in range(48)]
    def arrive(rec):
        eng = max(engines, key=lambda e: e.stats().free_tokens)          # a router policy
        loop.submit(eng, Request(..), on_first_token=..., on_finish=...)
    for rec in records:
        loop.schedule(rec.arrival_s, arrive, rec)
    loop.run(until=3600)

Speed: a decode step with nothing admissible waiting runs as a window of identical steps up to the
next finish (Engine.schedule(max_steps=...)); a request submitted to an engine mid-window truncates
the window at the next step boundary, so arrivals are admitted exactly when they would be step by
step. Stats read mid-window are those of the window's start (at most one window old).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from itertools import count

from gpufleet.serving.engine.model import Engine, EngineConfig, EngineStats, Request, ResolvedConfig, StepPlan


class VirtualLoop:
    """A clock and a heap of (time, callback). `schedule(t, cb, *args)`, `run(until)`."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._heap: list[tuple[float, int, Callable, tuple]] = []
        self._seq = count()
        self.events_run = 0

    def schedule(self, t: float, callback: Callable, *args) -> None:
        """Call `callback(*args)` at virtual time t (not before now)."""
        heapq.heappush(self._heap, (t if t > self.now else self.now, next(self._seq), callback, args))

    def call_later(self, delay: float, callback: Callable, *args) -> None:
        self.schedule(self.now + delay, callback, *args)

    def submit(
        self,
        engine: VirtualEngine,
        request: Request,
        on_token: Callable[[Request, int, float], None] | None = None,
        on_first_token: Callable[[Request, float], None] | None = None,
        on_finish: Callable[[Request, float], None] | None = None,
    ) -> Request:
        """Hand a request to an engine now. Callbacks: on_first_token(req, t), on_token(req, n, t)
        (n tokens arrived at t; a window delivers several at once), on_finish(req, t)."""
        if on_token is not None:
            request.on_token = on_token
        if on_first_token is not None:
            request.on_first_token = on_first_token
        if on_finish is not None:
            request.on_finish = on_finish
        return engine.submit(request)

    def run(self, until: float | None = None) -> float:
        """Run events in time order until the heap is empty or the next one is after `until`."""
        heap = self._heap
        pop = heapq.heappop
        n = 0
        while heap:
            if until is not None and heap[0][0] > until:
                self.now = until
                break
            t, _, cb, args = pop(heap)
            self.now = t
            cb(*args)
            n += 1
        self.events_run += n
        return self.now

    @property
    def pending(self) -> int:
        return len(self._heap)


class VirtualEngine:
    """One engine stepping as events on a VirtualLoop."""

    def __init__(
        self,
        loop: VirtualLoop,
        config: EngineConfig | ResolvedConfig | Engine | None = None,
        name: str = "engine",
        max_window_steps: int = 256,
    ) -> None:
        self.loop = loop
        self.engine = config if isinstance(config, Engine) else Engine(config, name=name)
        self.name = name
        self.max_window_steps = max_window_steps
        self._plan: StepPlan | None = None
        self._gen = 0
        self._kick_pending = False

    # -- what a router reads -----------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def busy(self) -> bool:
        return self._plan is not None

    # -- requests ----------------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        loop = self.loop
        self.engine.add_request(request, loop.now)
        plan = self._plan
        if plan is None:
            if not self._kick_pending:
                self._kick_pending = True
                loop.schedule(loop.now, self._kick)
        elif plan.steps > 1:
            self._truncate(plan)
        return request

    def abort(self, request_id: str) -> bool:
        plan = self._plan
        if plan is not None and plan.steps > 1:
            self._truncate(plan)
        return self.engine.abort(request_id, self.loop.now)

    # -- stepping ------------------------------------------------------------------------------------

    def _kick(self) -> None:
        self._kick_pending = False
        if self._plan is None:
            self._start()

    def _start(self) -> None:
        now = self.loop.now
        plan = self.engine.schedule(now, self.max_window_steps)
        if plan is None:
            self._plan = None
            return
        self._plan = plan
        self._gen += 1
        end = now + plan.time_of(plan.steps)
        self.loop.schedule(end, self._end, self._gen, None)

    def _end(self, gen: int, steps: int | None) -> None:
        if gen != self._gen:
            return  # superseded by a truncation
        plan = self._plan
        self._plan = None
        assert plan is not None
        self.engine.commit(plan, self.loop.now, steps)
        self._start()

    def _truncate(self, plan: StepPlan) -> None:
        """End the window at the first step boundary at or after now."""
        steps, t = plan.steps_done_by(self.loop.now - plan.start)
        if steps >= plan.steps:
            return
        plan.steps = steps
        self._gen += 1
        self.loop.schedule(plan.start + t, self._end, self._gen, steps)


def replay(
    loop: VirtualLoop,
    engines: list[VirtualEngine],
    arrivals: Iterable[tuple[float, Request]],
    choose: Callable[[Request, list[VirtualEngine]], VirtualEngine] | None = None,
    on_finish: Callable[[Request, float], None] | None = None,
) -> None:
    """Schedule (arrival time, request) pairs; at each arrival `choose(request, engines)` picks the
    engine (default: most free KV tokens minus waiting demand). Call loop.run() afterwards."""

    def default_choose(req: Request, engs: list[VirtualEngine]) -> VirtualEngine:
        def headroom(e: VirtualEngine) -> float:
            s = e.engine
            return (s.num_free_blocks * s.block_size) - sum(r.num_tokens for r in s.waiting)

        return max(engs, key=headroom)

    pick = choose or default_choose

    def arrive(req: Request) -> None:
        loop.submit(pick(req, engines), req, on_finish=on_finish)

    for t, req in arrivals:
        loop.schedule(t, arrive, req)
