"""Pictures of mixed batches: ``lsm preview`` and the run folder's ``mixed_samples.png``.

What a mixer does is easiest to judge by eye: which blocks were taken, from where,
and what label weight they earned. Every picture is drawn from a
:class:`~lsm_registry.mixing.MixedBatch` made by the one mixing step, so it shows
exactly what training saw (the run folder's picture is the last batch the run really
mixed) or would see (``lsm preview``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from ..engine import Trainer, epoch_seed
from ..errors import LSMError
from ..files import atomic_write
from ..interfaces import PatchOperator, Views
from ..mixing import MixedBatch

COLUMNS = ("foreground", "saliency", "mask", "background", "mixed")
TILE_MIN = 96  # small images are scaled up (nearest) to at least this side
MIXED_SAMPLES = "mixed_samples.png"


def heat_colours(s: Tensor) -> Tensor:
    """(B, 1, H, W) values in [0, 1] -> (B, 3, H, W) blue-green-red colours."""
    s = s.clamp(0, 1)
    return torch.cat([(1.5 - (4 * s - c).abs()).clamp(0, 1) for c in (3.0, 2.0, 1.0)], dim=1)


def _to_rgb(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    img = (x.detach().float().cpu() * s + m).clamp(0, 1)
    return img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img[:, :3]


def preview_batch(trainer: Trainer, rows: int, epoch: int = 0) -> tuple[MixedBatch, Optional[Tensor], str]:
    """The first ``rows`` pairs of ``epoch``'s first training batch, mixed (the window and coin are not asked).

    The whole batch (``optim.batch_size`` images) is drawn, augmented and mixed with
    the epoch's seed, as the training step does, so with prob 1 and an open window it
    is the batch training sees, and ``rows`` only cuts the picture. Returns the mixed
    rows, the saliency to show and a note for the picture.
    """
    if trainer.mixing is None:
        raise LSMError(f"{trainer.recipe.path}: the recipe has no [mixer] table; preview draws a mixed batch")
    trainer.generator.manual_seed(epoch_seed(trainer.recipe.run.seed, epoch))
    bg, fg = next(iter(trainer.sampler.batches(epoch, trainer.recipe.optim.batch_size)))
    xb, yb, crops_b = trainer.prepare_with_crops(bg)
    views_b = Views(bg.to(trainer.device), crops_b, epoch)
    xf, yf, _, views_f = trainer.foreground(epoch, xb, yb, fg, crops_b, views_b)
    # A provider that observes training has seen nothing here: it scores afresh, without views.
    views = {} if trainer.observing else {"views_f": views_f, "views_b": views_b}
    try:
        batch = trainer.mixing(trainer.module, xb, yb, xf, yf, **views).rows(rows)
        shown, note = batch.saliency_f, ""
        if shown is None and ("saliency", "gradcam") in trainer.registry and trainer.patch is not None:
            cls = trainer.registry.get("saliency", "gradcam")
            shown = cls(cls.Params(), trainer.context)(trainer.module, batch.x_f, batch.y_f, trainer.patch)
            note = "saliency column: Grad-CAM for display only; this mixer does not use saliency"
    except ValueError as exc:
        raise LSMError(f"{trainer.recipe.path}: {exc}") from None
    return batch, shown, note


def render(
    batch: MixedBatch,
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    patch: Optional[PatchOperator],
    saliency: Optional[Tensor] = None,
    note: str = "",
) -> Image.Image:
    """One row per pair: foreground, its saliency, the pasted mask, background, mix, and the two label weights."""
    fg, bg = _to_rgb(batch.x_f, mean, std), _to_rgb(batch.x_b, mean, std)
    mixed = _to_rgb(batch.images, mean, std)
    b, _, h, w = fg.shape
    if saliency is not None and patch is not None:
        sal = 0.45 * fg + 0.55 * heat_colours(patch.expand(saliency.float().cpu()))
    else:
        sal = fg * 0.3
    if batch.unit_mask is not None and patch is not None:
        mask_map = patch.expand(batch.unit_mask.float().cpu())
    else:
        mask_map = batch.mask.float().cpu()
    mask = (0.15 + 0.85 * mask_map).expand(-1, 3, -1, -1)
    scale = max(1, -(-TILE_MIN // max(h, w)))
    tiles = torch.stack([fg, sal, mask, bg, mixed], dim=1).flatten(0, 1)  # row-major: B x 5
    tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    pad, cols = 4, len(COLUMNS)
    tile_h, tile_w = h * scale, w * scale
    font = ImageFont.load_default(size=13)
    caption_h, header_h = 20, 22
    target, yf, yb = batch.target.float().cpu(), batch.y_f.cpu(), batch.y_b.cpu()
    w_f = target.gather(1, yf.view(-1, 1)).squeeze(1)
    w_b = target.gather(1, yb.view(-1, 1)).squeeze(1)
    width = cols * (tile_w + pad) + pad
    footer_h = caption_h if note else 0
    canvas = Image.new("RGB", (width, header_h + b * (tile_h + pad + caption_h) + pad + footer_h), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(COLUMNS):
        text = title + ("*" if title == "saliency" and note else "")
        draw.text((pad + c * (tile_w + pad), 4), text, fill="black", font=font)
    for r in range(b):
        row = make_grid(tiles[r * cols : (r + 1) * cols], nrow=cols, padding=pad, pad_value=0.8)
        arr = (row.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        top = header_h + r * (tile_h + pad + caption_h)
        canvas.paste(Image.fromarray(arr), (0, top - pad))
        f, g = int(yf[r]), int(yb[r])
        if f == g:
            caption = f"fg {class_names[f]} + bg {class_names[g]} (same class): 1.00"
        else:
            caption = f"fg {class_names[f]}: {float(w_f[r]):.2f}    bg {class_names[g]}: {float(w_b[r]):.2f}"
        draw.text((pad, top + tile_h + 2), caption, fill="black", font=font)
    if footer_h:
        draw.text((pad, canvas.height - footer_h), "* " + note, fill="black", font=ImageFont.load_default(size=11))
    return canvas


def draw_mixed_samples(trainer: Trainer, path: Path, rows: int = 8) -> Optional[Path]:
    """The run folder's picture: rows of the last batch the run really mixed; None when it never mixed."""
    batch = trainer.last_mixed
    if batch is None:
        return None
    batch = batch.rows(rows)
    data = trainer.data
    image = render(batch, data.class_names, data.mean, data.std, trainer.patch, batch.saliency_f)
    atomic_write(path, lambda fh: image.save(fh, format="PNG"))
    return path


def save_preview(trainer: Trainer, out: Path, rows: int, epoch: int) -> MixedBatch:
    """``lsm preview``: draw ``preview_batch`` to ``out``."""
    batch, shown, note = preview_batch(trainer, rows, epoch)
    data = trainer.data
    image = render(batch, data.class_names, data.mean, data.std, trainer.patch, shown, note)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out, format="PNG")
    except OSError as exc:
        raise LSMError(f"{out}: cannot write the preview ({exc.strerror or exc})") from None
    return batch
