"""Issue 12, AKS and GKE cluster stacks: what a real apply needs beyond what synthesizes.

AKS: an untainted `apps` pool for the router and the add-ons, the router's port open on the node
subnet's NSG, data-plane admin roles for the deployer and the fleet's admins (Azure RBAC on, local
accounts off), the NAT IP in the API's authorized ranges, Spot pools with the label and taint AKS
puts on them, and the driver-only `gpu_driver`. GKE: a key ring whose name survives destroy + apply,
and the cluster's version on the REGULAR channel.

Only the cluster stacks are built (add_provider + build_cluster), one synth per stack.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import yaml

pytestmark = pytest.mark.slow

ADMIN = "0F8FAD5B-D9CB-469F-A165-70867728950E"  # upper case on purpose: Azure reports object ids in lower case
SPOT_REGION = {
    "cloud": "azure",
    "region": "westus3",
    "zones": ["1", "2"],
    "gpu": "H100-80GB",
    "nodes": {"min": 0, "max": 2},
    "capacity": {"tier": "spot"},
}


@pytest.fixture(scope="module")
def fleet_doc(example_fleet_path) -> dict:
    doc = copy.deepcopy(yaml.safe_load(example_fleet_path.read_text()))
    doc["regions"] = [r for r in doc["regions"] if r["cloud"] in ("azure", "gcp")] + [SPOT_REGION]
    doc["settings"]["access"] = {"azure_admin_principal_ids": [ADMIN]}
    doc["settings"]["dns"] = {"zone": "example.com", "record": "llm.example.com"}
    return doc


@pytest.fixture(scope="module")
def fleet(fleet_doc):
    from gpufleet.stacks.spec import Fleet

    return Fleet.model_validate(fleet_doc)


def _props(fleet, key: str):
    from gpufleet.modules.cluster import props_for_region

    props = props_for_region(fleet, fleet.region(key))
    return dataclasses.replace(props, project="p") if props.cloud == "gcp" else props


def _build(app, name: str, props):
    from cdktn import TerraformStack
    from gpufleet.modules.cluster import add_provider, build_cluster

    stack = TerraformStack(app, name)
    add_provider(stack, props)
    cluster = build_cluster(stack, "cluster", props)
    return stack, cluster


@pytest.fixture(scope="module")
def synths(fleet) -> dict[str, dict]:
    """region key -> the synthesized cluster stack (one Testing app, one synth per stack)."""
    from cdktn import Testing

    app = Testing.app()
    out = {}
    for key in ("azure-eastus", "azure-westus3", "gcp-us-central1"):
        stack, _ = _build(app, f"{key}-cluster", _props(fleet, key))
        out[key] = json.loads(Testing.synth(stack))
    return out


def _res(doc: dict, rtype: str) -> dict[str, dict]:
    return doc.get("resource", {}).get(rtype, {})


def _one(doc: dict, rtype: str) -> tuple[str, dict]:
    (item,) = _res(doc, rtype).items()
    return item


def _ref(rtype: str, name: str, attr: str) -> str:
    return f"${{{rtype}.{name}.{attr}}}"


def _pools(doc: dict) -> dict[str, dict]:
    return {p["name"]: p for p in _res(doc, "azurerm_kubernetes_cluster_node_pool").values()}


@pytest.fixture(scope="module")
def aks(synths) -> dict:
    return synths["azure-eastus"]


class TestAks:
    def test_fleet_resolves_the_inputs(self, fleet):
        props = _props(fleet, "azure-eastus")
        assert props.router_port == 443  # settings.dns is set: public HTTPS
        assert props.admin_principals == (ADMIN,)
        assert re.fullmatch(r"1\.\d{2}", props.kubernetes_version)

    def test_apps_pool_is_untainted_and_like_the_system_pool(self, aks):
        _, cluster = _one(aks, "azurerm_kubernetes_cluster")
        system = cluster["default_node_pool"]
        assert system["only_critical_addons_enabled"] is True  # CriticalAddonsOnly stays on system
        apps = _pools(aks)["apps"]
        assert apps["mode"] == "User"
        assert apps["vm_size"] == "Standard_D4ds_v5"
        assert "node_taints" not in apps
        assert apps["node_labels"] == {"gpufleet.io/pool": "apps"}
        assert (apps["auto_scaling_enabled"], apps["min_count"], apps["max_count"]) == (True, 2, 4)
        assert "gpu_driver" not in apps
        for attr in ("vnet_subnet_id", "zones", "host_encryption_enabled", "max_pods"):
            assert apps[attr] == system[attr], attr
        assert apps["lifecycle"]["ignore_changes"] == ["node_count"]  # the autoscaler owns the count
        cluster_name, _ = _one(aks, "azurerm_kubernetes_cluster")
        assert apps["kubernetes_cluster_id"] == _ref("azurerm_kubernetes_cluster", cluster_name, "id")

    def test_gpu_pools_are_tainted(self, aks):
        for name, pool in _pools(aks).items():
            if name != "apps":
                assert "nvidia.com/gpu=present:NoSchedule" in pool["node_taints"], name

    def test_nsg_lets_the_internet_reach_the_router(self, aks):
        nsg_name, _ = _one(aks, "azurerm_network_security_group")
        _, assoc = _one(aks, "azurerm_subnet_network_security_group_association")
        assert assoc["network_security_group_id"] == _ref("azurerm_network_security_group", nsg_name, "id")
        _, rule = _one(aks, "azurerm_network_security_rule")
        assert rule["network_security_group_name"] == _ref("azurerm_network_security_group", nsg_name, "name")
        assert {k: rule[k] for k in ("direction", "access", "protocol", "source_address_prefix")} == {
            "direction": "Inbound",
            "access": "Allow",
            "protocol": "Tcp",
            "source_address_prefix": "Internet",
        }
        assert rule["destination_port_range"] == "443"
        assert rule["destination_address_prefix"] == "*"  # the load balancer's frontend IP (floating IP)
        assert 100 <= rule["priority"] <= 4096

    def test_deployer_and_admins_are_cluster_admins(self, aks):
        cluster_name, _ = _one(aks, "azurerm_kubernetes_cluster")
        (config_name,) = aks["data"]["azurerm_client_config"]
        object_id = _ref("data.azurerm_client_config", config_name, "object_id")
        grants = [
            g
            for g in _res(aks, "azurerm_role_assignment").values()
            if g.get("role_definition_name") == "Azure Kubernetes Service RBAC Cluster Admin"
        ]
        assert all(g["scope"] == _ref("azurerm_kubernetes_cluster", cluster_name, "id") for g in grants)
        by_principal = {g["principal_id"]: g for g in grants}
        assert set(by_principal) == {object_id, ADMIN.lower()}
        assert "count" not in by_principal[object_id]
        # No second, identical assignment when the admin is the deployer (Azure: RoleAssignmentExists).
        count = by_principal[ADMIN.lower()]["count"]
        assert "data.azurerm_client_config." in count and ADMIN.lower() in count and "? 0 : 1" in count

    def test_subnet_grant_is_unchanged(self, aks):
        (grant,) = [
            g
            for g in _res(aks, "azurerm_role_assignment").values()
            if g.get("role_definition_name") == "Network Contributor"
        ]
        assert "azurerm_subnet." in grant["scope"]

    def test_nat_ip_is_an_authorized_api_range(self, aks, fleet):
        ip_name, ip = _one(aks, "azurerm_public_ip")
        assert (ip["allocation_method"], ip["sku"]) == ("Static", "Standard")
        _, nat_assoc = _one(aks, "azurerm_nat_gateway_public_ip_association")
        assert nat_assoc["public_ip_address_id"] == _ref("azurerm_public_ip", ip_name, "id")
        _, cluster = _one(aks, "azurerm_kubernetes_cluster")
        assert cluster["network_profile"]["outbound_type"] == "userAssignedNATGateway"
        ranges = cluster["api_server_access_profile"]["authorized_ip_ranges"]
        assert ranges == [*fleet.settings.api_allowed_cidrs, _ref("azurerm_public_ip", ip_name, "ip_address") + "/32"]
        assert not any(r.endswith("/0") for r in ranges)

    def test_gpu_pool_installs_the_driver_only(self, aks):
        pool = _pools(aks)["gpua10080gb"]
        assert pool["gpu_driver"] == "Install"  # the add-ons stack installs the NVIDIA device plugin
        assert "priority" not in pool
        assert "kubernetes.azure.com/scalesetpriority" not in pool["node_labels"]
        assert pool["node_taints"] == ["nvidia.com/gpu=present:NoSchedule"]

    def test_cluster_version_is_the_fleets(self, aks, fleet):
        _, cluster = _one(aks, "azurerm_kubernetes_cluster")
        assert cluster["kubernetes_version"] == fleet.kubernetes_version
        assert cluster["local_account_disabled"] is True
        assert cluster["azure_active_directory_role_based_access_control"]["azure_rbac_enabled"] is True

    def test_module_docstring_does_not_promise_the_device_plugin(self):
        from gpufleet.modules import azure_cluster

        text = " ".join(azure_cluster.__doc__.split())
        assert "installs the NVIDIA driver and the device plugin" not in text
        assert "does not run the NVIDIA device plugin" in text


class TestAksSpot:
    def test_spot_pool_carries_the_label_and_taint_aks_sets(self, synths):
        doc = synths["azure-westus3"]
        pool = _pools(doc)["gpuh10080gb"]
        assert (pool["priority"], pool["eviction_policy"], pool["spot_max_price"]) == ("Spot", "Delete", -1)
        assert pool["node_labels"]["kubernetes.azure.com/scalesetpriority"] == "spot"
        assert pool["node_labels"]["gpufleet.io/capacity-tier"] == "spot"
        assert sorted(pool["node_taints"]) == [
            "kubernetes.azure.com/scalesetpriority=spot:NoSchedule",
            "nvidia.com/gpu=present:NoSchedule",
        ]
        assert pool["gpu_driver"] == "Install"
        # The apps pool is regular priority: the router must not be evicted with the GPUs.
        assert "priority" not in _pools(doc)["apps"]


def test_no_internet_rule_behind_an_internal_load_balancer(fleet):
    """Without settings.dns the router listens on port 80 of an INTERNAL load balancer, which the
    NSG's default AllowVnetInBound rule admits: nothing is opened to the Internet tag."""
    from cdktn import Testing
    from cdktn_provider_azurerm.network_security_rule import NetworkSecurityRule

    props = dataclasses.replace(_props(fleet, "azure-eastus"), router_port=80)
    stack, _ = _build(Testing.app(), "internal", props)
    assert not [c for c in stack.node.find_all() if isinstance(c, NetworkSecurityRule)]


