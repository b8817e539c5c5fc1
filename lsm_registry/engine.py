"""The one training engine: every recipe, baseline and ablation runs through ``Trainer``.

Step: data -> sampler -> (saliency -> patch -> mixer -> label fuser, when a mixer is
configured) -> optimizer step (model -> loss -> backward, once or more) -> SGD update. Tensors stay on the device from the fetch to the
loss; the only host synchronisations are the progress-bar updates every
``LOG_EVERY`` steps and the per-batch mixing coin, which is drawn on the CPU
generator (no device sync).

Models that are more than one forward of one batch take part through two general
extension points of the model contract (``lsm_registry.interfaces.ModelFactory``), not
through a branch per method here: a training output with named parts for the loss
(``ModelOutput``, ``Loss.reads_outputs``; see ``Trainer.forward_loss``) and a second
batch from the sampler (``takes_second_batch``, ``SecondBatch``; see ``Trainer.second_batch``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import attrs
import torch
from torch import Tensor, nn

# Re-exported: these were the engine's before building a run got a module of its own.
from .assembly import (  # noqa: F401
    DistInfo,
    RunParts,
    build_data,
    build_run,
    check_feature_api,
    dist_info,
    resolve_device,
    seed_everything,
)
from .checkpoint import (
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    ResumeError,
    checkpoint_name,
    list_checkpoints,
    load_latest,
    prune,
    recipe_diff,
    rng_state,
    save_atomic,
    set_rng_state,
)
from .components.callbacks import LR_FACTOR, SaliencyObserver, learning_rate, legacy_observer
from .data.augment import augment_with_crops, eval_view_batches, normalise
from .data.prefetch import LoadedStep, PlannedLoader, PlannedStep, plan_epoch
from .errors import LSMError, TrainingError  # noqa: F401 (TrainingError re-exported)
from .files import FolderLock, atomic_write
from .formats import CHECKPOINT_FORMAT, RECIPE_FORMAT, format_problem
from .interfaces import (
    Callback,
    Crops,
    DecodingSplit,
    Head,
    Loss,
    ModelOutput,
    SecondBatch,
    Split,
    StepBatch,
    StepClosure,
    Views,
    logits_of,
)
from .metrics import summarise_counts
from .mixing import MixedBatch, foreground_order
from .recipe import Recipe, migrate, without_loggers
from .registry import Registry
from .stages import set_train_mode

LOG_EVERY = 10
PICTURE_ROWS = 8  # rows of the last mixed batch kept for mixed_samples.png
MAX_CONFUSION_CLASSES = 1000  # beyond this the confusion matrix is not kept


def epoch_seed(seed: int, epoch: int) -> int:
    """The engine generator is re-seeded per epoch, so an epoch replays exactly on resume."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % 2**63


#: What a training checkpoint must hold, with the type of each (checked before anything is loaded).
CHECKPOINT_KEYS = {
    "model": dict,
    "optimizer": dict,
    "recipe": dict,
    "epoch": int,
    "step": int,
    "history": list,
    "best": (list, tuple),
    "rng": dict,
    "scaler": dict,
}


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


