from __future__ import annotations

import pytest
from gpufleet.serving.router.config import ConfigError, build_config, read_admin_token
from gpufleet.stacks.spec import RouterSettings

TOKEN = "config-test-token-0123456789"


def test_token_from_env_or_file(tmp_path):
    s = RouterSettings()
    assert read_admin_token(s, {"GPUFLEET_ADMIN_TOKEN": TOKEN}) == TOKEN
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    assert read_admin_token(RouterSettings(admin_token_file=str(f)), {}) == TOKEN


def test_no_default_token(tmp_path):
    with pytest.raises(ConfigError, match="no admin token"):
        read_admin_token(RouterSettings(), {})
    with pytest.raises(ConfigError, match="cannot read"):
        read_admin_token(RouterSettings(admin_token_file=str(tmp_path / "missing")), {})
    with pytest.raises(ConfigError, match="shorter"):
        read_admin_token(RouterSettings(), {"GPUFLEET_ADMIN_TOKEN": "short"})


def test_build_config_needs_engines_and_known_region(example_fleet):
    with pytest.raises(ConfigError, match="no region"):
        build_config(example_fleet, "nowhere", {"GPUFLEET_ADMIN_TOKEN": TOKEN})
    with pytest.raises(ConfigError, match="lists no engines"):
        build_config(example_fleet, "aws-us-east-1", {"GPUFLEET_ADMIN_TOKEN": TOKEN})


def test_build_config(example_fleet):
    regions = [
        r.model_copy(
            update={"endpoints": r.endpoints.model_copy(update={"engines": ["http://10.0.0.1:8000/"]})}
        )
        for r in example_fleet.regions
    ]
    fleet = example_fleet.model_copy(update={"regions": regions})
    cfg = build_config(fleet, "aws-us-west-2", {"GPUFLEET_ADMIN_TOKEN": TOKEN})
    assert cfg.region.engines == ("http://10.0.0.1:8000",)
    assert cfg.region.tier == "spot" and cfg.region.residency == "us"
    assert cfg.models == {"llama-3.1-8b": 32768}
    assert cfg.peers == []  # no peer lists a router URL
