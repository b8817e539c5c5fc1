"""lsm-spectral: an lsm-registry plugin with a model-free saliency and SaliencyMix.

The components are reached through the registry (``lsm list-components``), not by
importing this package: lsm-registry finds it through its entry point.
"""

__version__ = "0.1.0"
