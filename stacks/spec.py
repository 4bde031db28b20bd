"""The fleet spec: one typed, validated description of the whole fleet (fleet.yaml).

Everything downstream (stacks, capacity, plan checks, the router, the simulator) reads a `Fleet`,
never raw YAML. Unknown keys are errors; catalog lookups (GPU types, models, instance types) happen
here so that a bad fleet file fails before anything is synthesized.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from enum import StrEnum
from typing import Annotated, Literal

from gpufleet.stacks import catalog
from gpufleet.stacks.catalog import Model as CatalogModel  # a field named `catalog` shadows the module in class scope
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NAME = r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$"


class _Strict(BaseModel):
    # strict: a YAML `true` is not an integer, `1.5` not an int, `"yes"` not a boolean (pydantic's
    # lax mode takes all three); numbers must be finite (`.inf`, `.nan`). Enum fields opt out
    # (Field(strict=False)): strict enums want an enum instance, and YAML gives the string.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True, allow_inf_nan=False)


class Cloud(StrEnum):
    aws = "aws"
    gcp = "gcp"
    azure = "azure"


class Tier(StrEnum):
    """Capacity tiers, cheapest-to-keep first in the router's preference."""

    reserved = "reserved"
    on_demand = "on-demand"
    spot = "spot"


TIER_PREFERENCE = {Tier.reserved: 0, Tier.on_demand: 1, Tier.spot: 2}


class ModelSpec(_Strict):
    """A model served by the fleet. Architecture numbers come from the catalog unless given."""

    name: str = Field(description="served model name, as clients send it in `model`")
    catalog: str | None = Field(None, description="catalog key, e.g. llama-3.1-8b")
    hf_id: str | None = None
    params_b: float | None = Field(None, gt=0)
    layers: int | None = Field(None, gt=0)
    kv_heads: int | None = Field(None, gt=0)
    head_dim: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    max_context: int | None = Field(None, gt=0)
    max_model_len: int = Field(8192, gt=0, le=1_048_576)
    tensor_parallel_size: int = Field(1, ge=1, le=8)
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    allow_fp8_kv_cache: bool = False
    gated: bool | None = Field(None, description="weights need a Hugging Face token (default: the catalog's)")

    @model_validator(mode="after")
    def _architecture_known(self) -> ModelSpec:
        if self.catalog is not None:
            catalog.model(self.catalog)  # raises CatalogError with suggestions
            return self
        missing = [f for f in ("params_b", "layers", "kv_heads", "head_dim") if getattr(self, f) is None]
        if missing:
            raise ValueError(
                f"model {self.name!r} needs either `catalog` (one of {', '.join(catalog.models())}) "
                f"or the architecture numbers; missing: {', '.join(missing)}"
            )
        return self

    @property
    def shape(self) -> CatalogModel:
        """The architecture as a catalog record (explicit numbers override the catalog's)."""
        if not self.catalog:
            # _architecture_known: without `catalog`, every architecture number is given
            assert self.params_b and self.layers and self.kv_heads and self.head_dim
            return CatalogModel(
                key=self.name,
                hf_id=self.hf_id or self.name,
                params_b=self.params_b,
                layers=self.layers,
                hidden_size=self.hidden_size or self.kv_heads * self.head_dim * 4,
                kv_heads=self.kv_heads,
                head_dim=self.head_dim,
                max_context=self.max_context or self.max_model_len,
                active_params_b=None,
                gated=self.gated if self.gated is not None else False,
            )
        base = catalog.model(self.catalog)
        return CatalogModel(
            key=self.catalog,
            hf_id=self.hf_id or base.hf_id,
            params_b=self.params_b or base.params_b,
            layers=self.layers or base.layers,
            hidden_size=self.hidden_size or base.hidden_size,
            kv_heads=self.kv_heads or base.kv_heads,
            head_dim=self.head_dim or base.head_dim,
            max_context=self.max_context or base.max_context,
            active_params_b=base.active_params_b,
            gated=self.gated if self.gated is not None else base.gated,
        )


