"""Optimizers: how a step's gradient is taken before the one SGD update of [optim].

Every built-in ends its step with ``base.step()``, the SGD of [optim] (lr, momentum,
weight decay, Nesterov), so the learning-rate schedule, weight decay and the
checkpointed momentum mean the same under each; they differ in where the gradient
is taken. ``sgd``: at the current weights. ``sam`` (Foret et al., ICLR 2021): at the
weights pushed uphill by ``rho`` along the normalised gradient, the weights put
back before the update. ``cc-sam`` and ``cc-sam-feature`` (Zhou et al., CVPR 2023)
live in :mod:`lsm_registry.components.cc_sam` on :class:`OnePassHead`.
Formulas: docs/recipes.md ([optim]) and docs/losses.md.
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch
from torch import Tensor, nn

from ..interfaces import Optimizer, StepClosure
from ..params import param, positive


class SGD(Optimizer):
    """Plain SGD: one forward and backward pass per step, then the [optim] update."""

    name = "sgd"
    supports_grad_scaler = True

    def step(self, closure: StepClosure, scaler: torch.amp.GradScaler) -> Tensor:
        loss = closure()
        scaler.step(self.base)
        scaler.update()
        return loss


@attrs.frozen
class SAMParams:
    rho: float = param(0.05, help="radius of the ascent step: e = rho * g / ||g|| (Foret et al.)", validator=positive)


class SAM(Optimizer):
    """Sharpness-aware minimisation: the gradient at w + rho g / ||g||, applied at w (two passes per step)."""

    name = "sam"
    Params = SAMParams

    def step(self, closure: StepClosure, scaler: torch.amp.GradScaler) -> Tensor:
        loss = closure()
        params = [p for group in self.base.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            self.base.step()
            return loss
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            scale = self.params.rho / (norm + 1e-12)
            # The weights are copied and put back rather than e subtracted: w + e - e is not
            # w in floating point, and the update must start from w exactly.
            kept = [p.detach().clone() for p in params]
            for p in params:
                p.add_(p.grad * scale)
        closure()  # the gradient at w + e; batch-norm statistics are held on this pass
        with torch.no_grad():
            for p, w in zip(params, kept):
                p.copy_(w)
        self.base.step()
        return loss


class OnePassHead(Optimizer):
    """An optimizer that changes the loss at the linear classifier (``head``) and then takes one SGD step.

    ``needs_linear`` ends the one-line error when the model's classifier is not ``nn.Linear``.
    CC-SAM's two optimizers (:mod:`lsm_registry.components.cc_sam`) are the built-in ones.
    """

    needs_features = True
    needs_linear = "a linear classifier (nn.Linear)"

    def __init__(self, params, context, base):
        super().__init__(params, context, base)
        self.classifier: Optional[nn.Linear] = None  # the model's, from attach

    def attach(self, model: nn.Module) -> None:
        classifier = getattr(model, "classifier", None)
        if not isinstance(classifier, nn.Linear):
            raise ValueError(
                f"{self.name} {self.needs_linear}, and the model's classifier is {type(classifier).__name__}"
            )
        self.classifier = classifier

    def step(self, closure: StepClosure, scaler: torch.amp.GradScaler) -> Tensor:
        loss = closure(self.head)
        self.base.step()
        return loss

    def head(self, h: Tensor, z: Tensor, target: Tensor, loss_of) -> Tensor:
        raise NotImplementedError


COMPONENTS = [SGD, SAM]
