"""The GPU policy pack: what a GPU fleet's infrastructure must look like before it is applied.

Each policy has an id, a severity, a rationale (why it exists; docs/plan-check.md prints it) and a
fix (how to make the finding go away). `evaluate` runs every policy over the normalised resource
changes and returns findings; waivers and checkov findings are merged later (`run.py`).

Policies that need context skip themselves when it is missing: the budget and tag policies need the
fleet file (`--fleet`), the quota policy a capacity snapshot (`--capacity`). The run's report lists
what was skipped, so a clean result never hides an unchecked policy.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpufleet.stacks import catalog
from gpufleet.stacks.plancheck.capacity import CapacityView, tier_of
from gpufleet.stacks.plancheck.inputs import Inputs, ResourceChange, blocks, dig, first
from gpufleet.stacks.plancheck.pools import CLUSTER_TYPES, POOL_TYPES, GpuPool, Topology, truthy

if TYPE_CHECKING:
    from gpufleet.stacks.spec import Fleet

SEVERITIES = ("low", "medium", "high", "critical")


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


@dataclass(frozen=True)
class Policy:
    id: str
    title: str
    severity: str
    rationale: str
    fix: str
    needs: str | None = None  # "fleet" or "capacity" where the policy needs more than the plan


@dataclass
class Finding:
    policy: str
    severity: str
    stack: str
    address: str
    message: str  # what is wrong and how to fix it
    source: str = ""  # input file
    origin: str = "gpufleet"  # or "checkov"
    title: str = ""
    waived_by: Any = None  # a waivers.Waiver
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def waived(self) -> bool:
        return self.waived_by is not None


@dataclass
class Context:
    inputs: Inputs
    fleet: Fleet | None = None
    capacity: CapacityView | None = None
    topology: Topology = field(init=False)

    def __post_init__(self) -> None:
        self.topology = Topology(self.inputs, _fleet_stack_regions(self.fleet, self.inputs))


def _fleet_stack_regions(fleet: Fleet | None, inputs: Inputs) -> dict[str, tuple[str, str]]:
    """Stack name -> (cloud, region) for stacks named after a fleet region (<cloud>-<region>-cluster)."""
    if fleet is None:
        return {}
    out = {}
    for stack in inputs.stacks:
        for r in fleet.regions:
            if stack == r.key or stack.startswith(r.key + "-"):
                out[stack] = (r.cloud.value, r.region)
    return out


PolicyCheck = Callable[[Context], Iterator[Finding]]
POLICIES: dict[str, Policy] = {}
_CHECKS: dict[str, PolicyCheck] = {}


def policy(p: Policy) -> Callable[[PolicyCheck], PolicyCheck]:
    def register(fn: PolicyCheck) -> PolicyCheck:
        POLICIES[p.id] = p
        _CHECKS[p.id] = fn
        return fn

    return register


def _finding(
    pid: str,
    rc: ResourceChange,
    problem: str,
    severity: str | None = None,
    fix: str | None = None,
    **details: Any,
) -> Finding:
    p = POLICIES[pid]
    return Finding(
        policy=pid,
        severity=severity or p.severity,
        stack=rc.stack,
        address=rc.address,
        message=f"{problem}. Fix: {fix or p.fix}",
        source=rc.source,
        title=p.title,
        details=details,
    )


def _live(pools: list[GpuPool]) -> list[GpuPool]:
    """Pools that exist after the change (a plain delete leaves nothing to check)."""
    return [p for p in pools if not p.change.is_delete and p.change.actions != ("forget",)]


def _where(pool: GpuPool) -> str:
    return f"{pool.cloud} {pool.region or '(region unknown)'}"


# ---------------------------------------------------------------------------------------------
# GPU001 .. GPU011


@policy(
    Policy(
        id="GPU001",
        title="GPU pools carry the nvidia.com/gpu NoSchedule taint",
        severity="high",
        rationale=(
            "Without the taint, ordinary pods (system add-ons, the router, batch jobs) land on GPU nodes, "
            "take "
            "their CPU and memory, and keep the autoscaler from scaling the most expensive nodes back to "
            "zero. "
            "Serving pods tolerate the taint; nothing else should. GKE adds the taint on its own only when "
            "the "
            "cluster also has non-GPU pools, so the pack asks for it explicitly on every cloud."
        ),
        fix=(
            "add the taint nvidia.com/gpu=present:NoSchedule (aws_eks_node_group taint "
            '{effect = "NO_SCHEDULE"}; google_container_node_pool node_config.taint; azurerm '
            'node_taints = ["nvidia.com/gpu=present:NoSchedule"])'
        ),
    )
)
def _gpu_taint(ctx: Context) -> Iterator[Finding]:
    for pool in _live(ctx.topology.pools):
        if pool.taints is None:
            continue  # known only after apply
        if not any(t.is_gpu_noschedule for t in pool.taints):
            have = ", ".join(f"{t.key}:{t.effect}" for t in pool.taints) or "none"
            yield _finding(
                "GPU001", pool.change, f"GPU pool has no nvidia.com/gpu NoSchedule taint (taints: {have})"
            )


@policy(
    Policy(
        id="GPU002",
        title="GPU pools can scale to zero",
        severity="medium",
        rationale=(
            "GPU nodes cost tens of dollars an hour each. A pool whose minimum is above zero (or that does "
            "not "
            "autoscale) pays for idle GPUs around the clock; the router spills traffic to other regions, "
            "so an "
            "idle region may go to zero."
        ),
        fix=(
            "set the minimum to 0 and enable autoscaling (aws scaling_config.min_size = 0; gcp autoscaling "
            "{total_min_node_count = 0}; azure auto_scaling_enabled = true, min_count = 0)"
        ),
    )
)
def _scale_to_zero(ctx: Context) -> Iterator[Finding]:
    for pool in _live(ctx.topology.pools):
        rc = pool.change
        if pool.cloud == "gcp" and not first(rc.values.get("autoscaling")):
            yield _finding("GPU002", rc, "GPU pool has no autoscaling block, so its size is fixed")
        elif pool.notes:
            yield _finding("GPU002", rc, "GPU pool: " + "; ".join(pool.notes))
        elif pool.min_nodes is not None and pool.min_nodes > 0:
            yield _finding(
                "GPU002", rc, f"GPU pool keeps at least {pool.min_nodes} node(s) running", min=pool.min_nodes
            )


@policy(
    Policy(
        id="GPU003",
        title="Capacity-block, reservation and flex-start pools pin one zone",
        severity="high",
        rationale=(
            "A capacity block, a specific reservation or a flex-start/queued request is granted in ONE "
            "zone. A "
            "pool spread over several zones launches nodes in zones where the reservation does not exist: "
            "they "
            "fail with capacity errors or silently fall back to on-demand prices."
        ),
        fix=(
            "give the pool exactly one zone, the reservation's (aws: one subnet_ids entry; gcp: one "
            'node_locations entry; azure: zones = ["<zone>"])'
        ),
    )
)
def _reservation_one_zone(ctx: Context) -> Iterator[Finding]:
    for pool in _live(ctx.topology.pools):
        if not pool.pins_one_zone_required or pool.zones is None:
            continue
        if len(pool.zones) != 1:
            spread = f"{len(pool.zones)} zones/subnets" if pool.zones else "no zone (the whole region)"
            yield _finding(
                "GPU003", pool.change, f"{pool.capacity} GPU pool spans {spread}", zones=pool.zones
            )


@policy(
    Policy(
        id="GPU004",
        title="Max GPUs per region fit the quota of the capacity snapshot",
        severity="high",
        rationale=(
            "Quota, not code, caps a GPU fleet. A region whose pools may grow past the quota fails at "
            "scale-up "
            "time (VcpuLimitExceeded, QUOTA_EXCEEDED), which is exactly when the traffic needs it. "
            "Checking max "
            "nodes against the snapshot's free quota moves the failure to the pull request."
        ),
        fix="lower the pools' max nodes, request a quota increase, or move GPUs to a region with quota",
        needs="capacity",
    )
)
def _quota(ctx: Context) -> Iterator[Finding]:
    if ctx.capacity is None:
        return
    groups: dict[tuple[str, str, str, str], list[GpuPool]] = defaultdict(list)
    for pool in _live(ctx.topology.pools):
        if pool.region and pool.gpu and pool.max_gpus is not None:
            groups[(pool.cloud, pool.region, pool.gpu, tier_of(pool.capacity))].append(pool)
    for (cloud, region, gpu, tier), pools in sorted(groups.items()):
        quota = ctx.capacity.quota(cloud, region, gpu, tier)
        if quota is None:
            continue
        want = sum(p.max_gpus or 0 for p in pools)
        if want > quota.free_gpus:
            for pool in pools:
                yield _finding(
                    "GPU004",
                    pool.change,
                    f"{cloud} {region} may scale to {want} {gpu} GPUs ({tier}) but the snapshot leaves "
                    f"{quota.free_gpus} of {quota.limit_gpus} free",
                    want=want,
                    free=quota.free_gpus,
                )


@policy(
    Policy(
        id="GPU005",
        title="The GPU type is offered in the pool's region and zones",
        severity="high",
        rationale=(
            "GPU instance types are sold in a few zones of a few regions. A pool asking for one where it "
            "is not "
            "offered never gets a node (Unsupported, SkuNotAvailable, ZONE_RESOURCE_POOL_EXHAUSTED). With a "
            "snapshot the pack checks the region and each zone; without one it checks the catalog: the "
            "instance "
            "type exists on that cloud and carries the GPU the pool declares."
        ),
        fix=(
            "pick a region/zone that offers the type (`gpufleet capacity place`), or an instance type of the "
            "catalog (gcp: guest_accelerator type and count must match the machine type)"
        ),
    )
)
def _offered(ctx: Context) -> Iterator[Finding]:
    for pool in _live(ctx.topology.pools):
        rc = pool.change
        if pool.instance_type is None:
            continue
        table = catalog.instance_types(pool.cloud)
        it = table.get(pool.instance_type)
        if it is None:
            yield _finding(
                "GPU005",
                rc,
                f"{pool.cloud} instance type {pool.instance_type} is not a GPU type of the catalog",
            )
            continue
        if pool.cloud == "gcp" and pool.accelerator is not None:
            if pool.accelerator != it.accelerator or (
                pool.accelerator_count is not None and pool.accelerator_count != it.gpus
            ):
                yield _finding(
                    "GPU005",
                    rc,
                    f"{it.name} comes with {it.gpus} x {it.accelerator}, the pool asks for "
                    f"{pool.accelerator_count} x {pool.accelerator}",
                )
        if ctx.capacity is None or pool.region is None:
            continue
        in_region = ctx.capacity.offered(pool.cloud, pool.region, it.gpu, it.name)
        if in_region is False:
            yield _finding("GPU005", rc, f"{it.name} is not offered in {pool.cloud} {pool.region} (snapshot)")
            continue
        for zone in _zone_names(pool):
            if ctx.capacity.offered(pool.cloud, pool.region, it.gpu, it.name, zone) is False:
                yield _finding("GPU005", rc, f"{it.name} is not offered in zone {zone} (snapshot)", zone=zone)


def _zone_names(pool: GpuPool) -> list[str]:
    """Zones named by the pool itself (AWS pools name subnets, not zones: nothing to check there)."""
    if pool.cloud == "aws" or not pool.zones:
        return []
    return pool.zones  # GCP: us-central1-a; Azure: "1", "2", "3", as the snapshot lists them


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
    for pool in _live(ctx.topology.pools):
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
        yield _finding(
            "GPU006",
            pool.change,
            f"no catalog price for {pool.instance_type} in {_where(pool)}, so the budget check cannot "
            "count this pool",
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
        wrong = [
            f"{k}={have[k]!r} (fleet: {required[k]!r})"
            for k in required
            if k in have and have[k] != required[k]
        ]
        if missing or wrong:
            parts = []
            if missing:
                parts.append("missing " + ", ".join(missing))
            if wrong:
                parts.append("different " + ", ".join(wrong))
            yield _finding("GPU007", rc, "required tags: " + "; ".join(parts), missing=missing)


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
                problem = (
                    "no master_authorized_networks_config and no private endpoint: the API is open to all"
                )
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
            yield _finding("GPU008", rc, problem)


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
                yield _finding(
                    "GPU009", rc, "EKS cluster does not envelope-encrypt secrets (no encryption_config)"
                )
        elif rc.type == "google_container_cluster":
            state = dig(v, "database_encryption", "state")
            if str(state or "").upper() != "ENCRYPTED":
                yield _finding("GPU009", rc, f"GKE cluster database_encryption state is {state or 'unset'}")
        elif rc.type == "azurerm_kubernetes_cluster":
            if not dig(v, "key_management_service", "key_vault_key_id") and not _unknown_block(
                rc, "key_management_service"
            ):
                yield _finding("GPU009", rc, "AKS cluster has no key_management_service for etcd secrets")
        elif rc.type == "aws_launch_template":
            for m in blocks(v.get("block_device_mappings")):
                for ebs in blocks(m.get("ebs")):
                    if not truthy(ebs.get("encrypted")) and not ebs.get("snapshot_id"):
                        yield _finding(
                            "GPU009", rc, f"EBS volume {m.get('device_name', '?')} is not encrypted"
                        )
        elif rc.type == "aws_ebs_volume" and not truthy(v.get("encrypted")):
            yield _finding("GPU009", rc, "EBS volume is not encrypted")


def _unknown_block(rc: ResourceChange, key: str) -> bool:
    return rc.after_unknown.get(key) is True


SERVING_TYPES = (
    "kubernetes_deployment",
    "kubernetes_deployment_v1",
    "kubernetes_stateful_set",
    "kubernetes_stateful_set_v1",
)


def _pod_spec(rc: ResourceChange) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool] | None:
    """(containers, volumes, camelCase) of a workload resource, or None if it has no pod template."""
    if rc.type == "kubernetes_manifest":
        manifest = rc.values.get("manifest")
        if not isinstance(manifest, dict) or manifest.get("kind") not in ("Deployment", "StatefulSet"):
            return None
        spec = dig(manifest, "spec", "template", "spec")
        if not isinstance(spec, dict):
            return None
        return blocks(spec.get("containers")), blocks(spec.get("volumes")), True
    if rc.type in SERVING_TYPES:
        spec = dig(rc.values, "spec", "template", "spec")
        if isinstance(spec, list):
            spec = first(spec)
        if not isinstance(spec, dict):
            return None
        return blocks(spec.get("container")), blocks(spec.get("volume")), False
    return None


def _wants_gpu(container: dict[str, Any]) -> bool:
    res = first(container.get("resources"))
    for kind in ("limits", "requests"):
        amounts = res.get(kind)
        if isinstance(amounts, list):
            amounts = first(amounts)
        if isinstance(amounts, dict) and "nvidia.com/gpu" in amounts:
            return True
    return "vllm" in str(container.get("image", "")).lower()


@policy(
    Policy(
        id="GPU010",
        title="Serving deployments have startup and readiness probes and a memory-backed /dev/shm",
        severity="medium",
        rationale=(
            "vLLM loads weights for minutes before it answers: without a startup probe the liveness probe "
            "kills it "
            "mid-load, without a readiness probe the Service sends requests to an engine that is not "
            "ready. Its "
            "workers share tensors through /dev/shm, which Docker caps at 64 MiB; a memory-backed emptyDir "
            "at "
            "/dev/shm is the Kubernetes equivalent of --ipc=host (FACTS.md section 1)."
        ),
        fix=(
            "give the GPU container a startup_probe (GET /health, allowing ~10 min) and a readiness_probe "
            "(GET "
            '/health), and mount an empty_dir {medium = "Memory"} volume at /dev/shm'
        ),
    )
)
def _serving(ctx: Context) -> Iterator[Finding]:
    for rc in ctx.inputs.changes:
        if rc.is_delete or rc.mode != "managed":
            continue
        found = _pod_spec(rc)
        if found is None:
            continue
        containers, volumes, camel = found
        gpu_containers = [c for c in containers if _wants_gpu(c)]
        if not gpu_containers:
            continue
        startup, readiness, mounts, mount_path, empty_dir = (
            ("startupProbe", "readinessProbe", "volumeMounts", "mountPath", "emptyDir")
            if camel
            else ("startup_probe", "readiness_probe", "volume_mount", "mount_path", "empty_dir")
        )
        memory_volumes = {
            vol.get("name") for vol in volumes if str(first(vol.get(empty_dir)).get("medium", "")) == "Memory"
        }
        for c in gpu_containers:
            missing = [
                label
                for key, label in ((startup, "startup probe"), (readiness, "readiness probe"))
                if not first(c.get(key))
            ]
            shm = [m for m in blocks(c.get(mounts)) if m.get(mount_path) == "/dev/shm"]
            if not shm:
                missing.append("/dev/shm mount")
            elif not any(m.get("name") in memory_volumes for m in shm):
                missing.append("memory-backed (emptyDir medium Memory) volume at /dev/shm")
            if missing:
                yield _finding("GPU010", rc, f"container {c.get('name', '?')} lacks: {', '.join(missing)}")


@policy(
    Policy(
        id="GPU011",
        title="Destructive changes to GPU pools and clusters are called out",
        severity="high",
        rationale=(
            "Deleting or replacing a GPU pool or cluster drains its GPUs: in-flight requests fail over, KV "
            "caches "
            "are lost, and the GPUs may not come back (stockouts, quota taken by others). Replacement is "
            "often "
            "an accident of a force-new attribute. The finding says how many GPUs the region would lose so "
            "the "
            "reviewer can judge; an intended change is waived with a reason and an expiry."
        ),
        fix=(
            "if unintended, revert the attribute that forces replacement (see the plan's replace_paths); if "
            "intended, drain the region first (`gpufleet failover drain`) and add a dated waiver"
        ),
    )
)
def _destructive(ctx: Context) -> Iterator[Finding]:
    topo = ctx.topology
    for rc in ctx.inputs.changes:
        if not rc.is_destructive or rc.mode != "managed":
            continue
        if rc.type in POOL_TYPES:
            old = _before_pool(topo, rc)
            if old is None:
                continue  # not a GPU pool
            lost = old.max_gpus
            lose = f"up to {lost} {old.gpu or 'GPU'} GPUs" if lost is not None else "its GPUs (count unknown)"
            yield _finding(
                "GPU011",
                rc,
                f"{rc.action_label} of a GPU pool: {_where(old)} loses {lose}{_swap_note(rc)}",
                gpus_lost=lost,
            )
        elif rc.type in CLUSTER_TYPES:
            pools = [
                p
                for p in (_before_pool(topo, o) for o in topo.in_stack(rc.stack) if o.type in POOL_TYPES)
                if p
            ]
            lost = sum(p.max_gpus or 0 for p in pools)
            region = topo.region(rc) or "(region unknown)"
            yield _finding(
                "GPU011",
                rc,
                f"{rc.action_label} of a cluster: {region} loses all {lost} GPUs of its {len(pools)} GPU "
                "pool(s)"
                f"{_swap_note(rc)}",
                severity="critical",
                gpus_lost=lost,
            )


def _before_pool(topo: Topology, rc: ResourceChange) -> GpuPool | None:
    if rc.before is None:
        return None
    return topo._pool(dataclasses.replace(rc, after=None, after_unknown={}, actions=("delete",)))


def _swap_note(rc: ResourceChange) -> str:
    if rc.actions == ("create", "delete"):
        return " (create before delete: the new one needs its own quota while the old one still runs)"
    return ""


# ---------------------------------------------------------------------------------------------


def evaluate(ctx: Context, only: set[str] | None = None) -> list[Finding]:
    """Every policy's findings, in policy order."""
    out: list[Finding] = []
    for pid, check in _CHECKS.items():
        if only is None or pid in only:
            out.extend(check(ctx))
    return out


def skipped(ctx: Context) -> list[str]:
    """Policies that could not run for lack of context, with what would enable them."""
    notes = []
    if ctx.fleet is None:
        notes.append("GPU006 (budget) and GPU007 (tags) need --fleet FILE")
    elif ctx.fleet.settings.budget_per_hour is None:
        notes.append("GPU006 (budget): the fleet file sets no settings.budget_per_hour")
    if ctx.capacity is None:
        notes.append("GPU004 (quota) and the zone part of GPU005 need --capacity SNAPSHOT")
    return notes
