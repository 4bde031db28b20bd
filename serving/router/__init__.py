"""gpufleet.serving.router."""
