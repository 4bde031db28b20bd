"""Policies on the infrastructure's life over time: Kubernetes versions that leave support, and names
that block re-creation (GPU012, GPU019)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from gpufleet.stacks import catalog
from gpufleet.stacks.plancheck.inputs import ResourceChange, config_address, dig
from gpufleet.stacks.plancheck.policy_base import Context, Finding, Policy, finding, policy
from gpufleet.stacks.plancheck.regions import live

# resource type -> (cloud, attributes holding a Kubernetes version; a.b = attribute b of block a)
VERSION_ATTRIBUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "aws_eks_cluster": ("aws", ("version",)),
    "aws_eks_node_group": ("aws", ("version",)),
    "google_container_cluster": ("gcp", ("min_master_version", "node_version")),
    "google_container_node_pool": ("gcp", ("version",)),
    "azurerm_kubernetes_cluster": ("azure", ("kubernetes_version", "default_node_pool.orchestrator_version")),
    "azurerm_kubernetes_cluster_node_pool": ("azure", ("orchestrator_version",)),
}
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(\.\d+)?([-+][0-9A-Za-z.-]+)?$")


def kubernetes_minor(value: Any) -> str | None:
    """The minor of a version ("1.35.2", "1.35.2-gke.1200" -> "1.35"); None for "latest", a token, nothing."""
    if not isinstance(value, str):
        return None
    m = _VERSION.match(value.strip())
    return f"{m.group(1)}.{m.group(2)}" if m else None


@policy(
    Policy(
        id="GPU012",
        title="Kubernetes versions are within their standard support",
        severity="high",
        rationale=(
            "Each managed Kubernetes supports a minor for about 14 months. Past that, EKS stops creating "
            "clusters on it and bills extended support per cluster hour, AKS supports it only on the Premium "
            "tier (long-term support), and GKE upgrades the cluster on its own schedule, GPU nodes included. "
            "A stack pinned to such a version fails its first apply or drifts into a forced upgrade. The "
            "support windows are data (stacks/catalog/kubernetes.yaml, with sources) and are judged on the "
            "day of the check. An unset version means the provider's current default and passes."
        ),
        fix=(
            "pin a supported minor (aws_eks_cluster.version; google_container_cluster.min_master_version; "
            "azurerm_kubernetes_cluster.kubernetes_version; gpufleet: settings.kubernetes_version, or leave "
            "it unset for the catalog's default) and upgrade existing clusters one minor at a time"
        ),
        fix_by_cloud={
            "aws": (
                "set aws_eks_cluster.version (and aws_eks_node_group.version, if set) to a minor EKS supports "
                "(gpufleet: settings.kubernetes_version, or unset for the catalog's default); an existing "
                "cluster upgrades one minor at a time"
            ),
            "gcp": (
                "set google_container_cluster.min_master_version (and node_version / the node pools' version, "
                "if set) to a minor GKE supports (gpufleet: settings.kubernetes_version, or unset for the "
                "catalog's default)"
            ),
            "azure": (
                "set azurerm_kubernetes_cluster.kubernetes_version (and the pools' orchestrator_version, if "
                "set) to a minor AKS supports on the Free/Standard tier (gpufleet: settings.kubernetes_version, "
                "or unset for the catalog's default); an existing cluster upgrades one minor at a time"
            ),
        },
    )
)
def _kubernetes_version(ctx: Context) -> Iterator[Finding]:
    for rc in ctx.inputs.changes:
        if rc.type not in VERSION_ATTRIBUTES or not live(rc):
            continue
        cloud, attributes = VERSION_ATTRIBUTES[rc.type]
        for attribute in attributes:
            value = dig(rc.values, *attribute.split("."))
            minor = kubernetes_minor(value)
            if minor is None:
                continue
            problem = catalog.kubernetes_support(cloud, minor, ctx.today)
            if problem:
                yield finding(
                    "GPU012", rc, f"{attribute} = {value!r}: {problem}", cloud=cloud, version=str(value)
                )


def _literal_name(ctx: Context, rc: ResourceChange) -> str | None:
    """The resource's name when it is a literal in the configuration; None when it is computed (or the
    input does not say)."""
    name = rc.values.get("name")
    info = ctx.inputs.stacks.get(rc.stack)
    if info is not None and info.kind == "plan":
        if rc.after_unknown.get("name") is True:
            return None
        expr = info.config_expressions.get(config_address(rc.address), {}).get("name")
        if not isinstance(expr, dict) or expr.get("references") or "constant_value" not in expr:
            return None
        return str(expr["constant_value"])
    if isinstance(name, str) and name and "${" not in name:
        return name
    return None


@policy(
    Policy(
        id="GPU019",
        title="KMS key rings have names that survive re-creation",
        severity="medium",
        rationale=(
            "Cloud KMS key rings (and their keys) cannot be deleted: Terraform's destroy only forgets them. "
            "A key ring with a fixed name therefore makes the next apply after a destroy fail with 409 "
            "(already exists), so a region cannot be torn down and rebuilt, which is how a GPU fleet moves "
            "capacity. A name with a random suffix makes each incarnation its own key ring."
        ),
        fix=(
            'give the key ring a random suffix: resource "random_id" "kms" { byte_length = 4 } and '
            'google_kms_key_ring.name = "<name>-${random_id.kms.hex}" (or import the existing key ring '
            "instead of creating it)"
        ),
    )
)
def _key_ring_name(ctx: Context) -> Iterator[Finding]:
    for rc in ctx.inputs.changes:
        if rc.type != "google_kms_key_ring" or not live(rc):
            continue
        name = _literal_name(ctx, rc)
        if name is not None:
            yield finding(
                "GPU019",
                rc,
                f"key ring name {name!r} is fixed: key rings cannot be deleted, so an apply after a destroy "
                "fails with 409 (already exists)",
                cloud="gcp",
            )
