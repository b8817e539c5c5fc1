"""The ``lsm`` command line (click + rich): the top of the house.

Each command lives in a module of its own and imports the library below it; nothing
in the library imports this package (only the ``lsm`` entry point and
``python -m lsm_registry`` start here).
"""

from __future__ import annotations

import click

from ..version import __version__
from . import compare, evaluate, listing, preview, report, sweep, train

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


for _command in (train.run_cmd, train.resume_cmd, listing.show_cmd, listing.list_components_cmd, preview.command,
                 sweep.command, compare.command, report.command, evaluate.evaluate_cmd, evaluate.tau_norm_cmd,
                 evaluate.export_cmd):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="lsm")
