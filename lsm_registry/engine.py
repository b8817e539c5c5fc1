"""The one training engine: every recipe, baseline and ablation runs through ``Trainer``.

Step: data -> sampler -> (saliency -> patch -> mixer -> label fuser, when a mixer is
configured) -> optimizer step (model -> loss -> backward, once or more) -> SGD update. Tensors stay on the device from the fetch to the
loss; the only host synchronisations are the progress-bar updates every
``LOG_EVERY`` steps and the per-batch mixing coin, which is drawn on the CPU
generator (no device sync).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import (CHECKPOINT_DIR, ResumeError, checkpoint_name, list_checkpoints, load_latest, prune, recipe_diff,
                         rng_state, save_atomic, set_rng_state)
from .data.augment import augment_with_crops, stats_tensor, normalise
from .data.prefetch import LoadedStep, PlannedLoader, PlannedStep, plan_epoch
from .errors import DataError, LSMError
from .files import FolderLock
from .interfaces import Context, Crops, Head, Loss, LTData, Optimizer, Split, StepClosure, Views
from .metrics import summarise_counts
from .mixing import MixedBatch, MixingStep, foreground_order
from .formats import CHECKPOINT_FORMAT, RECIPE_FORMAT, format_problem
from .recipe import Recipe, migrate, without_loggers
from .registry import Registry
from .stages import batch_norms, load_parent, set_train_mode, trainable_parameters

LOG_EVERY = 10
PICTURE_ROWS = 8  # rows of the last mixed batch kept for mixed_samples.png
MAX_CONFUSION_CLASSES = 1000  # beyond this the confusion matrix is not kept


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LSMError(f'[run].device = "{spec}" but CUDA is not available here; use "cpu" or "auto"')
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LSMError(f'[run].device = "{spec}" but this machine has {torch.cuda.device_count()} GPU(s)')
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The engine generator is re-seeded per epoch, so an epoch replays exactly on resume."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % 2**63


#: What a training checkpoint must hold, with the type of each (checked before anything is loaded).
CHECKPOINT_KEYS = {"model": dict, "optimizer": dict, "recipe": dict, "epoch": int, "step": int, "history": list,
                   "best": (list, tuple), "rng": dict, "scaler": dict}


def checkpoint_structure_problem(state: Any) -> Optional[str]:
    """Why ``state`` (a weights-only load) cannot be a training checkpoint, or None."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a dict"
    for key, kind in CHECKPOINT_KEYS.items():
        if key not in state:
            return f"no {key!r}"
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key!r} is a {type(value).__name__}"
    if state["epoch"] < 0 or state["step"] < 0:
        return "a negative epoch or step"
    if len(state["best"]) != 2:
        return "'best' is not (top-1, epoch)"
    return None


def build_data(recipe: Recipe, registry: Registry) -> LTData:
    """The recipe's data set; a missing file or a bad value becomes one line naming the data set."""
    spec = recipe.data
    factory = spec.build(registry, Context(class_counts=(), image_size=(0, 0, 0), seed=recipe.run.seed))
    try:
        return factory.build()
    except (FileNotFoundError, ValueError, OSError) as exc:
        message = str(exc) if not isinstance(exc, FileNotFoundError) or str(exc) else f"missing file {exc.filename}"
        raise DataError(f"[data] {spec.name}: {message}") from None


@torch.no_grad()
def score_split(module: nn.Module, split: Split, loss: Loss, num_classes: int, mean: Tensor, std: Tensor,
                device: torch.device, indices: Tensor, batch_size: int = 512,
                memory_format: torch.memory_format = torch.contiguous_format, autocast_dtype: Optional[torch.dtype] = None,
                confusion: bool = False, on_logits: Optional[Callable[[Tensor, Tensor], None]] = None,
                ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-class correct and total counts of ``module`` on the images ``indices`` of ``split``, and the
    flat confusion counts when asked; one function, so that ``Trainer.evaluate`` and ``lsm evaluate``
    score alike. ``on_logits(indices, logits)`` sees each batch's prediction logits (on the device)."""
    was_training = module.training
    module.eval()
    correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
    total = torch.zeros(num_classes, dtype=torch.int64, device=device)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device) if confusion else None
    for start in range(0, indices.numel(), batch_size):
        idx = indices[start : start + batch_size]
        raw = split.fetch(idx, device)
        x = normalise(raw, mean, std).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = module(x)
        logits = loss.eval_logits(logits.float())
        if on_logits is not None:
            on_logits(idx, logits)
        pred = logits.argmax(dim=1)
        labels = split.labels[idx].to(device)
        correct += torch.bincount(labels[pred == labels], minlength=num_classes)
        total += torch.bincount(labels, minlength=num_classes)
        if counts is not None:
            counts += torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    module.train(was_training)
    return correct, total, counts


# ------------------------------------------------------------------------------ trainer


