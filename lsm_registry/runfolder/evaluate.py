"""Scoring a finished run's model again, on its own data or on other data (``lsm evaluate``).

A run scores its model on the test split as it trains; later questions (the validation
split, another seed of a synthetic set, the same data moved to another folder, a
different test set with the same classes) need the trained weights scored again without
training. The model is rebuilt from the run's own ``recipe.toml`` and a checkpoint, and
scored by the engine's own loop (:func:`lsm_registry.engine.score_split`), so the
numbers are those the run itself would print.

Only ``[data]`` and ``run.device`` may change: a different model or loss would not match
the weights. Two things stay those of the training set, even when the scored data
changes, because they belong to the model, not to the data: the Many / Medium / Few
groups (defined by the training class counts) and the input normalisation (the mean and
std the model saw in training).

An evaluation is written to its own folder (``RUN_DIR/evaluations/<split,overrides>/`` by
default) with the atomic writer; the run's own files are only read.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import attrs
import torch
from rich.table import Table
from torch import Tensor, nn

from ..checkpoint import (  # noqa: F401 (re-exported)
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    CheckpointFile,
    TrainingFacts,
    list_checkpoints,
    read_checkpoint,
)
from ..data.augment import stats_tensor
from ..engine import build_data, resolve_device, score_split
from ..errors import LSMError, RecipeError
from ..files import atomic_write, check_output_folder
from ..formats import SUMMARY_FORMAT
from ..interfaces import Context, Loss, LTData
from ..metrics import summarise_counts
from ..recipe import Recipe, apply_overrides, parse_overrides, read_toml, validate
from ..registry import Registry
from ..stages import tau_normalised
from .reporter import fmt_pct
from .tracking import per_class_csv

#: Folder of a run that holds its evaluations, one sub-folder each.
EVALUATIONS_DIR = "evaluations"
#: ``summary.json["kind"]`` of an evaluation: tells it apart from a run's summary.
EVALUATION_KIND = "evaluation"
SPLITS = ("test", "val")
#: The keys ``--set`` may change when scoring trained weights: the data, and where to compute.
ALLOWED_DEVICE_KEY = "run.device"


@attrs.frozen(eq=False)
class TrainedModel:
    """A run's model with its checkpoint's weights, in eval mode on ``device``."""

    run_dir: Path
    recipe: Recipe
    checkpoint: Path
    epoch: Optional[int]  # completed epochs of the checkpoint (None for a bare state_dict)
    step: int
    module: nn.Module
    loss: Loss
    facts: TrainingFacts
    device: torch.device


@attrs.frozen(eq=False)
class Evaluation:
    """The summary that summary.json gets, each image's prediction and, when asked, the logits."""

    summary: dict[str, Any]
    labels: Tensor
    predictions: Tensor
    logits: Optional[Tensor]
    notes: tuple[str, ...]


# ------------------------------------------------------------------------------ the run and its checkpoint


def run_recipe_path(run_dir: Path) -> Path:
    if not run_dir.exists():
        raise LSMError(f"{run_dir}: no such run folder")
    path = run_dir / "recipe.toml"
    if not path.is_file():
        raise LSMError(f"{run_dir}: not a run folder (no recipe.toml)")
    return path


def find_checkpoint(run_dir: Path, checkpoint: Optional[Path]) -> Path:
    """``checkpoint`` when given (a file, or ``best`` / ``last``), else the run's newest one: a damaged
    newest file is an error, never silently replaced by an older one, since the scores would then
    describe other weights."""
    named = str(checkpoint) if checkpoint is not None and not checkpoint.is_file() else None  # best / last, not a file
    if named == "best":
        return best_checkpoint(run_dir)
    if checkpoint is not None and named != "last":
        if named is not None:
            raise LSMError(f"{checkpoint}: no such checkpoint file")
        return checkpoint
    found = list_checkpoints(run_dir)
    if not found:
        raise LSMError(f"{run_dir}: no checkpoint in {run_dir / CHECKPOINT_DIR}; name one with --checkpoint FILE")
    return found[-1]


