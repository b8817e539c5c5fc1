"""BBN (Zhou et al., CVPR 2020): a bilateral-branch ResNet trained with cumulative learning.

Three parts, each of the kind that owns it, and no branch in the engine:

- the model ``bbn`` (this module): shared early stages, then a conventional and a
  re-balancing branch (the last residual block, duplicated), on the CIFAR ResNet-32
  (``arch = "resnet32"``) or on ResNet-50 (``arch = "resnet50"``, torchvision's
  bottleneck blocks, the reference's ``bbn_res50``); it trains on two batches at once
  through the model contract's second-batch extension point (``takes_second_batch``,
  docs in :class:`lsm_registry.interfaces.ModelFactory`);
- the sampler ``reversed`` (samplers.py): the instance batch for the conventional branch
  and BBN's reversed batch (class c with probability proportional to n_max / n_c) for the
  re-balancing one, the two index sets every sampler may yield;
- the callback ``cumulative-learning`` (this module), which the model factory brings: it
  sets the adaptor's ``alpha = 1 - (epoch / T_max) ** 2`` on the model at each epoch's start.

The loss is any loss of the recipe: the engine hands it BBN's two-label target
``alpha e_{y_c} + (1 - alpha) e_{y_r}`` with the labels as a two-label mix, so a class
matrix loss computes ``alpha L(z, y_c) + (1 - alpha) L(z, y_r)``, the reference code's
loss (with DRW weights, each label's term normalised by its own weights).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, conv1x1

from ..errors import LSMError
from ..interfaces import Callback, ModelFactory
from ..memory import check_fits_in_memory
from ..params import one_of, param, positive
from .models import NormedLinear, cifar_stage

#: Bottleneck blocks per stage of ResNet-50 (layer1 .. layer4).
RESNET50_BLOCKS = (3, 4, 6, 3)
#: The backbones of the ``bbn`` and ``ride`` models.
ARCHS = ("resnet32", "resnet50")


def bottleneck_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """One ResNet-50 stage of torchvision's ``Bottleneck`` blocks (out: ``4 planes`` channels), as
    torchvision's ``ResNet._make_layer`` builds it: the first block with ``stride`` and, where the
    shape changes, a 1x1 convolution + batch norm shortcut. BBN and RIDE cut and copy stages."""
    out = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or in_planes != out:
        downsample = nn.Sequential(conv1x1(in_planes, out, stride), nn.BatchNorm2d(out))
    first = Bottleneck(in_planes, planes, stride, downsample)
    return nn.Sequential(first, *(Bottleneck(out, planes) for _ in range(1, blocks)))


def bottleneck_stage_weights(in_planes: int, planes: int, blocks: int, stride: int) -> int:
    """The convolution weights of :func:`bottleneck_stage` (1x1, 3x3, 1x1 per block, plus the 1x1 shortcut)."""
    out = planes * Bottleneck.expansion
    block = planes * planes * 9 + 2 * planes * out
    shortcut = in_planes * out if stride != 1 or in_planes != out else 0
    return (in_planes - out) * planes + blocks * block + shortcut


class ImageNetStem(nn.Sequential):
    """ResNet-50's stem: 7x7 convolution with stride 2, batch norm, ReLU, 3x3 max pooling with stride 2 (1/4 size)."""

    def __init__(self, in_channels: int, planes: int):
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, planes, 7, 2, 3, bias=False),
                bn1=nn.BatchNorm2d(planes),
                relu=nn.ReLU(inplace=True),
                maxpool=nn.MaxPool2d(3, 2, 1),
            )
        )


def check_input_size(model: str, arch: str, image_size: tuple[int, int, int]) -> None:
    """ValueError unless the images are at least 8x8 (ResNet-32: 1/4 size at the last stage) or 32x32 (ResNet-50: 1/32)."""
    _, h, w = image_size
    least = 32 if arch == "resnet50" else 8
    if h < least or w < least:
        raise ValueError(f"{model} with arch {arch!r} needs images of at least {least}x{least} (got {h}x{w})")


#: The cumulative-learning weight at test time: both branches see the same image, weighted alike.
TEST_ALPHA = 0.5


def cumulative_alpha(epoch: int, epochs: int) -> float:
    """BBN's adaptor ``alpha = 1 - (epoch / T_max) ** 2`` at 0-based ``epoch`` of ``epochs`` (T_max).

    The reference code writes ``1 - ((epoch - 1) / max_epoch) ** 2`` with 1-based epochs: 1 in
    the first epoch (the conventional branch alone), falling parabolically towards 0, so the
    re-balancing branch takes over late in training.
    """
    return 1.0 - (epoch / epochs) ** 2


