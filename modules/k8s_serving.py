"""vLLM engines on one region's cluster, through the kubernetes provider.

`K8sServing` renders `k8s_objects.namespace_objects` + `engine_objects` (the same description that
`gpufleet manifests` writes as YAML): the namespace, the fleet ConfigMap, the engine Deployment
(GPU limit = tensor parallel size, the GPU taint tolerated, model cache and memory-backed /dev/shm,
startup probe for 15 minutes of model load, readiness/liveness on /health), its PDB, a Service and
the headless Service the router resolves to find the engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from constructs import Construct
from gpufleet.modules import k8s_objects as k8s
from gpufleet.modules.k8s_tf import render

if TYPE_CHECKING:
    from gpufleet.stacks.spec import Fleet, Region


@dataclass(frozen=True)
class K8sServingProps:
    fleet: Fleet
    region: Region
    image: str = k8s.DEFAULT_IMAGE


@dataclass(frozen=True)
class K8sServingOutputs:
    namespace: str
    engine_service: str
    engines_dns: str  # host:port, what the router resolves
    engine_replicas: int


class K8sServing(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, props: K8sServingProps) -> None:
        super().__init__(scope, construct_id)
        w = k8s.workload(props.fleet, props.region, props.image)
        ns, configmap = (render(self, o) for o in k8s.namespace_objects(props.fleet))
        configmap.node.add_dependency(ns)
        self.namespace = ns
        self.fleet_config = configmap
        self.resources = []
        for obj in k8s.engine_objects(props.fleet, w):
            # Do not wait for the rollout: GPU nodes scale up from zero and the model loads for
            # minutes, far past the provider's 10-minute apply timeout.
            extra = {"wait_for_rollout": False} if obj["kind"] == "Deployment" else {}
            self.resources.append(render(self, obj, depends_on=[ns, configmap], **extra))
        self.outputs = K8sServingOutputs(
            namespace=k8s.NAMESPACE,
            engine_service=k8s.ENGINE,
            engines_dns=k8s.engines_dns(),
            engine_replicas=w.engine_replicas,
        )
