"""Policies on what a GPU pool needs beyond itself: a way for its GPUs to become schedulable
(driver + device plugin) and a node autoscaler that grows it (GPU013, GPU014).

Both look at the pool's whole region (`regions.py`): the cluster stack, the add-ons stack with its
Helm releases, and the serving stack. When the region's add-ons stack is not among the inputs (a plan
of the cluster stack alone), a missing add-on is reported as not checked, not as a finding.
"""

from __future__ import annotations

from collections.abc import Iterator

from gpufleet.stacks.plancheck.inputs import dig, first
from gpufleet.stacks.plancheck.policy_base import Context, Finding, Policy, finding, live_pools, policy
from gpufleet.stacks.plancheck.pools import GpuPool, truthy
from gpufleet.stacks.plancheck.regions import RegionStacks
from gpufleet.stacks.plancheck.workloads import workloads

DEVICE_PLUGIN = "nvidia-device-plugin"
GPU_OPERATOR = "gpu-operator"
AUTOSCALERS = ("cluster-autoscaler", "karpenter")


def _installs(region: RegionStacks, what: str) -> bool:
    """The region installs `what` (a chart name) as a Helm release, an EKS add-on or its own workload."""
    if what in region.charts():
        return True
    for rc in region.changes:
        if rc.type == "aws_eks_addon" and what in str(rc.values.get("addon_name", "")):
            return True
    for w in workloads(region.changes):
        if what in w.name or any(what in (c.image or "") for c in w.containers):
            return True
    return False


def _gke_driver_installer(region: RegionStacks) -> bool:
    return any("nvidia-driver-installer" in w.name for w in workloads(region.changes))


def _missing(ctx: Context, region: RegionStacks | None, pid: str, what: str) -> bool:
    """True where the finding stands; False (with a note) where the add-ons stack was not given."""
    if region is None or region.has("addons"):
        return True
    ctx.not_checked(
        f"{pid} ({region.key}): no {region.key}-addons stack in the input, so the {what} was not looked for"
    )
    return False


_GPU013_FIX = {
    "aws": (
        'use ami_type = "BOTTLEROCKET_x86_64_NVIDIA" (driver and device plugin built in), or keep the '
        "AL2023/AL2 accelerated AMI and install the NVIDIA device plugin (helm_release chart "
        "nvidia-device-plugin, or gpu-operator) in the region's add-ons stack"
    ),
    "gcp": (
        "let GKE install the driver: node_config.guest_accelerator { gpu_driver_installation_config { "
        'gpu_driver_version = "LATEST" } } (or "DEFAULT"); GKE runs the device plugin itself. With '
        "INSTALLATION_DISABLED, install the gpu-operator chart in the add-ons stack"
    ),
    "azure": (
        'keep gpu_driver = "Install" and add a helm_release of chart nvidia-device-plugin '
        "(https://nvidia.github.io/k8s-device-plugin, tolerating the GPU and spot taints) to the region's "
        'add-ons stack, or set gpu_driver = "None" and install the gpu-operator chart'
    ),
}


@policy(
    Policy(
        id="GPU013",
        title="GPU pools have a path to schedulable GPUs (driver and device plugin)",
        severity="critical",
        rationale=(
            "A node offers nvidia.com/gpu to the scheduler only when the NVIDIA driver is installed AND a "
            "device plugin advertises the GPUs. Without either, GPU pods stay Pending on nodes that are "
            "billed by the hour. EKS: the Bottlerocket NVIDIA AMIs bring both; the AL2023/AL2 accelerated "
            'AMIs bring the driver only; other AMI types have no driver. AKS: gpu_driver = "Install" (the '
            "default) installs the driver only, so the device plugin (or the GPU Operator) must be "
            'installed; with gpu_driver = "None" the GPU Operator must install the driver too. GKE runs the '
            "device plugin itself and installs the driver when guest_accelerator asks for a "
            "gpu_driver_version; otherwise (unset means no driver) the GPU Operator must."
        ),
        fix=(
            "aws: a Bottlerocket NVIDIA ami_type, or the device plugin chart with an accelerated AMI; gcp: "
            "gpu_driver_installation_config.gpu_driver_version = LATEST; azure: gpu_driver = Install plus the "
            "nvidia-device-plugin chart, or gpu_driver = None plus gpu-operator"
        ),
        fix_by_cloud=_GPU013_FIX,
    )
)
def _schedulable(ctx: Context) -> Iterator[Finding]:
    for pool in live_pools(ctx.topology.pools):
        rc, v = pool.change, pool.change.values
        region = ctx.regions.of_stack(rc.stack)
        plugin = region is not None and (_installs(region, DEVICE_PLUGIN) or _installs(region, GPU_OPERATOR))
        operator = region is not None and _installs(region, GPU_OPERATOR)
        problem = None
        if pool.cloud == "aws":
            problem = _aws_problem(ctx, pool, plugin, region)
        elif pool.cloud == "azure":
            driver = v.get("gpu_driver")
            if driver is not None and not isinstance(driver, str):
                continue
            if driver == "None" and not operator and _missing(ctx, region, "GPU013", "GPU Operator"):
                problem = 'gpu_driver = "None" skips the driver, and no gpu-operator helm_release installs it'
            elif driver != "None" and not plugin and _missing(ctx, region, "GPU013", "NVIDIA device plugin"):
                setting = f'gpu_driver = "{driver}"' if driver else "gpu_driver unset (Install)"
                problem = (
                    f"{setting} installs the NVIDIA driver only, and no "
                    "nvidia-device-plugin or gpu-operator helm_release advertises nvidia.com/gpu"
                )
        elif pool.cloud == "gcp":
            version = _gke_driver_version(pool)
            if version == "token" or (version is not None and version != "INSTALLATION_DISABLED"):
                continue
            if region is not None and (operator or _gke_driver_installer(region)):
                continue
            if _missing(ctx, region, "GPU013", "GPU Operator"):
                problem = (
                    "guest_accelerator asks for no GPU driver (no gpu_driver_installation_config), and no "
                    "gpu-operator installs one"
                    if version is None
                    else 'gpu_driver_version = "INSTALLATION_DISABLED", and no gpu-operator installs the driver'
                )
        if problem:
            yield finding(
                "GPU013",
                rc,
                f"{problem}: the nodes never advertise nvidia.com/gpu and GPU pods stay Pending",
                cloud=pool.cloud,
            )


