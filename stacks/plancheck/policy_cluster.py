"""Policies on clusters and the fleet as a whole: budget, tags, API exposure, encryption
(GPU006 .. GPU009)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

from gpufleet.stacks import catalog
from gpufleet.stacks.plancheck.inputs import ResourceChange, blocks, dig, first
from gpufleet.stacks.plancheck.policy_base import (
    POLICIES,
    Context,
    Finding,
    Policy,
    finding,
    live_pools,
    policy,
    where,
)
from gpufleet.stacks.plancheck.pools import CLUSTER_TYPES, POOL_TYPES, GpuPool, truthy


@policy(
    Policy(
        id="GPU006",
        title="The fleet's cost at max nodes is within its budget",
        severity="high",
        rationale=(
            "Autoscaling makes the worst case the bill: every GPU pool at its max nodes, at on-demand list "
            "price "
            "(the catalog's, with its source and date). The fleet file's settings.budget_per_hour is the "
            "ceiling "
            "the owners agreed to; a change that raises the ceiling past it needs a decision, not a merge."
        ),
        fix="lower max nodes, use cheaper GPUs or regions, or raise settings.budget_per_hour in the fleet",
        needs="fleet",
    )
)
def _budget(ctx: Context) -> Iterator[Finding]:
    if ctx.fleet is None or ctx.fleet.settings.budget_per_hour is None:
        return
    budget = ctx.fleet.settings.budget_per_hour
    total = 0.0
    unpriced: list[GpuPool] = []
    lines = []
    for pool in live_pools(ctx.topology.pools):
        price = None
        if pool.region and pool.instance_type:
            price = catalog.price(pool.cloud, pool.region, pool.instance_type)
        if price is None or pool.max_nodes is None:
            unpriced.append(pool)
            continue
        total += price * pool.max_nodes
        lines.append(f"{pool.change.stack}: {pool.max_nodes} x {pool.instance_type} @ ${price:g}")
    p = POLICIES["GPU006"]
    fleet_rc = dict(stack="(fleet)", address=f"fleet.{ctx.fleet.fleet}", title=p.title)
    if total > budget:
        yield Finding(
            policy="GPU006",
            severity=p.severity,
            message=f"at max nodes the GPU pools cost ${total:,.2f}/h, over the budget of ${budget:,.2f}/h "
            f"({'; '.join(lines)}). Fix: {p.fix}",
            details={"usd_per_hour_at_max": round(total, 2), "budget_per_hour": budget},
            **fleet_rc,
        )
    for pool in unpriced:
        yield finding(
            "GPU006",
            pool.change,
            f"no catalog price for {pool.instance_type} in {where(pool)}, so the budget check cannot count this pool",
            severity="low",
            fix="add the price, with its source and date, to the catalog (stacks/catalog/prices.yaml)",
        )


def _aws_tags(ctx: Context, rc: ResourceChange) -> dict[str, str]:
    info = ctx.inputs.stacks.get(rc.stack)
    tags: dict[str, str] = {}
    if info is not None:
        for name, default in info.provider_default_tags.items():
            if name == "aws" or name.endswith("/aws"):
                tags.update(default)
    for key in ("tags_all", "tags"):
        if isinstance(rc.values.get(key), dict):
            tags.update({str(k): str(v) for k, v in rc.values[key].items()})
    return tags


def _gcp_labels(ctx: Context, rc: ResourceChange) -> dict[str, str]:
    info = ctx.inputs.stacks.get(rc.stack)
    labels: dict[str, str] = {}
    if info is not None:
        for name, default in info.provider_default_tags.items():
            if name == "google" or name.endswith("/google"):
                labels.update(default)
    v = rc.values
    sources = [v.get("resource_labels"), v.get("terraform_labels"), v.get("effective_labels")]
    if rc.type == "google_container_node_pool":
        # GKE puts the cluster's resource_labels on its node VMs too
        sources.append(first(v.get("node_config")).get("resource_labels"))
        for other in ctx.topology.in_stack(rc.stack):
            if other.type == "google_container_cluster":
                sources.append(other.values.get("resource_labels"))
    for s in sources:
        if isinstance(s, dict):
            labels.update({str(k): str(val) for k, val in s.items()})
    return labels


@policy(
    Policy(
        id="GPU007",
        title="Required tags/labels are present on clusters and node pools",
        severity="low",
        rationale=(
            "GPU spend has to be attributed: the fleet file's settings.tags (team, cost centre, ...) must "
            "reach "
            "every cluster and node pool, as AWS tags (resource or provider default_tags), GCP resource "
            "labels "
            "(cluster labels reach its node VMs) or Azure tags."
        ),
        fix="put the fleet's settings.tags on it (aws tags/default_tags, gcp resource_labels, azure tags)",
        needs="fleet",
    )
)
def _tags(ctx: Context) -> Iterator[Finding]:
    if ctx.fleet is None or not ctx.fleet.settings.tags:
        return
    required = ctx.fleet.settings.tags
    for rc in ctx.inputs.changes:
        if rc.type not in POOL_TYPES and rc.type not in CLUSTER_TYPES or rc.is_delete or rc.mode != "managed":
            continue
        if rc.type.startswith("aws_"):
            have = _aws_tags(ctx, rc)
        elif rc.type.startswith("google_"):
            have = _gcp_labels(ctx, rc)
        else:
            have = (
                {str(k): str(v) for k, v in (rc.values.get("tags") or {}).items()}
                if isinstance(rc.values.get("tags"), dict)
                else {}
            )
        missing = [k for k in required if k not in have]
        wrong = [f"{k}={have[k]!r} (fleet: {required[k]!r})" for k in required if k in have and have[k] != required[k]]
        if missing or wrong:
            parts = []
            if missing:
                parts.append("missing " + ", ".join(missing))
            if wrong:
                parts.append("different " + ", ".join(wrong))
            yield finding("GPU007", rc, "required tags: " + "; ".join(parts), missing=missing)


def _open_to_world(cidrs: list[Any]) -> list[str]:
    out = []
    for c in cidrs:
        try:
            if ipaddress.ip_network(str(c), strict=False).prefixlen == 0:
                out.append(str(c))
        except ValueError:
            continue  # a token; not decidable here
    return out


@policy(
    Policy(
        id="GPU008",
        title="No cluster API endpoint is open to the world",
        severity="critical",
        rationale=(
            "A Kubernetes API reachable from 0.0.0.0/0 invites credential stuffing and exploits of the "
            "next API "
            "server CVE, and a GPU cluster is a prize (crypto mining). EKS opens the public endpoint to "
            "everyone "
            "by default; GKE and AKS do so when no authorized networks are set."
        ),
        fix=(
            "restrict the API to settings.api_allowed_cidrs (aws vpc_config.public_access_cidrs or "
            "endpoint_public_access = false; gcp master_authorized_networks_config or a private endpoint; "
            "azure "
            "api_server_access_profile.authorized_ip_ranges or private_cluster_enabled = true)"
        ),
    )
)
def _api_endpoint(ctx: Context) -> Iterator[Finding]:
    for rc in ctx.topology.clusters:
        if rc.is_delete:
            continue
        v = rc.values
        problem = None
        if rc.type == "aws_eks_cluster":
            vpc = first(v.get("vpc_config"))
            public = vpc.get("endpoint_public_access", True)  # the provider's default is public
            cidrs = vpc.get("public_access_cidrs")
            if public is not False and str(public).lower() != "false":
                if not cidrs:
                    problem = "the public API endpoint has no public_access_cidrs, so EKS allows 0.0.0.0/0"
                elif isinstance(cidrs, list) and _open_to_world(cidrs):
                    problem = f"public_access_cidrs includes {', '.join(_open_to_world(cidrs))}"
        elif rc.type == "google_container_cluster":
            private = truthy(dig(v, "private_cluster_config", "enable_private_endpoint"))
            authorized = blocks(v.get("master_authorized_networks_config"))
            cidrs = [b.get("cidr_block") for a in authorized for b in blocks(a.get("cidr_blocks"))]
            if not private and not authorized:
                problem = "no master_authorized_networks_config and no private endpoint: the API is open to all"
            elif not private and _open_to_world(cidrs):
                problem = f"master_authorized_networks_config allows {', '.join(_open_to_world(cidrs))}"
        elif rc.type == "azurerm_kubernetes_cluster":
            private = truthy(v.get("private_cluster_enabled"))
            ranges = dig(v, "api_server_access_profile", "authorized_ip_ranges")
            if ranges is None:
                ranges = v.get("api_server_authorized_ip_ranges")  # azurerm 3.x spelling
            ranges = ranges if isinstance(ranges, list) else []
            if not private and not ranges:
                problem = "no authorized_ip_ranges and not a private cluster: the API is open to all"
            elif not private and _open_to_world(ranges):
                problem = f"authorized_ip_ranges includes {', '.join(_open_to_world(ranges))}"
        if problem:
            yield finding("GPU008", rc, problem)


@policy(
    Policy(
        id="GPU009",
        title="Disks and Kubernetes secrets are encrypted",
        severity="high",
        rationale=(
            "Serving stacks keep model-hub tokens and API keys in Kubernetes Secrets, and node disks hold "
            "model "
            "weights. Secrets must be envelope-encrypted with a key the fleet controls (EKS "
            "encryption_config for "
            "secrets, GKE application-layer database_encryption, AKS key_management_service). EBS volumes "
            "declared in launch templates or as volumes must set encrypted; GCP and Azure managed disks are "
            "always encrypted at rest by the platform and have no off switch."
        ),
        fix=(
            'aws: encryption_config {resources = ["secrets"], provider {key_arn}} and ebs encrypted = true; '
            'gcp: database_encryption {state = "ENCRYPTED", key_name}; '
            "azure: key_management_service {key_vault_key_id}"
        ),
        fix_by_cloud={
            "aws": 'encryption_config {resources = ["secrets"], provider {key_arn}} on the EKS cluster; '
            "encrypted = true on EBS volumes (launch template block_device_mappings.ebs, aws_ebs_volume)",
            "gcp": 'database_encryption {state = "ENCRYPTED", key_name = <a Cloud KMS key>} on the GKE cluster',
            "azure": "key_management_service {key_vault_key_id = <a Key Vault key>} on the AKS cluster",
        },
    )
)
def _encryption(ctx: Context) -> Iterator[Finding]:
    for rc in ctx.inputs.changes:
        if rc.is_delete or rc.mode != "managed":
            continue
        v = rc.values
        if rc.type == "aws_eks_cluster":
            covered = {str(r) for e in blocks(v.get("encryption_config")) for r in (e.get("resources") or [])}
            if "secrets" not in covered:
                yield finding(
                    "GPU009", rc, "EKS cluster does not envelope-encrypt secrets (no encryption_config)", cloud="aws"
                )
        elif rc.type == "google_container_cluster":
            state = dig(v, "database_encryption", "state")
            if str(state or "").upper() != "ENCRYPTED":
                yield finding("GPU009", rc, f"GKE cluster database_encryption state is {state or 'unset'}", cloud="gcp")
        elif rc.type == "azurerm_kubernetes_cluster":
            if not dig(v, "key_management_service", "key_vault_key_id") and not _unknown_block(
                rc, "key_management_service"
            ):
                yield finding("GPU009", rc, "AKS cluster has no key_management_service for etcd secrets", cloud="azure")
        elif rc.type == "aws_launch_template":
            for m in blocks(v.get("block_device_mappings")):
                for ebs in blocks(m.get("ebs")):
                    if not truthy(ebs.get("encrypted")) and not ebs.get("snapshot_id"):
                        yield finding(
                            "GPU009", rc, f"EBS volume {m.get('device_name', '?')} is not encrypted", cloud="aws"
                        )
        elif rc.type == "aws_ebs_volume" and not truthy(v.get("encrypted")):
            yield finding("GPU009", rc, "EBS volume is not encrypted", cloud="aws")


def _unknown_block(rc: ResourceChange, key: str) -> bool:
    return rc.after_unknown.get(key) is True
