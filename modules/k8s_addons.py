"""Cluster add-ons, each a pinned Helm release with the cloud identity it needs.

What each cluster needs beyond what its cloud gives, so that GPU pods get nodes and the serving
stack's custom resources have their CRDs:

- Cluster Autoscaler (EKS): EKS has no node autoscaler of its own (outside Auto Mode); it scales the
  managed node groups between `nodes.min` and `nodes.max`, from zero thanks to the ASG node-template
  tags (aws_cluster.py). Identity: EKS Pod Identity.
- NVIDIA device plugin (AKS): `gpu_driver = "Install"` installs the driver only; without the plugin no
  node advertises `nvidia.com/gpu` (AKS docs "use-nvidia-gpu"). EKS's Bottlerocket NVIDIA AMI and GKE
  ship their own.
- KEDA (all): scales the engine Deployment on the router's demand (k8s_autoscaling.py).
- cert-manager (all, when the fleet has DNS): certificates for the routers' public names
  (k8s_certs.py); Route53 DNS-01 identity: EKS Pod Identity on AWS, an IAM user's key on GCP and Azure.

Chart versions are pinned (a chart's default image follows its version); the Cluster Autoscaler's
minor must match the cluster's, so its image tag is set from the fleet's Kubernetes version.
Sources: kubernetes/autoscaler README (chart 9.54.0+ carries CA 1.35), NVIDIA k8s-device-plugin
releases (chart 0.18.2), KEDA charts (2.18.0), cert-manager installation docs (v1.19.1, `crds.enabled`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from constructs import Construct
from gpufleet.modules import k8s_certs
from gpufleet.modules.cluster import GPU_TAINT_KEY, LABEL_GPU_PRESENT, cluster_name
from gpufleet.modules.k8s_objects import AZURE_SPOT_TAINT_KEY

if TYPE_CHECKING:
    from gpufleet.stacks.spec import Dns, Fleet, Region


@dataclass(frozen=True)
class Chart:
    name: str
    repository: str
    version: str
    namespace: str


CLUSTER_AUTOSCALER = Chart("cluster-autoscaler", "https://kubernetes.github.io/autoscaler", "9.54.0", "kube-system")
DEVICE_PLUGIN = Chart(
    "nvidia-device-plugin", "https://nvidia.github.io/k8s-device-plugin", "0.18.2", "nvidia-device-plugin"
)
KEDA = Chart("keda", "https://kedacore.github.io/charts", "2.18.0", "keda")
CERT_MANAGER = Chart("cert-manager", "https://charts.jetstack.io", "v1.19.1", k8s_certs.CERT_MANAGER_NAMESPACE)
CLUSTER_AUTOSCALER_SERVICE_ACCOUNT = "cluster-autoscaler"
HELM_TIMEOUT_S = 600


@dataclass(frozen=True)
class AddonsProps:
    fleet: Fleet
    region: Region
    kubernetes_version: str  # the cluster's minor, e.g. "1.35"

    @property
    def cluster_name(self) -> str:
        # The plain name (not the cluster stack's token): it goes into names, policies and values.
        return cluster_name(self.fleet, self.region)


def _policy(statements: list[dict[str, Any]]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


def _pod_identity_trust() -> str:
    # EKS Pod Identity: the agent assumes the role for the pod (EKS user guide, "pod-identities").
    return _policy(
        [
            {
                "Effect": "Allow",
                "Principal": {"Service": "pods.eks.amazonaws.com"},
                "Action": ["sts:AssumeRole", "sts:TagSession"],
            }
        ]
    )


def cluster_autoscaler_policy(cluster_name: str) -> str:
    """The Cluster Autoscaler's AWS permissions (its AWS cloud-provider README): read everywhere,
    change only the Auto Scaling groups EKS tagged as this cluster's."""
    return _policy(
        [
            {
                "Effect": "Allow",
                "Action": [
                    "autoscaling:DescribeAutoScalingGroups",
                    "autoscaling:DescribeAutoScalingInstances",
                    "autoscaling:DescribeLaunchConfigurations",
                    "autoscaling:DescribeScalingActivities",
                    "autoscaling:DescribeTags",
                    "ec2:DescribeImages",
                    "ec2:DescribeInstanceTypes",
                    "ec2:DescribeLaunchTemplateVersions",
                    "ec2:GetInstanceTypesFromInstanceRequirements",
                    "eks:DescribeNodegroup",
                ],
                "Resource": "*",
            },
            {
                "Effect": "Allow",
                "Action": ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"],
                "Resource": "*",
                "Condition": {
                    "StringEquals": {f"aws:ResourceTag/k8s.io/cluster-autoscaler/{cluster_name}": "owned"}
                },
            },
        ]
    )


