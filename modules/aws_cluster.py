"""The AWS GPU cluster: VPC with private subnets and one NAT per zone, EKS, a system node group and
GPU node groups that scale to zero.

Choices, and why:
- GPU nodes run the Bottlerocket NVIDIA AMI (`BOTTLEROCKET_x86_64_NVIDIA`). It ships the NVIDIA driver
  AND the NVIDIA Kubernetes device plugin, so `nvidia.com/gpu` appears on the node without a
  kubernetes/helm provider in this stack. The AL2023 NVIDIA AMI has the driver only and needs the
  device plugin installed through the cluster's API, i.e. credentials of a cluster that does not
  exist yet at plan time (AWS EKS user guide, "Install Kubernetes device plugin for GPUs").
- The API endpoint: public access only from the public CIDRs of `api_allowed_cidrs` (EKS rejects
  private ranges there); private CIDRs reach the private endpoint through a security group rule.
  With no public CIDR the endpoint is private only. Never 0.0.0.0/0.
- Secrets are envelope-encrypted with a customer-managed KMS key that rotates.
- Node roles get only the three managed policies a node needs (worker, CNI, ECR pull-only).
- Scale from zero: the cluster autoscaler cannot see the labels, taint and GPUs of a node group
  with no nodes, so the group's Auto Scaling group carries `k8s.io/cluster-autoscaler/node-template/*`
  tags (EKS does not copy node group tags to the ASG; aws_autoscaling_group_tag does).
- Capacity blocks (tier reserved): a launch template with market type `capacity-block` and the
  reservation id, node group capacity type `CAPACITY_BLOCK`, ONE subnet (the block's zone: the
  first zone of the region).
- EKS Pod Identity: the `eks-pod-identity-agent` managed add-on, so the add-ons stack can give the
  cluster autoscaler and cert-manager IAM roles through `aws_eks_pod_identity_association`s (no OIDC
  provider needed). The agent uses the node role, whose AmazonEKSWorkerNodePolicy already allows
  `eks-auth:AssumeRoleForPodIdentity` (EKS user guide, "Set up the Amazon EKS Pod Identity Agent").
- Access: authentication mode API; the identity that creates the cluster is its bootstrap admin, and
  each of `admin_principals` (IAM role ARNs) gets a STANDARD access entry with
  AmazonEKSClusterAdminPolicy on the whole cluster. Do not list the role that runs Terraform: it has
  an entry already and EKS answers 409 ResourceInUseException to a second one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re

from cdktn import Fn, TerraformResourceLifecycle
from cdktn_provider_aws import (
    autoscaling_group_tag,
    data_aws_availability_zones,
    data_aws_caller_identity,
    data_aws_partition,
    default_security_group,
    eip,
    eks_access_entry,
    eks_access_policy_association,
    eks_addon,
    eks_cluster,
    eks_node_group,
    iam_role,
    iam_role_policy_attachment,
    internet_gateway,
    kms_alias,
    kms_key,
    launch_template,
    nat_gateway,
    route,
    route_table,
    route_table_association,
    security_group,
    subnet,
    vpc,
    vpc_security_group_egress_rule,
    vpc_security_group_ingress_rule,
)
from cdktn_provider_aws.provider import AwsProvider, AwsProviderDefaultTags
from constructs import Construct
from gpufleet.modules.cluster import (
    GPU_RESOURCE,
    GPU_TAINT_KEY,
    GPU_TAINT_VALUE,
    ClusterOutputs,
    ClusterProps,
    GpuPoolProps,
)

GPU_AMI_TYPE = "BOTTLEROCKET_x86_64_NVIDIA"
SYSTEM_AMI_TYPE = "BOTTLEROCKET_x86_64"
SYSTEM_INSTANCE_TYPE = "m7i.large"
NODE_POLICIES = ("AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryPullOnly")
CAPACITY_TYPE = {"on-demand": "ON_DEMAND", "spot": "SPOT", "reserved": "CAPACITY_BLOCK"}
LOG_TYPES = ["api", "audit", "authenticator", "controllerManager", "scheduler"]
POD_IDENTITY_ADDON = "eks-pod-identity-agent"
ADMIN_ACCESS_POLICY = "AmazonEKSClusterAdminPolicy"
# The label the cluster autoscaler's AWS provider reads to know a node has GPUs still coming up (it
# waits for the device plugin instead of adding more nodes): kubernetes/autoscaler,
# cluster-autoscaler/cloudprovider/aws/README.md, "Special note on GPU instances".
AWS_ACCELERATOR_LABEL = "k8s.amazonaws.com/accelerator"


def add_provider(scope: Construct, props: ClusterProps) -> AwsProvider:
    """The stack's AWS provider: its region, and the fleet's tags on every taggable resource."""
    return AwsProvider(
        scope, "aws", region=props.region, default_tags=[AwsProviderDefaultTags(tags=dict(props.tags))]
    )


def _assume(service: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}],
        }
    )


# What EKS refuses in public_access_cidrs: RFC 1918 and carrier-grade NAT space. (ipaddress's
# is_private also counts documentation ranges such as 203.0.113.0/24, which EKS accepts.)
_INTERNAL = [
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
]


def _split_cidrs(cidrs: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(public, internal): public CIDRs reach the public endpoint, internal ones the private one."""
    public: list[str] = []
    internal: list[str] = []
    for c in cidrs:
        net = ipaddress.ip_network(c, strict=False)
        is_internal = isinstance(net, ipaddress.IPv4Network) and any(net.subnet_of(n) for n in _INTERNAL)
        (internal if is_internal else public).append(c)
    return public, internal


