"""Losses on class indices or soft targets, each with an optional reweighting schedule.

A loss implements ``class_losses(logits) -> (B, C)``, the matrix of ``l_c(z_b)``,
the loss image ``b`` would get with hard label ``c``. Hard targets gather from it
and soft targets ``q`` take ``sum_c q_c l_c(z)`` (docs/method.md §8), so every
loss handles mixed labels the same way. Built-ins: ``ce``, ``focal``, ``ldam`` (asks
for a cosine head), ``balanced-softmax`` and ``logit-adjust`` (training-time prior
shifts; prediction uses the plain logits), ``label-aware-smoothing`` (MiSLAS's stage-2
loss), and two that are not a class matrix: ``lade`` (PC-softmax + LADER, a batch term)
and ``ib`` (per-image influence weights; it reads the features, ``needs_features``).
Formulas and defaults: docs/losses.md.

Reweighting (``reweight``): ``none``; ``drw``, uniform weights until
``reweight_epoch`` and then the class-balanced weights of Cui et al.
(``(1 - beta) / (1 - beta ** n_c)``, normalised to sum to C); ``cb``, those weights
from the start. With weights, hard labels (and unmixed batches) take the weighted mean
``sum_b w[y_b] l_{y_b}(z_b) / sum_b w[y_b]``, exactly ``F.cross_entropy(weight=w)``. A
mixed batch (``mixed`` with y_f, y_b, lam) is weighted as ``mixed_weighting`` says:

- ``per-label`` (default, CMO's reference form): each label's term is normalised by the
  batch sum of its own label's weights,
  ``sum_b lam_b w[yf_b] l_{yf_b}(z_b) / sum_b w[yf_b]
  + sum_b (1 - lam_b) w[yb_b] l_{yb_b}(z_b) / sum_b w[yb_b]``.
  With ``lam`` constant over the batch, ``lam`` factors out of each sum and this is
  exactly CMO's ``lam * F.cross_entropy(z, y_f, weight=w)
  + (1 - lam) * F.cross_entropy(z, y_b, weight=w)``.
- ``joint``: one denominator, ``sum_b sum_c w_c q_bc l_c / sum_b sum_c w_c q_bc``. Also
  what a soft target given without ``mixed`` gets.

Without weights, or with uniform ones, both forms are the plain mean
``mean_b sum_c q_bc l_c(z_b)``.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from ..interfaces import Loss
from ..params import ParamError, non_negative, param, positive, probability


@attrs.frozen
class ReweightParams:
    reweight: Literal["none", "drw", "cb"] = param(
        "none", help="class reweighting: none, drw (deferred), cb (from the start)"
    )
    reweight_epoch: int = param(
        160, help="DRW: first epoch (0-based) with class-balanced weights", validator=non_negative
    )
    beta: float = param(0.9999, help="effective-number beta of the class-balanced weights")
    mixed_weighting: Literal["per-label", "joint"] = param(
        "per-label",
        help="class weights on mixed batches: per-label = CMO reference form, each label's term normalised by "
        "its own weights; joint = one denominator sum w q",
    )

    def __attrs_post_init__(self):
        if not 0.0 <= self.beta < 1.0:
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

    def __call__(self, logits: Tensor, target: Tensor, mixed=None) -> Tensor:
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
        if mixed is not None and self.params.mixed_weighting == "per-label":
            lam = mixed.lam.to(losses.dtype)
            return _label_term(losses, weights, mixed.y_f, lam) + _label_term(losses, weights, mixed.y_b, 1.0 - lam)
        qw = q * weights
        return (qw * losses).sum() / qw.sum()


def _label_term(losses: Tensor, weights: Tensor, y: Tensor, share: Tensor) -> Tensor:
    """``sum_b share_b w[y_b] l_{y_b}(z_b) / sum_b w[y_b]``: one label's term of CMO's form."""
    y = y.to(device=losses.device, dtype=torch.long)
    w = weights[y]
    picked = losses.gather(1, y.view(-1, 1)).squeeze(1)
    return (share * w * picked).sum() / w.sum()


class CrossEntropy(ClassMatrixLoss):
    """Softmax cross-entropy (CE; CE-DRW with reweight = "drw")."""

    name = "ce"


@attrs.frozen
class FocalParams(ReweightParams):
    gamma: float = param(1.0, help="focusing exponent: l = (1 - p) ** gamma * CE (0 gives CE)", validator=non_negative)


class Focal(ClassMatrixLoss):
    """Focal loss (1 - p) ** gamma * CE: down-weights images the model already gets right."""

    name = "focal"
    Params = FocalParams

    def class_losses(self, logits: Tensor) -> Tensor:
        log_p = F.log_softmax(logits, dim=1)
        # 1 - p as -expm1(log p) keeps precision when p is near 1; the floor keeps the
        # gradient of (1 - p) ** gamma finite there when gamma < 1.
        one_minus_p = (-torch.expm1(log_p)).clamp(min=1e-30)
        return one_minus_p.pow(self.params.gamma) * -log_p


@attrs.frozen
class LDAMParams(ReweightParams):
    max_m: float = param(0.5, help="margin of the rarest class (margins scale as n_c ** -0.25)", validator=positive)
    s: float = param(30.0, help="scale applied to the cosine logits", validator=positive)


def ldam_margins(counts: Tensor, max_m: float) -> Tensor:
    """``m_c = max_m * n_c ** -0.25 / max_j n_j ** -0.25``: the rarest class gets ``max_m``."""
    inv = counts.to(torch.float64).pow(-0.25)
    return (inv * (max_m / inv.max())).to(torch.float32)


class LDAM(ClassMatrixLoss):
    """Label-distribution-aware margin loss: larger margins for rarer classes, on a cosine head."""

    name = "ldam"
    Params = LDAMParams
    needs_normed_head = True

    def __init__(self, params, context):
        super().__init__(params, context)
        self.margins = ldam_margins(context.counts_tensor(), params.max_m).to(context.device)

    def class_losses(self, logits: Tensor) -> Tensor:
        # l_c = CE(s (z - m_c e_c), c) = softplus(LSE_{j != c}(s z_j) - s (z_c - m_c)).
        # One column's margin changes only that column, so the (B, C) matrix needs the
        # log-sum-exp of every row without column c, not C shifted copies of the logits.
        # For c != argmax, p_c <= 1/2 and L + log1p(-p_c) is exact; the argmax column
        # (where 1 - p_c cancels) gets its own masked log-sum-exp.
        sz = self.params.s * logits
        lse = torch.logsumexp(sz, dim=1, keepdim=True)
        others = lse + torch.log1p(-torch.exp(sz - lse).clamp(max=0.5))
        top = sz.argmax(dim=1, keepdim=True)
        without_top = torch.logsumexp(sz.scatter(1, top, float("-inf")), dim=1, keepdim=True)
        others = others.scatter(1, top, without_top)
        return F.softplus(others - (sz - self.params.s * self.margins))


class BalancedSoftmax(ClassMatrixLoss):
    """Balanced Softmax: CE on logits shifted by log n_c in training, plain logits at test time."""

    name = "balanced-softmax"

    def __init__(self, params, context):
        super().__init__(params, context)
        self.shift = context.counts_tensor().log()

    def class_losses(self, logits: Tensor) -> Tensor:
        return -F.log_softmax(logits + self.shift, dim=1)


@attrs.frozen
class LogitAdjustParams(ReweightParams):
    tau: float = param(1.0, help="strength of the log-prior shift", validator=non_negative)


class LogitAdjust(ClassMatrixLoss):
    """Logit-adjusted CE: CE(z + tau log pi), pi the training class prior; plain logits at test time."""

    name = "logit-adjust"
    Params = LogitAdjustParams

    def __init__(self, params, context):
        super().__init__(params, context)
        counts = context.counts_tensor()
        self.shift = params.tau * (counts / counts.sum()).log()

    def class_losses(self, logits: Tensor) -> Tensor:
        return -F.log_softmax(logits + self.shift, dim=1)


@attrs.frozen
class LabelAwareSmoothingParams(ReweightParams):
    smooth_head: float = param(0.4, help="eps_1: label smoothing of the most frequent class", validator=probability)
    smooth_tail: float = param(0.1, help="eps_K: label smoothing of the rarest class", validator=probability)
    shape: Literal["concave", "linear", "convex"] = param(
        "concave", help="how eps goes from eps_K to eps_1 with the class count (MiSLAS's forms)"
    )


def label_aware_smoothing(counts: Tensor, head: float, tail: float, shape: str) -> Tensor:
    """Per-class ``eps_c = eps_K + (eps_1 - eps_K) f(t_c)``, ``t_c = (n_c - n_K) / (n_1 - n_K)``, as in MiSLAS's code.

    ``f`` is ``sin(pi t / 2)`` (concave), ``t`` (linear) or ``1 - cos(pi t / 2)``
    (convex). With all counts equal there is no head or tail and every class gets
    ``eps_1``.
    """
    counts = counts.to(torch.float64)
    span = counts.max() - counts.min()
    if span == 0:
        return torch.full(counts.shape, head, dtype=torch.float32)
    t = (counts - counts.min()) / span
    f = {"concave": torch.sin(0.5 * math.pi * t), "linear": t, "convex": 1.0 - torch.cos(0.5 * math.pi * t)}[shape]
    return (tail + (head - tail) * f).to(torch.float32)


class LabelAwareSmoothing(ClassMatrixLoss):
    """MiSLAS label-aware smoothing: CE with more smoothing for frequent classes (eps_1 head .. eps_K tail)."""

    name = "label-aware-smoothing"
    Params = LabelAwareSmoothingParams

    def __init__(self, params, context):
        super().__init__(params, context)
        self.smoothing = label_aware_smoothing(
            context.counts_tensor(), params.smooth_head, params.smooth_tail, params.shape
        ).to(context.device)

    def class_losses(self, logits: Tensor) -> Tensor:
        # l_c = (1 - eps_c) (-log p_c) + eps_c mean_j (-log p_j): CE against the target
        # (1 - eps_c) e_c + eps_c / C, the smoothing picked by the label's class.
        log_p = F.log_softmax(logits, dim=1)
        eps = self.smoothing
        return -(1.0 - eps) * log_p - eps * log_p.mean(dim=1, keepdim=True)


@attrs.frozen
class LADEParams:
    alpha: float = param(
        0.1, help="weight of the LADER regulariser: L = PC-softmax CE + alpha * LADER", validator=non_negative
    )
    remine_lambda: float = param(
        0.1, help="lambda of the ReMINE lower bound (the squared log-partition penalty)", validator=non_negative
    )


class LADE(Loss):
    """LADE: PC-softmax CE (logits + log prior) plus alpha times the LADER regulariser; plain logits at test time."""

    name = "lade"
    Params = LADEParams

    def __init__(self, params, context):
        super().__init__(params, context)
        self.epoch = 0
        counts = context.counts_tensor()
        self.prior = counts / counts.sum()
        self.log_prior = self.prior.log()

    def __call__(self, logits: Tensor, target: Tensor, mixed=None) -> Tensor:
        z = logits.float()
        batch, num_classes = z.shape
        q = F.one_hot(target, num_classes).to(z.dtype) if target.dim() == 1 else target.to(z.dtype)
        pc_softmax = -(q * F.log_softmax(z + self.log_prior, dim=1)).sum(dim=1).mean()
        # LADER (Hong et al., eq. 12, as the reference code computes it): per class c, the
        # ReMINE bound of the target-balanced log-likelihood ratio,
        #   mean_{b in c} z_bc - LSE_b(z_bc - log pi_c + log(1 / C)) + log B - lambda * (.)^2,
        # weighted by the prior and negated. A class absent from the batch contributes its
        # second term only. Soft targets count image b as q_bc of class c.
        first = (q * z).sum(dim=0) / (q.sum(dim=0) + 1e-8)
        second = torch.logsumexp(z - self.log_prior - math.log(num_classes), dim=0) - math.log(batch)
        bound = first - second - self.params.remine_lambda * second.square()
        lader = -(self.prior * bound).sum()
        return pc_softmax + self.params.alpha * lader


@attrs.frozen
class IBParams:
    alpha: float = param(
        1000.0, help="numerator of the influence weight alpha / (||p - q||_1 ||h||_1 + epsilon)", validator=positive
    )
    start_epoch: int = param(
        100, help="first epoch (0-based) with the influence-balanced loss; plain CE before", validator=non_negative
    )
    epsilon: float = param(1e-3, help="added to the influence in the weight's denominator", validator=positive)


class InfluenceBalanced(Loss):
    """IB loss: from start_epoch, class-weighted CE divided by each image's influence ||p - y||_1 ||h||_1."""

    name = "ib"
    Params = IBParams
    needs_features = True

    def __init__(self, params, context):
        super().__init__(params, context)
        self.epoch = 0
        inverse = 1.0 / context.counts_tensor()
        # The reference code's class-balancing factor: w_c proportional to 1 / n_c, summing to C.
        self.class_weights = inverse / inverse.sum() * inverse.numel()

    def __call__(self, logits: Tensor, target: Tensor, mixed=None, *, features: Optional[Tensor] = None) -> Tensor:
        z = logits.float()
        num_classes = z.shape[1]
        q = F.one_hot(target, num_classes).to(z.dtype) if target.dim() == 1 else target.to(z.dtype)
        log_p = F.log_softmax(z, dim=1)
        if self.epoch < self.params.start_epoch:
            return -(q * log_p).sum(dim=1).mean()
        if features is None:
            raise ValueError("the IB loss needs features=h (B, K), the classifier's input (needs_features = True)")
        # As in the reference code the weight is not detached: its gradient is part of the loss.
        influence = (log_p.exp() - q).abs().sum(dim=1) * features.float().abs().sum(dim=1)
        weight = self.params.alpha / (influence + self.params.epsilon)
        weighted_ce = -(q * self.class_weights * log_p).sum(dim=1)
        return (weight * weighted_ce).mean()


COMPONENTS = [CrossEntropy, Focal, LDAM, BalancedSoftmax, LogitAdjust, LabelAwareSmoothing, LADE, InfluenceBalanced]
