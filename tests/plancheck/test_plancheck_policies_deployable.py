"""GPU012 .. GPU019, the classes of mistakes that keep a deploy from serving (issue 12): each passes on
the compliant fixture and fails on a small broken copy, in cdk.tf.json and, where the shape differs,
in `show -json` plan form."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from gpufleet.stacks import catalog
from gpufleet.stacks.plancheck.policies import POLICIES, Finding
from gpufleet.stacks.plancheck.policy_workloads import docker_hub_reference
from gpufleet.stacks.plancheck.pools import Taint
from gpufleet.stacks.plancheck.regions import chart_name, split_stack
from gpufleet.stacks.plancheck.run import check
from gpufleet.stacks.plancheck.workloads import Toleration

from .conftest import PLANS, TODAY, resource, stack_docs, write_out

AWS, GCP, AZ, SRV = (
    "aws-us-east-1-cluster",
    "gcp-us-central1-cluster",
    "azure-westeurope-cluster",
    "aws-us-east-1-serving",
)
AWS_ADDONS, AZ_ADDONS = "aws-us-east-1-addons", "azure-westeurope-addons"
AZ_SRV, GCP_SRV = "azure-westeurope-serving", "gcp-us-central1-serving"


@pytest.fixture()
def docs():
    return stack_docs()


def result(tmp_path: Path, docs, fleet=None, today: dt.date = TODAY):
    return check([write_out(tmp_path / "cdktf.out", docs)], fleet=fleet, run_checkov=False, today=today)


def run(tmp_path: Path, docs, pid: str, **kw) -> list[Finding]:
    return of(result(tmp_path, docs, **kw).findings, pid)


def of(findings: list[Finding], pid: str) -> list[Finding]:
    return [f for f in findings if f.policy == pid]


def stack(**resources: dict) -> dict:
    """A minimal cdk.tf.json: resources by type and name."""
    return {"resource": resources, "terraform": {"required_providers": {}}}


def helm(chart: str) -> dict:
    return {"name": chart.rsplit("/", 1)[-1], "chart": chart, "version": "1.0.0"}


def set_charts(docs, stack_name: str, *charts: str) -> None:
    docs[stack_name] = stack(helm_release={f"r{i}": helm(c) for i, c in enumerate(charts)})


def deployment(
    name: str,
    *,
    image: str = "ghcr.io/acme/gpufleet:0.1.0",
    tolerations: list[dict] | None = None,
    node_selector: dict | None = None,
    gpu: bool = False,
    labels: dict | None = None,
    args: list[str] | None = None,
    env: list[dict] | None = None,
    volumes: list[dict] | None = None,
    mounts: list[dict] | None = None,
) -> dict:
    """A kubernetes_deployment_v1 body as cdk.tf.json writes it."""
    container: dict = {"name": name, "image": image}
    if gpu:
        container["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    if args:
        container["args"] = args
    if env:
        container["env"] = env
    if mounts:
        container["volume_mount"] = mounts
    pod: dict = {"container": [container]}
    if tolerations:
        pod["toleration"] = tolerations
    if node_selector:
        pod["node_selector"] = node_selector
    if volumes:
        pod["volume"] = volumes
    return {
        "metadata": {"name": name, "namespace": "gpufleet"},
        "spec": {
            "selector": {"match_labels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name, **(labels or {})}}, "spec": pod},
        },
    }


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def change(address: str, after: dict | None, *, actions=("create",), unknown=None, before=None) -> dict:
    rtype, name = address.split(".")[-2:]
    return {
        "address": address,
        "mode": "managed",
        "type": rtype,
        "name": name,
        "change": {"actions": list(actions), "before": before, "after": after, "after_unknown": unknown or {}},
    }


def write_plan(path: Path, *changes: dict, configuration: dict | None = None) -> Path:
    doc = {"format_version": "1.2", "terraform_version": "1.9.0", "resource_changes": list(changes)}
    if configuration is not None:
        doc["configuration"] = configuration
    path.write_text(json.dumps(doc))
    return path


def cluster_plan(tmp_path: Path, **replace: str) -> Path:
    """The create plan of aws-us-east-1-cluster, with text replaced."""
    text = (PLANS / "aws-us-east-1-cluster.create.json").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "aws-us-east-1-cluster.json"
    path.write_text(text)
    return path


def test_the_new_policies_are_documented_with_fixes_per_cloud():
    for pid in (f"GPU{i:03d}" for i in range(12, 20)):
        p = POLICIES[pid]
        assert len(p.rationale) > 200 and p.fix and p.title
        for cloud, fix in p.fix_by_cloud.items():
            others = {"aws": "aws_eks", "gcp": "google_container", "azure": "azurerm_"}
            assert not any(word in fix for c, word in others.items() if c != cloud), (pid, cloud)
    assert (Path(__file__).parents[2] / "docs" / "plan-check.md").read_text().count("| GPU01") >= 9


def test_stacks_are_grouped_by_region_key():
    assert split_stack("aws-us-east-1-cluster") == ("aws-us-east-1", "cluster")
    assert split_stack("azure-westeurope-addons") == ("azure-westeurope", "addons")
    assert split_stack("aws-us-east-1-cluster.create") == ("aws-us-east-1", "cluster")  # plan file names
    assert split_stack("global-traffic") == ("global-traffic", None)
    assert chart_name("autoscaler/cluster-autoscaler") == "cluster-autoscaler"
    assert chart_name("oci://ghcr.io/nvidia/gpu-operator") == "gpu-operator"
    assert chart_name("https://example.com/charts/nvidia-device-plugin-0.17.1.tgz") == "nvidia-device-plugin"
    assert chart_name("${var.chart}") is None


# -- GPU012 Kubernetes version ----------------------------------------------------------------
def test_gpu012_versions_past_support_fail_with_the_fix_of_their_cloud(tmp_path, docs):
    resource(docs, AWS, "aws_eks_cluster", "cluster_cluster")["version"] = "1.31"
    gke = resource(docs, GCP, "google_container_cluster", "cluster_cluster")
    gke.update(min_master_version="1.33.5-gke.1080000", node_version="1.35")
    resource(docs, AZ, "azurerm_kubernetes_cluster", "cluster_cluster")["kubernetes_version"] = "1.33.2"
    found = {f.address: f.message for f in run(tmp_path, docs, "GPU012")}
    assert set(found) == {
        "aws_eks_cluster.cluster_cluster",
        "google_container_cluster.cluster_cluster",
        "azurerm_kubernetes_cluster.cluster_cluster",
    }
    aws = found["aws_eks_cluster.cluster_cluster"]
    gcp = found["google_container_cluster.cluster_cluster"]
    az = found["azurerm_kubernetes_cluster.cluster_cluster"]
    # the problem is the catalog's own words; the fix is the finding's cloud's
    assert f"version = '1.31': {catalog.kubernetes_support('aws', '1.31', TODAY)}. Fix: set aws_eks_cluster" in aws
    assert f"min_master_version = '1.33.5-gke.1080000': {catalog.kubernetes_support('gcp', '1.33', TODAY)}" in gcp
    assert "node_version" not in gcp.split(". Fix:")[0]  # 1.35 is supported
    assert catalog.kubernetes_support("azure", "1.33", TODAY) in az
    assert "azurerm_kubernetes_cluster.kubernetes_version" in az.split("Fix:")[1] and "aws_eks" not in az
    assert "google_container_cluster.min_master_version" in gcp.split("Fix:")[1] and "azurerm" not in gcp


def test_gpu012_supported_unset_or_symbolic_versions_pass(tmp_path, docs):
    resource(docs, AWS, "aws_eks_cluster", "cluster_cluster")["version"] = "1.35"
    resource(docs, GCP, "google_container_cluster", "cluster_cluster")["min_master_version"] = "latest"
    resource(docs, GCP, "google_container_node_pool", "cluster_gpu")["version"] = "1.35.1-gke.100"
    resource(docs, AZ, "azurerm_kubernetes_cluster", "cluster_cluster")["kubernetes_version"] = "${var.k8s}"
    assert run(tmp_path, docs, "GPU012") == []


def test_gpu012_judges_on_the_day_of_the_check(tmp_path, docs):
    resource(docs, AWS, "aws_eks_cluster", "cluster_cluster")["version"] = "1.35.1"
    assert run(tmp_path / "a", docs, "GPU012") == []
    after = catalog.kubernetes_versions("aws")["1.35"].end_of_support + dt.timedelta(days=1)
    later = run(tmp_path / "b", docs, "GPU012", today=after)
    assert len(later) == 1 and catalog.kubernetes_support("aws", "1.35", after) in later[0].message


def test_gpu012_in_plans(tmp_path):
    assert of(check([cluster_plan(tmp_path)], run_checkov=False, today=TODAY).findings, "GPU012") == []
    old = cluster_plan(tmp_path, **{'"version": "1.35"': '"version": "1.32"'})
    found = of(check([old], run_checkov=False, today=TODAY).findings, "GPU012")
    assert [f.address for f in found] == ["aws_eks_cluster.cluster"]
    assert catalog.kubernetes_support("aws", "1.32", TODAY) in found[0].message


# -- GPU013 schedulable GPUs ------------------------------------------------------------------
def test_gpu013_pools_without_driver_or_device_plugin_fail(tmp_path, docs):
    set_charts(docs, AZ_ADDONS, "keda")  # no device plugin
    set_charts(docs, AWS_ADDONS, "cluster-autoscaler")
    resource(docs, AWS, "aws_eks_node_group", "cluster_gpu-pool")["ami_type"] = "AL2023_x86_64_STANDARD"
    resource(docs, AWS, "aws_eks_node_group", "cluster_block-pool")["ami_type"] = "AL2023_x86_64_NVIDIA"
    accel = resource(docs, GCP, "google_container_node_pool", "cluster_gpu")["node_config"]["guest_accelerator"][0]
    accel["gpu_driver_installation_config"]["gpu_driver_version"] = "INSTALLATION_DISABLED"
    set_charts(docs, "gcp-us-central1-addons", "keda")
    found = {f.address: f for f in run(tmp_path, docs, "GPU013")}
    assert set(found) == {
        "aws_eks_node_group.cluster_gpu-pool",
        "aws_eks_node_group.cluster_block-pool",
        "google_container_node_pool.cluster_gpu",
        "azurerm_kubernetes_cluster_node_pool.cluster_gpu",
        "azurerm_kubernetes_cluster_node_pool.cluster_spot",
    }
    msg = {a: f.message for a, f in found.items()}
    assert "AL2023_x86_64_STANDARD has no NVIDIA driver" in msg["aws_eks_node_group.cluster_gpu-pool"]
    assert "brings the NVIDIA driver but no device plugin" in msg["aws_eks_node_group.cluster_block-pool"]
    assert "BOTTLEROCKET_x86_64_NVIDIA" in msg["aws_eks_node_group.cluster_block-pool"]  # the aws fix
    assert (
        'gpu_driver = "Install" installs the NVIDIA driver only'
        in msg["azurerm_kubernetes_cluster_node_pool.cluster_gpu"]
    )
    assert "gpu_driver unset" in msg["azurerm_kubernetes_cluster_node_pool.cluster_spot"]
    assert "INSTALLATION_DISABLED" in msg["google_container_node_pool.cluster_gpu"]
    assert "gpu_driver_installation_config" in msg["google_container_node_pool.cluster_gpu"].split("Fix:")[1]
    assert all(f.severity == "critical" and "azurerm" not in f.message for f in found.values() if "aws" in f.address)


def test_gpu013_aks_without_driver_needs_the_gpu_operator(tmp_path, docs):
    resource(docs, AZ, "azurerm_kubernetes_cluster_node_pool", "cluster_gpu")["gpu_driver"] = "None"
    found = run(tmp_path / "a", docs, "GPU013")  # the device plugin alone is not enough
    assert [f.address for f in found] == ["azurerm_kubernetes_cluster_node_pool.cluster_gpu"]
    assert "no gpu-operator" in found[0].message
    set_charts(docs, AZ_ADDONS, "oci://ghcr.io/nvidia/gpu-operator")  # the operator covers both pools
    assert run(tmp_path / "b", docs, "GPU013") == []


def test_gpu013_accepted_paths_pass(tmp_path, docs):
    resource(docs, AWS, "aws_eks_node_group", "cluster_gpu-pool")["ami_type"] = "AL2023_x86_64_NVIDIA"
    set_charts(docs, AWS_ADDONS, "cluster-autoscaler", "nvdp/nvidia-device-plugin")
    del resource(docs, GCP, "google_container_node_pool", "cluster_flex")["node_config"]["guest_accelerator"][0][
        "gpu_driver_installation_config"
    ]
    set_charts(docs, "gcp-us-central1-addons", "https://helm.ngc.nvidia.com/nvidia/charts/gpu-operator-v25.3.0.tgz")
    assert run(tmp_path, docs, "GPU013") == []


def test_gpu013_without_the_addons_stack_is_not_checked_not_failed(tmp_path, docs):
    del docs[AZ_ADDONS]
    res = result(tmp_path, docs)
    assert of(res.findings, "GPU013") == []
    assert any(
        n.startswith("GPU013 (azure-westeurope): no azure-westeurope-addons stack") for n in res.skipped_policies
    )


def test_gpu013_in_plans(tmp_path):
    cluster = cluster_plan(tmp_path, BOTTLEROCKET_x86_64_NVIDIA="AL2023_x86_64_NVIDIA")
    autoscaler = change("helm_release.ca", {"name": "ca", "chart": "cluster-autoscaler"})
    addons = write_plan(tmp_path / "aws-us-east-1-addons.json", autoscaler)
    found = of(check([cluster, addons], run_checkov=False, today=TODAY).findings, "GPU013")
    assert [f.address for f in found] == ["aws_eks_node_group.gpu"]
    plugin = change("helm_release.dp", {"name": "dp", "chart": "nvidia-device-plugin"})
    write_plan(addons, autoscaler, plugin)
    assert of(check([cluster, addons], run_checkov=False, today=TODAY).findings, "GPU013") == []


# -- GPU014 node autoscaler -------------------------------------------------------------------
def test_gpu014_scalable_node_groups_without_autoscaler_fail(tmp_path, docs):
    set_charts(docs, AWS_ADDONS, "keda", "cert-manager")
    found = {f.address: f.message for f in run(tmp_path, docs, "GPU014")}
    assert set(found) == {"aws_eks_node_group.cluster_gpu-pool", "aws_eks_node_group.cluster_block-pool"}
    assert (
        "may scale 0..2 nodes but aws-us-east-1 has no node autoscaler" in found["aws_eks_node_group.cluster_gpu-pool"]
    )
    assert "desired_size 0" in found["aws_eks_node_group.cluster_gpu-pool"]
    assert "cluster-autoscaler" in found["aws_eks_node_group.cluster_gpu-pool"].split("Fix:")[1]


@pytest.mark.parametrize("how", ["karpenter", "auto-mode", "fixed-size"])
def test_gpu014_karpenter_auto_mode_or_fixed_size_pass(tmp_path, docs, how):
    set_charts(docs, AWS_ADDONS, "keda")
    if how == "karpenter":
        set_charts(docs, AWS_ADDONS, "oci://public.ecr.aws/karpenter/karpenter")
    elif how == "auto-mode":
        resource(docs, AWS, "aws_eks_cluster", "cluster_cluster")["compute_config"] = {"enabled": True}
    else:
        for name in ("cluster_gpu-pool", "cluster_block-pool"):
            scaling = resource(docs, AWS, "aws_eks_node_group", name)["scaling_config"]
            scaling["max_size"] = scaling["min_size"]
    assert run(tmp_path, docs, "GPU014") == []


def test_gpu014_in_plans(tmp_path):
    cluster = cluster_plan(tmp_path)
    alone = check([cluster], run_checkov=False, today=TODAY)
    assert of(alone.findings, "GPU014") == []
    assert any(n.startswith("GPU014 (aws-us-east-1): no aws-us-east-1-addons stack") for n in alone.skipped_policies)
    addons = write_plan(tmp_path / "aws-us-east-1-addons.json", change("helm_release.keda", {"chart": "keda"}))
    found = of(check([cluster, addons], run_checkov=False, today=TODAY).findings, "GPU014")
    assert [f.address for f in found] == ["aws_eks_node_group.gpu"]


# -- GPU015 placement -------------------------------------------------------------------------
def test_toleration_semantics():
    gpu = Taint("nvidia.com/gpu", "present", "NoSchedule")
    assert Toleration("nvidia.com/gpu", "Exists", "", "NoSchedule").tolerates(gpu)
    assert Toleration("nvidia.com/gpu", "Equal", "present", "").tolerates(gpu)
    assert not Toleration("nvidia.com/gpu", "Equal", "true", "NoSchedule").tolerates(gpu)
    assert not Toleration("nvidia.com/gpu", "Exists", "", "NoExecute").tolerates(gpu)
    assert Toleration("", "Exists", "", "").tolerates(gpu)


def test_gpu015_router_on_aks_with_critical_addons_only_fits_no_pool(tmp_path, docs):
    resource(docs, AZ, "azurerm_kubernetes_cluster", "cluster_cluster")["default_node_pool"][
        "only_critical_addons_enabled"
    ] = True
    docs[AZ_SRV] = stack(
        kubernetes_deployment_v1={
            "router": deployment("router"),
            "engine": deployment("engine", gpu=True, tolerations=[GPU_TOLERATION]),
        }
    )
    found = run(tmp_path, docs, "GPU015")
    assert [f.address for f in found] == ["kubernetes_deployment_v1.router"]
    msg = found[0].message
    assert (
        "Deployment router (tolerates nothing; no node selector) fits no node pool of azure-westeurope-cluster" in msg
    )
    assert "system (default pool) (CriticalAddonsOnly=true:NoSchedule)" in msg
    assert (
        "gpuspot (nvidia.com/gpu=present:NoSchedule, kubernetes.azure.com/scalesetpriority=spot:NoSchedule, GPU)" in msg
    )
    assert "only_critical_addons_enabled" in msg.split("Fix:")[1] and "aws_eks" not in msg
    # tolerating CriticalAddonsOnly lets it onto the system pool
    docs[AZ_SRV]["resource"]["kubernetes_deployment_v1"]["router"] = deployment(
        "router", tolerations=[{"key": "CriticalAddonsOnly", "operator": "Exists"}]
    )
    assert run(tmp_path / "b", docs, "GPU015") == []


def test_gpu015_implicit_spot_and_gke_gpu_taints(tmp_path, docs):
    # Azure: only the spot pool is left; its scalesetpriority taint is implicit even when node_taints omit it
    del docs[AZ]["resource"]["azurerm_kubernetes_cluster_node_pool"]["cluster_gpu"]
    spot = resource(docs, AZ, "azurerm_kubernetes_cluster_node_pool", "cluster_spot")
    spot["node_taints"] = ["nvidia.com/gpu=present:NoSchedule"]
    engine = deployment("engine", gpu=True, tolerations=[GPU_TOLERATION])
    docs[AZ_SRV] = stack(kubernetes_deployment_v1={"engine": engine})
    # GKE: the GPU taint is implicit; a GPU pod that does not tolerate it has nowhere to go
    del resource(docs, GCP, "google_container_node_pool", "cluster_gpu")["node_config"]["taint"]
    del resource(docs, GCP, "google_container_node_pool", "cluster_flex")["node_config"]["taint"]
    docs[GCP_SRV] = stack(kubernetes_daemon_set_v1={"probe": deployment("probe", gpu=True)})
    found = {f.stack: f.message for f in run(tmp_path, docs, "GPU015")}
    assert "taint kubernetes.azure.com/scalesetpriority=spot:NoSchedule not tolerated" in found[AZ_SRV]
    assert (
        "DaemonSet probe" in found[GCP_SRV]
        and "taint nvidia.com/gpu=present:NoSchedule not tolerated" in found[GCP_SRV]
    )
    assert "system (no taints): no GPUs" in found[GCP_SRV] and "google_container_node_pool" in found[GCP_SRV]
    spot_toleration = {"key": "kubernetes.azure.com/scalesetpriority", "value": "spot", "effect": "NoSchedule"}
    docs[AZ_SRV]["resource"]["kubernetes_deployment_v1"]["engine"] = deployment(
        "engine", gpu=True, tolerations=[GPU_TOLERATION, spot_toleration], node_selector={"agentpool": "gpuspot"}
    )
    assert [f.stack for f in run(tmp_path / "b", docs, "GPU015")] == [GCP_SRV]


def test_gpu015_node_selector_must_match_pool_labels(tmp_path, docs):
    engine = resource(docs, SRV, "kubernetes_deployment_v1", "engine")
    engine["spec"]["template"]["spec"]["node_selector"] = {"gpufleet.io/gpu": "H100-80GB"}
    found = run(tmp_path / "a", docs, "GPU015")
    assert [f.address for f in found] == ["kubernetes_deployment_v1.engine"]
    assert "no label gpufleet.io/gpu=H100-80GB" in found[0].message and "aws_eks_node_group" in found[0].message
    resource(docs, AWS, "aws_eks_node_group", "cluster_gpu-pool")["labels"] = {"gpufleet.io/gpu": "H100-80GB"}
    assert run(tmp_path / "b", docs, "GPU015") == []


def test_gpu015_manifests_and_dynamic_provisioning(tmp_path, docs):
    docs[SRV]["resource"]["kubernetes_manifest"] = {
        "job": {
            "manifest": {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": {"name": "cache"},
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [{"name": "c", "image": "ghcr.io/a/b:1"}],
                            "nodeSelector": {"kubernetes.io/os": "linux", "pool": "cache"},
                        }
                    }
                },
            }
        }
    }
    found = run(tmp_path / "a", docs, "GPU015")
    assert [f.address for f in found] == ["kubernetes_manifest.job"] and "no label pool=cache" in found[0].message
    assert "no label kubernetes.io/os" not in found[0].message  # a well-known label is not judged
    resource(docs, AWS, "aws_eks_cluster", "cluster_cluster")["compute_config"] = {"enabled": True}
    res = result(tmp_path / "b", docs)
    assert of(res.findings, "GPU015") == []
    assert "GPU015 (aws-us-east-1): EKS Auto Mode provisions its nodes, so workload placement was not judged" in (
        res.skipped_policies
    )


def test_gpu015_in_plans(tmp_path):
    cluster = cluster_plan(tmp_path)  # one GPU node group, tainted; no system group
    router = {
        "metadata": [{"name": "router", "namespace": "gpufleet"}],
        "spec": [
            {
                "template": [
                    {
                        "metadata": [{"labels": {"app": "router"}}],
                        "spec": [
                            {
                                "container": [{"name": "r", "image": "ghcr.io/a/r:1"}],
                                "toleration": [],
                                "node_selector": None,
                            }
                        ],
                    }
                ]
            }
        ],
    }
    engine = json.loads(json.dumps(router))
    pod = engine["spec"][0]["template"][0]["spec"][0]
    pod["toleration"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "value": ""}]
    pod["node_selector"] = {"gpufleet.io/pool": "gpu-h100-80gb"}
    pod["container"][0]["resources"] = [{"limits": {"nvidia.com/gpu": "1"}, "requests": {}}]
    serving = write_plan(
        tmp_path / "aws-us-east-1-serving.json",
        change("kubernetes_deployment_v1.router", router),
        change("kubernetes_deployment_v1.engine", engine),
    )
    found = of(check([cluster, serving], run_checkov=False, today=TODAY).findings, "GPU015")
    assert [f.address for f in found] == ["kubernetes_deployment_v1.router"]
    assert "gpu-h100-80gb (nvidia.com/gpu=present:NoSchedule, GPU): taint" in found[0].message


# -- GPU016 latency records -------------------------------------------------------------------
def latency(region: str, ident: str, name: str = "llm.example.com", rtype: str = "CNAME") -> dict:
    return {
        "zone_id": "${data.aws_route53_zone.zone.zone_id}",
        "name": name,
        "type": rtype,
        "ttl": 60,
        "records": [f"{ident}.llm.example.com"],
        "set_identifier": ident,
        "latency_routing_policy": {"region": region},
    }


def test_gpu016_two_latency_records_for_one_region_fail(tmp_path, docs):
    docs["global-traffic"] = stack(
        aws_route53_record={
            "aws": latency("us-east-1", "aws-us-east-1"),
            "azure": latency("us-east-1", "azure-eastus"),
            "gcp": latency("us-central1", "gcp-us-central1"),
        }
    )
    found = run(tmp_path, docs, "GPU016")
    assert sorted(f.address for f in found) == ["aws_route53_record.aws", "aws_route53_record.azure"]
    assert all(f.severity == "critical" for f in found)
    assert "for AWS region us-east-1 (set_identifier 'azure-eastus') has a twin: aws_route53_record.aws" in next(
        f.message for f in found if f.address.endswith("azure")
    )


def test_gpu016_distinct_regions_names_or_types_pass(tmp_path, docs):
    docs["global-traffic"] = stack(
        aws_route53_record={
            "a": latency("us-east-1", "aws-us-east-1"),
            "b": latency("us-west-2", "aws-us-west-2"),
            "c": latency("us-east-1", "x", name="other.example.com"),
            "d": latency("us-east-1", "y", rtype="AAAA"),
            "w": {
                "zone_id": "Z1",
                "name": "llm.example.com",
                "type": "CNAME",
                "weighted_routing_policy": {"weight": 1},
            },
        }
    )
    assert run(tmp_path, docs, "GPU016") == []


def test_gpu016_in_plans(tmp_path):
    def rec(name, fqdn, ident):
        return change(
            f"aws_route53_record.{name}",
            {
                "zone_id": "Z0123",
                "name": fqdn,
                "type": "CNAME",
                "set_identifier": ident,
                "latency_routing_policy": [{"region": "eu-west-1"}],
            },
        )

    plan = write_plan(
        tmp_path / "global-traffic.json", rec("a", "llm.example.com.", "a"), rec("b", "LLM.example.com", "b")
    )
    assert len(of(check([plan], run_checkov=False, today=TODAY).findings, "GPU016")) == 2


# -- GPU017 image registry --------------------------------------------------------------------
def test_docker_hub_references():
    assert docker_hub_reference("gpufleet-serving:0.1.0") == "docker.io/library/gpufleet-serving:0.1.0"
    assert docker_hub_reference("vllm/vllm-openai:v0.11.0") == "docker.io/vllm/vllm-openai:v0.11.0"
    assert docker_hub_reference("busybox@sha256:abc") == "docker.io/library/busybox@sha256:abc"
    for named in ("ghcr.io/acme/x:1", "localhost/x", "registry:5000/x", "docker.io/vllm/vllm-openai", "${var.img}"):
        assert docker_hub_reference(named) is None, named


def test_gpu017_images_without_registry_fail_with_their_clouds_fix(tmp_path, docs):
    resource(docs, SRV, "kubernetes_deployment_v1", "router")["spec"]["template"]["spec"]["container"][0]["image"] = (
        "gpufleet-serving:0.1.0"
    )
    docs[AZ_SRV] = stack(kubernetes_daemon_set_v1={"agent": deployment("agent", image="vllm/vllm-openai:v0.11.0")})
    found = {f.address: f.message for f in run(tmp_path, docs, "GPU017")}
    router, agent = found["kubernetes_deployment_v1.router"], found["kubernetes_daemon_set_v1.agent"]
    assert "image 'gpufleet-serving:0.1.0' names no registry: it is pulled from Docker Hub as " in router
    assert "docker.io/library/gpufleet-serving:0.1.0" in router and "dkr.ecr" in router and "azurecr" not in router
    assert "DaemonSet agent" in agent and "azurecr.io" in agent


def test_gpu017_registry_paths_pass(tmp_path, docs):
    docs[AZ_SRV] = stack(
        kubernetes_deployment_v1={
            "a": deployment("a", image="acme.azurecr.io/gpufleet-serving@sha256:" + "0" * 64),
            "b": deployment("b", image="${var.image}"),
        }
    )
    assert run(tmp_path, docs, "GPU017") == []


# -- GPU018 model-hub token -------------------------------------------------------------------
def engine_container(docs) -> dict:
    return resource(docs, SRV, "kubernetes_deployment_v1", "engine")["spec"]["template"]["spec"]["container"][0]


def test_gpu018_gated_model_without_token_fails(tmp_path, docs):
    del engine_container(docs)["env"]
    found = run(tmp_path, docs, "GPU018")
    assert [f.address for f in found] == ["kubernetes_deployment_v1.engine"]
    assert (
        "Deployment vllm serves llama-3.1-8b (meta-llama/Llama-3.1-8B-Instruct), gated on Hugging Face, but reads "
        "no token" in found[0].message
    )
    assert "AWS Secrets Manager" in found[0].message and found[0].severity == "high"


def test_gpu018_optional_secret_nobody_creates_fails(tmp_path, docs):
    engine_container(docs)["env"][0]["value_from"]["secret_key_ref"]["optional"] = True
    assert run(tmp_path / "a", docs, "GPU018") == []  # optional, but the stack creates hf-token
    del docs[SRV]["resource"]["kubernetes_secret_v1"]
    found = run(tmp_path / "b", docs, "GPU018")
    assert len(found) == 1 and "token Secret hf-token (env HF_TOKEN) is optional and no stack creates it" in (
        found[0].message
    )


def test_gpu018_required_operator_secret_volume_or_ungated_model_pass(tmp_path, docs):
    # a required reference to a Secret the operator makes
    del docs[SRV]["resource"]["kubernetes_secret_v1"]
    assert run(tmp_path / "a", docs, "GPU018") == []
    # the token as a mounted Secret volume (the gpufleet engine's way), required
    c = engine_container(docs)
    del c["env"]
    c["volume_mount"].append({"name": "hf-token", "mount_path": "/var/run/secrets/huggingface"})
    spec = resource(docs, SRV, "kubernetes_deployment_v1", "engine")["spec"]["template"]["spec"]
    spec["volume"].append({"name": "hf-token", "secret": {"secret_name": "huggingface"}})
    assert run(tmp_path / "b", docs, "GPU018") == []
    spec["volume"][-1]["secret"]["optional"] = True
    assert len(run(tmp_path / "c", docs, "GPU018")) == 1
    # a model that is not gated needs no token
    c["args"] = ["--model", "Qwen/Qwen2.5-7B-Instruct"]
    assert run(tmp_path / "d", docs, "GPU018") == []


def test_gpu018_matches_the_fleet_model_name(tmp_path, docs, example_fleet):
    engine = resource(docs, SRV, "kubernetes_deployment_v1", "engine")
    engine["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] = "gpufleet-engine"
    c = engine_container(docs)
    c["args"] = ["--fleet", "/etc/gpufleet/fleet.yaml", "--region", "aws-us-east-1", "--model", "llama-3.1-8b"]
    del c["env"]
    found = run(tmp_path, docs, "GPU018", fleet=example_fleet)
    assert len(found) == 1 and "serves llama-3.1-8b (meta-llama/Llama-3.1-8B-Instruct)" in found[0].message


# -- GPU019 KMS key ring names ----------------------------------------------------------------
def test_gpu019_fixed_key_ring_name_fails_and_random_suffix_passes(tmp_path, docs):
    docs[GCP]["resource"]["google_kms_key_ring"] = {"cluster_ring": {"name": "acme-llm-gcp", "location": "us-central1"}}
    found = run(tmp_path / "a", docs, "GPU019")
    assert [f.address for f in found] == ["google_kms_key_ring.cluster_ring"] and found[0].severity == "medium"
    assert "key ring name 'acme-llm-gcp' is fixed" in found[0].message and "random_id" in found[0].message
    docs[GCP]["resource"]["google_kms_key_ring"]["cluster_ring"]["name"] = "acme-llm-${random_id.cluster_kms.hex}"
    assert run(tmp_path / "b", docs, "GPU019") == []


def test_gpu019_in_plans_reads_the_configuration(tmp_path):
    ring = change("google_kms_key_ring.ring", {"name": "acme-1a2b3c4d", "location": "us-central1"})

    def config(expression: dict) -> dict:
        return {
            "root_module": {"resources": [{"address": "google_kms_key_ring.ring", "expressions": {"name": expression}}]}
        }

    literal = write_plan(
        tmp_path / "gcp-a-cluster.json", ring, configuration=config({"constant_value": "acme-1a2b3c4d"})
    )
    assert len(of(check([literal], run_checkov=False, today=TODAY).findings, "GPU019")) == 1
    computed = config({"references": ["random_id.kms.hex", "random_id.kms"]})
    suffixed = write_plan(tmp_path / "gcp-b-cluster.json", ring, configuration=computed)
    unknown = write_plan(
        tmp_path / "gcp-c-cluster.json",
        change("google_kms_key_ring.ring", {"location": "us-central1"}, unknown={"name": True}),
    )
    assert of(check([suffixed, unknown], run_checkov=False, today=TODAY).findings, "GPU019") == []


def test_numbers_in_container_args_are_text_to_the_policies(tmp_path, docs):
    """A plan may carry `args: ["--port", 8000]`: the workload reader turns every item to text (it
    crashed with AttributeError on the int before)."""
    c = engine_container(docs)
    c["args"] = [*c.get("args", []), "--port", 8000]
    del c["env"]
    found = run(tmp_path, docs, "GPU018")  # reads the args for --model
    assert [f.address for f in found] == ["kubernetes_deployment_v1.engine"]
