"""Per region `<key>-addons` and `<key>-serving` on top of its cluster stack; then `global-traffic`.

`add_serving_stacks(app, fleet, clusters, image=...)` is called by `stacks.synth.build_app` after the
cluster stacks exist. Per region it adds `<key>-addons` (Helm releases of the cluster add-ons,
modules/k8s_addons.py) and `<key>-serving` (engines, router, KEDA and cert-manager objects, which
need the add-ons' CRDs at plan time, hence two stacks). Each configures its kubernetes (and helm)
provider from the cluster stack's outputs (tokens of another stack: cdktn adds an output there and a
remote-state data source here, and records the dependency in manifest.json), plus the short-lived
credential each cloud needs:
  AWS    aws_eks_cluster_auth token            (the AWS provider in the cluster's region)
  GCP    google_client_config access_token     (the operator's gcloud credentials)
  Azure  azurerm_kubernetes_cluster kube_config (host, CA) + kubelogin (Entra ID token; no local accounts)
The `global-traffic` stack (only when the fleet has `settings.dns`) reads each serving stack's router
load balancer address and builds the Route53 latency records and health checks.
cdktn and the providers are imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdktn import App, TerraformStack
    from gpufleet.modules.k8s_router import K8sRouterOutputs
    from gpufleet.modules.k8s_serving import K8sServingOutputs
    from gpufleet.stacks.spec import Dns, Fleet, Region

GLOBAL_STACK = "global-traffic"
ROUTE53_PROVIDER_REGION = "us-east-1"  # Route53 is global; its API lives in us-east-1
# The Entra ID application every AKS cluster with AAD integration accepts tokens for (Microsoft's
# documented constant, used by `kubelogin --server-id`).
AKS_AAD_SERVER_APP_ID = "6dae42f8-4368-4678-94ff-3960e28e3630"


class ServingStackError(ValueError):
    """The fleet cannot be turned into serving stacks (a region with no latency mapping, ...)."""


@cache
def _latency_table() -> dict[str, Any]:
    import yaml

    text = (
        resources.files("gpufleet.stacks").joinpath("catalog", "aws_latency_regions.yaml").read_text("utf-8")
    )
    return yaml.safe_load(text)


def aws_latency_region(cloud: str, region: str) -> str:
    """The AWS region whose Route53 latency data stands for `region` of `cloud`."""
    if cloud == "aws":
        return region
    table = _latency_table().get(cloud)
    if table is None:
        raise ServingStackError(f"no latency mapping for cloud {cloud!r}")
    if region in table["regions"]:
        return table["regions"][region]
    for prefix, aws in table["prefixes"].items():
        if region.startswith(prefix):
            return aws
    raise ServingStackError(
        f"{cloud} region {region!r} has no nearest AWS region in "
        "stacks/catalog/aws_latency_regions.yaml; add it there"
    )


@dataclass(frozen=True)
class ServingStackHandle:
    name: str
    stack: TerraformStack
    region: Region
    serving: K8sServingOutputs
    router: K8sRouterOutputs


@dataclass(frozen=True)
class ServingStacks:
    regions: dict[str, ServingStackHandle]
    global_traffic: TerraformStack | None


def serving_stack_name(region: Region) -> str:
    return f"{region.key}-serving"


def _cluster_connection(stack: TerraformStack, cluster: Any) -> dict[str, Any]:
    """How Terraform reaches `cluster`'s API (host, CA, credential), for the kubernetes and helm
    providers alike, plus the cloud provider the short-lived credential comes from."""
    from cdktn import Fn

    out = cluster.outputs
    if out.cloud == "aws":
        from cdktn_provider_aws.data_aws_eks_cluster_auth import DataAwsEksClusterAuth
        from cdktn_provider_aws.provider import AwsProvider

        AwsProvider(stack, "aws", region=out.region or cluster.region.region)
        auth = DataAwsEksClusterAuth(stack, "eks-auth", name=out.cluster_name)
        return {
            "host": out.endpoint,
            "cluster_ca_certificate": Fn.base64decode(out.cluster_ca_certificate),
            "token": auth.token,
        }
    if out.cloud == "gcp":
        from cdktn_provider_google.data_google_client_config import DataGoogleClientConfig
        from cdktn_provider_google.provider import GoogleProvider

        GoogleProvider(stack, "google", project=out.project, region=out.location or cluster.region.region)
        client = DataGoogleClientConfig(stack, "client-config")
        return {
            "host": f"https://{out.endpoint}",
            "cluster_ca_certificate": Fn.base64decode(out.cluster_ca_certificate),
            "token": client.access_token,
        }
    if out.cloud == "azure":
        from cdktn_provider_azurerm.data_azurerm_kubernetes_cluster import DataAzurermKubernetesCluster
        from cdktn_provider_azurerm.provider import AzurermProvider

        AzurermProvider(stack, "azurerm", features=[{}])
        aks = DataAzurermKubernetesCluster(
            stack, "aks", name=out.cluster_name, resource_group_name=out.resource_group_name
        )
        kube = aks.kube_config.get(0)
        # The cluster has Entra ID RBAC and no local accounts (modules/azure_cluster.py), so there is no
        # client certificate: kubelogin turns the operator's `az login` into a token for the AKS server
        # app (the cluster stack gives the identity running Terraform an AKS RBAC admin role).
        return {
            "host": kube.host,
            "cluster_ca_certificate": Fn.base64decode(kube.cluster_ca_certificate),
            "exec": {
                "api_version": "client.authentication.k8s.io/v1beta1",
                "command": "kubelogin",
                "args": ["get-token", "--login", "azurecli", "--server-id", AKS_AAD_SERVER_APP_ID],
            },
        }
    raise ServingStackError(f"unknown cloud {out.cloud!r}")


def _kubernetes_provider(stack: TerraformStack, cluster: Any, *, helm: bool = False) -> None:
    """The kubernetes provider (and the helm provider when asked) for `cluster`."""
    from cdktn_provider_kubernetes.provider import KubernetesProvider, KubernetesProviderExec

    conn = _cluster_connection(stack, cluster)
    exec_ = conn.pop("exec", None)
    KubernetesProvider(
        stack, "kubernetes", **conn, exec=[KubernetesProviderExec(**exec_)] if exec_ else None
    )
    if helm:
        from cdktn_provider_helm.provider import (
            HelmProvider,
            HelmProviderKubernetes,
            HelmProviderKubernetesExec,
        )

        k8s = HelmProviderKubernetes(**conn, exec=HelmProviderKubernetesExec(**exec_) if exec_ else None)
        HelmProvider(stack, "helm", kubernetes=k8s)


def addons_stack_name(region: Region) -> str:
    return f"{region.key}-addons"


def _addons_stack(app: App, fleet: Fleet, cluster: Any) -> TerraformStack:
    """Helm releases of the cluster add-ons (autoscaler, device plugin, KEDA, cert-manager) with their
    identities: a stack of their own, because the serving stack's custom resources need the CRDs they
    install to exist at plan time."""
    from cdktn import TerraformStack
    from gpufleet.modules.k8s_addons import AddonsProps, ClusterAddons
    from gpufleet.stacks.synth import configure_backend

    region = cluster.region
    name = addons_stack_name(region)
    stack = TerraformStack(app, name)
    configure_backend(stack, fleet, name, _outdir(app))
    _kubernetes_provider(stack, cluster, helm=True)
    if region.cloud.value != "aws" and fleet.settings.dns is not None:
        from cdktn_provider_aws.provider import AwsProvider

        # cert-manager's Route53 identity lives in the fleet's AWS account whatever the cluster's cloud.
        AwsProvider(stack, "aws", region=ROUTE53_PROVIDER_REGION)
    ClusterAddons(
        stack,
        "addons",
        props=AddonsProps(fleet=fleet, region=region, kubernetes_version=cluster.props.kubernetes_version),
    )
    return stack


def _serving_stack(app: App, fleet: Fleet, cluster: Any, image: str, addons: TerraformStack) -> ServingStackHandle:
    from cdktn import TerraformOutput, TerraformStack, TerraformVariable
    from cdktn_provider_random.provider import RandomProvider
    from gpufleet.modules.k8s_router import K8sRouter, K8sRouterProps
    from gpufleet.modules.k8s_serving import K8sServing, K8sServingProps
    from gpufleet.stacks.synth import configure_backend

    region = cluster.region
    name = serving_stack_name(region)
    stack = TerraformStack(app, name)
    stack.add_dependency(addons)  # KEDA and cert-manager CRDs before the objects that use them
    configure_backend(stack, fleet, name, _outdir(app))
    _kubernetes_provider(stack, cluster)
    RandomProvider(stack, "random")
    hf_token = None
    if fleet.serving.hf_token == "variable":
        # TF_VAR_hf_token (or -var): the token of a Hugging Face account with access to the model.
        hf_token = TerraformVariable(
            stack, "hf_token", type="string", sensitive=True, nullable=False,
            description="Hugging Face token with access to the fleet's models (gated models need it)",
        ).string_value  # fmt: skip
    serving = K8sServing(
        stack, "serving", props=K8sServingProps(fleet=fleet, region=region, image=image, hf_token=hf_token)
    )
    router = K8sRouter(
        stack,
        "router",
        props=K8sRouterProps(
            fleet=fleet, region=region, image=image, depends_on=(serving.namespace, serving.fleet_config)
        ),
    )
    # Operator-facing facts only; the admin token is deliberately not an output.
    TerraformOutput(stack, "engines_min", value=serving.outputs.min_engines)
    TerraformOutput(stack, "engines_max", value=serving.outputs.max_engines)
    TerraformOutput(stack, "engines_dns", value=serving.outputs.engines_dns)
    return ServingStackHandle(name, stack, region, serving.outputs, router.outputs)


def _outdir(app: App):
    from pathlib import Path

    return Path(app.outdir)


def _global_stack(app: App, fleet: Fleet, dns: Dns, regions: dict[str, ServingStackHandle]) -> TerraformStack:
    from cdktn import TerraformStack
    from cdktn_provider_aws.provider import AwsProvider
    from gpufleet.modules.dns import GlobalTraffic, GlobalTrafficProps, RouterTarget
    from gpufleet.stacks.synth import configure_backend

    stack = TerraformStack(app, GLOBAL_STACK)
    configure_backend(stack, fleet, GLOBAL_STACK, _outdir(app))
    AwsProvider(stack, "aws", region=ROUTE53_PROVIDER_REGION)
    targets = []
    for key, handle in regions.items():
        cloud = handle.region.cloud.value
        is_ip = cloud != "aws"  # GKE and AKS load balancers get an IP, EKS's NLB a hostname
        targets.append(RouterTarget(
            region_key=key,
            latency_region=aws_latency_region(cloud, handle.region.region),
            address=handle.router.lb_ip if is_ip else handle.router.lb_hostname,
            is_ip=is_ip,
            # Regions sharing an AWS latency region split its answers by their GPUs at max size.
            weight=fleet.gpus_at_max(handle.region),
        ))  # fmt: skip
    GlobalTraffic(
        stack, "traffic", props=GlobalTrafficProps(zone=dns.zone, record=dns.record, routers=tuple(targets))
    )
    return stack


def add_serving_stacks(app: App, fleet: Fleet, clusters: dict[str, Any], *, image: str) -> ServingStacks:
    """Per cluster stack (keyed by region key) an add-ons stack and a serving stack, then the global
    traffic stack."""
    for region in fleet.regions:  # fail before building anything
        aws_latency_region(region.cloud.value, region.region)
    handles = {}
    for key, cluster in clusters.items():
        addons = _addons_stack(app, fleet, cluster)
        handles[key] = _serving_stack(app, fleet, cluster, image, addons)
    dns = fleet.settings.dns
    glob = _global_stack(app, fleet, dns, handles) if dns is not None and handles else None
    return ServingStacks(handles, glob)
