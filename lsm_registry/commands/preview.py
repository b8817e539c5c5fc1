"""``lsm preview``: draw one mixed batch of a recipe to a PNG.

What a mixer does is easiest to judge by eye: which blocks were taken, from where,
and what label weight they earned. The batch goes through the same Trainer, sampler,
``prepare`` and components as training, so the picture shows what the model would
see, untrained or with a checkpoint's weights.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional

import click
import torch
import torch.nn.functional as F
from torch import Tensor

from ..cli import registry_with_warnings, set_option, user_errors
from ..errors import LSMError

COLUMNS = ("foreground", "saliency", "mask", "background", "mixed")
TILE_MIN = 96  # small images are scaled up (nearest) to at least this side


def heat_colours(s: Tensor) -> Tensor:
    """(B, 1, H, W) values in [0, 1] -> (B, 3, H, W) blue-green-red colours."""
    s = s.clamp(0, 1)
    return torch.cat([(1.5 - (4 * s - c).abs()).clamp(0, 1) for c in (3.0, 2.0, 1.0)], dim=1)


def load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # The engine's own checkpoints also hold numpy RNG state, which the
            # weights-only loader refuses; the user named this file explicitly.
            state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise LSMError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise LSMError(f"{path}: expected a state_dict or a dict with key 'model' (got {type(state).__name__})")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise LSMError(f"{path}: does not fit the recipe's model ({' '.join(first[:2])})") from None


def mixed_preview_batch(trainer: Any, rows: int, epoch: int = 0) -> dict[str, Any]:
    """One mixed batch through the trainer's own components (no mixing coin, no window)."""
    from ..engine import epoch_seed

    if trainer.mixer is None:
        raise LSMError(f"{trainer.recipe.path}: the recipe has no [mixer] table; preview draws a mixed batch")
    if trainer.patch is None:
        raise LSMError(f"{trainer.recipe.path}: the recipe has no [patch] table and no patch operator is registered")
    trainer.generator.manual_seed(epoch_seed(trainer.recipe.run.seed, epoch))
    bg, fg = next(iter(trainer.sampler.batches(epoch, rows)))
    xb, yb = trainer.prepare(bg)
    if fg is None:
        perm = torch.randperm(xb.shape[0], generator=trainer.generator).to(trainer.device)
        xf, yf = xb[perm], yb[perm]
    else:
        xf, yf = trainer.prepare(fg)
    model = getattr(trainer, "module", trainer.model)  # the unwrapped model, as in Trainer.mixed_batch
    try:
        s_f = s_b = None
        if trainer.saliency is not None:
            s_f = trainer.saliency(model, xf, yf, trainer.patch)
            if trainer.fuser.needs_background_saliency:
                s_b = trainer.saliency(model, xb, yb, trainer.patch)
        shown, shown_note = s_f, ""
        if shown is None and ("saliency", "gradcam") in trainer.registry:
            cls = trainer.registry.get("saliency", "gradcam")
            shown = cls(cls.Params(), trainer.context)(model, xf, yf, trainer.patch)
            shown_note = "saliency column: Grad-CAM for display only; this mixer does not use saliency"
        mix = trainer.mixer.mix(xf, xb, s_f, trainer.patch)
        target = trainer.fuser.fuse(mix, yf, yb, s_f, s_b)
    except ValueError as exc:
        raise LSMError(f"{trainer.recipe.path}: {exc}") from None
    return {
        "xf": xf, "yf": yf, "xb": xb, "yb": yb, "saliency": shown, "saliency_note": shown_note,
        "mix": mix, "target": target,
    }


def draw_preview(trainer: Any, path: Path, rows: int = 8) -> Path:
    """The run folder's mixed_samples.png: one mixed batch drawn with the trained model."""
    image = render(mixed_preview_batch(trainer, rows, epoch=max(trainer.recipe.run.epochs - 1, 0)), trainer)
    image.save(path, format="PNG")
    return path


