"""Tensor helpers that mixers share, exported for plugin authors.

Every built-in mixer draws its randomness and builds its masks through these, so a
plugin that uses them draws exactly as the built-ins do (one run generator decides
everything) instead of keeping its own copy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["beta_draw", "box_masks", "rank_descending", "unit_topk"]


def beta_draw(alpha: float, n: int, generator: torch.Generator) -> Tensor:
    """``n`` draws of Beta(alpha, alpha) from the run generator (CPU, float32).

    torch.distributions cannot take a generator, so for alpha != 1 a numpy generator
    is seeded from the run generator: still one seed decides the whole run.
    """
    if alpha == 1.0:
        return torch.rand(n, generator=generator)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).to(torch.float32)


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
    rows = torch.arange(height, device=cy.device).view(1, height, 1)
    cols = torch.arange(width, device=cy.device).view(1, 1, width)
    inside = (
        (rows >= y1.view(-1, 1, 1))
        & (rows < y2.view(-1, 1, 1))
        & (cols >= x1.view(-1, 1, 1))
        & (cols < x2.view(-1, 1, 1))
    )
    return inside.unsqueeze(1).to(torch.float32)


def rank_descending(scores: Tensor) -> Tensor:
    """Rank of each entry along dim 1, 0 = largest; equal scores rank by index (stable)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


def unit_topk(scores: Tensor, k: Tensor) -> Tensor:
    """(B, h, w) unit scores and (B,) counts -> (B, h, w) bool mask of each image's ``k`` best units.

    Ties go to the lower unit index, so equal scores give the same mask on every device.
    """
    b, gh, gw = scores.shape
    ranks = rank_descending(scores.reshape(b, gh * gw))
    return (ranks < k.to(scores.device).view(b, 1)).view(b, gh, gw)
