"""LSM: saliency-guided local semantic mixing (METHOD.md sections 5 and 6).

The foreground (rebalanced, tail-leaning) batch is cut into the units of the patch
operator; the most salient units of each foreground image replace the units at the
same places of the background (instance, head-leaning) image. Keeping the place
keeps the object's layout, and taking the salient units keeps the label evidence,
which is what lets a tail class borrow the context of head images.
"""

from __future__ import annotations

from typing import Literal, Optional

import attrs
import numpy as np
import torch
from torch import Tensor

from ..interfaces import MixResult, Mixer, PatchOperator
from ..params import ParamError, in_range, non_negative, param, positive, probability


def beta_draw(alpha: float, n: int, generator: torch.Generator) -> Tensor:
    """``n`` draws of Beta(alpha, alpha) from the run generator (CPU, float32).

    torch.distributions cannot take a generator, so for alpha != 1 a numpy generator
    is seeded from the run generator: still one seed decides the whole run.
    """
    if alpha == 1.0:
        return torch.rand(n, generator=generator)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).to(torch.float32)


def rank_descending(scores: Tensor) -> Tensor:
    """Rank of each entry along dim 1, 0 = largest; equal scores rank by index (stable)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


class LSM(Mixer):
    """Pastes the most salient p x p units of a tail image at the same place on a head image."""

    name = "lsm"
    needs_saliency = True
    default_fuser = "saliency"

    @attrs.frozen
    class Params:
        mask: Literal["topk", "threshold"] = param("topk", help="unit selection: topk (a Beta-drawn share of units) or threshold (S >= tau * max S)")
        alpha: float = param(1.0, help="topk: pasted fraction rho ~ Beta(alpha, alpha); k = clamp(round(rho N), 1, N - 1)", validator=positive)
        same_k: bool = param(False, help="topk: one rho for the whole batch (CutMix-style) instead of one per image")
        tau: float = param(0.5, help="threshold: paste units with S >= tau * max S", validator=in_range(0.0, 1.0))
        prob: float = param(0.5, help="probability that a batch is mixed", validator=probability)
        start_epoch: int = param(4, help="first 0-based epoch that may mix (CMO: 3 < epoch)", validator=non_negative)
        end_epoch: int = param(-3, help="mixing stops at this 0-based epoch; negative counts from the end (CMO: epoch < epochs - 3)")

        def __attrs_post_init__(self):
            if self.end_epoch >= 0 and self.start_epoch >= self.end_epoch:
                raise ParamError("end_epoch", f"must be > start_epoch = {self.start_epoch} (got {self.end_epoch}); use a negative value to count from the end")

    def select(self, scores: Tensor) -> Tensor:
        """(B, h, w) unit scores -> (B, h, w) bool mask M of units to paste."""
        b, gh, gw = scores.shape
        n = gh * gw
        flat = scores.reshape(b, n)
        if self.params.mask == "threshold":
            return (flat >= self.params.tau * flat.amax(dim=1, keepdim=True)).view(b, gh, gw)
        rho = beta_draw(self.params.alpha, 1 if self.params.same_k else b, self.context.generator)
        k = torch.round(rho * n).clamp(1, max(n - 1, 1)).to(torch.int64).expand(b)
        mask = rank_descending(flat) < k.to(scores.device).view(b, 1)
        return mask.view(b, gh, gw)

    def mix(self, x_f: Tensor, x_b: Tensor, saliency_f: Optional[Tensor], patch: PatchOperator) -> MixResult:
        if saliency_f is None:
            raise ValueError("mixer 'lsm' needs the foreground saliency; add a [saliency] table (e.g. name = \"gradcam\")")
        if x_f.shape != x_b.shape:
            raise ValueError(f"mixer 'lsm': foreground {tuple(x_f.shape)} and background {tuple(x_b.shape)} batches differ in shape")
        gh, gw = patch.grid(x_f.shape[-2], x_f.shape[-1])
        if tuple(saliency_f.shape) != (x_f.shape[0], gh, gw):
            raise ValueError(f"mixer 'lsm': saliency has shape {tuple(saliency_f.shape)}, expected {(x_f.shape[0], gh, gw)}")
        mask = self.select(saliency_f)
        units = torch.where(mask.unsqueeze(1), patch.split(x_f), patch.split(x_b))
        return MixResult(images=patch.merge(units), weight=patch.expand(mask.to(x_f.dtype)), unit_mask=mask)


COMPONENTS = [LSM]
