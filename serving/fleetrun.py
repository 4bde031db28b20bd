"""A whole fleet on loopback: emulated engines per region and each region's router, as subprocesses.

Used by `gpufleet demo` and `gpufleet bench`. From a fleet file it takes the chosen regions (their
GPU types and model), starts `engines_per_region` engine emulators for each (`gpufleet engine
emulate`, time-scaled) and one router per region (`gpufleet router serve`) with the other regions as
peers (or, under global reach, one router over every engine), through a derived fleet file whose
endpoints point at loopback and whose router timings are divided by the time scale (so a scrape
interval of 1 s of engine time stays 1 s of engine time).

Every process runs in its own process group under a `Supervisor`: killed on close, at exit, on
SIGTERM/SIGHUP, and by the caller's `with` block on Ctrl-C. Nothing is left behind.
"""

from __future__ import annotations

import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from gpufleet.serving.procs import Supervisor, free_port, python_argv

if TYPE_CHECKING:  # the spec pulls in pydantic; the fleet arrives already parsed
    from gpufleet.stacks.spec import Fleet

TOKEN_ENV = "GPUFLEET_ADMIN_TOKEN"
# An emulated engine whose steps started late for more than this share of its stepping did not keep
# up with the time scale on this machine (`LocalFleet.stalled_share`).
STALL_WARN = 0.05
MAX_METRICS_READ = 4 * 1024 * 1024


class FleetRunError(RuntimeError):
    """The local fleet could not start; the message names the process and points at its log."""


@dataclass
class LocalRegion:
    key: str
    gpu: str
    cloud: str
    engine_ports: list[int]
    router_port: int

    @property
    def engine_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.engine_ports]

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"