class Slo(_Strict):
    ttft_ms: float = Field(2000, gt=0, description="time to first token, p99 target")
    tpot_ms: float = Field(100, gt=0, description="time per output token, p99 target")


class NodeRange(_Strict):
    min: int = Field(0, ge=0, le=1000)
    max: int = Field(ge=1, le=1000)

    @model_validator(mode="after")
    def _ordered(self) -> NodeRange:
        if self.min > self.max:
            raise ValueError(f"nodes.min ({self.min}) is greater than nodes.max ({self.max})")
        return self


class Capacity(_Strict):
    tier: Tier = Field(Tier.on_demand, strict=False)
    reservation_id: str | None = Field(None, description="reservation / capacity block id, for tier reserved")

    @model_validator(mode="after")
    def _reservation(self) -> Capacity:
        if self.tier is Tier.reserved and not self.reservation_id:
            raise ValueError("capacity tier 'reserved' needs a reservation_id")
        if self.tier is not Tier.reserved and self.reservation_id:
            raise ValueError(f"reservation_id is only allowed with tier 'reserved', not {self.tier.value!r}")
        return self


def check_http_url(url: str) -> str:
    """`url` if it is an http(s) URL with a host (and a valid port, if any); ValueError saying why not."""
    from urllib.parse import urlsplit

    example = "e.g. http://10.0.0.5:8000"
    if not url or any(c.isspace() for c in url):
        raise ValueError(f"{url!r} is not a URL ({example})")
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number in 0..65535
    except ValueError:
        raise ValueError(f"{url!r} is not a URL with a valid host and port ({example})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r} is not an http(s) URL ({example})")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host ({example})")
    if port == 0:
        raise ValueError(f"{url!r} has port 0 ({example})")
    return url


class Endpoints(_Strict):
    """Where the region's serving endpoints are, for the router (static URLs or DNS)."""

    engines: list[str] = Field(default_factory=list, description="engine base URLs, e.g. http://10.0.0.5:8000")
    engines_dns: str | None = Field(None, description="host:port whose A records are the engines")
    router: str | None = Field(None, description="base URL of the region's router, for peers")

    @field_validator("engines")
    @classmethod
    def _engine_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            check_http_url(url)
        return value

    @field_validator("engines_dns")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        # the router's resolve_engines reads it the same way: host, then the port after the last ':'
        if value is not None:
            host, _, port = value.rpartition(":")
            if not re.fullmatch(r"[A-Za-z0-9._-]+", host) or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{value!r} is not host:port, e.g. vllm-engines.gpufleet.svc.cluster.local:8000")
        return value

    @field_validator("router")
    @classmethod
    def _router_url(cls, value: str | None) -> str | None:
        return value if value is None else check_http_url(value)


class Region(_Strict):
    id: str | None = Field(None, pattern=_NAME, description="defaults to <cloud>-<region>")
    cloud: Cloud = Field(strict=False)
    region: str = Field(pattern=r"^[a-z0-9-]{2,40}$")
    zones: list[str] = Field(default_factory=list)
    gpu: str
    instance_type: str | None = None
    nodes: NodeRange
    capacity: Capacity = Capacity()
    residency: str | None = Field(None, pattern=r"^[a-z0-9-]{1,20}$", description="residency tag, e.g. eu")
    model: str | None = Field(None, description="served model name; defaults to the fleet's first model")
    endpoints: Endpoints = Endpoints()

    @field_validator("gpu")
    @classmethod
    def _gpu_known(cls, value: str) -> str:
        return catalog.gpu(value).key

    @model_validator(mode="after")
    def _sold_here(self) -> Region:
        if self.instance_type is None:
            catalog.default_instance(self.cloud.value, self.gpu)
        else:
            it = catalog.instance_type(self.cloud.value, self.instance_type)
            if it.gpu != self.gpu:
                raise ValueError(f"instance type {it.name} carries {it.gpu} GPUs, not {self.gpu}")
        for zone in self.zones:
            if self.cloud is Cloud.azure:
                if zone not in ("1", "2", "3"):
                    raise ValueError(f"Azure availability zones are '1', '2' or '3', not {zone!r}")
            elif not zone.startswith(self.region):
                raise ValueError(f"zone {zone!r} is not in region {self.region!r}")
        return self

    @property
    def key(self) -> str:
        return self.id or f"{self.cloud.value}-{self.region}"

    def instance(self, min_gpus: int = 1) -> catalog.InstanceType:
        if self.instance_type:
            return catalog.instance_type(self.cloud.value, self.instance_type)
        return catalog.default_instance(self.cloud.value, self.gpu, min_gpus)


