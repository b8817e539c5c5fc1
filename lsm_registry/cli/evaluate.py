"""``lsm evaluate``, ``lsm tau-norm`` and ``lsm export``: a finished run's model, scored again or handed to another program."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
from rich.console import Console

from ..errors import LSMError
from ..files import atomic_write, check_output_folder
from ..runfolder.evaluate import (
    EVALUATIONS_DIR,
    SPLITS,
    check_out,
    evaluate_run,
    evaluation_name,
    evaluation_table,
    tau_norm_csv,
    tau_norm_run,
    tau_norm_table,
    write_evaluation,
)
from ..runfolder.export import export_run
from .common import registry_with_warnings, set_option, user_errors

CHECKPOINT_HELP = (
    "Checkpoint to use: best (the best epoch on the validation split), last (the newest, the default) "
    "or a file, an engine checkpoint or a state_dict."
)


def scoring_options(split_help: str):
    """RUN_DIR, --checkpoint, --set / --unset and --split: what every command that re-scores a run takes."""

    def decorate(command):
        for option in reversed(
            (
                click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path)),
                click.option(
                    "--checkpoint",
                    type=click.Path(dir_okay=False, path_type=Path),
                    default=None,
                    metavar="best|last|FILE",
                    help=CHECKPOINT_HELP,
                ),
                set_option,
                click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True, help=split_help),
            )
        ):
            command = option(command)
        return command

    return decorate


@click.command("evaluate")
@scoring_options("Split to score; val needs a validation split ([data] val_per_class).")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Folder for summary.json, per_class.csv, predictions.csv (default: RUN_DIR/{EVALUATIONS_DIR}/<split,overrides>).",
)
@click.option(
    "--tau-norm",
    "tau",
    type=click.FloatRange(min=0),
    default=None,
    help="Score with the classifier tau-normalised: rows w_c / ||w_c||^TAU, bias dropped (Kang et al.).",
)
@user_errors
def evaluate_cmd(
    run_dir: Path,
    checkpoint: Optional[Path],
    overrides: tuple[str, ...],
    split: str,
    out: Optional[Path],
    tau: Optional[float],
) -> None:
    """Score the model of RUN_DIR again and print its Many/Medium/Few table.

    Uses the run's recipe.toml and its newest checkpoint (or --checkpoint). --set may
    change only data.* (another seed, root or test set with the same classes) and
    run.device: another model or loss would not fit the weights. Many/Medium/Few stay
    the groups of the training set and images are normalised as in training, so the
    numbers compare with the run's own. The run's files are only read; the evaluation
    goes to its own folder (an earlier evaluation of the same name is replaced).
    """
    registry = registry_with_warnings()
    folder = out if out is not None else run_dir / EVALUATIONS_DIR / evaluation_name(split, overrides, checkpoint, tau)
    check_out(folder)  # before the work, so a bad --out costs nothing
    evaluation = evaluate_run(run_dir, registry, checkpoint, overrides, split, tau=tau)
    for note in evaluation.notes:
        click.echo(f"warning: {note}", err=True)
    write_evaluation(evaluation, folder)
    summary = evaluation.summary
    changed = f", {' '.join(overrides)}" if overrides else ""
    changed += f", tau-norm {tau:g}" if tau is not None else ""
    Console().print(
        evaluation_table(summary, f"{summary['run_name']}: {Path(summary['checkpoint']).name}, {split} split{changed}")
    )
    click.echo(f"evaluation folder: {folder}")


def parse_taus(text: str) -> list[float]:
    """``0.5,0.7,1.0`` -> [0.5, 0.7, 1.0]; a bad or negative entry is one error line."""
    taus = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise LSMError(f"--tau {text}: {part.strip()!r} is not a number (give e.g. --tau 0.5,0.7,1.0)") from None
        if not value >= 0:
            raise LSMError(f"--tau {text}: tau must be >= 0 (got {part.strip()})")
        taus.append(value)
    return taus


@click.command("tau-norm")
@scoring_options("Split to score; choose tau on val (needs [data] val_per_class), report test.")
@click.option(
    "--tau",
    "taus",
    required=True,
    metavar="T1,T2,...",
    help="Comma-separated powers, e.g. 0,0.5,0.7,1.0 (0: the trained weights, bias dropped).",
)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Folder for one evaluation folder per tau and tau-norm.csv (default: RUN_DIR/{EVALUATIONS_DIR}).",
)
@user_errors
def tau_norm_cmd(
    run_dir: Path, taus: str, checkpoint: Optional[Path], overrides: tuple[str, ...], split: str, out: Optional[Path]
) -> None:
    """Re-score the model of RUN_DIR with its classifier tau-normalised, without training.

    Kang et al.'s tau-normalisation divides each class's weight row by its norm to the
    power tau (the bias is dropped, as in their code): the head classes' larger norms
    stop crowding out the tail. Prints the Many/Medium/Few table per tau and writes
    each tau's evaluation (as `lsm evaluate --tau-norm TAU` would) plus tau-norm.csv.
    --set and --checkpoint as for `lsm evaluate`. Needs a plain linear classifier.
    """
    values = parse_taus(taus)
    registry = registry_with_warnings()
    base = out if out is not None else run_dir / EVALUATIONS_DIR
    check_output_folder(base, "the tau-norm evaluations", lambda _: True)
    evaluations = tau_norm_run(run_dir, registry, values, checkpoint, overrides, split)
    for note in evaluations[0].notes:
        click.echo(f"warning: {note}", err=True)
    for tau, evaluation in zip(values, evaluations):
        write_evaluation(evaluation, base / evaluation_name(split, overrides, checkpoint, tau))
    table_name = ",".join(["tau-norm", *evaluation_name(split, overrides, checkpoint).split(",")]) + ".csv"
    atomic_write(base / table_name, tau_norm_csv(evaluations))
    summary = evaluations[0].summary
    changed = f", {' '.join(overrides)}" if overrides else ""
    Console().print(
        tau_norm_table(
            evaluations, f"{summary['run_name']}: {Path(summary['checkpoint']).name}, {split} split{changed}, tau-norm"
        )
    )
    click.echo(f"evaluations: {base} (table: {base / table_name})")


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write the export to.",
)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="best|last|FILE",
    help=CHECKPOINT_HELP,
)
@click.option(
    "--format",
    "formats",
    multiple=True,
    metavar="pt2|onnx|torchscript|state-dict",
    help="Repeat or comma-separate (default: pt2). pt2: model.pt2 (torch.export, loads with torch alone); "
    "onnx: model.onnx (needs the export extra); torchscript: model.torchscript.pt (deprecated in torch); "
    "model.pt (state_dict) and model.json are always written.",
)
@click.option("--force", is_flag=True, help="Write into --out even when it is not empty.")
@user_errors
def export_cmd(run_dir: Path, out: Path, checkpoint: Optional[Path], formats: tuple[str, ...], force: bool) -> None:
    """Write the model of RUN_DIR for programs without lsm-registry.

    model.json names the classes and says what the model takes (channels, size, the
    test-time resize / crop, 0..1 pixels normalised by the training mean/std), what it
    returns (logits) and which checkpoint (epoch, step) it came from. model.pt2 loads
    with torch.export.load alone, model.onnx with onnxruntime; the state_dict (model.pt)
    needs the model class rebuilt.
    """
    exported = export_run(run_dir, out, registry_with_warnings(), checkpoint, formats, force)
    for path in exported.files:
        click.echo(f"wrote {path}")
