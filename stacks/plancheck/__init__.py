"""gpufleet.stacks.plancheck."""
