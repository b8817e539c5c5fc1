"""Batched augmentation on the device: no per-sample Python loop, no worker processes.

``crop32``: zero-pad by 4 and take a random 32x32 crop, then a random horizontal flip
(the CIFAR recipe of the reference code). ``rrc``: a random resized crop (scale
0.08-1, ratio 3/4-4/3) per image through ``torchvision.ops.roi_align``, then a flip.
Random draws come from a CPU generator so runs repeat on any device.
:func:`augment_with_crops` also says, per image, which box was cut and whether it was
flipped (:class:`lsm_registry.interfaces.Crops`), from the same draws as :func:`augment`.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor
from torchvision.ops import roi_align

from ..interfaces import Crops, Split


def stats_tensor(values: tuple[float, ...], device: torch.device) -> Tensor:
    """Per-channel statistics as a (1, ch, 1, 1) tensor: built once, not per batch."""
    return torch.tensor(values, device=device, dtype=torch.float32).view(1, -1, 1, 1)


def normalise(x: Tensor, mean: tuple[float, ...] | Tensor, std: tuple[float, ...] | Tensor) -> Tensor:
    """0..255 images -> (x / 255 - mean) / std; pass tensors from stats_tensor in a loop."""
    m = mean if isinstance(mean, Tensor) else stats_tensor(mean, x.device)
    s = std if isinstance(std, Tensor) else stats_tensor(std, x.device)
    return (x.float() / 255.0 - m) / s


def eval_view_batches(
    split: Split,
    indices: Tensor,
    device: torch.device,
    mean: Tensor,
    std: Tensor,
    batch_size: int = 512,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(idx, x) batch by batch: ``split``'s test-time view of ``indices`` (no augmentation), normalised,
    on ``device``. The one reading of a split that every eval-mode pass shares: scoring a split,
    PC's class means, SBCL's embedding of the training images."""
    for start in range(0, indices.numel(), batch_size):
        idx = indices[start : start + batch_size]
        yield idx, normalise(split.fetch(idx, device), mean, std).contiguous(memory_format=memory_format)


def _flip(x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x), flip


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    return _flip(x, generator)[0]


def pad_crop(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    return _pad_crop(x, generator, padding)[0]


def _pad_crop(x: Tensor, generator: torch.Generator, padding: int = 4) -> tuple[Tensor, Tensor]:
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    oy_cpu = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox_cpu = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    oy, ox = oy_cpu.to(x.device), ox_cpu.to(x.device)  # the CPU copies give the boxes without a device sync
    rows = (oy.view(-1, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (ox.view(-1, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    bidx = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    cidx = torch.arange(c, device=x.device).view(1, c, 1, 1)
    boxes = torch.stack([ox_cpu - padding, oy_cpu - padding, torch.full((b,), w), torch.full((b,), h)], dim=1)
    return padded[bidx, cidx, rows, cols], boxes.to(torch.float32)


def random_resized_crop(x: Tensor, generator: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tensor:
    return _random_resized_crop(x, generator, scale, ratio)[0]


def _random_resized_crop(
    x: Tensor, generator: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[Tensor, Tensor]:
    b, _, h, w = x.shape
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator) * h * w
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(1, w)
    ch = torch.sqrt(area / r).clamp(1, h)
    x0 = torch.rand(b, generator=generator) * (w - cw)
    y0 = torch.rand(b, generator=generator) * (h - ch)
    boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], dim=1).to(x.device)
    out = roi_align(x.float(), boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return out, torch.stack([x0, y0, cw, ch], dim=1).to(torch.float32)


def augment(x: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """uint8 or float (B, ch, H, W) -> augmented float in the 0..255 range."""
    return augment_with_crops(x, kind, generator)[0]


def augment_with_crops(x: Tensor, kind: str, generator: torch.Generator) -> tuple[Tensor, Crops]:
    """:func:`augment` and, per image, the box it cut (stored-image pixels) and whether it flipped."""
    b, _, h, w = x.shape
    sizes = torch.tensor([[h, w]], dtype=torch.int64).expand(b, 2)
    if kind == "none":
        whole = torch.tensor([[0.0, 0.0, float(w), float(h)]]).expand(b, 4)
        return x.float(), Crops(whole, torch.zeros(b, dtype=torch.bool), sizes)
    if kind == "crop32":
        cut, boxes = _pad_crop(x, generator)
    elif kind == "rrc":
        cut, boxes = _random_resized_crop(x, generator)
    else:
        raise ValueError(f"unknown augmentation {kind!r} (choices: crop32, rrc, none)")
    out, flips = _flip(cut.float(), generator)
    return out, Crops(boxes, flips, sizes)
