"""The built-in callbacks: the learning-rate schedule, the finite-loss guard and the saliency observer.

They hold what the loop used to do inline, so ``Trainer.fit`` reads as the loop and a
new method that needs the loop's fixed points lands as a callback, not as an engine
branch. ``lr-schedule`` and ``nan-guard`` are always on (the engine adds them first);
``saliency-observer`` comes with a provider that watches training (``cached-gradcam``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import TrainingError
from ..interfaces import Callback, SaliencyProvider, StepBatch, Views

#: The key of a parameter group's own factor on the scheduled lr ([optim] lr_groups).
LR_FACTOR = "lr_factor"


def learning_rate(optim: Any, epochs: int, epoch: int) -> float:
    """``[optim]``'s schedule at 0-based ``epoch``: linear warm-up over ``warmup_epochs``, then step
    milestones (x ``gamma`` at each) or cosine to 0 at the last epoch, times ``lr_factors``'
    factor; one value per epoch."""
    return _scheduled(optim, epochs, epoch) * lr_factor(optim.lr_factors, epoch)


def lr_factor(factors: Sequence[tuple[int, float]], epoch: int) -> float:
    """The factor of the latest ``(epoch, factor)`` pair begun by ``epoch``, else 1.

    A separate factor rather than more milestones, because a method can change phase at an
    epoch of its own: IB's code cuts the lr x0.01 when its loss starts (epoch 100 of 200)
    and keeps the usual decays at 160 and 180 on top, whatever the schedule.
    """
    begun = [f for e, f in factors if epoch >= e]
    return begun[-1] if begun else 1.0


def _scheduled(optim: Any, epochs: int, epoch: int) -> float:
    if epoch < optim.warmup_epochs:
        return optim.lr * (epoch + 1) / optim.warmup_epochs
    if optim.schedule == "cosine":
        span = max(1, epochs - optim.warmup_epochs)
        return 0.5 * optim.lr * (1 + math.cos(math.pi * (epoch - optim.warmup_epochs) / span))
    passed = sum(1 for m in optim.milestones if epoch >= m)
    return optim.lr * optim.gamma**passed


class LRSchedule(Callback):
    """Sets every parameter group's learning rate at each epoch's start from [optim] (warm-up, step or cosine).

    A group built from ``[optim] lr_groups`` carries its ``lr_factor`` and gets the
    scheduled lr times it (MiSLAS trains its classifier at 0.2 x the lr of its scales).
    """

    name = "lr-schedule"

    def on_epoch_start(self, loop: Any, epoch: int) -> None:
        lr = learning_rate(loop.recipe.optim, loop.recipe.run.epochs, epoch)
        for group in loop.optimizer.param_groups:
            group["lr"] = lr * group.get(LR_FACTOR, 1.0)


class NanGuard(Callback):
    """Stops the run at the first non-finite loss, naming the epoch, the step and the last good checkpoint."""

    name = "nan-guard"

    def __init__(self, params: Any, context: Any):
        super().__init__(params, context)
        self.bad_step: Optional[Tensor] = None

    def on_epoch_start(self, loop: Any, epoch: int) -> None:
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=loop.device)

    def on_step_end(self, loop: Any, batch: StepBatch, loss: Tensor) -> None:
        # The first non-finite step, remembered on the device: no host sync per step. A step
        # called outside fit (a benchmark, a test) starts the record itself.
        if self.bad_step is None:
            self.on_epoch_start(loop, batch.epoch)
        bad = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(bad, torch.full_like(self.bad_step, batch.step), self.bad_step)

    def on_check(self, loop: Any, epoch: int) -> None:
        bad = int(self.bad_step) if self.bad_step is not None else -1
        if bad >= 0:
            kept = loop.last_checkpoint()
            where = f"; the last good checkpoint is {kept}" if kept is not None else ""
            raise TrainingError(f"the loss is not finite at epoch {epoch + 1}, step {bad}; training stopped{where}")


class SaliencyObserver(Callback):
    """Hands the run's saliency provider the first forward of every unmixed step (cached Grad-CAM)."""

    name = "saliency-observer"
    # It needs a provider to observe for; cached-gradcam brings it.
    brought_by_component = True
    conformance_tables = {
        "saliency": {"name": "cached-gradcam"},
        "mixer": {"name": "lsm", "start_epoch": 1, "end_epoch": 3},
    }

    def __init__(self, params: Any, context: Any):
        super().__init__(params, context)
        self._armed: Optional[tuple[Tensor, Views]] = None
        self._hook: Any = None
        self._provider: Optional[SaliencyProvider] = None
        self._loop: Any = None

    def on_fit_start(self, loop: Any) -> None:
        provider = loop.saliency
        if provider is None:
            raise ValueError("callback 'saliency-observer' needs a [saliency] provider to hand the forwards to")
        self._provider, self._loop = provider, loop
        if self._hook is None:
            self._hook = provider.observed_layer(loop.module).register_forward_hook(self._observe_output)

    def on_batch(self, loop: Any, batch: StepBatch) -> None:
        if batch.mixed is None and batch.views is not None:
            self._armed = (batch.labels, batch.views)  # the optimizer's first forward only (SAM makes two)

    def _observe_output(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        armed, self._armed = self._armed, None
        if armed is not None and self._provider is not None:
            labels, views = armed
            with torch.autocast(self._loop.device.type, enabled=False):
                self._provider.observe(self._loop.module, output.detach(), labels, views)

    def on_step_end(self, loop: Any, batch: StepBatch, loss: Tensor) -> None:
        self._armed = None

    def on_epoch_end(self, loop: Any, epoch: int, record: dict[str, Any]) -> None:
        provider = self._provider or loop.saliency
        provider.end_epoch(epoch)
        record.update(self.fractions(loop, provider))

    @staticmethod
    def fractions(loop: Any, provider: SaliencyProvider) -> dict[str, Optional[float]]:
        """The provider's per-epoch fractions (e.g. of fresh Grad-CAM rows), summed over processes."""
        out: dict[str, Optional[float]] = {}
        for name, (num, den) in provider.epoch_fractions().items():
            num, den = loop.all_reduce(torch.tensor([num, den], dtype=torch.float64, device=loop.device)).tolist()
            out[name] = num / den if den > 0 else None
        return out

    def on_fit_end(self, loop: Any, summary: dict[str, Any]) -> None:
        self.detach()

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._armed = None


def legacy_observer(
    provider: SaliencyProvider, context: Any, callbacks: Sequence[Callback]
) -> Optional[SaliencyObserver]:
    """The observer for a provider of the deprecated form: ``observes_training = True`` and no
    observer among the run's ``callbacks``. Warns once per run; None when none is needed."""
    if not provider.observes_training or any(isinstance(c, SaliencyObserver) for c in callbacks):
        return None
    warnings.warn(
        f"saliency {provider.name!r}: observes_training without a callback is deprecated; return "
        "SaliencyObserver from configure_callbacks() (docs/contracts.md, saliency)",
        DeprecationWarning,
        stacklevel=2,
    )
    return SaliencyObserver(SaliencyObserver.Params(), context)


COMPONENTS = [LRSchedule, NanGuard, SaliencyObserver]
