"""The ONE description of what runs on each cluster, as Kubernetes API objects (plain dicts).

Two renderers read it: the cdktn constructs (`k8s_serving.py`, `k8s_router.py`, through `k8s_tf.py`)
turn each object into the kubernetes provider's typed resource, and `gpufleet manifests` dumps it
as YAML for kubectl and Helm users. Nothing here imports cdktn, so the manifests command stays fast.

Per region:
  Namespace; ConfigMap with the fleet file (endpoints filled in for the in-cluster router);
  engines: Deployment (vLLM via `gpufleet engine launch`; KEDA owns its replica count, see
  `k8s_autoscaling.py`), PodDisruptionBudget, Service, headless Service (the router's engine
  discovery: its A records are the ready engine pods);
  router: Deployment (>= 2 replicas), PodDisruptionBudget, an internal Service (plain HTTP, for
  KEDA and in-cluster clients) and a LoadBalancer Service (HTTPS on 443 with a cert-manager
  certificate when the fleet has DNS names, see `k8s_certs.py`; else an internal load balancer).
Secrets are NOT described with values here: the router's admin token and the Hugging Face token must
never appear in a manifest (Terraform fills them from random_password and a sensitive variable;
kubectl users create them, see docs/serving.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpufleet.modules.cluster import (
    GPU_RESOURCE,
    GPU_TAINT_EFFECT,
    GPU_TAINT_KEY,
    LABEL_GPU,
    router_public_port,
)

if TYPE_CHECKING:
    from gpufleet.stacks.spec import Fleet, Region

Obj = dict[str, Any]

NAMESPACE = "gpufleet"
FLEET_CONFIGMAP = "gpufleet-fleet"
FLEET_DIR = "/etc/gpufleet"
FLEET_KEY = "fleet.yaml"
ENGINE = "gpufleet-engine"
ENGINE_HEADLESS = "gpufleet-engine-headless"
ROUTER = "gpufleet-router"
ROUTER_INTERNAL = "gpufleet-router-internal"  # ClusterIP, plain HTTP: KEDA's /scale reads, in-cluster clients
ROUTER_HEADLESS = "gpufleet-router-headless"  # one A record per router replica: they share reservations
ADMIN_SECRET = "gpufleet-router-admin"
ADMIN_SECRET_KEY = "token"
HF_SECRET_KEY = "token"
TLS_SECRET = "gpufleet-router-tls"  # written by cert-manager (k8s_certs.py)
ENGINE_PORT = 8000  # vLLM's port: /health, /metrics, the OpenAI API
ROUTER_PORT = 8080  # plain HTTP inside the cluster
ROUTER_TLS_PORT = 8443  # HTTPS behind the public load balancer
RUN_AS_UID = 10001  # the serving image's non-root user (serving/Dockerfile)
# Azure marks spot nodes with this taint itself (AKS spot-node-pool docs); spot engines tolerate it.
AZURE_SPOT_TAINT_KEY = "kubernetes.azure.com/scalesetpriority"

# Model load (download + weights to GPU + CUDA graphs) takes minutes; the startup probe allows
# STARTUP_FAILURES x STARTUP_PERIOD_S = 15 minutes before the kubelet restarts the container.
STARTUP_PERIOD_S = 10
STARTUP_FAILURES = 90
SHM_SIZE = "16Gi"  # NCCL between tensor-parallel ranks goes through /dev/shm
MODEL_CACHE_SIZE = "150Gi"  # GPU nodes get 200 GiB disks (modules/cluster.py GpuPoolProps.disk_gib)
# Secrets are mounted as files, not environment variables (a process listing or crash dump shows env).
ADMIN_TOKEN_DIR = "/var/run/secrets/gpufleet"
HF_TOKEN_DIR = "/var/run/secrets/huggingface"
TLS_DIR = "/var/run/secrets/gpufleet-tls"
HOME_DIR = "/home/gpufleet"  # the image user's HOME: vLLM, torch.compile and Triton caches


class ImageError(ValueError):
    """No serving image, or one the clusters could not pull."""


def serving_image(fleet: Fleet, override: str | None = None) -> str:
    """The serving image for the clusters: `override` (synth/manifests --image), else serving.image."""
    from gpufleet.stacks.spec import check_image

    image = override or fleet.serving.image
    if not image:
        raise ImageError(
            "no serving image: build serving/Dockerfile, push it to a registry the clusters can pull from, "
            "and set serving.image in the fleet file or pass --image REF"
        )
    try:
        return check_image(image)
    except ValueError as exc:
        raise ImageError(str(exc)) from None


@dataclass(frozen=True)
class RegionWorkload:
    """The numbers one region's objects are built from."""

    region_key: str
    cloud: str
    gpu: str
    model_name: str
    tensor_parallel_size: int
    gpus_per_node: int
    min_nodes: int
    max_nodes: int
    image: str
    tier: str = "on-demand"
    vcpus_per_gpu: float = 4.0

    @property
    def cpus_request(self) -> int:
        return max(1, int(self.vcpus_per_gpu * self.tensor_parallel_size // 2))

    @property
    def engines_per_node(self) -> int:
        return max(1, self.gpus_per_node // self.tensor_parallel_size)

    @property
    def min_engines(self) -> int:
        """Engines kept when idle: every GPU of the pool's minimum (0 nodes: 0 engines)."""
        return self.min_nodes * self.engines_per_node

    @property
    def max_engines(self) -> int:
        """Engines at the pool's maximum; KEDA scales between the two on the router's demand."""
        return max(1, self.max_nodes * self.engines_per_node)


def workload(fleet: Fleet, region: Region, image: str) -> RegionWorkload:
    model = fleet.model_for(region)
    it = region.instance(model.tensor_parallel_size)
    return RegionWorkload(
        region_key=region.key,
        cloud=region.cloud.value,
        gpu=region.gpu,
        model_name=model.name,
        tensor_parallel_size=model.tensor_parallel_size,
        gpus_per_node=it.gpus,
        min_nodes=region.nodes.min,
        max_nodes=region.nodes.max,
        image=image,
        tier=region.capacity.tier.value,
        vcpus_per_gpu=it.vcpus_per_gpu,
    )


def engines_dns() -> str:
    """What the router resolves to find the engines: the headless Service, one A record per ready pod."""
    return f"{ENGINE_HEADLESS}.{NAMESPACE}.svc.cluster.local:{ENGINE_PORT}"


def router_hostname(fleet: Fleet, region: Region) -> str | None:
    """The per-region name the global-traffic stack creates for each router, when the fleet has DNS."""
    if fleet.settings.dns is None:
        return None
    return f"{region.key}.{fleet.settings.dns.record}"


def peer_router_url(fleet: Fleet, region: Region) -> str | None:
    """Where peers reach a region's router: HTTPS on its public name (the summary carries the admin
    token, so it never crosses the internet in the clear)."""
    host = router_hostname(fleet, region)
    return None if host is None else f"https://{host}"


def in_cluster_fleet_yaml(fleet: Fleet) -> str:
    """The fleet file as the in-cluster router and launcher read it: endpoints the user left empty are
    filled with the headless Service (same name in every cluster) and the peers' regional DNS names."""
    import yaml

    data = fleet.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    for raw, region in zip(data["regions"], fleet.regions, strict=True):
        ep = raw.setdefault("endpoints", {})
        if not ep.get("engines") and not ep.get("engines_dns"):
            ep["engines_dns"] = engines_dns()
        url = peer_router_url(fleet, region)
        if not ep.get("router") and url:
            ep["router"] = url
    # The router reads its admin token from the Secret mounted as a file (router_objects), and its
    # certificate from the Secret cert-manager keeps renewed (k8s_certs.py).
    router = data.setdefault("router", {})
    router["admin_token_file"] = f"{ADMIN_TOKEN_DIR}/{ADMIN_SECRET_KEY}"
    if fleet.settings.dns is not None:
        router["tls_cert_file"] = f"{TLS_DIR}/tls.crt"
        router["tls_key_file"] = f"{TLS_DIR}/tls.key"
        router["tls_port"] = ROUTER_TLS_PORT
    header = (
        "# Rendered by gpufleet for the in-cluster router and engine launcher; edit the source fleet file.\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False)


def _labels(component: str, fleet: Fleet) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": ENGINE if component == "engine" else ROUTER,
        "app.kubernetes.io/instance": fleet.fleet,
        "app.kubernetes.io/component": component,
    }


def _meta(name: str, labels: dict[str, str], **extra: Any) -> Obj:
    return {
        "name": name,
        "namespace": NAMESPACE,
        "labels": {
            **labels,
            "app.kubernetes.io/part-of": "gpufleet",
            "app.kubernetes.io/managed-by": "gpufleet",
        },
        **extra,
    }


def _scrape(port: int) -> dict[str, str]:
    # The prometheus.io/* convention (Prometheus' kubernetes_sd relabel examples, most charts).
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def _http_probe(period: int, failures: int, timeout: int = 5) -> Obj:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def namespace_objects(fleet: Fleet) -> list[Obj]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "gpufleet"}},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(FLEET_CONFIGMAP, {"app.kubernetes.io/instance": fleet.fleet}),
            "data": {FLEET_KEY: in_cluster_fleet_yaml(fleet)},
        },
    ]


