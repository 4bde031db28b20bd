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

    names = [f"{r.key}-serving" for r in example_fleet.regions] + ["global-traffic"]
    synths = {n: Testing.synth(app.node.find_child(n)) for n in names}
    mp.undo()
    return app, out, synths


def _doc(synths, name):
    return json.loads(synths[name])


def _has(synth: str, resource_type: str, props: dict) -> bool:
    from cdktn import Testing

    return Testing.to_have_resource_with_properties(synth, resource_type, props)


def test_engine_deployment_gpu_limit_toleration_and_replicas(synthesized, example_fleet):
    from cdktn_provider_kubernetes.deployment_v1 import DeploymentV1

    _, _, synths = synthesized
    s = synths["aws-us-east-1-serving"]
    # p5.48xlarge: 8 GPUs x max 2 nodes / tensor parallel 1 = 16 engines.
    assert _has(s, DeploymentV1.TF_RESOURCE_TYPE, {
        "metadata": {"name": "gpufleet-engine"},
        "spec": {"replicas": "16", "template": {"spec": {
            "toleration": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "container": [{"resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        }}},
        "wait_for_rollout": False,
    })  # fmt: skip
    # The matcher is partial but not lax: a wrong value fails.
    assert not _has(
        s,
        DeploymentV1.TF_RESOURCE_TYPE,
        {"metadata": {"name": "gpufleet-engine"}, "spec": {"replicas": "17"}},
    )
    # L40S g6e.xlarge: 1 GPU x 8 nodes.
    assert _has(
        synths["aws-us-west-2-serving"],
        DeploymentV1.TF_RESOURCE_TYPE,
        {"metadata": {"name": "gpufleet-engine"}, "spec": {"replicas": "8"}},
    )


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
    assert _has(
        s,
        ServiceV1.TF_RESOURCE_TYPE,
        {"metadata": {"name": "gpufleet-router"}, "spec": {"type": "LoadBalancer"}},
    )


def test_router_replicas_command_and_secret_reference(synthesized, example_fleet):
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
        # The token reaches the router as a file from the Secret, never as a literal or an env value.
        assert "env" not in c
        mounts = {m["name"]: m["mount_path"] for m in c["volume_mount"]}
        assert mounts["admin-token"] == "/var/run/secrets/gpufleet"
        vols = {v["name"]: v for v in router["spec"]["template"]["spec"]["volume"]}
        assert vols["admin-token"]["secret"]["secret_name"] == "gpufleet-router-admin"


def test_fleet_configmap_points_the_router_at_the_headless_service(synthesized):
    import yaml

    doc = _doc(synthesized[2], "gcp-europe-west4-serving")
    cm = next(iter(doc["resource"]["kubernetes_config_map_v1"].values()))
    fleet = yaml.safe_load(cm["data"]["fleet.yaml"])
    ep = next(r for r in fleet["regions"] if r["region"] == "europe-west4")["endpoints"]
    assert ep == {
        "engines_dns": "gpufleet-engine-headless.gpufleet.svc.cluster.local:8000",
        "router": "http://gcp-europe-west4.llm.example.com",
    }
    from gpufleet.stacks.fleetfile import parse_fleet

    parsed = parse_fleet(cm["data"]["fleet.yaml"])  # the router can load it
    assert parsed.router.admin_token_file == "/var/run/secrets/gpufleet/token"


def test_admin_secret_is_generated_in_terraform_and_never_written(synthesized):
    _, out, synths = synthesized
    secrets = 0
    for synth in synths.values():
        doc = json.loads(synth)
        for secret in doc.get("resource", {}).get("kubernetes_secret_v1", {}).values():
            assert secret["data"]["token"].startswith("${random_password.")  # a reference, not a value
            secrets += 1
        for output_name, output in doc.get("output", {}).items():
            assert "random_password" not in json.dumps(output) and "secret" not in output_name
    assert secrets == len(synths) - 1  # one per serving stack, none in global-traffic
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    assert any(p.name == "cdk.tf.json" for p in files)
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        assert SENTINEL not in text, p
        assert '"result"' not in text  # no literal random_password result anywhere


def test_global_traffic_one_health_check_and_one_latency_record_per_region(synthesized, example_fleet):
    from cdktn_provider_aws.route53_health_check import Route53HealthCheck
    from cdktn_provider_aws.route53_record import Route53Record

    synth = synthesized[2]["global-traffic"]
    res = json.loads(synth)["resource"]
    checks = list(res[Route53HealthCheck.TF_RESOURCE_TYPE].values())
    latency = [r for r in res[Route53Record.TF_RESOURCE_TYPE].values() if "latency_routing_policy" in r]
    keys = sorted(r.key for r in example_fleet.regions)
    assert len(checks) == len(latency) == len(keys)
    assert sorted(r["set_identifier"] for r in latency) == keys
    assert {r["name"] for r in latency} == {"llm.example.com"}
    for r in latency:
        assert r["health_check_id"].startswith("${aws_route53_health_check.")
    # GCP and Azure regions stand under their nearest AWS region.
    by_key = {r["set_identifier"]: r["latency_routing_policy"]["region"] for r in latency}
    assert by_key["aws-us-west-2"] == "us-west-2" and by_key["gcp-europe-west4"] == "eu-central-1"
    assert by_key["azure-eastus"] == "us-east-1"
    assert _has(
        synth,
        Route53HealthCheck.TF_RESOURCE_TYPE,
        {"type": "HTTP", "resource_path": "/health", "lifecycle": {"ignore_changes": ["invert_healthcheck"]}},
    )
    # AWS load balancers answer with a hostname (CNAME), GCP and Azure with an IP (A record).
    regional = {
        r["name"]: r["type"]
        for r in res[Route53Record.TF_RESOURCE_TYPE].values()
        if "set_identifier" not in r
    }
    assert (
        regional["aws-us-east-1.llm.example.com"] == "CNAME"
        and regional["gcp-us-central1.llm.example.com"] == "A"
    )


def test_serving_stacks_depend_on_their_cluster_stacks(synthesized, example_fleet):
    _, out, _ = synthesized
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    stacks = manifest["stacks"]
    for r in example_fleet.regions:
        assert f"{r.key}-cluster" in stacks[f"{r.key}-serving"]["dependencies"]
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
    class Handle:
        stack: object
        region: object
        outputs: ClusterOutputs

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
        {region.key: Handle(TerraformStack(app, "x"), region, outs)},
        image="registry.example/gpufleet-serving:1",
    )
    assert result.global_traffic is None
    synth = Testing.synth(result.regions[region.key].stack)
    assert Testing.to_have_provider_with_properties(synth, "kubernetes", {"host": "https://k"})
    assert '"registry.example/gpufleet-serving:1"' in synth


def test_router_needs_two_replicas(example_fleet):
    from cdktn import TerraformStack, Testing
    from gpufleet.modules.k8s_router import K8sRouter, K8sRouterProps

    stack = TerraformStack(Testing.app(), "r")
    with pytest.raises(ValueError, match="at least 2 replicas"):
        K8sRouter(
            stack,
            "router",
            props=K8sRouterProps(fleet=example_fleet, region=example_fleet.regions[0], replicas=1),
        )
