"""RIDE (Wang et al., ICLR 2021): routing diverse distribution-aware experts, without the router.

- the model ``ride``: a ResNet-32 whose stem and first stage are shared and whose later
  stages and classifier are copied once per expert (3 by default), or (``arch =
  "resnet50"``) a ResNet-50 of torchvision's bottlenecks whose stem, layer1 and layer2 are
  shared and whose layer3, layer4 and classifier are per expert. In training its forward
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
from collections import OrderedDict
from typing import Any, Mapping, Optional

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interfaces import ModelFactory, ModelOutput
from ..memory import check_fits_in_memory
from ..params import at_least, one_of, param, positive, probability
from .bbn import ARCHS, RESNET50_BLOCKS, ImageNetStem, bottleneck_stage, bottleneck_stage_weights, check_input_size
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
    """RIDE's ResNet: the early stages shared, the later stages and the head per expert.

    ``arch = "resnet32"``: stem and first stage shared, the second and third stage (``expert_widths``
    channels) per expert. ``arch = "resnet50"`` (the reference's ``ResNet50Model`` with experts):
    stem (``4 width`` channels, torchvision's 64 at width 16), layer1 and layer2 (bottlenecks of
    ``4 width`` and ``8 width`` planes) shared, layer3 and
    layer4 (``expert_widths`` planes, 4 x as many channels out) per expert, convolutions
    Kaiming-normal with fan-out as the reference's ``normal(0, sqrt(2 / (k k out)))``.

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
        arch: str = "resnet32",
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"ride: unknown arch {arch!r} (one of {', '.join(ARCHS)})")
        self.arch = arch
        mid, last = expert_widths
        self.layer2: Optional[nn.Module] = None
        if arch == "resnet50":
            blocks, b = RESNET50_BLOCKS, 4 * width  # torchvision's resnet50 at width 16: a 64-channel stem
            self.stem = ImageNetStem(in_channels, b)
            self.layer1 = bottleneck_stage(b, b, blocks[0], 1)
            self.layer2 = bottleneck_stage(4 * b, 2 * b, blocks[1], 2)
            self.experts = ExpertStages(
                [
                    nn.Sequential(
                        OrderedDict(
                            layer3=bottleneck_stage(8 * b, mid, blocks[2], 2),
                            layer4=bottleneck_stage(4 * mid, last, blocks[3], 2),
                        )
                    )
                    for _ in range(num_experts)
                ]
            )
            features = 4 * last
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.layer1 = cifar_stage(width, width, 5, 1)
            self.experts = ExpertStages(
                [nn.Sequential(cifar_stage(width, mid, 5, 2), cifar_stage(mid, last, 5, 2)) for _ in range(num_experts)]
            )
            features = last
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight)
        self.classifier = ExpertHeads(num_experts, features, num_classes, normed_head)

    def shared(self, x: Tensor) -> Tensor:
        """The shared stages' map of ``x``, every expert's input."""
        if self.layer2 is not None:
            return self.layer2(self.layer1(self.stem(x)))
        return self.layer1(F.relu(self.bn1(self.conv1(x))))

    def expert_logits(self, x: Tensor) -> Tensor:
        """(E, B, C): every expert's logits of ``x``."""
        return self.classifier(self.experts(self.shared(x)).mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor | ModelOutput:
        experts = self.expert_logits(x)
        mean = experts.mean(dim=0)
        if self.training:
            return ModelOutput(mean, {EXPERT_LOGITS: experts})
        return mean

    def saliency_layers(self) -> dict[str, nn.Module]:
        stages = {"layer2": self.layer2} if self.layer2 is not None else {}
        return {"experts": self.experts, **stages, "layer1": self.layer1}


class RIDE(ModelFactory):
    """RIDE's multi-expert ResNet-32 or ResNet-50: shared early stages, per-expert later stages and heads; predicts the experts' mean logit.

    Without RIDE's optional router (its second stage): every expert runs on every image.
    """

    name = "ride"

    @attrs.frozen
    class Params:
        num_experts: int = param(
            3,
            help="experts, each with its own later stages (resnet32: second and third; resnet50: layer3 and "
            "layer4) and classifier",
            validator=at_least(1),
        )
        width: int = param(
            16,
            help="resnet32: channels of the shared stem and first stage; resnet50: a quarter of the stem's "
            "channels (16: torchvision's resnet50, 64-channel stem, 64 and 128 planes in layer1 and layer2)",
            validator=positive,
        )
        reduce_dimension: bool = param(
            True,
            help="experts' stages at 3/4 width, RIDE's setting for 3 experts: resnet32 24 and 48 channels at "
            "width 16 (false: 2 x and 4 x width); resnet50 192 and 384 planes (false: 256 and 512)",
        )
        arch: str = param(
            "resnet32",
            help="resnet32: the CIFAR ResNet-32, stem and first stage shared; resnet50: ResNet-50 "
            "(torchvision's bottlenecks), stem, layer1 and layer2 shared (224 x 224 images)",
            validator=one_of(*ARCHS),
        )

    def expert_widths(self) -> tuple[int, int]:
        """The experts' two stages: resnet32 their channels, resnet50 their bottleneck planes (4 x as many out)."""
        w = self.params.width
        if self.params.arch == "resnet50":
            b = 4 * w
            return (3 * b, 6 * b) if self.params.reduce_dimension else (4 * b, 8 * b)
        return (3 * w // 2, 3 * w) if self.params.reduce_dimension else (2 * w, 4 * w)

    def weights(self, num_classes: int, in_channels: int = 3) -> int:
        """The weights of the convolutions and the heads (biases and batch norm left out)."""
        w, e = self.params.width, self.params.num_experts
        mid, last = self.expert_widths()
        if self.params.arch == "resnet50":
            b, blocks = 4 * w, RESNET50_BLOCKS
            expert = bottleneck_stage_weights(8 * b, mid, blocks[2], 2) + bottleneck_stage_weights(
                4 * mid, last, blocks[3], 2
            )
            shared = (
                49 * in_channels * b
                + bottleneck_stage_weights(b, b, blocks[0], 1)
                + bottleneck_stage_weights(4 * b, 2 * b, blocks[1], 2)
            )
            return shared + e * (expert + 4 * last * num_classes)
        # 3x3 convolutions of the shared stage and of every expert's two stages (5 blocks each), and the heads.
        return 9 * 10 * (w * w + e * (mid * mid + last * last)) + e * last * num_classes

    def build(self, num_classes: int, in_channels: int, normed_head: bool) -> nn.Module:
        w, e, arch = self.params.width, self.params.num_experts, self.params.arch
        check_fits_in_memory(4 * self.weights(num_classes, in_channels), f"ride {arch} with {e} experts and width {w}")
        return MultiExpertNet(num_classes, in_channels, w, e, self.expert_widths(), normed_head, arch)

    def check_input(self, image_size: tuple[int, int, int]) -> None:
        check_input_size("ride", self.params.arch, image_size)


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
