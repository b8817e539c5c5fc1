"""Built-in loggers: TensorBoard, MLflow and Weights & Biases, each an optional extra.

The trackers' packages are imported when a run starts, not at import time: a machine
without them still lists these loggers, and a recipe that asks for one gets the
install hint before training (``Logger.requires`` / ``install_hint``). Each logger
keeps what it needs to continue the same tracker run after ``lsm resume`` (its run
id) under ``RUN_DIR/loggers/<name>/``.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional

import attrs
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from ..files import atomic_write
from ..interfaces import Logger, RunInfo
from ..params import param

#: Scalars of the summary that a tracker shows as the run's final figures.
SUMMARY_SCALARS = (
    "top1",
    "many",
    "medium",
    "few",
    "rare3",
    "best_top1",
    "best_epoch",
    "val_top1",
    "wall_time_s",
    "final_loss",
)


def own_folder(run: RunInfo, name: str, override: str = "") -> Path:
    """Where logger ``name`` writes: ``override`` when set, else RUN_DIR/loggers/<name>."""
    if override:
        return Path(override)
    if run.run_dir is None:
        raise ValueError(
            f"logger {name!r} writes under the run folder, and this run has none; set [loggers.{name}] of a folder"
        )
    return run.run_dir / "loggers" / name


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    return {f"summary/{k}": float(summary[k]) for k in SUMMARY_SCALARS if isinstance(summary.get(k), (int, float))}


def _state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _save_state(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "state.json", json.dumps(state, indent=2) + "\n")


def _scalar_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """Trackers that take only scalars get tuples and None as text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}


class ScalarTracker(Logger):
    """A tracker that takes an evaluation as more scalars at the same step (all three built-ins).

    Subclasses implement ``log_scalars`` and have a ``per_class`` parameter;
    ``epoch_type`` is how the tracker stores the epoch number.
    """

    epoch_type: type = float

    def log_evaluation(
        self, step: int, epoch: int, metrics: dict[str, float], per_class: dict[str, Optional[float]]
    ) -> None:
        values: dict[str, Any] = {**metrics, "epoch": self.epoch_type(epoch)}
        if self.params.per_class:
            values.update({f"per_class/{name}": v for name, v in per_class.items() if v is not None})
        self.log_scalars(step, values)


class TensorBoard(ScalarTracker):
    """TensorBoard event files in the run folder (torch.utils.tensorboard): `tensorboard --logdir runs`.

    The files sit in the run folder itself, not below it: TensorBoard names a run by the
    folder that holds its event files, so each run shows under its run folder's name."""

    name = "tensorboard"
    requires = ("tensorboard",)
    install_hint = "pip install 'lsm-registry[tensorboard]'"

    @attrs.frozen
    class Params:
        log_dir: str = param(
            "", help="folder of the event files (default: the run folder, so TensorBoard names the run after it)"
        )
        per_class: bool = param(True, help="also write each class's test accuracy, as per_class/<class name>")

    def start(self, run: RunInfo) -> None:
        tensorboard = importlib.import_module("torch.utils.tensorboard")
        if self.params.log_dir:
            self.folder = Path(self.params.log_dir)
        elif run.run_dir is not None:
            self.folder = Path(run.run_dir)
        else:
            raise ValueError(
                "logger 'tensorboard' writes into the run folder, and this run has none; "
                "set [loggers.tensorboard] log_dir"
            )
        self.writer = tensorboard.SummaryWriter(log_dir=str(self.folder))
        self.hparams = _scalar_hparams(run.hparams)
        # Markdown: four-space indentation keeps the TOML as code.
        self.writer.add_text("recipe", "\n".join("    " + line for line in run.recipe_toml.splitlines()), 0)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        with Image.open(path) as picture:
            self.writer.add_image(f"pictures/{name}", pil_to_tensor(picture.convert("RGB")), step)

    def finish(self, summary: dict[str, Any]) -> None:
        # The HParams dashboard: the setting beside the final figures, one row per run.
        self.writer.add_hparams(self.hparams, summary_scalars(summary), run_name=".")

    def close(self) -> None:
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()


def _metric_key(key: str) -> str:
    """MLflow keys allow letters, digits and ``_ - . / : space`` only."""
    return re.sub(r"[^\w\-. /:]", "_", key)


def default_store(run_dir: Optional[Path]) -> Optional[str]:
    """MLflow's store beside the run folders (``runs/mlflow.db``, artifacts in ``runs/mlartifacts``),
    not in the working directory; None (MLflow's own default) without a run folder."""
    if run_dir is None:
        return None
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def model_checkpoints(run_dir: Optional[Path]) -> list[Path]:
    """The run's newest epoch checkpoint and its best.pt, those that exist."""
    folder = run_dir / "checkpoints" if run_dir is not None else None
    if folder is None or not folder.is_dir():
        return []

    def position(path: Path) -> tuple[int, int]:  # epoch-0004.pt, epoch-0004-step-12.pt (12 steps into epoch 5)
        numbers = [int(n) for n in re.findall(r"\d+", path.stem)]
        return numbers[0], numbers[1] if len(numbers) > 1 else 0

    epochs = sorted(folder.glob("epoch-*.pt"), key=position)
    return [p for p in (epochs[-1:] + [folder / "best.pt"]) if p.is_file()]


