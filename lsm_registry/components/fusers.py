"""Label fusers: soft targets for a mixed batch (docs/method.md §6, §9 for remix).

``saliency`` (LSM's default) gives the foreground class the share of its saliency
that was pasted, so a few pasted blocks that hold the whole object still carry most
of the label; ``area`` is CutMix's pixel share; ``saliency2`` also discounts the
background class by how much of its own saliency was covered; ``remix`` (a baseline)
moves the label to the minority class when the majority image is only faint. All three read the
unit mask when the mixer has one and otherwise the per-pixel weight map, so every
mixer works with every fuser.
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from ..interfaces import LabelFuser, MixResult
from ..params import param, positive, probability


def pasted_share(mix: MixResult, saliency: Tensor) -> Tensor:
    """(B,) share of ``saliency`` (B, h, w) that lies on the pasted foreground.

    With a unit mask this is ``sum_{M} S / sum S``. Without one (boxes, blends), the
    per-pixel weight is averaged over each unit first, so a unit half covered counts
    half. A map that sums to zero falls back to the pasted area.
    """
    s = saliency.float()
    if mix.unit_mask is not None:
        covered = mix.unit_mask.to(s.dtype)
    else:
        covered = F.adaptive_avg_pool2d(mix.weight.float(), tuple(s.shape[-2:])).squeeze(1)
    total = s.sum(dim=(1, 2))
    pasted = (s * covered).sum(dim=(1, 2))
    area = covered.mean(dim=(1, 2))
    return torch.where(total > 0, pasted / torch.where(total > 0, total, torch.ones_like(total)), area).clamp(0.0, 1.0)


def pasted_area(mix: MixResult) -> Tensor:
    if mix.unit_mask is not None:
        return mix.unit_mask.float().mean(dim=(1, 2))
    return mix.weight.float().mean(dim=(1, 2, 3))


class SaliencyFuser(LabelFuser):
    """lam_f = pasted share of the foreground's saliency (LSM's label rule)."""

    name = "saliency"
    needs_saliency = True

    @attrs.frozen
    class Params:
        pass

    def fuse(
        self, mix: MixResult, y_f: Tensor, y_b: Tensor, saliency_f: Optional[Tensor], saliency_b: Optional[Tensor]
    ) -> Tensor:
        if saliency_f is None:
            raise ValueError(
                "label fuser 'saliency' needs the foreground saliency; add a [saliency] table or use label_fuser 'area'"
            )
        return self.two_label(pasted_share(mix, saliency_f), y_f, y_b)


class AreaFuser(LabelFuser):
    """lam_f = pasted area |M| / N (CutMix's rule; the mean weight for box and blend mixers)."""

    name = "area"

    @attrs.frozen
    class Params:
        pass

    def fuse(
        self, mix: MixResult, y_f: Tensor, y_b: Tensor, saliency_f: Optional[Tensor], saliency_b: Optional[Tensor]
    ) -> Tensor:
        return self.two_label(pasted_area(mix), y_f, y_b)


class Saliency2Fuser(LabelFuser):
    """Weights both labels by the saliency each image keeps: pasted (fg) and uncovered (bg) shares."""

    name = "saliency2"
    needs_saliency = True
    needs_background_saliency = True

    @attrs.frozen
    class Params:
        pass

    def fuse(
        self, mix: MixResult, y_f: Tensor, y_b: Tensor, saliency_f: Optional[Tensor], saliency_b: Optional[Tensor]
    ) -> Tensor:
        if saliency_f is None or saliency_b is None:
            raise ValueError("label fuser 'saliency2' needs the saliency of both batches; add a [saliency] table")
        lam_f = pasted_share(mix, saliency_f)
        lam_b = 1.0 - pasted_share(mix, saliency_b)
        total = lam_f + lam_b
        # Both shares zero cannot come from a min-max normalised map; fall back to area.
        share = torch.where(total > 0, lam_f / torch.where(total > 0, total, torch.ones_like(total)), pasted_area(mix))
        return self.two_label(share, y_f, y_b)


class Remix(LabelFuser):
    """Remix: rebalanced labels; a faint majority image gives its whole label to the minority one."""

    name = "remix"

    @attrs.frozen
    class Params:
        kappa: float = param(
            3.0, help="class-count ratio n_major / n_minor from which the label is moved", validator=positive
        )
        tau: float = param(
            0.5, help="the majority image's share must be below tau for its label to be dropped", validator=probability
        )

    def fuse(
        self,
        mix: MixResult,
        y_f: Tensor,
        y_b: Tensor,
        saliency_f: Optional[Tensor],
        saliency_b: Optional[Tensor],
    ) -> Tensor:
        # Remix is written for x = lam x_i + (1 - lam) x_j: i is the foreground
        # (weight lam, the mean of the weight map), j the background.
        lam = mix.weight.float().mean(dim=(1, 2, 3))
        counts = self.context.counts_tensor().to(lam.device)
        ratio = counts[y_f] / counts[y_b]  # n_{y_i} / n_{y_j}
        kappa, tau = float(self.params.kappa), float(self.params.tau)
        lam_y = torch.where((lam < tau) & (ratio >= kappa), torch.zeros_like(lam), lam)
        lam_y = torch.where((1.0 - lam < tau) & (kappa * ratio <= 1.0), torch.ones_like(lam), lam_y)
        return self.two_label(lam_y, y_f, y_b)


COMPONENTS = [SaliencyFuser, AreaFuser, Saliency2Fuser, Remix]
