"""TLS for the routers' public names: a cert-manager ClusterIssuer (ACME, DNS-01 in the fleet's
Route53 zone) and a Certificate for `<region-key>.<record>` and `<record>`.

DNS-01 rather than HTTP-01: it needs no ingress controller and works before the load balancer has an
address. The solver's AWS identity comes from the add-ons stack: on EKS an EKS Pod Identity role for
cert-manager's service account (ambient credentials, which ClusterIssuers may use by default); on GKE
and AKS an IAM user whose key sits in a Secret in cert-manager's namespace. Either may only change
TXT records named `_acme-challenge.*` in that one zone. cert-manager renews the certificate in place
30 days before expiry; the router re-reads the files when they change.

Only when the fleet has `settings.dns`: without public names the router's load balancer is internal
and serves plain HTTP inside the network. Sources: cert-manager docs "ACME DNS01 Route53" (region,
hostedZoneID, accessKeyIDSecretRef / secretAccessKeySecretRef, ambient credentials) and "Certificate
resource".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpufleet.modules import k8s_objects as k8s

if TYPE_CHECKING:
    from gpufleet.modules.k8s_objects import Obj
    from gpufleet.stacks.spec import Fleet, Region

CERT_MANAGER_API = "cert-manager.io/v1"
CERT_MANAGER_NAMESPACE = "cert-manager"
CERT_MANAGER_SERVICE_ACCOUNT = "cert-manager"
CLUSTER_ISSUER = "gpufleet-acme"
ACME_ACCOUNT_SECRET = "gpufleet-acme-account"
ROUTE53_SECRET = "gpufleet-route53"  # GKE and AKS: the IAM user's key, in cert-manager's namespace
ROUTE53_KEY_ID = "access-key-id"
ROUTE53_SECRET_KEY = "secret-access-key"
ROUTE53_API_REGION = "us-east-1"


def certificate_objects(fleet: Fleet, region: Region) -> list[Obj]:
    dns = fleet.settings.dns
    if dns is None:
        return []
    route53: dict = {"region": ROUTE53_API_REGION}
    if region.cloud.value != "aws":
        route53["accessKeyIDSecretRef"] = {"name": ROUTE53_SECRET, "key": ROUTE53_KEY_ID}
        route53["secretAccessKeySecretRef"] = {"name": ROUTE53_SECRET, "key": ROUTE53_SECRET_KEY}
    acme: dict = {
        "server": fleet.settings.tls.acme_server,
        "privateKeySecretRef": {"name": ACME_ACCOUNT_SECRET},
        "solvers": [{"selector": {"dnsZones": [dns.zone]}, "dns01": {"route53": route53}}],
    }
    if fleet.settings.tls.acme_email:
        acme["email"] = fleet.settings.tls.acme_email
    labels = {"app.kubernetes.io/part-of": "gpufleet"}
    issuer = {
        "apiVersion": CERT_MANAGER_API,
        "kind": "ClusterIssuer",
        "metadata": {"name": CLUSTER_ISSUER, "labels": labels},
        "spec": {"acme": acme},
    }
    certificate = {
        "apiVersion": CERT_MANAGER_API,
        "kind": "Certificate",
        "metadata": {"name": k8s.ROUTER, "namespace": k8s.NAMESPACE, "labels": labels},
        "spec": {
            "secretName": k8s.TLS_SECRET,
            "dnsNames": [k8s.router_hostname(fleet, region), dns.record],
            "issuerRef": {"name": CLUSTER_ISSUER, "kind": "ClusterIssuer", "group": "cert-manager.io"},
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
        },
    }
    return [issuer, certificate]
