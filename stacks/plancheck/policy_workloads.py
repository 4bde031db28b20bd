"""Policies on Kubernetes workloads: serving probes, placement, images, model-hub tokens
(GPU010, GPU015, GPU017, GPU018)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from gpufleet.stacks import catalog
from gpufleet.stacks.plancheck.inputs import ResourceChange, blocks, dig, first
from gpufleet.stacks.plancheck.nodes import dynamic_provisioning, node_pools
from gpufleet.stacks.plancheck.policy_base import Context, Finding, Policy, finding, policy
from gpufleet.stacks.plancheck.regions import RegionStacks, live
from gpufleet.stacks.plancheck.workloads import Workload, secrets_created, workload_of, workloads

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
                yield finding("GPU010", rc, f"container {c.get('name', '?')} lacks: {', '.join(missing)}")


def _cloud(ctx: Context, region: RegionStacks | None, rc: ResourceChange) -> str | None:
    if region is not None and region.cloud:
        return region.cloud
    found = ctx.topology.regions.get(rc.stack)
    return found[0] if found else None


# -- GPU015 placement -----------------------------------------------------------------------------


def _asks(w: Workload) -> str:
    tolerates = ", ".join(str(t) for t in w.tolerations or []) or "nothing"
    selects = ", ".join(f"{k}={v}" for k, v in (w.node_selector or {}).items()) or "no node selector"
    gpu = "; requests nvidia.com/gpu" if w.requests_gpu else ""
    return f"tolerates {tolerates}; {selects}{gpu}"


@policy(
    Policy(
        id="GPU015",
        title="Every workload fits a node pool of its cluster",
        severity="high",
        rationale=(
            "A pod schedules only on a node whose NoSchedule/NoExecute taints it tolerates, whose labels "
            "match its node selector and, for a GPU pod, that has GPUs. A workload that fits no pool of its "
            "cluster stays Pending for ever, and Terraform waits for its rollout until the apply times out. "
            "The clouds add taints of their own: AKS taints a system pool with only_critical_addons_enabled "
            "(CriticalAddonsOnly) and Spot pools (kubernetes.azure.com/scalesetpriority=spot), GKE taints GPU "
            "pools (nvidia.com/gpu=present). The pack checks each Deployment, DaemonSet and StatefulSet of a "
            "region's serving and add-on stacks against every pool of the region's cluster stack."
        ),
        fix=(
            "give the pod template tolerations and a node selector that match a pool, or add a pool the "
            "workload fits (aws_eks_node_group taint/labels; google_container_node_pool node_config.taint/"
            "labels; azurerm node_taints/node_labels)"
        ),
        fix_by_cloud={
            "aws": (
                "give the pod template tolerations (spec.template.spec.toleration) and a node_selector that "
                "match a node group, or add a node group it fits (aws_eks_node_group taint / labels)"
            ),
            "gcp": (
                "give the pod template tolerations (spec.template.spec.toleration; GKE GPU pools carry "
                "nvidia.com/gpu=present:NoSchedule) and a node_selector that match a pool, or add a pool it "
                "fits (google_container_node_pool node_config.taint / node_config.labels)"
            ),
            "azure": (
                "tolerate the pool's taints (CriticalAddonsOnly Exists for a system pool with "
                "only_critical_addons_enabled = true; kubernetes.azure.com/scalesetpriority=spot for Spot "
                "pools) and select its labels, or add a user pool it fits (azurerm_kubernetes_cluster_node_pool "
                "node_taints / node_labels)"
            ),
        },
    )
)
def _placement(ctx: Context) -> Iterator[Finding]:
    for region in ctx.regions:
        found = workloads(region.of("serving", "addons"))
        if not found:
            continue
        if not region.has("cluster"):
            ctx.not_checked(
                f"GPU015 ({region.key}): no {region.key}-cluster stack in the input, so its workloads' "
                "placement was not checked"
            )
            continue
        dynamic = dynamic_provisioning(region)
        if dynamic:
            ctx.not_checked(f"GPU015 ({region.key}): {dynamic}, so workload placement was not judged")
            continue
        pools = node_pools(ctx.topology, region)
        clusters = ", ".join(region.stack_names("cluster"))
        for w in found:
            verdicts = [(p, p.why_not(w)) for p in pools]
            if any(reasons is None or not reasons for _, reasons in verdicts):
                continue
            why = "; ".join(f"{p.describe()}: {', '.join(reasons or [])}" for p, reasons in verdicts)
            yield finding(
                "GPU015",
                w.change,
                f"{w.label} ({_asks(w)}) fits no node pool of {clusters}: {why or 'the cluster has no pools'}",
                cloud=_cloud(ctx, region, w.change),
                workload=w.name,
                pools=[p.name for p in pools],
            )


# -- GPU017 images --------------------------------------------------------------------------------


def docker_hub_reference(image: str | None) -> str | None:
    """Where an image that names no registry is pulled from (docker.io/...); None when it names one
    (or is not known before apply)."""
    if not image or "${" in image:
        return None
    head, slash, _ = image.partition("/")
    if slash and ("." in head or ":" in head or head == "localhost"):
        return None
    return f"docker.io/{image}" if slash else f"docker.io/library/{image}"


@policy(
    Policy(
        id="GPU017",
        title="Container images name their registry",
        severity="high",
        rationale=(
            "An image reference whose first path component has no '.' or ':' (and is not localhost) is a "
            "Docker Hub name: gpufleet-serving:0.1.0 means docker.io/library/gpufleet-serving:0.1.0, which "
            "does not exist, so the pods never start (ErrImagePull). Even where the Docker Hub image exists, "
            "anonymous pulls are rate-limited per node IP, which bites exactly when an autoscaler adds GPU "
            "nodes. A registry path, pinned by digest, says where the image comes from and what it is."
        ),
        fix=(
            "name the registry, pinned by digest (ghcr.io/<org>/<name>@sha256:...; gpufleet: serving.image in "
            "the fleet file or `gpufleet synth --image`); a Docker Hub image as docker.io/<namespace>/<name>"
        ),
        fix_by_cloud={
            "aws": (
                "name the registry, pinned by digest, e.g. <account>.dkr.ecr.<region>.amazonaws.com/<name>"
                "@sha256:... (gpufleet: serving.image in the fleet file or `gpufleet synth --image`); a "
                "Docker Hub image as docker.io/<namespace>/<name> or an ECR pull-through cache"
            ),
            "gcp": (
                "name the registry, pinned by digest, e.g. <region>-docker.pkg.dev/<project>/<repository>/"
                "<name>@sha256:... (gpufleet: serving.image in the fleet file or `gpufleet synth --image`); a "
                "Docker Hub image as docker.io/<namespace>/<name> or an Artifact Registry remote repository"
            ),
            "azure": (
                "name the registry, pinned by digest, e.g. <registry>.azurecr.io/<name>@sha256:... (gpufleet: "
                "serving.image in the fleet file or `gpufleet synth --image`); a Docker Hub image as "
                "docker.io/<namespace>/<name> or an ACR cache rule"
            ),
        },
    )
)
def _registry(ctx: Context) -> Iterator[Finding]:
    for rc in ctx.inputs.changes:
        w = workload_of(rc) if live(rc) else None
        if w is None:
            continue
        seen = set()
        for c in w.containers:
            hub = docker_hub_reference(c.image)
            if hub is None or c.image in seen:
                continue
            seen.add(c.image)
            yield finding(
                "GPU017",
                rc,
                f"{w.label} container {c.name} image {c.image!r} names no registry: it is pulled from "
                f"Docker Hub as {hub}",
                cloud=_cloud(ctx, ctx.regions.of_stack(rc.stack), rc),
                image=c.image,
            )


# -- GPU018 model-hub token -----------------------------------------------------------------------

ENGINE_NAME = "gpufleet-engine"
HF_TOKEN_ENV = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_HUB_TOKEN", "HUGGINGFACE_TOKEN"}
_HF = re.compile(r"(^|[^a-z0-9])hf([^a-z0-9]|$)|hugging", re.IGNORECASE)


def _model_args(w: Workload) -> list[str]:
    """Values of `--model X` / `--model=X` in the containers' command and args."""
    out = []
    for c in w.containers:
        for i, a in enumerate(c.args):
            if a == "--model" and i + 1 < len(c.args):
                out.append(c.args[i + 1])
            elif a.startswith("--model="):
                out.append(a.split("=", 1)[1])
    return out


