"""Builds the registry from the built-in plugin and the installed entry points.

Every plugin, built-in or third-party, goes through the ``lsm_registry_components``
hook. A plugin that fails (raises on import, returns a non-component, declares an
unknown kind, collides with a name) is reported in one line naming its distribution
and entry point and is skipped; the rest still load. ``LSM_DISABLE_PLUGINS=a,b``
blocks plugins by entry-point name (or distribution name).
"""

from __future__ import annotations

import importlib.metadata as md
import os
from typing import Any, Iterable, Optional

import pluggy

from . import hookspecs
from .errors import RegistryError
from .registry import Owner, Registry

ENTRY_POINT_GROUP = "lsm_registry"
BUILTIN_PLUGIN = "builtin"


def disabled_plugins(env: Optional[dict[str, str]] = None) -> set[str]:
    raw = (env if env is not None else os.environ).get("LSM_DISABLE_PLUGINS", "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _own_version() -> str:
    from . import __version__

    return __version__


def make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def build_registry(
    extra: Iterable[tuple[str, Any, Owner]] = (),
    entry_points: bool = True,
    env: Optional[dict[str, str]] = None,
) -> Registry:
    """A fresh registry. ``extra`` adds (name, plugin object, owner) triples (tests)."""
    from .components import builtin

    registry = Registry()
    blocked = disabled_plugins(env)
    plugins: list[tuple[str, Any, Owner]] = [
        (BUILTIN_PLUGIN, builtin, Owner(BUILTIN_PLUGIN, "lsm-registry", _own_version()))
    ]
    if entry_points:
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if ep.name in blocked or dist in blocked:
                continue
            where = f"plugin {ep.name!r} (distribution {dist} {version}, entry point {ep.value})"
            try:
                obj = ep.load()
            except Exception as exc:  # a plugin's import error must not stop the others
                registry.problems.append(f"{where} failed to import: {type(exc).__name__}: {exc}")
                continue
            plugins.append((ep.name, obj, Owner(ep.name, dist, version)))
    plugins.extend(p for p in extra if p[0] not in blocked)
    for name, obj, owner in plugins:
        _load_plugin(registry, name, obj, owner)
    return registry


def _describe(owner: Owner) -> str:
    return f"plugin {owner.plugin!r} (distribution {owner.distribution} {owner.version})"


def _load_plugin(registry: Registry, name: str, obj: Any, owner: Owner) -> None:
    pm = make_plugin_manager()
    try:
        pm.register(obj, name=name)
        pm.check_pending()
    except Exception as exc:
        registry.problems.append(f"{_describe(owner)}: {type(exc).__name__}: {exc}".replace("\n", " "))
        return
    try:
        results = pm.hook.lsm_registry_components()
    except Exception as exc:
        registry.problems.append(f"{_describe(owner)}: the hook raised {type(exc).__name__}: {exc}")
        return
    for result in results:
        if not isinstance(result, (list, tuple)):
            result = [result]
        for cls in result:
            try:
                registry.register(cls, owner)
            except RegistryError as exc:
                registry.problems.append(f"{_describe(owner)}: {exc}")


_default: Optional[Registry] = None


def default_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, built on first use (never at import time)."""
    global _default
    if _default is None or refresh:
        _default = build_registry()
    return _default