class _Closure(StepClosure):
    """One step's batch for the optimizer: zero the gradients, forward, loss, backward."""

    def __init__(self, trainer: "Trainer", x: Tensor, target: Tensor, mixed: Optional[MixedBatch]):
        self.trainer, self.x, self.target, self.mixed = trainer, x, target, mixed
        self.calls = 0

    def __call__(self, head: Optional[Head] = None) -> Tensor:
        t = self.trainer
        t.optimizer.base.zero_grad(set_to_none=True)
        with t.held_batch_norm() if self.calls else contextlib.nullcontext():
            loss = t.forward_loss(self.x, self.target, self.mixed, head)
            t.scaler.scale(loss).backward()
        self.calls += 1
        return loss.detach()


class TrainingError(LSMError):
    """Training cannot go on (non-finite loss); the last good checkpoint is kept."""

    exit_code = 3


class Interrupted(LSMError):
    """SIGINT / SIGTERM: a checkpoint was written and the run stopped cleanly."""

    exit_code = 130


@attrs.define
class StepStats:
    """Device-side accumulators: read once per log interval, not per step."""

    loss_sum: Tensor
    mixed: Tensor
    fg_weight_sum: Tensor
    bad_step: Tensor
    steps: int = 0
    images: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> "StepStats":
        zero = torch.zeros((), device=device)
        return cls(zero.clone(), zero.clone(), zero.clone(), torch.full((), -1, device=device, dtype=torch.int64))

    def to_state(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.cpu(), "mixed": self.mixed.cpu(), "fg_weight_sum": self.fg_weight_sum.cpu(),
                "steps": self.steps, "images": self.images}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "StepStats":
        stats = cls.zeros(device)
        stats.loss_sum, stats.mixed, stats.fg_weight_sum = (state[k].to(device) for k in ("loss_sum", "mixed", "fg_weight_sum"))
        stats.steps, stats.images = state["steps"], state["images"]
        return stats


@attrs.frozen
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size from torchrun's environment (one process when absent)."""
    env = os.environ
    return DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


class Reporter:
    """What the engine tells the outside world; this base says nothing and writes nothing.

    The engine is handed a reporter instead of knowing the screen or the run folder:
    :class:`lsm_registry.reporting.RunReporter` draws progress and writes the run
    folder; tests and benchmarks train with this silent one. Only rank 0's reporter
    should write.
    """

    def start(self, trainer: "Trainer") -> None:
        """Training starts (or resumes: ``trainer.history`` holds the epochs already done)."""

    def start_epoch(self, epoch: int, steps: int) -> None:
        """0-based ``epoch`` starts with ``steps`` steps."""

    def advance(self, step: int, scalars: dict[str, Optional[float]]) -> None:
        """Every ``LOG_EVERY`` steps, running values of the epoch so far: ``loss`` (mean),
        ``lr``, ``images_per_s``, ``mixed_fraction`` (of the steps) and ``fg_label_weight``
        (mean foreground label weight of the mixed batches; None before one was mixed)."""

    def evaluated(self, record: dict[str, Any]) -> None:
        """An evaluation finished; ``record`` has the epoch's metrics."""

    def log(self, record: dict[str, Any]) -> None:
        """An epoch finished; ``record`` is what metrics.jsonl gets."""

    def note(self, text: str) -> None:
        """Something the user should know that does not stop the run."""

    def stop(self, completed: bool = False) -> None:
        """Training left its loop: ``completed`` when every epoch ran and ``finish`` follows,
        False when it stopped (a signal) or failed, and ``finish`` will not come."""

    def finish(self, summary: dict[str, Any]) -> None:
        """The run finished; ``summary`` is what summary.json gets."""