class AwsGpuCluster(Construct):
    """EKS with a system node group and GPU node groups; `outputs` says how to reach it."""

    def __init__(self, scope: Construct, construct_id: str, *, props: ClusterProps) -> None:
        super().__init__(scope, construct_id)
        self.props = props
        partition = data_aws_partition.DataAwsPartition(self, "partition")
        account = data_aws_caller_identity.DataAwsCallerIdentity(self, "account")
        self._arn_prefix = f"arn:{partition.partition}:iam::aws:policy"
        zones = self._zones()
        private_subnets = self._network(zones)
        self.cluster = self._cluster(private_subnets, account.account_id, partition.partition)
        self._admin_access(partition.partition)
        node_role = self._node_role()
        system_group, system = self._system_pool(node_role, private_subnets)
        self.pod_identity_agent = self._pod_identity_agent(system_group)
        gpu_names = [self._gpu_pool(p, node_role, private_subnets) for p in props.gpu_pools]
        self.outputs = ClusterOutputs(
            cloud="aws",
            cluster_name=self.cluster.name,
            endpoint=self.cluster.endpoint,
            cluster_ca_certificate=self.cluster.certificate_authority.get(0).data,
            system_pool_name=system,
            gpu_pool_names=tuple(gpu_names),
            region=props.region,
        )

    # -- network ------------------------------------------------------------------------------
    def _zones(self) -> list[str]:
        if len(self.props.zones) >= 2:
            return list(self.props.zones)
        if self.props.zones:
            raise ValueError(
                f"cluster {self.props.name}: EKS needs subnets in at least two zones; "
                f"list two or more zones of {self.props.region}, or none to use the first two available"
            )
        azs = data_aws_availability_zones.DataAwsAvailabilityZones(self, "zones", state="available")
        return [Fn.element(azs.names, i) for i in range(2)]

    def _network(self, zones: list[str]) -> list[str]:
        p = self.props
        net = ipaddress.IPv4Network(p.network_cidr)  # a VPC's primary CIDR block is IPv4
        # Private /19s for nodes and pods (VPC CNI gives pods VPC addresses), /24s for NAT at the end.
        private_blocks = list(net.subnets(new_prefix=19))
        public_blocks = list(private_blocks[-1].subnets(new_prefix=24))
        if len(zones) > len(private_blocks) - 1:
            raise ValueError(f"cluster {p.name}: at most {len(private_blocks) - 1} zones")
        self.vpc = vpc.Vpc(
            self,
            "vpc",
            cidr_block=p.network_cidr,
            enable_dns_hostnames=True,
            enable_dns_support=True,
            tags={"Name": p.name},
        )
        # The default security group allows all traffic between its members; take every rule away.
        default_security_group.DefaultSecurityGroup(
            self, "default-sg", vpc_id=self.vpc.id, ingress=[], egress=[]
        )
        igw = internet_gateway.InternetGateway(self, "igw", vpc_id=self.vpc.id, tags={"Name": p.name})
        public_rt = route_table.RouteTable(
            self, "public-rt", vpc_id=self.vpc.id, tags={"Name": f"{p.name}-public"}
        )
        route.Route(
            self,
            "public-default",
            route_table_id=public_rt.id,
            destination_cidr_block="0.0.0.0/0",
            gateway_id=igw.id,
        )
        cluster_tag = {f"kubernetes.io/cluster/{p.name}": "shared"}
        private_ids = []
        for i, zone in enumerate(zones):
            pub = subnet.Subnet(
                self,
                f"public-{i}",
                vpc_id=self.vpc.id,
                availability_zone=zone,
                cidr_block=str(public_blocks[i]),
                map_public_ip_on_launch=False,
                tags={"Name": f"{p.name}-public-{i}", "kubernetes.io/role/elb": "1", **cluster_tag},
            )
            route_table_association.RouteTableAssociation(
                self, f"public-{i}-rt", subnet_id=pub.id, route_table_id=public_rt.id
            )
            ip = eip.Eip(self, f"nat-ip-{i}", domain="vpc", tags={"Name": f"{p.name}-nat-{i}"})
            nat = nat_gateway.NatGateway(
                self, f"nat-{i}", allocation_id=ip.id, subnet_id=pub.id, tags={"Name": f"{p.name}-nat-{i}"}
            )
            priv = subnet.Subnet(
                self,
                f"private-{i}",
                vpc_id=self.vpc.id,
                availability_zone=zone,
                cidr_block=str(private_blocks[i]),
                tags={"Name": f"{p.name}-private-{i}", "kubernetes.io/role/internal-elb": "1", **cluster_tag},
            )
            rt = route_table.RouteTable(
                self, f"private-{i}-rt", vpc_id=self.vpc.id, tags={"Name": f"{p.name}-private-{i}"}
            )
            route.Route(
                self,
                f"private-{i}-default",
                route_table_id=rt.id,
                destination_cidr_block="0.0.0.0/0",
                nat_gateway_id=nat.id,
            )
            route_table_association.RouteTableAssociation(
                self, f"private-{i}-rt-assoc", subnet_id=priv.id, route_table_id=rt.id
            )
            private_ids.append(priv.id)
        return private_ids

    # -- control plane ------------------------------------------------------------------------
    def _cluster(self, subnet_ids: list[str], account_id: str, partition: str) -> eks_cluster.EksCluster:
        p = self.props
        key = kms_key.KmsKey(
            self,
            "secrets-key",
            description=f"EKS secrets encryption for {p.name}",
            enable_key_rotation=True,
            deletion_window_in_days=30,
            policy=Fn.jsonencode(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Sid": "AccountAdministers",
                            "Effect": "Allow",
                            "Principal": {"AWS": f"arn:{partition}:iam::{account_id}:root"},
                            "Action": "kms:*",
                            "Resource": "*",
                        }
                    ],
                }
            ),
        )
        kms_alias.KmsAlias(
            self, "secrets-key-alias", name=f"alias/{p.name}-eks-secrets", target_key_id=key.key_id
        )
        role = iam_role.IamRole(
            self, "cluster-role", name=f"{p.name}-cluster", assume_role_policy=_assume("eks.amazonaws.com")
        )
        cluster_policy = iam_role_policy_attachment.IamRolePolicyAttachment(
            self, "cluster-policy", role=role.name, policy_arn=f"{self._arn_prefix}/AmazonEKSClusterPolicy"
        )
        public, private = _split_cidrs(p.api_allowed_cidrs)
        api_sg = security_group.SecurityGroup(
            self,
            "api-sg",
            name=f"{p.name}-api",
            vpc_id=self.vpc.id,
            description="Kubernetes API from the fleet's private api_allowed_cidrs",
        )
        for i, cidr in enumerate(private):
            vpc_security_group_ingress_rule.VpcSecurityGroupIngressRule(
                self,
                f"api-in-{i}",
                security_group_id=api_sg.id,
                ip_protocol="tcp",
                from_port=443,
                to_port=443,
                cidr_ipv4=cidr,
                description=f"Kubernetes API from {cidr}",
            )
        vpc_security_group_egress_rule.VpcSecurityGroupEgressRule(
            self,
            "api-out",
            security_group_id=api_sg.id,
            ip_protocol="tcp",
            from_port=443,
            to_port=443,
            cidr_ipv4=p.network_cidr,
            description="control plane to nodes inside the VPC",
        )
        return eks_cluster.EksCluster(
            self,
            "cluster",
            name=p.name,
            version=p.kubernetes_version,
            role_arn=role.arn,
            vpc_config=eks_cluster.EksClusterVpcConfig(
                subnet_ids=subnet_ids,
                security_group_ids=[api_sg.id],
                endpoint_private_access=True,
                endpoint_public_access=bool(public),
                public_access_cidrs=public or None,
            ),
            encryption_config=eks_cluster.EksClusterEncryptionConfig(
                resources=["secrets"],
                provider=eks_cluster.EksClusterEncryptionConfigProvider(key_arn=key.arn),
            ),
            enabled_cluster_log_types=LOG_TYPES,
            access_config=eks_cluster.EksClusterAccessConfig(
                authentication_mode="API", bootstrap_cluster_creator_admin_permissions=True
            ),
            # Standard support only (stacks/catalog/kubernetes.yaml): at its end EKS upgrades the
            # cluster instead of moving it into extended support, billed per cluster hour.
            upgrade_policy=eks_cluster.EksClusterUpgradePolicy(support_type="STANDARD"),
            # The policy must be attached before the cluster and detached after it, or EKS cannot
            # delete the security groups and ENIs it made (aws provider docs, aws_eks_cluster example).
            depends_on=[role, cluster_policy],
        )

    def _admin_access(self, partition: str) -> None:
        """A STANDARD access entry plus cluster-wide AmazonEKSClusterAdminPolicy per admin role ARN."""
        policy_arn = f"arn:{partition}:eks::aws:cluster-access-policy/{ADMIN_ACCESS_POLICY}"
        # One entry per principal: EKS refuses a second entry for the same ARN (409).
        for arn in dict.fromkeys(self.props.admin_principals):
            cid = _principal_id(arn)
            entry = eks_access_entry.EksAccessEntry(
                self, f"{cid}-entry", cluster_name=self.cluster.name, principal_arn=arn, type="STANDARD"
            )
            eks_access_policy_association.EksAccessPolicyAssociation(
                self,
                f"{cid}-admin",
                cluster_name=self.cluster.name,
                # From the entry, so Terraform creates the entry first (the association needs it).
                principal_arn=entry.principal_arn,
                policy_arn=policy_arn,
                access_scope=eks_access_policy_association.EksAccessPolicyAssociationAccessScope(
                    type="cluster"
                ),
            )

    def _pod_identity_agent(self, system_group: eks_node_group.EksNodeGroup) -> eks_addon.EksAddon:
        """The EKS Pod Identity Agent (a DaemonSet), the default add-on version for the cluster's version.

        After the system node group, so the add-on's ACTIVE status means the agent really runs on nodes.
        """
        return eks_addon.EksAddon(
            self,
            "pod-identity-agent",
            cluster_name=self.cluster.name,
            addon_name=POD_IDENTITY_ADDON,
            depends_on=[system_group],
        )

    # -- nodes --------------------------------------------------------------------------------
    def _node_role(self) -> iam_role.IamRole:
        role = iam_role.IamRole(
            self, "node-role", name=f"{self.props.name}-node", assume_role_policy=_assume("ec2.amazonaws.com")
        )
        # Node groups depend on these: without them nodes fail to join (NodeCreationFailure), and on
        # destroy EKS cannot delete instances and ENIs (aws provider docs, aws_eks_node_group example).
        self._node_policies = [
            iam_role_policy_attachment.IamRolePolicyAttachment(
                self, f"node-{policy}", role=role.name, policy_arn=f"{self._arn_prefix}/{policy}"
            )
            for policy in NODE_POLICIES
        ]
        return role

    def _launch_template(
        self, name: str, disk_gib: int, instance_type: str | None = None, reservation_id: str | None = None
    ) -> launch_template.LaunchTemplate:
        """IMDSv2 only (hop limit 1: pods cannot borrow the node's role), encrypted gp3 volumes.

        Bottlerocket has an OS volume (xvda) and a data volume (xvdb) for images and model caches.
        """
        ebs = launch_template.LaunchTemplateBlockDeviceMappingsEbs
        market = reservation = None
        if reservation_id:
            market = launch_template.LaunchTemplateInstanceMarketOptions(market_type="capacity-block")
            target = launch_template.LaunchTemplateCapacityReservationSpecificationCapacityReservationTarget
            reservation = launch_template.LaunchTemplateCapacityReservationSpecification(
                capacity_reservation_target=target(capacity_reservation_id=reservation_id)
            )
        lt = launch_template.LaunchTemplate(
            self,
            f"{name}-lt",
            name=f"{self.props.name}-{name}",
            update_default_version=True,
            metadata_options=launch_template.LaunchTemplateMetadataOptions(
                http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=1
            ),
            block_device_mappings=[
                launch_template.LaunchTemplateBlockDeviceMappings(
                    device_name="/dev/xvda", ebs=ebs(volume_size=8, volume_type="gp3", encrypted="true")
                ),
                launch_template.LaunchTemplateBlockDeviceMappings(
                    device_name="/dev/xvdb",
                    ebs=ebs(volume_size=disk_gib, volume_type="gp3", encrypted="true"),
                ),
            ],
            instance_type=instance_type,
            instance_market_options=market,
            capacity_reservation_specification=reservation,
        )
        return lt

    def _system_pool(
        self, role: iam_role.IamRole, subnet_ids: list[str]
    ) -> tuple[eks_node_group.EksNodeGroup, str]:
        p = self.props
        lt = self._launch_template("system", 50)
        name = "system"
        group = eks_node_group.EksNodeGroup(
            self,
            "system-pool",
            cluster_name=self.cluster.name,
            node_group_name=name,
            node_role_arn=role.arn,
            subnet_ids=subnet_ids,
            ami_type=SYSTEM_AMI_TYPE,
            capacity_type="ON_DEMAND",
            instance_types=[p.system_instance_type or SYSTEM_INSTANCE_TYPE],
            scaling_config=eks_node_group.EksNodeGroupScalingConfig(
                min_size=p.system_nodes, max_size=p.system_nodes + 2, desired_size=p.system_nodes
            ),
            launch_template=eks_node_group.EksNodeGroupLaunchTemplate(
                id=lt.id, version=Fn.tostring(lt.latest_version)
            ),
            labels={"gpufleet.io/pool": name},
            lifecycle=TerraformResourceLifecycle(ignore_changes=["scaling_config[0].desired_size"]),
            depends_on=list(self._node_policies),
        )
        return group, name

    def _gpu_pool(self, pool: GpuPoolProps, role: iam_role.IamRole, subnet_ids: list[str]) -> str:
        block = pool.tier == "reserved"
        lt = self._launch_template(
            pool.name,
            pool.disk_gib,
            instance_type=pool.instance_type if block else None,
            reservation_id=pool.reservation_id if block else None,
        )
        labels = {**pool.labels, AWS_ACCELERATOR_LABEL: _accelerator_value(pool)}
        ng = eks_node_group.EksNodeGroup(
            self,
            f"{pool.name}-pool",
            cluster_name=self.cluster.name,
            node_group_name=pool.name,
            node_role_arn=role.arn,
            # A capacity block lives in one zone: the node group gets that zone's subnet only.
            subnet_ids=subnet_ids[:1] if block else subnet_ids,
            ami_type=GPU_AMI_TYPE,
            capacity_type=CAPACITY_TYPE[pool.tier],
            # With a capacity block the instance type sits in the launch template (EKS wants it there).
            instance_types=None if block else [pool.instance_type],
            scaling_config=eks_node_group.EksNodeGroupScalingConfig(
                min_size=pool.min_nodes, max_size=pool.max_nodes, desired_size=pool.min_nodes
            ),
            labels=labels,
            taint=[
                eks_node_group.EksNodeGroupTaint(
                    key=GPU_TAINT_KEY, value=GPU_TAINT_VALUE, effect="NO_SCHEDULE"
                )
            ],
            launch_template=eks_node_group.EksNodeGroupLaunchTemplate(
                id=lt.id, version=Fn.tostring(lt.latest_version)
            ),
            update_config=eks_node_group.EksNodeGroupUpdateConfig(max_unavailable=1),
            # The cluster autoscaler owns the desired size once the group exists.
            lifecycle=TerraformResourceLifecycle(ignore_changes=["scaling_config[0].desired_size"]),
            depends_on=list(self._node_policies),
        )
        asg_name = ng.resources.get(0).autoscaling_groups.get(0).name
        prefix = "k8s.io/cluster-autoscaler/node-template"
        template = {f"{prefix}/label/{k}": v for k, v in labels.items()}
        template[f"{prefix}/taint/{GPU_TAINT_KEY}"] = f"{GPU_TAINT_VALUE}:NoSchedule"
        template[f"{prefix}/resources/{GPU_RESOURCE}"] = str(pool.gpus_per_node)
        for i, (key, value) in enumerate(sorted(template.items())):
            autoscaling_group_tag.AutoscalingGroupTagA(
                self,
                f"{pool.name}-asg-tag-{i}",
                autoscaling_group_name=asg_name,
                tag=autoscaling_group_tag.AutoscalingGroupTagTag(
                    key=key, value=value, propagate_at_launch=False
                ),
            )
        return pool.name


def _principal_id(arn: str) -> str:
    """A construct id per principal that stays put when the list is reordered: its name and a hash."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", arn.rsplit("/", 1)[-1])[:40]
    return f"admin-{name}-{hashlib.sha256(arn.encode()).hexdigest()[:8]}"


def _accelerator_value(pool: GpuPoolProps) -> str:
    """`nvidia-h100-80gb` for an H100-80GB pool: a valid label value naming the GPU."""
    return re.sub(r"[^a-z0-9.-]", "-", f"nvidia-{pool.gpu.lower()}")[:63].strip("-.")
