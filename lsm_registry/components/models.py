"""Backbones: the CIFAR ResNet-32 of LDAM-DRW / CMO and any torchvision classifier.

Both expose ``forward_features`` + ``classifier`` (global average pooling then a
linear or normalised-linear layer) so Grad-CAM can take its one-forward fast path,
and ``saliency_layers()`` for the general path. With ``lws = true`` the model also
has ``logit_scale``, one learnable factor per class on the classifier's logits
(Kang et al.'s learnable weight scaling); a stage-2 recipe with ``train = "scales"``
trains only those.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import attrs
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ..interfaces import ModelFactory, ModelOutput
from ..memory import check_fits_in_memory
from ..params import param, positive
from ..registry import suggest
from .projection import output_parts, projection_head, projection_param, training_output
from .prototypes import Head, head_param, with_head


class NormedLinear(nn.Module):
    """Cosine logits: normalised features times normalised class weights (LDAM's head)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))


def logit_scale(num_classes: int) -> nn.Parameter:
    """LWS's per-class scales, ones at the start: a stage 2 begins from the parent's exact logits."""
    return nn.Parameter(torch.ones(num_classes))


def scaled(logits: Tensor, scale: Optional[Tensor]) -> Tensor:
    return logits if scale is None else logits * scale


_LWS_HELP = 'LWS: a learnable per-class scale on the logits (state key logit_scale), for a stage-2 recipe with stage.train = "scales"'


class _ShortcutA(nn.Module):
    """Option A shortcut: subsample by 2 and zero-pad the new channels, half on each side.

    ``planes - in_planes`` rather than ``planes // 4``: the same pad when a stage doubles the
    width, and also right for RIDE's narrower experts (16 -> 24 -> 48 channels), as in its
    reference code.
    """

    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        extra = planes - in_planes
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, *self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ShortcutA(in_planes, planes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def cifar_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """One stage of a CIFAR ResNet: ``blocks`` basic blocks, the first with ``stride`` (the
    model variants of BBN and RIDE cut and copy stages, so they build them here)."""
    return nn.Sequential(
        *(_BasicBlock(in_planes if j == 0 else planes, planes, stride if j == 0 else 1) for j in range(blocks))
    )


class CifarResNet(nn.Module):
    """ResNet-6n+2 for 32x32 inputs (He et al. 2016, section 4.2)."""

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int = 3,
        normed_head: bool = False,
        width: int = 16,
        lws: bool = False,
        projection_dim: int = 0,
    ):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (got {depth})")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes = [width, 2 * width, 4 * width]
        layers, in_planes = [], width
        for i, p in enumerate(planes):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(in_planes, p, (1 if i == 0 else 2) if j == 0 else 1))
                in_planes = p
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.classifier: nn.Module = (
            NormedLinear(in_planes, num_classes) if normed_head else nn.Linear(in_planes, num_classes)
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
        self.logit_scale = logit_scale(num_classes) if lws else None
        self.projection = projection_head(in_planes, projection_dim)
        self.output_parts = output_parts(self.projection)

    def forward_features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(out)))

    def forward(self, x: Tensor) -> Tensor | ModelOutput:
        pooled = self.forward_features(x).mean(dim=(2, 3))
        return training_output(self, pooled, scaled(self.classifier(pooled), self.logit_scale))

    def saliency_layers(self) -> dict[str, nn.Module]:
        return {"layer3": self.layer3, "layer2": self.layer2, "layer1": self.layer1}


class ResNet32(ModelFactory):
    """CIFAR ResNet-32: 3 stages of 5 basic blocks (16/32/64), option-A shortcuts."""

    name = "resnet32"

    @attrs.frozen
    class Params:
        width: int = param(16, help="channels of the first stage (doubled per stage)", validator=positive)
        lws: bool = param(False, help=_LWS_HELP)
        projection_dim: int = projection_param()
        head: Head = head_param()

    def build(self, num_classes: int, in_channels: int, normed_head: bool) -> nn.Module:
        w = self.params.width
        # 3x3 convolutions of 5 blocks per stage at w, 2w, 4w channels, plus the head: the
        # weights alone, before any is allocated (width = 10**9 would be an allocator traceback).
        weights = 9 * 10 * (w * w + 4 * w * w + 16 * w * w) + 4 * w * num_classes
        check_fits_in_memory(4 * weights, f"resnet32 with width {w}")
        model = CifarResNet(32, num_classes, in_channels, normed_head, w, self.params.lws, self.params.projection_dim)
        return with_head(model, self.params.head)

    def check_input(self, image_size: tuple[int, int, int]) -> None:
        _, h, w = image_size
        if h < 8 or w < 8:
            raise ValueError(f"resnet32 needs images of at least 8x8 (got {h}x{w})")


