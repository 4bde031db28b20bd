"""Node pools as the Kubernetes scheduler sees them: taints and labels, GPU or not.

`pools.GpuPool` describes GPU pools for capacity and cost; this module describes EVERY pool of a
cluster (system pools too) by what decides where a pod may run: the pool's NoSchedule/NoExecute
taints, its node labels and whether its nodes offer `nvidia.com/gpu`. Taints and labels the cloud
adds on its own are modelled where they matter:

* AKS: a default pool with `only_critical_addons_enabled` carries `CriticalAddonsOnly=true:NoSchedule`;
  a Spot pool carries `kubernetes.azure.com/scalesetpriority=spot:NoSchedule` and the same label.
* GKE: a GPU pool carries `nvidia.com/gpu=present:NoSchedule`; every node has
  `cloud.google.com/gke-nodepool`, GPU nodes `cloud.google.com/gke-accelerator`.
* EKS: `eks.amazonaws.com/nodegroup` and `eks.amazonaws.com/capacityType` labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpufleet.stacks.plancheck.inputs import ResourceChange, blocks, dig, first, text_or
from gpufleet.stacks.plancheck.pools import GPU_TAINT_KEY, Taint, Topology, effect_name, parse_k8s_taint, truthy
from gpufleet.stacks.plancheck.regions import RegionStacks
from gpufleet.stacks.plancheck.workloads import Workload

SCHEDULING_EFFECTS = ("NoSchedule", "NoExecute")
CRITICAL_ADDONS = Taint("CriticalAddonsOnly", "true", "NoSchedule")
AZURE_SPOT = Taint("kubernetes.azure.com/scalesetpriority", "spot", "NoSchedule")
GKE_GPU = Taint(GPU_TAINT_KEY, "present", "NoSchedule")
# Node labels the kubelet or cloud sets that this module does not model (zone, instance type, arch,
# hostname): a selector on them is not judged.
_UNMODELLED_PREFIXES = (
    "kubernetes.io/",
    "node.kubernetes.io/",
    "topology.kubernetes.io/",
    "beta.kubernetes.io/",
    "failure-domain.beta.kubernetes.io/",
    "topology.gke.io/",
)


@dataclass
class NodePool:
    change: ResourceChange
    name: str
    taints: list[Taint] | None  # None: not known before apply
    labels: dict[str, str] | None
    gpu: bool

    def describe(self) -> str:
        taints = [t for t in self.taints or [] if t.effect in SCHEDULING_EFFECTS]
        shown = ", ".join(_taint_text(t) for t in taints) or "no taints"
        return f"{self.name} ({shown}{', GPU' if self.gpu else ''})"

    def why_not(self, w: Workload) -> list[str] | None:
        """Why `w` cannot run here ([] = it fits; None = not decidable from the plan)."""
        if self.taints is None or self.labels is None or w.tolerations is None or w.node_selector is None:
            return None
        reasons = []
        for t in self.taints:
            if t.effect in SCHEDULING_EFFECTS and not any(tol.tolerates(t) for tol in w.tolerations):
                reasons.append(f"taint {_taint_text(t)} not tolerated")
        for key, value in w.node_selector.items():
            if "${" in key or "${" in value:
                return None
            have = self.labels.get(key)
            if have is None and key.startswith(_UNMODELLED_PREFIXES):
                continue
            if have != value:
                reasons.append(f"no label {key}={value}")
        if w.requests_gpu and not self.gpu:
            reasons.append("no GPUs")
        return reasons


def _taint_text(t: Taint) -> str:
    return f"{t.key}={t.value}:{t.effect}" if t.value else f"{t.key}:{t.effect}"


def _labels(value: Any) -> dict[str, str] | None:
    if value is None:
        return {}
    if isinstance(value, list):
        value = first(value)
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    return None  # a token


def _with(taints: list[Taint] | None, implicit: Taint) -> list[Taint] | None:
    if taints is None or any(t.key == implicit.key and t.effect == implicit.effect for t in taints):
        return taints
    return [*taints, implicit]


def _azure_taints(raw: Any) -> list[Taint] | None:
    if raw is None:
        return []
    if not isinstance(raw, list):
        return None
    return [parse_k8s_taint(str(t)) for t in raw]


def _aws(rc: ResourceChange, gpu: bool) -> NodePool:
    v = rc.values
    name = text_or(v.get("node_group_name"), rc.name)
    taints = (
        None
        if rc.after_unknown.get("taint") is True
        else [Taint(str(t.get("key")), t.get("value"), effect_name(t.get("effect"))) for t in blocks(v.get("taint"))]
    )
    labels = _labels(v.get("labels"))
    if labels is not None:
        labels = {
            "eks.amazonaws.com/nodegroup": name,
            "eks.amazonaws.com/capacityType": str(v.get("capacity_type") or "ON_DEMAND"),
            **labels,
        }
    return NodePool(rc, name, taints, labels, gpu)


def _gke(rc: ResourceChange, name: str, node: dict[str, Any], gpu: bool, unknown: bool = False) -> NodePool:
    accels = blocks(node.get("guest_accelerator"))
    taints = (
        None
        if unknown
        else [Taint(str(t.get("key")), t.get("value"), effect_name(t.get("effect"))) for t in blocks(node.get("taint"))]
    )
    if gpu:
        taints = _with(taints, GKE_GPU)
    labels = _labels(node.get("labels"))
    if labels is not None:
        implicit = {"cloud.google.com/gke-nodepool": name}
        if accels and accels[0].get("type"):
            implicit["cloud.google.com/gke-accelerator"] = str(accels[0]["type"])
        if truthy(node.get("spot")):
            implicit["cloud.google.com/gke-spot"] = "true"
        labels = {**implicit, **labels}
    return NodePool(rc, name, taints, labels, gpu)


def _aks(rc: ResourceChange, pool: dict[str, Any], gpu: bool, default: bool) -> NodePool:
    name = text_or(pool.get("name"), rc.name)
    taints = _azure_taints(pool.get("node_taints"))
    labels = _labels(pool.get("node_labels"))
    spot = str(pool.get("priority", "")).lower() == "spot"
    if default and truthy(pool.get("only_critical_addons_enabled")):
        taints = _with(taints, CRITICAL_ADDONS)
    if spot:
        taints = _with(taints, AZURE_SPOT)
    if labels is not None:
        implicit = {"kubernetes.azure.com/agentpool": name, "agentpool": name}
        if spot:
            implicit["kubernetes.azure.com/scalesetpriority"] = "spot"
        labels = {**implicit, **labels}
    return NodePool(rc, f"{name}{' (default pool)' if default else ''}", taints, labels, gpu)


def node_pools(topology: Topology, region: RegionStacks) -> list[NodePool]:
    """Every node pool of the region's cluster stack(s)."""
    gpu = {(p.change.stack, p.change.address) for p in topology.pools}
    out: list[NodePool] = []
    for rc in region.of("cluster"):
        is_gpu = (rc.stack, rc.address) in gpu
        v = rc.values
        if rc.type == "aws_eks_node_group":
            out.append(_aws(rc, is_gpu))
        elif rc.type == "google_container_node_pool":
            name = text_or(v.get("name"), rc.name)
            out.append(_gke(rc, name, first(v.get("node_config")), is_gpu, rc.after_unknown.get("node_config") is True))
        elif rc.type == "google_container_cluster":
            inline = blocks(v.get("node_pool"))
            for p in inline:
                node = first(p.get("node_config"))
                name = str(p.get("name") or "default-pool")
                out.append(_gke(rc, name, node, bool(blocks(node.get("guest_accelerator")))))
            if not inline and not truthy(v.get("remove_default_node_pool")):
                node = first(v.get("node_config"))
                out.append(_gke(rc, "default-pool", node, bool(blocks(node.get("guest_accelerator")))))
        elif rc.type == "azurerm_kubernetes_cluster":
            pool = first(v.get("default_node_pool"))
            if pool:
                size = str(pool.get("vm_size", ""))
                out.append(_aks(rc, pool, size.startswith("Standard_N"), default=True))
        elif rc.type == "azurerm_kubernetes_cluster_node_pool":
            out.append(_aks(rc, v, is_gpu, default=False))
    return out


def dynamic_provisioning(region: RegionStacks) -> str | None:
    """Why the region's node shapes are not fixed by its pools (nodes made to fit pending pods)."""
    charts = region.charts()
    if "karpenter" in charts:
        return "Karpenter provisions its nodes"
    for rc in region.changes:
        v = rc.values
        if rc.type == "aws_eks_cluster" and truthy(dig(v, "compute_config", "enabled")):
            return "EKS Auto Mode provisions its nodes"
        if rc.type == "google_container_cluster" and truthy(dig(v, "cluster_autoscaling", "enabled")):
            return "GKE node auto-provisioning creates pools"
        if rc.type == "azurerm_kubernetes_cluster" and str(dig(v, "node_provisioning_profile", "mode")) == "Auto":
            return "AKS node auto-provisioning creates nodes"
    return None
