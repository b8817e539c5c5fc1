"""Optimizers: how a step's gradient is taken before the one SGD update of [optim].

Every built-in ends its step with ``base.step()``, the SGD of [optim] (lr, momentum,
weight decay, Nesterov), so the learning-rate schedule, weight decay and the
checkpointed momentum mean the same under each; they differ in where the gradient
is taken. ``sgd``: at the current weights. ``sam`` (Foret et al., ICLR 2021): at the
weights pushed uphill by ``rho`` along the normalised gradient, the weights put
back before the update. ``cc-sam`` (Zhou et al., CVPR 2023): the classifier is
pushed uphill per class, with a radius that grows as the class gets rarer, as in the
authors' code; ``cc-sam-feature``, their second stage: the features a (frozen)
backbone gives each class pushed uphill, rarer classes further and weighted more.
Formulas: docs/recipes.md ([optim]) and docs/losses.md.
"""

from __future__ import annotations

import math
from typing import Optional

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interfaces import Optimizer, StepClosure
from ..params import ParamError, param, positive


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


@attrs.frozen
class CCSAMParams:
    noise_ratio: float = param(
        1e-6, help="scale of the per-class classifier radius (noise_ratio of the reference code)", validator=positive
    )
    flat_ratio: float = param(
        0.5, help="share of the loss taken at the perturbed classifier: (1 - flat_ratio) L(w) + flat_ratio L(w + e_y)"
    )

    def __attrs_post_init__(self):
        if not 0.0 < self.flat_ratio <= 1.0:
            raise ParamError("flat_ratio", f"must be in (0, 1]; 0 would train plain SGD (got {self.flat_ratio!r})")


class _OnePassHead(Optimizer):
    """An optimizer that changes the loss at the linear classifier (``head``) and then takes one SGD step.

    ``needs_linear`` ends the one-line error when the model's classifier is not ``nn.Linear``.
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


class CCSAM(_OnePassHead):
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

    def head(self, h: Tensor, z: Tensor, target: Tensor, loss_of) -> Tensor:
        """``(1 - r) L(z) + r L(z')``, ``z'_b = z_b + sum_c q_bc (E_c h_b + e_c)``, ``(E_c, e_c)`` class c's classifier perturbation.

        ``E_c = rho_c G_c / ||G_c||`` with ``G_c`` the gradient of class c's mean loss
        with respect to the classifier weight (and likewise ``e_c`` for the bias, with its
        own norm and radius, as the reference perturbs each parameter tensor).
        ``G_c = sum_b qn_bc D_b h_b^T`` (``D = B dL/dz``, the per-image logit gradients,
        ``qn`` the class memberships normalised per class) is never built: ``E_c h_b``
        and ``||G_c||`` come from the (B, B) Gram matrices of ``D`` and ``h``, so the
        cost does not grow with the classifier's size. The perturbation is a constant
        of the step (SAM's first-order rule), so gradients reach the weights and the
        features through ``z'`` alone.
        """
        assert self.classifier is not None, "attach(model) must run before the first step"
        plain = loss_of(z)
        batch, num_classes = z.shape
        (dz,) = torch.autograd.grad(plain, z, retain_graph=True)
        d = dz.detach() * batch
        q = F.one_hot(target, num_classes).to(z.dtype) if target.dim() == 1 else target.to(z.dtype)
        mass = q.sum(dim=0)
        present = (mass > 0).nonzero().squeeze(1)
        qp = q.index_select(1, present)  # (B, P): membership in the classes of this batch
        qn = qp / mass.index_select(0, present)
        hd = h.detach()
        weight, bias = self.classifier.weight, self.classifier.bias
        n_params = weight.numel() + (bias.numel() if bias is not None else 0)
        factor = self._count_factor.to(z.device).index_select(0, present) * n_params**0.25
        ratio = self.params.noise_ratio / math.sqrt(2.0)

        def radius(param_norm: Tensor, grad_norm: Tensor) -> Tensor:
            # noise_ratio * sqrt(||theta|| / (2 ||g_c||)) * (P / (n_c - 1)) ** (1/4), the reference's
            # magnitude; divided by ||g_c|| once more it scales g_c itself.
            return ratio * param_norm.sqrt() / grad_norm.sqrt() * factor / grad_norm

        gram_h = hd @ hd.T
        grad_w = torch.einsum("bp,bd,dp->p", qn, (d @ d.T) * gram_h, qn).clamp(min=0).sqrt().clamp(min=1e-12)
        scale_w = radius(torch.linalg.vector_norm(weight.detach()), grad_w)
        mix = (qp * scale_w) @ qn.T  # (B, B): sum_c q_bc s_c qn_b'c
        shift = (mix * (h @ hd.T)) @ d  # E_{y_b} h_b, with h_b live
        if bias is not None:
            grad_b_rows = qn.T @ d  # (P, C): g_c of the bias
            grad_b = torch.linalg.vector_norm(grad_b_rows, dim=1).clamp(min=1e-12)
            scale_b = radius(torch.linalg.vector_norm(bias.detach()), grad_b)
            shift = shift + (qp * scale_b) @ grad_b_rows
        flat = loss_of(z + shift)
        r = self.params.flat_ratio
        return (1.0 - r) * plain + r * flat


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

    def __attrs_post_init__(self):
        if not 0.0 < self.flat_ratio <= 1.0:
            raise ParamError("flat_ratio", f"must be in (0, 1]; 0 would train plain SGD (got {self.flat_ratio!r})")


def cc_sam_feature_weights(counts: Tensor, weight_div: float) -> Tensor:
    """``w_c = ln(n_max / n_c + 0.01) / weight_div``: about 0 for the largest class, more for rarer ones."""
    counts = counts.to(torch.float64)
    return (torch.log(counts.max() / counts + 0.01) / weight_div).to(torch.float32)


class CCSAMFeature(_OnePassHead):
    """CC-SAM's stage 2: the classifier trained on features pushed uphill per class, rarer classes further (one pass)."""

    name = "cc-sam-feature"
    Params = CCSAMFeatureParams
    needs_linear = "moves the input of a linear classifier (nn.Linear)"

    def __init__(self, params, context, base):
        super().__init__(params, context, base)
        self.weights = cc_sam_feature_weights(torch.tensor(context.class_counts), params.weight_div)

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
        r = self.params.flat_ratio
        return (1.0 - r) * plain + r * flat


COMPONENTS = [SGD, SAM, CCSAM, CCSAMFeature]
