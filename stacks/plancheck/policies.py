"""The GPU policy pack: what a GPU fleet's infrastructure must look like before it is applied.

Each policy has an id, a severity, a rationale (why it exists; docs/plan-check.md prints it) and a
fix (how to make the finding go away; where the attributes differ per cloud, a finding carries the fix
for its own cloud). `evaluate` runs every policy over the normalised resource changes and returns
findings; waivers and checkov findings are merged later (`run.py`).

Policies that need context skip themselves when it is missing: the budget and tag policies need the
fleet file (`--fleet`), the quota policy a capacity snapshot (`--capacity`), the add-on policies the
region's add-ons stack. The run's report lists what was skipped, so a clean result never hides an
unchecked policy.

The policies live in one module per theme and register themselves on import:

* `policy_pools`      GPU001 .. GPU005, GPU011  the GPU pools (taint, scale to zero, zones, quota, offer,
                                                destructive changes)
* `policy_cluster`    GPU006 .. GPU009          budget, tags, API endpoint, encryption
* `policy_workloads`  GPU010, GPU015, GPU017, GPU018  probes, placement, image registry, model-hub token
* `policy_addons`     GPU013, GPU014            device plugin / driver, node autoscaler
* `policy_dns`        GPU016                    Route53 latency records
* `policy_lifecycle`  GPU012, GPU019            Kubernetes support windows, KMS key ring names
"""

from __future__ import annotations

from gpufleet.stacks.plancheck import (  # noqa: F401  (imported to register their policies)
    policy_addons,
    policy_cluster,
    policy_dns,
    policy_lifecycle,
    policy_pools,
    policy_workloads,
)
from gpufleet.stacks.plancheck.policy_base import (
    POLICIES,
    SEVERITIES,
    Context,
    Finding,
    Policy,
    PolicyCheck,
    evaluate,
    policy,
    severity_rank,
    skipped,
)

# registration follows import order; reports list the policies by id
_ordered = dict(sorted(POLICIES.items()))
POLICIES.clear()
POLICIES.update(_ordered)

__all__ = [
    "POLICIES",
    "SEVERITIES",
    "Context",
    "Finding",
    "Policy",
    "PolicyCheck",
    "evaluate",
    "policy",
    "severity_rank",
    "skipped",
]