class TorchvisionClassifier(nn.Module):
    """A torchvision classifier split into features and a GAP + linear head."""

    def __init__(
        self,
        body: nn.Module,
        classifier: nn.Module,
        stages: dict[str, nn.Module],
        lws_classes: int = 0,
        projection: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.body = body
        self.classifier = classifier
        self._stage_names = list(stages)
        self.logit_scale = logit_scale(lws_classes) if lws_classes else None
        self.projection = projection
        self.output_parts = output_parts(projection)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor | ModelOutput:
        pooled = self.forward_features(x).mean(dim=(2, 3))
        return training_output(self, pooled, scaled(self.classifier(pooled), self.logit_scale))

    def saliency_layers(self) -> dict[str, nn.Module]:
        named = dict(self.body.named_children())
        return {name: named[name] for name in self._stage_names}


class Torchvision(ModelFactory):
    """Any torchvision classification model by name (torchvision.models.get_model), from scratch or from named weights."""

    name = "torchvision"

    @attrs.frozen
    class Params:
        arch: str = param("resnet50", help="torchvision.models name, e.g. resnet18, resnet50")
        weights: Optional[str] = param(None, help="torchvision weights name; None trains from scratch")
        lws: bool = param(False, help=_LWS_HELP)
        projection_dim: int = projection_param()
        head: Head = head_param()

    def build(self, num_classes: int, in_channels: int, normed_head: bool) -> nn.Module:
        names = torchvision.models.list_models(module=torchvision.models)
        if self.params.arch not in names:
            hint = suggest(self.params.arch, names)
            raise ValueError(
                f"unknown torchvision model {self.params.arch!r}." + (f" Did you mean {hint!r}?" if hint else "")
            )
        if self.params.weights is None:
            net = torchvision.models.get_model(self.params.arch, weights=None, num_classes=num_classes)
        else:
            net = torchvision.models.get_model(self.params.arch, weights=self.params.weights)
        children = dict(net.named_children())
        head_name = next((n for n in ("fc", "classifier", "head", "heads") if n in children), None)
        if head_name is None or not any(n in children for n in ("avgpool",)):
            raise ValueError(
                f"torchvision model {self.params.arch!r} has no avgpool + linear head this wrapper can split"
            )
        head = children[head_name]
        new_linear = lambda fan_in: NormedLinear(fan_in, num_classes) if normed_head else nn.Linear(fan_in, num_classes)  # noqa: E731
        if isinstance(head, nn.Linear):
            classifier: nn.Module = new_linear(head.in_features)
        else:
            # A multi-layer head (MobileNet, VGG, ...): keep its hidden layers, replace the last linear layer.
            last_name = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)][-1]
            parent = head
            *path, leaf = last_name.split(".")
            for part in path:
                parent = getattr(parent, part)
            setattr(parent, leaf, new_linear(getattr(parent, leaf).in_features))
            classifier = head
        if in_channels != 3:
            first_name, first = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
            replacement = nn.Conv2d(
                in_channels,
                first.out_channels,
                first.kernel_size,
                first.stride,
                first.padding,
                bias=first.bias is not None,
            )
            parent = net
            *path, last = first_name.split(".")
            for part in path:
                parent = getattr(parent, part)
            setattr(parent, last, replacement)
            children = dict(net.named_children())
        body_children = [(n, m) for n, m in children.items() if n not in ("avgpool", head_name)]
        body = nn.Sequential(OrderedDict(body_children))
        stages = {n: m for n, m in reversed(body_children) if any(isinstance(x, nn.Conv2d) for x in m.modules())}
        lws = num_classes if self.params.lws else 0
        # The projection reads what the classifier reads: the pooled features, the first linear layer's input.
        first = next(m for m in classifier.modules() if isinstance(m, (nn.Linear, NormedLinear)))
        features = first.in_features if isinstance(first, nn.Linear) else first.weight.shape[0]
        projection = projection_head(features, self.params.projection_dim)
        return with_head(TorchvisionClassifier(body, classifier, stages, lws, projection), self.params.head)


COMPONENTS = [ResNet32, Torchvision]
