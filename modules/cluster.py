"""The shared interface of the GPU cluster constructs: what goes in (props), what comes out (outputs).

One construct per cloud (`aws_cluster.AwsGpuCluster`, `gcp_cluster.GcpGpuCluster`,
`azure_cluster.AzureGpuCluster`) builds the same thing: a private network across the region's zones
with NAT, a managed Kubernetes cluster with a small non-GPU system pool, and one or more GPU pools
that scale to zero, carry the `nvidia.com/gpu` NoSchedule taint and advertise GPUs to Kubernetes.

This module imports no cdktn at top level, so the serving stacks and the CLI can read the constants
(taint, labels) without paying for jsii.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from cdktn import TerraformProvider
    from constructs import Construct
    from gpufleet.stacks.spec import Fleet, Region

# The taint every GPU pool carries (FACTS.md section 2); serving pods tolerate it.
GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_TAINT_VALUE = "present"
GPU_TAINT_EFFECT = "NoSchedule"  # Kubernetes spelling; EKS and GKE spell it NO_SCHEDULE
GPU_RESOURCE = "nvidia.com/gpu"

# Labels on GPU nodes, so serving pods can select the pool (and the router can tell tiers apart).
LABEL_GPU = "gpufleet.io/gpu"
LABEL_POOL = "gpufleet.io/pool"
LABEL_TIER = "gpufleet.io/capacity-tier"
LABEL_GPU_COUNT = "gpufleet.io/gpu-count"
LABEL_GPU_PRESENT = "nvidia.com/gpu.present"

CloudName = Literal["aws", "gcp", "azure"]


@dataclass(frozen=True)
class GpuPoolProps:
    """One GPU node pool: a catalog instance type, its GPU count, node range and capacity tier."""

    name: str
    instance_type: str
    gpu: str  # catalog key, e.g. H100-80GB
    gpus_per_node: int
    min_nodes: int
    max_nodes: int
    tier: Literal["on-demand", "spot", "reserved"] = "on-demand"
    reservation_id: str | None = None
    accelerator: str | None = None  # GCP accelerator type, e.g. nvidia-h100-80gb
    disk_gib: int = 200  # model weights and the image live on the node's disk

    @property
    def labels(self) -> dict[str, str]:
        return gpu_labels(self)

    @property
    def taint(self) -> str:
        return f"{GPU_TAINT_KEY}={GPU_TAINT_VALUE}:{GPU_TAINT_EFFECT}"

    @property
    def reservation(self) -> str:
        """The reservation id of a reserved pool (the fleet spec requires one for tier reserved)."""
        if not self.reservation_id:
            raise ValueError(f"GPU pool {self.name}: tier {self.tier!r} needs a reservation_id")
        return self.reservation_id


@dataclass(frozen=True)
class ClusterProps:
    """What every cloud's cluster construct takes."""

    cloud: CloudName
    name: str  # the cluster's name, unique per cloud account/project/subscription
    region: str
    zones: tuple[str, ...]
    kubernetes_version: str
    api_allowed_cidrs: tuple[str, ...]
    gpu_pools: tuple[GpuPoolProps, ...]
    tags: Mapping[str, str] = field(default_factory=dict)
    network_cidr: str = "10.0.0.0/16"
    system_nodes: int = 2
    system_instance_type: str | None = None  # None: the cloud module's default
    project: str | None = None  # GCP only: the project (a Terraform variable's token in the app)
    # Who administers the cluster beside the identity running Terraform: IAM role ARNs (AWS access
    # entries) or Entra ID object ids (Azure RBAC); GCP grants through project IAM, outside the stack.
    admin_principals: tuple[str, ...] = ()
    router_port: int = 443  # where the router's public load balancer listens (Azure's NSG must allow it)

    def __post_init__(self) -> None:
        if not self.gpu_pools:
            raise ValueError(f"cluster {self.name}: at least one GPU pool is needed")
        for cidr in self.api_allowed_cidrs:
            if cidr.endswith("/0"):
                raise ValueError(f"cluster {self.name}: {cidr} would open the Kubernetes API to everyone")
        if not self.api_allowed_cidrs:
            raise ValueError(f"cluster {self.name}: api_allowed_cidrs is empty; the API would be unreachable")


@dataclass(frozen=True)
class ClusterOutputs:
    """What a cluster gives the rest of the app (the serving stacks, kubeconfig writers).

    Values are cdktn token strings inside the app (resolved by Terraform at apply); reading them from
    another stack makes cdktn wire an output and a remote-state data source between the stacks.
    """

    cloud: CloudName
    cluster_name: str
    endpoint: str  # https URL (AWS, Azure) or host/IP (GCP: prefix with https://)
    cluster_ca_certificate: str  # base64-encoded PEM, as each cloud returns it
    system_pool_name: str
    gpu_pool_names: tuple[str, ...]
    region: str | None = None  # AWS: for `aws eks get-token --region`
    project: str | None = None  # GCP
    location: str | None = None  # GCP: the cluster's region; Azure: the resource group's location
    resource_group_name: str | None = None  # Azure

    @property
    def node_pool_names(self) -> tuple[str, ...]:
        return (self.system_pool_name, *self.gpu_pool_names)

    def kubeconfig_fields(self) -> dict[str, str]:
        """The non-empty fields a kubeconfig (or a kubernetes provider block) needs, by name."""
        names = (
            "cluster_name",
            "endpoint",
            "cluster_ca_certificate",
            "region",
            "project",
            "location",
            "resource_group_name",
        )
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def gpu_labels(pool: GpuPoolProps) -> dict[str, str]:
    return {
        LABEL_GPU: pool.gpu,
        LABEL_POOL: pool.name,
        LABEL_TIER: pool.tier,
        LABEL_GPU_COUNT: str(pool.gpus_per_node),
        LABEL_GPU_PRESENT: "true",
    }


