"""Patch operators: the feature decoupling of LSM (docs/method.md §3).

A patch operator turns an image into independent units that can be swapped between
two images and turns them back without loss. ``pixel-unshuffle`` makes each
``p x p`` block one unit; being pure re-indexing it is exact, differentiable and
costs a memory copy, which is why it is preferred over any learned or
interpolating decomposition.
"""

from __future__ import annotations

import attrs
import torch.nn.functional as F
from torch import Tensor

from ..interfaces import PatchOperator
from ..params import param, positive


class PixelUnshuffle(PatchOperator):
    """p x p blocks as units via pixel_unshuffle / pixel_shuffle (exact inverse, no resizing)."""

    name = "pixel-unshuffle"

    @attrs.frozen
    class Params:
        size: int = param(4, help="block side p in pixels; must divide the image height and width", validator=positive)

    @property
    def size(self) -> int:
        return int(self.params.size)

    def split(self, x: Tensor) -> Tensor:
        # grid() turns torch's terse shape error into one that names p and the image size.
        self.grid(x.shape[-2], x.shape[-1])
        return F.pixel_unshuffle(x, self.size)

    def merge(self, u: Tensor) -> Tensor:
        return F.pixel_shuffle(u, self.size)


COMPONENTS = [PixelUnshuffle]
