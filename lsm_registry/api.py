"""The Python API: train a recipe and read a run folder back, from a script or a notebook.

The command line is a thin layer over the same calls: :func:`train` writes the run folder
``lsm run`` writes (recipe.toml, metrics.jsonl, summary.json, checkpoints, pictures), and
:func:`load_run` reads any run folder, whichever wrote it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import attrs
import torch
from torch import nn

from .engine import Trainer
from .errors import LSMError
from .files import holds_anything
from .plugins import default_registry
from .recipe import Recipe, load_recipe
from .registry import Registry
from .runfolder.evaluate import TrainedModel, load_trained, read_summary
from .runfolder.reader import read_metrics, read_run_recipe
from .runfolder.reporter import RunReporter, fit_into, fresh_run_dir


@attrs.frozen(eq=False)
class TrainedRun:
    """What :func:`train` returns: the run's summary, its model (eval mode) and its folder."""

    summary: dict[str, Any]
    model: nn.Module
    run_dir: Optional[Path]
    recipe: Recipe


@attrs.frozen(eq=False)
class RunFolder:
    """A run folder read back by :func:`load_run`."""

    run_dir: Path
    summary: dict[str, Any]  # {} for a run that has not finished
    metrics: list[dict[str, Any]]  # metrics.jsonl, one dict per epoch
    recipe: dict[str, Any]  # the resolved recipe.toml
    trained: Optional[TrainedModel]  # None when load_run(..., checkpoint=None)

    @property
    def model(self) -> Optional[nn.Module]:
        return self.trained.module if self.trained is not None else None


def train(
    recipe: Union[str, Path, Recipe],
    overrides: Sequence[str] = (),
    out: Union[str, Path, None] = None,
    registry: Optional[Registry] = None,
    progress: bool = False,
    keep: int = 1,
) -> TrainedRun:
    """Train a recipe, as ``lsm run`` does, and return its summary and model.

    Args:
        recipe: a recipe file, or a :class:`~lsm_registry.recipe.Recipe` already loaded.
        overrides: ``table.key=value`` lines, as ``--set`` takes them (a path only).
        out: the run folder, new or empty. None writes ``runs/<run.name>`` (``-2``, ``-3``, ...
            when taken), as ``lsm run`` does.
        registry: the component registry (default: the built-ins and installed plugins).
        progress: draw progress bars on the terminal.
        keep: epoch checkpoints to keep (``checkpoints/best.pt`` is kept besides, with a
            validation split).

    Returns:
        A :class:`TrainedRun`: ``summary`` (what summary.json holds), ``model`` (the trained
        module, in eval mode), ``run_dir`` and the resolved ``recipe``.

    Raises:
        LSMError: a recipe, data or run-folder problem, with the one-line message the CLI prints.
    """
    registry = registry or default_registry()
    if isinstance(recipe, Recipe):
        if overrides:
            raise LSMError("overrides apply to a recipe file; pass the path, or a Recipe with them applied")
        parsed = recipe
    else:
        parsed = load_recipe(Path(recipe), list(overrides), registry)
    if out is not None:
        run_dir = Path(out)
        if holds_anything(run_dir):
            raise LSMError(f"{run_dir}: the folder is not empty (a run folder holds one run); choose another out")
    else:
        run_dir = fresh_run_dir(Path("runs"), parsed.run.name)
    trainer = Trainer(parsed, registry, run_dir=None, keep=keep)
    summary = fit_into(trainer, run_dir, RunReporter(show_progress=progress))
    return TrainedRun(summary, trainer.module.eval(), run_dir, parsed)


def load_run(
    run_dir: Union[str, Path],
    checkpoint: Optional[str] = "last",
    registry: Optional[Registry] = None,
    device: str = "cpu",
) -> RunFolder:
    """Read a run folder: its summary, metrics, resolved recipe and, unless ``checkpoint`` is None, its model.

    Args:
        run_dir: the run folder.
        checkpoint: ``"last"`` (the newest), ``"best"`` (the best epoch on validation; a run
            without a validation split has none, and asking for it raises), a checkpoint file,
            or None to load no model.
        registry: the component registry (default: the built-ins and installed plugins).
        device: where the model goes.

    Returns:
        A :class:`RunFolder` with ``summary``, ``metrics``, ``recipe``, ``trained`` (the model with
        its checkpoint, epoch and training facts) and ``model``.
    """
    run_dir = Path(run_dir)
    recipe, _ = read_run_recipe(run_dir / "recipe.toml")
    if not recipe:
        raise LSMError(f"{run_dir}: not a run folder (no recipe.toml)")
    summary = read_summary(run_dir)
    metrics = list(read_metrics(run_dir / "metrics.jsonl"))
    trained = None
    if checkpoint is not None:
        trained = load_trained(run_dir, registry or default_registry(), Path(checkpoint), device=torch.device(device))
    return RunFolder(run_dir, summary, metrics, recipe, trained)
