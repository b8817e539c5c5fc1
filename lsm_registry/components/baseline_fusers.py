"""Baseline label fusers: Remix (METHOD.md section 8).

Remix keeps the image mix as it is and moves the label towards the minority class
when a majority image is only faintly present. It reads the foreground's share from
the mixer's weight map, so it works after any mixer (Mixup as in the paper, but also
CutMix boxes or LSM's patch masks).
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch
from torch import Tensor

from ..interfaces import LabelFuser, MixResult
from ..params import param, positive, probability


class Remix(LabelFuser):
    """Remix: rebalanced labels; a faint majority image gives its whole label to the minority one."""

    name = "remix"

    @attrs.frozen
    class Params:
        kappa: float = param(3.0, help="class-count ratio n_major / n_minor from which the label is moved", validator=positive)
        tau: float = param(0.5, help="the majority image's share must be below tau for its label to be dropped", validator=probability)

    def fuse(
        self,
        mix: MixResult,
        y_f: Tensor,
        y_b: Tensor,
        saliency_f: Optional[Tensor],
        saliency_b: Optional[Tensor],
    ) -> Tensor:
        # METHOD.md writes Remix for x = lam x_i + (1 - lam) x_j: i is the foreground
        # (weight lam, the mean of the weight map), j the background.
        lam = mix.weight.float().mean(dim=(1, 2, 3))
        counts = self.context.counts_tensor().to(lam.device)
        ratio = counts[y_f] / counts[y_b]  # n_{y_i} / n_{y_j}
        kappa, tau = float(self.params.kappa), float(self.params.tau)
        lam_y = torch.where((lam < tau) & (ratio >= kappa), torch.zeros_like(lam), lam)
        lam_y = torch.where((1.0 - lam < tau) & (kappa * ratio <= 1.0), torch.ones_like(lam), lam_y)
        return self.two_label(lam_y, y_f, y_b)


COMPONENTS = [Remix]
