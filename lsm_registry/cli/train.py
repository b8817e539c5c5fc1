"""``lsm run`` and ``lsm resume``: train a recipe into a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..engine import Trainer, dist_info
from ..errors import LSMError, RecipeError
from ..files import holds_anything
from ..recipe import load_recipe
from ..runfolder import reader as runs
from ..runfolder.reporter import RunReporter, fit_into, fresh_run_dir
from ..runfolder.tracking import check_loggers
from .common import output_console, registry_with_warnings, set_option, user_errors


@click.command("run")
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@set_option
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder, new or empty (default: runs/<run.name>, with -2, -3, ... when taken; with --resume: "
    "runs/<run.name>).",
)
@click.option("--resume", is_flag=True, help="Continue the run in the run folder from its newest checkpoint.")
@click.option(
    "--keep",
    default=None,
    type=click.IntRange(min=1),
    help="Epoch checkpoints to keep (default 1; with --resume: the run's own count).",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
@user_errors
def run_cmd(
    recipes: tuple[Path, ...],
    overrides: tuple[str, ...],
    out: Optional[Path],
    resume: bool,
    keep: Optional[int],
    no_progress: bool,
) -> None:
    """Train and evaluate each RECIPE; writes its run folder and prints Many/Medium/Few.

    With several recipes (e.g. a baseline and its LSM variant) every one is validated
    first, they train one after the other, and the run ends with the `lsm compare`
    table of their folders; --set applies to each, --out is then not allowed. A checkpoint is written atomically after every epoch and on Ctrl-C / SIGTERM;
    `--resume` (or `lsm resume RUN_DIR`) continues from it. Under torchrun
    (`torchrun --nproc_per_node N -m lsm_registry run RECIPE`) every process trains a
    shard and only rank 0 writes the run folder.
    """

    if out is not None and len(recipes) > 1:
        raise LSMError(f"--out names one run folder, but {len(recipes)} recipes were given; leave --out out")
    registry = registry_with_warnings()
    parsed = _load_all(recipes, overrides, registry)
    folders = [_train(p, registry, out, resume, keep, no_progress) for p in parsed]
    if len(folders) > 1 and dist_info().is_main:
        groups = runs.group_runs(runs.load_runs(folders))
        output_console().print(runs.rich_table(groups, title="comparison: last epoch, test set"))


def _load_all(recipes: tuple[Path, ...], overrides: tuple[str, ...], registry) -> list:
    """Every recipe validated before the first trains: a typo in the last costs seconds, not a run."""
    parsed, errors = [], []
    for recipe in recipes:
        try:
            parsed.append(load_recipe(recipe, list(overrides), registry))
        except RecipeError as exc:
            errors.extend(exc.lines)
    if errors:
        raise RecipeError(errors)
    return parsed


def _train(parsed, registry, out: Optional[Path], resume: bool, keep: Optional[int], no_progress: bool) -> Path:

    if out is not None:
        run_dir = out
        if not resume and dist_info().is_main and holds_anything(out):
            raise LSMError(
                f"{out}: the folder is not empty (a run folder holds one run); continue that run with "
                f"`lsm resume {out}` (or --resume), or choose another --out"
            )
    elif resume:
        run_dir = Path("runs") / parsed.run.name
    elif dist_info().enabled:
        run_dir = Path("runs") / parsed.run.name  # every process must agree on the folder
    else:
        run_dir = fresh_run_dir(Path("runs"), parsed.run.name)
    if resume and not run_dir.is_dir():
        raise LSMError(f"{run_dir}: no such run folder to resume")
    check_loggers(parsed, registry)  # a missing tracker package: the hint before data and model are built
    trainer = Trainer(parsed, registry, run_dir=None, keep=keep, resume=resume)
    fit_into(trainer, run_dir, RunReporter(output_console(), show_progress=not no_progress))
    return run_dir


@click.command("resume")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@set_option
@click.option(
    "--keep",
    default=None,
    type=click.IntRange(min=1),
    help="Epoch checkpoints to keep (default: the run's own count, as it was started).",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
@user_errors
def resume_cmd(run_dir: Path, overrides: tuple[str, ...], keep: Optional[int], no_progress: bool) -> None:
    """Continue the run in RUN_DIR from its newest checkpoint, with its own recipe.toml.

    Only run.epochs and the loggers may change (e.g. --set run.epochs=300, or
    --set 'run.loggers=["tensorboard"]' to watch the rest of the run in TensorBoard);
    any other difference from the checkpointed recipe is refused with the list of
    changed keys.
    """

    if not (run_dir / "recipe.toml").is_file():
        raise LSMError(f"{run_dir}: not a run folder (no recipe.toml)")
    registry = registry_with_warnings()
    parsed = load_recipe(run_dir / "recipe.toml", list(overrides), registry)
    _train(parsed, registry, run_dir, True, keep, no_progress)
