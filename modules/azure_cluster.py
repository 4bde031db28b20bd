"""The Azure GPU cluster: a resource group, a VNet with a NAT gateway, AKS with a system pool and GPU
user pools that scale to zero.

Choices, and why:
- GPUs: `gpu_driver = "Install"` on the GPU pool (azurerm 5.x) installs the NVIDIA driver only. AKS
  does not run the NVIDIA device plugin, so nodes advertise no `nvidia.com/gpu` until the add-ons stack
  installs it (Helm chart `nvidia-device-plugin`; AKS docs "use-nvidia-gpu").
- Pools: `system` keeps `only_critical_addons_enabled` (the CriticalAddonsOnly taint) and the GPU
  pools are tainted, so an untainted user pool `apps` (2 to 4 small nodes) runs the router, KEDA and
  cert-manager.
- The API server is reachable only from `api_allowed_cidrs` and the NAT gateway's IP (authorized IP
  ranges; the nodes reach the public API server through that IP).
- Identity: a user-assigned managed identity for the control plane, with Network Contributor on the
  node subnet only; for a capacity reservation, a custom role with just the read and deploy actions
  on that reservation group. Kubernetes RBAC goes through Entra ID (local accounts off): the identity
  running Terraform and `admin_principals` get "Azure Kubernetes Service RBAC Cluster Admin" on the
  cluster, so the add-ons and serving stacks can be applied at all.
- Ingress: the node subnet's NSG allows the router's public port from the Internet service tag; AKS
  opens Service ports only on its own NSG, and a subnet NSG with the default rules drops them.
- Encryption: host encryption on every pool (temp disks and caches encrypted at the VM host; managed
  disks are encrypted at rest by the platform). A customer-managed key (disk encryption set, KMS
  etcd encryption) needs a Key Vault, which is left to the operator (docs/stacks.md).
- Egress through a NAT gateway (outbound type userAssignedNATGateway), nodes have no public IPs.
"""

from __future__ import annotations

import re

from cdktn import Fn, Op, TerraformResourceLifecycle, Token
from cdktn_provider_azurerm import (
    data_azurerm_client_config,
    kubernetes_cluster,
    kubernetes_cluster_node_pool,
    log_analytics_workspace,
    nat_gateway,
    nat_gateway_public_ip_association,
    network_security_group,
    network_security_rule,
    public_ip,
    resource_group,
    role_assignment,
    role_definition,
    subnet,
    subnet_nat_gateway_association,
    subnet_network_security_group_association,
    user_assigned_identity,
    virtual_network,
)
from cdktn_provider_azurerm.provider import AzurermProvider, AzurermProviderFeatures
from constructs import Construct
from gpufleet.modules.cluster import GPU_TAINT_EFFECT, ClusterOutputs, ClusterProps, GpuPoolProps, short_name

SYSTEM_VM_SIZE = "Standard_D4ds_v5"
APPS_VM_SIZE = "Standard_D4ds_v5"  # router, KEDA, cert-manager: small, general purpose
APPS_POOL = "apps"
APPS_MIN_NODES, APPS_MAX_NODES = 2, 4
MAX_PODS = 50
# AKS puts this label and taint on every Spot node itself. azurerm's kubernetes_cluster_node_pool docs
# ("When setting `priority` to Spot - you must configure an `eviction_policy`, `spot_max_price` and
# add the applicable `node_labels` and `node_taints`", citing AKS "spot-node-pool") ask for both in
# the config, else every plan shows a diff (and a change forces a new pool).
SPOT_LABEL_KEY = "kubernetes.azure.com/scalesetpriority"
SPOT_LABEL_VALUE = "spot"
SPOT_TAINT = f"{SPOT_LABEL_KEY}={SPOT_LABEL_VALUE}:NoSchedule"
# Built-in role for the Kubernetes data plane with Azure RBAC (AKS docs "manage-azure-rbac").
CLUSTER_ADMIN_ROLE = "Azure Kubernetes Service RBAC Cluster Admin"
# router_public_port(): 80 means the router sits behind an INTERNAL load balancer, which the NSG's
# default AllowVnetInBound rule already admits; only a public port is opened to the Internet tag.
INTERNAL_ROUTER_PORT = 80
ROUTER_NSG_PRIORITY = 200
CAPACITY_RESERVATION_ACTIONS = [
    "Microsoft.Compute/capacityReservationGroups/read",
    "Microsoft.Compute/capacityReservationGroups/deploy/action",
    "Microsoft.Compute/capacityReservationGroups/capacityReservations/read",
]


