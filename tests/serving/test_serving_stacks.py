"""The serving stacks through cdktn: engines, router, admin secret, global traffic, stack dependencies.

One synthesis of the example fleet per session (the providers take seconds to load), plus one
standalone stack per cloud with stand-in cluster outputs for the provider wiring.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SENTINEL = "sentinel-admin-token-must-not-leak-0123456789"


@pytest.fixture(scope="session")
def synthesized(example_fleet, tmp_path_factory):
    """(app, outdir, {stack name: Testing.synth JSON string}) for the example fleet."""
    mp = pytest.MonkeyPatch()
    # If any code read the router's token from the environment into the JSON, this would show it.
    mp.setenv(example_fleet.router.admin_token_env, SENTINEL)
    from gpufleet.stacks.synth import build_app

    out = tmp_path_factory.mktemp("synth") / "cdktf.out"
    app, _clusters = build_app(example_fleet, out)
    app.synth()
    from cdktn import Testing

    names = [f"{r.key}-{kind}" for r in example_fleet.regions for kind in ("addons", "serving")]
    names.append("global-traffic")
    synths = {n: Testing.synth(app.node.find_child(n)) for n in names}
    mp.undo()
    return app, out, synths


def _doc(synths, name):
    return json.loads(synths[name])


def _has(synth: str, resource_type: str, props: dict) -> bool:
    from cdktn import Testing

    return Testing.to_have_resource_with_properties(synth, resource_type, props)


def test_engine_deployment_gpu_limit_toleration_and_autoscaled_replicas(synthesized, example_fleet):
    from cdktn_provider_kubernetes.deployment_v1 import DeploymentV1

    _, _, synths = synthesized
    s = synths["aws-us-east-1-serving"]
    # nodes.min 0: no engine when idle; KEDA owns the count after the first apply.
    assert _has(s, DeploymentV1.TF_RESOURCE_TYPE, {
        "metadata": {"name": "gpufleet-engine"},
        "spec": {"replicas": "0", "template": {"spec": {
            "toleration": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "container": [{"resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        }}},
        "wait_for_rollout": False,
        "lifecycle": {"ignore_changes": ["spec[0].replicas"]},
    })  # fmt: skip
    # The matcher is partial but not lax: a wrong value fails.
    assert not _has(
        s,
        DeploymentV1.TF_RESOURCE_TYPE,
        {"metadata": {"name": "gpufleet-engine"}, "spec": {"replicas": "16"}},
    )


def _manifests(synths, stack, kind):
    res = _doc(synths, stack)["resource"].get("kubernetes_manifest", {})
    return [r["manifest"] for r in res.values() if r["manifest"]["kind"] == kind]


@pytest.mark.parametrize(("stack", "most"), [("aws-us-east-1", 16), ("aws-us-west-2", 8), ("gcp-us-central1", 4)])
def test_keda_scales_engines_between_the_pools_min_and_max_on_the_routers_demand(synthesized, stack, most):
    # p5.48xlarge: 8 GPUs x max 2 nodes / tensor parallel 1 = 16; g6e.xlarge 1 x 8; a3-highgpu-1g 1 x 4.
    (scaled,) = _manifests(synthesized[2], f"{stack}-serving", "ScaledObject")
    spec = scaled["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, most)
    assert spec["scaleTargetRef"]["name"] == "gpufleet-engine"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert meta["url"] == "http://gpufleet-router-internal.gpufleet.svc.cluster.local:8080/scale"
    assert (meta["valueLocation"], meta["targetValue"], meta["authMode"]) == ("desired_engines", "1", "bearer")
    (auth,) = _manifests(synthesized[2], f"{stack}-serving", "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "token", "name": "gpufleet-router-admin", "key": "token"}
    ]


def test_hugging_face_token_from_a_sensitive_variable_into_a_required_secret(synthesized):
    doc = _doc(synthesized[2], "azure-eastus-serving")
    var = doc["variable"]["hf_token"]
    assert var["sensitive"] is True and var["type"] == "string"
    (secret,) = [
        x for x in doc["resource"]["kubernetes_secret_v1"].values() if x["metadata"]["name"] == "huggingface"
    ]
    assert secret["data"] == {"token": "${var.hf_token}"}
    spec = _engine(synthesized[2], "azure-eastus-serving")["spec"]["template"]["spec"]
    (vol,) = [v for v in spec["volume"] if v["name"] == "hf-token"]
    assert vol["secret"] == {"secret_name": "huggingface"}  # not optional: a gated model needs it
    assert {"name": "HF_TOKEN_PATH", "value": "/var/run/secrets/huggingface/token"} in spec["container"][0]["env"]


def _engine(synths, stack="gcp-us-central1-serving"):
    deps = _doc(synths, stack)["resource"]["kubernetes_deployment_v1"]
    return next(d for d in deps.values() if d["metadata"]["name"] == "gpufleet-engine")


def test_engine_probes_allow_ten_minutes_of_model_load(synthesized):
    c = _engine(synthesized[2])["spec"]["template"]["spec"]["container"][0]
    startup = c["startup_probe"]
    assert startup["http_get"] == {"path": "/health", "port": "http"}
    assert startup["period_seconds"] * startup["failure_threshold"] >= 600
    for probe in ("readiness_probe", "liveness_probe"):
        assert c[probe]["http_get"]["path"] == "/health"
    assert c["port"] == [{"name": "http", "container_port": 8000, "protocol": "TCP"}]


def test_engine_shm_and_model_cache(synthesized):
    spec = _engine(synthesized[2])["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mount_path"] for m in spec["container"][0]["volume_mount"]}
    assert mounts["dshm"] == "/dev/shm" and mounts["model-cache"] == "/root/.cache/huggingface"
    vols = {v["name"]: v for v in spec["volume"]}
    assert vols["dshm"]["empty_dir"]["medium"] == "Memory"
    assert "empty_dir" in vols["model-cache"]


def test_metrics_annotated_for_scraping(synthesized):
    ann = _engine(synthesized[2])["spec"]["template"]["metadata"]["annotations"]
    assert ann == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
    }


def test_pdbs_and_services(synthesized):
    from cdktn_provider_kubernetes.pod_disruption_budget_v1 import PodDisruptionBudgetV1
    from cdktn_provider_kubernetes.service_v1 import ServiceV1

    s = synthesized[2]["azure-eastus-serving"]
    assert _has(
        s,
        PodDisruptionBudgetV1.TF_RESOURCE_TYPE,
        {"metadata": {"name": "gpufleet-engine"}, "spec": {"max_unavailable": "1"}},
    )
    assert _has(
        s,
        PodDisruptionBudgetV1.TF_RESOURCE_TYPE,
        {"metadata": {"name": "gpufleet-router"}, "spec": {"min_available": "1"}},
    )
    assert _has(
        s,
        ServiceV1.TF_RESOURCE_TYPE,
        {"metadata": {"name": "gpufleet-engine-headless"}, "spec": {"cluster_ip": "None"}},
    )
    # Public: HTTPS on 443 only; in-cluster (KEDA, probes): plain HTTP on a ClusterIP Service.
    assert _has(s, ServiceV1.TF_RESOURCE_TYPE, {
        "metadata": {"name": "gpufleet-router"},
        "spec": {"type": "LoadBalancer", "port": [{"name": "https", "port": 443, "target_port": "https"}]},
    })  # fmt: skip
    assert _has(s, ServiceV1.TF_RESOURCE_TYPE, {
        "metadata": {"name": "gpufleet-router-internal"},
        "spec": {"type": "ClusterIP", "port": [{"port": 8080, "target_port": "http"}]},
    })  # fmt: skip


def test_router_replicas_command_secrets_and_tls(synthesized, example_fleet):
    for region in example_fleet.regions:
        doc = _doc(synthesized[2], f"{region.key}-serving")
        router = next(
            d
            for d in doc["resource"]["kubernetes_deployment_v1"].values()
            if d["metadata"]["name"] == "gpufleet-router"
        )
        assert int(router["spec"]["replicas"]) >= 2
        c = router["spec"]["template"]["spec"]["container"][0]
        assert c["command"] + c["args"][:2] == ["gpufleet", "router", "serve"]
        assert c["args"][c["args"].index("--region") + 1] == region.key
        # Two replicas share their reservations through the headless Service.
        assert c["args"][c["args"].index("--replicas-dns") + 1] == (
            "gpufleet-router-headless.gpufleet.svc.cluster.local:8080"
        )
        assert c["image"] == "ghcr.io/acme/gpufleet-serving:0.1.0"
        # The token reaches the router as a file from the Secret, never as a literal or an env value.
        assert "env" not in c
        mounts = {m["name"]: m["mount_path"] for m in c["volume_mount"]}
        assert mounts["admin-token"] == "/var/run/secrets/gpufleet"
        assert mounts["tls"] == "/var/run/secrets/gpufleet-tls"
        assert {p["name"]: p["container_port"] for p in c["port"]} == {"http": 8080, "https": 8443}
        vols = {v["name"]: v for v in router["spec"]["template"]["spec"]["volume"]}
        assert vols["admin-token"]["secret"]["secret_name"] == "gpufleet-router-admin"
        assert vols["tls"]["secret"]["secret_name"] == "gpufleet-router-tls"
        (cert,) = _manifests(synthesized[2], f"{region.key}-serving", "Certificate")
        assert cert["spec"]["secretName"] == "gpufleet-router-tls"
        assert cert["spec"]["dnsNames"] == [f"{region.key}.llm.example.com", "llm.example.com"]


def test_acme_issuer_solves_dns01_in_the_fleets_zone_with_the_clouds_identity(synthesized):
    (aws,) = _manifests(synthesized[2], "aws-us-west-2-serving", "ClusterIssuer")
    (solver,) = aws["spec"]["acme"]["solvers"]
    assert solver["selector"] == {"dnsZones": ["example.com"]}
    assert solver["dns01"]["route53"] == {"region": "us-east-1"}  # ambient: EKS Pod Identity
    (gcp,) = _manifests(synthesized[2], "gcp-us-central1-serving", "ClusterIssuer")
    r53 = gcp["spec"]["acme"]["solvers"][0]["dns01"]["route53"]
    assert r53["accessKeyIDSecretRef"] == {"name": "gpufleet-route53", "key": "access-key-id"}
    assert gcp["spec"]["acme"]["email"] == "platform@example.com"


def _releases(synths, stack):
    return {r["chart"]: r for r in _doc(synths, stack)["resource"]["helm_release"].values()}


def test_addons_per_cloud_are_pinned_helm_releases(synthesized):
    synths = synthesized[2]
    aws, gcp, azure = (_releases(synths, f"{k}-addons") for k in ("aws-us-east-1", "gcp-us-central1", "azure-eastus"))
    assert sorted(aws) == ["cert-manager", "cluster-autoscaler", "keda"]
    assert sorted(gcp) == ["cert-manager", "keda"]  # GKE autoscales nodes and runs the device plugin
    assert sorted(azure) == ["cert-manager", "keda", "nvidia-device-plugin"]
    for release in (*aws.values(), *gcp.values(), *azure.values()):
        assert release["version"] and release["repository"].startswith("https://")
    ca = json.loads(aws["cluster-autoscaler"]["values"][0])
    assert ca["image"]["tag"] == "v1.35.0" and ca["autoDiscovery"]["clusterName"] == "acme-llm-aws-us-east-1"
    plugin = json.loads(azure["nvidia-device-plugin"]["values"][0])
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in plugin["tolerations"]
    assert plugin["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_addon_identities(synthesized):
    synths = synthesized[2]
    aws = _doc(synths, "aws-us-east-1-addons")["resource"]
    pods = {a["service_account"]: a for a in aws["aws_eks_pod_identity_association"].values()}
    assert sorted(pods) == ["cert-manager", "cluster-autoscaler"]
    assert pods["cluster-autoscaler"]["namespace"] == "kube-system"
    policies = [json.loads(p["policy"]) for p in aws["aws_iam_role_policy"].values()]
    scoped = [s for p in policies for s in p["Statement"] if "Condition" in s]
    assert any("route53:ChangeResourceRecordSetsRecordTypes" in json.dumps(s) for s in scoped)
    assert any("k8s.io/cluster-autoscaler/acme-llm-aws-us-east-1" in json.dumps(s) for s in scoped)
    gcp = _doc(synths, "gcp-us-central1-addons")["resource"]
    (secret,) = gcp["kubernetes_secret_v1"].values()
    assert secret["metadata"] == {"name": "gpufleet-route53", "namespace": "cert-manager"}
    assert secret["data"]["secret-access-key"].startswith("${aws_iam_access_key.")


def test_fleet_configmap_points_the_router_at_the_headless_service(synthesized):
    import yaml

    doc = _doc(synthesized[2], "gcp-europe-west4-serving")
    cm = next(iter(doc["resource"]["kubernetes_config_map_v1"].values()))
    fleet = yaml.safe_load(cm["data"]["fleet.yaml"])
    ep = next(r for r in fleet["regions"] if r["region"] == "europe-west4")["endpoints"]
    assert ep == {
        "engines_dns": "gpufleet-engine-headless.gpufleet.svc.cluster.local:8000",
        "router": "https://gcp-europe-west4.llm.example.com",  # the summary carries the admin token
    }
    from gpufleet.stacks.fleetfile import parse_fleet

    parsed = parse_fleet(cm["data"]["fleet.yaml"])  # the router can load it
    assert parsed.router.admin_token_file == "/var/run/secrets/gpufleet/token"
    assert parsed.router.tls_cert_file == "/var/run/secrets/gpufleet-tls/tls.crt"


def test_secrets_come_from_terraform_references_never_values(synthesized):
    _, out, synths = synthesized
    admin = 0
    for synth in synths.values():
        doc = json.loads(synth)
        for secret in doc.get("resource", {}).get("kubernetes_secret_v1", {}).values():
            for value in secret["data"].values():
                assert value.startswith(("${random_password.", "${var.hf_token}", "${aws_iam_access_key."))
            admin += secret["metadata"]["name"] == "gpufleet-router-admin"
        for output_name, output in doc.get("output", {}).items():
            assert "random_password" not in json.dumps(output) and "secret" not in output_name
    assert admin == len(synths) // 2  # one per serving stack
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    assert any(p.name == "cdk.tf.json" for p in files)
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        assert SENTINEL not in text, p
        assert '"result"' not in text  # no literal random_password result anywhere


def test_global_traffic_one_latency_record_per_aws_region(synthesized, example_fleet):
    """aws-us-east-1 and azure-eastus share us-east-1, gcp-europe-west4 and azure-westeurope share
    eu-central-1: Route53 takes one latency record per AWS region (modules/dns.py)."""
    from cdktn_provider_aws.route53_health_check import Route53HealthCheck
    from cdktn_provider_aws.route53_record import Route53Record

    synth = synthesized[2]["global-traffic"]
    res = json.loads(synth)["resource"]
    checks = list(res[Route53HealthCheck.TF_RESOURCE_TYPE].values())
    latency = [r for r in res[Route53Record.TF_RESOURCE_TYPE].values() if "latency_routing_policy" in r]
    by_id = {r["set_identifier"]: r["latency_routing_policy"]["region"] for r in latency}
    assert by_id == {
        "aws-us-west-2": "us-west-2",
        "gcp-us-central1": "us-east-2",
        "us-east-1": "us-east-1",
        "eu-central-1": "eu-central-1",
    }
    assert {r["name"] for r in latency} == {"llm.example.com"}
    regional = [c for c in checks if c["type"] == "HTTPS"]
    assert len(regional) == len(example_fleet.regions) and len(checks) == len(regional) + 2
    for c in regional:
        assert (c["port"], c["resource_path"]) == (443, "/ready")
        assert c["lifecycle"] == {"ignore_changes": ["invert_healthcheck"]}
    # AWS load balancers answer with a hostname (CNAME), GCP and Azure with an IP (A record).
    own = {r["name"]: r["type"] for r in res[Route53Record.TF_RESOURCE_TYPE].values() if "set_identifier" not in r}
    assert own["aws-us-east-1.llm.example.com"] == "CNAME" and own["gcp-us-central1.llm.example.com"] == "A"


def test_serving_stacks_depend_on_their_cluster_stacks(synthesized, example_fleet):
    _, out, _ = synthesized
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    stacks = manifest["stacks"]
    for r in example_fleet.regions:
        assert sorted(stacks[f"{r.key}-serving"]["dependencies"]) == [f"{r.key}-addons", f"{r.key}-cluster"]
        assert stacks[f"{r.key}-addons"]["dependencies"] == [f"{r.key}-cluster"]
    assert sorted(stacks["global-traffic"]["dependencies"]) == sorted(
        f"{r.key}-serving" for r in example_fleet.regions
    )


def test_kubernetes_provider_auth_per_cloud(synthesized):
    synths = synthesized[2]
    aws = _doc(synths, "aws-us-east-1-serving")
    k = aws["provider"]["kubernetes"][0]
    assert k["token"] == "${data.aws_eks_cluster_auth.eks-auth.token}"
    assert "terraform_remote_state" in k["host"]  # the cluster stack's output
    gcp = _doc(synths, "gcp-us-central1-serving")["provider"]["kubernetes"][0]
    assert gcp["token"] == "${data.google_client_config.client-config.access_token}" and gcp[
        "host"
    ].startswith("https://")
    az = _doc(synths, "azure-eastus-serving")
    assert "azurerm_kubernetes_cluster" in az["data"]
    assert az["provider"]["kubernetes"][0]["exec"][0]["command"] == "kubelogin"


def test_standalone_serving_constructs_without_dns(example_fleet):
    """The constructs on their own, with stand-in cluster outputs; no dns settings -> no global stack."""
    from dataclasses import dataclass

    from cdktn import TerraformStack, Testing
    from gpufleet.modules.cluster import ClusterOutputs
    from gpufleet.stacks.serving_stacks import add_serving_stacks

    @dataclass
    class Props:
        kubernetes_version: str = "1.35"

    @dataclass
    class Handle:
        stack: object
        region: object
        outputs: ClusterOutputs
        props: Props

    fleet = example_fleet.model_copy(
        update={"settings": example_fleet.settings.model_copy(update={"dns": None})}
    )
    app = Testing.app()
    region = fleet.regions[0]
    outs = ClusterOutputs(
        cloud="aws",
        cluster_name="c",
        endpoint="https://k",
        cluster_ca_certificate="Q0E=",
        system_pool_name="sys",
        gpu_pool_names=("gpu",),
        region="us-east-1",
    )
    result = add_serving_stacks(
        app,
        fleet,
        {region.key: Handle(TerraformStack(app, "x"), region, outs, Props())},
        image="registry.example/gpufleet-serving:1",
    )
    assert result.global_traffic is None
    synth = Testing.synth(result.regions[region.key].stack)
    assert Testing.to_have_provider_with_properties(synth, "kubernetes", {"host": "https://k"})
    assert '"registry.example/gpufleet-serving:1"' in synth
    # Without public names: no certificate, and the router's balancer stays inside the network.
    assert "cert-manager.io" not in synth
    assert Testing.to_have_resource_with_properties(synth, "kubernetes_service_v1", {
        "metadata": {"name": "gpufleet-router",
                     "annotations": {"service.beta.kubernetes.io/aws-load-balancer-internal": "true"}},
        "spec": {"port": [{"port": 80, "target_port": "http"}]},
    })  # fmt: skip


def test_router_needs_two_replicas(example_fleet):
    from cdktn import TerraformStack, Testing
    from gpufleet.modules.k8s_router import K8sRouter, K8sRouterProps

    stack = TerraformStack(Testing.app(), "r")
    with pytest.raises(ValueError, match="at least 2 replicas"):
        K8sRouter(
            stack,
            "router",
            props=K8sRouterProps(
                fleet=example_fleet, region=example_fleet.regions[0], image="ghcr.io/a/b:1", replicas=1
            ),
        )
