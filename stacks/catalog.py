"""The data-driven catalog: GPU shapes, what each cloud sells, quota units, prices, model shapes.

The facts live in YAML files beside this module (`catalog/*.yaml`); this module only loads them
into typed, frozen records. It imports nothing heavy, so the router and the CLI can use it freely.
"""

from __future__ import annotations

import datetime
import difflib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import yaml

CLOUDS = ("aws", "gcp", "azure")
GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    memory_gib: float
    hbm_tb_s: float
    bf16_tflops: float
    aliases: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


@dataclass(frozen=True)
class InstanceType:
    cloud: str
    name: str
    gpu: str
    gpus: int
    vcpus: int
    quota: dict[str, str] = field(default_factory=dict)  # AWS: tier -> service-quotas code
    accelerator: str | None = None  # GCP accelerator type
    family: str | None = None  # Azure quota family

    @property
    def vcpus_per_gpu(self) -> float:
        return self.vcpus / self.gpus


@dataclass(frozen=True)
class Model:
    key: str
    hf_id: str
    params_b: float
    layers: int
    hidden_size: int
    kv_heads: int
    head_dim: int
    max_context: int
    active_params_b: float | None = None
    gated: bool = False  # the weights download only with a Hugging Face token of an account with access

    def kv_bytes_per_token(self, dtype_bytes: int = 2, tensor_parallel: int = 1) -> int:
        """KV bytes one token occupies on ONE tensor-parallel shard (FACTS.md section 1)."""
        heads_per_shard = max(1, self.kv_heads // tensor_parallel)
        return 2 * self.layers * heads_per_shard * self.head_dim * dtype_bytes

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        # round, not int: 8.03 * 1e9 is 8029999999.999999 in floating point
        return round(self.params_b * 1e9) * dtype_bytes

    @property
    def flops_per_token(self) -> float:
        """Forward-pass FLOPs per token, 2 x active parameters (the usual dense estimate)."""
        return 2 * (self.active_params_b or self.params_b) * 1e9


@dataclass(frozen=True)
class PriceTable:
    cloud: str
    source: str
    as_of: str
    per_region: dict[str, dict[str, float]]

    def price(self, region: str, instance_type: str) -> float | None:
        return self.per_region.get(region, {}).get(instance_type)


class CatalogError(ValueError):
    """A key the catalog does not know; the message suggests the near matches."""


def _load(name: str) -> dict[str, Any]:
    text = resources.files("gpufleet.stacks").joinpath("catalog", name).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _suggest(word: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(word, choices, n=3, cutoff=0.4)
    if near:
        return "did you mean " + " or ".join(repr(n) for n in near) + "?"
    return "known: " + ", ".join(sorted(choices))


@cache
def gpus() -> dict[str, Gpu]:
    raw = _load("gpus.yaml")["gpus"]
    return {key: Gpu(key=key, aliases=tuple(v.pop("aliases", ())), **v) for key, v in raw.items()}


def gpu(key: str) -> Gpu:
    """A GPU by catalog key or alias (case-insensitive)."""
    table = gpus()
    if key in table:
        return table[key]
    folded = key.casefold()
    for g in table.values():
        if folded == g.key.casefold() or folded in (a.casefold() for a in g.aliases):
            return g
    raise CatalogError(f"unknown GPU type {key!r}: {_suggest(key, list(table))}")


@cache
def _clouds() -> dict[str, Any]:
    return _load("clouds.yaml")


def cloud_info(cloud: str) -> dict[str, Any]:
    """The raw per-cloud facts (quota unit, quota names or metrics, ...)."""
    if cloud not in CLOUDS:
        raise CatalogError(f"unknown cloud {cloud!r}: {_suggest(cloud, list(CLOUDS))}")
    return _clouds()[cloud]


@cache
def instance_types(cloud: str) -> dict[str, InstanceType]:
    raw = cloud_info(cloud)["instances"]
    return {name: InstanceType(cloud=cloud, name=name, **v) for name, v in raw.items()}


def instance_type(cloud: str, name: str) -> InstanceType:
    table = instance_types(cloud)
    if name not in table:
        raise CatalogError(f"{cloud} instance type {name!r} is not in the catalog: {_suggest(name, list(table))}")
    return table[name]


def instances_for_gpu(cloud: str, gpu_key: str) -> list[InstanceType]:
    """The cloud's instance types carrying this GPU, fewest GPUs first."""
    key = gpu(gpu_key).key
    found = [it for it in instance_types(cloud).values() if it.gpu == key]
    return sorted(found, key=lambda it: (it.gpus, it.name))


def clouds_selling(gpu_key: str) -> list[str]:
    return [c for c in CLOUDS if instances_for_gpu(c, gpu_key)]


def default_instance(cloud: str, gpu_key: str, min_gpus: int = 1) -> InstanceType:
    """The smallest instance type with the GPU and at least `min_gpus` of them."""
    offered = instances_for_gpu(cloud, gpu_key)
    if not offered:
        sellers = clouds_selling(gpu_key)
        where = f"; it is sold on {', '.join(sellers)}" if sellers else ""
        alternatives = sorted({it.gpu for it in instance_types(cloud).values()})
        raise CatalogError(
            f"{cloud} does not sell {gpu(gpu_key).key} GPUs{where}; {cloud} sells {', '.join(alternatives)}"
        )
    for it in offered:
        if it.gpus >= min_gpus:
            return it
    raise CatalogError(
        f"no {cloud} instance type has {min_gpus} x {gpu(gpu_key).key}; the largest has {offered[-1].gpus}"
    )


@cache
def models() -> dict[str, Model]:
    raw = _load("models.yaml")["models"]
    return {key: Model(key=key, **v) for key, v in raw.items()}


def model(key: str) -> Model:
    table = models()
    if key in table:
        return table[key]
    for m in table.values():
        if key.casefold() in (m.key.casefold(), m.hf_id.casefold()):
            return m
    raise CatalogError(f"unknown model {key!r}: {_suggest(key, list(table))}")


@cache
def prices() -> dict[str, PriceTable]:
    raw = _load("prices.yaml")["prices"]
    return {
        cloud: PriceTable(cloud=cloud, source=v["source"], as_of=str(v["as_of"]), per_region=v["regions"])
        for cloud, v in raw.items()
    }


def price(cloud: str, region: str, instance_name: str) -> float | None:
    """On-demand USD per node-hour, or None where the catalog has no figure."""
    table = prices().get(cloud)
    return table.price(region, instance_name) if table else None


@dataclass(frozen=True)
class KubernetesVersion:
    service: str  # eks, gke, aks
    version: str  # minor, e.g. "1.35"
    released: datetime.date
    end_of_support: datetime.date  # last day of standard support


def _minor(version: str) -> str:
    """"1.35.2" -> "1.35" (the catalog and the clouds' support calendars speak in minors)."""
    parts = str(version).split(".")
    return ".".join(parts[:2])


@cache
def _kubernetes() -> dict[str, Any]:
    return _load("kubernetes.yaml")


def kubernetes_service(cloud: str) -> str:
    return cloud_info(cloud)["kubernetes"]


def kubernetes_versions(cloud: str) -> dict[str, KubernetesVersion]:
    """The minors the cloud's managed Kubernetes creates clusters with, oldest first."""
    service = kubernetes_service(cloud)
    raw = _kubernetes()[service]["versions"]
    table = {
        v: KubernetesVersion(service, v, d["released"], d["end_of_support"]) for v, d in raw.items()
    }
    return dict(sorted(table.items(), key=lambda kv: tuple(int(x) for x in kv[0].split("."))))


def kubernetes_source(cloud: str) -> str:
    return _kubernetes()[kubernetes_service(cloud)]["source"]


def kubernetes_support(cloud: str, version: str, today: datetime.date) -> str | None:
    """None when `cloud` supports `version` on `today`; else what is wrong, for a message."""
    service = kubernetes_service(cloud).upper()
    table = kubernetes_versions(cloud)
    minor = _minor(version)
    known = ", ".join(v for v, kv in table.items() if kv.released <= today <= kv.end_of_support)
    entry = table.get(minor)
    if entry is None:
        return f"{service} does not offer Kubernetes {minor} (supported on {today}: {known or 'none known'})"
    if today > entry.end_of_support:
        return (
            f"Kubernetes {minor} left {service} standard support on {entry.end_of_support} "
            f"(supported on {today}: {known})"
        )
    if today < entry.released:
        return f"{service} releases Kubernetes {minor} only on {entry.released}"
    return None


def default_kubernetes_version(today: datetime.date, clouds: tuple[str, ...] = CLOUDS) -> str:
    """The newest minor every cloud in `clouds` supports on `today`."""
    common: set[str] | None = None
    for cloud in clouds:
        ok = {v for v in kubernetes_versions(cloud) if kubernetes_support(cloud, v, today) is None}
        common = ok if common is None else common & ok
    if not common:
        raise CatalogError(
            f"no Kubernetes version is supported by {', '.join(clouds)} on {today}: "
            "stacks/catalog/kubernetes.yaml needs newer versions"
        )
    return max(common, key=lambda v: tuple(int(x) for x in v.split(".")))