def add_provider(scope: Construct, props: ClusterProps) -> AzurermProvider:
    # The subscription comes from ARM_SUBSCRIPTION_ID (or the Azure CLI login), not the fleet file.
    return AzurermProvider(scope, "azurerm", features=[AzurermProviderFeatures()])


def aks_pool_name(name: str) -> str:
    """AKS Linux pool names: lower-case letters and digits, starting with a letter, at most 12."""
    cleaned = re.sub(r"[^a-z0-9]", "", name.lower())
    return ("p" + cleaned if not cleaned[:1].isalpha() else cleaned)[:12]


class AzureGpuCluster(Construct):
    """AKS with a system pool and GPU pools; `outputs` says how to reach it."""

    def __init__(self, scope: Construct, construct_id: str, *, props: ClusterProps) -> None:
        super().__init__(scope, construct_id)
        self.props = props
        self.tags = dict(props.tags)
        self.rg = resource_group.ResourceGroup(
            self, "rg", name=f"{props.name}-rg", location=props.region, tags=self.tags
        )
        self.identity = user_assigned_identity.UserAssignedIdentity(
            self,
            "identity",
            name=f"{props.name}-control-plane",
            location=props.region,
            resource_group_name=self.rg.name,
            tags=self.tags,
        )
        self._network()
        self.cluster = self._cluster()
        self._admins()
        self.apps_pool = self._apps_pool()
        gpu_names = [self._gpu_pool(p) for p in props.gpu_pools]
        self.outputs = ClusterOutputs(
            cloud="azure",
            cluster_name=self.cluster.name,
            endpoint=f"https://{self.cluster.fqdn}:443",
            cluster_ca_certificate=self.cluster.kube_config.get(0).cluster_ca_certificate,
            system_pool_name="system",
            gpu_pool_names=tuple(gpu_names),
            location=props.region,
            resource_group_name=self.rg.name,
        )

    def _network(self) -> None:
        p = self.props
        vnet = virtual_network.VirtualNetwork(
            self,
            "vnet",
            name=p.name,
            location=p.region,
            resource_group_name=self.rg.name,
            address_space=[p.network_cidr],
            tags=self.tags,
        )
        self.subnet = subnet.Subnet(
            self,
            "nodes",
            name="nodes",
            resource_group_name=self.rg.name,
            virtual_network_name=vnet.name,
            address_prefixes=[p.network_cidr],
            default_outbound_access_enabled=False,  # egress only through the NAT gateway
        )
        # An NSG with only Azure's default rules (VNet and load balancer in, nothing else from the
        # internet); AKS adds its own rules for Services of type LoadBalancer.
        nsg = network_security_group.NetworkSecurityGroup(
            self,
            "nodes-nsg",
            name=f"{p.name}-nodes",
            location=p.region,
            resource_group_name=self.rg.name,
            tags=self.tags,
        )
        self.nsg_assoc = subnet_network_security_group_association.SubnetNetworkSecurityGroupAssociation(
            self, "nodes-nsg-assoc", subnet_id=self.subnet.id, network_security_group_id=nsg.id
        )
        if p.router_port != INTERNAL_ROUTER_PORT:
            # The router's public load balancer: AKS opens the Service's port only on its own NSG (on
            # the node NICs); a subnet NSG with the default rules still drops it (AKS docs
            # "concepts-security", "Network security groups"). The destination is the load balancer's
            # frontend IP (floating IP), unknown here, hence "*"; the subnet has no other public IP.
            network_security_rule.NetworkSecurityRule(
                self,
                "router-ingress",
                name=f"allow-router-{p.router_port}",
                resource_group_name=self.rg.name,
                network_security_group_name=nsg.name,
                priority=ROUTER_NSG_PRIORITY,
                direction="Inbound",
                access="Allow",
                protocol="Tcp",
                source_address_prefix="Internet",
                source_port_range="*",
                destination_address_prefix="*",
                destination_port_range=str(p.router_port),
                description="gpufleet router: HTTPS from clients and peer regions",
            )
        ip = public_ip.PublicIp(
            self,
            "nat-ip",
            name=f"{p.name}-nat",
            location=p.region,
            resource_group_name=self.rg.name,
            allocation_method="Static",
            sku="Standard",
            tags=self.tags,
        )
        nat = nat_gateway.NatGateway(
            self,
            "nat",
            name=p.name,
            location=p.region,
            resource_group_name=self.rg.name,
            sku_name="Standard",
            idle_timeout_in_minutes=10,
            tags=self.tags,
        )
        self.nat_ip = ip
        nat_gateway_public_ip_association.NatGatewayPublicIpAssociation(
            self, "nat-ip-assoc", nat_gateway_id=nat.id, public_ip_address_id=ip.id
        )
        self.nat_assoc = subnet_nat_gateway_association.SubnetNatGatewayAssociation(
            self, "nat-assoc", subnet_id=self.subnet.id, nat_gateway_id=nat.id
        )
        # AKS joins nodes to our subnet: its identity needs Network Contributor there, nowhere else.
        self.subnet_grant = role_assignment.RoleAssignment(
            self,
            "subnet-network-contributor",
            scope=self.subnet.id,
            role_definition_name="Network Contributor",
            principal_id=self.identity.principal_id,
            principal_type="ServicePrincipal",
        )

    def _cluster(self) -> kubernetes_cluster.KubernetesCluster:
        p = self.props
        kc = kubernetes_cluster
        # Container Insights: node and pod logs and metrics, 30 days.
        logs = log_analytics_workspace.LogAnalyticsWorkspace(
            self,
            "logs",
            name=f"{p.name}-logs",
            location=p.region,
            resource_group_name=self.rg.name,
            sku="PerGB2018",
            retention_in_days=30,
            tags=self.tags,
        )
        return kc.KubernetesCluster(
            self,
            "cluster",
            name=p.name,
            location=p.region,
            resource_group_name=self.rg.name,
            dns_prefix=short_name(p.name, 54),
            kubernetes_version=p.kubernetes_version,
            sku_tier="Standard",
            automatic_upgrade_channel="patch",
            node_os_upgrade_channel="NodeImage",
            identity=kc.KubernetesClusterIdentity(type="UserAssigned", identity_ids=[self.identity.id]),
            node_provisioning_profile=kc.KubernetesClusterNodeProvisioningProfile(mode="Manual"),
            default_node_pool=kc.KubernetesClusterDefaultNodePool(
                name="system",
                vm_size=p.system_instance_type or SYSTEM_VM_SIZE,
                node_count=p.system_nodes,
                only_critical_addons_enabled=True,  # keeps workloads off the system pool
                vnet_subnet_id=self.subnet.id,
                zones=list(p.zones) or None,
                host_encryption_enabled=True,
                max_pods=MAX_PODS,
                os_disk_size_gb=64,
                os_disk_type="Ephemeral",  # on the VM's local disk: encrypted at host, nothing to leak
                upgrade_settings=kc.KubernetesClusterDefaultNodePoolUpgradeSettings(max_surge="10%"),
                node_labels={"gpufleet.io/pool": "system"},
                tags=self.tags,
            ),
            api_server_access_profile=kc.KubernetesClusterApiServerAccessProfile(
                # With outbound type userAssignedNATGateway the nodes (kubelet, konnectivity, add-ons)
                # reach the public API server from the NAT IP, which AKS does not add by itself (AKS
                # docs "api-server-authorized-ip-ranges"; it adds only a managed load balancer's IPs).
                authorized_ip_ranges=[*p.api_allowed_cidrs, f"{self.nat_ip.ip_address}/32"]
            ),
            network_profile=kc.KubernetesClusterNetworkProfile(
                network_plugin="azure",
                network_plugin_mode="overlay",
                network_data_plane="cilium",
                network_policy="cilium",
                pod_cidr="10.244.0.0/16",
                service_cidr="10.96.0.0/16",
                dns_service_ip="10.96.0.10",
                outbound_type="userAssignedNATGateway",
                load_balancer_sku="standard",
            ),
            role_based_access_control_enabled=True,
            azure_active_directory_role_based_access_control=kc.KubernetesClusterAzureActiveDirectoryRoleBasedAccessControl(
                azure_rbac_enabled=True
            ),
            local_account_disabled=True,
            oidc_issuer_enabled=True,
            workload_identity_enabled=True,
            azure_policy_enabled=True,
            image_cleaner_enabled=True,
            image_cleaner_interval_hours=48,
            oms_agent=kc.KubernetesClusterOmsAgent(
                log_analytics_workspace_id=logs.id, msi_auth_for_monitoring_enabled=True
            ),
            key_vault_secrets_provider=kc.KubernetesClusterKeyVaultSecretsProvider(
                secret_rotation_enabled=True
            ),
            tags=self.tags,
            depends_on=[self.nat_assoc, self.nsg_assoc, self.subnet_grant],
        )

    def _admins(self) -> None:
        """Data-plane admin for the identity running Terraform and for each of `admin_principals`.

        Azure RBAC is on and local accounts are off: without a role, nobody (the deployer included) can
        reach the Kubernetes API, and the add-ons and serving stacks cannot be applied (AKS docs
        "manage-azure-rbac", "entra-id-authorization").
        """
        me = data_azurerm_client_config.DataAzurermClientConfig(self, "deployer")
        role_assignment.RoleAssignment(
            self,
            "deployer-cluster-admin",
            scope=self.cluster.id,
            role_definition_name=CLUSTER_ADMIN_ROLE,
            principal_id=me.object_id,
        )
        for i, oid in enumerate(dict.fromkeys(o.lower() for o in self.props.admin_principals)):
            # An admin who is also the deployer would get a second, identical assignment, which Azure
            # refuses (RoleAssignmentExists); the data source is read at plan time, so count is known.
            role_assignment.RoleAssignment(
                self,
                f"admin-{i}-cluster-admin",
                scope=self.cluster.id,
                role_definition_name=CLUSTER_ADMIN_ROLE,
                principal_id=oid,
                count=Token.as_number(Fn.conditional(Op.eq(Fn.lower(me.object_id), oid), 0, 1)),
            )

    def _apps_pool(self) -> str:
        """An untainted user pool for the router, KEDA and cert-manager (the system pool only takes
        critical add-ons, the GPU pools are tainted)."""
        p = self.props
        kubernetes_cluster_node_pool.KubernetesClusterNodePool(
            self,
            "apps-pool",
            name=APPS_POOL,
            kubernetes_cluster_id=self.cluster.id,
            mode="User",
            vm_size=APPS_VM_SIZE,
            auto_scaling_enabled=True,
            min_count=APPS_MIN_NODES,
            max_count=APPS_MAX_NODES,
            node_labels={"gpufleet.io/pool": APPS_POOL},
            zones=list(p.zones) or None,
            vnet_subnet_id=self.subnet.id,
            host_encryption_enabled=True,
            max_pods=MAX_PODS,
            os_disk_size_gb=64,
            os_disk_type="Ephemeral",
            upgrade_settings=kubernetes_cluster_node_pool.KubernetesClusterNodePoolUpgradeSettings(max_surge="10%"),
            tags=self.tags,
            lifecycle=TerraformResourceLifecycle(ignore_changes=["node_count"]),
        )
        return APPS_POOL

    def _reservation_grant(self, pool: GpuPoolProps) -> role_assignment.RoleAssignment:
        crg = pool.reservation
        role = role_definition.RoleDefinition(
            self,
            f"{pool.name}-crg-role",
            name=f"{self.props.name}-capacity-reservation-user",
            scope=crg,
            description="Use (read, deploy into) one capacity reservation group",
            permissions=[role_definition.RoleDefinitionPermissions(actions=CAPACITY_RESERVATION_ACTIONS)],
            assignable_scopes=[crg],
        )
        return role_assignment.RoleAssignment(
            self,
            f"{pool.name}-crg-grant",
            scope=crg,
            role_definition_id=role.role_definition_resource_id,
            principal_id=self.identity.principal_id,
            principal_type="ServicePrincipal",
        )

    def _gpu_pool(self, pool: GpuPoolProps) -> str:
        p = self.props
        name = aks_pool_name(pool.name)
        taints = [f"nvidia.com/gpu=present:{GPU_TAINT_EFFECT}"]
        labels = dict(pool.labels)
        extra: dict = {}
        depends: list = []
        zones = list(p.zones)
        if pool.tier == "spot":
            taints.append(SPOT_TAINT)
            labels[SPOT_LABEL_KEY] = SPOT_LABEL_VALUE
            extra = {"priority": "Spot", "eviction_policy": "Delete", "spot_max_price": -1}
        elif pool.tier == "reserved":
            extra = {"capacity_reservation_group_id": pool.reservation_id}
            depends = [self._reservation_grant(pool)]
            # Reserved capacity sits in one zone: a pool spread over others would scale into zones
            # the reservation does not cover (and pay on-demand there). Pin the first listed zone.
            zones = zones[:1]
        kubernetes_cluster_node_pool.KubernetesClusterNodePool(
            self,
            f"{pool.name}-pool",
            name=name,
            kubernetes_cluster_id=self.cluster.id,
            mode="User",
            vm_size=pool.instance_type,
            gpu_driver="Install",  # the driver only; the add-ons stack installs the device plugin
            auto_scaling_enabled=True,
            min_count=pool.min_nodes,
            max_count=pool.max_nodes,
            node_taints=taints,
            node_labels=labels,
            zones=zones or None,
            vnet_subnet_id=self.subnet.id,
            host_encryption_enabled=True,
            max_pods=MAX_PODS,
            os_disk_size_gb=pool.disk_gib,
            tags=self.tags,
            # The autoscaler owns the node count.
            lifecycle=TerraformResourceLifecycle(ignore_changes=["node_count"]),
            depends_on=depends or None,
            **extra,
        )
        return name
