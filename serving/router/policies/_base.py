"""What the baselines share: the usable engines under the request's reach, ranked by a key."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gpufleet.serving.router.policy import (
    Candidate,
    EngineView,
    PolicyConfig,
    RegionView,
    RoutedRequest,
    _allowed_regions,
    _usable_engines,
    ranked_engines,
)


def prompt_tokens(request: RoutedRequest) -> int:
    if request.prompt_tokens is not None:
        return request.prompt_tokens
    return max(1, request.need_tokens - (request.max_tokens or 0))


def rank(
    request: RoutedRequest, engines: Sequence[EngineView], regions: Sequence[RegionView], now: float,
    config: PolicyConfig, key: Callable[[EngineView], object],
) -> list[Candidate]:  # fmt: skip
    """Usable engines smallest `key` first (ties: local region, then id), then peer regions."""
    allowed = _allowed_regions(request, regions)
    usable = _usable_engines(request, engines, allowed)
    return ranked_engines(request, usable, lambda e: (key(e), not allowed[e.region].local, e.id), allowed,
                          now, config)  # fmt: skip
