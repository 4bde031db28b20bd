"""Engines that scale on the router's demand signal: a KEDA ScaledObject and its TriggerAuthentication.

KEDA's metrics-api scaler reads `GET /scale` of the region's router (over the in-cluster Service) and
takes `desired_engines` from the JSON. With the default AverageValue target of 1 the HPA KEDA drives
asks for exactly that many engine pods (desired = ceil(metric / 1)), clamped to the pool's engines at
`nodes.min` and `nodes.max`; activation above 0 wakes a region that sits at zero. The router computes
the number from what it sees (KV in use, waiting queues, requests it had to queue, spill or refuse for
lack of local room): vLLM's own signals, not GPU utilisation. The node autoscaler (EKS Cluster
Autoscaler, GKE and AKS built-in) then adds or removes GPU nodes for the pods.

Both objects are custom resources (keda.sh/v1alpha1): the add-ons stack installs KEDA first.
Sources: KEDA docs "Metrics API" scaler (url, valueLocation, targetValue, activationTargetValue,
authMode bearer) and "ScaledObject specification" (minReplicaCount, maxReplicaCount, cooldownPeriod,
advanced.horizontalPodAutoscalerConfig.behavior).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpufleet.modules import k8s_objects as k8s

if TYPE_CHECKING:
    from gpufleet.modules.k8s_objects import Obj, RegionWorkload
    from gpufleet.stacks.spec import Fleet

KEDA_API = "keda.sh/v1alpha1"
TRIGGER_AUTH = "gpufleet-router-admin"
SCALE_PATH = "/scale"
POLLING_INTERVAL_S = 15
# A GPU node takes minutes to arrive and the model minutes to load: give back an engine only after
# ten quiet minutes, one at a time, so a lull between bursts does not throw away warm engines.
COOLDOWN_S = 600
SCALE_DOWN_WINDOW_S = 600


def autoscaling_objects(fleet: Fleet, w: RegionWorkload) -> list[Obj]:
    meta = {"namespace": k8s.NAMESPACE, "labels": {"app.kubernetes.io/part-of": "gpufleet"}}
    auth = {
        "apiVersion": KEDA_API,
        "kind": "TriggerAuthentication",
        "metadata": {"name": TRIGGER_AUTH, **meta},
        "spec": {
            "secretTargetRef": [
                {"parameter": "token", "name": k8s.ADMIN_SECRET, "key": k8s.ADMIN_SECRET_KEY}
            ]
        },
    }
    scaled = {
        "apiVersion": KEDA_API,
        "kind": "ScaledObject",
        "metadata": {"name": k8s.ENGINE, **meta},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": k8s.ENGINE},
            "minReplicaCount": w.min_engines,
            "maxReplicaCount": w.max_engines,
            "pollingInterval": POLLING_INTERVAL_S,
            "cooldownPeriod": COOLDOWN_S,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        "scaleDown": {
                            "stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
                        }
                    }
                }
            },
            "triggers": [
                {
                    "type": "metrics-api",
                    "metricType": "AverageValue",
                    "metadata": {
                        "url": k8s.router_internal_url(SCALE_PATH),
                        "valueLocation": "desired_engines",
                        "targetValue": "1",
                        "activationTargetValue": "0",
                        "authMode": "bearer",
                    },
                    "authenticationRef": {"name": TRIGGER_AUTH},
                }
            ],
        },
    }
    return [auth, scaled]
