"""GCP adapter: the real google-cloud-compute REST clients against a loopback server in the API's shapes."""

from __future__ import annotations

import capfakes
from gpufleet.stacks.capacity.gcp import GcpAdapter
from gpufleet.stacks.capacity.scan import ScanOptions, scan


def _scan(fake, regions=None, gpus=("H100-80GB",), **kw):
    opts = ScanOptions(
        gpus=list(gpus),
        clouds=["gcp"],
        regions=regions,
        call_timeout_s=5,
        attempts=3,
        backoff_base_s=0.01,
        gcp_project=fake.world.project,
        endpoints={"gcp": fake.url},
        **kw,
    )
    return scan(opts, None, [GcpAdapter(opts)])


def test_aggregated_lists_paged_and_region_quotas(clean_env, gcp_fake):
    gcp_fake.world.regions["us-central1"]["quotas"]["NVIDIA_H100_GPUS"] = (16, 8)
    res = _scan(gcp_fake)  # regions.list, paged 3 per page
    assert res.clouds["gcp"].status == "ok" and res.clouds["gcp"].regions_scanned == 3
    rows = {r.region: r for r in res.rows}
    central = rows["us-central1"]
    # a-zones and b-zones offer the accelerator and the machine types; c-zones come back as `warning` scopes
    assert central.zones == ["us-central1-a", "us-central1-b"]
    assert {o.name for o in central.offers} == {"a3-highgpu-1g", "a3-highgpu-8g"}
    assert central.instance_type == "a3-highgpu-1g"  # the cheapest priced per GPU in the catalog
    od = central.quota["on-demand"]
    assert (od.name, od.unit, od.limit, od.used, od.free_gpus) == ("NVIDIA_H100_GPUS", "gpu", 16, 8, 8)
    assert central.quota["spot"].name == "PREEMPTIBLE_NVIDIA_H100_GPUS"
    assert res.clouds["gcp"].global_free_gpus == 64
    # several aggregated pages were fetched (9 zones, 3 scopes a page, two lists)
    assert gcp_fake.server.calls >= 1 + 3 + 3 + 3 + 1


def test_global_gpu_quota_caps_each_region(clean_env, gcp_fake):
    gcp_fake.world.global_quota = (12, 2)
    res = _scan(gcp_fake, regions=["us-central1"])
    assert res.clouds["gcp"].global_free_gpus == 10
    assert res.rows[0].obtainable() == 10
    assert any("GPUS_ALL_REGIONS" in n for n in res.rows[0].notes)


def test_gpu_not_sold_in_a_zone_is_not_offered(clean_env, gcp_fake):
    res = _scan(gcp_fake, regions=["europe-west4"], gpus=("A100-80GB",))
    assert not res.rows[0].offered and res.rows[0].obtainable() == 0


def test_api_not_enabled(clean_env, gcp_fake):
    gcp_fake.server.fault = lambda r: capfakes.gcp_error(
        403,
        "Compute Engine API has not been used in project demo-project before or it is disabled.",
        "accessNotConfigured",
    )
    res = _scan(gcp_fake)
    err = res.clouds["gcp"].error
    assert (
        err["kind"] == "api-not-enabled" and "gcloud services enable compute.googleapis.com" in err["message"]
    )


def test_throttled_then_answers(clean_env, gcp_fake):
    gcp_fake.server.fault = capfakes.first_n(
        2, lambda r: capfakes.gcp_error(429, "Rate Limit Exceeded", "rateLimitExceeded", "RESOURCE_EXHAUSTED")
    )
    res = _scan(gcp_fake, regions=["us-central1"])
    assert res.clouds["gcp"].status == "ok" and res.retries >= 2
    assert res.rows[0].obtainable() == 16


def test_no_project(clean_env, gcp_fake):
    opts = ScanOptions(gpus=["H100-80GB"], clouds=["gcp"], endpoints={"gcp": gcp_fake.url})
    res = scan(opts, None, [GcpAdapter(opts)])
    assert "--gcp-project" in res.clouds["gcp"].error["message"]
