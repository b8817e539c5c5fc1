"""Baseline mixers: CutMix, Mixup and CMO (METHOD.md section 8).

They fill the same :class:`~lsm_registry.interfaces.Mixer` contract as LSM: a
foreground batch ``x_f`` is mixed into a background batch ``x_b`` and the mixer
returns the per-pixel foreground weight, so any label fuser (``area``, ``remix``,
the saliency fusers) and any loss combine with them through the one engine.

torchvision.transforms.v2.CutMix / MixUp are not reused: they take a single batch
plus (B,) labels, pair it with a permutation of itself and return soft targets
directly, whereas here the foreground may come from a second (rebalanced) sampler
branch and the label rule is a separate, swappable component that needs the weight
map. What fits is the same mathematics (a Beta draw, a box of side ratio
``sqrt(1 - lam)``), written here for two batches and one box per image.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import attrs
import torch
from torch import Tensor

from ..interfaces import Mixer, MixResult, PatchOperator
from ..params import non_negative, param, positive, probability
from .mixers import beta_draw

def box_masks(lam: Tensor, cy: Tensor, cx: Tensor, height: int, width: int) -> Tensor:
    """(B, 1, H, W) float masks of boxes of side ratio ``sqrt(1 - lam)`` centred at (cy, cx).

    A box is ``floor(H * r)`` x ``floor(W * r)`` pixels before clipping at the image
    border, so the pasted area can be smaller than ``1 - lam``: that is why CutMix's
    label comes from the mask, not from ``lam``. Built from coordinate comparisons,
    one box per image, no loop over the batch.
    """
    ratio = torch.sqrt(torch.clamp(1.0 - lam, min=0.0))
    cut_h = torch.floor(height * ratio).to(torch.int64)
    cut_w = torch.floor(width * ratio).to(torch.int64)
    y1 = (cy - cut_h // 2).clamp(0, height)
    y2 = (cy - cut_h // 2 + cut_h).clamp(0, height)
    x1 = (cx - cut_w // 2).clamp(0, width)
    x2 = (cx - cut_w // 2 + cut_w).clamp(0, width)
    rows = torch.arange(height, device=lam.device).view(1, height, 1)
    cols = torch.arange(width, device=lam.device).view(1, 1, width)
    inside = (
        (rows >= y1.view(-1, 1, 1)) & (rows < y2.view(-1, 1, 1))
        & (cols >= x1.view(-1, 1, 1)) & (cols < x2.view(-1, 1, 1))
    )
    return inside.unsqueeze(1).to(torch.float32)


def _window_check(params) -> None:
    start, end = params.start_epoch, params.end_epoch
    if end is not None and 0 <= end <= start:
        from ..params import ParamError

        raise ParamError("end_epoch", f"must be > start_epoch {start} or negative (counted from the end) (got {end})")


class CutMix(Mixer):
    """CutMix: paste one random box of the foreground per image; the label follows the real box area."""

    name = "cutmix"
    default_fuser: ClassVar[str] = "area"
    uses_patch: ClassVar[bool] = False

    @attrs.frozen
    class Params:
        alpha: float = param(1.0, help="lam ~ Beta(alpha, alpha); the box side ratio is sqrt(1 - lam)", validator=positive)
        prob: float = param(1.0, help="probability that a batch is mixed", validator=probability)
        start_epoch: int = param(0, help="first 0-based epoch that may be mixed", validator=non_negative)
        end_epoch: Optional[int] = param(None, help="mixing stops at this 0-based epoch; negative counts from the end (-3: the last 3 epochs are not mixed); none: never")

        def __attrs_post_init__(self):
            _window_check(self)

    def mix(self, x_f: Tensor, x_b: Tensor, saliency_f: Optional[Tensor], patch: Optional[PatchOperator]) -> MixResult:
        b, _, h, w = x_b.shape
        gen = self.context.generator
        # The foreground share is the box, so lam is the background's share as in CutMix;
        # Beta(alpha, alpha) is symmetric, so the foreground share has the same law.
        lam = beta_draw(self.params.alpha, b, gen)
        cy = torch.randint(0, h, (b,), generator=gen)
        cx = torch.randint(0, w, (b,), generator=gen)
        weight = box_masks(lam, cy, cx, h, w).to(device=x_b.device, dtype=x_b.dtype)
        images = torch.where(weight.bool(), x_f, x_b)
        return MixResult(images=images, weight=weight, unit_mask=None)


class CMO(CutMix):
    """CMO: CutMix pasting a rebalanced-branch (tail) box on an instance-branch image; needs the dual-branch sampler.

    Context-rich minority oversampling keeps the head images as backgrounds and pastes
    minority content, so a recipe using it sets ``[sampler] name = "dual-branch"``
    (gamma = 1, as in CMO) and the foreground comes from the rebalanced branch. With the
    ``instance`` sampler the engine would fall back to a permutation of the batch,
    which is plain CutMix, so recipe validation refuses that pairing
    (``requires_sampler``). Defaults follow CMO's reference schedule: half of the
    batches mixed, none in the first 4 and last 3 epochs (``3 < epoch < epochs - 3``).
    """

    name = "cmo"
    requires_sampler: ClassVar[str] = "dual-branch"

    @attrs.frozen
    class Params(CutMix.Params):
        prob: float = param(0.5, help="probability that a batch is mixed (CMO: 0.5)", validator=probability)
        start_epoch: int = param(4, help="first 0-based epoch that may be mixed (CMO: 4, i.e. epoch > 3)", validator=non_negative)
        end_epoch: int = param(-3, help="mixing stops at this 0-based epoch; negative counts from the end (CMO: -3)")


class Mixup(Mixer):
    """Mixup: a convex blend of the whole foreground and background images."""

    name = "mixup"
    default_fuser: ClassVar[str] = "area"
    uses_patch: ClassVar[bool] = False

    @attrs.frozen
    class Params:
        alpha: float = param(1.0, help="lam ~ Beta(alpha, alpha), the foreground's weight", validator=positive)
        per_image: bool = param(False, help="one lam per image instead of one per batch (the original draws one per batch)")
        prob: float = param(1.0, help="probability that a batch is mixed", validator=probability)
        start_epoch: int = param(0, help="first 0-based epoch that may be mixed", validator=non_negative)
        end_epoch: Optional[int] = param(None, help="mixing stops at this 0-based epoch; negative counts from the end; none: never")

        def __attrs_post_init__(self):
            _window_check(self)

    def mix(self, x_f: Tensor, x_b: Tensor, saliency_f: Optional[Tensor], patch: Optional[PatchOperator]) -> MixResult:
        b, _, h, w = x_b.shape
        lam = beta_draw(self.params.alpha, b if self.params.per_image else 1, self.context.generator)
        lam = lam.expand(b).to(device=x_b.device, dtype=x_b.dtype).view(b, 1, 1, 1)
        images = lam * x_f + (1.0 - lam) * x_b
        return MixResult(images=images, weight=lam.expand(b, 1, h, w), unit_mask=None)


COMPONENTS = [CutMix, CMO, Mixup]