def short_name(base: str, limit: int) -> str:
    """`base` if it fits in `limit` characters, else a truncation with a stable hash suffix.

    Clouds limit names differently (GKE clusters 40, GCP service accounts 30, AKS 63); the hash keeps
    two long fleet/region names from colliding after truncation.
    """
    base = re.sub(r"[^a-z0-9-]", "-", base.lower()).strip("-")
    if len(base) <= limit:
        return base
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    return f"{base[: limit - 7].rstrip('-')}-{digest}"


def props_for_region(fleet: Fleet, region: Region) -> ClusterProps:
    """The cluster props for one region of the fleet (the catalog picks the instance type)."""
    model = fleet.model_for(region)
    it = region.instance(model.tensor_parallel_size)
    pool = GpuPoolProps(
        name=short_name(f"gpu-{it.gpu}", 30),
        instance_type=it.name,
        gpu=it.gpu,
        gpus_per_node=it.gpus,
        min_nodes=region.nodes.min,
        max_nodes=region.nodes.max,
        tier=region.capacity.tier.value,
        reservation_id=region.capacity.reservation_id,
        accelerator=it.accelerator,
    )
    tags = {"gpufleet-fleet": fleet.fleet, "gpufleet-region": region.key, **fleet.settings.tags}
    return ClusterProps(
        cloud=region.cloud.value,
        name=cluster_name(fleet, region),
        region=region.region,
        zones=tuple(region.zones),
        kubernetes_version=fleet.kubernetes_version,
        api_allowed_cidrs=tuple(fleet.settings.api_allowed_cidrs),
        gpu_pools=(pool,),
        tags=tags,
        admin_principals=_admins(fleet, region.cloud.value),
        router_port=router_public_port(fleet),
    )


def _admins(fleet: Fleet, cloud: str) -> tuple[str, ...]:
    access = fleet.settings.access
    if cloud == "aws":
        return tuple(access.aws_admin_role_arns)
    if cloud == "azure":
        return tuple(access.azure_admin_principal_ids)
    return ()


def router_public_port(fleet: Fleet) -> int:
    """443 (TLS) when the fleet has public DNS names for its routers; else 80 on an internal balancer."""
    return 443 if fleet.settings.dns is not None else 80


def cluster_name(fleet: Fleet, region: Region) -> str:
    # 40 is GKE's limit and the tightest of the three.
    return short_name(f"{fleet.fleet}-{region.key}", 40)


def build_cluster(scope: Construct, construct_id: str, props: ClusterProps):
    """The cloud's cluster construct for `props.cloud` (imports only that cloud's provider)."""
    if props.cloud == "aws":
        from gpufleet.modules.aws_cluster import AwsGpuCluster

        return AwsGpuCluster(scope, construct_id, props=props)
    if props.cloud == "gcp":
        from gpufleet.modules.gcp_cluster import GcpGpuCluster

        return GcpGpuCluster(scope, construct_id, props=props)
    if props.cloud == "azure":
        from gpufleet.modules.azure_cluster import AzureGpuCluster

        return AzureGpuCluster(scope, construct_id, props=props)
    raise ValueError(f"unknown cloud {props.cloud!r}")


def add_provider(scope: Construct, props: ClusterProps) -> TerraformProvider:
    """The cloud's Terraform provider for a stack holding this cluster."""
    if props.cloud == "aws":
        from gpufleet.modules.aws_cluster import add_provider as aws

        return aws(scope, props)
    if props.cloud == "gcp":
        from gpufleet.modules.gcp_cluster import add_provider as gcp

        return gcp(scope, props)
    from gpufleet.modules.azure_cluster import add_provider as azure

    return azure(scope, props)


def emit_outputs(scope: Construct, outputs: ClusterOutputs) -> None:
    """Expose the outputs as Terraform outputs of the stack (for kubeconfig scripts and humans)."""
    from cdktn import TerraformOutput

    for key, value in outputs.kubeconfig_fields().items():
        # The CA is public, but azurerm only has it inside the sensitive kube_config block, and
        # Terraform refuses to output a sensitive value without `sensitive = true`.
        sensitive = key == "cluster_ca_certificate" and outputs.cloud == "azure"
        TerraformOutput(
            scope, key, value=value, description=f"{outputs.cloud} cluster {key}", sensitive=sensitive or None
        )
    TerraformOutput(
        scope,
        "node_pool_names",
        value=list(outputs.node_pool_names),
        description="system pool first, then the GPU pools",
    )
