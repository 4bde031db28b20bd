"""The GCP GPU cluster: VPC-native network with Cloud NAT, a private regional GKE cluster, a system
node pool and GPU node pools that scale to zero.

Choices, and why:
- GPUs: `guest_accelerator` with `gpu_driver_installation_config.gpu_driver_version = "LATEST"`, so
  GKE installs the NVIDIA driver; GKE runs the NVIDIA device plugin itself on GPU nodes.
- The API endpoint is public but only reachable from `master_authorized_networks_config` (the fleet's
  api_allowed_cidrs); nodes have private IPs only and reach the internet through Cloud NAT.
- Secrets in etcd are encrypted with a customer-managed KMS key (application-layer secrets
  encryption); the GKE service agent is the only identity allowed to use it. Key rings cannot be
  deleted, so the ring's name carries a `random_id` suffix: a destroy followed by an apply makes a new
  ring instead of failing with 409 on the old name.
- Nodes run as a dedicated service account with `roles/container.defaultNodeServiceAccount` (Google's
  minimal role for nodes: logs, metrics, metadata) and read-only Artifact Registry, not as the
  project's default compute account (Editor).
- The project comes in as props (the stack passes a Terraform variable), so one fleet file serves
  any project.
"""

from __future__ import annotations

import re

from cdktn_provider_google import (
    compute_firewall,
    compute_network,
    compute_router,
    compute_router_nat,
    compute_subnetwork,
    container_cluster,
    container_node_pool,
    data_google_project,
    kms_crypto_key,
    kms_crypto_key_iam_member,
    kms_key_ring,
    project_iam_member,
    service_account,
)
from cdktn_provider_google.provider import GoogleProvider
from cdktn_provider_random import id as random_id
from cdktn_provider_random.provider import RandomProvider
from constructs import Construct
from gpufleet.modules.cluster import (
    GPU_TAINT_KEY,
    GPU_TAINT_VALUE,
    ClusterOutputs,
    ClusterProps,
    GpuPoolProps,
    short_name,
)

SYSTEM_MACHINE_TYPE = "e2-standard-4"
NODE_ROLES = ("roles/container.defaultNodeServiceAccount", "roles/artifactregistry.reader")
SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]  # access is limited by IAM roles, not scopes
MASTER_CIDR = "172.16.0.0/28"
PODS_CIDR = "10.64.0.0/14"
SERVICES_CIDR = "10.68.0.0/20"


def gcp_labels(tags: dict[str, str]) -> dict[str, str]:
    """GCP label keys and values: lower case letters, digits, '-' and '_', at most 63 characters."""

    def clean(text: str) -> str:
        return re.sub(r"[^a-z0-9_-]", "_", text.lower())[:63]

    return {clean(k): clean(v) for k, v in tags.items()}


def add_provider(scope: Construct, props: ClusterProps) -> GoogleProvider:
    provider = GoogleProvider(scope, "google", project=props.project, region=props.region)
    # Set through an override: cdktn snake-cases the keys of map arguments of provider blocks
    # ("cost-center" became "cost_center"), which would rename the fleet's labels.
    provider.add_override("default_labels", gcp_labels(dict(props.tags)))
    # The key ring's name suffix comes from random_id; one random provider per stack.
    if scope.node.try_find_child("random") is None:
        RandomProvider(scope, "random")
    return provider