def _is_engine(w: Workload) -> bool:
    return w.labels.get("app.kubernetes.io/name") == ENGINE_NAME or bool(_model_args(w))


def _gated_model(ctx: Context, w: Workload) -> tuple[str, catalog.Model] | None:
    """(name as served, catalog record) of the gated model the engine serves, if it is one."""
    named = _model_args(w)
    if ctx.fleet is not None:
        for m in ctx.fleet.models:
            if m.name in named:
                return (m.name, m.shape) if m.shape.gated else None
    words = {s.casefold() for s in named}
    for c in w.containers:
        words.update(a.casefold() for a in c.args)
        words.update(str(e.value).casefold() for e in c.env if isinstance(e.value, str))
    for shape in catalog.models().values():
        if shape.gated and (shape.key.casefold() in words or shape.hf_id.casefold() in words):
            return shape.key, shape
    return None


def _token_sources(w: Workload) -> tuple[list[Any], bool]:
    """(Secret references that may carry the token, whether a source without a Secret exists)."""
    refs = []
    direct = False
    mounted: dict[str, str] = {}
    for c in w.containers:
        mounted.update(c.mounts)
        for e in c.env:
            if e.name in HF_TOKEN_ENV or e.name == "HF_TOKEN_PATH":
                if e.secret is not None:
                    refs.append(e.secret)
                elif e.name != "HF_TOKEN_PATH" and e.value not in (None, ""):
                    direct = True  # a literal or variable value
        refs.extend(s for s in c.env_from_secrets if _HF.search(s.name))
    for v in w.volumes:
        if v.name not in mounted:
            continue
        about_hf = bool(_HF.search(v.name) or _HF.search(mounted[v.name]))
        refs.extend(s for s in v.secrets if about_hf or _HF.search(s.name))
        if v.csi_driver and about_hf:
            direct = True  # a cloud secret store through the Secrets Store CSI driver
    return refs, direct


