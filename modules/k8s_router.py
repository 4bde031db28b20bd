"""The regional router on one cluster, through the kubernetes provider.

`K8sRouter` renders `k8s_objects.router_objects` (>= 2 replicas of `gpufleet router serve`, a PDB, an
internal Service and a Service of type LoadBalancer), the cert-manager ClusterIssuer and Certificate
for its public names (`k8s_certs.py`, when the fleet has DNS), and the one object the shared
description leaves out: the admin token Secret. Its value comes from `random_password` inside
Terraform, so it exists only in the Terraform state (sensitive) and in the cluster; no synthesized
file, Terraform output or plan log shows it. Operators read it with
`kubectl get secret gpufleet-router-admin -o jsonpath=...`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from constructs import Construct
from gpufleet.modules import k8s_objects as k8s
from gpufleet.modules.k8s_certs import certificate_objects
from gpufleet.modules.k8s_tf import render

if TYPE_CHECKING:
    from gpufleet.stacks.spec import Fleet, Region

TOKEN_LENGTH = 48


@dataclass(frozen=True)
class K8sRouterProps:
    fleet: Fleet
    region: Region
    image: str
    replicas: int = 2
    depends_on: tuple[Any, ...] = ()  # the namespace and fleet ConfigMap (K8sServing)


@dataclass(frozen=True)
class K8sRouterOutputs:
    service: str
    # The load balancer's address once Kubernetes has it (tokens): AWS gives a hostname, GCP and
    # Azure an IP. The global traffic stack points each region's DNS name at it.
    lb_hostname: str
    lb_ip: str


class K8sRouter(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, props: K8sRouterProps) -> None:
        super().__init__(scope, construct_id)
        from cdktn_provider_random.password import Password

        if props.replicas < 2:
            raise ValueError(
                f"the router runs at least 2 replicas (got {props.replicas}): one pod is no failover"
            )
        w = k8s.workload(props.fleet, props.region, props.image)
        deps = list(props.depends_on)
        token = Password(self, "admin-token", length=TOKEN_LENGTH, special=False)
        secret = k8s.admin_secret_object(token.result)  # a Terraform reference, never the value
        self.admin_secret = render(self, secret, depends_on=deps)
        # The certificate first: the router pods mount the Secret cert-manager writes for it.
        certs = [render(self, obj, depends_on=deps) for obj in certificate_objects(props.fleet, props.region)]
        self.resources = []
        for obj in k8s.router_objects(props.fleet, w, replicas=props.replicas):
            # The rollout waits for the certificate (minutes on the first apply): do not hold the apply.
            extra = {"wait_for_rollout": False} if obj["kind"] == "Deployment" else {}
            self.resources.append(render(self, obj, depends_on=[*deps, self.admin_secret, *certs], **extra))
            if obj["kind"] == "Service" and obj["metadata"]["name"] == k8s.ROUTER:
                self.service = self.resources[-1]
        ingress = self.service.status.get(0).load_balancer.get(0).ingress.get(0)
        self.outputs = K8sRouterOutputs(service=k8s.ROUTER, lb_hostname=ingress.hostname, lb_ip=ingress.ip)
