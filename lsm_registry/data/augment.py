"""Batched augmentation on the device: no per-sample Python loop, no worker processes.

``crop32``: zero-pad by 4 and take a random 32x32 crop, then a random horizontal flip
(the CIFAR recipe of the reference code). ``rrc``: a random resized crop (scale
0.08-1, ratio 3/4-4/3) per image through ``torchvision.ops.roi_align``, then a flip.
Random draws come from a CPU generator so runs repeat on any device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import roi_align


def stats_tensor(values: tuple[float, ...], device: torch.device) -> Tensor:
    """Per-channel statistics as a (1, ch, 1, 1) tensor: built once, not per batch."""
    return torch.tensor(values, device=device, dtype=torch.float32).view(1, -1, 1, 1)


def normalise(x: Tensor, mean: tuple[float, ...] | Tensor, std: tuple[float, ...] | Tensor) -> Tensor:
    """0..255 images -> (x / 255 - mean) / std; pass tensors from stats_tensor in a loop."""
    m = mean if isinstance(mean, Tensor) else stats_tensor(mean, x.device)
    s = std if isinstance(std, Tensor) else stats_tensor(std, x.device)
    return (x.float() / 255.0 - m) / s


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def pad_crop(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    rows = (oy.view(-1, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (ox.view(-1, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    bidx = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    cidx = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bidx, cidx, rows, cols]


def random_resized_crop(x: Tensor, generator: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tensor:

    b, _, h, w = x.shape
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator) * h * w
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(1, w)
    ch = torch.sqrt(area / r).clamp(1, h)
    x0 = torch.rand(b, generator=generator) * (w - cw)
    y0 = torch.rand(b, generator=generator) * (h - ch)
    boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], dim=1).to(x.device)
    return roi_align(x.float(), boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def augment(x: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """uint8 or float (B, ch, H, W) -> augmented float in the 0..255 range."""
    if kind == "none":
        return x.float()
    if kind == "crop32":
        return random_flip(pad_crop(x, generator).float(), generator)
    if kind == "rrc":
        return random_flip(random_resized_crop(x, generator), generator)
    raise ValueError(f"unknown augmentation {kind!r} (choices: crop32, rrc, none)")
