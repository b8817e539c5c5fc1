"""Losses on class indices or soft targets, each with an optional reweighting schedule.

A loss implements ``class_losses(logits) -> (B, C)``, the matrix of ``l_c(z_b)``,
the loss image ``b`` would get with hard label ``c``. Hard targets gather from it
and soft targets ``q`` take ``sum_c q_c l_c(z)`` (METHOD.md section 7), so every
loss handles mixed labels the same way.

Reweighting (``reweight``): ``none``; ``drw``, uniform weights until
``reweight_epoch`` and then the class-balanced weights of Cui et al.
(``(1 - beta) / (1 - beta ** n_c)``, normalised to sum to C); ``cb``, those weights
from the start. With weights the batch loss is the weighted mean
``sum_b sum_c w_c q_bc l_c / sum_b sum_c w_c q_bc``, which for hard labels is exactly
``F.cross_entropy(weight=w)``.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from ..interfaces import Loss
from ..params import non_negative, param


@attrs.frozen
class ReweightParams:
    reweight: Literal["none", "drw", "cb"] = param("none", help="class reweighting: none, drw (deferred), cb (from the start)")
    reweight_epoch: int = param(160, help="DRW: first epoch (0-based) with class-balanced weights", validator=non_negative)
    beta: float = param(0.9999, help="effective-number beta of the class-balanced weights")

    def __attrs_post_init__(self):
        if not 0.0 <= self.beta < 1.0:
            from ..params import ParamError

            raise ParamError("beta", f"must be in [0, 1) (got {self.beta!r})")


def class_balanced_weights(counts: Tensor, beta: float) -> Tensor:
    counts = counts.to(torch.float64)
    effective = (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts)) / (1.0 - beta)
    weights = 1.0 / effective
    return (weights / weights.sum() * counts.numel()).to(torch.float32)


class ClassMatrixLoss(Loss):
    """Base for losses expressed through the per-class loss matrix."""

    Params = ReweightParams

    def __init__(self, params, context):
        super().__init__(params, context)
        self.epoch = 0
        self._balanced = class_balanced_weights(context.counts_tensor(), params.beta).to(context.device)

    def class_weights(self) -> Tensor | None:
        mode = self.params.reweight
        if mode == "cb" or (mode == "drw" and self.epoch >= self.params.reweight_epoch):
            return self._balanced
        return None

    def class_losses(self, logits: Tensor) -> Tensor:
        return -F.log_softmax(logits, dim=1)

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        losses = self.class_losses(logits.float())
        weights = self.class_weights()
        if target.dim() == 1:
            picked = losses.gather(1, target.view(-1, 1)).squeeze(1)
            if weights is None:
                return picked.mean()
            w = weights[target]
            return (w * picked).sum() / w.sum()
        q = target.to(losses.dtype)
        if weights is None:
            return (q * losses).sum(dim=1).mean()
        qw = q * weights
        return (qw * losses).sum() / qw.sum()


class CrossEntropy(ClassMatrixLoss):
    """Softmax cross-entropy (CE; CE-DRW with reweight = "drw")."""

    name = "ce"


COMPONENTS = [CrossEntropy]
