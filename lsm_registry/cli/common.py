"""What every command shares: one-line errors, the plugin warnings, ``--set`` / ``--unset``.

Invalid input exits with code 2 and one line per problem, no traceback; set
``LSM_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from typing import Any, Callable, Iterator

import click
from rich.console import Console

from ..errors import LSMError, RecipeError
from ..params import NONE_TOML
from ..plugins import default_registry
from ..renames import RenamedWarning

SET_HELP = "Override a recipe key: table.key=value, the value in TOML syntax (repeatable)."


#: Width of tables written to a file or a pipe, where no terminal says how wide to be: wide
#: enough that no column of a comparison is cut or folded.
PIPE_WIDTH = 240


def output_console() -> Console:
    """The console for stdout: the terminal's width, or :data:`PIPE_WIDTH` in a pipe or file."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPE_WIDTH)


def debug_enabled() -> bool:
    return os.environ.get("LSM_DEBUG", "") not in ("", "0")


def user_errors(func: Callable) -> Callable:
    """Turn LSMError into one line per problem on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with renamed_as_warning_lines():
                return func(*args, **kwargs)
        except LSMError as exc:
            if debug_enabled():
                raise
            lines = exc.lines if isinstance(exc, RecipeError) else [str(exc)]
            for line in lines:
                click.echo(f"error: {line}", err=True)
            sys.exit(getattr(exc, "exit_code", 2))

    return wrapper


@contextlib.contextmanager
def renamed_as_warning_lines() -> Iterator[None]:
    """Show a :class:`RenamedWarning` as one ``warning: ...`` line on stderr, like a plugin problem,
    instead of Python's file-and-line form; other warnings are shown as Python shows them."""
    show = warnings.showwarning

    def plain(message: Any, category: type, *rest: Any, **kwargs: Any) -> None:
        if issubclass(category, RenamedWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, *rest, **kwargs)

    warnings.showwarning = plain
    try:
        yield
    finally:
        warnings.showwarning = show


def registry_with_warnings():
    registry = default_registry()
    for problem in registry.problems:
        click.echo(f"warning: {problem}", err=True)
    return registry


UNSET_HELP = "Set an optional recipe key back to none, e.g. --unset mixer.end_epoch (repeatable)."


def unset_overrides(keys: tuple[str, ...]) -> list[str]:
    """``--unset table.key`` is ``--set table.key={ none = true }``: TOML has no null."""
    return [f"{key}={NONE_TOML}" for key in keys]


def set_option(func: Callable) -> Callable:
    """``--set`` and ``--unset``; the command receives both as one ``overrides`` list, in order of kind."""

    @functools.wraps(func)
    def wrapper(*args: Any, overrides: tuple[str, ...] = (), unsets: tuple[str, ...] = (), **kwargs: Any) -> Any:
        return func(*args, overrides=tuple(overrides) + tuple(unset_overrides(unsets)), **kwargs)

    wrapper = click.option("--unset", "unsets", multiple=True, metavar="TABLE.KEY", help=UNSET_HELP)(wrapper)
    return click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE", help=SET_HELP)(wrapper)
