"""gpufleet.stacks.plancheck: the GPU policy pack over synthesized stacks and `show -json` plans.

inputs (cdktf.out or plans -> resource changes) -> policies (+ checkov) -> waivers -> report.
"""

__version__ = "0.1.0"
