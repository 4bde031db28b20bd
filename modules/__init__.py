"""gpufleet.modules."""
