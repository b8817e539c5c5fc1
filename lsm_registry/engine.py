"""The one training engine: every recipe, baseline and ablation runs through ``Trainer``.

Step: data -> sampler -> (saliency -> patch -> mixer -> label fuser, when a mixer is
configured) -> model -> loss -> SGD. Tensors stay on the device from the fetch to the
loss; the only host synchronisations are the progress-bar updates every
``LOG_EVERY`` steps and the per-batch mixing coin, which is drawn on the CPU
generator (no device sync).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Optional

import attrs
import numpy as np
import torch
from torch import Tensor, nn

from .data.augment import augment, normalise
from .errors import DataError, LSMError
from .interfaces import Context, LTData
from .recipe import Recipe
from .registry import Registry

LOG_EVERY = 10
MANY_ABOVE = 100  # Many: n_c > 100
FEW_BELOW = 20  # Few: n_c < 20; Medium: 20 <= n_c <= 100


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
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The engine generator is re-seeded per epoch, so an epoch replays exactly on resume."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % 2**63


# ------------------------------------------------------------------------------ metrics


def group_of(count: int) -> str:
    if count > MANY_ABOVE:
        return "many"
    if count < FEW_BELOW:
        return "few"
    return "medium"


def summarise_predictions(pred: Tensor, labels: Tensor, class_counts: tuple[int, ...]) -> dict[str, Any]:
    """Top-1 overall, per class, Many / Medium / Few (None when a group has no class) and rarest three.

    Group accuracies average the per-class accuracies of the group's classes (the test
    sets are balanced, so this equals pooling their images).
    """
    num_classes = len(class_counts)
    correct = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    per_class = [float(c / t) if t > 0 else None for c, t in zip(correct.tolist(), total.tolist())]
    result: dict[str, Any] = {"top1": float(correct.sum() / total.sum()) if total.sum() > 0 else None}
    for group in ("many", "medium", "few"):
        accs = [a for a, n in zip(per_class, class_counts) if group_of(n) == group and a is not None]
        result[group] = sum(accs) / len(accs) if accs else None
    order = sorted((n, c) for c, n in enumerate(class_counts))
    rare = [per_class[c] for _, c in order[:3] if per_class[c] is not None]
    result["rare3"] = sum(rare) / len(rare) if rare else None
    result["per_class"] = per_class
    return result


# ------------------------------------------------------------------------------ files


def atomic_write(path: Path, text: str) -> None:
    """Write a file so that a crash leaves either the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fresh_run_dir(base: Path, name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... when a previous run already lives there."""
    candidate = base / name
    n = 2
    while candidate.exists() and any(candidate.iterdir()):
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


# ------------------------------------------------------------------------------ trainer


@attrs.define
class StepStats:
    """Device-side accumulators: read once per log interval, not per step."""

    loss_sum: Tensor
    mixed: Tensor
    fg_weight_sum: Tensor
    steps: int = 0
    images: int = 0


class Trainer:
    """Builds every component from a recipe and trains; ``fit()`` returns the summary."""

    def __init__(self, recipe: Recipe, registry: Registry, run_dir: Optional[Path] = None, console: Any = None, progress: bool = True):
        self.recipe = recipe
        self.registry = registry
        self.run_dir = run_dir
        self.console = console
        self.show_progress = progress
        run = recipe.run
        self.device = resolve_device(run.device)
        seed_everything(run.seed)
        self.data = self._build_data()
        self.class_counts = self.data.class_counts()
        if min(self.class_counts) == 0:
            empty = [self.data.class_names[c] for c, n in enumerate(self.class_counts) if n == 0]
            raise DataError(f"[data] {recipe.data.name}: no training image left for class(es) {', '.join(empty[:5])}")
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
        except ValueError as exc:
            raise LSMError(f"[model] {recipe.model.name}: {exc}") from None
        self.model = factory.build(self.data.num_classes, self.data.image_size[0], self.loss.needs_normed_head).to(self.device)
        self.memory_format = torch.channels_last if run.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.sampler = recipe.sampler.build(registry, self.context, self.data.train.labels)
        self.mixer = recipe.mixer.build(registry, self.context) if recipe.mixer else None
        self.patch = recipe.patch.build(registry, self.context) if recipe.patch else None
        self.saliency = recipe.saliency.build(registry, self.context) if recipe.saliency else None
        self.fuser = recipe.label_fuser.build(registry, self.context) if recipe.label_fuser else None
        if self.mixer is not None and self.patch is not None:
            _, h, w = self.data.image_size
            try:
                self.patch.grid(h, w)
            except ValueError as exc:
                raise LSMError(f"[patch] {recipe.patch.name}: {exc}") from None
        opt = recipe.optim
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=opt.nesterov and opt.momentum > 0
        )
        self.labels_on_device = self.data.train.labels.to(self.device)
        self.history: list[dict[str, Any]] = []

    def _build_data(self) -> LTData:
        spec = self.recipe.data
        factory = spec.build(self.registry, Context(class_counts=(), image_size=(0, 0, 0), seed=self.recipe.run.seed))
        try:
            return factory.build()
        except (FileNotFoundError, ValueError, OSError) as exc:
            message = str(exc) if not isinstance(exc, FileNotFoundError) or str(exc) else f"missing file {exc.filename}"
            raise DataError(f"[data] {spec.name}: {message}") from None

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

    def prepare(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        raw = self.data.train.fetch(idx, self.device)
        x = normalise(augment(raw, self.data.augment, self.generator), self.data.mean, self.data.std)
        return x.contiguous(memory_format=self.memory_format), self.labels_on_device[idx.to(self.device)]

    def mixed_batch(self, epoch: int, xb: Tensor, yb: Tensor, fg: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        """(images, soft targets, foreground label weight) when this batch is mixed, else None."""
        mixer = self.mixer
        if mixer is None or not mixer.active(epoch) or not mixer.coin():
            return None
        if fg is None:
            perm = torch.randperm(xb.shape[0], generator=self.generator).to(self.device)
            xf, yf = xb[perm], yb[perm]
        else:
            xf, yf = self.prepare(fg)
        s_f = s_b = None
        if self.saliency is not None:
            s_f = self.saliency(self.model, xf, yf, self.patch)
            if self.fuser.needs_background_saliency:
                s_b = self.saliency(self.model, xb, yb, self.patch)
        mix = mixer.mix(xf, xb, s_f, self.patch)
        target = self.fuser.fuse(mix, yf, yb, s_f, s_b)
        fg_weight = target.gather(1, yf.view(-1, 1)).mean()
        return mix.images.contiguous(memory_format=self.memory_format), target, fg_weight

    def train_step(self, epoch: int, bg: Tensor, fg: Optional[Tensor], stats: StepStats) -> None:
        xb, yb = self.prepare(bg)
        mixed = self.mixed_batch(epoch, xb, yb, fg)
        if mixed is None:
            x, target = xb, yb
        else:
            x, target, fg_weight = mixed
            stats.mixed += 1
            stats.fg_weight_sum += fg_weight.detach()
        self.model.train()
        logits = self.model(x)
        loss = self.loss(logits, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        stats.loss_sum += loss.detach()
        stats.steps += 1
        stats.images += x.shape[0]

    # -------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, batch_size: int = 512) -> dict[str, Any]:
        was_training = self.model.training
        self.model.eval()
        test = self.data.test
        preds = []
        for start in range(0, len(test), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(test)))
            raw = test.fetch(idx, self.device)
            x = normalise(raw, self.data.mean, self.data.std).contiguous(memory_format=self.memory_format)
            preds.append(self.loss.eval_logits(self.model(x)).argmax(dim=1).cpu())
        self.model.train(was_training)
        pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)
        return summarise_predictions(pred, test.labels, self.class_counts)

    # -------------------------------------------------------------- loop

    def fit(self) -> dict[str, Any]:
        from .reporting import RunReporter

        run = self.recipe.run
        batch_size = self.recipe.optim.batch_size
        reporter = RunReporter(self, self.console, self.show_progress)
        started = time.perf_counter()
        best_top1, best_epoch, last_eval = -1.0, -1, None
        with reporter:
            for epoch in range(run.epochs):
                self.generator.manual_seed(epoch_seed(run.seed, epoch))
                lr = self.lr_at(epoch)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.loss.set_epoch(epoch)
                zero = torch.zeros((), device=self.device)
                stats = StepStats(zero.clone(), zero.clone(), zero.clone())
                steps = self.sampler.steps_per_epoch(batch_size)
                reporter.start_epoch(epoch, steps)
                t0 = time.perf_counter()
                for bg, fg in self.sampler.batches(epoch, batch_size):
                    self.train_step(epoch, bg, fg, stats)
                    if stats.steps % LOG_EVERY == 0 or stats.steps == steps:
                        mean_loss = float(stats.loss_sum) / stats.steps
                        if not math.isfinite(mean_loss):
                            raise LSMError(f"loss became {mean_loss} in epoch {epoch + 1}, by step {stats.steps}; stopping")
                        reporter.advance(stats.steps, mean_loss, lr, stats.images / max(time.perf_counter() - t0, 1e-9))
                elapsed = time.perf_counter() - t0
                record: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "lr": lr,
                    "train_loss": float(stats.loss_sum) / max(stats.steps, 1),
                    "mixed_fraction": float(stats.mixed) / max(stats.steps, 1),
                    "fg_label_weight": float(stats.fg_weight_sum / stats.mixed) if float(stats.mixed) > 0 else None,
                    "images_per_s": stats.images / max(elapsed, 1e-9),
                }
                if (epoch + 1) % run.eval_every == 0 or epoch + 1 == run.epochs:
                    last_eval = self.evaluate()
                    record.update({k: v for k, v in last_eval.items() if k != "per_class"})
                    if last_eval["top1"] is not None and last_eval["top1"] > best_top1:
                        best_top1, best_epoch = last_eval["top1"], epoch + 1
                    reporter.evaluated(record)
                self.history.append(record)
                reporter.log(record)
        summary = {
            **{k: last_eval[k] for k in ("top1", "many", "medium", "few", "rare3", "per_class")},
            "epochs": run.epochs,
            "best_top1": best_top1,
            "best_epoch": best_epoch,
            "final_loss": self.history[-1]["train_loss"],
            "wall_time_s": time.perf_counter() - started,
            "class_counts": list(self.class_counts),
            "class_names": list(self.data.class_names),
            "recipe": self.recipe.path,
            "run_name": run.name,
            "seed": run.seed,
        }
        reporter.finish(summary)
        return summary
