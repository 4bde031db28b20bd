"""Which stacks make up one fleet region: `<key>-cluster`, `<key>-addons` and `<key>-serving`.

A region's cluster (node pools), its add-ons (Helm releases: device plugin, node autoscaler) and its
workloads live in different stacks; policies that relate them (GPU013 .. GPU015, GPU018) look at the
region as a whole. The key is read from the stack name, which for plans is the file name
(`aws-us-east-1-cluster.json`, also `aws-us-east-1-cluster.create.json`). A stack whose name has no
role suffix is a region of its own holding every role (a hand-written single-stack fleet).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gpufleet.stacks.plancheck.inputs import Inputs, ResourceChange

ROLES = ("cluster", "addons", "serving")
_NAME = re.compile(r"^(?P<key>.+?)-(?P<role>cluster|addons|serving)(?:\..*)?$")
_CHART_VERSION = re.compile(r"-v?\d+(\.\d+)*([-+].*)?$")


def split_stack(name: str) -> tuple[str, str | None]:
    """(region key, role) of a stack name; role None for a stack that is not named by role."""
    m = _NAME.match(name)
    return (m["key"], m["role"]) if m else (name, None)


def live(rc: ResourceChange) -> bool:
    """A managed resource that exists after the change."""
    return rc.mode == "managed" and not rc.is_delete and rc.actions != ("forget",)


def chart_name(chart: object) -> str | None:
    """`cluster-autoscaler`, `autoscaler/cluster-autoscaler`, `oci://ghcr.io/x/karpenter` or
    `https://.../gpu-operator-v24.9.0.tgz` -> the chart's own name."""
    if not isinstance(chart, str) or not chart or "${" in chart:
        return None
    name = chart.rstrip("/").rsplit("/", 1)[-1]
    if name.endswith(".tgz"):
        name = _CHART_VERSION.sub("", name[: -len(".tgz")])
    return name.lower()


@dataclass
class RegionStacks:
    key: str
    stacks: dict[str, str | None] = field(default_factory=dict)  # stack name -> role
    changes: list[ResourceChange] = field(default_factory=list)  # live managed resources, all stacks

    @property
    def cloud(self) -> str | None:
        head = self.key.split("-", 1)[0]
        return head if head in ("aws", "gcp", "azure") else None

    def has(self, role: str) -> bool:
        """A stack of this role (or a stack holding every role) was given."""
        return any(r in (role, None) for r in self.stacks.values())

    def of(self, *roles: str) -> list[ResourceChange]:
        """Live resources of the stacks of these roles (stacks without a role count for every role)."""
        return [rc for rc in self.changes if self.stacks[rc.stack] in (*roles, None)]

    def charts(self) -> set[str]:
        """The Helm charts the region installs (helm_release `chart`, normalised)."""
        out = set()
        for rc in self.changes:
            if rc.type == "helm_release":
                name = chart_name(rc.values.get("chart"))
                if name:
                    out.add(name)
        return out

    def stack_names(self, *roles: str) -> list[str]:
        return sorted(s for s, r in self.stacks.items() if not roles or r in (*roles, None))


class Regions:
    """The inputs' stacks grouped by region key."""

    def __init__(self, inputs: Inputs):
        self.by_key: dict[str, RegionStacks] = {}
        self._key_of: dict[str, str] = {}
        for stack in inputs.stacks:
            key, role = split_stack(stack)
            self.by_key.setdefault(key, RegionStacks(key)).stacks[stack] = role
            self._key_of[stack] = key
        for rc in inputs.changes:
            if live(rc) and rc.stack in self._key_of:
                self.by_key[self._key_of[rc.stack]].changes.append(rc)

    def of_stack(self, stack: str) -> RegionStacks | None:
        key = self._key_of.get(stack)
        return self.by_key.get(key) if key else None

    def __iter__(self):
        return iter(self.by_key[k] for k in sorted(self.by_key))
