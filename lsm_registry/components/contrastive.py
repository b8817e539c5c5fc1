"""Supervised contrastive learning: SupCon and the long-tailed losses built on it.

Each loss reads the model's projection (``[model] projection_dim``, the training-output
part ``"embeddings"``) and trains on ``views`` independently augmented views of every
sampled image (``Loss.views_per_image``; the engine stacks them view-major). Nothing in
the training loop names a method: two views, a projection head and an output part are
general extension points.

Soft targets: the positives of an anchor are weighted by how much label two rows share,
``w_ij = t_i . t_j`` (``t`` the target distributions). With one-hot targets that is the
reference's mask of same-class pairs; a mixed image (LSM, CutMix) is a positive of every
class it carries, in proportion to the share of its label that class holds. This is the
library's reading of mixing under a contrastive loss: the paper reports no such row.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LSMError
from ..interfaces import Callback, Loss
from ..params import at_least, non_negative, param, positive
from .bbn import cumulative_alpha
from .projection import EMBEDDINGS


def soft_targets(target: Tensor, num_classes: int) -> Tensor:
    """(N, C) float target distributions from class indices (N,) or distributions (N, C)."""
    if target.dim() == 1:
        return F.one_hot(target, num_classes).float()
    return target.float()


def supcon_terms(embeddings: Tensor, weights: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Per anchor, ``-sum_j w_ij log p_ij / sum_j w_ij`` and whether it has any positive.

    ``p_ij = exp(z_i . z_j / T) / sum_{k != i} exp(z_i . z_k / T)`` over every other row
    (Khosla et al., eq. 2, "L_out"); ``weights`` (N, N) with any diagonal (it is ignored).
    The row maximum is subtracted before the exponential, as the reference does, for
    stability; it cancels in ``p``.
    """
    n = embeddings.shape[0]
    sim = embeddings @ embeddings.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    sim = sim - sim.detach().max(dim=1, keepdim=True).values
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    w = weights.masked_fill(self_mask, 0.0)
    total = w.sum(dim=1)
    has_positive = total > 0
    mean_log_prob = (w * log_prob.masked_fill(self_mask, 0.0)).sum(dim=1) / total.clamp_min(1e-12)
    return -mean_log_prob, has_positive


def supcon_loss(embeddings: Tensor, targets: Tensor, temperature: float, base_temperature: float) -> Tensor:
    """SupCon over the batch: the mean of :func:`supcon_terms` over anchors with a positive, times ``T / T_base``.

    ``targets`` (N, C) distributions; the positives' weights are ``targets @ targets.T``.
    A batch where no anchor has a positive gives 0 (connected to the graph).
    """
    terms, has_positive = supcon_terms(embeddings, targets @ targets.T, temperature)
    if not bool(has_positive.any()):
        return embeddings.sum() * 0.0
    return (temperature / base_temperature) * terms[has_positive].mean()


@attrs.frozen
class SupConParams:
    temperature: float = param(
        0.1, help="softmax temperature of the similarities (reference CIFAR: 0.1)", validator=positive
    )
    base_temperature: float = param(
        0.07,
        help="the reference's base temperature: the loss is scaled by temperature / base_temperature",
        validator=positive,
    )
    views: int = param(2, help="independently augmented views of each sampled image per step", validator=at_least(2))


