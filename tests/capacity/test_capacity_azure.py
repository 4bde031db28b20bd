"""Azure adapter: the real azure-mgmt-compute client against a loopback ARM server in the API's shapes."""

from __future__ import annotations

import capfakes
from gpufleet.stacks.capacity.azure import AzureAdapter
from gpufleet.stacks.capacity.scan import ScanOptions, scan


def _scan(fake, regions, gpus=("H100-80GB",), **kw):
    opts = ScanOptions(
        gpus=list(gpus),
        clouds=["azure"],
        regions=regions,
        call_timeout_s=5,
        attempts=3,
        backoff_base_s=0.01,
        azure_subscription=fake.world.subscription,
        endpoints={"azure": fake.url},
        **kw,
    )
    return scan(opts, None, [AzureAdapter(opts)])


def test_skus_paged_restrictions_and_family_quota(clean_env, azure_fake):
    w = azure_fake.world
    w.regions["eastus"]["skus"][1] = capfakes.AzureSku("Standard_ND96isr_H100_v5", restricted_zones=["3"])
    w.regions["eastus"]["usages"]["standardNDSH100v5Family"] = (96, 384)  # 288 free = 3 nodes of 96 vCPUs
    res = _scan(azure_fake, ["eastus"])
    assert res.clouds["azure"].status == "ok"
    row = res.rows[0]
    assert row.instance_type == "Standard_ND96isr_H100_v5" and row.zones == ["1", "2"]
    q = row.quota["on-demand"]
    assert (q.name, q.unit, q.limit, q.used, q.free_gpus) == ("standardNDSH100v5Family", "vcpu", 384, 96, 24)
    assert row.quota["spot"].name == "lowPriorityCores" and row.obtainable("spot") == 8
    assert any("restricted" in n for n in row.notes)


def test_regional_cores_cap_the_family(clean_env, azure_fake):
    azure_fake.world.regions["westeurope"]["usages"]["cores"] = (900, 1000)  # 100 free: one 96-vCPU node
    row = _scan(azure_fake, ["westeurope"]).rows[0]
    assert row.quota["on-demand"].free_gpus == 8


def test_size_closed_to_the_subscription(clean_env, azure_fake):
    azure_fake.world.regions["swedencentral"]["skus"][1] = capfakes.AzureSku(
        "Standard_ND96isr_H100_v5", closed=True
    )
    row = _scan(azure_fake, ["swedencentral"]).rows[0]
    assert not row.offered and row.obtainable() == 0
    assert any("NotAvailableForSubscription" in n for n in row.notes)


def test_access_denied(clean_env, azure_fake):
    azure_fake.server.fault = lambda r: capfakes.azure_error(
        403, "AuthorizationFailed", "does not have authorization"
    )
    err = _scan(azure_fake, ["eastus", "westeurope"]).clouds["azure"]
    assert err.status == "error" and err.error["kind"] == "access-denied" and "Reader" in err.error["message"]


def test_no_subscription(clean_env, azure_fake):
    opts = ScanOptions(
        gpus=["H100-80GB"], clouds=["azure"], regions=["eastus"], endpoints={"azure": azure_fake.url}
    )
    res = scan(opts, None, [AzureAdapter(opts)])
    assert res.clouds["azure"].error["kind"] == "no-credentials"
    assert "AZURE_SUBSCRIPTION_ID" in res.clouds["azure"].error["message"]