@pytest.fixture(scope="module")
def gke(synths) -> dict:
    return synths["gcp-us-central1"]


class TestGke:
    def test_key_ring_name_has_a_random_suffix(self, gke):
        assert len(gke["provider"]["random"]) == 1
        suffix_name, suffix = _one(gke, "random_id")
        assert suffix["byte_length"] >= 4
        assert set(suffix["keepers"]) == {"project", "location"}
        ring_name, ring = _one(gke, "google_kms_key_ring")
        assert ring["name"].endswith("-gke-" + _ref("random_id", suffix_name, "hex"))
        _, key = _one(gke, "google_kms_crypto_key")
        assert key["key_ring"] == _ref("google_kms_key_ring", ring_name, "id")  # the key follows the ring
        _, cluster = _one(gke, "google_container_cluster")
        assert "google_kms_crypto_key." in cluster["database_encryption"]["key_name"]

    def test_random_provider_is_added_once_per_stack(self, fleet):
        from cdktn import TerraformStack, Testing
        from cdktn_provider_random.provider import RandomProvider
        from gpufleet.modules.gcp_cluster import add_provider

        stack = TerraformStack(Testing.app(), "shared")
        RandomProvider(stack, "random")  # another construct of the stack got there first
        add_provider(stack, _props(fleet, "gcp-us-central1"))
        assert len([c for c in stack.node.find_all() if isinstance(c, RandomProvider)]) == 1

    def test_version_on_the_regular_channel(self, gke, fleet):
        _, cluster = _one(gke, "google_container_cluster")
        assert cluster["release_channel"] == {"channel": "REGULAR"}
        assert cluster["min_master_version"] == fleet.kubernetes_version  # "1.X": newest patch of the minor
        for pool in _res(gke, "google_container_node_pool").values():
            assert "version" not in pool  # node pools follow the channel
            assert pool["management"]["auto_upgrade"] is True  # required on a release channel

    def test_gpu_pool_driver_and_autoscaling(self, gke):
        (pool,) = [p for p in _res(gke, "google_container_node_pool").values() if p["name"] != "system"]
        (acc,) = pool["node_config"]["guest_accelerator"]
        assert acc["gpu_driver_installation_config"] == {"gpu_driver_version": "LATEST"}
        assert pool["autoscaling"] == {"total_min_node_count": 0, "total_max_node_count": 4, "location_policy": "ANY"}
        assert pool["initial_node_count"] == 0