class Trainer:
    """Builds every component from a recipe and trains; ``fit()`` returns the summary.

    ``run_dir`` None trains without writing anything (tests, benchmarks). With a run
    folder, a checkpoint is written atomically after every epoch (the newest ``keep``
    are kept) and on SIGINT / SIGTERM; ``resume=True`` continues from the newest one.
    """

    def __init__(self, recipe: Recipe, registry: Registry, run_dir: Optional[Path] = None, keep: Optional[int] = None,
                 resume: bool = False):
        self.recipe = recipe
        self.registry = registry
        self.run_dir = run_dir
        # None: the run's own count (stored in its checkpoints) on resume, else 1.
        self.keep_asked = keep
        self.keep = keep if keep is not None else 1
        self.resume = resume
        self.dist = dist_info()
        run = recipe.run
        self.device = resolve_device(run.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if run.amp != "none" and self.device.type != "cuda":
            raise LSMError(f'[run].amp = "{run.amp}" needs a CUDA device (device is {self.device})')
        seed_everything(run.seed)
        self.data = self._build_data()
        self.class_counts = self.data.class_counts()
        if min(self.class_counts) == 0:
            empty = [self.data.class_names[c] for c, n in enumerate(self.class_counts) if n == 0]
            raise DataError(f"[data] {recipe.data.name}: no training image left for class(es) {', '.join(empty[:5])}")
        self._check_batch_size()
        self.generator = torch.Generator().manual_seed(run.seed)
        self.context = Context(
            class_counts=self.class_counts,
            image_size=self.data.image_size,
            device=self.device,
            generator=self.generator,
            epochs=run.epochs,
            seed=run.seed,
        )
        self.loss = recipe.loss.build(registry, self.context)
        factory = recipe.model.build(registry, self.context)
        try:
            factory.check_input(self.data.image_size)
            self.module = factory.build(self.data.num_classes, self.data.image_size[0], self.loss.needs_normed_head)
        except ValueError as exc:
            raise LSMError(f"[model] {recipe.model.name}: {exc}") from None
        self.memory_format = torch.channels_last if run.channels_last else torch.contiguous_format
        self.module = self.module.to(self.device).to(memory_format=self.memory_format)
        # A stage's parent weights are loaded only on a fresh start; a resume loads the
        # run's own checkpoint, which already holds them (the parent may be gone by then).
        self.parent: Optional[dict[str, Any]] = None
        if recipe.stage.init_from is not None and not resume:
            self.parent = load_parent(recipe, self.module, self.data.num_classes)
        trainable_parameters(self.module, recipe)
        self.sampler = recipe.sampler.build(registry, self.context, self.data.train.labels, self.dist.rank, self.dist.world_size)
        self.mixer = recipe.mixer.build(registry, self.context) if recipe.mixer else None
        self.patch = recipe.patch.build(registry, self.context) if recipe.patch else None
        self.saliency = recipe.saliency.build(registry, self.context) if recipe.saliency else None
        self.fuser = recipe.label_fuser.build(registry, self.context) if recipe.label_fuser else None
        self.mixing = MixingStep(self.mixer, self.fuser, self.patch, self.saliency) if self.mixer is not None else None
        self.last_mixed: Optional[MixedBatch] = None
        if self.mixer is not None and self.patch is not None and (self.mixer.uses_patch or self.saliency is not None):
            _, h, w = self.data.image_size
            try:
                self.patch.grid(h, w)
            except ValueError as exc:
                raise LSMError(f"[patch] {recipe.patch.name}: {exc}") from None
        if self.saliency is not None:
            try:
                self.saliency.check_model(self.module)
            except ValueError as exc:
                raise LSMError(f"{recipe.path} [saliency]: {exc}") from None
        self.model: nn.Module = self._wrap_distributed(self.module)
        # A provider that observes training forwards gets the observed layer's output of the
        # first forward of every unmixed step (_observe_output), armed by train_step only.
        self.observing = self.saliency is not None and self.saliency.observes_training
        self._armed: Optional[tuple[Tensor, Views]] = None
        if self.observing:
            self.saliency.observed_layer(self.module).register_forward_hook(self._observe_output)
        opt = recipe.optim
        base = torch.optim.SGD(
            [p for p in self.module.parameters() if p.requires_grad], lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=opt.nesterov and opt.momentum > 0
        )
        # The optimizer component owns the step's passes; its update is always the SGD above.
        spec = recipe.optimizer
        self.optimizer: Optimizer = registry.get("optimizer", spec.name)(spec.params, self.context, base)
        self.needs_features = self.loss.needs_features or self.optimizer.needs_features
        if self.needs_features:
            self._check_feature_api()
        try:
            self.optimizer.attach(self.module)
        except ValueError as exc:
            raise LSMError(f"{recipe.path} [optim] {spec.name}: {exc}") from None
        self._batch_norms = batch_norms(self.module)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=run.amp == "fp16")
        self.labels_on_device = self.data.train.labels.to(self.device)
        # Normalisation constants live on the device once, not one host copy per batch.
        self.mean = stats_tensor(self.data.mean, self.device)
        self.std = stats_tensor(self.data.std, self.device)
        self.history: list[dict[str, Any]] = []
        self.best_top1, self.best_epoch = -1.0, -1
        self._stop_signal: Optional[int] = None
        self.confusion: Optional[Tensor] = None
        # Per image, the crop and flip of this step's background and foreground batches (the
        # foreground's is None when it is the background permuted or there is none).
        self.crops: tuple[Optional[Crops], Optional[Crops]] = (None, None)
        self._loader: Optional[PlannedLoader] = None

    def _check_feature_api(self) -> None:
        """A loss or optimizer that reads the features needs the model's documented feature API."""
        who = " and ".join(w for w, needs in ((f"loss {self.recipe.loss.name!r}", self.loss.needs_features),
                                               (f"optimizer {self.recipe.optimizer.name!r}", self.optimizer.needs_features)) if needs)
        if not (callable(getattr(self.module, "forward_features", None)) and isinstance(getattr(self.module, "classifier", None), nn.Module)):
            raise LSMError(f"{self.recipe.path} [model] {self.recipe.model.name}: {who} reads the features the classifier "
                           "sees, and this model has no forward_features(x) and classifier (docs/plugins.md, the model contract)")
        if self.dist.enabled:
            raise LSMError(f"{self.recipe.path}: {who} reads the model's features, which bypasses DistributedDataParallel's "
                           "gradient synchronisation; run it in one process")

    def _check_batch_size(self) -> None:
        """A batch larger than the training shard would train on a short batch every step, silently."""
        batch_size, shard = self.recipe.optim.batch_size, len(self.data.train) // self.dist.world_size
        if batch_size > shard:
            where = f"{shard} images per process" if self.dist.enabled else f"{shard} images"
            raise LSMError(f"{self.recipe.path} [optim].batch_size = {batch_size} is larger than the training set of "
                           f"{self.recipe.data.name} ({where}); lower optim.batch_size")

    def _build_data(self) -> LTData:
        return build_data(self.recipe, self.registry)

    def _wrap_distributed(self, module: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return module
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            self.module = module
            return nn.parallel.DistributedDataParallel(module, device_ids=[self.device.index])
        # CPU: SyncBatchNorm needs CUDA; DDP broadcasts rank 0's batch-norm buffers every
        # forward instead, so every process evaluates with the same statistics.
        return nn.parallel.DistributedDataParallel(module)

    def _close_distributed(self) -> None:
        if self.dist.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()

    def _all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        if not self.dist.enabled:
            return tensor
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor

    # -------------------------------------------------------------- schedule

    def lr_at(self, epoch: int) -> float:
        """Linear warm-up over ``warmup_epochs`` then step milestones or cosine (per epoch)."""
        opt = self.recipe.optim
        if epoch < opt.warmup_epochs:
            return opt.lr * (epoch + 1) / opt.warmup_epochs
        if opt.schedule == "cosine":
            span = max(1, self.recipe.run.epochs - opt.warmup_epochs)
            return 0.5 * opt.lr * (1 + math.cos(math.pi * (epoch - opt.warmup_epochs) / span))
        passed = sum(1 for m in opt.milestones if epoch >= m)
        return opt.lr * opt.gamma**passed

    # -------------------------------------------------------------- step

    def prepare(self, idx: Tensor, fetched: Optional[tuple[Tensor, Crops]] = None) -> tuple[Tensor, Tensor]:
        x, y, _ = self.prepare_with_crops(idx, fetched)
        return x, y

    def prepare_with_crops(self, idx: Tensor, fetched: Optional[tuple[Tensor, Crops]] = None) -> tuple[Tensor, Tensor, Crops]:
        """Augmented, normalised images, labels and per-image crops of the training indices ``idx``.

        ``fetched``: uint8 crops the split already cut while decoding (the planned loader's);
        without them a split that crops while decoding (``augment = "decoded"``) is asked
        for its crops with a seed drawn from the engine generator, and any other is
        fetched and augmented on the device.
        """
        if fetched is None and self.data.augment == "decoded":
            seed = int(torch.randint(0, 2**62, (), generator=self.generator))
            fetched = self.data.train.fetch_train(idx, seed)  # type: ignore[attr-defined]
        if fetched is not None:
            raw, crops = fetched
            x = normalise(raw.to(self.device, non_blocking=True), self.mean, self.std)
        else:
            augmented, crops = augment_with_crops(self.data.train.fetch(idx, self.device), self.data.augment, self.generator)
            x = normalise(augmented, self.mean, self.std)
        return x.contiguous(memory_format=self.memory_format), self.labels_on_device[idx.to(self.device)], crops

    def mixed_batch(self, epoch: int, xb: Tensor, yb: Tensor, fg: Optional[Tensor],
                    loaded: Optional[LoadedStep] = None, views_b: Optional[Views] = None) -> Optional[MixedBatch]:
        """The mixed batch when this epoch's window and this batch's coin say so, else None.

        ``loaded``: the planned step, whose coin was drawn with the plan and whose
        foreground (when it mixes) is already decoded. ``views_b``: the background's
        views, for the saliency provider (crops to mask, maps to reuse).
        """
        mixer = self.mixer
        if mixer is None or not (loaded.plan.mix if loaded is not None else mixer.active(epoch) and mixer.coin()):
            return None
        crops_b = self.crops[0]
        xf, yf, crops_f, views_f = self.foreground(epoch, xb, yb, fg, crops_b, views_b,
                                                   loaded.fg if loaded is not None else None)
        self.crops = (crops_b, crops_f)
        return self.mixing(self.module, xb, yb, xf, yf, views_f=views_f, views_b=views_b)

    def foreground(self, epoch: int, xb: Tensor, yb: Tensor, fg: Optional[Tensor], crops_b: Optional[Crops],
                   views_b: Optional[Views], fetched: Optional[tuple[Tensor, Crops]] = None,
                   ) -> tuple[Tensor, Tensor, Optional[Crops], Optional[Views]]:
        """The foreground of a mix, with its crops and (for a saliency provider) views: the batch
        itself in a drawn order for a single-branch sampler, else the foreground indices ``fg``
        prepared. One place, so that ``lsm preview`` draws what the training step draws."""
        if fg is None:
            order = foreground_order(xb.shape[0], self.generator)
            perm = order.to(xb.device)
            crops_f = crops_b.take(order) if crops_b is not None else None
            return xb[perm], yb[perm], crops_f, views_b.take(order) if views_b is not None else None
        xf, yf, crops_f = self.prepare_with_crops(fg, fetched)
        views_f = Views(fg.to(self.device), crops_f, epoch) if self.saliency is not None else None
        return xf, yf, crops_f, views_f

    def _observe_output(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        """Forward hook on the observed layer: hand one armed forward's output to the provider, once."""
        armed, self._armed = self._armed, None
        if armed is not None:
            labels, views = armed
            with torch.autocast(self.device.type, enabled=False):
                self.saliency.observe(self.module, output.detach(), labels, views)

    def train_step(self, epoch: int, bg: Tensor, fg: Optional[Tensor], stats: StepStats,
                   loaded: Optional[LoadedStep] = None) -> None:
        xb, yb, crops_b = self.prepare_with_crops(bg, loaded.bg if loaded is not None else None)
        self.crops = (crops_b, None)
        views_b = Views(bg.to(self.device), crops_b, epoch) if self.saliency is not None else None
        mixed = self.mixed_batch(epoch, xb, yb, fg, loaded, views_b)
        if mixed is None:
            x, target = xb, yb
            if self.observing and views_b is not None:
                self._armed = (yb, views_b)  # the optimizer's first forward only (SAM makes two)
        else:
            x, target = mixed.images.contiguous(memory_format=self.memory_format), mixed.target
            stats.mixed += 1
            stats.fg_weight_sum += mixed.lam.detach().mean()
            self.last_mixed = mixed.rows(PICTURE_ROWS)  # the run folder's mixed_samples.png: what was really mixed
        set_train_mode(self.model, self.recipe, self._batch_norms)
        loss = self.optimizer.step(_Closure(self, x, target, mixed), self.scaler).detach()
        self._armed = None
        stats.steps += 1
        stats.images += x.shape[0]
        # Remember the first non-finite step without a host sync.
        bad = ~torch.isfinite(loss) & (stats.bad_step < 0)
        stats.bad_step = torch.where(bad, torch.full_like(stats.bad_step, stats.steps), stats.bad_step)
        stats.loss_sum += loss

    def forward_loss(self, x: Tensor, target: Tensor, mixed: Optional[MixedBatch], head: Optional[Head] = None) -> Tensor:
        """The step's loss at the current weights (what the optimizer's closure backpropagates).

        Through the feature API (``classifier(mean of forward_features(x))``) when the loss
        or the optimizer reads the features, else through the (possibly DDP-wrapped) model.
        """
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            if self.needs_features or head is not None:
                h = self.module.forward_features(x).mean(dim=(2, 3))
                logits = self.module.classifier(h)
            else:
                h, logits = None, self.model(x)
        logits = logits.float()
        features = h.float() if h is not None else None
        extra = {"features": features} if self.loss.needs_features else {}

        def loss_of(z: Tensor) -> Tensor:
            return self.loss(z, target, mixed, **extra)

        return head(features, logits, target, loss_of) if head is not None else loss_of(logits)

    @contextlib.contextmanager
    def held_batch_norm(self):
        """Batch-norm running statistics put back after a pass, so a step's repeated passes count its batch once."""
        kept = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                for m in self._batch_norms if m.training and m.track_running_stats and m.running_mean is not None]
        try:
            yield
        finally:
            with torch.no_grad():
                for m, mean, var, tracked in kept:
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(tracked)

    # -------------------------------------------------------------- planned loading

    def plan(self, epoch: int, batch_size: int) -> Optional[list[PlannedStep]]:
        """The epoch's steps, drawn up front, for a training split that crops while decoding; else None.

        Call right after the epoch's re-seed: the mixing coins and crop seeds come from
        the engine generator, so the plan (and a mid-epoch resume, which replans and then
        restores the generator) repeats exactly, and only the steps that mix fetch a
        foreground.
        """
        if self.data.augment != "decoded":
            return None
        batches = list(self.sampler.batches(epoch, batch_size))
        mixer = self.mixer
        coins = [mixer is not None and mixer.active(epoch) and mixer.coin() for _ in batches]
        seeds = torch.randint(0, 2**62, (len(batches), 2), generator=self.generator)
        return plan_epoch(batches, coins, seeds)

    def _steps(self, epoch: int, batch_size: int, plan: Optional[list[PlannedStep]], skip: int):
        """(bg, fg, loaded step or None) from step ``skip`` on: planned steps come decoded ahead by the loader."""
        if plan is None:
            for i, (bg, fg) in enumerate(self.sampler.batches(epoch, batch_size)):
                if i >= skip:
                    yield bg, fg, None
            return
        if self._loader is None:
            split = self.data.train
            # views: prepare_with_crops turns each step's images into a new tensor at once
            self._loader = PlannedLoader(split, split.workers, split.prefetch,  # type: ignore[attr-defined]
                                         pin_memory=self.device.type == "cuda", views=True)
        for loaded in self._loader.run(plan[skip:]):
            yield loaded.plan.bg, loaded.plan.fg, loaded

    def close_loader(self) -> None:
        if self._loader is not None:
            self._loader.close()
            self._loader = None

    # -------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, batch_size: int = 512, split: str = "test") -> dict[str, Any]:
        """Metrics of the test split (or ``split = "val"``: the validation split); under several
        processes each takes a shard and counts are summed. Only the test split sets ``confusion``; ``split = "train"`` scores the training images with the test-time view."""
        if split not in ("test", "val", "train"):
            raise ValueError(f'split must be "test", "val" or "train" (got {split!r})')
        if split == "val" and self.data.val is None:
            raise LSMError(f"[data] {self.recipe.data.name}: no validation split (set val_per_class)")
        test = {"test": self.data.test, "val": self.data.val, "train": self.data.train}[split]
        num_classes = self.data.num_classes
        shard = torch.arange(self.dist.rank, len(test), self.dist.world_size)
        correct, total, confusion = score_split(
            self.module, test, self.loss, num_classes, self.mean, self.std, self.device, shard, batch_size=batch_size,
            memory_format=self.memory_format, autocast_dtype=self.autocast_dtype,
            confusion=num_classes <= MAX_CONFUSION_CLASSES and split == "test")
        if confusion is not None:
            self.confusion = self._all_reduce(confusion).view(num_classes, num_classes).cpu()
        self._all_reduce(correct)
        self._all_reduce(total)
        return summarise_counts(correct, total, self.class_counts)

    # -------------------------------------------------------------- checkpoints

    def _checkpoint_state(self, epoch: int, step: int, stats: Optional[StepStats]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "recipe_format": RECIPE_FORMAT,
            "epoch": epoch,
            "step": step,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "rng": rng_state(),
            "stats": stats.to_state() if stats is not None else None,
            "history": self.history,
            "best": (self.best_top1, self.best_epoch),
            "recipe": self.recipe.to_dict(),
            "world_size": self.dist.world_size,
            "parent": self.parent,
            "saliency": self.saliency.state_dict() if self.saliency is not None else {},
            "keep": self.keep,
            # What the model took from its data, so that evaluate and export need not rebuild it.
            "data": {"class_counts": list(self.class_counts), "class_names": list(self.data.class_names),
                     "mean": [float(v) for v in self.data.mean], "std": [float(v) for v in self.data.std],
                     "image_size": list(self.data.image_size)},
        }

    def save_checkpoint(self, epoch: int, step: int = 0, stats: Optional[StepStats] = None) -> Optional[Path]:
        """Rank 0 writes ``checkpoints/epoch-NNNN[-step-S].pt`` atomically, then prunes old ones."""
        if self.run_dir is None:
            return None
        saliency = self._gather_saliency_state()
        if not self.dist.is_main:
            return None
        path = self.run_dir / CHECKPOINT_DIR / checkpoint_name(epoch, step)
        state = self._checkpoint_state(epoch, step, stats)
        state["saliency"] = saliency
        try:
            save_atomic(state, path)
        except (OSError, RuntimeError) as exc:
            # A full or read-only disk: OSError, or torch's "enforce fail at inline_container.cc"
            # RuntimeError from inside torch.save. The atomic write left the older files intact.
            if isinstance(exc, RuntimeError) and "inline_container" not in str(exc) and "write" not in str(exc):
                raise
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            previous = list_checkpoints(self.run_dir)  # the failed write left none of its own
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise LSMError(f"{path}: cannot write the checkpoint ({reason}); {kept}; free space and continue with: "
                           f"lsm resume {self.run_dir}") from None
        prune(self.run_dir, self.keep)
        return path

    def _gather_saliency_state(self) -> Any:
        """The saliency provider's state; under several processes every rank's, as a list, so that
        each rank resumes with its own (collective: every rank calls save_checkpoint)."""
        if self.saliency is None:
            return {}
        state = self.saliency.state_dict()
        if not self.dist.enabled or not state:
            return state
        import torch.distributed as dist

        states: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(states, {k: v.cpu() if isinstance(v, Tensor) else v for k, v in state.items()})
        return states

    def load_checkpoint(self, reporter: Optional["Reporter"] = None) -> tuple[int, int, Optional[dict[str, Any]]]:
        """Restore the newest checkpoint; returns (completed epochs, step inside the next, its state)."""
        if self.run_dir is None:
            raise ResumeError("resume needs a run folder")
        state, notes = load_latest(self.run_dir, map_location=self.device)
        for note in notes:
            (reporter or Reporter()).note(note)
        if state is None:
            raise ResumeError(f"{self.run_dir}: no checkpoint to resume from (looked in {self.run_dir / 'checkpoints'})")
        folder = self.run_dir / CHECKPOINT_DIR
        if not isinstance(state, dict):  # before state.get below
            raise ResumeError(f"{folder}: the newest checkpoint is not a training checkpoint ({checkpoint_structure_problem(state)})")
        for value, current, where in ((state.get("format"), CHECKPOINT_FORMAT, f"{folder}"),
                                      (state.get("recipe_format"), RECIPE_FORMAT, f"{folder} (its recipe)")):
            problem = format_problem(value, current, where)
            if problem is not None:
                raise ResumeError(problem)
        problem = checkpoint_structure_problem(state)
        if problem is not None:
            raise ResumeError(f"{folder}: the newest checkpoint is not a training checkpoint ({problem})")
        # An older checkpoint's recipe lacks the keys added since: they take their defaults.
        old_recipe = migrate(state["recipe"], self.registry, where=str(folder))
        # Loggers say where the run is watched: adding or removing one on resume is fine.
        changes = recipe_diff(without_loggers(old_recipe), without_loggers(self.recipe.to_dict()), ignore={"run.epochs"})
        if changes:
            raise ResumeError(f"{self.run_dir}: cannot resume, the recipe differs in " + ", ".join(changes))
        if state.get("world_size", 1) != self.dist.world_size:
            raise ResumeError(f"{self.run_dir}: the checkpoint was written by {state['world_size']} process(es), this run has {self.dist.world_size}")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.best_top1, self.best_epoch = state["best"]
        self.parent = state.get("parent")
        if self.keep_asked is None:
            self.keep = max(1, int(state.get("keep", 1)))  # the run's own --keep, unless told otherwise
        saved = state.get("saliency")
        if self.saliency is not None and saved:
            own = saved[self.dist.rank] if isinstance(saved, list) else saved
            self.saliency.load_state_dict({k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in own.items()})
        return state["epoch"], state["step"], state

    # -------------------------------------------------------------- loop

    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, self._request_stop)
        return previous

    def _should_stop(self, at_sync_point: bool) -> bool:
        if not self.dist.enabled:
            return self._stop_signal is not None
        if not at_sync_point:
            return False
        flag = torch.tensor([1 if self._stop_signal is not None else 0], device=self.device)
        return bool(self._all_reduce(flag, "max").item())

    def _check_finite(self, epoch: int, stats: StepStats) -> None:
        bad = int(stats.bad_step)
        if bad >= 0:
            kept = list_checkpoints(self.run_dir) if self.run_dir is not None else []
            where = f"; the last good checkpoint is {kept[-1]}" if kept else ""
            raise TrainingError(f"the loss is not finite at epoch {epoch + 1}, step {bad}; training stopped{where}")

    def _running(self, stats: StepStats, lr: float, t0: float) -> dict[str, Optional[float]]:
        loss_sum, mixed, fg_sum = torch.stack([stats.loss_sum.float(), stats.mixed.float(), stats.fg_weight_sum.float()]).tolist()
        return {
            "loss": loss_sum / stats.steps,
            "lr": lr,
            "images_per_s": stats.images / max(time.perf_counter() - t0, 1e-9),
            "mixed_fraction": mixed / stats.steps,
            "fg_label_weight": fg_sum / mixed if mixed > 0 else None,
        }

    def _saliency_fractions(self) -> dict[str, Optional[float]]:
        """The saliency provider's per-epoch fractions (e.g. fresh Grad-CAM calls), summed over processes."""
        if self.saliency is None:
            return {}
        fractions = self.saliency.epoch_fractions()
        out: dict[str, Optional[float]] = {}
        for name, (num, den) in fractions.items():
            if self.dist.enabled:
                num, den = self._all_reduce(torch.tensor([num, den], dtype=torch.float64, device=self.device)).tolist()
            out[name] = num / den if den > 0 else None
        return out

    def fit(self, reporter: Optional["Reporter"] = None) -> dict[str, Any]:
        """Train to ``run.epochs`` and return the summary; ``reporter`` shows and writes what happens.

        The run folder is locked for the whole call (:class:`FolderLock`, on the main process
        only): a second process training into it stops at once, naming the holder.
        """
        locked = self.run_dir is not None and self.dist.is_main
        with FolderLock(self.run_dir) if locked else contextlib.nullcontext():
            return self._fit(reporter)

    def _fit(self, reporter: Optional["Reporter"]) -> dict[str, Any]:
        reporter = reporter or Reporter()
        run = self.recipe.run
        batch_size = self.recipe.optim.batch_size
        start_epoch, start_step, state = self.load_checkpoint(reporter) if self.resume else (0, 0, None)
        if start_epoch >= run.epochs and start_step == 0:
            raise LSMError(f"{self.run_dir}: the run already finished {start_epoch} epochs; raise run.epochs to continue")
        previous_handlers = self._install_signal_handlers()
        completed = False
        try:
            reporter.start(self)
            try:
                    for epoch in range(start_epoch, run.epochs):
                        skip = start_step if epoch == start_epoch else 0
                        self.generator.manual_seed(epoch_seed(run.seed, epoch))
                        plan = self.plan(epoch, batch_size)
                        if skip:
                            self.generator.set_state(state["generator"])
                            stats = StepStats.from_state(state["stats"], self.device)
                        else:
                            stats = StepStats.zeros(self.device)
                        lr = self.lr_at(epoch)
                        for group in self.optimizer.param_groups:
                            group["lr"] = lr
                        self.loss.set_epoch(epoch)
                        steps = self.sampler.steps_per_epoch(batch_size)
                        reporter.start_epoch(epoch, steps)
                        t0 = time.perf_counter()
                        for bg, fg, loaded in self._steps(epoch, batch_size, plan, skip):
                            self.train_step(epoch, bg, fg, stats, loaded)
                            at_log = stats.steps % LOG_EVERY == 0 or stats.steps == steps
                            if at_log:
                                self._check_finite(epoch, stats)
                                reporter.advance(stats.steps, self._running(stats, lr, t0))
                            if stats.steps < steps and self._should_stop(at_log):
                                self._check_finite(epoch, stats)
                                path = self.save_checkpoint(epoch, stats.steps, stats)
                                raise Interrupted(
                                    f"stopped by signal {signal.Signals(self._stop_signal or signal.SIGINT).name} in epoch {epoch + 1} "
                                    f"at step {stats.steps}; checkpoint {path}; continue with: lsm resume {self.run_dir}"
                                )
                        self._check_finite(epoch, stats)
                        if self.saliency is not None:
                            self.saliency.end_epoch(epoch)
                        elapsed = time.perf_counter() - t0
                        totals = torch.stack([stats.loss_sum.float(), torch.tensor(float(stats.steps), device=self.device), stats.mixed.float(), stats.fg_weight_sum.float()])
                        loss_sum, n_steps, mixed, fg_sum = self._all_reduce(totals).tolist()
                        record: dict[str, Any] = {
                            "epoch": epoch + 1,
                            "lr": lr,
                            "train_loss": loss_sum / max(n_steps, 1),
                            "mixed_fraction": mixed / max(n_steps, 1),
                            "fg_label_weight": fg_sum / mixed if mixed > 0 else None,
                            "images_per_s": stats.images * self.dist.world_size / max(elapsed, 1e-9),
                            "wall_s": (self.history[-1]["wall_s"] if self.history else 0.0) + elapsed,
                            **self._saliency_fractions(),
                        }
                        if (epoch + 1) % run.eval_every == 0 or epoch + 1 == run.epochs:
                            result = self.evaluate()
                            record.update({k: v for k, v in result.items() if k != "per_class"})
                            record["per_class"] = result["per_class"]
                            score = result["top1"]
                            if self.data.val is not None:
                                val = self.evaluate(split="val")
                                record.update({f"val_{k}": v for k, v in val.items() if k != "per_class"})
                                score = val["top1"]
                            if run.score_train:
                                fit = self.evaluate(split="train")
                                record.update({f"train_{k}": v for k, v in fit.items() if k != "per_class"})
                                record["train_per_class"] = fit["per_class"]
                            if score is not None and score > self.best_top1:
                                self.best_top1, self.best_epoch = score, epoch + 1
                            reporter.evaluated(record)
                        self.history.append(record)
                        reporter.log(record)
                        self.save_checkpoint(epoch + 1)
                        if self._stop_signal is not None and epoch + 1 < run.epochs:
                            raise Interrupted(f"stopped by signal after epoch {epoch + 1}; continue with: lsm resume {self.run_dir}")
                    completed = True
            finally:
                self.close_loader()
                reporter.stop(completed)
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            self._close_distributed()
        last_eval = next(r for r in reversed(self.history) if "top1" in r)
        summary = {
            **{k: last_eval[k] for k in ("top1", "many", "medium", "few", "rare3", "per_class")},
            "epochs": run.epochs,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "best_on": "val" if self.data.val is not None else "test",
            **({f"val_{k}": last_eval.get(f"val_{k}") for k in ("top1", "many", "medium", "few", "rare3")} if self.data.val is not None else {}),
            **({f"train_{k}": last_eval.get(f"train_{k}") for k in ("top1", "many", "medium", "few", "rare3", "per_class")}
               if run.score_train else {}),
            "final_loss": self.history[-1]["train_loss"],
            "wall_time_s": self.history[-1]["wall_s"],
            "class_counts": list(self.class_counts),
            "class_names": list(self.data.class_names),
            "recipe": self.recipe.path,
            "run_name": run.name,
            "seed": run.seed,
            "world_size": self.dist.world_size,
            **({"parent": self.parent} if self.parent is not None else {}),
        }
        reporter.finish(summary)
        return summary