def route53_challenge_policy(zone_arn: str) -> str:
    """What cert-manager's DNS-01 solver may do: TXT records named _acme-challenge.* in ONE zone
    (Route53 condition keys ChangeResourceRecordSetsRecordTypes / NormalizedRecordNames)."""
    return _policy(
        [
            {"Effect": "Allow", "Action": "route53:GetChange", "Resource": "arn:aws:route53:::change/*"},
            {"Effect": "Allow", "Action": "route53:ListHostedZonesByName", "Resource": "*"},
            {"Effect": "Allow", "Action": "route53:ListResourceRecordSets", "Resource": zone_arn},
            {
                "Effect": "Allow",
                "Action": "route53:ChangeResourceRecordSets",
                "Resource": zone_arn,
                "Condition": {
                    "ForAllValues:StringEquals": {"route53:ChangeResourceRecordSetsRecordTypes": ["TXT"]},
                    "ForAllValues:StringLike": {
                        "route53:ChangeResourceRecordSetsNormalizedRecordNames": ["_acme-challenge.*"]
                    },
                },
            },
        ]
    )


def device_plugin_values() -> dict[str, Any]:
    """The plugin's DaemonSet runs on GPU nodes only, through their taints (GPU, and Azure spot)."""
    return {
        "nodeSelector": {LABEL_GPU_PRESENT: "true"},
        "tolerations": [
            {"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"},
            {"key": AZURE_SPOT_TAINT_KEY, "operator": "Equal", "value": "spot", "effect": "NoSchedule"},
        ],
    }


def cluster_autoscaler_values(cluster_name: str, region: str, kubernetes_version: str) -> dict[str, Any]:
    return {
        "cloudProvider": "aws",
        "awsRegion": region,
        # EKS tags its managed node groups' ASGs k8s.io/cluster-autoscaler/{enabled,<cluster>}.
        "autoDiscovery": {"clusterName": cluster_name},
        "image": {"tag": f"v{kubernetes_version}.0"},
        "rbac": {"serviceAccount": {"create": True, "name": CLUSTER_AUTOSCALER_SERVICE_ACCOUNT}},
        "extraArgs": {
            "balance-similar-node-groups": True,
            "expander": "least-waste",
            # GPU nodes hold model caches in emptyDir; they must still scale down when idle.
            "skip-nodes-with-local-storage": False,
            "scale-down-unneeded-time": "10m",
        },
    }