def source_tags() -> dict[str, str]:
    """MLflow's own source tags: the command line and, inside a git checkout, the commit."""
    tags = {"mlflow.source.name": sys.argv[0] if sys.argv else "", "lsm.command": " ".join(sys.argv)[:5000]}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0 and commit.stdout.strip():
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


class MLflow(ScalarTracker):
    """An MLflow run: parameters, metrics per step, pictures as artifacts (`mlflow ui`)."""

    name = "mlflow"
    requires = ("mlflow",)
    install_hint = "pip install 'lsm-registry[mlflow]'"

    @attrs.frozen
    class Params:
        tracking_uri: str = param(
            "",
            help="tracking server, e.g. http://127.0.0.1:5000 (default: a local store, "
            "mlflow.db in the folder that holds the run folder, runs/ by default)",
        )
        experiment: str = param("lsm", help="experiment name, made when it does not exist")
        per_class: bool = param(True, help="also log each class's test accuracy, as per_class/<class name>")
        log_model: bool = param(
            True,
            help="at the end, log the newest checkpoint and checkpoints/best.pt as artifacts "
            "under checkpoints/ (`lsm export` turns either into model files)",
        )

    def start(self, run: RunInfo) -> None:
        tracking = importlib.import_module("mlflow.tracking")
        self.run_dir = Path(run.run_dir) if run.run_dir is not None else None
        self.entities = importlib.import_module("mlflow.entities")
        self.client = tracking.MlflowClient(tracking_uri=self.params.tracking_uri or default_store(run.run_dir))
        self.folder = run.run_dir / "loggers" / self.name if run.run_dir is not None else None
        state = _state(self.folder) if self.folder is not None and run.resumed else {}
        self.finished = False
        if state.get("run_id") and state.get("tracking_uri") == self.client.tracking_uri:
            self.run_id = state["run_id"]  # a resumed run continues its MLflow run
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.params.experiment)
        # With the default store the artifacts go beside it too (MLflow's default is ./mlruns).
        local = (
            {"artifact_location": (Path(run.run_dir).resolve().parent / "mlartifacts").as_uri()}
            if not self.params.tracking_uri and run.run_dir is not None
            else {}
        )
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(self.params.experiment, **local)
        )
        tags = {**source_tags(), **({"lsm.run_dir": str(run.run_dir)} if run.run_dir is not None else {})}
        self.run_id = self.client.create_run(experiment_id, run_name=run.run_name, tags=tags).info.run_id
        if self.folder is not None:
            _save_state(self.folder, {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri})
        params = [self.entities.Param(_metric_key(k), str(v)[:6000]) for k, v in run.hparams.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, run.recipe_toml, "recipe.toml")

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(_metric_key(k), float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="pictures")

    def finish(self, summary: dict[str, Any]) -> None:
        self.log_scalars(int(summary.get("epochs", 0)), summary_scalars(summary))
        self.client.log_dict(self.run_id, summary, "summary.json")
        if self.params.log_model:
            for path in model_checkpoints(self.run_dir):
                self.client.log_artifact(self.run_id, str(path), artifact_path="checkpoints")
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True

    def close(self) -> None:
        if getattr(self, "run_id", None) and not self.finished:
            self.client.set_terminated(self.run_id, "KILLED")  # stopped or failed: `lsm resume` continues it


class WandB(ScalarTracker):
    """A Weights & Biases run, offline by default: nothing leaves the machine unless mode = "online"."""

    name = "wandb"
    requires = ("wandb",)
    install_hint = "pip install 'lsm-registry[wandb]'"
    epoch_type = int

    @attrs.frozen
    class Params:
        project: str = param("lsm", help="W&B project")
        entity: str = param("", help="W&B entity (team or user; default: yours)")
        mode: Literal["offline", "online", "disabled"] = param(
            "offline", help='"offline" writes under the run folder; `wandb sync` uploads it later'
        )
        per_class: bool = param(True, help="also log each class's test accuracy, as per_class/<class name>")

    def start(self, run: RunInfo) -> None:
        self.wandb = importlib.import_module("wandb")
        folder = own_folder(run, self.name)
        state = _state(folder) if run.resumed else {}
        run_id = state.get("run_id") or uuid.uuid4().hex[:12]
        folder.mkdir(parents=True, exist_ok=True)
        _save_state(folder, {"run_id": run_id})
        self.run = self.wandb.init(
            project=self.params.project,
            entity=self.params.entity or None,
            name=run.run_name,
            id=run_id,
            resume="allow",
            dir=str(folder),
            mode=self.params.mode,
            config=run.hparams,
            settings=self.wandb.Settings(silent=True, console="off"),
        )
        self.finished = False

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.run.log({f"pictures/{name}": self.wandb.Image(str(path))}, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(summary_scalars(summary))
        self.finished = True

    def close(self) -> None:
        run = getattr(self, "run", None)
        if run is not None:
            run.finish(exit_code=0 if self.finished else 1)


COMPONENTS = [TensorBoard, MLflow, WandB]