def _to_rgb(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    img = (x.detach().float().cpu() * s + m).clamp(0, 1)
    return img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img[:, :3]


def render(batch: dict[str, Any], trainer: Any) -> "Image.Image":  # noqa: F821
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    data, patch = trainer.data, trainer.patch
    mix = batch["mix"]
    fg, bg = _to_rgb(batch["xf"], data.mean, data.std), _to_rgb(batch["xb"], data.mean, data.std)
    mixed = _to_rgb(mix.images, data.mean, data.std)
    b, _, h, w = fg.shape
    if batch["saliency"] is not None:
        heat = heat_colours(patch.expand(batch["saliency"].float().cpu()))
        sal = 0.45 * fg + 0.55 * heat
    else:
        sal = fg * 0.3
    mask_map = patch.expand(mix.unit_mask.float().cpu()) if mix.unit_mask is not None else mix.weight.float().cpu()
    mask = (0.15 + 0.85 * mask_map).expand(-1, 3, -1, -1)
    scale = max(1, -(-TILE_MIN // max(h, w)))
    tiles = torch.stack([fg, sal, mask, bg, mixed], dim=1).flatten(0, 1)  # row-major: B x 5
    tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    pad, cols = 4, len(COLUMNS)
    tile_h, tile_w = h * scale, w * scale
    font = ImageFont.load_default(size=13)
    caption_h, header_h = 20, 22
    names = data.class_names
    target, yf, yb = batch["target"].float().cpu(), batch["yf"].cpu(), batch["yb"].cpu()
    w_f = target.gather(1, yf.view(-1, 1)).squeeze(1)
    w_b = target.gather(1, yb.view(-1, 1)).squeeze(1)
    width = cols * (tile_w + pad) + pad
    footer_h = caption_h if batch["saliency_note"] else 0
    canvas = Image.new("RGB", (width, header_h + b * (tile_h + pad + caption_h) + pad + footer_h), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(COLUMNS):
        text = title + ("*" if title == "saliency" and batch["saliency_note"] else "")
        draw.text((pad + c * (tile_w + pad), 4), text, fill="black", font=font)
    for r in range(b):
        row = make_grid(tiles[r * cols : (r + 1) * cols], nrow=cols, padding=pad, pad_value=0.8)
        arr = (row.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        top = header_h + r * (tile_h + pad + caption_h)
        canvas.paste(Image.fromarray(arr), (0, top - pad))
        if int(yf[r]) == int(yb[r]):
            caption = f"fg {names[int(yf[r])]} + bg {names[int(yb[r])]} (same class): 1.00"
        else:
            caption = f"fg {names[int(yf[r])]}: {float(w_f[r]):.2f}    bg {names[int(yb[r])]}: {float(w_b[r]):.2f}"
        draw.text((pad, top + tile_h + 2), caption, fill="black", font=font)
    if footer_h:
        draw.text((pad, canvas.height - footer_h), "* " + batch["saliency_note"], fill="black", font=ImageFont.load_default(size=11))
    return canvas


@click.command("preview")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@set_option
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG file to write.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Model weights: a state_dict or a dict with key 'model' (default: untrained).")
@click.option("--rows", type=click.IntRange(1, 64), default=6, show_default=True, help="Image pairs to draw.")
@click.option("--epoch", type=click.IntRange(0, None), default=0, show_default=True, help="Epoch whose first batch is drawn.")
@user_errors
def command(recipe: Path, overrides: tuple[str, ...], out: Path, checkpoint: Optional[Path], rows: int, epoch: int) -> None:
    """Draw one mixed batch of RECIPE: foreground, saliency, mask, background, mixed, label weights."""
    from ..engine import Trainer
    from ..recipe import load_recipe

    registry = registry_with_warnings()
    parsed = load_recipe(recipe, list(overrides), registry)
    trainer = Trainer(parsed, registry, progress=False)
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise LSMError(f"{checkpoint}: no such checkpoint file")
        load_checkpoint(getattr(trainer, "module", trainer.model), checkpoint)
    batch = mixed_preview_batch(trainer, rows, epoch)
    image = render(batch, trainer)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out, format="PNG")
    except OSError as exc:
        raise LSMError(f"{out}: cannot write the preview ({exc.strerror or exc})") from None
    click.echo(f"wrote {out} ({len(batch['yf'])} rows, mixer {parsed.mixer.name}, label fuser {parsed.label_fuser.name})")
