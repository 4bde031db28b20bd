# Type-checking marker only: `gpufleet` is a namespace package at run time. Without this file mypy
# cannot verify stacks/catalog.py along its path and picks the data folder stacks/catalog/ instead
# (an empty namespace package), so every `catalog.X` would be reported as missing.