@torch.no_grad()
def score_split(
    module: nn.Module,
    split: Split,
    loss: Loss,
    num_classes: int,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
    indices: Tensor,
    batch_size: int = 512,
    memory_format: torch.memory_format = torch.contiguous_format,
    autocast_dtype: Optional[torch.dtype] = None,
    confusion: bool = False,
    on_logits: Optional[Callable[[Tensor, Tensor], None]] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-class correct and total counts of ``module`` on the images ``indices`` of ``split``, and the
    flat confusion counts when asked; one function, so that ``Trainer.evaluate`` and ``lsm evaluate``
    score alike. ``on_logits(indices, logits)`` sees each batch's prediction logits (on the device)."""
    was_training = module.training
    module.eval()
    correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
    total = torch.zeros(num_classes, dtype=torch.int64, device=device)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device) if confusion else None
    for idx, x in eval_view_batches(split, indices, device, mean, std, batch_size, memory_format):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = logits_of(module(x))
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
    """One step's batch for the optimizer: zero the gradients, forward, loss, backward.

    ``labels``: what the loss gets as ``mixed`` (the MixedBatch, a SecondBatch or None);
    ``second``: the second input of a model that trains on two batches, else None.
    """

    def __init__(
        self,
        trainer: "Trainer",
        x: Tensor,
        target: Tensor,
        labels: Optional[MixedBatch | SecondBatch],
        second: Optional[Tensor] = None,
    ):
        self.trainer, self.x, self.target, self.labels, self.second = trainer, x, target, labels, second
        self.calls = 0

    def __call__(self, head: Optional[Head] = None) -> Tensor:
        t = self.trainer
        t.optimizer.base.zero_grad(set_to_none=True)
        with t.held_batch_norm() if self.calls else contextlib.nullcontext():
            loss = t.forward_loss(self.x, self.target, self.labels, head, self.second)
            t.scaler.scale(loss).backward()
        self.calls += 1
        return loss.detach()


class Interrupted(LSMError):
    """SIGINT / SIGTERM: a checkpoint was written and the run stopped cleanly."""

    exit_code = 130


