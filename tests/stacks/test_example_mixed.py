"""The second example fleet (examples/fleet-mixed.yaml): a 70B model at tensor parallel 4, Azure spot,
two fleet regions in one Route53 latency region and a GCP region. It synthesizes, passes plan-check
with the whole pack (no GPU waiver), and its serving objects are valid Kubernetes for the fleet's
version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from gpufleet.cli.app import app
from gpufleet.stacks.plancheck import checkov
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MIXED = ROOT / "examples" / "fleet-mixed.yaml"


@pytest.fixture(scope="module")
def fleet():
    from gpufleet.stacks.fleetfile import load_fleet

    return load_fleet(MIXED)


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "cdktf.out"
    res = CliRunner().invoke(app, ["synth", str(MIXED), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    return out


def _doc(out: Path, stack: str) -> dict:
    return json.loads((out / "stacks" / stack / "cdk.tf.json").read_text())


def test_the_mix_the_example_promises(fleet):
    (model,) = fleet.models
    assert model.shape.params_b > 70 and model.tensor_parallel_size == 4 and model.shape.gated
    tiers = {r.key: r.capacity.tier.value for r in fleet.regions}
    assert tiers["azure-eastus"] == "spot" and any(r.cloud.value == "gcp" for r in fleet.regions)
    from gpufleet.stacks.serving_stacks import aws_latency_region

    latency = [aws_latency_region(r.cloud.value, r.region) for r in fleet.regions]
    assert latency.count("us-east-1") == 2  # aws-us-east-1 and azure-eastus


def test_synthesizes_with_two_engines_a_p5_node_and_spot_tolerations(synthesized):
    def scaled(stack):
        res = _doc(synthesized, stack)["resource"]["kubernetes_manifest"]
        (so,) = [r["manifest"] for r in res.values() if r["manifest"]["kind"] == "ScaledObject"]
        return so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]

    assert scaled("aws-us-east-1-serving") == (0, 4)  # 2 x p5.48xlarge, 8 GPUs / tp 4
    assert scaled("azure-eastus-serving") == (0, 4)  # 4 x NC96ads_A100_v4, 4 GPUs / tp 4
    deps = _doc(synthesized, "azure-eastus-serving")["resource"]["kubernetes_deployment_v1"]
    engine = next(d for d in deps.values() if d["metadata"]["name"] == "gpufleet-engine")
    tolerations = engine["spec"]["template"]["spec"]["toleration"]
    assert {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal", "value": "spot",
            "effect": "NoSchedule"} in tolerations  # fmt: skip
    assert engine["spec"]["template"]["spec"]["container"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    traffic = _doc(synthesized, "global-traffic")["resource"]["aws_route53_record"]
    latency = [r["latency_routing_policy"]["region"] for r in traffic.values() if "latency_routing_policy" in r]
    assert sorted(latency) == ["us-east-1", "us-east-2"]  # one record per AWS region


def test_passes_plan_check_with_the_whole_pack(synthesized, tmp_path):
    args = ["plan-check", str(synthesized), "--fleet", str(MIXED), "--waivers", str(ROOT / "waivers.yaml")]
    if checkov.find_checkov(ROOT) is None:
        args.append("--skip-checkov")
    report = tmp_path / "report.json"
    res = CliRunner().invoke(app, [*args, "--format", "json", "--output", str(report)])
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    assert {v["policy"] for v in doc["violations"]} <= {"GPU006"}  # low: no catalog price for two pools
    assert not [w for w in doc["waived"] if w["policy"].startswith("GPU") and w["policy"] != "GPU009"]


def test_serving_objects_are_valid_kubernetes_for_the_fleets_version(fleet, tmp_path):
    import kubernetes_validate

    res = CliRunner().invoke(app, ["manifests", str(MIXED), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    version = f"{fleet.kubernetes_version}.0"
    checked = 0
    for f in sorted(tmp_path.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if "." in doc["apiVersion"].split("/")[0]:
                continue  # KEDA and cert-manager kinds: their schemas ship with their CRDs
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
    assert checked == 3 * 11
