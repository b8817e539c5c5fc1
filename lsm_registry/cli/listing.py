"""``lsm show`` and ``lsm list-components``: what a recipe resolves to, what is registered."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

import attrs
import click
from rich.console import Console
from rich.table import Table

from ..errors import LSMError
from ..interfaces import KINDS
from ..plugins import default_registry
from ..recipe import load_recipe
from .common import registry_with_warnings, set_option, user_errors


@click.command("show")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@set_option
@user_errors
def show_cmd(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Print the resolved, validated RECIPE as TOML (every default filled in)."""

    parsed = load_recipe(recipe, list(overrides), registry_with_warnings())
    click.echo(parsed.to_toml(), nl=False)


def _param_text(params_cls: type) -> str:
    attrs.resolve_types(params_cls)
    parts = []
    for f in attrs.fields(params_cls):
        default = f.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        parts.append(f"{f.name}={default!r}")
    return ", ".join(parts) or "—"


@click.command("list-components")
@click.option("--kind", type=click.Choice(list(KINDS)), default=None, help="Only this kind.")
@click.option("--deprecated", is_flag=True, help="List the old names of renamed components and parameters instead.")
@click.argument("pattern", required=False)
@user_errors
def list_components_cmd(kind: Optional[str], pattern: Optional[str], deprecated: bool) -> None:
    """List registered components, optionally only those matching PATTERN.

    PATTERN (case-insensitive) matches component names that contain it and the
    components of the distribution or plugin of that name: `lsm list-components edge`,
    `lsm list-components lsm-spectral`. With a wildcard (* ? [...]) it is a shell
    wildcard over the name or the distribution: `lsm list-components 'l*'`.

    Shows each component's provider (distribution and version), a one-line summary and
    its parameters with defaults. Plugins that failed to load are listed after the table.
    Old names of renamed components still work in recipes but are not listed; --deprecated
    lists them, with what replaced them.
    """

    registry = default_registry()
    if deprecated:
        _list_renames(registry, kind, pattern)
        return
    entries = registry.list(kind, pattern)
    if pattern and not entries:
        names = sorted({e.name for e in registry.list(kind)} | {e.owner.distribution for e in registry.list(kind)})
        close = difflib.get_close_matches(pattern.lower(), names, n=3, cutoff=0.5)
        raise LSMError(
            f"no component matches {pattern!r}"
            + (f" (kind {kind})" if kind else "")
            + (f"; closest: {', '.join(close)}" if close else "; `lsm list-components` lists them all")
        )
    console = Console()
    table = Table(title="registered components")
    # Names and providers are what users copy into recipes and bug reports: never split them.
    table.add_column("kind", no_wrap=True)
    table.add_column("name", no_wrap=True)
    table.add_column("provided by", overflow="fold", min_width=12)
    table.add_column("summary", overflow="fold", ratio=3)
    table.add_column("parameters (defaults)", overflow="fold", ratio=2)
    for entry in entries:
        table.add_row(
            entry.kind,
            entry.name,
            f"{entry.owner.distribution} {entry.owner.version}",
            entry.cls.summary(),
            _param_text(entry.cls.Params),
        )
    console.print(table)
    # Plain echo, not rich: one unwrapped line per broken plugin, easy to grep and paste.
    for problem in registry.problems:
        click.echo(f"not loaded: {problem}")
    if registry.problems:
        click.echo(f"{len(registry.problems)} plugin(s) did not load; the components above did.")


def _list_renames(registry, kind: Optional[str], pattern: Optional[str]) -> None:
    """The old names a recipe may still use, each with the name that replaced it (``component.param`` for parameters)."""
    table = Table(title="deprecated names (they still work, with a warning)")
    table.add_column("kind", no_wrap=True)
    table.add_column("old name", no_wrap=True)
    table.add_column("use instead", no_wrap=True)
    table.add_column("provided by", overflow="fold")
    needle = (pattern or "").casefold()
    for rename in registry.renames(kind):
        old, new = (
            (rename.old, rename.new)
            if rename.param is None
            else (f"{rename.new}.{rename.param[0]}", f"{rename.new}.{rename.param[1]}")
        )
        if needle and needle not in old.casefold() and needle not in new.casefold():
            continue
        table.add_row(rename.kind, old, new, rename.provider)
    if table.row_count:
        Console().print(table)
    else:
        click.echo(
            "no deprecated names" + (f" matching {pattern!r}" if pattern else "") + (f" of kind {kind}" if kind else "")
        )