class ContrastiveLoss(Loss):
    """Base of the losses that read the projection: views, the embeddings, and a fallback without them.

    Called without ``outputs`` (a model without a projection head, the conformance kit) the
    loss compares the L2-normalised logits instead, so it stays a loss on logits alone.
    """

    reads_outputs = (EMBEDDINGS,)

    @property
    def views_per_image(self) -> int:
        return int(self.params.views)

    def embeddings(self, logits: Tensor, outputs: Optional[Mapping[str, Tensor]]) -> Tensor:
        given = outputs.get(EMBEDDINGS) if outputs else None
        return given if given is not None else F.normalize(logits.float(), dim=1)

    def rows(self, logits: Tensor, target: Tensor, outputs: Optional[Mapping[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """What every contrastive loss compares: the rows' embeddings (N, D) and target distributions (N, C)."""
        return self.embeddings(logits, outputs), soft_targets(target, logits.shape[1])


class SupCon(ContrastiveLoss):
    """SupCon (Khosla et al. 2020): pulls together the views of a class, pushes the others apart; trains no classifier.

    Stage 1 of a two-stage recipe: the classifier gets no gradient here, so the run's
    accuracy stays at chance; a second stage (``[stage] train = "classifier"``, e.g.
    recipes/supcon_linear.toml) trains it on the frozen features.
    """

    name = "supcon"
    Params = SupConParams

    def __call__(
        self, logits: Tensor, target: Tensor, mixed: Any = None, *, outputs: Optional[Mapping[str, Tensor]] = None
    ) -> Tensor:
        z, t = self.rows(logits, target, outputs)
        return supcon_loss(z, t, self.params.temperature, self.params.base_temperature)


# ---------------------------------------------------------------------------- Hybrid-SC


@attrs.frozen
class HybridSCParams(SupConParams):
    base_temperature: float = param(
        0.1,
        help="the loss is scaled by temperature / base_temperature; the paper's SC loss has no such factor "
        "(equal to temperature: 1)",
        validator=positive,
    )


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_b sum_c q_bc (-log softmax(z_b)_c)``: CE on class indices' one-hot or on mixed targets."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


class HybridSC(ContrastiveLoss):
    """Hybrid-SC (Wang et al., CVPR 2021): SupCon on the projection and CE on the logits, moved from the first to the second.

    ``L = alpha * L_SupCon(embeddings) + (1 - alpha) * L_CE(logits)``, ``alpha = 1 - (epoch / T_max) ** 2``
    (0-based epoch, ``T_max`` the run's epochs; BBN's curriculum): feature learning first,
    the classifier last. One network, trained in one stage; the prediction is the classifier's.

    The CE branch reads the logits of every view, not of the first alone: both views are
    labelled augmentations of the image, the forward has already run on them, and the mean
    over 2B rows has the same expectation as over B with less variance.

    Differs from the paper: its classifier branch draws its own class-balanced batch (a
    second sampler), while its contrastive branch samples instances; here both branches read
    the one instance-sampled batch of views (the loss sees only that batch). The paper's
    prototypical variant (PSC: a learned prototype per class as the only keys) is not
    provided: its prototypes are parameters the optimizer would have to own, which the
    loss contract has no place for.
    """

    name = "hybrid-sc"
    Params = HybridSCParams

    def __init__(self, params: Any, context: Any):
        super().__init__(params, context)
        self.epoch = 0

    def alpha(self) -> float:
        """The contrastive branch's share at the current epoch."""
        return cumulative_alpha(self.epoch, self.context.epochs)

    def __call__(
        self, logits: Tensor, target: Tensor, mixed: Any = None, *, outputs: Optional[Mapping[str, Tensor]] = None
    ) -> Tensor:
        z, t = self.rows(logits, target, outputs)
        p = self.params
        alpha = self.alpha()
        contrastive = supcon_loss(z, t, p.temperature, p.base_temperature)
        return alpha * contrastive + (1.0 - alpha) * soft_cross_entropy(logits, t)


# ---------------------------------------------------------------------------- TSC


def uniform_targets(
    num: int, dim: int, generator: torch.Generator, steps: int, device: torch.device, temperature: float = 0.07
) -> Tensor:
    """``num`` unit vectors of ``dim`` spread over the sphere: TSC's optimal targets.

    Minimises the reference's uniformity objective ``mean_i log sum_j exp(u_i . u_j / t)``
    (t = 0.07, target_generation.py) over normalised points, from a Gaussian draw of
    ``generator`` (so the run seed fixes them), by Adam with a cosine-decayed rate. The
    constant term j = i is left out of the sum: the minimiser is the same, but at t = 0.07
    ``exp(1 / t)`` outweighs the rest by e^12 and leaves Adam steps of its epsilon's size
    (the reference takes 10,000 steps; this reaches the simplex, when num <= dim + 1, in a
    few hundred). The pull between two points vanishes as they meet (the cosine is flat at
    its maximum), so in very few dimensions (2) points may end up on top of each other; in
    the projection's dimensions a Gaussian start is far from that. Computed in float64 on
    ``device``, returned float32.
    """
    x = torch.randn(num, dim, generator=generator, dtype=torch.float64).to(device).requires_grad_(True)
    if num < 2:
        return F.normalize(x.detach(), dim=1).float()
    opt = torch.optim.Adam([x], lr=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    self_pairs = torch.eye(num, dtype=torch.bool, device=device)
    with torch.enable_grad():
        for _ in range(steps):
            u = F.normalize(x, dim=1)
            loss = torch.logsumexp((u @ u.T / temperature).masked_fill(self_pairs, float("-inf")), dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return F.normalize(x.detach(), dim=1).float()


def match_targets(centres: Tensor, targets: Tensor) -> Tensor:
    """(C,) long: the target each class gets, the assignment maximising ``sum_c centre_c . target_a(c)``.

    The Hungarian matching of the reference (scipy's ``linear_sum_assignment`` on the
    class centres' cosine with every target): the classes move as little as possible to
    reach a target, the same rule whatever the imbalance.
    """
    from scipy.optimize import linear_sum_assignment

    cost = (centres.double() @ targets.double().T).cpu().numpy()
    rows, cols = linear_sum_assignment(cost, maximize=True)
    assignment = torch.empty(centres.shape[0], dtype=torch.long)
    assignment[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return assignment


def sampled_positives(weights: Tensor, views: int, k: int, generator: torch.Generator) -> Tensor:
    """KCL's positives: each anchor's other views always, and ``k`` rows drawn among the rest of its class.

    ``weights`` (N, N) the soft positive weights ``t_i . t_j`` of N = views * B rows stacked
    view-major; returns them with every other candidate set to 0. ``k = 0`` keeps all
    (SupCon). The draw is uniform among the candidates (rows with a positive weight that
    are not a view of the anchor's image), from ``generator``.
    """
    if k <= 0:
        return weights
    n = weights.shape[0]
    image = torch.arange(n, device=weights.device) % (n // views)
    same_image = image[:, None] == image[None, :]
    same_image.fill_diagonal_(False)
    candidates = (weights > 0) & ~same_image
    candidates.fill_diagonal_(False)
    scores = torch.rand(n, n, generator=generator).to(weights.device).masked_fill(~candidates, -1.0)
    top = scores.topk(min(k, n - 1), dim=1).indices
    chosen = torch.zeros_like(candidates).scatter_(1, top, True) & candidates
    return weights * (chosen | same_image)


def tsc_loss(
    embeddings: Tensor,
    positives: Tensor,
    targets: Optional[Tensor],
    labels: Tensor,
    target_weight: float,
    temperature: float,
) -> Tensor:
    """Per anchor ``-(sum_j w_ij log p_ij + tw sum_c q_ic log p_i,c) / (sum_j w_ij + sum_c q_ic)``, the mean over anchors.

    ``p`` the softmax of ``z_i . k / T`` over the keys: every other row and every target
    (``targets`` (C, D) in class order, row c the target assigned to class c; None: no
    targets, KCL alone). ``labels`` (N, C) the rows' target distributions ``q``: the class's
    target is a positive of weight ``tw`` in the numerator and counts once in the
    denominator, as in the reference's mask (tr = 1). Anchors without a positive are left out.
    """
    n = embeddings.shape[0]
    keys = embeddings if targets is None else torch.cat([embeddings, targets.to(embeddings.dtype)], dim=0)
    sim = embeddings @ keys.T / temperature
    self_mask = torch.zeros_like(sim, dtype=torch.bool)
    self_mask[:, :n].fill_diagonal_(True)
    sim = sim - sim.detach().max(dim=1, keepdim=True).values
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(self_mask, 0.0)
    w = positives.masked_fill(self_mask[:, :n], 0.0)
    pulled, total = (w * log_prob[:, :n]).sum(dim=1), w.sum(dim=1)
    if targets is not None:
        pulled = pulled + target_weight * (labels * log_prob[:, n:]).sum(dim=1)
        total = total + labels.sum(dim=1)
    has = total > 0
    if not bool(has.any()):
        return embeddings.sum() * 0.0
    return -(pulled[has] / total[has]).mean()


@attrs.frozen
class TSCParams:
    temperature: float = param(0.07, help="softmax temperature (reference: moco-t 0.07)", validator=positive)
    base_temperature: float = param(
        0.07, help="the loss is scaled by temperature / base_temperature (as SupCon's)", validator=positive
    )
    views: int = param(2, help="independently augmented views of each sampled image per step", validator=at_least(2))
    positives: int = param(
        6,
        help="KCL's K: same-class rows drawn as positives per anchor, besides its own other views "
        "(reference 6); 0: every same-class row (SupCon)",
        validator=non_negative,
    )
    target_weight: float = param(
        0.2, help="weight of the class's target as a positive (reference: --tw 0.2)", validator=non_negative
    )
    start_epoch: int = param(
        0,
        help="first 0-based epoch with targets; before it the loss is KCL alone (the reference trains "
        "half its epochs as KCL first)",
        validator=non_negative,
    )
    target_steps: int = param(
        500, help="Adam steps of the targets' uniformity objective (computed once)", validator=at_least(1)
    )


class TSC(ContrastiveLoss):
    """TSC (Li et al., CVPR 2022): KCL with a fixed target per class, targets spread uniformly on the sphere.

    The C targets are computed once (:func:`uniform_targets`, from the run seed) in the
    projection's dimension, and each class is matched to one by the Hungarian assignment of
    the class centres to the targets (:func:`match_targets`), once per epoch: at the start
    of epoch e from the mean normalised embedding of each class over epoch e - 1 (a class
    not seen keeps its earlier centre; the first epoch takes the identity, the targets being
    a random draw). The loss is KCL (each anchor's own other views and ``positives`` drawn
    same-class rows) with every target as a key and the class's target as one more
    positive of weight ``target_weight`` (:func:`tsc_loss`).

    State (targets, assignment, centres, the epoch's sums) lives in the loss and is saved
    with every checkpoint through the ``tsc-state`` callback it brings, which also sums the
    class sums over the processes at each epoch's end, so every process matches alike.

    Differs from the reference (imagenet_inat, moco/builder.py): it is a MoCo model (a
    momentum key encoder and a queue of 65,536 keys); here the keys are the batch's
    views. It keeps running class centroids (momentum 0.9 per step) and re-matches every
    step; here the centres are per-epoch means and the matching is per epoch (a matching
    of 8,142 classes costs seconds). Its KCL first half restarts the optimizer and the
    cosine schedule at the switch; here ``start_epoch`` switches the loss alone.
    """

    name = "tsc"
    Params = TSCParams

    def __init__(self, params: Any, context: Any):
        super().__init__(params, context)
        self.epoch = 0
        self.targets: Optional[Tensor] = None
        self.assignment = torch.arange(context.num_classes)
        self.centres: Optional[Tensor] = None
        self.sums: Optional[Tensor] = None
        self.counts = torch.zeros(context.num_classes, dtype=torch.float64)
        #: The sums are over every process (summed at the epoch's end), not this process's share.
        self.reduced = False

    def configure_callbacks(self) -> list[Callback]:
        return [TSCState(TSCState.Params(), self.context, loss=self)]

    def set_epoch(self, epoch: int) -> None:
        """A new epoch takes the last epoch's class means as centres and re-matches; the same epoch again (a resume) keeps them."""
        if epoch != self.epoch and self.sums is not None and bool((self.counts > 0).any()):
            seen = (self.counts > 0)[:, None]
            fresh = F.normalize(self.sums, dim=1)
            self.centres = torch.where(seen, fresh, self.centres if self.centres is not None else fresh)
            self.sums.zero_()
            self.counts.zero_()
            if epoch >= self.params.start_epoch:
                self.assignment = match_targets(self.centres, self.targets_for(self.centres.shape[1]))
        self.epoch = epoch

    def targets_for(self, dim: int) -> Tensor:
        """The targets (C, dim), made at the first need from the run seed."""
        if self.targets is None:
            generator = torch.Generator().manual_seed(self.context.seed)
            self.targets = uniform_targets(
                self.context.num_classes, dim, generator, self.params.target_steps, self.context.device
            )
        if self.targets.shape[1] != dim:
            raise LSMError(f"tsc: the targets have dimension {self.targets.shape[1]}, the embeddings {dim}")
        return self.targets

    def observe(self, z: Tensor, t: Tensor) -> None:
        """Add the rows' embeddings to their classes' sums (weighted by the targets' shares)."""
        with torch.no_grad():
            if self.sums is None:
                self.sums = torch.zeros(t.shape[1], z.shape[1], dtype=torch.float64)
            self.sums += (t.double().T @ z.detach().double()).cpu()
            self.counts += t.detach().double().sum(dim=0).cpu()
            self.reduced = False

    def __call__(
        self, logits: Tensor, target: Tensor, mixed: Any = None, *, outputs: Optional[Mapping[str, Tensor]] = None
    ) -> Tensor:
        p = self.params
        z, t = self.rows(logits, target, outputs)
        targets = self.targets_for(z.shape[1])
        self.observe(z, t)
        w = sampled_positives(t @ t.T, p.views, p.positives, self.context.generator)
        on = self.epoch >= p.start_epoch
        assigned = targets.to(z.device)[self.assignment.to(z.device)] if on else None
        loss = tsc_loss(z, w, assigned, t, p.target_weight, p.temperature)
        return (p.temperature / p.base_temperature) * loss


class TSCState(Callback):
    """TSC's state in the checkpoints, and its class sums summed over processes at each epoch's end (tsc brings it)."""

    name = "tsc-state"
    # The tsc loss brings it, and reads the model's projection.
    brought_by_component = True
    conformance_tables = {"model": {"name": "resnet32", "width": 4, "projection_dim": 8}, "loss": {"name": "tsc"}}

    @attrs.frozen
    class Params:
        pass

    def __init__(self, params: Any, context: Any, loss: Optional[TSC] = None):
        super().__init__(params, context)
        self.loss = loss

    def on_fit_start(self, loop: Any) -> None:
        if self.loss is None:
            if not isinstance(loop.loss, TSC):
                raise LSMError(
                    f"callback {self.name!r}: the loss {loop.recipe.loss.name!r} is not 'tsc', which brings it"
                )
            self.loss = loop.loss
        dist = getattr(loop, "dist", None)
        if dist is not None and dist.rank != 0 and self.loss.sums is not None and not self.loss.reduced:
            self.loss.sums.zero_()  # the checkpoint's partial sums are rank 0's: count them once
            self.loss.counts.zero_()

    def on_epoch_end(self, loop: Any, epoch: int, record: dict[str, Any]) -> None:
        loss = self.loss
        if loss is None or loss.sums is None:
            return
        both = torch.cat([loss.sums, loss.counts[:, None]], dim=1).to(loop.device)
        both = loop.all_reduce(both).cpu()
        loss.sums.copy_(both[:, :-1])
        loss.counts.copy_(both[:, -1])
        loss.reduced = True

    def state_dict(self) -> dict[str, Any]:
        loss = self.loss
        if loss is None or loss.targets is None:
            return {}
        state = {"epoch": loss.epoch, "targets": loss.targets.cpu(), "assignment": loss.assignment.clone()}
        state.update({"counts": loss.counts.clone(), "reduced": loss.reduced})
        state.update({k: v.clone() for k, v in (("centres", loss.centres), ("sums", loss.sums)) if v is not None})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loss = self.loss
        if loss is None or not state:
            return
        loss.epoch = int(state["epoch"])
        loss.targets = state["targets"].to(loss.context.device)
        loss.assignment = state["assignment"].clone()
        loss.counts = state["counts"].clone()
        loss.centres = state.get("centres")
        loss.sums = state.get("sums")
        loss.reduced = bool(state.get("reduced", False))


COMPONENTS = [SupCon, HybridSC, TSC, TSCState]
