"""The standard ImageNet views of one image file, made in the decoding worker.

Training: ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))`` drawn on the
*original* image, then a horizontal flip with probability 1/2. Test: the shorter side
resized to ``resize`` (256 for 224), then a ``size x size`` center crop. Both come from
``torchvision.transforms.v2`` (the parameter draw of its ``RandomResizedCrop`` and its
functional kernels, bilinear with antialiasing), so the pictures are those of the
reference pipelines rather than a look-alike. The crop is resized as a uint8 tensor:
torchvision's uint8 antialiased bilinear kernel matches PIL's to a grey level or so and
costs a third of PIL's resize here, which is what keeps decoding + view near the cost
of decoding alone.

Where no ``draft`` applies (the common case for ImageNet-sized files), a JPEG is decoded
by ``torchvision.io.decode_jpeg`` straight into a (3, H, W) tensor and the crop is a view
of it: the same libjpeg-turbo decode as PIL's (the pixels are equal), without PIL's
copies of the box into a tensor. PIL still reads the header (the size the crop is drawn
from), decodes every other format, and decodes a JPEG that ``draft`` shrinks.

JPEG decoding may be shrunk with PIL's ``draft`` (a cheaper DCT-domain scale of 1/2,
1/4 or 1/8), but only as far as the result keeps at least ``size`` source pixels under
the crop on both axes (training) or at least the resized size (test). Shrinking further
would upsample the crop and bring back the blur this module exists to avoid.

The crop parameters are drawn *before* decoding (the header gives the size), from the
global torch generator inside ``torch.random.fork_rng`` seeded with the batch seed:
the draws are those of ``RandomResizedCrop.make_params``, repeat exactly for a seed, and
leave the caller's generator untouched (the same code runs in worker processes and in
the training process).
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

try:  # torchvision 0.29 deprecates its image decoders in favour of TorchCodec; PIL decodes once they are gone
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a future torchvision
    decode_jpeg = None

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def default_resize(size: int) -> int:
    """The test-time shorter side for a crop of ``size``: 256 for 224 (the 0.875 crop ratio)."""
    return int(round(size * 256 / 224))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _unreadable(path: str | Path, exc: BaseException) -> ValueError:
    return ValueError(f"{path}: cannot read image ({_reason(exc)})")


READ_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, RuntimeError)  # RuntimeError: decode_jpeg


def _rgb(img: Image.Image) -> Image.Image:
    """The decoded image in RGB; no copy when it already is (most JPEGs)."""
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def _open(path: str | Path) -> tuple[bytes, Image.Image]:
    """The file's bytes (read once) and a lazy PIL image over them: only the header is parsed."""
    data = Path(path).read_bytes()
    return data, Image.open(io.BytesIO(data))


def _pixels(data: bytes, img: Image.Image, size: tuple[int, int]) -> Optional[Tensor]:
    """uint8 (3, H, W) from torchvision's JPEG decoder, or None where PIL must decode.

    PIL decodes when ``draft`` shrank the image (``img.size`` is no longer the file's
    ``size``), and for other formats and colour modes (CMYK JPEGs among them)."""
    if decode_jpeg is None or img.format != "JPEG" or img.mode not in ("RGB", "L") or img.size != size:
        return None
    with warnings.catch_warnings():  # the deprecation notice of every call says nothing a user can act on
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _draft_to_keep(img: Image.Image, need_w: float, need_h: float) -> tuple[float, float]:
    """Shrink the JPEG decode to no less than ``(need_w, need_h)``; returns the (x, y) scale applied."""
    width, height = img.size
    if need_w < width and need_h < height:
        img.draft("RGB", (max(1, math.ceil(need_w)), max(1, math.ceil(need_h))))
    return img.size[0] / width, img.size[1] / height


def train_view(path: str | Path, size: int, crop: Optional[v2.RandomResizedCrop] = None) -> tuple[Tensor, list[float], bool, tuple[int, int]]:
    """(uint8 (3, size, size), crop box [left, top, width, height] in source pixels, flipped, source (H, W)).

    Draws from the global torch generator: call it inside ``fork_rng`` with a seed.
    """
    crop = crop or v2.RandomResizedCrop(size, scale=SCALE, ratio=RATIO, antialias=True)
    try:
        data, img = _open(path)
        with img:
            width, height = img.size
            p = crop.make_params([img])  # the header is enough: no pixel is decoded yet
            flip = bool(torch.rand(()) < 0.5)
            top, left, h, w = p["top"], p["left"], p["height"], p["width"]
            # at least `size` source pixels under the crop on both axes (or all it has)
            keep = max(min(size, w) / w, min(size, h) / h)
            sx, sy = _draft_to_keep(img, width * keep, height * keep)
            pixels = _pixels(data, img, (width, height))
            if pixels is not None:
                box = pixels[:, top:top + h, left:left + w]
            else:
                rgb = _rgb(img)
                rw, rh = rgb.size
                t, l = min(int(round(top * sy)), rh - 1), min(int(round(left * sx)), rw - 1)
                ch, cw = max(1, min(int(round(h * sy)), rh - t)), max(1, min(int(round(w * sx)), rw - l))
                box = F.pil_to_tensor(rgb.crop((l, t, l + cw, t + ch)))  # copies only the box
    except READ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    out = F.resize(box, [size, size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    if flip:
        out = F.horizontal_flip(out)
    return out, [float(left), float(top), float(w), float(h)], flip, (height, width)


def eval_view(path: str | Path, size: int, resize: Optional[int] = None) -> tuple[Tensor, list[float], tuple[int, int]]:
    """(uint8 (3, size, size), the center crop's box [left, top, width, height] in source pixels, source (H, W))."""
    resize = resize or default_resize(size)
    try:
        data, img = _open(path)
        with img:
            width, height = img.size
            short = min(width, height)
            _draft_to_keep(img, width * resize / short, height * resize / short)
            pixels = _pixels(data, img, (width, height))
            if pixels is None:
                pixels = F.pil_to_tensor(_rgb(img))
    except READ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    out = F.center_crop(F.resize(pixels, resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True), [size, size])
    scale = short / resize
    box = [(width - size * scale) / 2, (height - size * scale) / 2, size * scale, size * scale]
    return out, box, (height, width)
