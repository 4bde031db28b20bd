"""Every policy of the GPU pack: the compliant fixture passes it, a broken copy fails it."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpufleet.stacks.fleetfile import parse_fleet
from gpufleet.stacks.plancheck.policies import POLICIES, SEVERITIES, Finding
from gpufleet.stacks.plancheck.run import check

from .conftest import PLANS, REPO, SNAPSHOT, TODAY, resource, stack_docs, write_out

AWS, GCP, AZ, SRV = (
    "aws-us-east-1-cluster",
    "gcp-us-central1-cluster",
    "azure-westeurope-cluster",
    "aws-us-east-1-serving",
)


@pytest.fixture()
def docs():
    return stack_docs()


def run(tmp_path: Path, docs, fleet=None, capacity: Path | None = SNAPSHOT) -> list[Finding]:
    out = write_out(tmp_path / "cdktf.out", docs)
    return check([out], fleet=fleet, capacity=capacity, run_checkov=False, today=TODAY).findings


def of(findings: list[Finding], pid: str) -> list[Finding]:
    return [f for f in findings if f.policy == pid]


def fleet_with(**replace: str):
    text = (REPO / "fleet.yaml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return parse_fleet(text, "fleet.yaml")


def test_every_policy_is_documented():
    assert [p for p in POLICIES] == [f"GPU{i:03d}" for i in range(1, 20)]
    for p in POLICIES.values():
        assert p.severity in SEVERITIES and len(p.rationale) > 80 and p.fix and p.title


def test_the_compliant_fixture_passes_every_policy(tmp_path, docs, example_fleet):
    result = check(
        [write_out(tmp_path / "o", docs)],
        fleet=example_fleet,
        capacity=SNAPSHOT,
        run_checkov=False,
        today=TODAY,
    )
    assert result.findings == [] and result.skipped_policies == [] and result.passed


# -- GPU001 taint ---------------------------------------------------------------------------
def test_gpu001_missing_or_wrong_taint_fails(tmp_path, docs):
    resource(docs, AWS, "aws_eks_node_group", "cluster_gpu-pool")["taint"] = []
    resource(docs, GCP, "google_container_node_pool", "cluster_gpu")["node_config"]["taint"][0]["effect"] = (
        "PREFER_NO_SCHEDULE"
    )
    resource(docs, AZ, "azurerm_kubernetes_cluster_node_pool", "cluster_spot")["node_taints"] = [
        "kubernetes.azure.com/scalesetpriority=spot:NoSchedule"
    ]
    found = of(run(tmp_path, docs), "GPU001")
    assert {f.address for f in found} == {
        "aws_eks_node_group.cluster_gpu-pool",
        "google_container_node_pool.cluster_gpu",
        "azurerm_kubernetes_cluster_node_pool.cluster_spot",
    }
    assert all("Fix:" in f.message and f.severity == "high" for f in found)


def test_gpu001_ignores_non_gpu_pools(tmp_path, docs):
    assert "taint" not in resource(docs, AWS, "aws_eks_node_group", "cluster_system-pool")
    assert of(run(tmp_path, docs), "GPU001") == []


# -- GPU002 scale to zero ---------------------------------------------------------------------
def test_gpu002_pools_that_cannot_reach_zero_fail(tmp_path, docs):
    resource(docs, AWS, "aws_eks_node_group", "cluster_gpu-pool")["scaling_config"]["min_size"] = 1
    del resource(docs, GCP, "google_container_node_pool", "cluster_gpu")["autoscaling"]
    resource(docs, AZ, "azurerm_kubernetes_cluster_node_pool", "cluster_spot")["auto_scaling_enabled"] = False
    found = {f.address: f.message for f in of(run(tmp_path, docs), "GPU002")}
    assert "at least 1 node" in found["aws_eks_node_group.cluster_gpu-pool"]
    assert "no autoscaling" in found["google_container_node_pool.cluster_gpu"]
    assert "autoscaling is off" in found["azurerm_kubernetes_cluster_node_pool.cluster_spot"]
    assert len(found) == 3


def test_gpu002_gcp_per_zone_minimum_of_zero_passes(tmp_path, docs):
    pool = resource(docs, GCP, "google_container_node_pool", "cluster_gpu")
    pool["autoscaling"] = {"min_node_count": 0, "max_node_count": 2}
    assert of(run(tmp_path, docs), "GPU002") == []


# -- GPU003 reservations pin one zone ---------------------------------------------------------
def test_gpu003_reserved_pools_over_several_zones_fail(tmp_path, docs):
    block = resource(docs, AWS, "aws_eks_node_group", "cluster_block-pool")
    block["subnet_ids"].append("${aws_subnet.cluster_private-1.id}")
    resource(docs, GCP, "google_container_node_pool", "cluster_flex")["node_locations"] = [
        "us-central1-a",
        "us-central1-b",
    ]
    resource(docs, AZ, "azurerm_kubernetes_cluster_node_pool", "cluster_gpu")["zones"] = ["1", "2", "3"]
    found = {f.address: f.message for f in of(run(tmp_path, docs), "GPU003")}
    assert found.keys() == {
        "aws_eks_node_group.cluster_block-pool",
        "google_container_node_pool.cluster_flex",
        "azurerm_kubernetes_cluster_node_pool.cluster_gpu",
    }
    assert found["azurerm_kubernetes_cluster_node_pool.cluster_gpu"].startswith(
        "reservation GPU pool spans 3"
    )


def test_gpu003_spot_and_on_demand_pools_may_spread(tmp_path, docs):
    # the fixture's on-demand (2 subnets, 2 GCP zones) and spot (3 Azure zones) pools pass
    assert of(run(tmp_path, docs), "GPU003") == []


# -- GPU004 quota -----------------------------------------------------------------------------
def test_gpu004_max_gpus_over_snapshot_quota_fail(tmp_path, docs):
    resource(docs, AWS, "aws_eks_node_group", "cluster_gpu-pool")["scaling_config"]["max_size"] = 3  # 24 > 16
    resource(docs, GCP, "google_container_node_pool", "cluster_flex")["autoscaling"][
        "total_max_node_count"
    ] = 5
    found = of(run(tmp_path, docs), "GPU004")
    msgs = {f.address: f.message for f in found}
    assert (
        "may scale to 24 H100-80GB GPUs (on-demand) but the snapshot leaves 16 of 16 free"
        in msgs["aws_eks_node_group.cluster_gpu-pool"]
    )
    assert (
        "(spot)" in msgs["google_container_node_pool.cluster_flex"]
    )  # flex-start draws on preemptible quota
    assert len(found) == 2


def test_gpu004_needs_a_snapshot(tmp_path, docs):
    resource(docs, AWS, "aws_eks_node_group", "cluster_gpu-pool")["scaling_config"]["max_size"] = 30
    result = check([write_out(tmp_path / "o", docs)], run_checkov=False)
    assert of(result.findings, "GPU004") == []
    assert any("GPU004" in note for note in result.skipped_policies)


# -- GPU005 offered ---------------------------------------------------------------------------
def test_gpu005_catalog_mismatches_fail_without_a_snapshot(tmp_path, docs):
    resource(docs, AWS, "aws_eks_node_group", "cluster_gpu-pool")["instance_types"] = ["p5.4xlarge"]
    resource(docs, GCP, "google_container_node_pool", "cluster_gpu")["node_config"]["guest_accelerator"][0][
        "count"
    ] = 2
    found = {f.address: f.message for f in of(run(tmp_path, docs, capacity=None), "GPU005")}
    assert "p5.4xlarge is not a GPU type of the catalog" in found["aws_eks_node_group.cluster_gpu-pool"]
    assert "comes with 1 x nvidia-h100-80gb" in found["google_container_node_pool.cluster_gpu"]


def test_gpu005_snapshot_says_where_it_is_offered(tmp_path, docs):
    resource(docs, GCP, "google_container_node_pool", "cluster_gpu")["node_locations"].append("us-central1-c")
    flex = resource(docs, GCP, "google_container_node_pool", "cluster_flex")
    flex["node_config"]["machine_type"] = "a3-highgpu-2g"
    flex["node_config"]["guest_accelerator"][0]["count"] = 2
    found = {f.address: f.message for f in of(run(tmp_path, docs), "GPU005")}
    assert "not offered in zone us-central1-c" in found["google_container_node_pool.cluster_gpu"]
    assert (
        "a3-highgpu-2g is not offered in gcp us-central1" in found["google_container_node_pool.cluster_flex"]
    )


def test_gpu005_regions_the_snapshot_did_not_scan_are_not_flagged(tmp_path, docs):
    docs[AWS]["provider"]["aws"][0]["region"] = "eu-west-1"
    assert of(run(tmp_path, docs), "GPU005") == []


# -- GPU006 budget ----------------------------------------------------------------------------
def test_gpu006_cost_at_max_over_budget_fails(tmp_path, docs):
    fleet = fleet_with(**{"budget_per_hour: 400": "budget_per_hour: 200"})
    found = of(run(tmp_path, docs, fleet=fleet), "GPU006")
    assert len(found) == 1 and found[0].stack == "(fleet)" and found[0].severity == "high"
    # 2 x 55.04 + 1 x 55.04 (capacity block) + 6 x 11.06 (GCP) + 6 x 4.04 (Azure) = 255.72
    assert "$255.72/h, over the budget of $200.00/h" in found[0].message
    assert found[0].details["usd_per_hour_at_max"] == 255.72


def test_gpu006_within_budget_passes_and_unpriced_pools_are_reported_low(tmp_path, docs, example_fleet):
    assert of(run(tmp_path / "a", docs, fleet=example_fleet), "GPU006") == []
    resource(docs, AZ, "azurerm_kubernetes_cluster_node_pool", "cluster_spot")["vm_size"] = (
        "Standard_NC48ads_A100_v4"
    )
    found = of(run(tmp_path / "b", docs, fleet=example_fleet), "GPU006")
    assert [(f.severity, f.address) for f in found] == [
        ("low", "azurerm_kubernetes_cluster_node_pool.cluster_spot")
    ]
    assert "prices.yaml" in found[0].message


# -- GPU007 tags ------------------------------------------------------------------------------
def test_gpu007_missing_or_different_tags_fail(tmp_path, docs, example_fleet):
    del resource(docs, GCP, "google_container_cluster", "cluster_cluster")["resource_labels"]
    resource(docs, AZ, "azurerm_kubernetes_cluster_node_pool", "cluster_gpu")["tags"]["team"] = "other"
    del docs[AWS]["provider"]["aws"][0]["default_tags"]
    found = {(f.stack, f.address): f.message for f in of(run(tmp_path, docs, fleet=example_fleet), "GPU007")}
    gcp = {a for s, a in found if s == GCP}
    assert gcp == {
        "google_container_cluster.cluster_cluster",
        "google_container_node_pool.cluster_system",
        "google_container_node_pool.cluster_gpu",
        "google_container_node_pool.cluster_flex",
    }
    assert "different team='other'" in found[(AZ, "azurerm_kubernetes_cluster_node_pool.cluster_gpu")]
    assert "missing team, cost-center" in found[(AWS, "aws_eks_cluster.cluster_cluster")]


def test_gpu007_resource_tags_count_without_provider_defaults(tmp_path, docs, example_fleet):
    del docs[AWS]["provider"]["aws"][0]["default_tags"]
    for rtype in ("aws_eks_cluster", "aws_eks_node_group"):
        for body in docs[AWS]["resource"][rtype].values():
            body["tags"] = {"team": "ml-platform", "cost-center": "4711"}
    assert of(run(tmp_path, docs, fleet=example_fleet), "GPU007") == []


# -- GPU008 API endpoint ----------------------------------------------------------------------
def test_gpu008_world_open_endpoints_fail(tmp_path, docs):
    vpc = resource(docs, AWS, "aws_eks_cluster", "cluster_cluster")["vpc_config"]
    vpc["endpoint_public_access"] = True  # and no public_access_cidrs: EKS's default is 0.0.0.0/0
    del resource(docs, GCP, "google_container_cluster", "cluster_cluster")[
        "master_authorized_networks_config"
    ]
    resource(docs, AZ, "azurerm_kubernetes_cluster", "cluster_cluster")["api_server_access_profile"] = {
        "authorized_ip_ranges": ["10.0.0.0/8", "0.0.0.0/0"]
    }
    found = {f.stack: f for f in of(run(tmp_path, docs), "GPU008")}
    assert set(found) == {AWS, GCP, AZ} and all(f.severity == "critical" for f in found.values())
    assert "0.0.0.0/0" in found[AZ].message


def test_gpu008_restricted_or_private_endpoints_pass(tmp_path, docs):
    vpc = resource(docs, AWS, "aws_eks_cluster", "cluster_cluster")["vpc_config"]
    vpc.update(endpoint_public_access=True, public_access_cidrs=["203.0.113.0/24"])
    az = resource(docs, AZ, "azurerm_kubernetes_cluster", "cluster_cluster")
    del az["api_server_access_profile"]
    az["private_cluster_enabled"] = True
    assert of(run(tmp_path, docs), "GPU008") == []
    vpc["public_access_cidrs"] = ["::/0"]
    assert len(of(run(tmp_path / "b", docs), "GPU008")) == 1


# -- GPU009 encryption ------------------------------------------------------------------------
def test_gpu009_unencrypted_secrets_and_disks_fail(tmp_path, docs):
    del resource(docs, AWS, "aws_eks_cluster", "cluster_cluster")["encryption_config"]
    resource(docs, AWS, "aws_launch_template", "cluster_gpu-lt")["block_device_mappings"][1]["ebs"][
        "encrypted"
    ] = "false"
    resource(docs, GCP, "google_container_cluster", "cluster_cluster")["database_encryption"]["state"] = (
        "DECRYPTED"
    )
    del resource(docs, AZ, "azurerm_kubernetes_cluster", "cluster_cluster")["key_management_service"]
    found = {f.address: f.message for f in of(run(tmp_path, docs), "GPU009")}
    assert set(found) == {
        "aws_eks_cluster.cluster_cluster",
        "aws_launch_template.cluster_gpu-lt",
        "google_container_cluster.cluster_cluster",
        "azurerm_kubernetes_cluster.cluster_cluster",
    }
    assert "/dev/xvdb is not encrypted" in found["aws_launch_template.cluster_gpu-lt"]


def test_gpu009_passes_on_the_encrypted_fixture(tmp_path, docs):
    assert of(run(tmp_path, docs), "GPU009") == []


# -- GPU010 serving deployments ---------------------------------------------------------------
def engine(docs):
    return resource(docs, SRV, "kubernetes_deployment_v1", "engine")["spec"]["template"]["spec"]


def test_gpu010_missing_probes_or_shm_fail(tmp_path, docs):
    spec = engine(docs)
    del spec["container"][0]["startup_probe"]
    spec["volume"][0]["empty_dir"] = {}  # /dev/shm on disk, not memory
    found = of(run(tmp_path, docs), "GPU010")
    assert len(found) == 1 and found[0].address == "kubernetes_deployment_v1.engine"
    assert "startup probe" in found[0].message and "memory-backed" in found[0].message


def test_gpu010_router_without_gpu_is_not_a_serving_deployment(tmp_path, docs):
    assert of(run(tmp_path, docs), "GPU010") == []  # the router has no startup probe and no /dev/shm


def test_gpu010_kubernetes_manifest_deployments_are_checked(tmp_path, docs):
    docs[SRV]["resource"]["kubernetes_manifest"] = {
        "engine2": {
            "manifest": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "e2"},
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "vllm",
                                    "image": "vllm/vllm-openai:v0.11.0",
                                    "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}},
                                    "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                                }
                            ],
                            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
                        }
                    }
                },
            }
        }
    }
    found = of(run(tmp_path, docs), "GPU010")
    assert [(f.address, "startup probe" in f.message) for f in found] == [
        ("kubernetes_manifest.engine2", True)
    ]


# -- GPU011 destructive changes ---------------------------------------------------------------
def test_gpu011_replace_reports_the_gpus_lost_for_both_orders():
    found = of(check([PLANS / "aws-us-east-1-cluster.replace.json"], run_checkov=False).findings, "GPU011")
    msgs = {f.address: f.message for f in found}
    assert (
        "replace (delete then create) of a GPU pool: aws us-east-1 loses up to 16 H100-80GB GPUs"
        in msgs["aws_eks_node_group.gpu"]
    )
    assert (
        "create before delete" in msgs["aws_eks_node_group.l40s"]
        and "8 L40S GPUs" in msgs["aws_eks_node_group.l40s"]
    )
    assert {f.details["gpus_lost"] for f in found} == {16, 8}


def test_gpu011_deleting_a_cluster_is_critical():
    found = of(check([PLANS / "aws-us-east-1-cluster.delete.json"], run_checkov=False).findings, "GPU011")
    by = {f.address: f for f in found}
    assert by["aws_eks_cluster.cluster"].severity == "critical"
    assert "loses all 16 GPUs of its 1 GPU pool(s)" in by["aws_eks_cluster.cluster"].message
    assert by["aws_eks_node_group.gpu"].severity == "high"


@pytest.mark.parametrize("kind", ["create", "update"])
def test_gpu011_create_and_update_are_not_destructive(kind):
    result = check([PLANS / f"aws-us-east-1-cluster.{kind}.json"], run_checkov=False, today=TODAY)
    assert of(result.findings, "GPU011") == []
    assert result.findings == []  # the plan fixtures are otherwise compliant too


def test_plans_are_checked_like_stacks():
    # an update that grows the pool past the snapshot's quota is caught in the plan
    result = check(
        [PLANS / "aws-us-east-1-cluster.update.json"], capacity=SNAPSHOT, run_checkov=False, today=TODAY
    )
    assert [f.policy for f in result.findings] == ["GPU004"]
