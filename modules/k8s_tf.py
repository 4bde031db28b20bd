"""Render a Kubernetes API object (a dict from `k8s_objects`) as the kubernetes provider's typed resource.

The provider's resources mirror the API, with differences that are regular but not uniform: names
are snake_case, repeated blocks take the singular (`containers` -> `container`), some single blocks
are lists of one (namespace_v1 `metadata`, probe `tcp_socket`), int-or-string fields are strings.
Rather than a hand-kept table, the conversion reads the generated Python bindings' own parameter
annotations (`Union['Struct', Dict]`, `Sequence[Union['Struct', ...]]`, `Mapping[str, str]`, `str`,
`jsii.Number`), so it follows the provider version installed. A field the provider does not have
raises `RenderError` naming it: schema drift shows in the tests, not at apply.
"""

from __future__ import annotations

import re
from typing import Any

_STRUCT = re.compile(r"typing\.Union\['(\w+)', typing\.Dict\[")
_RENAMES = {"clusterIP": "cluster_ip", "clusterIPs": "cluster_ips", "stringData": "data"}
_KINDS = {
    # kind: (module of cdktn_provider_kubernetes, class)
    "Namespace": ("namespace_v1", "NamespaceV1"),
    "ConfigMap": ("config_map_v1", "ConfigMapV1"),
    "Secret": ("secret_v1", "SecretV1"),
    "Deployment": ("deployment_v1", "DeploymentV1"),
    "PodDisruptionBudget": ("pod_disruption_budget_v1", "PodDisruptionBudgetV1"),
    "Service": ("service_v1", "ServiceV1"),
}


class RenderError(ValueError):
    """An API field the provider's resource does not take (or takes in another shape)."""


def _snake(name: str) -> str:
    return _RENAMES.get(name) or re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _param(annotations: dict[str, str], key: str, where: str) -> tuple[str, str]:
    name = _snake(key)
    if name in annotations:
        return name, annotations[name]
    if name.endswith("s") and name[:-1] in annotations:  # containers -> container, ports -> port
        return name[:-1], annotations[name[:-1]]
    raise RenderError(f"{where}: the kubernetes provider has no field for {key!r}")


def _value(module: Any, annotation: str, value: Any, where: str) -> Any:
    struct = _STRUCT.search(annotation)
    if struct:
        cls = getattr(module, struct.group(1))
        is_list = f"typing.Sequence[typing.Union['{cls.__name__}'" in annotation
        if is_list:
            items = value if isinstance(value, list) else [value]
            return [_struct(module, cls, item, f"{where}[{i}]") for i, item in enumerate(items)]
        if isinstance(value, list):
            raise RenderError(f"{where}: the provider takes one {cls.__name__}, not a list")
        return _struct(module, cls, value, where)
    if "typing.Mapping[builtins.str, builtins.str]" in annotation:
        return {str(k): str(v) for k, v in value.items()}
    if "typing.Sequence[builtins.str]" in annotation:
        return [str(v) for v in value]
    if "builtins.bool" in annotation:
        return bool(value)
    if "jsii.Number" in annotation:
        return value
    if "builtins.str" in annotation:
        return str(value)  # int-or-string fields: ports by number, budgets, replicas
    raise RenderError(f"{where}: cannot map a value onto {annotation}")


def _kwargs(module: Any, annotations: dict[str, str], obj: dict[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key, value in obj.items():
        name, annotation = _param(annotations, key, where)
        out[name] = _value(module, annotation, value, f"{where}.{key}")
    return out


def _struct(module: Any, cls: type[Any], obj: dict[str, Any], where: str) -> Any:
    if not isinstance(obj, dict):
        raise RenderError(f"{where}: expected an object for {cls.__name__}")
    return cls(**_kwargs(module, cls.__init__.__annotations__, obj, where))


def logical_id(obj: dict[str, Any]) -> str:
    """A stable construct id: kind + name (names are unique per kind within the namespace)."""
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}"


def render(scope: Any, obj: dict[str, Any], **options: Any):
    """The typed resource for `obj` under `scope`; `options` are Terraform-side settings
    (depends_on, wait_for_rollout, ...)."""
    import importlib

    kind = obj["kind"]
    if kind not in _KINDS:
        if "." not in obj.get("apiVersion", "").split("/")[0]:
            raise RenderError(f"no provider resource for Kubernetes kind {kind!r}")
        # A custom resource (KEDA, cert-manager): kubernetes_manifest takes the object as it is. Its
        # CRD must exist at plan time, which is why the add-ons that bring CRDs have their own stack.
        from cdktn_provider_kubernetes.manifest import Manifest

        return Manifest(scope, logical_id(obj), manifest=obj, **options)
    module_name, class_name = _KINDS[kind]
    module = importlib.import_module(f"cdktn_provider_kubernetes.{module_name}")
    cls = getattr(module, class_name)
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
    kwargs = _kwargs(module, cls.__init__.__annotations__, body, f"{kind}/{obj['metadata']['name']}")
    return cls(scope, logical_id(obj), **kwargs, **options)