def best_checkpoint(run_dir: Path) -> Path:
    """The run's ``checkpoints/best.pt``: the best epoch on its validation split."""
    path = run_dir / CHECKPOINT_DIR / BEST_CHECKPOINT
    if path.is_file():
        return path
    summary = read_summary(run_dir)
    if summary and summary.get("best_on") != "val":
        raise LSMError(
            f"{run_dir}: no best checkpoint: the run has no validation split, and choosing on the test set "
            "is what one exists to avoid; train with --set data.val_per_class=N, or use --checkpoint last"
        )
    raise LSMError(
        f"{path}: not there (runs of earlier versions, and runs stopped before their first evaluation, "
        "keep none); use --checkpoint last or a file"
    )


# ------------------------------------------------------------------------------ recipes


def check_overrides(overrides: Sequence[str]) -> list[tuple[str, str, str, Any]]:
    """Parsed ``--set`` overrides; any outside [data] and run.device is refused, naming the key."""
    errors: list[str] = []
    parsed = []
    for text, table, key, value in parse_overrides(overrides, errors):
        dotted = f"{table}.{key}"
        if table != "data" and dotted != ALLOWED_DEVICE_KEY:
            errors.append(
                f"--set {text}: {dotted} cannot change when scoring trained weights; only data.* and "
                f"{ALLOWED_DEVICE_KEY} may (the model and loss must stay those the weights were trained with)"
            )
            continue
        parsed.append((text, table, key, value))
    if errors:
        raise RecipeError(errors)
    return parsed


def evaluation_recipes(run_dir: Path, overrides: Sequence[str], registry: Registry) -> tuple[Recipe, Recipe]:
    """(the run's recipe, the recipe to evaluate with), both with ``run.device`` as overridden.

    Setting ``data.name`` to another data set starts its [data] table afresh: the run's
    other [data] keys are parameters of the old data set and would not apply.
    """
    path = run_recipe_path(run_dir)
    parsed = check_overrides(overrides)
    trained_raw, evaluated_raw = read_toml(path), read_toml(path)
    old_name = (trained_raw.get("data") or {}).get("name")
    new_name = next((v for _, t, k, v in parsed if t == "data" and k == "name"), old_name)
    if new_name != old_name and isinstance(evaluated_raw.get("data"), dict):
        evaluated_raw["data"] = {}
    errors: list[str] = []
    apply_overrides(trained_raw, [p for p in parsed if p[1] == "run"], errors)
    apply_overrides(evaluated_raw, parsed, errors)
    if errors:
        raise RecipeError(errors)
    where = str(path)
    return validate(trained_raw, where, registry), validate(evaluated_raw, where, registry)


# ------------------------------------------------------------------------------ the model


def training_facts(
    run_dir: Path,
    trained: Recipe,
    registry: Registry,
    evaluated: Recipe,
    evaluated_data: LTData,
    notes: list[str],
    stored: Optional[TrainingFacts] = None,
) -> TrainingFacts:
    """The training set's facts: those the checkpoint stored, else from the evaluated data when it
    is the training data, else rebuilt (checkpoints of earlier versions store none).

    When the run's own data set cannot be built any more (its files moved: the usual
    reason to override data.root), the class counts and names come from the run's
    summary.json and the normalisation from the evaluated data, with a note.
    """
    if stored is not None:
        return stored
    if trained.data == evaluated.data:
        return TrainingFacts.of(evaluated_data)
    try:
        return TrainingFacts.of(build_data(trained, registry))
    except LSMError as exc:
        summary = read_summary(run_dir)
        counts, names = summary.get("class_counts"), summary.get("class_names")
        if not counts:
            raise LSMError(
                f"{run_dir}: cannot rebuild the training data for its class counts ({exc}), and there is "
                "no summary.json that lists them"
            ) from None
        notes.append(
            f"the run's training data could not be built ({exc}); Many/Medium/Few use the class counts of "
            f"{run_dir / 'summary.json'} and images are normalised with the evaluated data's mean and std"
        )
        return TrainingFacts(
            tuple(int(n) for n in counts),
            tuple(names or evaluated_data.class_names),
            tuple(evaluated_data.mean),
            tuple(evaluated_data.std),
            tuple(evaluated_data.image_size),
        )


