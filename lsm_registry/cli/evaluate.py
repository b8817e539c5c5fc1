"""``lsm evaluate`` and ``lsm export``: a finished run's model, scored again or handed to another program."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
from rich.console import Console

from ..evaluation import EVALUATIONS_DIR, SPLITS, evaluate_run, evaluation_name, evaluation_table, write_evaluation
from ..export import FORMATS, export_run
from .common import registry_with_warnings, set_option, user_errors

CHECKPOINT_HELP = "Checkpoint to use: an engine checkpoint or a state_dict (default: the run's newest)."


@click.command("evaluate")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None, help=CHECKPOINT_HELP)
@set_option
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True,
              help="Split to score; val needs a validation split ([data] val_per_class).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Folder for summary.json, per_class.csv, predictions.csv (default: RUN_DIR/{EVALUATIONS_DIR}/<split,overrides>).")
@user_errors
def evaluate_cmd(run_dir: Path, checkpoint: Optional[Path], overrides: tuple[str, ...], split: str, out: Optional[Path]) -> None:
    """Score the model of RUN_DIR again and print its Many/Medium/Few table.

    Uses the run's recipe.toml and its newest checkpoint (or --checkpoint). --set may
    change only data.* (another seed, root or test set with the same classes) and
    run.device: another model or loss would not fit the weights. Many/Medium/Few stay
    the groups of the training set and images are normalised as in training, so the
    numbers compare with the run's own. The run's files are only read; the evaluation
    goes to its own folder (an earlier evaluation of the same name is replaced).
    """
    registry = registry_with_warnings()
    evaluation = evaluate_run(run_dir, registry, checkpoint, overrides, split)
    for note in evaluation.notes:
        click.echo(f"warning: {note}", err=True)
    folder = out if out is not None else run_dir / EVALUATIONS_DIR / evaluation_name(split, overrides, checkpoint)
    write_evaluation(evaluation, folder)
    summary = evaluation.summary
    changed = f", {' '.join(overrides)}" if overrides else ""
    Console().print(evaluation_table(summary, f"{summary['run_name']}: {Path(summary['checkpoint']).name}, {split} split{changed}"))
    click.echo(f"evaluation folder: {folder}")


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write the export to.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None, help=CHECKPOINT_HELP)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="torchscript", show_default=True,
              help="torchscript: model.torchscript.pt (loads with torch.jit.load alone) and model.pt; state-dict: model.pt only.")
@click.option("--force", is_flag=True, help="Write into --out even when it is not empty.")
@user_errors
def export_cmd(run_dir: Path, out: Path, checkpoint: Optional[Path], fmt: str, force: bool) -> None:
    """Write the model of RUN_DIR for programs without lsm-registry.

    model.json names the classes and says what the model takes (channels, size, 0..1
    pixels normalised by the training mean/std) and returns (logits). A state_dict
    (model.pt) needs the model class rebuilt; the TorchScript file does not.
    """
    exported = export_run(run_dir, out, registry_with_warnings(), checkpoint, fmt, force)
    for path in exported.files:
        click.echo(f"wrote {path}")
