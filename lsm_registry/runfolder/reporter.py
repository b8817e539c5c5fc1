"""The run folder and the screen: what a run writes and shows, as the engine's reporter.

The engine knows neither the terminal nor the folder layout; it is handed a
:class:`RunReporter`. Files are written with atomic replaces (recipe, summary, CSV)
or whole-line appends (metrics.jsonl), so an interrupted run never leaves a
half-written file behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..checkpoint import check_free_space, estimate_size
from ..engine import Reporter, Trainer
from ..errors import LSMError
from ..files import holds_anything
from ..viz.pictures import MIXED_SAMPLES, draw_mixed_samples
from ..viz.plots import PlotUnavailable, plot_confusion, plot_per_class
from .tracking import LoggerHub, RunFolderLogger, build_loggers, evaluation_metrics, run_info


def fmt_pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def result_table(summary: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    best = "best val top-1 (epoch)" if summary.get("best_on") == "val" else "best top-1 (epoch)"
    fits = "train_top1" in summary
    for column in (
        "top-1",
        "Many",
        "Medium",
        "Few",
        "rarest 3",
        *(("train top-1", "train Few") if fits else ()),
        best,
        "epochs",
        "wall time",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        fmt_pct(summary["top1"]),
        fmt_pct(summary["many"]),
        fmt_pct(summary["medium"]),
        fmt_pct(summary["few"]),
        fmt_pct(summary["rare3"]),
        *((fmt_pct(summary["train_top1"]), fmt_pct(summary["train_few"])) if fits else ()),
        f"{fmt_pct(summary['best_top1'])} ({summary['best_epoch']})",
        str(summary["epochs"]),
        f"{summary['wall_time_s']:.0f} s",
    )
    return table


__all__ = ["RunReporter", "check_writable", "fresh_run_dir", "result_table"]


def fresh_run_dir(base: Path, name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... when a previous run (or a file) already has the name."""
    candidate = base / name
    n = 2
    while holds_anything(candidate):
        candidate = base / f"{name}-{n}"
        n += 1
    return candidate


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise LSMError(f"{folder}: cannot write the run folder ({exc.strerror or exc})") from None


