"""Circuit breakers per engine and per region, with half-open probes. Pure: time is passed in.

closed --(N consecutive failures)--> open --(cool-down)--> half-open --(probe ok)--> closed
                                        ^----------------(probe fails)-----------/
In half-open exactly one request (the probe) is let through; the others still see the breaker as
open until the probe's result is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpufleet.serving.router.policy import BreakerState


@dataclass(slots=True)
class CircuitBreaker:
    failure_threshold: int = 3
    cooldown_s: float = 2.0
    _failures: int = 0
    _opened_at: float | None = None
    _probing: bool = False

    def state(self, now: float) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.closed
        if self._probing or now - self._opened_at < self.cooldown_s:
            return BreakerState.open
        return BreakerState.half_open

    def allow(self, now: float) -> bool:
        """May a request go now? In half-open, the first caller becomes the probe."""
        state = self.state(now)
        if state is BreakerState.half_open:
            self._probing = True
            return True
        return state is BreakerState.closed

    def success(self, now: float) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failure(self, now: float) -> None:
        self._failures += 1
        if self._probing or self._failures >= self.failure_threshold:
            self._opened_at = now  # (re)open; a failed probe restarts the cool-down
        self._probing = False

    def release(self) -> None:
        """The probe ended without a verdict (e.g. the client went away): let another probe go."""
        self._probing = False


@dataclass
class BreakerBoard:
    """All breakers of one router: one per engine and one per region."""

    engine_threshold: int = 3
    region_threshold: int = 6
    cooldown_s: float = 2.0
    engines: dict[str, CircuitBreaker] = field(default_factory=dict)
    regions: dict[str, CircuitBreaker] = field(default_factory=dict)

    def engine(self, key: str) -> CircuitBreaker:
        b = self.engines.get(key)
        if b is None:
            b = self.engines[key] = CircuitBreaker(self.engine_threshold, self.cooldown_s)
        return b

    def region(self, key: str) -> CircuitBreaker:
        b = self.regions.get(key)
        if b is None:
            b = self.regions[key] = CircuitBreaker(self.region_threshold, self.cooldown_s)
        return b

    def engine_state(self, key: str, now: float) -> BreakerState:
        b = self.engines.get(key)
        return BreakerState.closed if b is None else b.state(now)

    def region_state(self, key: str, now: float) -> BreakerState:
        b = self.regions.get(key)
        return BreakerState.closed if b is None else b.state(now)
