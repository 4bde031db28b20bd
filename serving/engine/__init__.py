"""gpufleet.serving.engine."""
