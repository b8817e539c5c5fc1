"""The hooks a plugin implements. There is one: it returns component classes.

A plugin is a module (or object) with functions marked ``@lsm_registry.hookimpl``
whose names match the specs below; it is found through the entry-point group
``lsm_registry``. The built-in components come in through this same hook.
"""

from __future__ import annotations

import pluggy

PROJECT = "lsm_registry"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lsm_registry_components() -> list[type]:
    """Return the component classes this plugin provides.

    Each class derives from one of the base classes in ``lsm_registry.interfaces``
    (which fixes its kind), sets a ``name`` unique within that kind and an
    ``attrs.frozen`` ``Params`` class. Return classes, not instances; do not
    register anything at import time.
    """
    return []  # never called: pluggy calls the plugins' implementations
