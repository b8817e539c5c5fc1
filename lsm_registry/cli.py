"""The ``lsm`` command line (click + rich).

Invalid input exits with code 2 and one line per problem, no traceback; set
``LSM_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import LSMError, RecipeError

SET_HELP = "Override a recipe key: table.key=value, the value in TOML syntax (repeatable)."


def debug_enabled() -> bool:
    return os.environ.get("LSM_DEBUG", "") not in ("", "0")


def user_errors(func: Callable) -> Callable:
    """Turn LSMError into one line per problem on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LSMError as exc:
            if debug_enabled():
                raise
            lines = exc.lines if isinstance(exc, RecipeError) else [str(exc)]
            for line in lines:
                click.echo(f"error: {line}", err=True)
            sys.exit(getattr(exc, "exit_code", 2))

    return wrapper


def registry_with_warnings():
    from .plugins import default_registry

    registry = default_registry()
    for problem in registry.problems:
        click.echo(f"warning: {problem}", err=True)
    return registry


def set_option(func: Callable) -> Callable:
    return click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE", help=SET_HELP)(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lsm")
def cli() -> None:
    """LSM registry: long-tailed image classification from TOML recipes.

    Train with `lsm run RECIPE` (continue with `lsm resume RUN_DIR`), see what a
    recipe resolves to with `lsm show RECIPE`, draw one mixed batch with
    `lsm preview`, run a grid with `lsm sweep` and tabulate runs with
    `lsm compare`. `lsm list-components` lists the registered samplers, saliency
    providers, patch operators, mixers, label fusers, losses, models and data sets.
    Set LSM_DISABLE_PLUGINS=a,b to block plugins, LSM_DEBUG=1 for tracebacks.
    """


@cli.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@set_option
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder (default: runs/<run.name>, with -2, -3, ... when taken; with --resume: runs/<run.name>).")
@click.option("--resume", is_flag=True, help="Continue the run in the run folder from its newest checkpoint.")
@click.option("--keep", default=1, show_default=True, type=click.IntRange(min=1), help="Epoch checkpoints to keep.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
@user_errors
def run_cmd(recipe: Path, overrides: tuple[str, ...], out: Optional[Path], resume: bool, keep: int, no_progress: bool) -> None:
    """Train and evaluate the RECIPE; writes the run folder and prints Many/Medium/Few.

    A checkpoint is written atomically after every epoch and on Ctrl-C / SIGTERM;
    `--resume` (or `lsm resume RUN_DIR`) continues from it. Under torchrun
    (`torchrun --nproc_per_node N -m lsm_registry run RECIPE`) every process trains a
    shard and only rank 0 writes the run folder.
    """
    from .recipe import load_recipe

    registry = registry_with_warnings()
    parsed = load_recipe(recipe, list(overrides), registry)
    _train(parsed, registry, out, resume, keep, no_progress)


def _train(parsed, registry, out: Optional[Path], resume: bool, keep: int, no_progress: bool) -> None:
    from .checkpoint import check_free_space, estimate_size
    from .engine import Trainer, check_writable, dist_info, fresh_run_dir

    if out is not None:
        run_dir = out
    elif resume:
        run_dir = Path("runs") / parsed.run.name
    elif dist_info().enabled:
        run_dir = Path("runs") / parsed.run.name  # every process must agree on the folder
    else:
        run_dir = fresh_run_dir(Path("runs"), parsed.run.name)
    if resume and not run_dir.is_dir():
        raise LSMError(f"{run_dir}: no such run folder to resume")
    trainer = Trainer(parsed, registry, run_dir=None, console=Console(), progress=not no_progress, keep=keep, resume=resume)
    if trainer.dist.is_main:
        check_writable(run_dir)
        check_free_space(run_dir, estimate_size(trainer.module))
    trainer.run_dir = run_dir
    trainer.fit()


@cli.command("resume")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@set_option
@click.option("--keep", default=1, show_default=True, type=click.IntRange(min=1), help="Epoch checkpoints to keep.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
@user_errors
def resume_cmd(run_dir: Path, overrides: tuple[str, ...], keep: int, no_progress: bool) -> None:
    """Continue the run in RUN_DIR from its newest checkpoint, with its own recipe.toml.

    Only run.epochs may change (e.g. --set run.epochs=300); any other difference from
    the checkpointed recipe is refused with the list of changed keys.
    """
    from .recipe import load_recipe

    if not (run_dir / "recipe.toml").is_file():
        raise LSMError(f"{run_dir}: not a run folder (no recipe.toml)")
    registry = registry_with_warnings()
    parsed = load_recipe(run_dir / "recipe.toml", list(overrides), registry)
    _train(parsed, registry, run_dir, True, keep, no_progress)


@cli.command("show")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@set_option
@user_errors
def show_cmd(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Print the resolved, validated RECIPE as TOML (every default filled in)."""
    from .recipe import load_recipe

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


@cli.command("list-components")
@click.option("--kind", type=click.Choice(["sampler", "saliency", "patch", "mixer", "label_fuser", "loss", "model", "dataset"]),
              default=None, help="Only this kind.")
@click.argument("pattern", required=False)
def list_components_cmd(kind: Optional[str], pattern: Optional[str]) -> None:
    """List registered components, optionally filtered by a wildcard PATTERN (e.g. 'l*').

    Shows each component's provider (distribution and version), a one-line summary and
    its parameters with defaults. Plugins that failed to load are listed after the table.
    """
    from .plugins import default_registry

    registry = default_registry()
    console = Console()
    table = Table(title="registered components")
    # Names and providers are what users copy into recipes and bug reports: never split them.
    table.add_column("kind", no_wrap=True)
    table.add_column("name", no_wrap=True)
    table.add_column("provided by", overflow="fold", min_width=12)
    table.add_column("summary", overflow="fold", ratio=3)
    table.add_column("parameters (defaults)", overflow="fold", ratio=2)
    entries = registry.list(kind, pattern)
    for entry in entries:
        table.add_row(
            entry.kind,
            entry.name,
            f"{entry.owner.distribution} {entry.owner.version}",
            entry.cls.summary(),
            _param_text(entry.cls.Params),
        )
    console.print(table)
    if not entries:
        console.print("no component matches" + (f" {pattern!r}" if pattern else ""))
    # Plain echo, not rich: one unwrapped line per broken plugin, easy to grep and paste.
    for problem in registry.problems:
        click.echo(f"not loaded: {problem}")
    if registry.problems:
        click.echo(f"{len(registry.problems)} plugin(s) did not load; the components above did.")


def _register_optional_commands() -> None:
    """Commands that live in their own modules (lsm_registry/commands/*.py)."""
    import importlib
    import pkgutil

    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        command = getattr(module, "command", None)
        if isinstance(command, click.Command):
            cli.add_command(command)


_register_optional_commands()


def main() -> None:
    cli(prog_name="lsm")
