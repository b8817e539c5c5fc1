"""``lsm preview``: draw one mixed batch of a recipe to a PNG (the drawing lives in lsm_registry.viz.pictures)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..checkpoint import load_model_weights
from ..engine import Trainer
from ..errors import LSMError
from ..recipe import load_recipe
from ..runfolder.evaluate import find_checkpoint
from ..viz.pictures import save_preview
from .common import registry_with_warnings, set_option, user_errors

RUN_RECIPE = "recipe.toml"


def weights_for(source: Path, checkpoint: Optional[Path]) -> tuple[Path, Optional[Path]]:
    """(recipe file, weights file or None) for a recipe or a run folder; best / last name a run folder's checkpoints."""
    if source.is_dir():
        if not (source / RUN_RECIPE).is_file():
            raise LSMError(f"{source}: not a run folder (no {RUN_RECIPE}); give a recipe file or a run folder")
        return source / RUN_RECIPE, find_checkpoint(source, checkpoint)
    if checkpoint is not None and not checkpoint.is_file() and str(checkpoint) in ("best", "last"):
        raise LSMError(
            f"--checkpoint {checkpoint}: best and last are a run folder's checkpoints; "
            f"give the run folder instead of {source}, or a checkpoint file"
        )
    if checkpoint is not None and not checkpoint.is_file():
        raise LSMError(f"{checkpoint}: no such checkpoint file")
    return source, checkpoint


@click.command("preview")
@click.argument("source", metavar="RECIPE|RUN_DIR", type=click.Path(path_type=Path))
@set_option
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG file to write.")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="best|last|FILE",
    help="Model weights: a run folder's best or last (its default) checkpoint, or a file, a state_dict or "
    "a dict with key 'model' (a recipe's default: untrained).",
)
@click.option("--rows", type=click.IntRange(1, 64), default=6, show_default=True, help="Image pairs to draw.")
@click.option(
    "--epoch", type=click.IntRange(0, None), default=0, show_default=True, help="Epoch whose first batch is drawn."
)
@user_errors
def command(
    source: Path, overrides: tuple[str, ...], out: Path, checkpoint: Optional[Path], rows: int, epoch: int
) -> None:
    """Draw one mixed batch of RECIPE: foreground, saliency, mask, background, mixed, label weights.

    Given a run folder, its recipe.toml and its trained weights (--checkpoint last, the
    default, or best) are used, so the saliency is the trained model's.
    The batch is the first training batch of --epoch (optim.batch_size images, drawn
    and mixed as the training step does) and the picture shows its first --rows pairs,
    so --rows never changes which images are drawn. Preview always mixes: it does not
    ask the mixer's window or probability, and says so when --epoch lies outside the window.
    """
    registry = registry_with_warnings()
    recipe, weights = weights_for(source, checkpoint)
    parsed = load_recipe(recipe, list(overrides), registry)
    trainer = Trainer(parsed, registry)
    if weights is not None:
        load_model_weights(trainer.module, weights)
    batch = save_preview(trainer, out, rows, epoch)
    drawn_with = f", weights {weights}" if weights is not None else ", untrained model"
    click.echo(
        f"wrote {out} ({len(batch)} rows, mixer {parsed.mixer.name}, label fuser {parsed.label_fuser.name}{drawn_with})"
    )
    window = parsed.mixer.params.window(parsed.run.epochs)
    if epoch not in window:
        span = f"epochs {window.start}..{window.stop - 1}" if window else "no epoch"
        click.echo(
            f"note: epoch {epoch} is outside the recipe's mixing window ({span}, 0-based); "
            "training would not mix this batch, preview mixes it anyway"
        )
