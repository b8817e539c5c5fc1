"""The one registry: (kind, name) -> component class, with the owner of each entry.

It also keeps the old names of renamed components and parameters (see
:mod:`lsm_registry.renames`): a lookup by an old name finds the current component with a
warning, and listings show current names only.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
import warnings
from typing import Any, Iterable, Optional

import attrs

from .errors import RegistryError
from .interfaces import KINDS, Component
from .renames import Rename, RenamedWarning, declaration_problem, declared


@attrs.frozen
class Owner:
    """Who provided a component: the plugin name and its distribution."""

    plugin: str
    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version} (plugin {self.plugin!r})"


@attrs.frozen
class Entry:
    kind: str
    name: str
    cls: type
    owner: Owner


def suggest(word: str, choices: Iterable[str]) -> Optional[str]:
    """The closest valid choice, for "Did you mean" hints."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


WILDCARD_CHARS = "*?["


def _dist_key(name: str) -> str:
    """Distribution names compare like pip does: case-insensitive, runs of -_. are one '-'."""
    return re.sub(r"[-_.]+", "-", name).casefold()


def matches(entry: Entry, pattern: str) -> bool:
    """Whether ``lsm list-components PATTERN`` lists ``entry`` (always case-insensitive).

    A pattern with a wildcard character (``*?[``) is a shell wildcard over the component
    name or the distribution name. Any other pattern matches component names that contain
    it, and every component of the distribution (or plugin) of exactly that name, so
    ``edge`` finds ``...-edge-...`` and ``lsm-spectral`` lists that plugin's components.
    """
    needle = pattern.casefold()
    name = entry.name.casefold()
    if any(ch in pattern for ch in WILDCARD_CHARS):
        return fnmatch.fnmatchcase(name, needle) or fnmatch.fnmatchcase(entry.owner.distribution.casefold(), needle)
    if needle in name:
        return True
    key = _dist_key(pattern)
    return key == _dist_key(entry.owner.distribution) or key == _dist_key(entry.owner.plugin)


def _class_label(cls: type) -> str:
    return f"class {cls.__module__}.{cls.__qualname__}"


def class_problem(cls: Any) -> Optional[str]:
    """Why ``cls`` cannot be registered (kind, name, Params, abstract methods), or None."""
    if not isinstance(cls, type):
        if isinstance(cls, Component):
            return f"returned an instance of {type(cls).__qualname__}; return the class itself"
        return (
            f"returned {cls!r} ({type(cls).__name__}), which is not a component class; "
            "return classes derived from a base class in lsm_registry.interfaces"
        )
    label = _class_label(cls)
    if not issubclass(cls, Component):
        return f"{label} is not a component class (derive it from a base class in lsm_registry.interfaces)"
    kind = getattr(cls, "kind", None)
    if kind not in KINDS:
        hint = suggest(str(kind), KINDS)
        return (
            f"{label} declares kind {kind!r}, which does not exist."
            + (f" Did you mean {hint!r}?" if hint else "")
            + f" Kinds: {', '.join(KINDS)}"
        )
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.strip():
        return f'{label} has no name (set the class attribute name = "...")'
    if name != name.strip() or any(ch.isspace() for ch in name):
        return f"{label} has name {name!r}; names cannot contain spaces"
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        return f"{label} ({kind} {name!r}) is abstract: it does not implement {missing}"
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and attrs.has(params)):
        return f"{label} ({kind} {name!r}): Params is not an attrs class (use @attrs.frozen)"
    try:
        params()
    except Exception as exc:
        return f"{label} ({kind} {name!r}): Params() fails with its defaults: {type(exc).__name__}: {exc}"
    return declaration_problem(cls, f"{label} ({kind} {name!r})")


