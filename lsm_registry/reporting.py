"""What a run shows and writes: rich progress, metrics.jsonl, summary.json, per_class.csv.

Files are written with atomic replaces (summary, CSV) or whole-line appends
(metrics.jsonl), so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def fmt_pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def result_table(summary: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    for column in ("top-1", "Many", "Medium", "Few", "rarest 3", "best top-1 (epoch)", "epochs", "wall time"):
        table.add_column(column, justify="right")
    table.add_row(
        fmt_pct(summary["top1"]),
        fmt_pct(summary["many"]),
        fmt_pct(summary["medium"]),
        fmt_pct(summary["few"]),
        fmt_pct(summary["rare3"]),
        f"{fmt_pct(summary['best_top1'])} ({summary['best_epoch']})",
        str(summary["epochs"]),
        f"{summary['wall_time_s']:.0f} s",
    )
    return table


def per_class_csv(summary: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["class", "name", "train_count", "group", "accuracy"])
    from .engine import group_of

    for c, (name, count, acc) in enumerate(zip(summary["class_names"], summary["class_counts"], summary["per_class"])):
        writer.writerow([c, name, count, group_of(count), "" if acc is None else f"{acc:.6f}"])
    return buf.getvalue()


class RunReporter:
    """Progress bars on stderr, the result table on stdout, files in the run folder."""

    def __init__(self, trainer: Any, console: Optional[Console], show_progress: bool, resumed: bool = False):
        self.trainer = trainer
        self.resumed = resumed
        self.console = console or Console()
        self.err = Console(stderr=True)
        self.run_dir: Optional[Path] = trainer.run_dir if trainer.dist.is_main else None
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            disable=not show_progress,
            transient=False,
        )
        self.epochs_task = None
        self.steps_task = None

    def __enter__(self) -> "RunReporter":
        if self.run_dir is not None:
            from .engine import atomic_write

            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "recipe.toml", self.trainer.recipe.to_toml())
            # On resume the checkpoint's history is the truth: lines written after it are dropped.
            done = [r for r in self.trainer.history if "top1" in r] if self.resumed else []
            atomic_write(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in done))
        self.progress.start()
        epochs = self.trainer.recipe.run.epochs
        self.epochs_task = self.progress.add_task("epochs", total=epochs, completed=len(self.trainer.history), info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self.steps_task is not None:
            self.progress.remove_task(self.steps_task)
        self.steps_task = self.progress.add_task(f"epoch {epoch + 1}", total=steps, info="")

    def advance(self, step: int, loss: float, lr: float, images_per_s: float) -> None:
        self.progress.update(self.steps_task, completed=step, info=f"loss {loss:.4f}  lr {lr:.4g}  {images_per_s:.0f} img/s")

    def evaluated(self, record: dict[str, Any]) -> None:
        if not self.trainer.dist.is_main:
            return
        self.progress.console.print(
            f"epoch {record['epoch']}: top-1 {fmt_pct(record['top1'])}  Many {fmt_pct(record['many'])}  "
            f"Medium {fmt_pct(record['medium'])}  Few {fmt_pct(record['few'])}  loss {record['train_loss']:.4f}"
        )

    def log(self, record: dict[str, Any]) -> None:
        self.progress.update(self.epochs_task, advance=1, info=f"loss {record['train_loss']:.4f}")
        if self.run_dir is not None and "top1" in record:  # one line per evaluation
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def write_pictures(self, summary: dict[str, Any]) -> None:
        """per_class.png, confusion.png and, for mixing recipes, mixed_samples.png."""
        from .plots import PlotUnavailable, plot_confusion, plot_per_class

        trainer = self.trainer
        try:
            plot_per_class(summary, self.run_dir / "per_class.png")
            if trainer.confusion is not None:
                plot_confusion(trainer.confusion.tolist(), summary["class_names"], self.run_dir / "confusion.png",
                               title=f"{summary['run_name']}: confusion matrix, last epoch (row-normalised)")
        except PlotUnavailable as exc:
            self.console.print(f"note: {exc}", highlight=False)
        if trainer.mixer is not None:
            try:
                from .commands.preview import draw_preview

                draw_preview(trainer, self.run_dir / "mixed_samples.png")
            except Exception as exc:  # a picture must never fail a finished run
                self.console.print(f"note: mixed_samples.png not drawn ({type(exc).__name__}: {exc})", highlight=False)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run_dir is not None:
            from .engine import atomic_write

            atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            atomic_write(self.run_dir / "per_class.csv", per_class_csv(summary))
            self.write_pictures(summary)
        if not self.trainer.dist.is_main:
            return
        title = f"{summary['run_name']}: last epoch, test set"
        self.console.print(result_table(summary, title))
        if self.run_dir is not None:
            self.console.print(f"run folder: {self.run_dir}")
