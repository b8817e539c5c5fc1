"""Reading recipe files: the TOML text, and the bases a recipe ``extends``.

Recipes of one data set repeat the same [run], [data], [model] and [optim] tables; a
recipe can name shared base files instead, with a top-level key before the first table::

    extends = ["../_base/cifar100_lt.toml", "../_base/lsm.toml"]

Paths are relative to the file that names them; a base may extend others. The tables are
merged key by key (nested tables too): the bases in order, then the file itself, later
wins; a list (``milestones``) is a value and is replaced whole. The result is one flat
recipe dict without ``extends``, so everything after reading (``--set``, validation,
the run folder's recipe.toml) sees a recipe as if it had been written out in full, and
run folders never depend on base files that may change later.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .formats import RECIPE_FORMAT, format_problem

#: The top-level keys (before the first table): the recipe format, and the base files.
FORMAT_KEY = "format"
EXTENDS_KEY = "extends"


def read_toml(path: Path) -> dict[str, Any]:
    """One TOML file as a dict; a file that cannot be read is one line naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([f"{path}: no such recipe file"]) from None
    except IsADirectoryError:
        raise RecipeError([f"{path}: is a folder, not a recipe file"]) from None
    except UnicodeDecodeError as exc:
        raise RecipeError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"{path}: TOML syntax error: {exc}"]) from None


def read_recipe(path: Path) -> dict[str, Any]:
    """A recipe file with its bases merged in: a flat dict without ``extends``."""
    return _resolve(Path(path), ())


def merge_tables(into: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` written onto ``into`` key by key, tables recursively; ``into`` is changed and returned."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_tables(into[key], value)
        else:
            into[key] = _copy(value)
    return into


def _copy(value: Any) -> Any:
    # Tables are copied so that merging later files never writes into a base's dict.
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, dict) else value


def _resolve(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    raw = read_toml(path)
    problem = format_problem(raw.get(FORMAT_KEY), RECIPE_FORMAT, str(path))
    if problem is not None:  # a base too new for this version is refused like a recipe would be
        raise RecipeError([problem])
    bases = _base_paths(path, raw.pop(EXTENDS_KEY, None))
    chain = (*chain, path)
    merged: dict[str, Any] = {}
    for entry, base in bases:
        if base.resolve() in {p.resolve() for p in chain}:
            names = " -> ".join(_shown(p, chain[0]) for p in (*_from(chain, base), base))
            raise RecipeError(
                [
                    f"{path} {EXTENDS_KEY}: recipes extend each other in a cycle: {names}; "
                    "a base may not extend, directly or through others, a file that extends it"
                ]
            )
        if not base.exists():
            raise RecipeError(
                [
                    f"{path} {EXTENDS_KEY}: base {entry!r} not found (no file {base.resolve()}); "
                    "paths are relative to the file that names them"
                ]
            )
        merge_tables(merged, _resolve(base, chain))
    return merge_tables(merged, raw)


def _base_paths(path: Path, value: Any) -> list[tuple[str, Path]]:
    """The ``extends`` value (a string or a list of strings) as (entry, path next to ``path``)."""
    if value is None:
        return []
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(e, str) and e.strip() for e in entries):
        raise RecipeError(
            [
                f"{path} {EXTENDS_KEY}: expected a path or a list of paths to base recipe files, relative to "
                f'this file (e.g. extends = ["../_base/cifar100_lt.toml"]), got {value!r}'
            ]
        )
    return [(entry, Path(os.path.normpath(path.parent / entry))) for entry in entries]


def _from(chain: tuple[Path, ...], base: Path) -> tuple[Path, ...]:
    """The part of ``chain`` from ``base`` on: the files of the cycle."""
    start = next(i for i, p in enumerate(chain) if p.resolve() == base.resolve())
    return chain[start:]


def _shown(path: Path, relative_to: Path) -> str:
    """``path`` as the user would write it next to ``relative_to``'s folder (absolute when far away)."""
    try:
        shown = os.path.relpath(path, relative_to.parent)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path) if shown.startswith(f"..{os.sep}..{os.sep}..") else shown
