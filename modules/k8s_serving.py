"""vLLM engines on one region's cluster, through the kubernetes provider.

`K8sServing` renders `k8s_objects.namespace_objects` + `engine_objects` + `autoscaling_objects` (the
same description that `gpufleet manifests` writes as YAML): the namespace, the fleet ConfigMap, the
Hugging Face token Secret (from a sensitive Terraform variable, when the fleet says so), the engine
Deployment (GPU limit = tensor parallel size, the pool's taints tolerated, model cache and
memory-backed /dev/shm, startup probe for 15 minutes of model load, readiness/liveness on /health),
its PDB, a Service, the headless Service the router resolves to find the engines, and KEDA's
ScaledObject that owns the engine count (so Terraform ignores `replicas` after the first apply).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cdktn import TerraformResourceLifecycle
from constructs import Construct
from gpufleet.modules import k8s_objects as k8s
from gpufleet.modules.k8s_autoscaling import autoscaling_objects
from gpufleet.modules.k8s_tf import render

if TYPE_CHECKING:
    from gpufleet.stacks.spec import Fleet, Region


@dataclass(frozen=True)
class K8sServingProps:
    fleet: Fleet
    region: Region
    image: str
    hf_token: str | None = None  # a Terraform reference (sensitive variable) when the stack makes the Secret


@dataclass(frozen=True)
class K8sServingOutputs:
    namespace: str
    engine_service: str
    engines_dns: str  # host:port, what the router resolves
    min_engines: int
    max_engines: int


class K8sServing(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, props: K8sServingProps) -> None:
        super().__init__(scope, construct_id)
        w = k8s.workload(props.fleet, props.region, props.image)
        ns, configmap = (render(self, o) for o in k8s.namespace_objects(props.fleet))
        configmap.node.add_dependency(ns)
        self.namespace = ns
        self.fleet_config = configmap
        self.resources = []
        deps = [ns, configmap]
        if props.hf_token is not None:
            deps.append(render(self, k8s.hf_secret_object(props.fleet, props.hf_token), depends_on=[ns]))
        for obj in k8s.engine_objects(props.fleet, w):
            extra = {}
            if obj["kind"] == "Deployment":
                extra = {
                    # Do not wait for the rollout: GPU nodes scale up from zero and the model loads
                    # for minutes, far past the provider's 10-minute apply timeout.
                    "wait_for_rollout": False,
                    # KEDA owns the replica count once the Deployment exists.
                    "lifecycle": TerraformResourceLifecycle(ignore_changes=["spec[0].replicas"]),
                }
            self.resources.append(render(self, obj, depends_on=deps, **extra))
        self.scaling = [render(self, obj, depends_on=[ns]) for obj in autoscaling_objects(props.fleet, w)]
        self.outputs = K8sServingOutputs(
            namespace=k8s.NAMESPACE,
            engine_service=k8s.ENGINE,
            engines_dns=k8s.engines_dns(),
            min_engines=w.min_engines,
            max_engines=w.max_engines,
        )
