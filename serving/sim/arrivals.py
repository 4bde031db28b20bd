"""Arrival times of traces with coarse timestamps, for load scaling.

The Mooncake trace stamps its requests on a 3 s grid (its `timestamp` is in milliseconds, multiples
of 3000): scaled up, every tick's requests would still land at one instant, a burst the real
service never saw. `spread_ticks` spreads each tick's requests uniformly over the tick (seeded), so
that scaling the load scales a rate and does not stack bursts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

MOONCAKE_TICK_S = 3.0


def spread_ticks(items: Sequence, tick_s: float, seed: int = 0) -> list:
    """WorkItems with each arrival moved to a seeded uniform point of [t, t + tick_s), in order.
    `tick_s` is in the items' time (the trace's tick divided by the load scale)."""
    if tick_s <= 0:
        return list(items)
    rng = random.Random(seed ^ 0x71C)
    out = [replace(it, at_s=it.at_s + rng.random() * tick_s) for it in items]
    out.sort(key=lambda it: it.at_s)
    return out


def on_grid(items: Sequence, tick_s: float) -> bool:
    """Whether every arrival sits on a multiple of `tick_s` (items' time)."""
    return bool(items) and tick_s > 0 and all(abs(it.at_s / tick_s - round(it.at_s / tick_s)) < 1e-6 for it in items)
