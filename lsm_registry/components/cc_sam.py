"""CC-SAM (Zhou et al., CVPR 2023): class-conditional sharpness-aware minimisation, stage 1 and stage 2.

``cc-sam`` (stage 1) perturbs the linear classifier per class, with a radius that grows
as the class gets rarer; ``cc-sam-feature`` (stage 2, on a frozen backbone) moves each
class's features uphill, rarer classes further and weighted more. Both follow the
authors' train_cifar.py (zzpustc/CC-SAM) and take one pass per step through the model's
feature API (:class:`~lsm_registry.components.optimizers.OnePassHead`).

Two things of the reference step depend on more than the step's logits and target, and
reach the optimizer through callbacks it brings (the loop stays one loop):

- under mixup the reference groups the per-class gradients by each image's own
  (un-mixed) label and takes the flat term as hard-label cross-entropy on it
  (``mixed_labels = "unmixed"``): ``step-labels`` hands the optimizer the labels of
  each mixed step;
- its stage 2 ramps the flat term's share up over the first epochs
  (``ramp_epochs``): ``flat-ramp`` tells the optimizer the epoch.

These callbacks are not registered: they mean something only to the optimizer that
brings them, so no recipe can list them where they would do nothing.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from ..interfaces import Callback, StepBatch
from ..params import ParamError, non_negative, param, positive
from .optimizers import OnePassHead


def _check_flat_ratio(value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ParamError("flat_ratio", f"must be in (0, 1]; 0 would train plain SGD (got {value!r})")


@attrs.frozen
class CCSAMParams:
    noise_ratio: float = param(
        1e-6, help="scale of the per-class classifier radius (noise_ratio of the reference code)", validator=positive
    )
    flat_ratio: float = param(
        0.5, help="share of the loss taken at the perturbed classifier: (1 - flat_ratio) L(w) + flat_ratio L(w + e_y)"
    )
    mixed_labels: Literal["soft", "unmixed"] = param(
        "soft",
        help='on a mixed batch, "unmixed" groups the per-class gradients by each image\'s own (un-mixed) label '
        'and takes the flat term as cross-entropy on it, as the reference code does; "soft" uses the mixed '
        "target for both",
    )
    param_norm: Literal["per-tensor", "joint"] = param(
        "per-tensor",
        help='the classifier norm in the radius: "per-tensor" (||W|| for W, ||b|| for b) or "joint" '
        "(sqrt(||W||^2 + ||b||^2) for both, the reference code's current train_cifar.py)",
    )

    def __attrs_post_init__(self):
        _check_flat_ratio(self.flat_ratio)


class CCSAM(OnePassHead):
    """Class-conditional SAM: the classifier perturbed per class, larger radii for rarer classes (one pass per step)."""

    name = "cc-sam"
    Params = CCSAMParams
    needs_linear = "perturbs a linear classifier (nn.Linear) (a cosine head, as LDAM asks for, is not one)"

    def __init__(self, params, context, base):
        super().__init__(params, context, base)
        counts = torch.tensor(context.class_counts, dtype=torch.float64)
        # The reference divides by (n_c - 1) ** (1/4); a class of one image would get an
        # infinite radius there, so n_c - 1 is floored at 1.
        self._count_factor = (counts - 1).clamp(min=1.0).pow(-0.25).to(torch.float32)
        #: The current step's own (un-mixed) labels (B,) when it mixed, from ``step-labels``; else None.
        self.step_labels: Optional[Tensor] = None

    def configure_callbacks(self) -> list[Callback]:
        return [StepLabels(StepLabels.Params(), self.context)] if self.params.mixed_labels == "unmixed" else []

    def head(self, h: Tensor, z: Tensor, target: Tensor, loss_of) -> Tensor:
        """``(1 - r) L(z) + r L'(z')``, ``z'_b = z_b + sum_c q_bc (E_c h_b + e_c)``, ``(E_c, e_c)`` class c's classifier perturbation.

        ``E_c = rho_c G_c / ||G_c||`` with ``G_c`` the gradient of class c's mean loss
        with respect to the classifier weight (and likewise ``e_c`` for the bias, with its
        own norm and radius, as the reference perturbs each parameter tensor).
        ``G_c = sum_b qn_bc D_b h_b^T`` (``D = B dL/dz``, the per-image logit gradients,
        ``qn`` the class memberships normalised per class) is never built: ``E_c h_b``
        and ``||G_c||`` come from the (B, B) Gram matrices of ``D`` and ``h``, so the
        cost does not grow with the classifier's size. The perturbation is a constant
        of the step (SAM's first-order rule), so gradients reach the weights and the
        features through ``z'`` alone. ``q`` is the target (a soft one mixes the classes'
        perturbations) and ``L' = L``; on a mixed step with ``mixed_labels = "unmixed"``,
        ``q`` is the one-hot of the images' own labels and ``L'`` cross-entropy on them,
        while ``L(z)``, and so ``D``, stay the mixed loss: the reference's grouping.
        """
        assert self.classifier is not None, "attach(model) must run before the first step"
        plain = loss_of(z)
        batch, num_classes = z.shape
        (dz,) = torch.autograd.grad(plain, z, retain_graph=True)
        d = dz.detach() * batch
        own = self.step_labels
        groups = own if own is not None else target
        q = F.one_hot(groups, num_classes).to(z.dtype) if groups.dim() == 1 else groups.to(z.dtype)
        mass = q.sum(dim=0)
        present = (mass > 0).nonzero().squeeze(1)
        qp = q.index_select(1, present)  # (B, P): membership in the classes of this batch
        qn = qp / mass.index_select(0, present)
        hd = h.detach()
        weight, bias = self.classifier.weight, self.classifier.bias
        n_params = weight.numel() + (bias.numel() if bias is not None else 0)
        factor = self._count_factor.to(z.device).index_select(0, present) * n_params**0.25
        ratio = self.params.noise_ratio / math.sqrt(2.0)
        norms = [torch.linalg.vector_norm(p.detach()) for p in (weight, bias) if p is not None]
        if self.params.param_norm == "joint":  # the reference's grad_norm(classifier parameters) + 1e-12
            norms = [torch.linalg.vector_norm(torch.stack(norms)) + 1e-12] * len(norms)

        def radius(param_norm: Tensor, grad_norm: Tensor) -> Tensor:
            # noise_ratio * sqrt(||theta|| / (2 ||g_c||)) * (P / (n_c - 1)) ** (1/4), the reference's
            # magnitude; divided by ||g_c|| once more it scales g_c itself.
            return ratio * param_norm.sqrt() / grad_norm.sqrt() * factor / grad_norm

        gram_h = hd @ hd.T
        grad_w = torch.einsum("bp,bd,dp->p", qn, (d @ d.T) * gram_h, qn).clamp(min=0).sqrt().clamp(min=1e-12)
        scale_w = radius(norms[0], grad_w)
        mix = (qp * scale_w) @ qn.T  # (B, B): sum_c q_bc s_c qn_b'c
        shift = (mix * (h @ hd.T)) @ d  # E_{y_b} h_b, with h_b live
        if bias is not None:
            grad_b_rows = qn.T @ d  # (P, C): g_c of the bias
            grad_b = torch.linalg.vector_norm(grad_b_rows, dim=1).clamp(min=1e-12)
            scale_b = radius(norms[1], grad_b)
            shift = shift + (qp * scale_b) @ grad_b_rows
        flat = F.cross_entropy(z + shift, own) if own is not None else loss_of(z + shift)
        r = self.params.flat_ratio
        return (1.0 - r) * plain + r * flat


class StepLabels(Callback):
    """Hands ``cc-sam`` (``mixed_labels = "unmixed"``) the own labels of each mixed step; brought by it."""

    name = "step-labels"

    @attrs.frozen
    class Params:
        pass

    def on_batch(self, loop: Any, batch: StepBatch) -> None:
        # StepBatch.labels are the background batch's: for mixup, the batch itself before its
        # shuffled copy was blended in; the reference's y (targets_a) of mixup_data.
        loop.optimizer.step_labels = batch.labels if batch.mixed is not None else None

    def on_step_end(self, loop: Any, batch: StepBatch, loss: Tensor) -> None:
        loop.optimizer.step_labels = None


@attrs.frozen
class CCSAMFeatureParams:
    radius: float = param(
        1.0,
        help="scale of the feature perturbation (adver_reg of the reference code): class c's "
        "images are moved by radius * w_c in all",
        validator=positive,
    )
    weight_div: float = param(
        2.0,
        help="w_c = ln(n_max / n_c + 0.01) / weight_div, the class weight of the radius and of "
        "the perturbed loss (div of the reference code)",
        validator=positive,
    )
    flat_ratio: float = param(
        0.3,
        help="share of the loss taken at the perturbed features: "
        "(1 - flat_ratio) L(z) + flat_ratio mean_b w_y CE(classifier(h_b + e_b))",
    )
    ramp_epochs: int = param(
        0,
        help="the share grows linearly to flat_ratio over this many epochs, flat_ratio * min(1, (epoch + 1) / "
        "ramp_epochs) (the reference's min((e + 1) / 30, 0.3) is 9 at 0.3); 0: flat_ratio from the start",
        validator=non_negative,
    )

    def __attrs_post_init__(self):
        _check_flat_ratio(self.flat_ratio)


def cc_sam_feature_weights(counts: Tensor, weight_div: float) -> Tensor:
    """``w_c = ln(n_max / n_c + 0.01) / weight_div``: about 0 for the largest class, more for rarer ones."""
    counts = counts.to(torch.float64)
    return (torch.log(counts.max() / counts + 0.01) / weight_div).to(torch.float32)


def flat_share(params: CCSAMFeatureParams, epoch: int) -> float:
    """The flat term's share at 0-based ``epoch``: ``flat_ratio``, ramped over ``ramp_epochs`` when set."""
    if params.ramp_epochs == 0:
        return params.flat_ratio
    return params.flat_ratio * min(1.0, (epoch + 1) / params.ramp_epochs)