class RunReporter(Reporter):
    """Progress bars on stderr, the result table on stdout; on rank 0 the run folder and the recipe's loggers.

    Everything the run writes goes through a :class:`~lsm_registry.runfolder.tracking.LoggerHub`:
    the run folder's writer first (its errors stop the run), then each tracker of
    ``[run].loggers`` (its errors are reported and it is dropped).
    """

    def __init__(self, console: Optional[Console] = None, show_progress: bool = True):
        self.console = console or Console()
        self.err = Console(stderr=True)
        self.show_progress = show_progress
        self.trainer: Optional[Trainer] = None
        self.run_dir: Optional[Path] = None
        self.resumed = False
        self.plain_epochs = False
        self._wall_before = 0.0
        self.epochs_task = None
        self.steps_task = None
        self.hub = LoggerHub([], self.note)
        self.epoch = 0
        self.steps = 0

    def _make_progress(self, enabled: bool) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            disable=not enabled,
            transient=False,
        )

    def start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.resumed = trainer.resume
        self.run_dir = trainer.run_dir if trainer.dist.is_main else None
        self.progress = self._make_progress(self.show_progress and trainer.dist.is_main)
        # Not a terminal (a log file, CI, nohup): the bars draw nothing useful there, so
        # log() prints one plain line per epoch on rank 0 instead, even with --no-progress.
        self.plain_epochs = trainer.dist.is_main and not self.err.is_terminal
        self._wall_before = float(trainer.history[-1]["wall_s"]) if trainer.history else 0.0
        if trainer.dist.is_main:
            self.hub = self._make_hub(trainer)
            steps = trainer.sampler.steps_per_epoch(trainer.recipe.optim.batch_size)
            self.hub.call(
                "start",
                run_info(
                    trainer.recipe, self.run_dir, trainer.data.class_names, trainer.class_counts, steps, self.resumed
                ),
            )
        self.progress.start()
        epochs = self.trainer.recipe.run.epochs
        self.epochs_task = self.progress.add_task("epochs", total=epochs, completed=len(self.trainer.history), info="")

    def _make_hub(self, trainer: Trainer) -> LoggerHub:
        trackers = build_loggers(trainer.recipe, trainer.registry, trainer.context)
        if self.run_dir is None:
            return LoggerHub(trackers, self.note)
        done = list(trainer.history) if self.resumed else []
        folder = RunFolderLogger(self.run_dir, done)
        return LoggerHub([folder, *trackers], self.note, required=(folder,))

    def stop(self, completed: bool = False) -> None:
        self.progress.stop()
        if not completed:
            self.hub.close()  # stopped or failed: finish() will not come

    def note(self, text: str) -> None:
        if self.trainer is None or self.trainer.dist.is_main:
            self.err.print(f"warning: {text}", highlight=False, soft_wrap=True)

    def global_step(self, step: int) -> int:
        return self.epoch * self.steps + step

    def start_epoch(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps = epoch, steps
        if self.steps_task is not None:
            self.progress.remove_task(self.steps_task)
        self.steps_task = self.progress.add_task(f"epoch {epoch + 1}", total=steps, info="")

    def advance(self, step: int, scalars: dict[str, Optional[float]]) -> None:
        self.progress.update(
            self.steps_task,
            completed=step,
            info=f"loss {scalars['loss']:.4f}  lr {scalars['lr']:.4g}  {scalars['images_per_s']:.0f} img/s",
        )
        self.hub.call(
            "log_scalars", self.global_step(step), {f"train/{k}": v for k, v in scalars.items() if v is not None}
        )

    def evaluated(self, record: dict[str, Any]) -> None:
        if not self.trainer.dist.is_main:
            return
        names = self.trainer.data.class_names
        self.hub.call(
            "log_evaluation",
            self.global_step(self.steps),
            record["epoch"],
            evaluation_metrics(record),
            dict(zip(names, record["per_class"])),
        )
        self.progress.console.print(
            f"epoch {record['epoch']}: top-1 {fmt_pct(record['top1'])}  Many {fmt_pct(record['many'])}  "
            f"Medium {fmt_pct(record['medium'])}  Few {fmt_pct(record['few'])}  loss {record['train_loss']:.4f}"
            + (
                f"  train top-1 {fmt_pct(record['train_top1'])}  train Few {fmt_pct(record['train_few'])}"
                if "train_top1" in record
                else ""
            )
        )

    def epoch_line(self, record: dict[str, Any]) -> str:
        """``epoch 3/200  loss 1.2345  lr 0.1  2210 img/s  41.2 s (total 123 s)  mixed 50%``."""
        epoch_s = float(record["wall_s"]) - self._wall_before
        line = (
            f"epoch {record['epoch']}/{self.trainer.recipe.run.epochs}  loss {record['train_loss']:.4f}  "
            f"lr {record['lr']:.4g}  {record['images_per_s']:.0f} img/s  {epoch_s:.1f} s (total {record['wall_s']:.0f} s)"
        )
        if record.get("mixed_fraction"):
            line += f"  mixed {100 * record['mixed_fraction']:.0f}%"
        return line

    def log(self, record: dict[str, Any]) -> None:
        self.progress.update(self.epochs_task, advance=1, info=f"loss {record['train_loss']:.4f}")
        if self.plain_epochs:
            self.err.print(self.epoch_line(record), highlight=False, soft_wrap=True)
        self._wall_before = float(record["wall_s"])
        self.hub.call("log_record", record)

    def write_pictures(self, summary: dict[str, Any]) -> None:
        """per_class.png, confusion.png and, for mixing recipes, mixed_samples.png."""
        trainer = self.trainer
        try:
            plot_per_class(summary, self.run_dir / "per_class.png")
            if trainer.confusion is not None:
                plot_confusion(
                    trainer.confusion.tolist(),
                    summary["class_names"],
                    self.run_dir / "confusion.png",
                    title=f"{summary['run_name']}: confusion matrix, last epoch (row-normalised)",
                )
        except PlotUnavailable as exc:
            self.console.print(f"note: {exc}", highlight=False)
        except OSError as exc:  # a picture must never fail a finished run (a full disk, say)
            self.console.print(
                f"note: pictures not written ({exc.strerror or exc}); summary.json and the checkpoint are complete",
                highlight=False,
            )
        if trainer.mixer is not None:
            try:
                if draw_mixed_samples(trainer, self.run_dir / MIXED_SAMPLES) is None:
                    self.console.print(
                        f"note: {MIXED_SAMPLES} not drawn: no batch was mixed in this run"
                        + (" since it was resumed" if self.resumed else ""),
                        highlight=False,
                    )
            except Exception as exc:  # a picture must never fail a finished run
                self.console.print(f"note: {MIXED_SAMPLES} not drawn ({type(exc).__name__}: {exc})", highlight=False)

    def finish(self, summary: dict[str, Any]) -> None:
        try:
            self.hub.call("finish", summary)  # the run folder's summary.json first
            if self.run_dir is not None:
                self.write_pictures(summary)
                step = self.global_step(self.steps)
                for picture in ("per_class.png", "confusion.png", MIXED_SAMPLES):
                    if (self.run_dir / picture).is_file():
                        self.hub.call("log_image", Path(picture).stem, self.run_dir / picture, step)
        finally:
            self.hub.close()
        if not self.trainer.dist.is_main:
            return
        title = f"{summary['run_name']}: last epoch, test set"
        self.console.print(result_table(summary, title))
        if self.run_dir is not None:
            self.console.print(f"run folder: {self.run_dir}")
            if (self.run_dir / MIXED_SAMPLES).is_file():
                self.console.print(f"mixed samples: {self.run_dir / MIXED_SAMPLES}")


def fit_into(trainer: Trainer, run_dir: Path, reporter: RunReporter) -> dict[str, Any]:
    """Train ``trainer`` into ``run_dir``: the folder checked for write access and for room for a
    checkpoint (on the main process) before the first step; the summary. ``lsm run``,
    ``lsm resume`` and :func:`lsm_registry.train` all train through here."""
    if trainer.dist.is_main:
        check_writable(run_dir)
        check_free_space(run_dir, estimate_size(trainer.module))
    trainer.run_dir = run_dir
    return trainer.fit(reporter)
