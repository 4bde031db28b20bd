from gpufleet.serving.router.breaker import BreakerBoard, CircuitBreaker
from gpufleet.serving.router.policy import BreakerState


def test_opens_after_threshold_and_half_opens_after_cooldown():
    b = CircuitBreaker(failure_threshold=3, cooldown_s=2.0)
    for t in (0.0, 0.1):
        b.failure(t)
        assert b.state(t) is BreakerState.closed
    b.failure(0.2)
    assert b.state(0.3) is BreakerState.open and not b.allow(0.3)
    assert b.state(2.3) is BreakerState.half_open
    assert b.allow(2.3)  # the probe
    assert not b.allow(2.31)  # only one probe at a time
    b.success(2.5)
    assert b.state(2.5) is BreakerState.closed and b.allow(2.5)


def test_failed_probe_reopens_for_another_cooldown():
    b = CircuitBreaker(failure_threshold=1, cooldown_s=1.0)
    b.failure(0.0)
    assert b.allow(1.0)
    b.failure(1.1)
    assert b.state(1.5) is BreakerState.open
    assert b.state(2.2) is BreakerState.half_open


def test_success_resets_consecutive_count():
    b = CircuitBreaker(failure_threshold=2, cooldown_s=1.0)
    b.failure(0)
    b.success(0)
    b.failure(0)
    assert b.state(0) is BreakerState.closed


def test_released_probe_lets_another_go():
    b = CircuitBreaker(failure_threshold=1, cooldown_s=1.0)
    b.failure(0)
    assert b.allow(1.0)
    b.release()
    assert b.allow(1.0)


def test_board_defaults_closed():
    board = BreakerBoard()
    assert board.engine_state("x", 0) is BreakerState.closed
    assert board.region_state("r", 0) is BreakerState.closed
    assert board.engine("x") is board.engine("x")