class GcpGpuCluster(Construct):
    """GKE with a system pool and GPU pools; `outputs` says how to reach it."""

    def __init__(self, scope: Construct, construct_id: str, *, props: ClusterProps) -> None:
        super().__init__(scope, construct_id)
        if not props.project:
            raise ValueError(f"cluster {props.name}: a GCP cluster needs a project")
        self.props = props
        self.project: str = props.project
        self.labels = gcp_labels(dict(props.tags))
        self._network()
        self._node_account()
        self.cluster = self._cluster()
        system = self._system_pool()
        gpu_names = [self._gpu_pool(p) for p in props.gpu_pools]
        self.outputs = ClusterOutputs(
            cloud="gcp",
            cluster_name=self.cluster.name,
            endpoint=self.cluster.endpoint,
            cluster_ca_certificate=self.cluster.master_auth.cluster_ca_certificate,
            system_pool_name=system,
            gpu_pool_names=tuple(gpu_names),
            project=props.project,
            location=props.region,
        )

    def _network(self) -> None:
        p = self.props
        self.network = compute_network.ComputeNetwork(
            self,
            "network",
            name=p.name,
            project=self.project,
            auto_create_subnetworks=False,
            routing_mode="REGIONAL",
        )
        self.subnet = compute_subnetwork.ComputeSubnetwork(
            self,
            "nodes",
            name=f"{p.name}-nodes",
            project=self.project,
            region=p.region,
            network=self.network.id,
            ip_cidr_range=p.network_cidr,
            private_ip_google_access=True,
            secondary_ip_range=[
                compute_subnetwork.ComputeSubnetworkSecondaryIpRange(
                    range_name="pods", ip_cidr_range=PODS_CIDR
                ),
                compute_subnetwork.ComputeSubnetworkSecondaryIpRange(
                    range_name="services", ip_cidr_range=SERVICES_CIDR
                ),
            ],
            log_config=compute_subnetwork.ComputeSubnetworkLogConfig(
                aggregation_interval="INTERVAL_5_MIN", flow_sampling=0.5, metadata="INCLUDE_ALL_METADATA"
            ),
        )
        # Make the VPC's implied deny-ingress explicit and logged; GKE adds its own allow rules above it.
        compute_firewall.ComputeFirewall(
            self,
            "deny-ingress",
            name=f"{p.name}-deny-ingress",
            project=self.project,
            network=self.network.id,
            direction="INGRESS",
            priority=65534,
            source_ranges=["0.0.0.0/0"],
            deny=[compute_firewall.ComputeFirewallDeny(protocol="all")],
            log_config=compute_firewall.ComputeFirewallLogConfig(metadata="INCLUDE_ALL_METADATA"),
        )
        router = compute_router.ComputeRouter(
            self, "router", name=p.name, project=self.project, region=p.region, network=self.network.id
        )
        compute_router_nat.ComputeRouterNat(
            self,
            "nat",
            name=p.name,
            project=self.project,
            region=p.region,
            router=router.name,
            nat_ip_allocate_option="AUTO_ONLY",
            source_subnetwork_ip_ranges_to_nat="ALL_SUBNETWORKS_ALL_IP_RANGES",
            log_config=compute_router_nat.ComputeRouterNatLogConfig(enable=True, filter="ERRORS_ONLY"),
        )

    def _node_account(self) -> None:
        p = self.props
        self.node_sa = service_account.ServiceAccount(
            self,
            "node-sa",
            project=self.project,
            account_id=short_name(f"{p.name}-nodes", 30),
            display_name=f"GKE nodes of {p.name}",
        )
        for i, role in enumerate(NODE_ROLES):
            project_iam_member.ProjectIamMember(
                self,
                f"node-sa-role-{i}",
                project=self.project,
                role=role,
                member=f"serviceAccount:{self.node_sa.email}",
            )

    def _secrets_key(self) -> kms_crypto_key.KmsCryptoKey:
        p = self.props
        project = data_google_project.DataGoogleProject(self, "project", project_id=self.project)
        # google provider, kms_key_ring: "KeyRings cannot be deleted from Google Cloud Platform.
        # Destroying a Terraform-managed KeyRing will remove it from state but will not delete the
        # resource from the project." A fixed name would collide (409) on the next apply, so the name
        # takes a random suffix, kept in state; a new project or region draws a new one.
        suffix = random_id.Id(
            self, "keyring-suffix", byte_length=4, keepers={"project": self.project, "location": p.region}
        )
        ring = kms_key_ring.KmsKeyRing(
            self, "keyring", name=f"{p.name}-gke-{suffix.hex}", location=p.region, project=self.project
        )
        key = kms_crypto_key.KmsCryptoKey(
            self,
            "secrets-key",
            name="gke-secrets",
            key_ring=ring.id,
            rotation_period="7776000s",
            destroy_scheduled_duration="2592000s",  # 30 days to undo a destroy before the key is gone
            labels=self.labels,
        )
        # Only GKE's service agent may use the key (Google: "Encrypt secrets at the application layer").
        self._key_grant = kms_crypto_key_iam_member.KmsCryptoKeyIamMember(
            self,
            "secrets-key-gke",
            crypto_key_id=key.id,
            role="roles/cloudkms.cryptoKeyEncrypterDecrypter",
            member=f"serviceAccount:service-{project.number}@container-engine-robot.iam.gserviceaccount.com",
        )
        return key

    def _cluster(self) -> container_cluster.ContainerCluster:
        p = self.props
        key = self._secrets_key()
        cc = container_cluster
        return cc.ContainerCluster(
            self,
            "cluster",
            name=p.name,
            project=self.project,
            location=p.region,
            node_locations=list(p.zones) or None,
            # A minor ("1.35") is a valid version: GKE resolves it to a patch of that minor on the cluster's
            # channel (GKE "versioning-and-upgrades", Specifying cluster version); the REGULAR channel
            # must offer the minor, which catalog/kubernetes.yaml checks. Node pools set no version and
            # auto-upgrade (required on a release channel), so they follow the control plane.
            min_master_version=p.kubernetes_version,
            release_channel=cc.ContainerClusterReleaseChannel(channel="REGULAR"),
            network=self.network.id,
            subnetwork=self.subnet.id,
            networking_mode="VPC_NATIVE",
            ip_allocation_policy=cc.ContainerClusterIpAllocationPolicy(
                cluster_secondary_range_name="pods", services_secondary_range_name="services"
            ),
            # The default pool cannot be configured well; it is removed once the cluster exists.
            remove_default_node_pool=True,
            initial_node_count=1,
            node_config=cc.ContainerClusterNodeConfig(
                service_account=self.node_sa.email,
                oauth_scopes=SCOPES,
                workload_metadata_config=cc.ContainerClusterNodeConfigWorkloadMetadataConfig(
                    mode="GKE_METADATA"
                ),
                shielded_instance_config=cc.ContainerClusterNodeConfigShieldedInstanceConfig(
                    enable_secure_boot=True, enable_integrity_monitoring=True
                ),
            ),
            private_cluster_config=cc.ContainerClusterPrivateClusterConfig(
                enable_private_nodes=True, enable_private_endpoint=False, master_ipv4_cidr_block=MASTER_CIDR
            ),
            master_authorized_networks_config=cc.ContainerClusterMasterAuthorizedNetworksConfig(
                cidr_blocks=[
                    cc.ContainerClusterMasterAuthorizedNetworksConfigCidrBlocks(
                        cidr_block=c, display_name=f"allowed-{i}"
                    )
                    for i, c in enumerate(p.api_allowed_cidrs)
                ],
                gcp_public_cidrs_access_enabled=False,
            ),
            master_auth=cc.ContainerClusterMasterAuth(
                client_certificate_config=cc.ContainerClusterMasterAuthClientCertificateConfig(
                    issue_client_certificate=False
                )
            ),
            database_encryption=cc.ContainerClusterDatabaseEncryption(state="ENCRYPTED", key_name=key.id),
            workload_identity_config=cc.ContainerClusterWorkloadIdentityConfig(
                workload_pool=f"{self.project}.svc.id.goog"
            ),
            enable_shielded_nodes=True,
            enable_intranode_visibility=True,
            enable_legacy_abac=False,
            datapath_provider="ADVANCED_DATAPATH",  # Dataplane V2: network policy enforced
            binary_authorization=cc.ContainerClusterBinaryAuthorization(
                evaluation_mode="PROJECT_SINGLETON_POLICY_ENFORCE"
            ),
            resource_labels=self.labels,
            depends_on=[self._key_grant],
        )

    def _node_config_common(self) -> dict:
        np = container_node_pool
        return {
            "service_account": self.node_sa.email,
            "oauth_scopes": SCOPES,
            "image_type": "COS_CONTAINERD",
            "workload_metadata_config": np.ContainerNodePoolNodeConfigWorkloadMetadataConfig(
                mode="GKE_METADATA"
            ),
            "shielded_instance_config": np.ContainerNodePoolNodeConfigShieldedInstanceConfig(
                enable_secure_boot=True, enable_integrity_monitoring=True
            ),
            "resource_labels": self.labels,
            "metadata": {"disable-legacy-endpoints": "true"},
        }

    def _system_pool(self) -> str:
        p = self.props
        name = "system"
        np = container_node_pool
        np.ContainerNodePool(
            self,
            "system-pool",
            name=name,
            project=self.project,
            location=p.region,
            cluster=self.cluster.name,
            node_locations=list(p.zones) or None,
            node_count=1,  # per zone
            management=np.ContainerNodePoolManagement(auto_repair=True, auto_upgrade=True),
            node_config=np.ContainerNodePoolNodeConfig(
                machine_type=p.system_instance_type or SYSTEM_MACHINE_TYPE,
                disk_size_gb=50,
                disk_type="pd-balanced",
                labels={"gpufleet.io/pool": name},
                **self._node_config_common(),
            ),
        )
        return name

    def _gpu_pool(self, pool: GpuPoolProps) -> str:
        p = self.props
        np = container_node_pool
        if not pool.accelerator:
            raise ValueError(
                f"cluster {p.name}: GCP machine type {pool.instance_type} has no accelerator type"
            )
        reservation = None
        if pool.tier == "reserved":
            reservation = np.ContainerNodePoolNodeConfigReservationAffinity(
                consume_reservation_type="SPECIFIC_RESERVATION",
                key="compute.googleapis.com/reservation-name",
                values=[pool.reservation],
            )
        np.ContainerNodePool(
            self,
            f"{pool.name}-pool",
            name=pool.name,
            project=self.project,
            location=p.region,
            cluster=self.cluster.name,
            node_locations=list(p.zones) or None,
            initial_node_count=0,
            autoscaling=np.ContainerNodePoolAutoscaling(
                total_min_node_count=pool.min_nodes,
                total_max_node_count=pool.max_nodes,
                # ANY: take GPUs in whichever zone has them, rather than balancing zones.
                location_policy="ANY",
            ),
            management=np.ContainerNodePoolManagement(auto_repair=True, auto_upgrade=True),
            node_config=np.ContainerNodePoolNodeConfig(
                machine_type=pool.instance_type,
                guest_accelerator=[
                    np.ContainerNodePoolNodeConfigGuestAccelerator(
                        type=pool.accelerator,
                        count=pool.gpus_per_node,
                        # GKE installs the newest driver for the node's version and runs the device
                        # plugin itself (GKE "gpus", Install NVIDIA GPU device drivers).
                        gpu_driver_installation_config=np.ContainerNodePoolNodeConfigGuestAcceleratorGpuDriverInstallationConfig(
                            gpu_driver_version="LATEST"
                        ),
                    )
                ],
                taint=[
                    np.ContainerNodePoolNodeConfigTaint(
                        key=GPU_TAINT_KEY, value=GPU_TAINT_VALUE, effect="NO_SCHEDULE"
                    )
                ],
                labels=pool.labels,
                disk_size_gb=pool.disk_gib,
                disk_type="pd-balanced",
                spot=pool.tier == "spot",
                reservation_affinity=reservation,
                **self._node_config_common(),
            ),
        )
        return pool.name
