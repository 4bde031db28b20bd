"""The GPU cluster stacks, asserted through cdktn's Testing API (Testing.synth +
to_have_resource_with_properties), one class per cloud: GPU pool instance type, GPU count, taint,
min size 0, driver setting, and an API endpoint that is not open to 0.0.0.0/0."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

OPEN = "0.0.0.0/0"


def _synth(handle) -> str:
    from cdktn import Testing

    return Testing.synth(handle.stack)


def _has(synth: str, resource_type: str, properties: dict) -> bool:
    from cdktn import Testing

    return Testing.to_have_resource_with_properties(synth, resource_type, properties)


def _resources(synth: str, resource_type: str) -> list[dict]:
    return list(json.loads(synth).get("resource", {}).get(resource_type, {}).values())


class TestStackLayout:
    def test_one_cluster_stack_per_region(self, synthesized, example_fleet):
        names = set(synthesized.manifest()["stacks"])
        expected = {f"{r.cloud.value}-{r.region}-cluster" for r in example_fleet.regions}
        assert expected <= names
        assert set(synthesized.clusters) == {r.key for r in example_fleet.regions}
        for key, handle in synthesized.clusters.items():
            assert handle.name == f"{key}-cluster"
            assert handle.region.key == key

    def test_each_stack_has_its_provider_and_local_backend(self, synthesized):
        from cdktn import Testing

        provider = {"aws": "aws", "gcp": "google", "azure": "azurerm"}
        for handle in synthesized.clusters.values():
            synth = _synth(handle)
            assert Testing.to_have_provider(synth, provider[handle.region.cloud.value])
            backend = json.loads(synth)["terraform"]["backend"]
            assert backend == {"local": {"path": f"../../../terraform-state/{handle.name}.tfstate"}}

    def test_s3_backend_keys_each_stack(self, variant):
        for handle in variant.clusters.values():
            backend = variant.stack_json(handle.name)["terraform"]["backend"]["s3"]
            assert backend["bucket"] == "acme-tfstate"
            assert backend["key"] == f"gpufleet/variant/{handle.name}.tfstate"
            assert backend["encrypt"] is True

    def test_outputs_are_typed_and_emitted(self, synthesized):
        for handle in synthesized.clusters.values():
            out = handle.outputs
            assert out.cloud == handle.region.cloud.value
            assert out.node_pool_names[0] == "system" and len(out.gpu_pool_names) == 1
            emitted = json.loads(_synth(handle))["output"]
            for key in ("cluster_name", "endpoint", "cluster_ca_certificate", "node_pool_names"):
                assert key in emitted, f"{handle.name} lacks output {key}"
            needs = {
                "aws": {"region"},
                "gcp": {"project", "location"},
                "azure": {"resource_group_name", "location"},
            }
            assert needs[out.cloud] <= set(emitted)

    def test_fleet_tags_reach_the_resources(self, synthesized):
        for handle in synthesized.clusters.values():
            doc = json.loads(_synth(handle))
            text = json.dumps(doc)
            if handle.region.cloud.value == "aws":
                tags = doc["provider"]["aws"][0]["default_tags"][0]["tags"]
                assert tags["team"] == "ml-platform" and tags["gpufleet-fleet"] == "acme-llm"
            elif handle.region.cloud.value == "gcp":
                assert doc["provider"]["google"][0]["default_labels"]["cost-center"] == "4711"
            else:
                assert '"cost-center": "4711"' in text

    def test_no_api_open_to_the_internet_anywhere(self, synthesized):
        for handle in synthesized.clusters.values():
            doc = json.loads(_synth(handle))
            for rtype in ("aws_eks_cluster", "google_container_cluster", "azurerm_kubernetes_cluster"):
                assert OPEN not in json.dumps(doc["resource"].get(rtype, {})), f"{handle.name} {rtype}"


@pytest.fixture(scope="module")
def aws_synth(synthesized):
    return _synth(synthesized.clusters["aws-us-east-1"])


class TestAws:
    def test_gpu_pool(self, aws_synth):
        synth = aws_synth
        assert _has(
            synth,
            "aws_eks_node_group",
            {
                "instance_types": ["p5.48xlarge"],
                "ami_type": "BOTTLEROCKET_x86_64_NVIDIA",  # driver + NVIDIA device plugin in the AMI
                "capacity_type": "ON_DEMAND",
                "scaling_config": {"min_size": 0, "max_size": 2},
                "taint": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}],
                "labels": {"gpufleet.io/gpu": "H100-80GB", "gpufleet.io/gpu-count": "8"},
            },
        )

    def test_scale_from_zero_tags_tell_the_autoscaler_about_gpus(self, aws_synth):
        synth = aws_synth
        tags = {r["tag"]["key"]: r["tag"]["value"] for r in _resources(synth, "aws_autoscaling_group_tag")}
        prefix = "k8s.io/cluster-autoscaler/node-template"
        assert tags[f"{prefix}/resources/nvidia.com/gpu"] == "8"
        assert tags[f"{prefix}/taint/nvidia.com/gpu"] == "present:NoSchedule"
        assert tags[f"{prefix}/label/gpufleet.io/gpu"] == "H100-80GB"

    def test_api_endpoint_restricted(self, aws_synth):
        synth = aws_synth
        (cluster,) = _resources(synth, "aws_eks_cluster")
        vpc = cluster["vpc_config"]
        assert vpc["public_access_cidrs"] == ["203.0.113.0/24"]  # the example's public CIDR only
        assert vpc["endpoint_private_access"] is True
        rules = _resources(synth, "aws_vpc_security_group_ingress_rule")
        assert [r["cidr_ipv4"] for r in rules] == ["10.0.0.0/8"] and all(r["from_port"] == 443 for r in rules)

    def test_secrets_encrypted_with_rotating_key(self, aws_synth):
        synth = aws_synth
        assert _has(synth, "aws_eks_cluster", {"encryption_config": {"resources": ["secrets"]}})
        assert _has(synth, "aws_kms_key", {"enable_key_rotation": True})

    def test_node_role_is_least_privilege(self, aws_synth):
        synth = aws_synth
        arns = sorted(
            r["policy_arn"].rsplit("/", 1)[1] for r in _resources(synth, "aws_iam_role_policy_attachment")
        )
        assert arns == sorted(
            [
                "AmazonEKSClusterPolicy",
                "AmazonEKSWorkerNodePolicy",
                "AmazonEKS_CNI_Policy",
                "AmazonEC2ContainerRegistryPullOnly",
            ]
        )

    def test_network_spans_zones_with_nat(self, aws_synth):
        synth = aws_synth
        zones = {r["availability_zone"] for r in _resources(synth, "aws_subnet")}
        assert zones == {"us-east-1a", "us-east-1b", "us-east-1c"}
        assert len(_resources(synth, "aws_nat_gateway")) == 3

    def test_spot_region(self, synthesized):
        synth = _synth(synthesized.clusters["aws-us-west-2"])
        assert _has(
            synth,
            "aws_eks_node_group",
            {
                "capacity_type": "SPOT",
                "instance_types": ["g6e.xlarge"],
                "scaling_config": {"min_size": 0, "max_size": 8},
            },
        )

    def test_capacity_block(self, variant):
        synth = _synth(variant.clusters["aws-us-east-2"])
        (pool,) = [p for p in _resources(synth, "aws_eks_node_group") if p["node_group_name"] != "system"]
        assert pool["capacity_type"] == "CAPACITY_BLOCK"
        assert len(pool["subnet_ids"]) == 1  # a capacity block lives in one zone
        assert "instance_types" not in pool  # it sits in the launch template
        assert _has(
            synth,
            "aws_launch_template",
            {
                "instance_type": "p5.48xlarge",
                "instance_market_options": {"market_type": "capacity-block"},
                "capacity_reservation_specification": {
                    "capacity_reservation_target": {"capacity_reservation_id": "cr-0123456789abcdef0"}
                },
            },
        )

    def test_zones_from_data_source_when_none_listed(self, variant):
        synth = _synth(variant.clusters["aws-eu-west-1"])
        from cdktn import Testing

        assert Testing.to_have_data_source(synth, "aws_availability_zones")
        assert len(_resources(synth, "aws_subnet")) == 4  # 2 zones x (public + private)


@pytest.fixture(scope="module")
def gcp_synth(synthesized):
    return _synth(synthesized.clusters["gcp-us-central1"])


class TestGcp:
    def test_gpu_pool(self, gcp_synth):
        synth = gcp_synth
        assert _has(
            synth,
            "google_container_node_pool",
            {
                "node_config": {
                    "machine_type": "a3-highgpu-1g",
                    "guest_accelerator": [
                        {
                            "type": "nvidia-h100-80gb",
                            "count": 1,
                            "gpu_driver_installation_config": {"gpu_driver_version": "LATEST"},
                        }
                    ],
                    "taint": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}],
                    "spot": False,
                },
                "autoscaling": {
                    "total_min_node_count": 0,
                    "total_max_node_count": 4,
                    "location_policy": "ANY",
                },
                "node_locations": ["us-central1-a", "us-central1-b"],
            },
        )

    def test_api_endpoint_restricted(self, gcp_synth):
        synth = gcp_synth
        (cluster,) = _resources(synth, "google_container_cluster")
        blocks = cluster["master_authorized_networks_config"]["cidr_blocks"]
        assert sorted(b["cidr_block"] for b in blocks) == ["10.0.0.0/8", "203.0.113.0/24"]
        assert cluster["private_cluster_config"]["enable_private_nodes"] is True

    def test_secrets_encrypted_with_kms(self, gcp_synth):
        synth = gcp_synth
        (cluster,) = _resources(synth, "google_container_cluster")
        assert cluster["database_encryption"]["state"] == "ENCRYPTED"
        assert "google_kms_crypto_key" in cluster["database_encryption"]["key_name"]

    def test_dedicated_minimal_node_service_account(self, gcp_synth):
        synth = gcp_synth
        roles = sorted(r["role"] for r in _resources(synth, "google_project_iam_member"))
        assert roles == ["roles/artifactregistry.reader", "roles/container.defaultNodeServiceAccount"]
        for pool in _resources(synth, "google_container_node_pool"):
            assert "google_service_account" in pool["node_config"]["service_account"]

    def test_project_is_a_variable(self, gcp_synth):
        synth = gcp_synth
        assert "gcp_project" in json.loads(synth)["variable"]

    def test_spot_region(self, synthesized):
        synth = _synth(synthesized.clusters["gcp-europe-west4"])
        assert _has(
            synth,
            "google_container_node_pool",
            {
                "node_config": {
                    "machine_type": "g2-standard-8",
                    "spot": True,
                    "guest_accelerator": [{"type": "nvidia-l4", "count": 1}],
                },
            },
        )

    def test_reservation(self, variant):
        synth = _synth(variant.clusters["gcp-us-east4"])
        assert _has(
            synth,
            "google_container_node_pool",
            {
                "node_config": {
                    "machine_type": "a2-ultragpu-2g",
                    "guest_accelerator": [{"type": "nvidia-a100-80gb", "count": 2}],
                    "reservation_affinity": {
                        "consume_reservation_type": "SPECIFIC_RESERVATION",
                        "values": ["acme-a100-reservation"],
                    },
                },
            },
        )


@pytest.fixture(scope="module")
def azure_synth(synthesized):
    return _synth(synthesized.clusters["azure-eastus"])


class TestAzure:
    def test_gpu_pool(self, azure_synth):
        synth = azure_synth
        assert _has(
            synth,
            "azurerm_kubernetes_cluster_node_pool",
            {
                "vm_size": "Standard_NC24ads_A100_v4",
                "gpu_driver": "Install",  # the driver only: the add-ons stack installs the device plugin
                "auto_scaling_enabled": True,
                "min_count": 0,
                "max_count": 4,
                "node_taints": ["nvidia.com/gpu=present:NoSchedule"],
                "node_labels": {"gpufleet.io/gpu": "A100-80GB", "gpufleet.io/gpu-count": "1"},
                "zones": ["1", "2"],
                "host_encryption_enabled": True,
            },
        )

    def test_api_endpoint_restricted(self, azure_synth):
        synth = azure_synth
        (cluster,) = _resources(synth, "azurerm_kubernetes_cluster")
        ranges = cluster["api_server_access_profile"]["authorized_ip_ranges"]
        assert ranges[:2] == ["203.0.113.0/24", "10.0.0.0/8"]
        # ...and the NAT gateway's IP: nodes reach the public API server through it.
        assert len(ranges) == 3 and ranges[2].startswith("${azurerm_public_ip.") and ranges[2].endswith("}/32")
        assert cluster["local_account_disabled"] is True

    def test_managed_identity_scoped_to_the_subnet(self, azure_synth):
        synth = azure_synth
        grants = _resources(synth, "azurerm_role_assignment")
        (grant,) = [g for g in grants if g["role_definition_name"] == "Network Contributor"]
        assert "azurerm_subnet" in grant["scope"]
        (cluster,) = _resources(synth, "azurerm_kubernetes_cluster")
        assert cluster["identity"]["type"] == "UserAssigned"

    def test_capacity_reservation(self, synthesized):
        synth = _synth(synthesized.clusters["azure-westeurope"])
        (pool,) = [p for p in _resources(synth, "azurerm_kubernetes_cluster_node_pool") if p["name"] != "apps"]
        assert pool["capacity_reservation_group_id"].endswith("/capacityReservationGroups/acme-a100")
        (role,) = _resources(synth, "azurerm_role_definition")
        assert (
            "Microsoft.Compute/capacityReservationGroups/deploy/action" in role["permissions"][0]["actions"]
        )

    def test_spot(self, variant):
        synth = _synth(variant.clusters["azure-westus3"])
        assert _has(
            synth,
            "azurerm_kubernetes_cluster_node_pool",
            {
                "vm_size": "Standard_ND96isr_H100_v5",
                "priority": "Spot",
                "eviction_policy": "Delete",
                "spot_max_price": -1,
                "min_count": 0,
                "gpu_driver": "Install",
            },
        )


def test_the_testing_api_can_fail(aws_synth):
    """Guards the assertions above: a property the stack does not have must not match."""
    assert not _has(aws_synth, "aws_eks_node_group", {"instance_types": ["p4d.24xlarge"]})
    assert not _has(aws_synth, "aws_eks_node_group", {"scaling_config": {"min_size": 1, "max_size": 2}})


class TestProps:
    """The shared interface refuses what no cloud should get (no cdktn needed)."""

    def test_open_api_refused(self, example_fleet):
        import dataclasses

        from gpufleet.modules.cluster import props_for_region

        props = props_for_region(example_fleet, example_fleet.regions[0])
        with pytest.raises(ValueError, match="open the Kubernetes API"):
            dataclasses.replace(props, api_allowed_cidrs=("0.0.0.0/0",))
        with pytest.raises(ValueError, match="at least one GPU pool"):
            dataclasses.replace(props, gpu_pools=())

    def test_names_fit_the_clouds_limits(self):
        from gpufleet.modules.azure_cluster import aks_pool_name
        from gpufleet.modules.cluster import short_name

        long = "a-very-long-fleet-name-for-testing-limits-gcp-europe-west4"
        assert len(short_name(long, 40)) == 40 and short_name(long, 40) != short_name(long + "x", 40)
        assert aks_pool_name("gpu-h100-80gb") == "gpuh10080gb"
        assert aks_pool_name("1-abc") == "p1abc"

    def test_one_aws_zone_is_a_clean_error(self, example_fleet_path, tmp_path):
        from gpufleet.cli.app import app
        from typer.testing import CliRunner

        text = example_fleet_path.read_text().replace(
            "zones: [us-east-1a, us-east-1b, us-east-1c]", "zones: [us-east-1a]"
        )
        fleet = tmp_path / "one-zone.yaml"
        fleet.write_text(text)
        result = CliRunner().invoke(app, ["synth", str(fleet), "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert "at least two zones" in result.output
