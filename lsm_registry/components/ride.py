"""RIDE (Wang et al., ICLR 2021): routing diverse distribution-aware experts, without the router.

- the model ``ride``: a ResNet-32 whose stem and first stage are shared and whose later
  stages and classifier are copied once per expert (3 by default). In training its forward
  returns every expert's logits as a part of its output (``ModelOutput``, the model
  contract's training-output extension point); its prediction is the experts' mean logit.
- the loss ``ride``: LDAM(-DRW) on each expert's logits, summed, plus the distribution-aware
  diversity term: for each expert the KL divergence between its temperature-scaled softmax
  and that of the experts' mean, weighted by ``diversity_factor * T_mean ** 2``, with
  per-class temperatures from the class frequencies once class weights apply.

Left out: RIDE's optional second stage, the expert-assignment router that lets an easy
image stop after fewer experts (it saves test-time compute; every expert always runs here,
which is the paper's "RIDE without router" row), and the distillation variant.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interfaces import ModelFactory, ModelOutput
from ..memory import check_fits_in_memory
from ..params import at_least, param, positive, probability
from .losses import LDAM, LDAMParams
from .models import cifar_stage

#: The part of the training output that holds every expert's logits, (E, B, C).
EXPERT_LOGITS = "expert_logits"


class ExpertStages(nn.Module):
    """Each expert's own later stages on the shared features; out: the experts' final maps side by side.

    (B, E * K, h, w), expert e in channels ``e K .. (e + 1) K``: one module whose output holds
    every expert's final map, so that Grad-CAM hooking it explains the experts' mean logit at
    the last stage (the map of the concatenation is the mean of the experts' maps, each from
    the gradient of the mean logit).
    """

    def __init__(self, experts: list[nn.Module]):
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([expert(x) for expert in self.experts], dim=1)


class ExpertHeads(nn.Module):
    """One classifier per expert, applied at once: pooled (B, E * K) -> logits (E, B, C).

    ``normed``: each expert's head is LDAM's normalised linear layer (cosine logits);
    otherwise a linear layer with bias. The model's ``classifier``, so a second stage (cRT)
    tells every expert's head from the backbone.
    """

    def __init__(self, num_experts: int, in_features: int, num_classes: int, normed: bool):
        super().__init__()
        self.num_experts, self.in_features, self.normed = num_experts, in_features, normed
        if normed:
            # NormedLinear's initialisation per expert: uniform, then every class column to unit norm.
            weight = torch.empty(num_experts, in_features, num_classes).uniform_(-1, 1)
            self.weight = nn.Parameter(weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12))
            self.bias = None
        else:
            self.weight = nn.Parameter(torch.empty(num_experts, num_classes, in_features))
            for w in self.weight.data:
                nn.init.kaiming_normal_(w)
            bound = 1.0 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(num_experts, num_classes).uniform_(-bound, bound))

    def forward(self, pooled: Tensor) -> Tensor:
        h = pooled.view(pooled.shape[0], self.num_experts, self.in_features)
        if self.normed:
            return torch.einsum("bek,ekc->ebc", F.normalize(h, dim=2), F.normalize(self.weight, dim=1))
        return torch.einsum("bek,eck->ebc", h, self.weight) + self.bias.unsqueeze(1)


class MultiExpertNet(nn.Module):
    """RIDE's ResNet-32: stem and first stage shared, the second and third stage and the head per expert.

    ``forward(x)``: the experts' mean logit (B, C), in eval mode the prediction; in training
    mode a :class:`ModelOutput` with that mean as its logits and ``parts["expert_logits"]``
    (E, B, C), which the ``ride`` loss reads. Grad-CAM's default layer is ``experts``, every
    expert's final map at once.
    """

    output_parts = (EXPERT_LOGITS,)

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 16,
        num_experts: int = 3,
        expert_widths: tuple[int, int] = (32, 64),
        normed_head: bool = False,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = cifar_stage(width, width, 5, 1)
        mid, last = expert_widths
        self.experts = ExpertStages(
            [nn.Sequential(cifar_stage(width, mid, 5, 2), cifar_stage(mid, last, 5, 2)) for _ in range(num_experts)]
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        self.classifier = ExpertHeads(num_experts, last, num_classes, normed_head)

    def expert_logits(self, x: Tensor) -> Tensor:
        """(E, B, C): every expert's logits of ``x``."""
        out = self.layer1(F.relu(self.bn1(self.conv1(x))))
        return self.classifier(self.experts(out).mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor | ModelOutput:
        experts = self.expert_logits(x)
        mean = experts.mean(dim=0)
        if self.training:
            return ModelOutput(mean, {EXPERT_LOGITS: experts})
        return mean

    def saliency_layers(self) -> dict[str, nn.Module]:
        return {"experts": self.experts, "layer1": self.layer1}


class RIDE(ModelFactory):
    """RIDE's multi-expert ResNet-32: shared early stages, per-expert later stages and heads; predicts the experts' mean logit.

    Without RIDE's optional router (its second stage): every expert runs on every image.
    """

    name = "ride"

    @attrs.frozen
    class Params:
        num_experts: int = param(
            3, help="experts, each with its own second and third stage and classifier", validator=at_least(1)
        )
        width: int = param(16, help="channels of the shared stem and first stage", validator=positive)
        reduce_dimension: bool = param(
            True,
            help="experts' stages at 3/4 of ResNet-32's width (24 and 48 channels at "
            "width 16), RIDE's setting for 3 experts; false: 2 x and 4 x width",
        )

    def expert_widths(self) -> tuple[int, int]:
        w = self.params.width
        return (3 * w // 2, 3 * w) if self.params.reduce_dimension else (2 * w, 4 * w)

    def build(self, num_classes: int, in_channels: int, normed_head: bool) -> nn.Module:
        w, e = self.params.width, self.params.num_experts
        mid, last = self.expert_widths()
        # 3x3 convolutions of the shared stage and of every expert's two stages (5 blocks each), and the heads.
        weights = 9 * 10 * (w * w + e * (mid * mid + last * last)) + e * last * num_classes
        check_fits_in_memory(4 * weights, f"ride with {e} experts and width {w}")
        return MultiExpertNet(num_classes, in_channels, w, e, (mid, last), normed_head)

    def check_input(self, image_size: tuple[int, int, int]) -> None:
        _, h, w = image_size
        if h < 8 or w < 8:
            raise ValueError(f"ride needs images of at least 8x8 (got {h}x{w})")


@attrs.frozen
class RIDELossParams(LDAMParams):
    diversity_factor: float = param(
        -0.2,
        help="weight of the diversity KL (reference: additional_diversity_factor); "
        "negative pushes each expert away from the experts' mean",
    )
    diversity_temperature: float = param(
        1.0, help="base temperature of the diversity KL (base_diversity_temperature)", validator=positive
    )
    temperature_reweight: float = param(
        0.05,
        help="reweight_factor: how far class frequency spreads the per-class "
        "temperatures, used once class weights apply (0: all equal)",
        validator=probability,
    )


def diversity_temperatures(counts: Tensor, base: float, reweight: float) -> Tensor:
    """Per-class temperatures ``base * w_c / max_j w_j``, ``w_c = C pi_c reweight + 1 - reweight``, ``pi`` the class prior.

    Frequent classes get the highest temperature (the softest distributions to diverge
    from); the reference code's ``per_cls_weights_diversity``.
    """
    prior = counts.to(torch.float64) / counts.sum()
    w = prior.numel() * prior * reweight + 1.0 - reweight
    return (base * w / w.max()).to(torch.float32)


class RIDELoss(LDAM):
    """RIDE's loss: LDAM(-DRW) on every expert's logits, summed, plus the distribution-aware diversity KL.

    ``L = sum_e LDAM(z_e) + diversity_factor * T_mean ** 2 * sum_e KL(softmax(s z_mean / T) || softmax(s z_e / T))``
    over the batch mean, ``z_e`` expert e's cosine logits, ``z_mean`` the experts' mean (no
    gradient through it), ``s`` LDAM's scale (the reference scales the logits in the model),
    ``T`` the per-class :func:`diversity_temperatures` once class weights apply (DRW from
    ``reweight_epoch``), else ``diversity_temperature``, and ``T_mean`` its mean. Reads the
    model's ``expert_logits``; called without them (a model that gives none, the conformance
    kit) it is LDAM on the logits it gets.
    """

    name = "ride"
    Params = RIDELossParams
    reads_outputs = (EXPERT_LOGITS,)

    def __init__(self, params: Any, context: Any):
        super().__init__(params, context)
        self.temperatures = diversity_temperatures(
            context.counts_tensor(), params.diversity_temperature, params.temperature_reweight
        ).to(context.device)
        self._temperature_mean = float(self.temperatures.mean())

    def temperature(self) -> tuple[Tensor | float, float]:
        """(T: per class (C,) or one number, its mean) for the current epoch."""
        if self.class_weights() is not None:
            return self.temperatures, self._temperature_mean
        return self.params.diversity_temperature, self.params.diversity_temperature

    def diversity(self, experts: Tensor) -> Tensor:
        """``sum_e KL(q || p_e)`` over the batch mean, ``p_e = softmax(s z_e / T)``, ``q`` that of the experts' mean, times
        ``T_mean ** 2``; the reference's ``temperature_mean ** 2 * F.kl_div(log p_e, q, reduction="batchmean")`` per expert."""
        t, t_mean = self.temperature()
        scaled = self.params.s * experts.float()
        log_p = F.log_softmax(scaled / t, dim=2)
        with torch.no_grad():
            q = F.softmax(scaled.mean(dim=0) / t, dim=1)
        kl = (torch.xlogy(q, q).unsqueeze(0) - q.unsqueeze(0) * log_p).sum() / experts.shape[1]
        return t_mean * t_mean * kl

    def __call__(
        self, logits: Tensor, target: Tensor, mixed: Any = None, *, outputs: Optional[Mapping[str, Tensor]] = None
    ) -> Tensor:
        ldam = super().__call__
        experts = outputs.get(EXPERT_LOGITS) if outputs else None
        if experts is None:
            return ldam(logits, target, mixed)
        loss = sum(ldam(z, target, mixed) for z in experts.unbind(0))  # the experts, not the images: E terms
        if self.params.diversity_factor != 0.0:
            loss = loss + self.params.diversity_factor * self.diversity(experts)
        return loss


COMPONENTS = [RIDE, RIDELoss]