class CCSAMFeature(OnePassHead):
    """CC-SAM's stage 2: the classifier trained on features pushed uphill per class, rarer classes further (one pass)."""

    name = "cc-sam-feature"
    Params = CCSAMFeatureParams
    needs_linear = "moves the input of a linear classifier (nn.Linear)"

    def __init__(self, params, context, base):
        super().__init__(params, context, base)
        self.weights = cc_sam_feature_weights(torch.tensor(context.class_counts), params.weight_div)
        #: The flat term's share this epoch (``flat-ramp`` sets it when ``ramp_epochs`` > 0).
        self.share = flat_share(params, 0)

    def configure_callbacks(self) -> list[Callback]:
        return [FlatRamp(FlatRamp.Params(), self.context)] if self.params.ramp_epochs > 0 else []

    def head(self, h: Tensor, z: Tensor, target: Tensor, loss_of) -> Tensor:
        """``(1 - r) L(z) + r mean_b sum_c q_bc w_c CE_c(z_b + W e_b)``, ``e_b = sum_c q_bc radius w_c G_{c,b} / ||G_c||``.

        ``G_c`` is the gradient of class c's mean loss with respect to the features of its
        images (the rows of the other images are zero), ``||G_c||`` its norm over those
        rows, as in the reference code; with the batch-mean loss ``L`` that is
        ``dL/dh = (dL/dz) W`` on class c's rows up to a factor the normalisation removes.
        ``h + e`` through the linear classifier is ``z + e W^T``, so the frozen backbone is
        not run again. The perturbation is a constant of the step; the perturbed term is
        cross-entropy weighted by ``w_y`` whatever [loss] is, as in the reference, and
        ``L`` is the recipe's loss. A soft target counts image b as q_bc of class c.
        ``r`` is this epoch's share (:func:`flat_share`).
        """
        assert self.classifier is not None, "attach(model) must run before the first step"
        plain = loss_of(z)
        num_classes = z.shape[1]
        (dz,) = torch.autograd.grad(plain, z, retain_graph=True)
        weight = self.classifier.weight
        grad_h = dz.detach() @ weight.detach().to(dz.dtype)  # (B, K): dL/dh
        q = F.one_hot(target, num_classes).to(z.dtype) if target.dim() == 1 else target.to(z.dtype)
        w = self.weights.to(device=z.device, dtype=z.dtype)
        norms = (q.square().T @ grad_h.square().sum(dim=1)).sqrt()  # (C,): ||G_c|| over class c's rows
        coef = (q * (self.params.radius * w / norms.clamp(min=1e-12))).sum(dim=1, keepdim=True)
        shifted = z + (coef * grad_h) @ weight.to(z.dtype).T  # classifier(h + e), W live
        flat = -(q * w * F.log_softmax(shifted, dim=1)).sum(dim=1).mean()
        return (1.0 - self.share) * plain + self.share * flat


class FlatRamp(Callback):
    """Sets ``cc-sam-feature``'s flat share at each epoch's start (``ramp_epochs``) and records it; brought by it."""

    name = "flat-ramp"

    @attrs.frozen
    class Params:
        pass

    def on_epoch_start(self, loop: Any, epoch: int) -> None:
        loop.optimizer.share = flat_share(loop.optimizer.params, epoch)

    def on_epoch_end(self, loop: Any, epoch: int, record: dict[str, Any]) -> None:
        record["flat_share"] = loop.optimizer.share


COMPONENTS = [CCSAM, CCSAMFeature]