class Registry:
    """Holds every registered component; lookups name what exists when they fail.

    ``problems`` collects the one-line reports of plugins that failed to load, so a
    broken plugin never hides the components that did load. ``blocked`` names the
    installed plugins that LSM_DISABLE_PLUGINS kept out (filled by
    ``plugins.build_registry``), so an unknown name can point at them. ``_renames`` maps
    (kind, old name) to the current one; ``_param_renames`` (kind, current name) to the
    component's old parameter names. An old name is never a live name, so a name means one
    component whatever the load order.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Entry] = {}
        self._renames: dict[tuple[str, str], Rename] = {}
        self._param_renames: dict[tuple[str, str], dict[str, Rename]] = {}
        self.problems: list[str] = []
        self.blocked: list[str] = []

    def register(self, cls: type, owner: Owner) -> Entry:
        """Add ``cls``; every check of a component class happens here, once, with a one-line error."""
        problem = class_problem(cls)
        if problem is not None:
            raise RegistryError(problem)
        assert issubclass(cls, Component)  # class_problem refuses anything else
        key = (cls.kind, cls.name)
        first = self._entries.get(key)
        if first is not None:
            if first.cls is cls and first.owner == owner:
                return first
            if first.owner != owner:
                raise RegistryError(
                    f"{_class_label(cls)} of {owner.distribution} {owner.version}: duplicate {key[0]} {key[1]!r}, "
                    f"already provided by {first.owner} as {_class_label(first.cls)}"
                )
            raise RegistryError(
                f"{_class_label(cls)}: duplicate {key[0]} {key[1]!r}, also provided by {_class_label(first.cls)}"
            )
        renames = self._renames_of(cls, owner)
        entry = Entry(key[0], key[1], cls, owner)
        self._entries[key] = entry
        for rename in renames:
            if rename.param is None:
                self._renames[(rename.kind, rename.old)] = rename
            else:
                self._param_renames.setdefault(key, {})[rename.param[0]] = rename
        return entry

    def _renames_of(self, cls: type[Component], owner: Owner) -> list[Rename]:
        """The old names ``cls`` declares, checked against this registry: an old name that is a live
        name (or a live name that is an old one) is refused, so no lookup is ever ambiguous."""
        kind, name, label = cls.kind, cls.name, _class_label(cls)
        alias = self._renames.get((kind, name))
        if alias is not None:
            raise RegistryError(
                f"{label}: {kind} {name!r} is the old name of {kind} {alias.new!r} ({alias.provider}), "
                "kept so that old recipes still work; choose another name"
            )
        names, params = declared(cls)
        provider = f"{owner.distribution} {owner.version}"
        for old in names:
            live = self._entries.get((kind, old))
            if live is not None:
                raise RegistryError(
                    f"{label} ({kind} {name!r}): renamed_from {old!r} is a live {kind}, provided by "
                    f"{live.owner} as {_class_label(live.cls)}; an old name cannot shadow a component"
                )
            other = self._renames.get((kind, old))
            if other is not None:
                raise RegistryError(
                    f"{label} ({kind} {name!r}): renamed_from {old!r} is already the old name of "
                    f"{kind} {other.new!r} ({other.provider})"
                )
        return [Rename(kind, old, name, provider=provider) for old in dict.fromkeys(names)] + [
            Rename(kind, name, name, param=(old, new), provider=provider) for old, new in params.items()
        ]

    def copy(self) -> "Registry":
        """A registry with the same entries and old names, to stage a plugin's classes before committing them."""
        staged = Registry()
        staged._entries = dict(self._entries)
        staged._renames = dict(self._renames)
        staged._param_renames = {key: dict(value) for key, value in self._param_renames.items()}
        return staged

    def adopt(self, staged: "Registry") -> None:
        """Take the entries of a registry made by :meth:`copy` (the plugin loaded whole)."""
        self._entries = staged._entries
        self._renames = staged._renames
        self._param_renames = staged._param_renames

    def names(self, kind: str) -> list[str]:
        return sorted(name for (k, name) in self._entries if k == kind)

    def entry(self, kind: str, name: str) -> Entry:
        if kind not in KINDS:
            hint = suggest(kind, KINDS)
            raise RegistryError(
                f"unknown kind {kind!r}." + (f" Did you mean {hint!r}?" if hint else "") + f" Kinds: {', '.join(KINDS)}"
            )
        try:
            return self._entries[(kind, name)]
        except KeyError:
            pass
        new, rename = self.resolve(kind, name)
        if rename is None:
            raise RegistryError(self.unknown_message(kind, name))
        warnings.warn(
            f"{kind} {name!r} was renamed {new!r} ({rename.provider}); use {new!r}, the old name stops "
            "working in a later release",
            RenamedWarning,
            stacklevel=3,
        )
        return self._entries[(kind, new)]

    def get(self, kind: str, name: str) -> type:
        return self.entry(kind, name).cls

    def resolve(self, kind: str, name: str) -> tuple[str, Optional[Rename]]:
        """``(current name, the Rename)`` for an old name; ``(name, None)`` for any other, without a warning."""
        rename = self._renames.get((kind, name))
        return (rename.new, rename) if rename is not None else (name, None)

    def param_renames(self, kind: str, name: str) -> dict[str, Rename]:
        """Old parameter name -> its :class:`Rename`, for the component of current name ``name``."""
        return dict(self._param_renames.get((kind, name), {}))

    def renames(self, kind: Optional[str] = None) -> list[Rename]:
        """Every old name (components, then parameters), sorted by kind order and name; what
        ``lsm list-components --deprecated`` shows."""
        found = list(self._renames.values()) + [r for params in self._param_renames.values() for r in params.values()]
        found = [r for r in found if kind is None or r.kind == kind]
        return sorted(found, key=lambda r: (KINDS.index(r.kind), r.new, r.param is not None, r.param or (), r.old))

    def unknown_message(self, kind: str, name: str) -> str:
        names = self.names(kind)
        hint = suggest(name, names)
        msg = f"unknown {kind} {name!r}."
        if hint:
            msg += f" Did you mean {hint!r}?"
        msg += f" Available: {', '.join(names) or '(none)'}  (see: lsm list-components --kind {kind})"
        if self.blocked:
            plural = len(self.blocked) > 1
            msg += (
                f" (plugin{'s' if plural else ''} blocked by LSM_DISABLE_PLUGINS: {', '.join(self.blocked)}; "
                f"{'one of them' if plural else 'it'} may provide it)"
            )
        return msg

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def list(self, kind: Optional[str] = None, pattern: Optional[str] = None) -> list[Entry]:
        """Entries sorted by kind order then name, filtered by ``pattern`` (see ``matches``)."""
        out = []
        for (k, _name), entry in self._entries.items():
            if kind is not None and k != kind:
                continue
            if pattern and not matches(entry, pattern):
                continue
            out.append(entry)
        return sorted(out, key=lambda e: (KINDS.index(e.kind), e.name))
