"""Fixtures for the capacity tests: the loopback clouds and an environment without real credentials."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import capfakes  # noqa: E402

AWS_REGIONS = ["us-east-1", "us-west-2", "eu-west-1"]
GCP_REGIONS = ["us-central1", "europe-west4", "asia-southeast1"]
AZURE_REGIONS = ["eastus", "westeurope", "swedencentral"]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No real credentials or config files can leak in; every SDK points at nothing by default."""
    for var in (
        "AWS_PROFILE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GOOGLE_CLOUD_PROJECT",
        "CLOUDSDK_CORE_PROJECT",
        "AZURE_SUBSCRIPTION_ID",
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_SECRET",
        "GPUFLEET_GCP_ENDPOINT",
        "GPUFLEET_AZURE_ENDPOINT",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def aws_fake():
    fake = capfakes.AwsFake(spot_scores={"us-east-1": 9, "us-west-2": 6}).start()
    yield fake
    fake.stop()


@pytest.fixture
def aws_env(clean_env, aws_fake, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_fake.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    aws_fake.proxy.fault = None
    return aws_fake


@pytest.fixture
def gcp_fake():
    fake = capfakes.GcpFake(capfakes.gcp_world(GCP_REGIONS)).start()
    yield fake
    fake.stop()


@pytest.fixture
def azure_fake():
    fake = capfakes.AzureFake(capfakes.azure_world(AZURE_REGIONS)).start()
    yield fake
    fake.stop()


@pytest.fixture
def all_env(aws_env, gcp_fake, azure_fake, monkeypatch):
    monkeypatch.setenv("GPUFLEET_GCP_ENDPOINT", gcp_fake.url)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", gcp_fake.world.project)
    monkeypatch.setenv("GPUFLEET_AZURE_ENDPOINT", azure_fake.url)
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", azure_fake.world.subscription)
    return aws_env, gcp_fake, azure_fake