class StateBackend(_Strict):
    backend: Literal["local", "s3", "gcs", "azurerm"] = "local"
    bucket: str | None = Field(None, description="s3 / gcs bucket")
    region: str | None = Field(None, description="s3 bucket region")
    prefix: str = "gpufleet"
    storage_account: str | None = None
    container: str | None = None
    resource_group: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> StateBackend:
        need = {
            "s3": ("bucket", "region"),
            "gcs": ("bucket",),
            "azurerm": ("storage_account", "container", "resource_group"),
        }.get(self.backend, ())
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"state backend {self.backend!r} needs {', '.join(missing)}")
        return self


class Dns(_Strict):
    zone: str = Field(pattern=r"^([a-z0-9-]+\.)+[a-z]{2,}$", description="Route53 hosted zone, e.g. example.com")
    record: str = Field(description="the fleet's global name, e.g. llm.example.com")

    @model_validator(mode="after")
    def _in_zone(self) -> Dns:
        if not (self.record == self.zone or self.record.endswith("." + self.zone)):
            raise ValueError(f"dns.record {self.record!r} is not inside zone {self.zone!r}")
        return self


class RouterSettings(_Strict):
    scrape_interval_s: float = Field(1.0, ge=0.1, le=60)
    scrape_timeout_s: float = Field(0.5, gt=0, le=30)
    stale_after_s: float = Field(3.0, gt=0, le=300, description="older engine data counts as full")
    connect_timeout_s: float = Field(1.0, gt=0, le=60)
    request_timeout_s: float = Field(600, gt=0, le=3600)
    retry_budget: int = Field(2, ge=0, le=10, description="extra attempts before the first byte")
    queue_max: int = Field(256, ge=0, le=100_000)
    queue_wait_s: float = Field(2.0, ge=0, le=300)
    dns_refresh_s: float = Field(10.0, gt=0, le=3600)
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    admin_token_env: str = "GPUFLEET_ADMIN_TOKEN"
    admin_token_file: str | None = None
    idle_timeout_s: float = Field(30.0, gt=0, le=3600, description="engine silence that counts as broken")
    breaker_failures: int = Field(3, ge=1, le=100, description="consecutive failures that open a breaker")
    breaker_cooldown_s: float = Field(5.0, gt=0, le=3600, description="an open breaker probes after this")
    tls_cert_file: str | None = Field(None, description="PEM certificate chain; with tls_key_file, HTTPS on tls_port")
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file")
    tls_port: int = Field(8443, ge=1, le=65535, description="HTTPS port, beside the plain --port")
    # serving/router/policies POLICIES; "default" is what the router ships (policies.DEFAULT_POLICY)
    policy: Literal[
        "default", "predictive", "headroom", "round-robin", "least-outstanding", "power-of-two",
        "prefix-affinity", "llm-d", "instance-aware", "kv-cost",
    ] = "default"
    pace_fraction: float = Field(
        0.8,
        gt=0,
        le=2,
        description="an engine whose recent inter-token latency exceeds this fraction of slo.tpot_ms "
        "takes new requests only as a last resort (headroom policy)",
    )
    time_scale: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="engine seconds per wall second: 1 for real engines; gpufleet bench and demo set it for "
        "emulated engines that run faster than real time (the TTFT slack of late binding is engine time)",
    )
    late_binding: bool = Field(
        True,
        description="the predictive policy holds a request at the router while no engine can start its "
        "prefill in its next step, and refuses it (429) once it can no longer meet slo.ttft_ms "
        "(docs/router.md, Late binding)",
    )


