"""Builds the registry from the built-in plugin and the installed entry points.

Every plugin, built-in or third-party, goes through the ``lsm_registry_components``
hook. A plugin is all or nothing: when it fails in any way (raises on import, has a
misspelt or unmarked hook, its hook raises, returns something that is not a
component class, a class declares a kind that does not exist, is abstract, has
Params that do not construct from their defaults, or collides with a name already
registered) it gets one line in ``Registry.problems`` naming its distribution, its
entry point and the class, and none of its components is registered; every other
plugin still loads. ``LSM_DISABLE_PLUGINS=a,b`` blocks plugins by entry-point name
or distribution name; the built-in plugin cannot be blocked. The plugins it actually
kept out are listed in ``Registry.blocked``, and an unknown component name names them.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
import os
from typing import Any, Iterable, Optional

import attrs
import pluggy

from . import hookspecs
from .components import builtin
from .errors import RegistryError
from .registry import Owner, Registry, suggest
from .version import __version__

ENTRY_POINT_GROUP = "lsm_registry"
BUILTIN_PLUGIN = "builtin"
DISABLE_ENV = "LSM_DISABLE_PLUGINS"


def disabled_plugins(env: Optional[dict[str, str]] = None) -> set[str]:
    """Plugin (entry-point) or distribution names listed in LSM_DISABLE_PLUGINS."""
    raw = (env if env is not None else os.environ).get(DISABLE_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _own_version() -> str:
    return __version__


def make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def hook_names() -> list[str]:
    """Names of the hooks a plugin may implement (the specs in lsm_registry.hookspecs)."""
    marker = f"{hookspecs.PROJECT}_spec"
    return sorted(n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, marker))


@attrs.frozen
class _Source:
    """One plugin to load and how to name it in a message."""

    name: str
    obj: Any
    owner: Owner
    where: str

    @property
    def hint(self) -> str:
        if self.name == BUILTIN_PLUGIN and self.owner.distribution == "lsm-registry":
            return "this is a bug in lsm-registry itself; please report it"
        return f"the plugin was skipped; set {DISABLE_ENV}={self.name} to stop loading it"


def _where(name: str, owner: Owner, entry_point: Optional[str]) -> str:
    ep = f", entry point {name} = {entry_point}" if entry_point else ""
    return f"plugin {name!r} (distribution {owner.distribution} {owner.version}{ep})"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def build_registry(
    extra: Iterable[tuple[str, Any, Owner]] = (),
    entry_points: bool = True,
    env: Optional[dict[str, str]] = None,
) -> Registry:
    """A fresh registry: the built-in plugin, then the installed entry points (sorted by
    name), then ``extra`` (name, plugin object, owner) triples, which tests use to
    register throwaway plugins. Problems land in ``registry.problems``; nothing raises.
    """
    registry = Registry()
    blocked = disabled_plugins(env)
    own = Owner(BUILTIN_PLUGIN, "lsm-registry", _own_version())
    sources = [_Source(BUILTIN_PLUGIN, builtin, own, _where(BUILTIN_PLUGIN, own, builtin.__name__))]
    if entry_points:
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if ep.name in blocked or dist in blocked:
                _note_blocked(registry, ep.name, dist, blocked)
                continue
            owner = Owner(ep.name, dist, version)
            source = _Source(ep.name, None, owner, _where(ep.name, owner, ep.value))
            try:
                obj = ep.load()
            except (Exception, SystemExit) as exc:  # a plugin's import error must not stop the others
                registry.problems.append(
                    _one_line(f"{source.where} failed to import: {type(exc).__name__}: {exc}; {source.hint}")
                )
                continue
            sources.append(attrs.evolve(source, obj=obj))
    for name, obj, owner in extra:
        if name in blocked or owner.distribution in blocked:
            _note_blocked(registry, name, owner.distribution, blocked)
            continue
        label = getattr(obj, "__name__", None) or f"{type(obj).__module__}.{type(obj).__qualname__}"
        sources.append(_Source(name, obj, owner, _where(name, owner, label)))
    for source in sources:
        problem = _load_plugin(registry, source)
        if problem is not None:
            registry.problems.append(_one_line(f"{source.where}: {problem}; {source.hint}"))
    return registry


def _note_blocked(registry: Registry, name: str, dist: str, blocked: set[str]) -> None:
    """Remember a plugin that LSM_DISABLE_PLUGINS kept out, named as the user named it.

    Only plugins that exist (an installed entry point, or an ``extra`` plugin) are noted:
    a name in the variable that matches nothing cannot be why a component is missing.
    """
    label = dist if dist in blocked else (name if name == dist else f"{name} ({dist})")
    if label not in registry.blocked:
        registry.blocked.append(label)


def _unknown_hooks(pm: pluggy.PluginManager) -> list[str]:
    return sorted(name for name, caller in vars(pm.hook).items() if not name.startswith("_") and not caller.has_spec())


def _unmarked_hooks(obj: Any) -> list[str]:
    """Functions named like a hook but not decorated with ``@lsm_registry.hookimpl``."""
    marker = f"{hookspecs.PROJECT}_impl"
    out = []
    for name in dir(obj):
        if name.startswith(f"{hookspecs.PROJECT}_"):
            value = getattr(obj, name, None)
            if inspect.isroutine(value) and not hasattr(value, marker):
                out.append(name)
    return out


def _unique(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if not any(item is seen for seen in out):
            out.append(item)
    return out


def _flatten(results: list[Any]) -> list[Any]:
    items: list[Any] = []
    for result in results:
        if isinstance(result, (list, tuple)):
            items.extend(result)
        else:
            items.append(result)
    return items


def _load_plugin(registry: Registry, source: _Source) -> Optional[str]:
    """Register every class of one plugin, or none; returns the problem, if any."""
    pm = make_plugin_manager()
    try:
        pm.register(source.obj, name=source.name)
    except Exception as exc:
        return f"cannot register its hooks: {type(exc).__name__}: {exc}"
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        known = hook_names()
        parts = []
        for name in _unknown_hooks(pm):
            hint = suggest(name, known)
            parts.append(f"{name!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
        return f"implements unknown hook {', '.join(parts)}; the hooks are {', '.join(known)}"
    if not pm.hook.lsm_registry_components.get_hookimpls():
        unmarked = _unmarked_hooks(source.obj)
        if unmarked:
            return f"{', '.join(unmarked)} is not marked with @lsm_registry.hookimpl"
        return "implements no hook (define lsm_registry_components() marked with @lsm_registry.hookimpl)"
    try:
        results = pm.hook.lsm_registry_components()
    except Exception as exc:
        return f"its hook lsm_registry_components raised {type(exc).__name__}: {exc}"
    if not results:
        return "lsm_registry_components returned None; return a list of component classes"
    staged = registry.copy()  # all or nothing: commit only when every class registered
    errors: list[str] = []
    for cls in _unique(_flatten(results)):  # the same class listed twice registers once
        try:
            staged.register(cls, source.owner)
        except RegistryError as exc:
            errors.append(str(exc))
    if errors:
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        return errors[0] + more
    registry.adopt(staged)
    return None


_default: Optional[Registry] = None


def default_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, built on first use (never at import time)."""
    global _default
    if _default is None or refresh:
        _default = build_registry()
    return _default
