"""The EKS cluster construct, deployable for real (issue 12): the Pod Identity Agent add-on the
add-ons stack's pod identity associations need, an access entry with cluster-admin per admin role,
the fleet's resolved Kubernetes version, node groups ordered after their IAM policies, and the GPU
label the cluster autoscaler waits on.

One synth for the module: the AWS cluster stack of a small fleet (fleet.yaml's AWS regions), built
directly, so it does not depend on the serving and add-ons stacks."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

pytestmark = pytest.mark.slow

ADMIN = "arn:aws:iam::123456789012:role/platform-admin"
ADMIN_WITH_PATH = "arn:aws:iam::123456789012:role/ops/oncall/breakglass"  # access entries take paths
REGION_KEY = "aws-us-east-1"


@pytest.fixture(scope="module")
def fleet(example_fleet_path):
    from gpufleet.stacks.spec import Fleet

    doc = copy.deepcopy(yaml.safe_load(example_fleet_path.read_text()))
    doc["fleet"] = "deploy-aws"
    doc["regions"] = [r for r in doc["regions"] if r["cloud"] == "aws"]
    # The repeat must not become a second access entry: EKS answers 409 to one.
    doc["settings"]["access"] = {"aws_admin_role_arns": [ADMIN, ADMIN_WITH_PATH, ADMIN]}
    return Fleet.model_validate(doc)


@pytest.fixture(scope="module")
def doc(fleet) -> dict:
    """The synthesized cluster stack of aws-us-east-1, as JSON."""
    from gpufleet.stacks.synth import prepare_runtime

    prepare_runtime()
    from cdktn import TerraformStack, Testing
    from gpufleet.modules.aws_cluster import AwsGpuCluster
    from gpufleet.modules.cluster import add_provider, props_for_region

    region = next(r for r in fleet.regions if r.key == REGION_KEY)
    props = props_for_region(fleet, region)
    stack = TerraformStack(Testing.app(), f"{REGION_KEY}-cluster")
    add_provider(stack, props)
    AwsGpuCluster(stack, "cluster", props=props)
    return json.loads(Testing.synth(stack))


def _resources(doc: dict, rtype: str) -> dict[str, dict]:
    return doc.get("resource", {}).get(rtype, {})


def _only(doc: dict, rtype: str) -> tuple[str, dict]:
    (item,) = _resources(doc, rtype).items()
    return item


def _ref(rtype: str, name: str, attr: str) -> str:
    return "${" + f"{rtype}.{name}.{attr}" + "}"


def test_props_carry_the_admins_and_the_version(fleet):
    from gpufleet.modules.cluster import props_for_region

    props = props_for_region(fleet, next(r for r in fleet.regions if r.key == REGION_KEY))
    assert props.admin_principals == (ADMIN, ADMIN_WITH_PATH, ADMIN)
    assert props.kubernetes_version == fleet.kubernetes_version


def test_cluster_runs_the_fleets_resolved_version(doc, fleet):
    _, cluster = _only(doc, "aws_eks_cluster")
    assert cluster["version"] == fleet.kubernetes_version
    assert cluster["version"] != "1.31"  # EKS no longer creates 1.31 clusters
    # Access entries need the API authentication mode; the creator keeps its bootstrap admin.
    assert cluster["access_config"] == {
        "authentication_mode": "API",
        "bootstrap_cluster_creator_admin_permissions": True,
    }


def test_pod_identity_agent_addon(doc):
    cluster_name, _ = _only(doc, "aws_eks_cluster")
    _, addon = _only(doc, "aws_eks_addon")
    assert addon["addon_name"] == "eks-pod-identity-agent"
    assert addon["cluster_name"] == _ref("aws_eks_cluster", cluster_name, "name")
    # After the system nodes, so ACTIVE means the agent runs somewhere.
    system = next(k for k, v in _resources(doc, "aws_eks_node_group").items() if v["node_group_name"] == "system")
    assert f"aws_eks_node_group.{system}" in addon["depends_on"]
    # The agent uses the node role's eks-auth:AssumeRoleForPodIdentity (AmazonEKSWorkerNodePolicy).
    policies = {r["policy_arn"].rsplit("/", 1)[1] for r in _resources(doc, "aws_iam_role_policy_attachment").values()}
    assert "AmazonEKSWorkerNodePolicy" in policies


def test_one_admin_access_entry_per_role(doc):
    cluster_name, _ = _only(doc, "aws_eks_cluster")
    entries = _resources(doc, "aws_eks_access_entry")
    assert sorted(e["principal_arn"] for e in entries.values()) == sorted([ADMIN, ADMIN_WITH_PATH])
    for entry in entries.values():
        assert entry["type"] == "STANDARD"
        assert entry["cluster_name"] == _ref("aws_eks_cluster", cluster_name, "name")


def test_each_entry_gets_cluster_admin_on_the_whole_cluster(doc):
    cluster_name, _ = _only(doc, "aws_eks_cluster")
    (partition,) = doc["data"]["aws_partition"]
    entries = _resources(doc, "aws_eks_access_entry")
    associations = list(_resources(doc, "aws_eks_access_policy_association").values())
    assert len(associations) == len(entries) == 2
    # Each association names its entry's principal through the entry, so the entry comes first.
    expected = sorted(_ref("aws_eks_access_entry", name, "principal_arn") for name in entries)
    assert sorted(a["principal_arn"] for a in associations) == expected
    for assoc in associations:
        assert assoc["cluster_name"] == _ref("aws_eks_cluster", cluster_name, "name")
        assert assoc["access_scope"] == {"type": "cluster"}
        assert assoc["policy_arn"] == (
            "arn:${data.aws_partition." + partition + ".partition}"
            ":eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"
        )


def test_iam_policies_outlive_the_cluster_and_node_groups(doc):
    attachments = _resources(doc, "aws_iam_role_policy_attachment")
    by_policy = {v["policy_arn"].rsplit("/", 1)[1]: k for k, v in attachments.items()}
    _, cluster = _only(doc, "aws_eks_cluster")
    assert f"aws_iam_role_policy_attachment.{by_policy['AmazonEKSClusterPolicy']}" in cluster["depends_on"]
    node_policies = {
        f"aws_iam_role_policy_attachment.{by_policy[p]}"
        for p in ("AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryPullOnly")
    }
    groups = _resources(doc, "aws_eks_node_group").values()
    assert len(groups) == 2
    for group in groups:
        assert node_policies <= set(group["depends_on"]), group["node_group_name"]


def test_gpu_pool_scales_from_the_fleets_min_and_tells_the_autoscaler_it_has_gpus(doc, fleet):
    region = next(r for r in fleet.regions if r.key == REGION_KEY)
    (gpu,) = [g for g in _resources(doc, "aws_eks_node_group").values() if g["node_group_name"] != "system"]
    assert gpu["ami_type"] == "BOTTLEROCKET_x86_64_NVIDIA"  # driver and device plugin in the AMI
    scaling = gpu["scaling_config"]
    assert scaling == {"min_size": region.nodes.min, "max_size": region.nodes.max, "desired_size": region.nodes.min}
    assert gpu["lifecycle"]["ignore_changes"] == ["scaling_config[0].desired_size"]
    assert gpu["labels"]["k8s.amazonaws.com/accelerator"] == "nvidia-h100-80gb"
    tags = {t["tag"]["key"]: t["tag"]["value"] for t in _resources(doc, "aws_autoscaling_group_tag").values()}
    prefix = "k8s.io/cluster-autoscaler/node-template"
    assert tags[f"{prefix}/label/k8s.amazonaws.com/accelerator"] == "nvidia-h100-80gb"
    assert tags[f"{prefix}/resources/nvidia.com/gpu"] == "8"
