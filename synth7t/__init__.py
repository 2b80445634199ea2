"""synth7t: synthesise 7T-equivalent structural brain MRI from lower-field scans.

This package holds the science and is importable without Nipype: image I/O and header
hygiene, field-strength routing, the field-physics simulator, networks, the model registry
with its shipped weights, inference, training, metrics and the bundled reference data.
"""
import os

__version__ = "0.1.0"

# Nipype phones home at import time unless told not to; nothing here may touch the network.
os.environ.setdefault("NIPYPE_NO_ET", "1")