class BilateralBranches(nn.Module):
    """The two branches on the shared features and their weighted concatenation, the classifier's input.

    ``forward(shared_c, shared_r, alpha)`` returns ``cat(2 alpha f_c, 2 (1 - alpha) f_r)`` on
    the channel axis, ``f_c`` the conventional branch of the instance batch's features and
    ``f_r`` the re-balancing branch of the reversed batch's. The factor 2 is the reference
    code's: it makes the test-time weights ``alpha = 0.5`` the plain concatenation, which is
    what the reference evaluates. One module, so that Grad-CAM can hook the map the
    classifier explains. ``conventional`` and ``rebalancing``: the two copies of the last block.
    """

    def __init__(self, conventional: nn.Module, rebalancing: nn.Module):
        super().__init__()
        self.conventional = conventional
        self.rebalancing = rebalancing

    def forward(self, shared_c: Tensor, shared_r: Tensor, alpha: float) -> Tensor:
        return torch.cat(
            (2.0 * alpha * self.conventional(shared_c), 2.0 * (1.0 - alpha) * self.rebalancing(shared_r)), dim=1
        )


class BilateralBranchNet(nn.Module):
    """BBN's ResNet: the early stages shared, then one copy of the last block per branch.

    ``arch = "resnet32"``: stem and three stages (5, 5, 4 basic blocks) shared, one basic block
    of ``4 width`` channels per branch, Kaiming-normal convolutions. ``arch = "resnet50"``
    (the reference's ``bbn_res50``): ResNet-50's stem, layer1 .. layer3 and the first two
    bottlenecks of layer4 shared, layer4's last bottleneck (``128 width`` = 2048 channels out at
    width 16) per branch, PyTorch's default initialisation as the reference's; the classifier
    (a linear layer with bias, as the reference's) reads both branches' features, 2 x 2048.

    Trains on two batches at once (``takes_second_batch``): ``forward(x, x_second)`` runs the
    shared stages on each batch (two passes, so batch norm sees each as the reference's two
    forwards do), the conventional branch on ``x``, the re-balancing branch on
    ``x_second``, and classifies the features weighted by ``alpha`` (set per epoch by the
    ``cumulative-learning`` callback). ``forward(x)`` is the test-time output: both branches
    on ``x`` with weight 0.5 each. ``forward_features`` and ``classifier`` follow the same rule,
    so Grad-CAM's fast path and the losses that read features see the test-time model.
    """

    takes_second_batch = True

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 16,
        normed_head: bool = False,
        arch: str = "resnet32",
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"bbn: unknown arch {arch!r} (one of {', '.join(ARCHS)})")
        self.arch = arch
        self.layer4: Optional[nn.Module] = None
        if arch == "resnet50":
            b = 4 * width  # torchvision's resnet50 at width 16: 64 stem channels, stages of 64 .. 512 planes
            self.stem = ImageNetStem(in_channels, b)
            self.layer1 = bottleneck_stage(b, b, RESNET50_BLOCKS[0], 1)
            self.layer2 = bottleneck_stage(4 * b, 2 * b, RESNET50_BLOCKS[1], 2)
            self.layer3 = bottleneck_stage(8 * b, 4 * b, RESNET50_BLOCKS[2], 2)
            self.layer4 = bottleneck_stage(16 * b, 8 * b, RESNET50_BLOCKS[3] - 1, 2)
            last = 32 * b
            self.branches = BilateralBranches(bottleneck_stage(last, 8 * b, 1, 1), bottleneck_stage(last, 8 * b, 1, 1))
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.layer1 = cifar_stage(width, width, 5, 1)
            self.layer2 = cifar_stage(width, 2 * width, 5, 2)
            self.layer3 = cifar_stage(2 * width, 4 * width, 4, 2)
            last = 4 * width
            self.branches = BilateralBranches(cifar_stage(last, last, 1, 1), cifar_stage(last, last, 1, 1))
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight)
        # The reference's classifier is a plain nn.Linear (bias, default initialisation) on both branches' features.
        self.classifier: nn.Module = (
            NormedLinear(2 * last, num_classes) if normed_head else nn.Linear(2 * last, num_classes)
        )
        #: The cumulative-learning weight of the conventional branch in training (the callback sets it per epoch).
        self.alpha = 1.0

    @property
    def second_batch_share(self) -> float:
        """The share of the loss the reversed batch's labels get: ``1 - alpha``."""
        return 1.0 - self.alpha

    def set_alpha(self, alpha: float) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"the cumulative-learning weight must be in [0, 1] (got {alpha})")
        self.alpha = float(alpha)

    def shared(self, x: Tensor) -> Tensor:
        """The shared stages' map of ``x``, the branches' input."""
        if self.layer4 is not None:
            return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(out)))

    def forward_features(self, x: Tensor, x_second: Optional[Tensor] = None) -> Tensor:
        """(B, 2K, h, w): the two branches' maps side by side, weighted as ``forward`` weights them."""
        if x_second is None:
            features = self.shared(x)
            return self.branches(features, features, TEST_ALPHA)
        return self.branches(self.shared(x), self.shared(x_second), self.alpha)

    def forward(self, x: Tensor, x_second: Optional[Tensor] = None) -> Tensor:
        return self.classifier(self.forward_features(x, x_second).mean(dim=(2, 3)))

    def branch_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two terms the test-time logits add up from, each with the classifier's bias:
        ``W_c f_c(x) + b`` and ``W_r f_r(x) + b`` (``forward(x)`` is their sum minus one ``b``).
        Scoring each alone tells whether a class is lost in the conventional branch or
        overruled by the re-balancing one (``python -m bench.bbn_branches``)."""
        if not isinstance(self.classifier, nn.Linear):
            raise LSMError("bbn: the branches' logits add up only under a linear classifier (normed_head is not one)")
        features = self.forward_features(x).mean(dim=(2, 3))
        k = features.shape[1] // 2
        weight, bias = self.classifier.weight, self.classifier.bias
        conventional = F.linear(features[:, :k], weight[:, :k], bias)
        rebalancing = F.linear(features[:, k:], weight[:, k:], bias)
        return conventional, rebalancing

    def saliency_layers(self) -> dict[str, nn.Module]:
        stages = {"layer4": self.layer4} if self.layer4 is not None else {}
        return {
            "branches": self.branches,
            **stages,
            "layer3": self.layer3,
            "layer2": self.layer2,
            "layer1": self.layer1,
        }


class CumulativeLearning(Callback):
    """BBN's cumulative learning: sets the model's alpha = 1 - (epoch / T_max) ** 2 at each epoch's start (bbn brings it)."""

    name = "cumulative-learning"
    # It sets the weight of a bilateral-branch model, which trains on the reversed sampler's second batch.
    conformance_tables = {"model": {"name": "bbn", "width": 4}, "sampler": {"name": "reversed"}}

    @attrs.frozen
    class Params:
        pass

    def on_fit_start(self, loop: Any) -> None:
        if not callable(getattr(loop.module, "set_alpha", None)):
            raise LSMError(
                f"callback {self.name!r}: model {loop.recipe.model.name!r} has no cumulative-learning weight "
                "(set_alpha); it belongs to model 'bbn', which brings it"
            )

    def on_epoch_start(self, loop: Any, epoch: int) -> None:
        loop.module.set_alpha(cumulative_alpha(epoch, loop.recipe.run.epochs))

    def on_epoch_end(self, loop: Any, epoch: int, record: dict[str, Any]) -> None:
        record["bbn_alpha"] = cumulative_alpha(epoch, loop.recipe.run.epochs)


