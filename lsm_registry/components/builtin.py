"""The built-in plugin: registers lsm_registry's own components through the public hook."""

from __future__ import annotations

import importlib

from ..hookspecs import hookimpl

#: Modules of built-in components; each defines ``COMPONENTS``, a list of classes.
MODULES = (
    "samplers",
    "saliency",
    "patches",
    "mixers",
    "fusers",
    "baseline_mixers",
    "baseline_fusers",
    "losses",
    "models",
    "datasets",
)


@hookimpl
def lsm_registry_components() -> list[type]:
    classes: list[type] = []
    for module in MODULES:
        try:
            mod = importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{module}":
                continue  # a kind with no built-in component yet
            raise
        classes.extend(mod.COMPONENTS)
    return classes