def engine_objects(fleet: Fleet, w: RegionWorkload) -> list[Obj]:
    labels = _labels("engine", fleet)
    gpus = str(w.tensor_parallel_size)
    container: dict[str, Any] = {
        "name": "vllm",
        "image": w.image,
        # The image's ENTRYPOINT is `gpufleet engine launch`: it probes the GPUs and execs vLLM.
        "args": ["--fleet", f"{FLEET_DIR}/{FLEET_KEY}", "--region", w.region_key, "--model", w.model_name],
        "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "imagePullPolicy": "Always",  # with a digest the kubelet only compares it (checkov CKV_K8S_15)
        # CPU: half the node's vCPUs per GPU (the rest for the system and the device plugin); no CPU
        # limit, throttling the scheduler loop stalls every request in the batch. Memory: the request
        # covers the process and the weights streaming through host memory; no limit, since an OOM
        # kill of an engine with a full KV cache is worse than the node's own pressure eviction.
        "resources": {
            "limits": {GPU_RESOURCE: gpus},
            "requests": {
                GPU_RESOURCE: gpus,
                "cpu": str(w.cpus_request),
                "memory": f"{8 * w.tensor_parallel_size}Gi",
            },
        },
        "volumeMounts": [
            {"name": "model-cache", "mountPath": "/root/.cache/huggingface"},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "fleet", "mountPath": FLEET_DIR, "readOnly": True},
            {"name": "home", "mountPath": HOME_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "startupProbe": _http_probe(STARTUP_PERIOD_S, STARTUP_FAILURES),
        "readinessProbe": _http_probe(5, 3),
        "livenessProbe": _http_probe(10, 6),
        # Read-only image; what vLLM writes goes to the volumes above (HOME caches, /tmp, the model cache).
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    volumes = [
        {"name": "model-cache", "emptyDir": {"sizeLimit": MODEL_CACHE_SIZE}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
        {"name": "fleet", "configMap": {"name": FLEET_CONFIGMAP}},
        {"name": "home", "emptyDir": {"sizeLimit": "20Gi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}},
    ]
    if fleet.serving.hf_token != "none":
        # huggingface_hub reads the token from this file. Not optional: a gated model without it
        # would crash-loop on a 401 from the hub; a missing Secret keeps the pod visibly Pending.
        container["env"] = [{"name": "HF_TOKEN_PATH", "value": f"{HF_TOKEN_DIR}/{HF_SECRET_KEY}"}]
        container["volumeMounts"].append({"name": "hf-token", "mountPath": HF_TOKEN_DIR, "readOnly": True})
        volumes.append({"name": "hf-token", "secret": {"secretName": fleet.serving.hf_secret_name}})
    pod = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_UID, "fsGroup": RUN_AS_UID},
        "nodeSelector": {LABEL_GPU: w.gpu},
        "tolerations": engine_tolerations(w),
        "terminationGracePeriodSeconds": 60,  # let running requests finish
        "containers": [container],
        "volumes": volumes,
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(ENGINE, labels),
        "spec": {
            # The starting size only: KEDA's ScaledObject (k8s_autoscaling.py) owns the count from
            # here on, between the pool's min and max, on the router's demand signal.
            "replicas": w.min_engines,
            "selector": {"matchLabels": labels},
            # GPUs are scarce: replace pods one at a time, never ask for an extra GPU to surge.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": {"labels": labels, "annotations": _scrape(ENGINE_PORT)}, "spec": pod},
        },
    }
    ports = [{"name": "http", "port": ENGINE_PORT, "targetPort": "http", "protocol": "TCP"}]
    return [
        deployment,
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(ENGINE, labels),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(ENGINE, labels, annotations=_scrape(ENGINE_PORT)),
            "spec": {"type": "ClusterIP", "selector": labels, "ports": ports},
        },
        # Headless: DNS answers with the ready pods' IPs, so the router scrapes each engine itself.
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(ENGINE_HEADLESS, labels),
            "spec": {
                "clusterIP": "None",
                "selector": labels,
                "ports": ports,
                "publishNotReadyAddresses": False,
            },
        },
    ]


def engine_tolerations(w: RegionWorkload) -> list[Obj]:
    """The taints of the region's GPU pool, tolerated: the GPU taint everywhere, Azure's spot taint on
    Azure spot pools (AKS puts it on every spot node)."""
    tolerations = [{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": GPU_TAINT_EFFECT}]
    if w.cloud == "azure" and w.tier == "spot":
        tolerations.append(
            {"key": AZURE_SPOT_TAINT_KEY, "operator": "Equal", "value": "spot", "effect": "NoSchedule"}
        )
    return tolerations


def _lb_annotations(cloud: str, public: bool) -> dict[str, str]:
    """Annotations of the router's LoadBalancer Service: internet-facing only when it serves TLS."""
    if cloud == "aws":
        # In-tree controller: a Network Load Balancer (TCP, keeps long streams) instead of a Classic ELB.
        out = {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}
        if not public:
            out["service.beta.kubernetes.io/aws-load-balancer-internal"] = "true"
        return out
    if public:
        return {}
    if cloud == "gcp":
        return {"networking.gke.io/load-balancer-type": "Internal"}
    return {"service.beta.kubernetes.io/azure-load-balancer-internal": "true"}


def router_objects(fleet: Fleet, w: RegionWorkload, replicas: int = 2) -> list[Obj]:
    labels = _labels("router", fleet)
    tls = fleet.settings.dns is not None  # a public name to hold a certificate for
    ports = [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}]
    mounts = [
        {"name": "fleet", "mountPath": FLEET_DIR, "readOnly": True},
        # The admin token as a file: the in-cluster fleet sets router.admin_token_file to it.
        {"name": "admin-token", "mountPath": ADMIN_TOKEN_DIR, "readOnly": True},
    ]
    volumes = [
        {"name": "fleet", "configMap": {"name": FLEET_CONFIGMAP}},
        {"name": "admin-token", "secret": {"secretName": ADMIN_SECRET}},
    ]
    if tls:
        ports.append({"name": "https", "containerPort": ROUTER_TLS_PORT, "protocol": "TCP"})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": TLS_SECRET}})
    public_port = router_public_port(fleet)
    container = {
        "name": "router",
        "image": w.image,
        "command": ["gpufleet"],
        "args": [
            "router",
            "serve",
            "--fleet",
            f"{FLEET_DIR}/{FLEET_KEY}",
            "--region",
            w.region_key,
            "--host",
            "0.0.0.0",
            "--port",
            str(ROUTER_PORT),
            # The replicas find each other here and subtract each other's reservations, so two of
            # them never book the same free KV twice (serving/router/replicas.py).
            "--replicas-dns",
            f"{ROUTER_HEADLESS}.{NAMESPACE}.svc.cluster.local:{ROUTER_PORT}",
        ],
        "ports": ports,
        "imagePullPolicy": "Always",  # with a digest the kubelet only compares it (checkov CKV_K8S_15)
        "resources": {
            "requests": {"cpu": "500m", "memory": "512Mi"},
            "limits": {"cpu": "2", "memory": "1Gi"},
        },
        "volumeMounts": mounts,
        "readinessProbe": _http_probe(5, 3, 2),
        # Liveness on TCP only: /health may report "no engines" while GPU nodes scale up from zero,
        # and restarting the router would not help that.
        "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_UID, "fsGroup": RUN_AS_UID},
        "containers": [container],
        "volumes": volumes,
        # Replicas on different nodes, so one node's loss leaves a router up.
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": labels},
            }
        ],
    }
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(ROUTER, labels),
            "spec": {
                "replicas": max(2, replicas),
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels, "annotations": _scrape(ROUTER_PORT)},
                    "spec": pod,
                },
            },
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(ROUTER, labels),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": labels}},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(ROUTER_HEADLESS, labels),
            "spec": {
                "clusterIP": "None",
                "selector": labels,
                "ports": [{"name": "http", "port": ROUTER_PORT, "targetPort": "http", "protocol": "TCP"}],
                # A replica that is starting is a replica already taking requests: publish it early.
                "publishNotReadyAddresses": True,
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(ROUTER_INTERNAL, labels),
            "spec": {
                "type": "ClusterIP",
                "selector": labels,
                "ports": [{"name": "http", "port": ROUTER_PORT, "targetPort": "http", "protocol": "TCP"}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(ROUTER, labels, annotations=_lb_annotations(w.cloud, public=tls)),
            "spec": {
                "type": "LoadBalancer",
                "selector": labels,
                "ports": [
                    {
                        "name": "https" if tls else "http",
                        "port": public_port,
                        "targetPort": "https" if tls else "http",
                        "protocol": "TCP",
                    }
                ],
            },
        },
    ]


def router_internal_url(path: str = "") -> str:
    return f"http://{ROUTER_INTERNAL}.{NAMESPACE}.svc.cluster.local:{ROUTER_PORT}{path}"


def region_objects(fleet: Fleet, region: Region, image: str) -> list[Obj]:
    """Everything one region's cluster runs, in apply order (custom resources last: their CRDs come
    from the add-ons, KEDA and cert-manager)."""
    from gpufleet.modules.k8s_autoscaling import autoscaling_objects
    from gpufleet.modules.k8s_certs import certificate_objects

    w = workload(fleet, region, image)
    return (
        namespace_objects(fleet)
        + engine_objects(fleet, w)
        + router_objects(fleet, w)
        + autoscaling_objects(fleet, w)
        + certificate_objects(fleet, region)
    )


def secret_object(name: str, key: str, reference: str, component: str) -> Obj:
    """A Secret for the Terraform renderer only: `reference` is a Terraform reference (random_password
    .result, a sensitive variable) that the kubernetes provider resolves and base64-encodes at apply."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(name, {"app.kubernetes.io/component": component}),
        "data": {key: reference},
    }


def admin_secret_object(token_reference: str) -> Obj:
    return secret_object(ADMIN_SECRET, ADMIN_SECRET_KEY, token_reference, "router")


def hf_secret_object(fleet: Fleet, token_reference: str) -> Obj:
    return secret_object(fleet.serving.hf_secret_name, HF_SECRET_KEY, token_reference, "engine")
