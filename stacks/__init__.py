"""gpufleet.stacks."""