class BBN(ModelFactory):
    """BBN's bilateral-branch ResNet-32 or ResNet-50: shared stages, a conventional and a re-balancing branch, cumulative learning.

    A model (not a sampler, loss or callback) because the two branches and the weighted mix
    of their features before the one classifier are the network: they decide what the
    parameters are and what the test-time output is. The parts other kinds own stay there:
    the reversed batch comes from the ``reversed`` sampler, the loss is the recipe's, and the
    per-epoch weight is the ``cumulative-learning`` callback this factory brings.
    """

    name = "bbn"

    @attrs.frozen
    class Params:
        width: int = param(
            16,
            help="resnet32: channels of the first stage (doubled per stage), each branch has 4 x width; "
            "resnet50: a quarter of the stem's channels (16: torchvision's resnet50, 64 .. 2048), each branch 128 x width",
            validator=positive,
        )
        arch: str = param(
            "resnet32",
            help="resnet32: the CIFAR ResNet-32, the last basic block per branch; resnet50: ResNet-50 "
            "(torchvision's bottlenecks), layer4's last bottleneck per branch (224 x 224 images)",
            validator=one_of(*ARCHS),
        )

    def weights(self, num_classes: int, in_channels: int = 3) -> int:
        """The weights of the convolutions and the classifier (biases and batch norm left out)."""
        w = self.params.width
        if self.params.arch == "resnet50":
            b = 4 * w
            blocks = RESNET50_BLOCKS
            return (
                49 * in_channels * b
                + bottleneck_stage_weights(b, b, blocks[0], 1)
                + bottleneck_stage_weights(4 * b, 2 * b, blocks[1], 2)
                + bottleneck_stage_weights(8 * b, 4 * b, blocks[2], 2)
                + bottleneck_stage_weights(16 * b, 8 * b, blocks[3] - 1, 2)
                + 2 * bottleneck_stage_weights(32 * b, 8 * b, 1, 1)
                + 64 * b * num_classes
            )
        # 3x3 convolutions of 5 + 5 + 4 + 2 blocks at w, 2w, 4w, 4w channels, and the head on 8w features.
        return 9 * 2 * (5 * w * w + 5 * 4 * w * w + 6 * 16 * w * w) + 8 * w * num_classes

    def build(self, num_classes: int, in_channels: int, normed_head: bool) -> nn.Module:
        w, arch = self.params.width, self.params.arch
        check_fits_in_memory(4 * self.weights(num_classes, in_channels), f"bbn {arch} with width {w}")
        return BilateralBranchNet(num_classes, in_channels, w, normed_head, arch)

    def check_input(self, image_size: tuple[int, int, int]) -> None:
        check_input_size("bbn", self.params.arch, image_size)

    def configure_callbacks(self) -> list[Callback]:
        return [CumulativeLearning(CumulativeLearning.Params(), self.context)]


COMPONENTS = [BBN, CumulativeLearning]
