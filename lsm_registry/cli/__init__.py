"""The ``lsm`` command line (click + rich): the top of the house.

Each command lives in a module of its own and imports the library below it; nothing
in the library imports this package (only the ``lsm`` entry point and
``python -m lsm_registry`` start here).
"""

from __future__ import annotations

import importlib
from typing import Optional

import click

from ..version import __version__

__all__ = ["cli", "main"]

#: name -> (module of this package, attribute, the first line of its help). A command's module
#: (and with it torch) is imported only when that command runs, so `lsm --help` and
#: `lsm --version` answer at once; tests/test_cli.py checks the help lines against the commands.
COMMANDS = {
    "run": ("train", "run_cmd", "Train and evaluate each RECIPE; writes its run folder and prints Many/Medium/Few."),
    "resume": (
        "train",
        "resume_cmd",
        "Continue the run in RUN_DIR from its newest checkpoint, with its own recipe.toml.",
    ),
    "show": ("listing", "show_cmd", "Print the resolved, validated RECIPE as TOML (every default filled in)."),
    "list-components": (
        "listing",
        "list_components_cmd",
        "List registered components, optionally only those matching PATTERN.",
    ),
    "preview": (
        "preview",
        "command",
        "Draw one mixed batch of RECIPE: foreground, saliency, mask, background, mixed, label weights.",
    ),
    "sweep": ("sweep", "command", "Train RECIPE at every point of the --grid product (times --seeds), then compare."),
    "compare": (
        "compare",
        "command",
        "Compare finished runs: top-1, Many, Medium, Few, rarest three, epochs, wall time.",
    ),
    "report": ("report", "command", "Write one HTML page of runs: curves, Many / Medium / Few, pictures, recipe."),
    "evaluate": ("evaluate", "evaluate_cmd", "Score the model of RUN_DIR again and print its Many/Medium/Few table."),
    "tau-norm": (
        "evaluate",
        "tau_norm_cmd",
        "Re-score the model of RUN_DIR with its classifier tau-normalised, without training.",
    ),
    "export": ("evaluate", "export_cmd", "Write the model of RUN_DIR for programs without lsm-registry."),
}


class LazyGroup(click.Group):
    """A click group that imports a command's module when the command is looked up to run."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(f".{module}", __name__), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from :data:`COMMANDS`, without importing the commands."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = [(name, _short(COMMANDS[name][2], limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _short(text: str, limit: int) -> str:
    """``text`` cut at a word boundary to ``limit`` characters with "...", as click shortens help."""
    if len(text) <= limit:
        return text
    cut = text[: max(limit - 3, 1)].rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:") + "..."


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lsm")
def cli() -> None:
    """LSM registry: long-tailed image classification from TOML recipes.

    Train with `lsm run RECIPE` (continue with `lsm resume RUN_DIR`), see what a
    recipe resolves to with `lsm show RECIPE`, draw one mixed batch with
    `lsm preview`, run a grid with `lsm sweep`, tabulate runs with
    `lsm compare` and put runs on one self-contained HTML page with
    `lsm report RUN_DIR...`. Score a run's model again with `lsm evaluate RUN_DIR`
    (other data with --set data.KEY=VALUE), with its classifier tau-normalised with
    `lsm tau-norm RUN_DIR --tau 0.5,1.0`, and hand it to other programs with
    `lsm export RUN_DIR --out DIR`. `lsm list-components` lists the registered samplers, saliency
    providers, patch operators, mixers, label fusers, losses, models, data sets and
    loggers. A recipe's `[run] loggers = ["tensorboard", "mlflow", "wandb"]` also sends
    the run to those trackers (docs/tracking.md).
    Set LSM_DISABLE_PLUGINS=a,b to block plugins, LSM_DEBUG=1 for tracebacks.
    """


def main() -> None:
    cli(prog_name="lsm")