@dataclass
class LocalFleet:
    """Start with `with LocalFleet(...) as lf:`; `lf.kill_region(key)` / `lf.restore_region(key)`."""

    fleet: Fleet
    regions: Sequence[str]
    workdir: Path
    engines_per_region: int = 2
    time_scale: float = 1.0
    policy: str = "headroom"
    num_gpu_blocks: dict[str, int] = field(default_factory=dict)  # region key -> override (small engines)
    max_num_seqs: int | None = None
    start_routers: bool = True
    # regional: a router per region, the others its peers (as deployed); global: ONE router over
    # every region's engines (the baselines' best case), which every client region's requests reach
    reach: str = "regional"
    local: dict[str, LocalRegion] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_hex(16))

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.sup = Supervisor(log_dir=self.workdir / "logs")
        known = {r.key for r in self.fleet.regions}
        missing = [k for k in self.regions if k not in known]
        if missing:
            known_list = ", ".join(sorted(known))
            raise FleetRunError(f"region {missing[0]!r} is not in the fleet; known: {known_list}")
        for key in self.regions:
            r = self.fleet.region(key)
            self.local[key] = LocalRegion(
                key=key,
                gpu=r.gpu,
                cloud=r.cloud.value,
                engine_ports=[free_port() for _ in range(self.engines_per_region)],
                router_port=free_port(),
            )
        self.fleet_path = self.workdir / "fleet.local.yaml"
        if self.reach not in ("regional", "global"):
            raise FleetRunError(f"reach {self.reach!r}: regional or global")
        self.global_port = free_port() if self.reach == "global" else None

    # -- the derived fleet file -------------------------------------------------------------------

    def derived_fleet(self) -> dict:
        data = self.fleet.model_dump(mode="json", by_alias=True, exclude_none=True)
        data["regions"] = []
        for r in self.fleet.regions:
            if r.key not in self.local:
                continue
            d = r.model_dump(mode="json", by_alias=True, exclude_none=True)
            lr = self.local[r.key]
            d["endpoints"] = {"engines": lr.engine_urls, "router": lr.router_url}
            data["regions"].append(d)
        ts = self.time_scale
        s = self.fleet.router
        # Timings in engine seconds become wall seconds / time_scale (the scrape floor is 0.1 s).
        data["router"] = {
            **data.get("router", {}),
            "policy": self.policy,
            "scrape_interval_s": max(0.1, s.scrape_interval_s / ts),
            "scrape_timeout_s": max(0.05, min(s.scrape_timeout_s, s.scrape_interval_s / ts)),
            "stale_after_s": max(0.3, s.stale_after_s / ts),
            "queue_wait_s": s.queue_wait_s / ts,
            "breaker_cooldown_s": max(0.1, s.breaker_cooldown_s / ts),
            "idle_timeout_s": max(2.0, s.idle_timeout_s / ts),
            "time_scale": ts,
            "admin_token_env": TOKEN_ENV,
        }
        data["router"].pop("admin_token_file", None)
        return data

    # -- lifecycle --------------------------------------------------------------------------------

    def _engine_argv(self, key: str, port: int) -> list[str]:
        r = self.fleet.region(key)
        model = self.fleet.model_for(r)
        argv = python_argv(
            "engine", "emulate",
            "--model", model.catalog or model.name,
            "--gpu", r.gpu,
            "--tp", str(model.tensor_parallel_size),
            "--max-model-len", str(model.max_model_len),
            "--served-model-name", model.name,
            "--port", str(port),
            "--time-scale", f"{self.time_scale:g}",
        )  # fmt: skip
        if key in self.num_gpu_blocks:
            argv += ["--num-gpu-blocks", str(self.num_gpu_blocks[key])]
        if self.max_num_seqs:
            argv += ["--max-num-seqs", str(self.max_num_seqs)]
        return argv

    def start(self, timeout_s: float = 90.0) -> None:
        from gpufleet.stacks.fleetfile import FleetFileError, load_fleet

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.fleet_path.write_text(yaml.safe_dump(self.derived_fleet(), sort_keys=False), encoding="utf-8")
        try:
            load_fleet(self.fleet_path)  # the routers will read it: fail here, with the reason, if bad
        except FleetFileError as exc:
            raise FleetRunError(f"derived fleet file {self.fleet_path} is invalid: {exc}") from None
        for key, lr in self.local.items():
            for i, port in enumerate(lr.engine_ports):
                self.sup.start(f"engine-{key}-{i}", self._engine_argv(key, port))
        for name, argv in self._router_argvs():
            self.sup.start(name, argv, env={TOKEN_ENV: self.token})
        deadline = time.monotonic() + timeout_s
        for key, lr in self.local.items():
            for i, url in enumerate(lr.engine_urls):
                self._wait(f"engine-{key}-{i}", url + "/health", deadline)
        if self.start_routers:
            for name, url in self._router_names().items():
                self._wait(name, url + "/v1/models", deadline)

    def _router_names(self) -> dict[str, str]:
        """Supervisor name -> URL of each router this fleet runs."""
        if not self.start_routers:
            return {}
        if self.global_port is not None:
            return {"router-global": f"http://127.0.0.1:{self.global_port}"}
        return {f"router-{key}": lr.router_url for key, lr in self.local.items()}

    def _router_argvs(self) -> list[tuple[str, list[str]]]:
        if not self.start_routers:
            return []
        if self.global_port is not None:
            home = next(iter(self.local))  # where the one router runs: every engine is its own
            return [("router-global", python_argv("router", "serve", "--fleet", str(self.fleet_path),
                                                  "--region", home, "--reach", "global",
                                                  "--port", str(self.global_port)))]  # fmt: skip
        return [
            (f"router-{key}", python_argv("router", "serve", "--fleet", str(self.fleet_path), "--region", key,
                                          "--port", str(lr.router_port)))  # fmt: skip
            for key, lr in self.local.items()
        ]

    def _wait(self, name: str, url: str, deadline: float) -> None:
        child = self.sup.children[name]
        while True:
            if not child.alive():
                raise FleetRunError(f"{name} exited with code {child.proc.returncode}; see {child.log}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    if resp.status < 500:
                        return
            except (urllib.error.URLError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise FleetRunError(f"{name} did not answer {url} in time; see {child.log}")
            time.sleep(0.1)

    def kill_region(self, key: str) -> None:
        """SIGKILL the region's engines (their router stays up): a region losing its GPUs."""
        for i in range(len(self.local[key].engine_ports)):
            self.sup.kill(f"engine-{key}-{i}")

    def restore_region(self, key: str, wait: bool = True, timeout_s: float = 60.0) -> None:
        """Start the region's engines again on the same ports (empty caches, like a fresh pod)."""
        lr = self.local[key]
        for i, port in enumerate(lr.engine_ports):
            self.sup.start(f"engine-{key}-{i}", self._engine_argv(key, port))
        if wait:
            deadline = time.monotonic() + timeout_s
            for i, url in enumerate(lr.engine_urls):
                self._wait(f"engine-{key}-{i}", url + "/health", deadline)

    def pids(self) -> list[int]:
        return self.sup.pids()

    def close(self) -> None:
        self.sup.close()

    def __enter__(self) -> LocalFleet:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def router_urls(self) -> dict[str, str]:
        """Client region -> the router its requests reach (under global reach, the one router)."""
        if self.global_port is not None:
            return {k: f"http://127.0.0.1:{self.global_port}" for k in self.local}
        return {k: lr.router_url for k, lr in self.local.items()}

    @property
    def engine_urls(self) -> dict[str, list[str]]:
        return {k: lr.engine_urls for k, lr in self.local.items()}

    def stalled_share(self) -> float | None:
        """The share of the emulated engines' stepping that started late because their processes
        fell behind (`EmulatorServer.stalled_s`): above STALL_WARN the machine did not keep up with
        the time scale, and latency figures measure the machine, not the routing. None when no
        engine answers."""
        from gpufleet.serving.engine.server import STALL_METRICS

        busy = stalled = 0.0
        answered = False
        for urls in self.engine_urls.values():
            for url in urls:
                try:
                    with urllib.request.urlopen(url + "/metrics", timeout=2.0) as resp:
                        text = resp.read(MAX_METRICS_READ).decode("utf-8", "replace")
                except (OSError, urllib.error.URLError):
                    continue
                for line in text.splitlines():
                    name, _, value = line.partition(" ")
                    if name in STALL_METRICS:
                        answered = True
                        try:
                            amount = float(value)
                        except ValueError:
                            continue
                        if name == STALL_METRICS[0]:
                            busy += amount
                        else:
                            stalled += amount
        if not answered:
            return None
        return stalled / (busy + stalled) if busy + stalled > 0 else 0.0


def stall_warning(share: float | None) -> str | None:
    """A line for reports and consoles when emulated engines fell behind their model."""
    if share is None or share <= STALL_WARN:
        return None
    return (
        f"emulated engines stalled {100 * share:.0f}% of their stepping (the machine fell behind the "
        f"time scale): latency figures of this run measure the machine"
    )
