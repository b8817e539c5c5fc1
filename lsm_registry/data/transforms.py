"""The standard ImageNet views of one image file, made in the decoding worker.

Training: ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))`` drawn on the
*original* image, then a horizontal flip with probability 1/2. Test: the shorter side
resized to ``resize`` (256 for 224), then a ``size x size`` center crop. Both come from
``torchvision.transforms.v2`` (the parameter draw of its ``RandomResizedCrop`` and its
functional kernels, bilinear with antialiasing), so the pictures are those of the
reference pipelines rather than a look-alike. The crop is resized as a uint8 tensor:
torchvision's uint8 antialiased bilinear kernel matches PIL's to a grey level or so and
costs a third of PIL's resize here, which is what keeps decoding + view near the cost
of decoding alone. The box is handed to it packed channels-last, mirrored first when the
view flips (one copy of the box): the kernel works on interleaved pixels, and given a
strided view of the decoded image it repacks input and output itself, which made the
resize a third slower; the resize commutes with the mirror to the last bit, so this is
the reference order (resize, then flip) at the cost of one copy instead of two.

Where no ``draft`` applies (the common case for ImageNet-sized files), a JPEG is decoded
by torchvision's decoder (the operator behind ``torchvision.io.decode_jpeg``) straight
into a (3, H, W) tensor and the box is cut from it: the same libjpeg-turbo decode as
PIL's (the pixels are equal), without PIL's header parsing and its copy of the image
into a tensor. PIL decodes every other format and a JPEG that
``draft`` shrinks. A JPEG's size comes from its frame header, read directly
(``jpeg_frame``); PIL reads the header of other formats.

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
from pathlib import Path
from typing import Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

try:  # torchvision 0.29 deprecates its image decoders in favour of TorchCodec; PIL decodes once they are gone
    from torchvision.io import ImageReadMode, decode_jpeg  # noqa: F401 (the import loads the decoder's operator)

    # the operator torchvision's decode_jpeg calls: the wrapper adds a deprecation warning per
    # call, and warning (or silencing it) costs about a twentieth of a decode
    _decode_jpeg = torch.ops.image.decode_jpeg
except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - a future torchvision
    _decode_jpeg = None

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


READ_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    RuntimeError,  # RuntimeError: decode_jpeg
    Image.DecompressionBombError,
)  # more pixels than PIL.Image.MAX_IMAGE_PIXELS allows


def _rgb(img: Image.Image) -> Image.Image:
    """The decoded image in RGB; no copy when it already is (most JPEGs)."""
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


#: Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: no length field


def jpeg_frame(data: bytes) -> Optional[tuple[int, int, int]]:
    """(width, height, components) of an 8-bit JPEG, from its frame header; None for anything else.

    Reading the few marker lengths up to the frame header costs microseconds, against
    PIL's ``Image.open`` (format detection, APP and EXIF parsing): a tenth of the decode
    of a 400-pixel file, which the training view would otherwise pay on every image."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _STANDALONE:
            i += 2
        elif marker in _SOF:
            if i + 10 > n or data[i + 4] != 8:  # truncated, or 12/16-bit samples
                return None
            height, width = int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
            return (width, height, data[i + 9]) if width and height else None  # 0: the height comes later (DNL)
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def draft_scale(width: int, height: int, need_w: float, need_h: float) -> int:
    """The DCT scale (1, 2, 4 or 8) PIL's ``draft`` picks to keep at least ``(need_w, need_h)`` pixels."""
    if not (need_w < width and need_h < height):
        return 1
    fit = min(width // max(1, math.ceil(need_w)), height // max(1, math.ceil(need_h)))
    return next((s for s in (8, 4, 2) if s <= fit), 1)


def _decoded_by_torchvision(data: bytes, frame: Optional[tuple[int, int, int]], scale: int) -> Optional[Tensor]:
    """uint8 (3, H, W) from torchvision's JPEG decoder, or None where PIL must decode.

    PIL decodes what ``draft`` shrinks (torchvision cannot decode at a reduced scale), other
    formats, and JPEGs that are not greyscale or three-component (CMYK among them)."""
    if _decode_jpeg is None or frame is None or frame[2] not in (1, 3) or scale > 1:
        return None
    return _decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB.value, False)


