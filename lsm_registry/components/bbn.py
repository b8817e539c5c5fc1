"""BBN (Zhou et al., CVPR 2020): a bilateral-branch ResNet-32 trained with cumulative learning.

Three parts, each of the kind that owns it, and no branch in the engine:

- the model ``bbn`` (this module): shared early stages, then a conventional and a
  re-balancing branch (the last basic block, duplicated); it trains on two batches at once
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

from typing import Any, Optional

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LSMError
from ..interfaces import Callback, ModelFactory
from ..memory import check_fits_in_memory
from ..params import param, positive
from .models import NormedLinear, cifar_stage

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
    classifier explains.
    """

    def __init__(self, planes: int):
        super().__init__()
        self.conventional = cifar_stage(planes, planes, 1, 1)
        self.rebalancing = cifar_stage(planes, planes, 1, 1)

    def forward(self, shared_c: Tensor, shared_r: Tensor, alpha: float) -> Tensor:
        return torch.cat(
            (2.0 * alpha * self.conventional(shared_c), 2.0 * (1.0 - alpha) * self.rebalancing(shared_r)), dim=1
        )


class BilateralBranchNet(nn.Module):
    """BBN's ResNet-32: stem and three stages (5, 5, 4 blocks) shared, then one block per branch.

    Trains on two batches at once (``takes_second_batch``): ``forward(x, x_second)`` runs the
    shared stages on each batch (two passes, so batch norm sees each as the reference's two
    forwards do), the conventional branch on ``x``, the re-balancing branch on
    ``x_second``, and classifies the features weighted by ``alpha`` (set per epoch by the
    ``cumulative-learning`` callback). ``forward(x)`` is the test-time output: both branches
    on ``x`` with weight 0.5 each. ``forward_features`` and ``classifier`` follow the same rule,
    so Grad-CAM's fast path and the losses that read features see the test-time model.
    """

    takes_second_batch = True

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16, normed_head: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = cifar_stage(width, width, 5, 1)
        self.layer2 = cifar_stage(width, 2 * width, 5, 2)
        self.layer3 = cifar_stage(2 * width, 4 * width, 4, 2)
        self.branches = BilateralBranches(4 * width)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        # The reference's classifier is a plain nn.Linear (bias, default initialisation) on both branches' features.
        self.classifier: nn.Module = (
            NormedLinear(8 * width, num_classes) if normed_head else nn.Linear(8 * width, num_classes)
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

    def saliency_layers(self) -> dict[str, nn.Module]:
        return {"branches": self.branches, "layer3": self.layer3, "layer2": self.layer2, "layer1": self.layer1}


class CumulativeLearning(Callback):
    """BBN's cumulative learning: sets the model's alpha = 1 - (epoch / T_max) ** 2 at each epoch's start (bbn brings it)."""

    name = "cumulative-learning"

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
    """BBN's bilateral-branch ResNet-32: shared stages, a conventional and a re-balancing branch, cumulative learning.

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
            16, help="channels of the first stage (doubled per stage); each branch has 4 x width", validator=positive
        )

    def build(self, num_classes: int, in_channels: int, normed_head: bool) -> nn.Module:
        w = self.params.width
        # 3x3 convolutions of 5 + 5 + 4 + 2 blocks at w, 2w, 4w, 4w channels, and the head on 8w features.
        weights = 9 * 2 * (5 * w * w + 5 * 4 * w * w + 6 * 16 * w * w) + 8 * w * num_classes
        check_fits_in_memory(4 * weights, f"bbn with width {w}")
        return BilateralBranchNet(num_classes, in_channels, w, normed_head)

    def check_input(self, image_size: tuple[int, int, int]) -> None:
        _, h, w = image_size
        if h < 8 or w < 8:
            raise ValueError(f"bbn needs images of at least 8x8 (got {h}x{w})")

    def configure_callbacks(self) -> list[Callback]:
        return [CumulativeLearning(CumulativeLearning.Params(), self.context)]


COMPONENTS = [BBN, CumulativeLearning]