def read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def build_model(
    run_dir: Path, recipe: Recipe, registry: Registry, facts: TrainingFacts, read: CheckpointFile, device: torch.device
) -> TrainedModel:
    """The run's model (and loss, for its test-time logits) with the checkpoint's weights."""
    state, checkpoint = read.state, read.path
    context = Context(
        class_counts=facts.class_counts,
        image_size=facts.image_size,
        device=device,
        generator=torch.Generator().manual_seed(recipe.run.seed),
        epochs=recipe.run.epochs,
        seed=recipe.run.seed,
    )
    loss = recipe.loss.build(registry, context)
    factory = recipe.model.build(registry, context)
    try:
        factory.check_input(facts.image_size)
        module = factory.build(len(facts.class_counts), facts.image_size[0], loss.needs_normed_head)
    except ValueError as exc:
        raise LSMError(f"[model] {recipe.model.name}: {exc}") from None
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(str(exc).splitlines()[:2])
        raise LSMError(f"{checkpoint}: does not fit the model of {run_dir / 'recipe.toml'} ({first})") from None
    module = module.to(device).eval()
    return TrainedModel(run_dir, recipe, checkpoint, read.epoch, read.step, module, loss, facts, device)


def load_trained(
    run_dir: Path, registry: Registry, checkpoint: Optional[Path] = None, device: Optional[torch.device] = None
) -> TrainedModel:
    """The run's model (``lsm export``) on ``device``, or the recipe's. No data is built when the
    checkpoint stores the training data's facts; older checkpoints rebuild the data for them."""
    recipe, _ = evaluation_recipes(run_dir, (), registry)
    read = read_checkpoint(find_checkpoint(run_dir, checkpoint))
    facts = read.facts or TrainingFacts.of(build_data(recipe, registry))
    return build_model(run_dir, recipe, registry, facts, read, device or resolve_device(recipe.run.device))


# ------------------------------------------------------------------------------ evaluating


@attrs.frozen(eq=False)
class PreparedEvaluation:
    """A run's model and the data to score it on, built once for several scorings (``lsm tau-norm``)."""

    run_dir: Path
    trained: Recipe
    evaluated: Recipe
    checkpoint: Path
    split: str
    overrides: tuple[str, ...]
    data: LTData
    scored: Any  # the Split scored
    facts: TrainingFacts
    model: TrainedModel
    notes: tuple[str, ...]


def evaluate_run(
    run_dir: Path,
    registry: Registry,
    checkpoint: Optional[Path] = None,
    overrides: Sequence[str] = (),
    split: str = "test",
    batch_size: int = 512,
    keep_logits: bool = False,
    tau: Optional[float] = None,
) -> Evaluation:
    """Score the run's model on ``split`` of its data (with ``overrides`` applied), as its training did;
    ``tau``: with its classifier tau-normalised first (:func:`lsm_registry.stages.tau_normalised`)."""
    return score_prepared(
        prepare_evaluation(run_dir, registry, checkpoint, overrides, split), batch_size, keep_logits, tau
    )


def tau_norm_run(
    run_dir: Path,
    registry: Registry,
    taus: Sequence[float],
    checkpoint: Optional[Path] = None,
    overrides: Sequence[str] = (),
    split: str = "test",
    batch_size: int = 512,
) -> list[Evaluation]:
    """One evaluation per tau of the run's tau-normalised model; the data and weights are loaded once."""
    prepared = prepare_evaluation(run_dir, registry, checkpoint, overrides, split)
    return [score_prepared(prepared, batch_size, tau=tau) for tau in taus]


