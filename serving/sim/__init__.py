"""gpufleet.serving.sim."""
