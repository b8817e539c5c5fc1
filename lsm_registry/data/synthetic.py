"""``synthetic-lt``: a long-tailed data set drawn in memory from a seed, no files.

Each class is one small object, a (shape, texture, colour) combination, drawn at a
random position and scale on a cluttered background (smooth colour noise plus thin
random strokes). Backgrounds are drawn independently of the class, so only the object
decides the label: a model has to look at the right place, which is what saliency-guided
mixing is about.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond")
TEXTURES = ("solid", "stripes", "checker")
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)


def class_identity(c: int) -> tuple[str, str, tuple[int, int, int]]:
    """Class c's (shape, texture, colour): unique for c < len(SHAPES) * len(TEXTURES) * len(PALETTE)."""
    shape = SHAPES[c % len(SHAPES)]
    texture = TEXTURES[(c // len(SHAPES)) % len(TEXTURES)]
    colour = PALETTE[(c + c // (len(SHAPES) * len(TEXTURES))) % len(PALETTE)]
    return shape, texture, colour


def class_name(c: int) -> str:
    shape, texture, _ = class_identity(c)
    return f"{c}:{texture}-{shape}"


def _shape_mask(shape_id: Tensor, u: Tensor, v: Tensor) -> Tensor:
    r2 = u * u + v * v
    masks = torch.stack(
        [
            r2 < 1.0,
            torch.maximum(u.abs(), v.abs()) < 0.8,
            (v < 0.7) & (v > -0.9 + 1.6 * u.abs() * 1.1),
            (r2 < 1.0) & (r2 > 0.35),
            ((u.abs() < 0.3) & (v.abs() < 1.0)) | ((v.abs() < 0.3) & (u.abs() < 1.0)),
            (u.abs() + v.abs()) < 1.0,
        ]
    )
    return masks.gather(0, shape_id.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)


def _texture(texture_id: Tensor, u: Tensor, v: Tensor) -> Tensor:
    stripes = 0.55 + 0.45 * (torch.sin(3.5 * math.pi * u) > 0).float()
    checker = 0.55 + 0.45 * ((torch.sin(3.0 * math.pi * u) * torch.sin(3.0 * math.pi * v)) > 0).float()
    solid = torch.ones_like(u)
    stack = torch.stack([solid, stripes, checker])
    return stack.gather(0, texture_id.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)


#: Generator versions. 1: each class has its own colour, so colour alone tells most classes
#: apart and a class is learnt wholesale or not at all. 2: the colour is drawn per image,
#: independently of the class, so a class is its shape and texture only and its accuracy
#: grows with the images it has. 3: half way, each image shows its class's colour with
#: probability ``CLASS_COLOUR_SHARE`` and a palette colour drawn at random otherwise: colour
#: is a cue that gets training started, shape and texture decide (docs/data.md).
VERSIONS = (1, 2, 3)
CLASS_COLOUR_SHARE = 0.5


def max_classes(version: int) -> int:
    """How many distinct classes the generator can draw (colour tells classes apart in version 1 only)."""
    return len(SHAPES) * len(TEXTURES) * (len(PALETTE) if version == 1 else 1)


def object_colours(labels: Tensor, class_colours: Tensor, generator: torch.Generator, version: int) -> Tensor:
    """(N, 3) colours in [0, 1]: the class's (version 1), drawn per image (2), or either by a coin (3)."""
    if version == 1:
        return class_colours[labels]
    palette = torch.tensor(PALETTE, dtype=torch.float32) / 255.0
    drawn = palette[torch.randint(0, len(PALETTE), (labels.numel(),), generator=generator)]
    if version == 2:
        return drawn
    own = torch.rand(labels.numel(), generator=generator) < CLASS_COLOUR_SHARE
    return torch.where(own.view(-1, 1), class_colours[labels], drawn)


def render(labels: Tensor, generator: torch.Generator, size: int = 32, version: int = 1) -> Tensor:
    """uint8 images (N, 3, size, size) for the given labels, vectorised over the batch."""
    n = labels.numel()
    g = generator
    # Background: smooth colour noise, mid-range so that objects of any colour stand out.
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 0.5 + 0.25
    bg = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    bg = bg + (torch.rand(n, 3, size, size, generator=g) - 0.5) * 0.12
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    ys, xs = ys.view(1, size, size), xs.view(1, size, size)
    # Clutter: three thin strokes of random colours through random points.
    for _ in range(3):
        px, py = (torch.rand(n, 1, 1, generator=g) * size for _ in range(2))
        angle = torch.rand(n, 1, 1, generator=g) * math.pi
        dist = ((xs - px) * torch.sin(angle) - (ys - py) * torch.cos(angle)).abs()
        stroke = (dist < 0.7).unsqueeze(1).float()
        colour = torch.rand(n, 3, 1, 1, generator=g)
        bg = bg * (1 - stroke) + colour * stroke
    # Object.
    ids = [class_identity(int(c)) for c in range(int(labels.max()) + 1)] if n else []
    shape_of = torch.tensor([SHAPES.index(s) for s, _, _ in ids], dtype=torch.int64)
    texture_of = torch.tensor([TEXTURES.index(t) for _, t, _ in ids], dtype=torch.int64)
    colour_of = torch.tensor([c for _, _, c in ids], dtype=torch.float32) / 255.0
    radius = (torch.rand(n, 1, 1, generator=g) * 0.14 + 0.16) * size
    cx = radius + torch.rand(n, 1, 1, generator=g) * (size - 2 * radius)
    cy = radius + torch.rand(n, 1, 1, generator=g) * (size - 2 * radius)
    u, v = (xs - cx) / radius, (ys - cy) / radius
    mask = _shape_mask(shape_of[labels], u, v).unsqueeze(1).float()
    shade = _texture(texture_of[labels], u, v).unsqueeze(1)
    jitter = 1.0 + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.15
    colour = object_colours(labels, colour_of, g, version)
    obj = (colour.view(n, 3, 1, 1) * jitter).clamp(0, 1) * shade
    img = bg * (1 - mask) + obj * mask
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def render_split(counts: list[int], seed: int, chunk: int = 2048, version: int = 1) -> tuple[Tensor, Tensor]:
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64))
    generator = torch.Generator().manual_seed(seed)
    images = [render(labels[i : i + chunk], generator, version=version) for i in range(0, labels.numel(), chunk)]
    return (torch.cat(images) if images else torch.empty(0, 3, 32, 32, dtype=torch.uint8)), labels
