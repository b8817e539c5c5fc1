"""Mixers: LSM and the baselines CutMix, CMO and Mixup (docs/method.md §5-§7 and §9).

LSM cuts the foreground (rebalanced, tail-leaning) batch into the units of the patch
operator; the most salient units of each foreground image replace the units at the
same places of the background (instance, head-leaning) image. Keeping the place
keeps the object's layout, and taking the salient units keeps the label evidence,
which is what lets a tail class borrow the context of head images.

The baselines fill the same :class:`~lsm_registry.interfaces.Mixer` contract: they
return the per-pixel foreground weight, so any label fuser (``area``, ``remix``, the
saliency fusers) and any loss combine with them through the one engine.
torchvision.transforms.v2.CutMix / MixUp are not reused: they pair one batch with a
permutation of itself and return soft targets directly, whereas here the foreground
may come from a second (rebalanced) sampler branch and the label rule is a separate,
swappable component that needs the weight map. What fits is the same mathematics (a
Beta draw, a box of side ratio ``sqrt(1 - lam)``), written for two batches and one
box per image.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

import attrs
import torch
from torch import Tensor

from ..interfaces import Mixer, MixerParams, MixResult, PatchOperator, mix_end, mix_prob, mix_start
from ..ops import beta_draw, box_masks, unit_topk
from ..params import in_range, param, positive

#: CMO's reference window, which LSM follows: no mixing in the first 4 and last 3 epochs.
CMO_START, CMO_END = 4, -3


class LSM(Mixer):
    """Pastes the most salient p x p units of a tail image at the same place on a head image."""

    name = "lsm"
    needs_saliency = True
    default_fuser = "saliency"

    @attrs.frozen
    class Params(MixerParams):
        mask: Literal["topk", "threshold"] = param(
            "topk", help="unit selection: topk (a Beta-drawn share of units) or threshold (S >= tau * max S)"
        )
        alpha: float = param(
            1.0,
            help="topk: pasted fraction rho ~ Beta(alpha, alpha); k = clamp(round(rho N), 1, N - 1)",
            validator=positive,
        )
        same_k: bool = param(False, help="topk: one rho for the whole batch (CutMix-style) instead of one per image")
        tau: float = param(0.5, help="threshold: paste units with S >= tau * max S", validator=in_range(0.0, 1.0))
        prob: float = mix_prob(0.5)
        start_epoch: int = mix_start(CMO_START, help="first 0-based epoch that may mix (CMO: 3 < epoch)")
        end_epoch: Optional[int] = mix_end(CMO_END)

    def select(self, scores: Tensor) -> Tensor:
        """(B, h, w) unit scores -> (B, h, w) bool mask M of units to paste."""
        b, gh, gw = scores.shape
        n = gh * gw
        if self.params.mask == "threshold":
            flat = scores.reshape(b, n)
            return (flat >= self.params.tau * flat.amax(dim=1, keepdim=True)).view(b, gh, gw)
        rho = beta_draw(self.params.alpha, 1 if self.params.same_k else b, self.context.generator)
        k = torch.round(rho * n).clamp(1, max(n - 1, 1)).to(torch.int64).expand(b)
        return unit_topk(scores, k)

    def mix(self, x_f: Tensor, x_b: Tensor, saliency_f: Optional[Tensor], patch: PatchOperator) -> MixResult:
        if saliency_f is None:
            raise ValueError(
                "mixer 'lsm' needs the foreground saliency; add a [saliency] table (e.g. name = \"gradcam\")"
            )
        if x_f.shape != x_b.shape:
            raise ValueError(
                f"mixer 'lsm': foreground {tuple(x_f.shape)} and background {tuple(x_b.shape)} batches differ in shape"
            )
        gh, gw = patch.grid(x_f.shape[-2], x_f.shape[-1])
        if tuple(saliency_f.shape) != (x_f.shape[0], gh, gw):
            raise ValueError(
                f"mixer 'lsm': saliency has shape {tuple(saliency_f.shape)}, expected {(x_f.shape[0], gh, gw)}"
            )
        mask = self.select(saliency_f)
        units = torch.where(mask.unsqueeze(1), patch.split(x_f), patch.split(x_b))
        return MixResult(images=patch.merge(units), weight=patch.expand(mask.to(x_f.dtype)), unit_mask=mask)


class CutMix(Mixer):
    """CutMix: paste one random box of the foreground per image; the label follows the real box area."""

    name = "cutmix"
    default_fuser: ClassVar[str] = "area"
    uses_patch: ClassVar[bool] = False

    @attrs.frozen
    class Params(MixerParams):
        alpha: float = param(
            1.0, help="lam ~ Beta(alpha, alpha); the box side ratio is sqrt(1 - lam)", validator=positive
        )

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
    requires_sampler: ClassVar[Optional[str]] = "dual-branch"

    @attrs.frozen
    class Params(CutMix.Params):
        prob: float = mix_prob(0.5, help="probability that a batch is mixed (CMO: 0.5)")
        start_epoch: int = mix_start(CMO_START, help="first 0-based epoch that may be mixed (CMO: 4, i.e. epoch > 3)")
        end_epoch: Optional[int] = mix_end(CMO_END)


class Mixup(Mixer):
    """Mixup: a convex blend of the whole foreground and background images."""

    name = "mixup"
    default_fuser: ClassVar[str] = "area"
    uses_patch: ClassVar[bool] = False

    @attrs.frozen
    class Params(MixerParams):
        alpha: float = param(1.0, help="lam ~ Beta(alpha, alpha), the foreground's weight", validator=positive)
        per_image: bool = param(
            False, help="one lam per image instead of one per batch (the original draws one per batch)"
        )

    def mix(self, x_f: Tensor, x_b: Tensor, saliency_f: Optional[Tensor], patch: Optional[PatchOperator]) -> MixResult:
        b, _, h, w = x_b.shape
        lam = beta_draw(self.params.alpha, b if self.params.per_image else 1, self.context.generator)
        lam = lam.expand(b).to(device=x_b.device, dtype=x_b.dtype).view(b, 1, 1, 1)
        images = lam * x_f + (1.0 - lam) * x_b
        return MixResult(images=images, weight=lam.expand(b, 1, h, w), unit_mask=None)


COMPONENTS = [LSM, CutMix, CMO, Mixup]
