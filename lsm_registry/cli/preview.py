"""``lsm preview``: draw one mixed batch of a recipe to a PNG (the drawing lives in lsm_registry.viz.pictures)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..checkpoint import load_model_weights
from ..engine import Trainer
from ..errors import LSMError
from ..viz.pictures import save_preview
from ..recipe import load_recipe
from .common import registry_with_warnings, set_option, user_errors


@click.command("preview")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@set_option
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG file to write.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Model weights: a state_dict or a dict with key 'model' (default: untrained).")
@click.option("--rows", type=click.IntRange(1, 64), default=6, show_default=True, help="Image pairs to draw.")
@click.option("--epoch", type=click.IntRange(0, None), default=0, show_default=True, help="Epoch whose first batch is drawn.")
@user_errors
def command(recipe: Path, overrides: tuple[str, ...], out: Path, checkpoint: Optional[Path], rows: int, epoch: int) -> None:
    """Draw one mixed batch of RECIPE: foreground, saliency, mask, background, mixed, label weights.

    The batch is the first training batch of --epoch (optim.batch_size images, drawn
    and mixed as the training step does) and the picture shows its first --rows pairs,
    so --rows never changes which images are drawn. Preview always mixes: it does not
    ask the mixer's window or probability, and says so when --epoch lies outside the window.
    """
    registry = registry_with_warnings()
    parsed = load_recipe(recipe, list(overrides), registry)
    trainer = Trainer(parsed, registry)
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise LSMError(f"{checkpoint}: no such checkpoint file")
        load_model_weights(trainer.module, checkpoint)
    batch = save_preview(trainer, out, rows, epoch)
    click.echo(f"wrote {out} ({len(batch)} rows, mixer {parsed.mixer.name}, label fuser {parsed.label_fuser.name})")
    window = parsed.mixer.params.window(parsed.run.epochs)
    if epoch not in window:
        span = f"epochs {window.start}..{window.stop - 1}" if window else "no epoch"
        click.echo(f"note: epoch {epoch} is outside the recipe's mixing window ({span}, 0-based); "
                   "training would not mix this batch, preview mixes it anyway")