@attrs.define
class StepStats:
    """Device-side accumulators: read once per log interval, not per step."""

    loss_sum: Tensor
    mixed: Tensor
    fg_weight_sum: Tensor
    steps: int = 0
    images: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> "StepStats":
        zero = torch.zeros((), device=device)
        return cls(zero.clone(), zero.clone(), zero.clone())

    def to_state(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum.cpu(),
            "mixed": self.mixed.cpu(),
            "fg_weight_sum": self.fg_weight_sum.cpu(),
            "steps": self.steps,
            "images": self.images,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "StepStats":
        stats = cls.zeros(device)
        stats.loss_sum, stats.mixed, stats.fg_weight_sum = (
            state[k].to(device) for k in ("loss_sum", "mixed", "fg_weight_sum")
        )
        stats.steps, stats.images = state["steps"], state["images"]
        return stats


class Reporter:
    """What the engine tells the outside world; this base says nothing and writes nothing.

    The engine is handed a reporter instead of knowing the screen or the run folder:
    :class:`lsm_registry.runfolder.reporter.RunReporter` draws progress and writes the run
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

    def __init__(
        self,
        recipe: Recipe,
        registry: Registry,
        run_dir: Optional[Path] = None,
        keep: Optional[int] = None,
        resume: bool = False,
        parts: Optional[RunParts] = None,
    ):
        # The built run's parts become the loop's attributes of the same names (trainer.module, ...).
        self.__dict__.update(attrs.asdict(parts or build_run(recipe, registry, resume), recurse=False))
        self.recipe, self.registry, self.run_dir, self.resume = recipe, registry, run_dir, resume
        # None: the run's own count (stored in its checkpoints) on resume, else 1.
        self.keep_asked = keep
        self.keep = keep if keep is not None else 1
        self.last_mixed: Optional[MixedBatch] = None
        self.history: list[dict[str, Any]] = []
        self.best_top1, self.best_epoch = -1.0, -1
        self._stop_signal: Optional[int] = None
        self.confusion: Optional[Tensor] = None
        # Per image, the crop and flip of this step's background and foreground batches (the
        # foreground's is None when it is the background permuted or there is none).
        self.crops: tuple[Optional[Crops], Optional[Crops]] = (None, None)
        self._loader: Optional[PlannedLoader] = None
        self._batch: Optional[StepBatch] = None  # the step the optimizer is running, for on_forward
        #: The model trains on the sampler's two batches at once (the ModelFactory contract; checked by build_run).
        self.takes_second_batch = bool(getattr(self.module, "takes_second_batch", False))
        self.callbacks: list[Callback] = self._build_callbacks()
        self._hooks: dict[str, list[Callable[..., None]]] = {}  # hook -> the callbacks' overriding methods

    def _check_feature_api(self) -> None:
        check_feature_api(self.recipe, self.module, self.loss, self.optimizer, self.dist)

    def _build_callbacks(self) -> list[Callback]:
        """The engine's own callbacks, then the components', then the recipe's (the documented order)."""

        def own(cls: type[Callback]) -> Callback:
            return cls(cls.Params(), self.context)

        callbacks: list[Callback] = [
            own(self.registry.get("callback", "lr-schedule")),
            own(self.registry.get("callback", "nan-guard")),
        ]
        components = (
            self.sampler,
            self.saliency,
            self.patch,
            self.mixer,
            self.fuser,
            self.loss,
            self.optimizer,
            getattr(self, "model_factory", None),
        )
        for component in components:
            if component is not None:
                callbacks.extend(component.configure_callbacks())
        legacy = legacy_observer(self.saliency, self.context, callbacks) if self.saliency is not None else None
        if legacy is not None:
            callbacks.append(legacy)
        callbacks.extend(spec.build(self.registry, self.context) for spec in self.recipe.callbacks)
        return callbacks

    def fire(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every callback that overrides it, in order: the no-op defaults cost the
        training step nothing (``on_batch``, ``on_forward`` and ``on_step_end`` fire every step)."""
        methods = self._hooks.get(hook)
        if methods is None:
            methods = self._hooks[hook] = [
                getattr(c, hook) for c in self.callbacks if getattr(type(c), hook) is not getattr(Callback, hook)
            ]
        for method in methods:
            method(self, *args)

    @property
    def observing(self) -> bool:
        """Whether a callback hands the saliency provider the training forwards."""
        return any(isinstance(c, SaliencyObserver) for c in self.callbacks)

    def last_checkpoint(self) -> Optional[Path]:
        """The newest checkpoint in the run folder (None without one)."""
        kept = list_checkpoints(self.run_dir) if self.run_dir is not None else []
        return kept[-1] if kept else None

    def _close_distributed(self) -> None:
        if self.dist.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Sum (or max) ``tensor`` over the processes in place; the tensor itself in one process."""
        return self._all_reduce(tensor, op)

    def _all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        if not self.dist.enabled:
            return tensor
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor

    # -------------------------------------------------------------- schedule

    def lr_at(self, epoch: int) -> float:
        """The ``lr-schedule`` callback's learning rate at 0-based ``epoch``."""
        return learning_rate(self.recipe.optim, self.recipe.run.epochs, epoch)

    # -------------------------------------------------------------- step

    def prepare(self, idx: Tensor, fetched: Optional[tuple[Tensor, Crops]] = None) -> tuple[Tensor, Tensor]:
        x, y, _ = self.prepare_with_crops(idx, fetched)
        return x, y

    def prepare_with_crops(
        self, idx: Tensor, fetched: Optional[tuple[Tensor, Crops]] = None
    ) -> tuple[Tensor, Tensor, Crops]:
        """Augmented, normalised images, labels and per-image crops of the training indices ``idx``.

        ``fetched``: uint8 crops the split already cut while decoding (the planned loader's);
        without them a split that crops while decoding (a :class:`DecodingSplit`) is asked
        for its crops with a seed drawn from the engine generator, and any other is
        fetched and augmented on the device.
        """
        train = self.data.train
        if fetched is None and isinstance(train, DecodingSplit):
            seed = int(torch.randint(0, 2**62, (), generator=self.generator))
            fetched = train.fetch_train(idx, seed)
        if fetched is not None:
            raw, crops = fetched
            x = normalise(raw.to(self.device, non_blocking=True), self.mean, self.std)
        else:
            augmented, crops = augment_with_crops(
                self.data.train.fetch(idx, self.device), self.data.augment, self.generator
            )
            x = normalise(augmented, self.mean, self.std)
        return x.contiguous(memory_format=self.memory_format), self.labels_on_device[idx.to(self.device)], crops

    def mixed_batch(
        self,
        epoch: int,
        xb: Tensor,
        yb: Tensor,
        fg: Optional[Tensor],
        loaded: Optional[LoadedStep] = None,
        views_b: Optional[Views] = None,
    ) -> Optional[MixedBatch]:
        """The mixed batch when this epoch's window and this batch's coin say so, else None.

        ``loaded``: the planned step, whose coin was drawn with the plan and whose
        foreground (when it mixes) is already decoded. ``views_b``: the background's
        views, for the saliency provider (crops to mask, maps to reuse).
        """
        mixer = self.mixer
        if mixer is None or not (loaded.plan.mix if loaded is not None else mixer.active(epoch) and mixer.coin()):
            return None
        crops_b = self.crops[0]
        xf, yf, crops_f, views_f = self.foreground(
            epoch, xb, yb, fg, crops_b, views_b, loaded.fg if loaded is not None else None
        )
        self.crops = (crops_b, crops_f)
        return self.mixing(self.module, xb, yb, xf, yf, views_f=views_f, views_b=views_b)

    def foreground(
        self,
        epoch: int,
        xb: Tensor,
        yb: Tensor,
        fg: Optional[Tensor],
        crops_b: Optional[Crops],
        views_b: Optional[Views],
        fetched: Optional[tuple[Tensor, Crops]] = None,
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

    def second_batch(
        self, yb: Tensor, fg: Optional[Tensor], loaded: Optional[LoadedStep] = None
    ) -> Optional[SecondBatch]:
        """The sampler's second batch as a model that trains on two batches takes it, else None.

        General extension point (the ModelFactory contract): when the module sets
        ``takes_second_batch``, the sampler's second index set ``fg`` is prepared like the first
        batch (augmented, normalised) and becomes the forward's second input, and the target is
        the two-label mix ``lam e_{y_second} + (1 - lam) e_{y}`` with ``lam`` the module's
        ``second_batch_share``, which the model's own callback may change per epoch. The loss
        gets the result as ``mixed``, so class weights apply per label as for a mixed batch.
        """
        if not self.takes_second_batch:
            return None
        if fg is None:  # build_run checked the sampler; a sampler that stops yielding one mid-run lands here
            raise TrainingError(
                f"[sampler].name = {self.recipe.sampler.name!r} yielded no second index set, and model "
                f"{self.recipe.model.name!r} trains on one every step"
            )
        x2, y2, _ = self.prepare_with_crops(fg, loaded.fg if loaded is not None else None)
        lam = torch.full(y2.shape, float(self.module.second_batch_share), device=y2.device)
        num_classes = self.data.num_classes
        one_hot = nn.functional.one_hot
        target = (1.0 - lam).unsqueeze(1) * one_hot(yb, num_classes) + lam.unsqueeze(1) * one_hot(y2, num_classes)
        return SecondBatch(images=x2, target=target, y_f=y2, y_b=yb, lam=lam)

    def train_step(
        self, epoch: int, bg: Tensor, fg: Optional[Tensor], stats: StepStats, loaded: Optional[LoadedStep] = None
    ) -> None:
        xb, yb, crops_b = self.prepare_with_crops(bg, loaded.bg if loaded is not None else None)
        self.crops = (crops_b, None)
        views_b = Views(bg.to(self.device), crops_b, epoch) if self.saliency is not None else None
        mixed = self.mixed_batch(epoch, xb, yb, fg, loaded, views_b)
        second = self.second_batch(yb, fg, loaded)  # None unless the model trains on two batches (then no mixer)
        if mixed is not None:
            x, target = mixed.images.contiguous(memory_format=self.memory_format), mixed.target
            stats.mixed += 1
            stats.fg_weight_sum += mixed.lam.detach().mean()
            self.last_mixed = mixed.rows(PICTURE_ROWS)  # the run folder's mixed_samples.png: what was really mixed
        elif second is not None:
            x, target = xb, second.target
        else:
            x, target = xb, yb
        batch = self._batch = StepBatch(epoch, stats.steps + 1, x, target, yb, views_b, mixed, second, bg)
        self.fire("on_batch", batch)
        set_train_mode(self.model, self.recipe, self._batch_norms)
        x2 = second.images if second is not None else None
        loss = self.optimizer.step(_Closure(self, x, target, mixed or second, x2), self.scaler).detach()
        self._batch = None
        stats.steps += 1
        stats.images += x.shape[0] + (x2.shape[0] if x2 is not None else 0)
        stats.loss_sum += loss
        self.fire("on_step_end", batch, loss)

    def forward_loss(
        self,
        x: Tensor,
        target: Tensor,
        mixed: Optional[MixedBatch | SecondBatch],
        head: Optional[Head] = None,
        second: Optional[Tensor] = None,
    ) -> Tensor:
        """The step's loss at the current weights (what the optimizer's closure backpropagates).

        Through the feature API (``classifier(mean of forward_features(x))``) when the loss
        or the optimizer reads the features, else through the (possibly DDP-wrapped) model,
        as ``model(x, second)`` for a model that trains on two batches. A training output
        with parts (:class:`ModelOutput`) trains on its logits; its parts go to a loss that
        reads them (``outputs=``).
        """
        parts = None
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            if self.needs_features or head is not None:
                h = self.module.forward_features(x).mean(dim=(2, 3))
                logits = self.module.classifier(h)
            else:
                output = self.model(x) if second is None else self.model(x, second)
                h, logits = None, logits_of(output)
                parts = output.parts if isinstance(output, ModelOutput) else None
        logits = logits.float()
        features = h.float() if h is not None else None
        if self._batch is not None:
            self.fire("on_forward", self._batch, logits, features)
        extra: dict[str, Any] = {"features": features} if self.loss.needs_features else {}
        if self.loss.reads_outputs:
            extra["outputs"] = {k: v.float() for k, v in parts.items()} if parts is not None else None

        def loss_of(z: Tensor) -> Tensor:
            return self.loss(z, target, mixed, **extra)

        return head(features, logits, target, loss_of) if head is not None else loss_of(logits)

    @contextlib.contextmanager
    def held_batch_norm(self):
        """Batch-norm running statistics put back after a pass, so a step's repeated passes count its batch once."""
        kept = [
            (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in self._batch_norms
            if m.training and m.track_running_stats and m.running_mean is not None
        ]
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
        if not self.data.decodes_training_view:
            return None
        batches = list(self.sampled(epoch, batch_size))
        mixer = self.mixer
        # A step's flag says whether its second index set is decoded: where the mixer's coin says mix,
        # or every step for a model that trains on two batches (which has no mixer).
        coins = [
            self.takes_second_batch or (mixer is not None and mixer.active(epoch) and mixer.coin()) for _ in batches
        ]
        seeds = torch.randint(0, 2**62, (len(batches), 2), generator=self.generator)
        return plan_epoch(batches, coins, seeds)

    def sampled(self, epoch: int, batch_size: int) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        """The sampler's index sets, each repeated view-major when the loss trains on several
        views of an image (``Loss.views_per_image``): fetching and augmenting the repeated rows
        gives every view its own crop and flip, on any split, with no second code path."""
        views = self.loss.views_per_image
        for bg, fg in self.sampler.batches(epoch, batch_size):
            if views == 1:
                yield bg, fg
            else:
                yield bg.repeat(views), (fg.repeat(views) if fg is not None else None)

    def _steps(self, epoch: int, batch_size: int, plan: Optional[list[PlannedStep]], skip: int):
        """(bg, fg, loaded step or None) from step ``skip`` on: planned steps come decoded ahead by the loader."""
        if plan is None:
            for i, (bg, fg) in enumerate(self.sampled(epoch, batch_size)):
                if i >= skip:
                    yield bg, fg, None
            return
        if self._loader is None:
            split = self.data.train
            assert isinstance(split, DecodingSplit)  # plan() returns None otherwise
            # views: prepare_with_crops turns each step's images into a new tensor at once
            self._loader = PlannedLoader(
                split, split.workers, split.prefetch, pin_memory=self.device.type == "cuda", views=True
            )
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
            self.module,
            test,
            self.loss,
            num_classes,
            self.mean,
            self.std,
            self.device,
            shard,
            batch_size=batch_size,
            memory_format=self.memory_format,
            autocast_dtype=self.autocast_dtype,
            confusion=num_classes <= MAX_CONFUSION_CLASSES and split == "test",
        )
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
            "callbacks": {f"{i}:{c.name}": c.state_dict() for i, c in enumerate(self.callbacks) if c.state_dict()},
            # What the model took from its data, so that evaluate and export need not rebuild it.
            "data": {
                "class_counts": list(self.class_counts),
                "class_names": list(self.data.class_names),
                "mean": [float(v) for v in self.data.mean],
                "std": [float(v) for v in self.data.std],
                "image_size": list(self.data.image_size),
            },
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
        self._write_checkpoint(path, lambda: save_atomic(state, path))
        if step == 0 and self.data.val is not None and self.best_epoch == epoch:
            # The best epoch on validation is kept beside the newest, whatever --keep says: the
            # file just written, copied (not serialised a second time).
            best = self.run_dir / CHECKPOINT_DIR / BEST_CHECKPOINT
            self._write_checkpoint(best, lambda: atomic_write(best, path.read_bytes()))
        prune(self.run_dir, self.keep)
        return path

    def _write_checkpoint(self, path: Path, write: Callable[[], None]) -> None:
        """``write()`` (an atomic write of ``path``); a full or read-only disk becomes one line."""
        try:
            write()
        except (OSError, RuntimeError) as exc:
            # A full or read-only disk: OSError, or torch's "enforce fail at inline_container.cc"
            # RuntimeError from inside torch.save. The atomic write left the older files intact.
            if isinstance(exc, RuntimeError) and "inline_container" not in str(exc) and "write" not in str(exc):
                raise
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            previous = list_checkpoints(self.run_dir)  # the failed write left none of its own
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise LSMError(
                f"{path}: cannot write the checkpoint ({reason}); {kept}; free space and continue with: "
                f"lsm resume {self.run_dir}"
            ) from None

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
            raise ResumeError(
                f"{self.run_dir}: no checkpoint to resume from (looked in {self.run_dir / 'checkpoints'})"
            )
        folder = self.run_dir / CHECKPOINT_DIR
        if not isinstance(state, dict):  # before state.get below
            raise ResumeError(
                f"{folder}: the newest checkpoint is not a training checkpoint ({checkpoint_structure_problem(state)})"
            )
        for value, current, where in (
            (state.get("format"), CHECKPOINT_FORMAT, f"{folder}"),
            (state.get("recipe_format"), RECIPE_FORMAT, f"{folder} (its recipe)"),
        ):
            problem = format_problem(value, current, where)
            if problem is not None:
                raise ResumeError(problem)
        problem = checkpoint_structure_problem(state)
        if problem is not None:
            raise ResumeError(f"{folder}: the newest checkpoint is not a training checkpoint ({problem})")
        # An older checkpoint's recipe lacks the keys added since: they take their defaults.
        old_recipe = migrate(state["recipe"], self.registry, where=str(folder))
        # Loggers say where the run is watched: adding or removing one on resume is fine.
        changes = recipe_diff(
            without_loggers(old_recipe), without_loggers(self.recipe.to_dict()), ignore={"run.epochs"}
        )
        if changes:
            raise ResumeError(f"{self.run_dir}: cannot resume, the recipe differs in " + ", ".join(changes))
        if state.get("world_size", 1) != self.dist.world_size:
            raise ResumeError(
                f"{self.run_dir}: the checkpoint was written by {state['world_size']} process(es), this run has {self.dist.world_size}"
            )
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.best_top1, self.best_epoch = state["best"]
        self.parent = state.get("parent")
        if self.keep_asked is None:
            self.keep = max(1, int(state.get("keep", 1)))  # the run's own --keep, unless told otherwise
        for key, saved_state in (state.get("callbacks") or {}).items():
            index, _, name = key.partition(":")
            if not (index.isdigit() and int(index) < len(self.callbacks) and self.callbacks[int(index)].name == name):
                raise ResumeError(
                    f"{folder}: the checkpoint holds the state of callback {name!r}, which this run does not have at that place"
                )
            self.callbacks[int(index)].load_state_dict(saved_state)
        saved = state.get("saliency")
        if self.saliency is not None and saved:
            own = saved[self.dist.rank] if isinstance(saved, list) else saved
            self.saliency.load_state_dict(
                {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in own.items()}
            )
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

    def _running(self, stats: StepStats, lr: float, t0: float) -> dict[str, Optional[float]]:
        loss_sum, mixed, fg_sum = torch.stack(
            [stats.loss_sum.float(), stats.mixed.float(), stats.fg_weight_sum.float()]
        ).tolist()
        return {
            "loss": loss_sum / stats.steps,
            "lr": lr,
            "images_per_s": stats.images / max(time.perf_counter() - t0, 1e-9),
            "mixed_fraction": mixed / stats.steps,
            "fg_label_weight": fg_sum / mixed if mixed > 0 else None,
        }

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
        start_epoch, start_step, state = self._starting_point(reporter)
        previous_handlers = self._install_signal_handlers()
        completed = False
        try:
            reporter.start(self)
            self.fire("on_fit_start")
            try:
                for epoch in range(start_epoch, self.recipe.run.epochs):
                    resumed = (start_step, state) if epoch == start_epoch and start_step else None
                    record = self.train_epoch(epoch, reporter, resumed)
                    self.finish_epoch(epoch, record, reporter)
                completed = True
            finally:
                self.close_loader()
                reporter.stop(completed)
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            self._close_distributed()
        summary = self.summary()
        self.fire("on_fit_end", summary)
        reporter.finish(summary)
        return summary

    def _starting_point(self, reporter: "Reporter") -> tuple[int, int, Optional[dict[str, Any]]]:
        """(epoch, step inside it, checkpoint state) to start from: the newest checkpoint on resume."""
        start_epoch, start_step, state = self.load_checkpoint(reporter) if self.resume else (0, 0, None)
        if start_epoch >= self.recipe.run.epochs and start_step == 0:
            raise LSMError(
                f"{self.run_dir}: the run already finished {start_epoch} epochs; raise run.epochs to continue"
            )
        return start_epoch, start_step, state

    def train_epoch(
        self, epoch: int, reporter: "Reporter", resumed: Optional[tuple[int, dict[str, Any]]] = None
    ) -> dict[str, Any]:
        """One epoch's steps (from step ``resumed[0]`` of a mid-epoch checkpoint); returns its record."""
        batch_size = self.recipe.optim.batch_size
        self.generator.manual_seed(epoch_seed(self.recipe.run.seed, epoch))
        plan = self.plan(epoch, batch_size)
        skip = resumed[0] if resumed else 0
        if resumed:
            self.generator.set_state(resumed[1]["generator"])
        stats = StepStats.from_state(resumed[1]["stats"], self.device) if resumed else StepStats.zeros(self.device)
        self.fire("on_epoch_start", epoch)
        first = self.optimizer.param_groups[0]
        lr = first["lr"] / first.get(LR_FACTOR, 1.0)  # the schedule's lr, not a group's share of it
        self.loss.set_epoch(epoch)
        steps = self.sampler.steps_per_epoch(batch_size)
        reporter.start_epoch(epoch, steps)
        t0 = time.perf_counter()
        for bg, fg, loaded in self._steps(epoch, batch_size, plan, skip):
            self.train_step(epoch, bg, fg, stats, loaded)
            at_log = stats.steps % LOG_EVERY == 0 or stats.steps == steps
            if at_log:
                self.fire("on_check", epoch)
                reporter.advance(stats.steps, self._running(stats, lr, t0))
            if stats.steps < steps and self._should_stop(at_log):
                self._interrupt(epoch, stats)
        self.fire("on_check", epoch)
        return self._epoch_record(epoch, lr, stats, time.perf_counter() - t0)

    def _interrupt(self, epoch: int, stats: StepStats) -> None:
        self.fire("on_check", epoch)
        path = self.save_checkpoint(epoch, stats.steps, stats)
        raise Interrupted(
            f"stopped by signal {signal.Signals(self._stop_signal or signal.SIGINT).name} in epoch {epoch + 1} "
            f"at step {stats.steps}; checkpoint {path}; continue with: lsm resume {self.run_dir}"
        )

    def _epoch_record(self, epoch: int, lr: float, stats: StepStats, elapsed: float) -> dict[str, Any]:
        """What metrics.jsonl gets for the epoch's training (summed over processes); callbacks may add keys."""
        totals = torch.stack(
            [
                stats.loss_sum.float(),
                torch.tensor(float(stats.steps), device=self.device),
                stats.mixed.float(),
                stats.fg_weight_sum.float(),
            ]
        )
        loss_sum, n_steps, mixed, fg_sum = self._all_reduce(totals).tolist()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / max(n_steps, 1),
            "mixed_fraction": mixed / max(n_steps, 1),
            "fg_label_weight": fg_sum / mixed if mixed > 0 else None,
            "images_per_s": stats.images * self.dist.world_size / max(elapsed, 1e-9),
            "wall_s": (self.history[-1]["wall_s"] if self.history else 0.0) + elapsed,
        }
        self.fire("on_epoch_end", epoch, record)
        return record

    def finish_epoch(self, epoch: int, record: dict[str, Any], reporter: "Reporter") -> None:
        """Evaluate when due, log the record, write the checkpoint; stop here after a signal."""
        run = self.recipe.run
        if (epoch + 1) % run.eval_every == 0 or epoch + 1 == run.epochs:
            self.evaluate_epoch(epoch, record)
            reporter.evaluated(record)
        self.history.append(record)
        reporter.log(record)
        self.save_checkpoint(epoch + 1)
        if self._stop_signal is not None and epoch + 1 < run.epochs:
            raise Interrupted(f"stopped by signal after epoch {epoch + 1}; continue with: lsm resume {self.run_dir}")

    def evaluate_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """Test (and val, train) metrics into ``record``; the best epoch is chosen on val when there is one."""
        result = self.evaluate()
        record.update({k: v for k, v in result.items() if k != "per_class"})
        record["per_class"] = result["per_class"]
        score = result["top1"]
        if self.data.val is not None:
            val = self.evaluate(split="val")
            record.update({f"val_{k}": v for k, v in val.items() if k != "per_class"})
            score = val["top1"]
        if self.recipe.run.score_train:
            fit = self.evaluate(split="train")
            record.update({f"train_{k}": v for k, v in fit.items() if k != "per_class"})
            record["train_per_class"] = fit["per_class"]
        if score is not None and score > self.best_top1:
            self.best_top1, self.best_epoch = score, epoch + 1
        self.fire("on_evaluate", epoch, record)

    def summary(self) -> dict[str, Any]:
        """What summary.json gets: the last evaluation, the best epoch, the run's facts."""
        run = self.recipe.run
        last_eval = next(r for r in reversed(self.history) if "top1" in r)
        groups = ("top1", "many", "medium", "few", "rare3")
        return {
            **{k: last_eval[k] for k in (*groups, "per_class")},
            "epochs": run.epochs,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "best_on": "val" if self.data.val is not None else "test",
            **({f"val_{k}": last_eval.get(f"val_{k}") for k in groups} if self.data.val is not None else {}),
            **({f"train_{k}": last_eval.get(f"train_{k}") for k in (*groups, "per_class")} if run.score_train else {}),
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