class ClusterAddons(Construct):
    """The add-ons of one region's cluster; `releases` by chart name."""

    def __init__(self, scope: Construct, construct_id: str, *, props: AddonsProps) -> None:
        super().__init__(scope, construct_id)
        self.props = props
        self.releases: dict[str, Any] = {}
        cloud = props.region.cloud.value
        if cloud == "aws":
            self._cluster_autoscaler()
        if cloud == "azure":
            self._release(DEVICE_PLUGIN, device_plugin_values())
        self._release(KEDA, {})
        if props.fleet.settings.dns is not None:
            self._cert_manager(props.fleet.settings.dns)

    def _release(self, chart: Chart, values: dict[str, Any], depends_on: list | None = None):
        from cdktn_provider_helm.release import Release

        release = Release(
            self,
            chart.name,
            name=chart.name,
            repository=chart.repository,
            chart=chart.name,
            version=chart.version,
            namespace=chart.namespace,
            create_namespace=chart.namespace != "kube-system",
            values=[json.dumps(values, sort_keys=True)] if values else None,
            atomic=True,  # a failed install rolls back instead of leaving half a release
            timeout=HELM_TIMEOUT_S,
            depends_on=depends_on,
        )
        self.releases[chart.name] = release
        return release

    def _pod_identity_role(self, name: str, policy: str, namespace: str, service_account: str):
        from cdktn_provider_aws.eks_pod_identity_association import EksPodIdentityAssociation
        from cdktn_provider_aws.iam_role import IamRole
        from cdktn_provider_aws.iam_role_policy import IamRolePolicy

        cluster = self.props.cluster_name
        role = IamRole(
            self, f"{name}-role", name_prefix=f"{name[:20]}-", assume_role_policy=_pod_identity_trust()
        )
        IamRolePolicy(self, f"{name}-policy", role=role.name, policy=policy)
        return EksPodIdentityAssociation(
            self,
            f"{name}-identity",
            cluster_name=cluster,
            namespace=namespace,
            service_account=service_account,
            role_arn=role.arn,
        )

    def _cluster_autoscaler(self) -> None:
        p = self.props
        name = p.cluster_name
        identity = self._pod_identity_role(
            "cluster-autoscaler",
            cluster_autoscaler_policy(name),
            CLUSTER_AUTOSCALER.namespace,
            CLUSTER_AUTOSCALER_SERVICE_ACCOUNT,
        )
        values = cluster_autoscaler_values(name, p.region.region, p.kubernetes_version)
        self._release(CLUSTER_AUTOSCALER, values, depends_on=[identity])

    def _cert_manager(self, dns: Dns) -> None:
        from cdktn_provider_aws.data_aws_route53_zone import DataAwsRoute53Zone

        p = self.props
        zone = DataAwsRoute53Zone(self, "zone", name=dns.zone, private_zone=False)
        policy = route53_challenge_policy(zone.arn)
        values = {"crds": {"enabled": True}}
        if p.region.cloud.value == "aws":
            identity = self._pod_identity_role(
                "cert-manager", policy, CERT_MANAGER.namespace, k8s_certs.CERT_MANAGER_SERVICE_ACCOUNT
            )
            self._release(CERT_MANAGER, values, depends_on=[identity])
            return
        release = self._release(CERT_MANAGER, values)
        self._route53_key(policy, release)

    def _route53_key(self, policy: str, release: Any) -> None:
        """GKE and AKS have no AWS identity of their own: an IAM user limited to the challenge records,
        its key in a Secret beside cert-manager (where ClusterIssuers read their secrets)."""
        from cdktn_provider_aws.iam_access_key import IamAccessKey
        from cdktn_provider_aws.iam_group import IamGroup
        from cdktn_provider_aws.iam_group_policy import IamGroupPolicy
        from cdktn_provider_aws.iam_user import IamUser
        from cdktn_provider_aws.iam_user_group_membership import IamUserGroupMembership
        from cdktn_provider_kubernetes.secret_v1 import SecretV1, SecretV1Metadata

        name = f"{self.props.cluster_name}-acme"
        # The permissions sit on a group, not on the user (IAM best practice, checkov CKV_AWS_40).
        group = IamGroup(self, "route53-group", name=name)
        IamGroupPolicy(self, "route53-group-policy", group=group.name, policy=policy)
        user = IamUser(self, "route53-user", name=name)
        IamUserGroupMembership(self, "route53-membership", user=user.name, groups=[group.name])
        key = IamAccessKey(self, "route53-key", user=user.name)
        SecretV1(
            self,
            "route53-secret",
            metadata=SecretV1Metadata(name=k8s_certs.ROUTE53_SECRET, namespace=CERT_MANAGER.namespace),
            data={k8s_certs.ROUTE53_KEY_ID: key.id, k8s_certs.ROUTE53_SECRET_KEY: key.secret},
            depends_on=[release],
        )
