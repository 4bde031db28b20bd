"""The routing policies, one per module, all with `policy.Policy`'s interface; `POLICIES` names them.

`default` is the policy the router ships (`DEFAULT_POLICY`). Each baseline's docstring names the
router it models and the source it follows.
"""

from __future__ import annotations

from gpufleet.serving.router import policy as _policy  # noqa: F401  (the shared interface loads first)
from gpufleet.serving.router.policies.headroom import HeadroomPolicy
from gpufleet.serving.router.policies.instance_aware import InstanceAwarePolicy
from gpufleet.serving.router.policies.kv_cost import KvCostPolicy
from gpufleet.serving.router.policies.least_outstanding import LeastOutstandingPolicy
from gpufleet.serving.router.policies.llm_d import LlmdPolicy
from gpufleet.serving.router.policies.power_of_two import PowerOfTwoPolicy
from gpufleet.serving.router.policies.predictive import PredictivePolicy
from gpufleet.serving.router.policies.prefix_affinity import PrefixAffinityPolicy
from gpufleet.serving.router.policies.round_robin import RoundRobinPolicy

DEFAULT_POLICY = "predictive"

POLICIES = {
    "predictive": PredictivePolicy,
    "headroom": HeadroomPolicy,
    "round-robin": RoundRobinPolicy,
    "least-outstanding": LeastOutstandingPolicy,
    "power-of-two": PowerOfTwoPolicy,
    "prefix-affinity": PrefixAffinityPolicy,
    "llm-d": LlmdPolicy,
    "instance-aware": InstanceAwarePolicy,
    "kv-cost": KvCostPolicy,
}
POLICIES["default"] = POLICIES[DEFAULT_POLICY]

BASELINES = ("round-robin", "least-outstanding", "power-of-two", "prefix-affinity", "llm-d",
             "instance-aware", "kv-cost")  # fmt: skip
