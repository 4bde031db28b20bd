"""Fault injection for the engine emulator: what a sick vLLM looks like to a router.

Faults are set by CLI flags at start (`--fault hang`, `--fault slow=4`, ...) or at run time through
the admin endpoint `POST /admin/faults` (bearer token, compared in constant time), or directly on an
in-process handle (`EmulatorHandle.set_faults(...)`). The admin endpoint itself is never faulted.

| fault | field | effect |
|---|---|---|
| refuse connections | `refuse_connections` (true, or seconds) | listening socket closed, open connections
  dropped; with seconds it reopens after that long |
| hang | `hang` | every request (health and metrics included) waits until the fault is cleared |
| 503 | `status_503` | every request answers 503 with an OpenAI-style error body (`/health` too) |
| slow | `slow_factor` | every engine step takes this many times longer |
| broken stream | `break_stream_after_tokens` | a stream is cut (connection closed, no `[DONE]`) after N |
| garbage metrics | `garbage_metrics` | `/metrics` answers 200 with text that is not Prometheus exposition |
| clear | `clear` | all of the above off (applied first, so `{"clear": true, "hang": true}` sets only hang) |
"""

from __future__ import annotations

import hmac
from dataclasses import asdict, dataclass

FAULT_FLAGS = ("refuse", "hang", "503", "slow=FACTOR", "break-stream=N", "garbage-metrics")


@dataclass
class FaultState:
    refuse_connections: bool = False
    refuse_for_s: float | None = None
    hang: bool = False
    status_503: bool = False
    slow_factor: float = 1.0
    break_stream_after_tokens: int | None = None
    garbage_metrics: bool = False

    def as_dict(self) -> dict:
        return asdict(self)

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]


class FaultError(ValueError):
    """A fault specification that cannot be used; the message says why."""


def parse_flag(spec: str) -> dict:
    """`--fault` values: refuse, hang, 503, slow=4, break-stream=10, garbage-metrics."""
    name, _, value = spec.strip().partition("=")
    name = name.lower()
    try:
        if name == "refuse":
            return {"refuse_connections": float(value) if value else True}
        if name == "hang" and not value:
            return {"hang": True}
        if name == "503" and not value:
            return {"status_503": True}
        if name == "slow":
            return {"slow_factor": float(value or 2)}
        if name == "break-stream":
            return {"break_stream_after_tokens": int(value or 1)}
        if name == "garbage-metrics" and not value:
            return {"garbage_metrics": True}
    except ValueError:
        raise FaultError(f"--fault {spec!r}: {value!r} is not a number") from None
    raise FaultError(f"--fault {spec!r} is not one of: {', '.join(FAULT_FLAGS)}")


def apply(state: FaultState, body: dict) -> FaultState:
    """Apply an admin request body to the state; raise FaultError on a bad field."""
    if not isinstance(body, dict):
        raise FaultError("the body must be a JSON object")
    known = {
        "clear",
        "refuse_connections",
        "hang",
        "status_503",
        "slow_factor",
        "break_stream_after_tokens",
        "garbage_metrics",
    }
    unknown = set(body) - known
    if unknown:
        raise FaultError(
            f"unknown fault field(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
        )
    if body.get("clear"):
        state.clear()
    if "refuse_connections" in body:
        v = body["refuse_connections"]
        if isinstance(v, bool):
            state.refuse_connections, state.refuse_for_s = v, None
        elif isinstance(v, int | float) and v > 0:
            state.refuse_connections, state.refuse_for_s = True, float(v)
        else:
            raise FaultError("refuse_connections must be true/false or a number of seconds > 0")
    for key in ("hang", "status_503", "garbage_metrics"):
        if key in body:
            if not isinstance(body[key], bool):
                raise FaultError(f"{key} must be true or false")
            setattr(state, key, body[key])
    if "slow_factor" in body:
        v = body["slow_factor"]
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise FaultError("slow_factor must be a number > 0 (1 is normal speed)")
        state.slow_factor = float(v)
    if "break_stream_after_tokens" in body:
        v = body["break_stream_after_tokens"]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise FaultError("break_stream_after_tokens must be a whole number >= 0, or null")
        state.break_stream_after_tokens = v
    return state


def token_ok(expected: str | None, header: str | None) -> bool:
    """Bearer-token check in constant time; no token configured means the admin API is off."""
    if not expected or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].encode(), expected.encode())
