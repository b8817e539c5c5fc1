"""Renamed components and parameters: an old name keeps working for a while, with a warning.

Renaming a component, or one of its parameters, would otherwise break every recipe and
every stored run that uses the old name. As timm does for its deprecated model names,
the class declares what it used to be called (``renamed_from``, ``renamed_params``), the
registry records each old name as an alias of the current one (refusing an alias that is
a live name, so no lookup is ever ambiguous), and :func:`renamed_recipe` replaces the old
names of a raw recipe before it is validated, with one :class:`RenamedWarning` each. So
everything after it, the resolved recipe a run folder keeps included, sees current names
only. This module knows no registry class: it is handed one.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Optional

import attrs


class RenamedWarning(FutureWarning):
    """A recipe or a registry lookup used the old name of a renamed component or parameter.

    A FutureWarning rather than a DeprecationWarning because its readers write recipes and
    run ``lsm``: Python shows FutureWarning by default and hides DeprecationWarning raised
    outside ``__main__``.
    """


@attrs.frozen
class Rename:
    """One old name: of a component (``param`` None) or of a parameter of component ``new``."""

    kind: str
    old: str
    new: str
    #: For a parameter rename: the old and the current parameter name (``old``/``new`` are the component's).
    param: Optional[tuple[str, str]] = None
    #: Who declared it ("distribution version"), for messages and listings.
    provider: str = ""


def declared(cls: Any) -> tuple[tuple[str, ...], dict[str, str]]:
    """The old names ``cls`` declares in its own body (a subclass is another component: nothing is inherited)."""
    own = vars(cls)
    return tuple(own.get("renamed_from", ())), dict(own.get("renamed_params", {}))


def declaration_problem(cls: Any, label: str) -> Optional[str]:
    """Why the renames ``cls`` declares cannot be registered, or None; needs a registrable ``cls``."""
    own = vars(cls)
    names, params = own.get("renamed_from", ()), own.get("renamed_params", {})
    if isinstance(names, str) or not isinstance(names, (tuple, list)):
        return f"{label}: renamed_from must be a tuple of old names (got {names!r})"
    for old in names:
        if not isinstance(old, str) or not old.strip() or any(ch.isspace() for ch in old):
            return f"{label}: renamed_from holds {old!r}; an old name is a string without spaces"
        if old == cls.name:
            return f"{label}: renamed_from holds its own name {old!r}"
    if not isinstance(params, Mapping):
        return f"{label}: renamed_params must map old parameter names to current ones (got {params!r})"
    attrs.resolve_types(cls.Params)
    fields = [f.name for f in attrs.fields(cls.Params)]
    for old, new in params.items():
        if new not in fields:
            return f"{label}: renamed_params maps {old!r} to {new!r}, which is not a parameter; parameters: {', '.join(fields) or '(none)'}"
        if old in fields:
            return (
                f"{label}: renamed_params maps {old!r}, which is a live parameter; a deprecated name cannot shadow one"
            )
    return None


def _warn(message: str) -> None:
    # stacklevel 1: the same message from the same line is shown once per process (Python's
    # "default" action), so a sweep that loads one recipe many times warns once.
    warnings.warn(message, RenamedWarning, stacklevel=1)


def live_name(registry: Any, kind: str, name: str, where: str) -> str:
    """The current name of ``kind`` ``name``; a warning naming ``where`` when it is an old one."""
    new, rename = registry.resolve(kind, name)
    if rename is not None:
        _warn(
            f"{where}: {kind} {name!r} was renamed {new!r} ({rename.provider}); write {new!r} instead, the old "
            "name stops working in a later release"
        )
    return new


def live_keys(
    registry: Any,
    kind: str,
    name: str,
    body: dict[str, Any],
    where: str,
    table: str,
    errors: list[str],
    keep: Iterable[str] = (),
) -> dict[str, Any]:
    """``body`` (a recipe table of ``kind`` ``name``) with renamed parameter keys replaced; ``keep``: keys never renamed."""
    renames = registry.param_renames(kind, name)
    keep = set(keep)
    out: dict[str, Any] = {}
    for key, value in body.items():
        rename = renames.get(key) if key not in keep else None
        if rename is None:
            out[key] = value
            continue
        new = rename.param[1]
        if new in body or new in out:
            errors.append(f"{where} [{table}].{key}: renamed {new!r}, which the table sets too; remove {key}")
            continue
        _warn(
            f"{where} [{table}].{key}: parameter {key!r} of {kind} {name!r} was renamed {new!r} ({rename.provider}); "
            f"write {new} instead, the old name stops working in a later release"
        )
        out[new] = value
    return out


@attrs.frozen
class Target:
    """A recipe table that names one component: its kind, the name it means when it says none,
    and the keys that belong to the table rather than to the component ([optim]'s own)."""

    table: str
    kind: str
    default: Optional[str] = None
    keep: frozenset[str] = frozenset()


def renamed_recipe(
    raw: dict[str, Any],
    registry: Any,
    where: str,
    targets: Iterable[Target],
    listed: Mapping[str, str],
    errors: list[str],
) -> dict[str, Any]:
    """A copy of a raw recipe with every old component and parameter name replaced, one warning each.

    ``targets``: the tables that name one component. ``listed``: tables of named sub-tables
    (``loggers`` -> ``logger``) whose names are listed in ``[run]`` under the same key.
    Values of the wrong type are left for validation to report.
    """
    out = {table: dict(body) if isinstance(body, dict) else body for table, body in raw.items()}
    for target in targets:
        body = out.get(target.table)
        if not isinstance(body, dict):
            continue
        name = body.get("name", target.default)
        if not isinstance(name, str):
            continue
        name = live_name(registry, target.kind, name, f"{where} [{target.table}].name")
        if "name" in body:
            body["name"] = name
        out[target.table] = live_keys(registry, target.kind, name, body, where, target.table, errors, target.keep)
    run = out.get("run")
    for table, kind in listed.items():
        names = run.get(table) if isinstance(run, dict) else None
        if isinstance(run, dict) and isinstance(names, (list, tuple)):
            run[table] = [
                live_name(registry, kind, n, f"{where} [run].{table}") if isinstance(n, str) else n for n in names
            ]
        subs = out.get(table)
        if not isinstance(subs, dict):
            continue
        renamed: dict[str, Any] = {}
        for sub, body in subs.items():
            new = registry.resolve(kind, sub)[0]  # the [run] list warned about it already
            if new in renamed or (new != sub and new in subs):
                errors.append(
                    f"{where} [{table}.{sub}]: {kind} {sub!r} was renamed {new!r}, and [{table}.{new}] is "
                    "there too; keep one table"
                )
                continue
            renamed[new] = (
                live_keys(registry, kind, new, body, where, f"{table}.{new}", errors)
                if isinstance(body, dict)
                else body
            )
        out[table] = renamed
    return out
