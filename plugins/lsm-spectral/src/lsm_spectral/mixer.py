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
import numpy as np
import torch
from torch import Tensor

from lsm_registry import Mixer, MixResult, PatchOperator
from lsm_registry.params import ParamError, non_negative, param, positive, probability


def beta_draws(alpha: float, n: int, generator: torch.Generator) -> Tensor:
    """``n`` draws of Beta(alpha, alpha) decided by the run generator (CPU, float32).

    torch.distributions.Beta cannot take a generator, so for alpha != 1 a numpy
    generator is seeded from the run generator: one seed still decides the run.
    """
    if alpha == 1.0:
        return torch.rand(n, generator=generator)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).to(torch.float32)


class SaliencyMix(Mixer):
    """SaliencyMix: a CutMix box centred on the most salient unit of the tail image."""

    name = "saliencymix"
    needs_saliency = True
    default_fuser = "area"

    @attrs.frozen
    class Params:
        alpha: float = param(1.0, help="lam ~ Beta(alpha, alpha); the box side is sqrt(1 - lam) of the image side", validator=positive)
        same_lam: bool = param(False, help="one lam (box size) for the whole batch, as the SaliencyMix code does, instead of one per image")
        prob: float = param(0.5, help="probability that a batch is mixed", validator=probability)
        start_epoch: int = param(4, help="first 0-based epoch that may mix (CMO's window: 3 < epoch)", validator=non_negative)
        end_epoch: int = param(-3, help="mixing stops at this 0-based epoch; negative counts from the end (CMO: epoch < epochs - 3)")

        def __attrs_post_init__(self):
            if self.end_epoch >= 0 and self.start_epoch >= self.end_epoch:
                raise ParamError(
                    "end_epoch",
                    f"must be > start_epoch = {self.start_epoch} (got {self.end_epoch}); use a negative value to count from the end",
                )

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
            raise ValueError("mixer 'saliencymix' needs the foreground saliency; add a [saliency] table (e.g. name = \"spectral-residual\")")
        if x_f.shape != x_b.shape:
            raise ValueError(f"mixer 'saliencymix': foreground {tuple(x_f.shape)} and background {tuple(x_b.shape)} batches differ in shape")
        b, _, height, width = x_f.shape
        gh, gw = patch.grid(height, width)
        if tuple(saliency_f.shape) != (b, gh, gw):
            raise ValueError(f"mixer 'saliencymix': saliency has shape {tuple(saliency_f.shape)}, expected {(b, gh, gw)}")
        device = x_f.device
        lam = beta_draws(float(self.params.alpha), 1 if self.params.same_lam else b, self.context.generator).expand(b)
        side = torch.sqrt(1.0 - lam).to(device)
        cut_h = (height * side).to(torch.int64)
        cut_w = (width * side).to(torch.int64)
        cy, cx = self.centres(saliency_f, patch.size)
        y0 = (cy - cut_h // 2).clamp(0, height)
        y1 = (cy - cut_h // 2 + cut_h).clamp(0, height)
        x0 = (cx - cut_w // 2).clamp(0, width)
        x1 = (cx - cut_w // 2 + cut_w).clamp(0, width)
        rows = torch.arange(height, device=device).view(1, height)
        cols = torch.arange(width, device=device).view(1, width)
        in_rows = (rows >= y0.view(b, 1)) & (rows < y1.view(b, 1))
        in_cols = (cols >= x0.view(b, 1)) & (cols < x1.view(b, 1))
        box = (in_rows.view(b, 1, height, 1) & in_cols.view(b, 1, 1, width))
        images = torch.where(box, x_f, x_b)
        return MixResult(images=images, weight=box.to(x_f.dtype), unit_mask=None)
