"""Kubernetes workloads as the policies see them: a pod template read out of a provider resource.

The kubernetes provider's typed resources (`kubernetes_deployment_v1`, `kubernetes_daemon_set_v1`,
`kubernetes_stateful_set_v1` and their older spellings) write the pod spec in snake_case with
singular repeated blocks (`container`, `toleration`, `volume`); `kubernetes_manifest` carries the API
object itself (camelCase, plural). Both become one `Workload`: containers (image, args, env, GPU
request), volumes, tolerations, node selector and labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpufleet.stacks.plancheck.inputs import ResourceChange, blocks, dig, first
from gpufleet.stacks.plancheck.pools import Taint, effect_name, truthy

WORKLOAD_TYPES = {
    "kubernetes_deployment": "Deployment",
    "kubernetes_deployment_v1": "Deployment",
    "kubernetes_daemonset": "DaemonSet",
    "kubernetes_daemon_set_v1": "DaemonSet",
    "kubernetes_stateful_set": "StatefulSet",
    "kubernetes_stateful_set_v1": "StatefulSet",
}
MANIFEST_KINDS = ("Deployment", "DaemonSet", "StatefulSet")
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class SecretRef:
    name: str
    optional: bool
    via: str  # how the pod reads it, for messages: "env HF_TOKEN", "volume hf-token"


@dataclass
class EnvVar:
    name: str
    value: Any = None
    secret: SecretRef | None = None


@dataclass
class Container:
    name: str
    image: str | None
    args: list[str]
    env: list[EnvVar]
    env_from_secrets: list[SecretRef]
    mounts: dict[str, str]  # volume name -> mount path
    requests_gpu: bool


@dataclass
class Volume:
    name: str
    secrets: list[SecretRef] = field(default_factory=list)  # secret volume, or a projected one's sources
    csi_driver: str | None = None


@dataclass(frozen=True)
class Toleration:
    key: str
    operator: str  # Equal | Exists
    value: str
    effect: str  # "" = every effect

    def tolerates(self, taint: Taint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if not self.key:
            return self.operator == "Exists"
        if self.key != taint.key:
            return False
        return self.operator == "Exists" or self.value == (taint.value or "")

    def __str__(self) -> str:
        what = self.key or "*"
        if self.operator != "Exists":
            what += f"={self.value}"
        return f"{what}:{self.effect or '*'}"


@dataclass
class Workload:
    change: ResourceChange
    kind: str
    name: str
    labels: dict[str, str]
    containers: list[Container]  # init containers included
    volumes: list[Volume]
    tolerations: list[Toleration] | None  # None: not known before apply
    node_selector: dict[str, str] | None

    @property
    def requests_gpu(self) -> bool:
        return any(c.requests_gpu for c in self.containers)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


def _get(d: dict[str, Any], snake: str, camel: bool) -> Any:
    if not camel:
        return d.get(snake)
    head, *rest = snake.split("_")
    return d.get(head + "".join(p.title() for p in rest))


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _str_map(value: Any) -> dict[str, str] | None:
    if isinstance(value, list):
        value = first(value) if value else {}
    if isinstance(value, dict):
        return {str(k): _text(v) for k, v in value.items()}
    return None


def _container(c: dict[str, Any], camel: bool) -> Container:
    env = []
    for e in blocks(c.get("env")):
        ref = first(dig(e, "valueFrom" if camel else "value_from", "secretKeyRef" if camel else "secret_key_ref"))
        name = _text(e.get("name"))
        secret = None
        if ref.get("name"):
            secret = SecretRef(_text(ref["name"]), truthy(ref.get("optional")), f"env {name}")
        env.append(EnvVar(name, e.get("value"), secret))
    env_from = []
    for e in blocks(_get(c, "env_from", camel)):
        ref = first(_get(e, "secret_ref", camel))
        if ref.get("name"):
            env_from.append(SecretRef(_text(ref["name"]), truthy(ref.get("optional")), "envFrom"))
    mounts = {
        _text(m.get("name")): _text(_get(m, "mount_path", camel))
        for m in blocks(_get(c, "volume_mounts" if camel else "volume_mount", camel))
    }
    resources = first(c.get("resources"))
    wants = False
    for kind in ("limits", "requests"):
        amounts = _str_map(resources.get(kind)) or {}
        if amounts.get(GPU_RESOURCE, "0") not in ("0", ""):
            wants = True
    command, args = c.get("command"), c.get("args")
    argv = [*(command if isinstance(command, list) else []), *(args if isinstance(args, list) else [])]
    image = c.get("image")
    return Container(
        name=_text(c.get("name")) or "?",
        image=image if isinstance(image, str) else None,
        args=[_text(a) for a in argv],  # args too: a number in a plan's args is text to the policies
        env=env,
        env_from_secrets=env_from,
        mounts=mounts,
        requests_gpu=wants,
    )


def _volume(v: dict[str, Any], camel: bool) -> Volume:
    name = _text(v.get("name"))
    vol = Volume(name)
    secret = first(v.get("secret"))
    secret_name = _get(secret, "secret_name", camel)
    if secret_name:
        vol.secrets.append(SecretRef(_text(secret_name), truthy(secret.get("optional")), f"volume {name}"))
    for source in blocks(first(v.get("projected")).get("sources")):
        for s in blocks(source.get("secret")):
            if s.get("name"):
                vol.secrets.append(SecretRef(_text(s["name"]), truthy(s.get("optional")), f"volume {name}"))
    driver = first(v.get("csi")).get("driver")
    vol.csi_driver = _text(driver) or None
    return vol


def workload_of(rc: ResourceChange) -> Workload | None:
    """The workload a resource declares, or None when it is not a Deployment/DaemonSet/StatefulSet."""
    if rc.type == "kubernetes_manifest":
        manifest = rc.values.get("manifest")
        if not isinstance(manifest, dict) or manifest.get("kind") not in MANIFEST_KINDS:
            return None
        kind, camel, meta, spec = manifest["kind"], True, manifest.get("metadata"), manifest.get("spec")
    elif rc.type in WORKLOAD_TYPES:
        kind, camel, meta, spec = WORKLOAD_TYPES[rc.type], False, rc.values.get("metadata"), rc.values.get("spec")
    else:
        return None
    template = first(first(spec).get("template"))
    pod = first(template.get("spec"))
    if not pod:
        return None
    labels = {
        **(_str_map(first(meta).get("labels")) or {}),
        **(_str_map(first(template.get("metadata")).get("labels")) or {}),
    }
    containers = [
        _container(c, camel)
        for key in (("containers", "initContainers") if camel else ("container", "init_container"))
        for c in blocks(pod.get(key))
    ]
    tol_key = "tolerations" if camel else "toleration"
    tolerations: list[Toleration] | None = [
        Toleration(
            key=_text(t.get("key")),
            operator=_text(t.get("operator")) or "Equal",
            value=_text(t.get("value")),
            effect=effect_name(t.get("effect")) if t.get("effect") else "",
        )
        for t in blocks(pod.get(tol_key))
    ]
    if isinstance(pod.get(tol_key), str):  # a token
        tolerations = None
    selector_raw = _get(pod, "node_selector", camel)
    node_selector = {} if selector_raw is None else _str_map(selector_raw)
    return Workload(
        change=rc,
        kind=kind,
        name=_text(first(meta).get("name")) or rc.name,
        labels=labels,
        containers=containers,
        volumes=[_volume(v, camel) for v in blocks(pod.get("volumes" if camel else "volume"))],
        tolerations=tolerations,
        node_selector=node_selector,
    )


def workloads(changes: list[ResourceChange]) -> list[Workload]:
    return [w for w in (workload_of(rc) for rc in changes) if w is not None]


def secrets_created(changes: list[ResourceChange]) -> set[str]:
    """Names of the Kubernetes Secrets these resources create (typed, manifest or ExternalSecret)."""
    out = set()
    for rc in changes:
        if rc.type in ("kubernetes_secret", "kubernetes_secret_v1"):
            name = first(rc.values.get("metadata")).get("name")
        elif rc.type == "kubernetes_manifest" and isinstance(rc.values.get("manifest"), dict):
            manifest = rc.values["manifest"]
            if manifest.get("kind") == "Secret":
                name = first(manifest.get("metadata")).get("name")
            elif manifest.get("kind") == "ExternalSecret":  # external-secrets.io: a cloud secret store
                name = dig(manifest, "spec", "target", "name") or first(manifest.get("metadata")).get("name")
            else:
                continue
        else:
            continue
        if isinstance(name, str):
            out.add(name)
    return out
