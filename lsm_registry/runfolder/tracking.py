"""The run's loggers: the run folder's own writer, always on, and the trackers a recipe names.

A tracker is somewhere a run is watched, never where it is kept: when one fails
(server down, disk full) :class:`LoggerHub` reports it in one line, closes it and
trains on without it. The run folder writer is the exception: its failure is the
run's failure, because resuming and comparing read what it writes.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import LSMError
from ..files import atomic_write
from ..formats import SUMMARY_FORMAT
from ..interfaces import Context, Logger, RunInfo
from ..metrics import group_of
from ..recipe import Recipe, without_loggers
from ..registry import Registry

#: metrics.jsonl / record keys sent to the trackers after an evaluation, as test/<key> and val/<key>.
EVAL_KEYS = ("top1", "many", "medium", "few", "rare3")


def per_class_csv(summary: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["class", "name", "train_count", "group", "accuracy"])
    for c, (name, count, acc) in enumerate(zip(summary["class_names"], summary["class_counts"], summary["per_class"])):
        writer.writerow([c, name, count, group_of(count), "" if acc is None else f"{acc:.6f}"])
    return buf.getvalue()


class RunFolderLogger(Logger):
    """The run folder: recipe.toml, metrics.jsonl (one line per epoch; test metrics on the evaluated ones),
    summary.json, per_class.csv."""

    name = "run-folder"

    def __init__(self, run_dir: Path, done: list[dict[str, Any]]):
        super().__init__(None, None)
        self.run_dir = run_dir
        self.done = done

    def start(self, run: RunInfo) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.run_dir / "recipe.toml", run.recipe_toml)
        # On resume the checkpoint's history is the truth: lines written after it are dropped.
        atomic_write(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.done))

    def log_record(self, record: dict[str, Any]) -> None:
        # Every epoch (train loss, lr, throughput), whole-line appends: an interrupted run never leaves half a line.
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def finish(self, summary: dict[str, Any]) -> None:
        atomic_write(self.run_dir / "summary.json", json.dumps({"format": SUMMARY_FORMAT, **summary}, indent=2) + "\n")
        atomic_write(self.run_dir / "per_class.csv", per_class_csv(summary))


def check_loggers(recipe: Recipe, registry: Registry) -> None:
    """A named tracker whose package is missing stops the run before training, with the install hint."""
    for spec in recipe.loggers:
        cls = registry.get("logger", spec.name)
        missing = cls.missing_modules()
        if missing:
            hint = f": {cls.install_hint}" if cls.install_hint else ""
            raise LSMError(
                f"[run].loggers: logger {spec.name!r} needs the {', '.join(missing)} package{'s' if len(missing) > 1 else ''}{hint}"
            )


def build_loggers(recipe: Recipe, registry: Registry, context: Context) -> list[Logger]:
    check_loggers(recipe, registry)
    return [spec.build(registry, context) for spec in recipe.loggers]


#: [optim] keys that do nothing under a schedule: left out of a tracker's hyperparameters.
UNUSED_UNDER = {"cosine": ("optim.milestones", "optim.gamma")}


def flat_hparams(recipe: dict[str, Any], schedule: str = "") -> dict[str, Any]:
    """``table.key: value`` of a resolved recipe, for a tracker: keys that do nothing under the
    chosen schedule are left out (the caller leaves out the loggers' own settings)."""
    out = {}
    for table, keys in recipe.items():
        for key, value in keys.items():
            if isinstance(value, dict):
                out.update({f"{table}.{key}.{k}": v for k, v in value.items()})
            else:
                out[f"{table}.{key}"] = value
    for key in UNUSED_UNDER.get(schedule, ()):
        out.pop(key, None)
    return out


def evaluation_metrics(record: dict[str, Any]) -> dict[str, float]:
    out = {f"test/{k}": record[k] for k in EVAL_KEYS if record.get(k) is not None}
    out.update({f"val/{k}": record[f"val_{k}"] for k in EVAL_KEYS if record.get(f"val_{k}") is not None})
    out.update({f"train/{k}": record[f"train_{k}"] for k in EVAL_KEYS if record.get(f"train_{k}") is not None})
    return out


class LoggerHub:
    """Calls every logger in turn; a tracker that raises is reported once and dropped.

    ``required`` loggers (the run folder) are not shielded: their errors stop the run.
    """

    def __init__(self, loggers: list[Logger], note: Callable[[str], None], required: tuple[Logger, ...] = ()):
        self.loggers = list(loggers)
        self.required = required
        self.note = note

    def call(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            if logger in self.required:
                getattr(logger, method)(*args)
                continue
            try:
                getattr(logger, method)(*args)
            except Exception as exc:  # a tracker must never stop training
                self.note(
                    f"logger {logger.name!r} failed in {method} ({type(exc).__name__}: {_one_line(exc)}); "
                    "the run goes on without it"
                )
                self.loggers.remove(logger)
                try:
                    logger.close()
                except Exception:
                    pass

    def close(self) -> None:
        """Close every logger, shielded ones too: a failing close is reported, the others still close."""
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:
                self.note(f"logger {logger.name!r} failed in close ({type(exc).__name__}: {_one_line(exc)})")
        self.loggers = []


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def run_info(
    recipe: Recipe,
    run_dir: Optional[Path],
    class_names: tuple[str, ...],
    class_counts: tuple[int, ...],
    steps_per_epoch: int,
    resumed: bool,
) -> RunInfo:
    return RunInfo(
        run_name=recipe.run.name,
        run_dir=run_dir,
        hparams=flat_hparams(without_loggers(recipe.to_dict()), recipe.optim.schedule),
        recipe_toml=recipe.to_toml(),
        class_names=tuple(class_names),
        class_counts=tuple(class_counts),
        epochs=recipe.run.epochs,
        steps_per_epoch=steps_per_epoch,
        resumed=resumed,
    )
