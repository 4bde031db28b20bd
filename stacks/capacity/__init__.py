"""gpufleet.stacks.capacity."""