# A registry host is the first path component when it has a dot or a port, or is localhost
# (the rule Docker and containerd use to tell `registry/repo` from a Docker Hub `user/repo`).
_IMAGE = re.compile(r"^(?P<registry>[a-z0-9.-]+(:[0-9]+)?)/[a-z0-9._/-]+(:[\w.-]+)?(@sha256:[0-9a-f]{64})?$")


def image_registry(ref: str) -> str | None:
    """The registry host of an image reference, or None when it would resolve to Docker Hub."""
    first = ref.split("/", 1)[0] if "/" in ref else ""
    if first and ("." in first or ":" in first or first == "localhost"):
        return first
    return None


class ServingSettings(_Strict):
    """What runs on the clusters: the serving image and where the model's download token comes from."""

    image: str | None = Field(
        None,
        description="serving image in a registry the clusters can pull from, digest recommended "
        "(e.g. ghcr.io/acme/gpufleet-serving:0.1.0@sha256:...); `gpufleet synth --image` overrides it",
    )
    hf_token: Literal["variable", "existing-secret", "none"] = Field(
        "variable",
        description="variable: the serving stacks take a sensitive Terraform variable hf_token and create "
        "the Secret; existing-secret: the operator creates it (e.g. from a secret store); none: public models",
    )
    hf_secret_name: str = Field("huggingface", pattern=r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")

    @field_validator("image")
    @classmethod
    def _in_a_registry(cls, value: str | None) -> str | None:
        if value is not None:
            check_image(value)
        return value


def check_image(ref: str) -> str:
    """`ref` if it names an image in a registry; ValueError saying why not otherwise."""
    if image_registry(ref) is None:
        raise ValueError(
            f"image {ref!r} names no registry, so the clusters would pull docker.io/{ref}; "
            "push serving/Dockerfile's image to your registry and name it, e.g. ghcr.io/acme/gpufleet-serving:0.1.0"
        )
    if not _IMAGE.match(ref):
        raise ValueError(f"image {ref!r} is not a registry image reference (registry/repository[:tag][@sha256:...])")
    return ref


class Access(_Strict):
    """Who, beside the identity that runs Terraform, administers the clusters."""

    aws_admin_role_arns: list[str] = Field(
        default_factory=list,
        description="existing IAM roles given EKS cluster-admin access entries; not the role that runs "
        "Terraform (it has its creator entry already, and EKS refuses a second one with 409)",
    )
    azure_admin_principal_ids: list[str] = Field(
        default_factory=list,
        description="Entra ID object ids given 'Azure Kubernetes Service RBAC Cluster Admin' on each AKS cluster",
    )

    @field_validator("aws_admin_role_arns")
    @classmethod
    def _arns(cls, value: list[str]) -> list[str]:
        for arn in value:
            if not re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", arn):
                raise ValueError(f"{arn!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
        return value

    @field_validator("azure_admin_principal_ids")
    @classmethod
    def _object_ids(cls, value: list[str]) -> list[str]:
        for oid in value:
            if not re.fullmatch(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}", oid):
                raise ValueError(f"{oid!r} is not an Entra ID object id (a GUID)")
        return value


class Tls(_Strict):
    """Certificates for the routers' public names (cert-manager, ACME DNS-01 in the Route53 zone)."""

    acme_email: str | None = Field(None, pattern=r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$")
    acme_server: str = Field("https://acme-v02.api.letsencrypt.org/directory", pattern=r"^https://")


class Settings(_Strict):
    state: StateBackend = StateBackend()
    dns: Dns | None = None
    access: Access = Access()
    tls: Tls = Tls()
    tags: dict[str, str] = Field(default_factory=dict)
    budget_per_hour: float | None = Field(None, gt=0, description="USD per hour at max nodes")
    api_allowed_cidrs: list[str] = Field(
        default_factory=lambda: ["10.0.0.0/8"], description="CIDRs allowed to reach the Kubernetes API"
    )
    kubernetes_version: str | None = Field(
        None,
        pattern=r"^1\.\d{2}$",
        description="Kubernetes minor for every cluster; default: the newest all three clouds support today",
    )

    @field_validator("api_allowed_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            net = ipaddress.ip_network(cidr, strict=False)  # ValueError names the bad one
            if net.prefixlen == 0:
                raise ValueError(f"{cidr} opens the Kubernetes API to the whole internet")
        return value

    @field_validator("tags")
    @classmethod
    def _tag_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", key):
                raise ValueError(f"tag key {key!r} must be lower case letters, digits, '-' or '_'")
        return value


class Fleet(_Strict):
    fleet: str = Field(pattern=_NAME, description="fleet name, lower case, used in resource names")
    models: Annotated[list[ModelSpec], Field(min_length=1)]
    slo: Slo = Slo()
    regions: Annotated[list[Region], Field(min_length=1)]
    settings: Settings = Settings()
    serving: ServingSettings = ServingSettings()
    router: RouterSettings = RouterSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Fleet:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names repeat: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
        seen: dict[tuple[str, str], int] = {}
        keys: set[str] = set()
        for i, r in enumerate(self.regions):
            where = (r.cloud.value, r.region)
            if where in seen:
                raise ValueError(f"regions[{i}] repeats {r.cloud.value} {r.region} (first at regions[{seen[where]}])")
            seen[where] = i
            if r.key in keys:
                raise ValueError(f"regions[{i}] repeats the region id {r.key!r}")
            keys.add(r.key)
            if r.model is not None and r.model not in names:
                raise ValueError(f"regions[{i}].model {r.model!r} is not one of the fleet's models: {', '.join(names)}")
            model = self.model_for(r)
            need = model.tensor_parallel_size
            it = r.instance(need)
            if it.gpus < need:
                raise ValueError(
                    f"regions[{i}] instance type {it.name} has {it.gpus} GPUs; "
                    f"model {model.name!r} needs tensor_parallel_size {need}"
                )
        today = datetime.date.today()
        version = self.kubernetes_version
        for cloud in sorted({r.cloud.value for r in self.regions}):
            problem = catalog.kubernetes_support(cloud, version, today)
            if problem:
                raise ValueError(f"settings.kubernetes_version {version}: {problem}")
        for m in self.models:
            if m.shape.gated and self.serving.hf_token == "none":
                raise ValueError(
                    f"model {m.name!r} ({m.shape.hf_id}) is gated on Hugging Face: its weights download only "
                    "with a token; set serving.hf_token to 'variable' or 'existing-secret'"
                )
        return self

    @property
    def kubernetes_version(self) -> str:
        """The fleet's Kubernetes minor: the one it names, else the newest its clouds all support today."""
        if self.settings.kubernetes_version:
            return self.settings.kubernetes_version
        return catalog.default_kubernetes_version(datetime.date.today())

    def model_for(self, region: Region) -> ModelSpec:
        name = region.model or self.models[0].name
        return next(m for m in self.models if m.name == name)

    def region(self, key: str) -> Region:
        for r in self.regions:
            if r.key == key:
                return r
        raise KeyError(f"no region {key!r} in fleet {self.fleet!r}; regions: {', '.join(r.key for r in self.regions)}")

    def gpus_at_max(self, region: Region) -> int:
        return region.nodes.max * region.instance(self.model_for(region).tensor_parallel_size).gpus

    def cost_per_hour_at_max(self, region: Region) -> float | None:
        it = region.instance(self.model_for(region).tensor_parallel_size)
        p = catalog.price(region.cloud.value, region.region, it.name)
        return None if p is None else p * region.nodes.max
