"""gpufleet.serving."""
