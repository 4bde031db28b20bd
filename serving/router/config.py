"""The router's configuration: the fleet file's view of one region, plus the `router:` section.

The admin token comes from an environment variable or a file, never from a default: a router that
cannot find one refuses to start (`ConfigError`, exit 3 in the CLI).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpufleet.stacks.spec import Fleet, RouterSettings

MIN_TOKEN_CHARS = 16
# A token must not be one character repeated or a short pattern ("abababab..."): at least this many
# different characters. A random token passes: 16 random hex digits use fewer than 5 with
# probability 4e-7, 32 of them (openssl rand -hex 16) far less.
MIN_TOKEN_DISTINCT = 5


class ConfigError(Exception):
    """The router cannot run with this configuration (missing token, unknown region, ...)."""


@dataclass(frozen=True, slots=True)
class RegionInfo:
    key: str
    tier: str
    residency: str | None
    models: frozenset[str]
    cost_per_gpu_hour: float | None
    engines: tuple[str, ...]
    engines_dns: str | None
    router_url: str | None
    # (model catalog key, GPU catalog key, tensor-parallel size, max_model_len): the engine shape the
    # predicting policy's step times come from (serving/router/predict.py profile_for)
    shape: tuple[str, str, int, int | None] | None = None


@dataclass(frozen=True)
class RouterConfig:
    region: RegionInfo  # the one this router serves
    regions: dict[str, RegionInfo]  # every region of the fleet, this one included
    models: dict[str, int]  # served model name -> max_model_len (for /v1/models and 404s)
    settings: RouterSettings
    admin_token: str
    slo_ttft_ms: float
    slo_tpot_ms: float = 100.0
    # KV tokens of one engine of this region as the fleet sizes it (serving/sizing.py), for /scale
    # before any engine has reported its own; None when the model does not fit the region's GPU.
    engine_tokens_estimate: int | None = None
    # "regional" (as deployed: this region's engines, the other regions through their routers) or
    # "global" (one router over every region's engines, no peers: the baselines' best case, which
    # `gpufleet demo` and `gpufleet bench` compare the default against)
    reach: str = "regional"
    engine_regions: Mapping[str, str] = field(default_factory=dict)  # global reach: engine URL -> region

    @property
    def peers(self) -> list[RegionInfo]:
        if self.reach == "global":
            return []
        return [r for k, r in self.regions.items() if k != self.region.key and r.router_url]


def read_admin_token(settings: RouterSettings, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    token = env.get(settings.admin_token_env, "").strip()
    source = f"environment variable {settings.admin_token_env}"
    if not token and settings.admin_token_file:
        path = Path(settings.admin_token_file).expanduser()
        source = f"file {path}"
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the admin token file {path}: {exc.strerror or exc}") from None
    if not token:
        where = f"the environment variable {settings.admin_token_env}"
        if settings.admin_token_file:
            where += f" or the file {settings.admin_token_file}"
        raise ConfigError(
            f"no admin token: set {where} (router.admin_token_env / router.admin_token_file in the "
            "fleet file); the router has no default token"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the admin token from {source} is shorter than {MIN_TOKEN_CHARS} characters")
    if len(set(token)) < MIN_TOKEN_DISTINCT:
        raise ConfigError(
            f"the admin token from {source} has too little entropy: it uses {len(set(token))} different "
            f"characters, at least {MIN_TOKEN_DISTINCT} are needed (make one with: openssl rand -hex 32)"
        )
    return token


def region_info(fleet: Fleet, key: str) -> RegionInfo:
    r = fleet.region(key)
    model = fleet.model_for(r)
    cost = fleet.cost_per_hour_at_max(r)
    gpus = fleet.gpus_at_max(r)
    return RegionInfo(
        key=r.key,
        tier=r.capacity.tier.value,
        residency=r.residency,
        models=frozenset({model.name}),
        cost_per_gpu_hour=None if cost is None or not gpus else cost / gpus,
        engines=tuple(u.rstrip("/") for u in r.endpoints.engines),
        engines_dns=r.endpoints.engines_dns,
        router_url=r.endpoints.router.rstrip("/") if r.endpoints.router else None,
        shape=(model.catalog or model.name, r.gpu, model.tensor_parallel_size, model.max_model_len),
    )


def engine_tokens_estimate(fleet: Fleet, key: str) -> int | None:
    """KV tokens one engine of region `key` would have: the launcher's sizing (`sizing.fit_engine`)
    of the region's model on the catalog's GPU, shortening max_model_len if it must (the memory left
    for KV does not depend on it). None when the weights do not fit."""
    from gpufleet.serving.sizing import SizingError, fit_engine
    from gpufleet.stacks import catalog

    r = fleet.region(key)
    spec = fleet.model_for(r)
    gpu = catalog.gpu(r.gpu)
    try:
        plan = fit_engine(
            spec.shape,
            gpu.memory_bytes,
            gpu.name,
            tensor_parallel_size=spec.tensor_parallel_size,
            max_model_len=spec.max_model_len,
            kv_cache_dtype=spec.kv_cache_dtype,
            allow_fp8_kv_cache=spec.allow_fp8_kv_cache,
            allow_shorter_max_model_len=True,
        )
    except SizingError:
        return None
    return plan.kv_tokens


REACHES = ("regional", "global")


def build_config(
    fleet: Fleet, region_key: str, env: Mapping[str, str] | None = None, reach: str = "regional"
) -> RouterConfig:
    """The config of the router of `region_key`; under global reach, of one router over every
    region's engines (`region_key` names the region it runs in)."""
    if reach not in REACHES:
        raise ConfigError(f"reach {reach!r}: one of {', '.join(REACHES)}")
    try:
        fleet.region(region_key)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    regions = {r.key: region_info(fleet, r.key) for r in fleet.regions}
    here = regions[region_key]
    if not here.engines and not here.engines_dns:
        raise ConfigError(
            f"region {region_key!r} lists no engines: set regions[].endpoints.engines (URLs) "
            "or endpoints.engines_dns (host:port) in the fleet file"
        )
    engine_regions: dict[str, str] = {}
    if reach == "global":
        for info in regions.values():
            if info.engines_dns and not info.engines:
                raise ConfigError(
                    f"global reach needs every region's engine URLs; region {info.key!r} has only "
                    "endpoints.engines_dns"
                )
            engine_regions.update(dict.fromkeys(info.engines, info.key))
        here = replace(here, engines=tuple(engine_regions), engines_dns=None,
                       models=frozenset().union(*(r.models for r in regions.values())))  # fmt: skip
    served = {m.name: m.max_model_len for m in fleet.models if m.name in here.models}
    return RouterConfig(
        region=here,
        regions=regions,
        models=served,
        settings=fleet.router,
        admin_token=read_admin_token(fleet.router, env),
        slo_ttft_ms=fleet.slo.ttft_ms,
        slo_tpot_ms=fleet.slo.tpot_ms,
        engine_tokens_estimate=engine_tokens_estimate(fleet, region_key),
        reach=reach,
        engine_regions=engine_regions,
    )
