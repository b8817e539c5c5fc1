"""SaliencyMix (Uddin et al., ICLR 2021) as an lsm-registry mixer.

CutMix pastes a box at a uniformly random place, so on small objects it often
pastes background and still hands over label mass. SaliencyMix centres the box on
the most salient point of the pasted image, so the box carries the object. Here the
"point" is the most salient unit of the patch operator (whatever saliency provider
the recipe chose), the box lands at the same place on the background image, and the
label is left to the label fuser: ``area`` gives CutMix's box-area rule, ``saliency``
the pasted share of the foreground's saliency.
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch
from torch import Tensor

from lsm_registry import Mixer, MixerParams, MixResult, PatchOperator, mix_end, mix_prob, mix_start
from lsm_registry.ops import beta_draw, box_masks
from lsm_registry.params import param, positive


class SaliencyMix(Mixer):
    """SaliencyMix: a CutMix box centred on the most salient unit of the tail image."""

    name = "saliencymix"
    needs_saliency = True
    default_fuser = "area"

    @attrs.frozen
    class Params(MixerParams):
        alpha: float = param(
            1.0, help="lam ~ Beta(alpha, alpha); the box side is sqrt(1 - lam) of the image side", validator=positive
        )
        same_lam: bool = param(
            False, help="one lam (box size) for the whole batch, as the SaliencyMix code does, instead of one per image"
        )
        prob: float = mix_prob(0.5)
        start_epoch: int = mix_start(4, help="first 0-based epoch that may mix (CMO's window: 3 < epoch)")
        end_epoch: Optional[int] = mix_end(-3)

    def centres(self, saliency: Tensor, patch_size: int) -> tuple[Tensor, Tensor]:
        """(B, h, w) unit scores -> pixel row and column (B,) of each image's most salient unit.

        Ties (a uniform map, for one) are broken at random from the run generator, so a
        flat map does not always put the box in the top-left corner.
        """
        b, gh, gw = saliency.shape
        flat = saliency.reshape(b, gh * gw).float()
        top = flat >= flat.amax(dim=1, keepdim=True)
        noise = torch.rand((b, gh * gw), generator=self.context.generator).to(saliency.device)
        unit = torch.where(top, noise, torch.full_like(noise, -1.0)).argmax(dim=1)
        rows = torch.div(unit, gw, rounding_mode="floor") * patch_size + patch_size // 2
        cols = (unit % gw) * patch_size + patch_size // 2
        return rows, cols

    def mix(self, x_f: Tensor, x_b: Tensor, saliency_f: Optional[Tensor], patch: PatchOperator) -> MixResult:
        if saliency_f is None:
            raise ValueError(
                "mixer 'saliencymix' needs the foreground saliency; add a [saliency] table (e.g. name = \"spectral-residual\")"
            )
        if x_f.shape != x_b.shape:
            raise ValueError(
                f"mixer 'saliencymix': foreground {tuple(x_f.shape)} and background {tuple(x_b.shape)} batches differ in shape"
            )
        b, _, height, width = x_f.shape
        gh, gw = patch.grid(height, width)
        if tuple(saliency_f.shape) != (b, gh, gw):
            raise ValueError(
                f"mixer 'saliencymix': saliency has shape {tuple(saliency_f.shape)}, expected {(b, gh, gw)}"
            )
        device = x_f.device
        lam = beta_draw(float(self.params.alpha), 1 if self.params.same_lam else b, self.context.generator).expand(b)
        cy, cx = self.centres(saliency_f, patch.size)
        box = box_masks(lam.to(device), cy, cx, height, width).to(x_f.dtype)
        images = torch.where(box.bool(), x_f, x_b)
        return MixResult(images=images, weight=box, unit_mask=None)
