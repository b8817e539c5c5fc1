"""The plugin module named by the entry point ``spectral = "lsm_spectral.plugin"``."""

from __future__ import annotations

from lsm_registry import hookimpl

from .mixer import SaliencyMix
from .saliency import SpectralResidual


@hookimpl
def lsm_registry_components() -> list[type]:
    return [SpectralResidual, SaliencyMix]