_STORE = {
    "aws": "AWS Secrets Manager",
    "gcp": "Google Secret Manager",
    "azure": "Azure Key Vault",
}


def _token_fix(cloud: str | None) -> str:
    store = _STORE.get(cloud or "", "the cloud's secret store")
    return (
        "create the Secret from a sensitive Terraform variable (kubernetes_secret_v1 with data token = "
        "var.hf_token; gpufleet: serving.hf_token: variable), or reference an operator-made Secret without "
        "optional (serving.hf_token: existing-secret) or one synced from "
        f"{store} (External Secrets, Secrets Store CSI), and read it as HF_TOKEN (env value_from "
        "secret_key_ref) or a mounted secret volume"
    )


@policy(
    Policy(
        id="GPU018",
        title="Engines serving a gated model have a Hugging Face token",
        severity="high",
        rationale=(
            "Gated models (Llama and others; the catalog marks them gated) download only with the token of "
            "an account that accepted the model's license. An engine with no token, or whose token comes "
            "from an optional Secret nothing creates, starts, fails the download with 401/403 and crash-"
            "loops while its GPU node is billed. A required reference to a Secret the stacks do not create "
            "is accepted: the operator makes that Secret, and the pod waits for it visibly."
        ),
        fix=_token_fix(None),
        fix_by_cloud={cloud: _token_fix(cloud) for cloud in _STORE},
    )
)
def _hf_token(ctx: Context) -> Iterator[Finding]:
    for rc in ctx.inputs.changes:
        w = workload_of(rc) if live(rc) else None
        if w is None or not _is_engine(w):
            continue
        gated = _gated_model(ctx, w)
        if gated is None:
            continue
        served, model = gated
        region = ctx.regions.of_stack(rc.stack)
        what = f"{w.label} serves {served} ({model.hf_id}), gated on Hugging Face"
        refs, direct = _token_sources(w)
        if direct:
            continue
        cloud = _cloud(ctx, region, rc)
        if not refs:
            yield finding(
                "GPU018",
                rc,
                f"{what}, but reads no token: no HF_TOKEN from a Secret and no token Secret mounted",
                cloud=cloud,
                model=model.hf_id,
            )
            continue
        created = secrets_created(region.changes if region else [rc])
        if any(not r.optional or r.name in created for r in refs):
            continue
        names = ", ".join(sorted({f"{r.name} ({r.via})" for r in refs}))
        yield finding(
            "GPU018",
            rc,
            f"{what}, but its token Secret {names} is optional and no stack creates it: the engine starts "
            "without a token and the download fails",
            cloud=cloud,
            model=model.hf_id,
        )