def _gke_driver_version(pool: GpuPool) -> str | None:
    """The pool's gpu_driver_version ("token" where the plan does not know it; None: no driver)."""
    node = first(pool.change.values.get("node_config"))
    accel = first(node.get("guest_accelerator"))
    version = dig(accel, "gpu_driver_installation_config", "gpu_driver_version")
    if isinstance(version, str) and "${" in version:
        return "token"
    if not isinstance(version, str) or version.upper() in ("", "GPU_DRIVER_VERSION_UNSPECIFIED"):
        return None
    return version.upper()


def _aws_problem(ctx: Context, pool: GpuPool, plugin: bool, region: RegionStacks | None) -> str | None:
    raw = str(pool.change.values.get("ami_type") or "")
    ami = raw.upper()
    if ami.startswith("BOTTLEROCKET") and "NVIDIA" in ami:
        return None
    if ami == "CUSTOM" or "${" in ami:
        return None  # the launch template's own AMI: what it holds is not in the plan
    if "NVIDIA" in ami or "GPU" in ami or not ami:
        if plugin or not _missing(ctx, region, "GPU013", "NVIDIA device plugin"):
            return None
        which = f"ami_type {raw}" if ami else "ami_type unset (EKS picks its accelerated Amazon Linux AMI)"
        return (
            f"{which} brings the NVIDIA driver but no device plugin, and no nvidia-device-plugin or "
            "gpu-operator is installed"
        )
    if pool.gpu is None:
        return None
    return f"ami_type {raw} has no NVIDIA driver, yet {pool.instance_type} is a GPU instance type"


@policy(
    Policy(
        id="GPU014",
        title="Scalable GPU node groups have a node autoscaler",
        severity="high",
        rationale=(
            "An EKS managed node group does not scale itself: min_size and max_size are bounds for an "
            "autoscaler, and without one the group stays at desired_size (0 for a scale-to-zero GPU pool) "
            "while engine pods stay Pending. EKS has no built-in node autoscaler unless Auto Mode is on; "
            "Cluster Autoscaler or Karpenter must run in the cluster with an identity allowed to change the "
            "group. AKS and GKE pools autoscale natively when their autoscaling is on (GPU002 checks that)."
        ),
        fix=(
            "add a node autoscaler with its identity: a helm_release of cluster-autoscaler (an IAM role through "
            "EKS Pod Identity or IRSA, auto-discovery tags on the node groups) or karpenter, or turn on EKS Auto "
            "Mode (aws_eks_cluster compute_config { enabled = true })"
        ),
    )
)
def _autoscaler(ctx: Context) -> Iterator[Finding]:
    for pool in live_pools(ctx.topology.pools):
        if pool.cloud != "aws" or pool.min_nodes is None or pool.max_nodes is None:
            continue
        if pool.min_nodes >= pool.max_nodes:
            continue
        region = ctx.regions.of_stack(pool.change.stack)
        if region is not None and (_auto_mode(region) or any(_installs(region, a) for a in AUTOSCALERS)):
            continue
        if not _missing(ctx, region, "GPU014", "node autoscaler"):
            continue
        desired = first(pool.change.values.get("scaling_config")).get("desired_size")
        where = region.key if region else pool.change.stack
        yield finding(
            "GPU014",
            pool.change,
            f"the GPU node group may scale {pool.min_nodes}..{pool.max_nodes} nodes but {where} has no node "
            "autoscaler (no cluster-autoscaler or karpenter helm_release, EKS Auto Mode off): it stays at "
            f"desired_size {desired if desired is not None else '(unset)'} and GPU pods stay Pending",
            cloud="aws",
        )


def _auto_mode(region: RegionStacks) -> bool:
    return any(
        rc.type == "aws_eks_cluster" and truthy(dig(rc.values, "compute_config", "enabled")) for rc in region.changes
    )