def prepare_evaluation(
    run_dir: Path,
    registry: Registry,
    checkpoint: Optional[Path] = None,
    overrides: Sequence[str] = (),
    split: str = "test",
) -> PreparedEvaluation:
    """The run's model with its weights and the data it is to be scored on, every check made."""
    if split not in SPLITS:
        raise LSMError(f"--split {split}: choose test or val")
    overrides = list(overrides)
    trained, evaluated = evaluation_recipes(run_dir, overrides, registry)
    path = find_checkpoint(run_dir, checkpoint)
    device = resolve_device(evaluated.run.device)
    data = build_data(evaluated, registry)
    scored = data.test if split == "test" else data.val
    if scored is None:
        raise LSMError(f"[data] {evaluated.data.name}: no validation split; add --set data.val_per_class=N")
    notes: list[str] = []
    read = read_checkpoint(path)
    facts = training_facts(run_dir, trained, registry, evaluated, data, notes, read.facts)
    if data.num_classes != len(facts.class_counts):
        raise LSMError(
            f"[data] {evaluated.data.name}: {data.num_classes} classes, but the model of {run_dir} was "
            f"trained on {len(facts.class_counts)}; it can only score data with the same classes"
        )
    if data.image_size[0] != facts.image_size[0]:
        raise LSMError(
            f"[data] {evaluated.data.name}: images with {data.image_size[0]} channel(s), but the model of "
            f"{run_dir} takes {facts.image_size[0]}"
        )
    if tuple(data.class_names) != facts.class_names:
        notes.append(
            f"[data] {evaluated.data.name}: its class names differ from the training set's; class c is "
            "scored as the model's class c"
        )
    model = build_model(run_dir, trained, registry, facts, read, device)
    return PreparedEvaluation(
        run_dir, trained, evaluated, path, split, tuple(overrides), data, scored, facts, model, tuple(notes)
    )


def score_prepared(
    prepared: PreparedEvaluation, batch_size: int = 512, keep_logits: bool = False, tau: Optional[float] = None
) -> Evaluation:
    """Score a prepared run's model (tau-normalised first when ``tau`` is given) as its training did."""
    run_dir, trained, evaluated, path, split = (
        prepared.run_dir,
        prepared.trained,
        prepared.evaluated,
        prepared.checkpoint,
        prepared.split,
    )
    data, scored, facts, model, device = (
        prepared.data,
        prepared.scored,
        prepared.facts,
        prepared.model,
        prepared.model.device,
    )
    overrides = list(prepared.overrides)
    module = model.module if tau is None else tau_normalised(model.module, tau)
    # Mixed precision only where the run could use it (CUDA); elsewhere float32.
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trained.run.amp) if device.type == "cuda" else None
    memory_format = torch.channels_last if trained.run.channels_last else torch.contiguous_format
    n = len(scored)
    predictions = torch.zeros(n, dtype=torch.int64)
    logits_all = torch.zeros(n, data.num_classes) if keep_logits else None

    def keep(idx: Tensor, logits: Tensor) -> None:
        predictions[idx] = logits.argmax(dim=1).cpu()
        if logits_all is not None:
            logits_all[idx] = logits.cpu()

    correct, total, _ = score_split(
        module.to(memory_format=memory_format),
        scored,
        model.loss,
        data.num_classes,
        stats_tensor(facts.mean, device),
        stats_tensor(facts.std, device),
        device,
        torch.arange(n),
        batch_size=batch_size,
        memory_format=memory_format,
        autocast_dtype=autocast,
        on_logits=keep,
    )
    result = summarise_counts(correct, total, facts.class_counts)
    summary = {
        "format": SUMMARY_FORMAT,
        "kind": EVALUATION_KIND,
        **result,
        "epochs": model.epoch,
        "split": split,
        "images": n,
        "checkpoint": str(path),
        "checkpoint_epoch": model.epoch,
        "checkpoint_step": model.step,
        "overrides": overrides,
        **({"tau_norm": tau} if tau is not None else {}),
        "data": evaluated.to_dict()["data"],
        "class_counts": list(facts.class_counts),
        "class_names": list(data.class_names),
        "recipe": str(run_dir / "recipe.toml"),
        "run_name": trained.run.name,
        "seed": trained.run.seed,
    }
    return Evaluation(summary, scored.labels.clone(), predictions, logits_all, prepared.notes)