def _draft_to_keep(img: Image.Image, need_w: float, need_h: float) -> tuple[float, float]:
    """Shrink the JPEG decode to no less than ``(need_w, need_h)``; returns the (x, y) scale applied."""
    width, height = img.size
    if need_w < width and need_h < height:
        img.draft("RGB", (max(1, math.ceil(need_w)), max(1, math.ceil(need_h))))
    return img.size[0] / width, img.size[1] / height


def _source(path: str | Path) -> tuple[bytes, Optional[tuple[int, int, int]], tuple[int, int]]:
    """The file's bytes (read once), its JPEG frame when it has one, and its (width, height)."""
    with open(path, "rb") as f:
        data = f.read()
    frame = jpeg_frame(data)
    if frame is not None:
        return data, frame, frame[:2]
    with Image.open(io.BytesIO(data)) as img:  # another format: PIL reads the header
        return data, None, img.size


def train_view(
    path: str | Path, size: int, crop: Optional[v2.RandomResizedCrop] = None
) -> tuple[Tensor, list[float], bool, tuple[int, int]]:
    """(uint8 (3, size, size), crop box [left, top, width, height] in source pixels, flipped, source (H, W)).

    Draws from the global torch generator: call it inside ``fork_rng`` with a seed.
    """
    crop = crop or v2.RandomResizedCrop(size, scale=SCALE, ratio=RATIO, antialias=True)
    try:
        data, frame, (width, height) = _source(path)
        # the header is enough for the draws: no pixel is decoded yet
        p = crop.make_params([torch.empty((0, height, width), dtype=torch.uint8)])
        flip = bool(torch.rand(()) < 0.5)
        top, left, h, w = p["top"], p["left"], p["height"], p["width"]
        # at least `size` source pixels under the crop on both axes (or all it has)
        keep = max(min(size, w) / w, min(size, h) / h)
        need = (width * keep, height * keep)
        pixels = _decoded_by_torchvision(data, frame, draft_scale(width, height, *need))
        if pixels is not None:  # (3, H, W) over an (H, W, 3) buffer
            box = pixels.permute(1, 2, 0)[top : top + h, left : left + w]
        else:
            with Image.open(io.BytesIO(data)) as img:
                sx, sy = _draft_to_keep(img, *need)
                rgb = _rgb(img)
                rw, rh = rgb.size
                t, lf = min(int(round(top * sy)), rh - 1), min(int(round(left * sx)), rw - 1)
                ch, cw = max(1, min(int(round(h * sy)), rh - t)), max(1, min(int(round(w * sx)), rw - lf))
                box = F.pil_to_tensor(rgb.crop((lf, t, lf + cw, t + ch))).permute(1, 2, 0)  # copies only the box
    except READ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    # one copy packs the (h, w, 3) box, mirrored when it flips: the resize commutes with the
    # mirror exactly (its weights are symmetric), so this is the reference's resize-then-flip
    box = (box.flip(1) if flip else box.contiguous()).permute(2, 0, 1)
    out = F.resize_image(box, [size, size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    return out, [float(left), float(top), float(w), float(h)], flip, (height, width)


def eval_view(path: str | Path, size: int, resize: Optional[int] = None) -> tuple[Tensor, list[float], tuple[int, int]]:
    """(uint8 (3, size, size), the center crop's box [left, top, width, height] in source pixels, source (H, W))."""
    resize = resize or default_resize(size)
    try:
        data, frame, (width, height) = _source(path)
        short = min(width, height)
        need = (width * resize / short, height * resize / short)
        pixels = _decoded_by_torchvision(data, frame, draft_scale(width, height, *need))
        if pixels is None:
            with Image.open(io.BytesIO(data)) as img:
                _draft_to_keep(img, *need)
                pixels = F.pil_to_tensor(_rgb(img))
    except READ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    out = F.center_crop(
        F.resize(pixels, resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True), [size, size]
    )
    scale = short / resize
    box = [(width - size * scale) / 2, (height - size * scale) / 2, size * scale, size * scale]
    return out, box, (height, width)
