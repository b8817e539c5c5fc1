"""The built-in plugin: registers lsm_registry's own components through the public hook."""

from __future__ import annotations

import importlib

from ..hookspecs import hookimpl

#: Modules of built-in components; each defines ``COMPONENTS``, a list of classes.
MODULES = (
    "samplers",
    "saliency",
    "cached_saliency",
    "patches",
    "mixers",
    "fusers",
    "losses",
    "models",
    "bbn",
    "ride",
    "contrastive",
    "sbcl",
    "datasets",
    "loggers",
    "optimizers",
    "cc_sam",
    "callbacks",
    "prototypes",
)


@hookimpl
def lsm_registry_components() -> list[type]:
    classes: list[type] = []
    for module in MODULES:
        classes.extend(importlib.import_module(f"{__package__}.{module}").COMPONENTS)
    return classes