# ------------------------------------------------------------------------------ writing and showing


def _safe(raw: str) -> str:
    """A value as a folder-name fragment: quotes dropped, anything unusual becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._+\-\[\]=]", "_", raw.strip().strip("\"'")) or "_"


def evaluation_name(
    split: str, overrides: Sequence[str], checkpoint: Optional[Path] = None, tau: Optional[float] = None
) -> str:
    """``test``, ``val``, ``test,data.seed=1``, ...; ``,checkpoint=<stem>`` for a named checkpoint,
    ``,tau=0.7`` for a tau-normalised classifier."""
    parts = [split] + [_safe(text.replace(" ", "")) for text in overrides]
    if checkpoint is not None:
        parts.append(f"checkpoint={_safe(checkpoint.stem)}")
    if tau is not None:
        parts.append(f"tau={tau:g}")
    return ",".join(parts)


def check_out(folder: Path) -> None:
    """An evaluation may replace an earlier evaluation, never anything else (a run folder least of all)."""
    check_output_folder(
        folder,
        "an evaluation",
        lambda f: read_summary(f).get("kind") == EVALUATION_KIND,
        "choose an empty folder or one with an earlier evaluation",
    )


def predictions_csv(evaluation: Evaluation) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["index", "label", "prediction"])
    for i, (label, pred) in enumerate(zip(evaluation.labels.tolist(), evaluation.predictions.tolist())):
        writer.writerow([i, label, pred])
    return buf.getvalue()


def write_evaluation(evaluation: Evaluation, folder: Path) -> list[Path]:
    """summary.json, per_class.csv and predictions.csv, each written atomically."""
    check_out(folder)
    files = {
        "summary.json": json.dumps(evaluation.summary, indent=2) + "\n",
        "per_class.csv": per_class_csv(evaluation.summary),
        "predictions.csv": predictions_csv(evaluation),
    }
    written = []
    for name, text in files.items():
        atomic_write(folder / name, text)
        written.append(folder / name)
    return written


def evaluation_table(summary: dict[str, Any], title: str) -> Table:
    """The columns of the run's result table that an evaluation has (no best epoch, no training time)."""
    table = Table(title=title)
    for column in ("top-1", "Many", "Medium", "Few", "rarest 3", "epochs", "images"):
        table.add_column(column, justify="right")
    table.add_row(
        fmt_pct(summary["top1"]),
        fmt_pct(summary["many"]),
        fmt_pct(summary["medium"]),
        fmt_pct(summary["few"]),
        fmt_pct(summary["rare3"]),
        "—" if summary["epochs"] is None else str(summary["epochs"]),
        str(summary["images"]),
    )
    return table


def tau_norm_table(evaluations: Sequence[Evaluation], title: str) -> Table:
    """One row per tau: what ``lsm tau-norm`` prints."""
    table = Table(title=title)
    for column in ("tau", "top-1", "Many", "Medium", "Few", "rarest 3"):
        table.add_column(column, justify="right")
    for evaluation in evaluations:
        s = evaluation.summary
        table.add_row(
            f"{s['tau_norm']:g}",
            fmt_pct(s["top1"]),
            fmt_pct(s["many"]),
            fmt_pct(s["medium"]),
            fmt_pct(s["few"]),
            fmt_pct(s["rare3"]),
        )
    return table


def tau_norm_csv(evaluations: Sequence[Evaluation]) -> str:
    """The tau-norm table as CSV, accuracies as fractions (empty where a group has no class)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["tau", "top1", "many", "medium", "few", "rare3"])
    for evaluation in evaluations:
        s = evaluation.summary
        writer.writerow(
            [f"{s['tau_norm']:g}"]
            + ["" if s[k] is None else f"{s[k]:.6f}" for k in ("top1", "many", "medium", "few", "rare3")]
        )
    return buf.getvalue()
