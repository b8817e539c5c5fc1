"""Spectral-residual saliency (Hou and Zhang, CVPR 2007), batched with torch.fft.

Grad-CAM needs a model that already recognises the class; early in training, and
for tail classes it has barely seen, its maps are close to noise. The spectral
residual needs no model at all: the log amplitude spectrum of natural images is
locally smooth, so what sticks out of its local average is the part of the image
that is not "expected" background, and putting that residual back with the
original phase highlights it in the image plane. It costs two FFTs per image and
is the same in epoch 1 as in epoch 200, which makes it a model-free control for
saliency-guided mixing.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from lsm_registry import PatchOperator, SaliencyProvider
from lsm_registry.params import ParamError, in_range, non_negative, param, positive

#: An image whose grey levels vary less than this (relative to their magnitude) is flat.
FLAT = 1e-6


def spectral_residual(grey: Tensor, box: int = 3, floor: float = 1e-3) -> Tensor:
    """(B, h, w) grey images -> (B, h, w) squared magnitude of the spectral residual.

    Amplitudes are raised to ``floor`` times each image's largest amplitude before the
    log: the exact nulls of a clean edge's spectrum would otherwise dominate the
    residual and light up rings around an object instead of the object. The box
    filter wraps around, since the spectrum is periodic.
    """
    spectrum = torch.fft.fft2(grey.float())
    amplitude = spectrum.abs()
    floor = amplitude.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(amplitude.dtype).tiny) * floor
    log_amplitude = torch.log(torch.maximum(amplitude, floor))
    pad = box // 2
    padded = F.pad(log_amplitude.unsqueeze(1), (pad, pad, pad, pad), mode="circular")
    residual = log_amplitude - F.avg_pool2d(padded, box, stride=1).squeeze(1)
    recombined = torch.polar(torch.exp(residual), torch.angle(spectrum))
    return torch.fft.ifft2(recombined).abs().square()


def blur(maps: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of (B, h, w) maps; the kernel spans 3 sigma and fits the map."""
    if sigma <= 0:
        return maps
    h, w = maps.shape[-2:]
    k = min(2 * math.ceil(3 * sigma) + 1, 2 * min(h, w) - 1)  # reflect padding needs k // 2 < side
    if k < 3:
        return maps
    return gaussian_blur(maps.unsqueeze(1), kernel_size=[k, k], sigma=[sigma, sigma]).squeeze(1)


def min_max(maps: Tensor, fill: float) -> Tensor:
    """Per-map min-max to [0, 1]; a constant map becomes ``fill`` everywhere."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    flat = span <= FLAT * hi.abs().clamp_min(1.0)
    scaled = (maps - lo) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.full_like(maps, fill), scaled)


class SpectralResidual(SaliencyProvider):
    """Model-free spectral-residual saliency (Hou and Zhang 2007), patch-averaged.

    The grey image is the channel mean of the normalised input: per-channel
    normalisation only reweights the channels and shifts the mean (the zero
    frequency), which the residual barely sees, so there is no need to undo it.
    """

    name = "spectral-residual"

    @attrs.frozen
    class Params:
        box: int = param(
            3, help="side of the box filter that averages the log amplitude spectrum (odd)", validator=positive
        )
        amplitude_floor: float = param(
            1e-3,
            help="amplitudes below this fraction of the image's largest are raised to it before the log",
            validator=in_range(1e-12, 1.0),
        )
        blur_sigma: float = param(
            0.0625,
            help="Gaussian blur of the saliency map, as a fraction of the working image's shorter side (0: none)",
            validator=non_negative,
        )
        max_side: int = param(
            64,
            help="larger images are shrunk to this longer side before the FFT, as Hou and Zhang do (0: never)",
            validator=non_negative,
        )

        def __attrs_post_init__(self):
            if self.box % 2 == 0:
                raise ParamError("box", f"must be odd (got {self.box})")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, patch: PatchOperator) -> Tensor:
        height, width = x.shape[-2:]
        gh, gw = patch.grid(height, width)
        uniform = 1.0 / (gh * gw)  # a constant map is uniform, 1/N per unit (docs/method.md §4)
        with torch.no_grad():
            grey = x.detach().float().mean(dim=1)  # (B, H, W)
            side = max(height, width)
            if self.params.max_side and side > self.params.max_side:
                scale = self.params.max_side / side
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                grey = F.interpolate(
                    grey.unsqueeze(1), size=size, mode="bilinear", antialias=True, align_corners=False
                ).squeeze(1)
            span = grey.amax(dim=(-2, -1)) - grey.amin(dim=(-2, -1))
            flat = span <= FLAT * grey.abs().amax(dim=(-2, -1)).clamp_min(1.0)
            maps = spectral_residual(grey, self.params.box, self.params.amplitude_floor)
            maps = blur(maps, self.params.blur_sigma * min(maps.shape[-2:]))
            if maps.shape[-2:] != (height, width):
                maps = F.interpolate(
                    maps.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False
                ).squeeze(1)
            maps = min_max(maps, uniform)
            # A flat image has no salient part: its residual is rounding noise.
            maps = torch.where(flat.view(-1, 1, 1), torch.full_like(maps, uniform), maps)
            scores = F.avg_pool2d(maps.unsqueeze(1), patch.size).squeeze(1)
        return scores.clamp_min(0.0)
