"""How close cached-gradcam's maps are to a fresh Grad-CAM of the same augmented images.

    python -m bench.saliency_fidelity --epochs 8 --images 1024
    python -m bench.saliency_fidelity --epochs 8 --images 1024 --set loss.name=ldam   # LDAM's normalised head

Trains a recipe with the ``cached-gradcam`` provider through the engine (maps are
stored from the unmixed steps, as in any run), then draws a new augmentation of
``--images`` training images, the view a foreground would get in the next epoch,
and compares, image by image, the unit scores cached-gradcam gives that view with
those of a fresh ``gradcam`` (eval mode, current weights) on the same pixels:
Spearman's rho over the units and the top-k overlap with k = half the units
(chance: 0.5). Rows by map age (epochs since the map was stored; 1 = stored in the
last epoch trained), for both ``uncovered`` fills, and one row that isolates the
batch-statistics effect: the closed-form map of a train-mode forward of the same
view with the current weights (no storing, no warp, no age).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path
from typing import Optional

import attrs
import torch

from bench.store import ROOT
from lsm_registry.components.cached_saliency import class_activation_of, unit_agreement
from lsm_registry.components.saliency import normalise_to_units
from lsm_registry.engine import Trainer
from lsm_registry.interfaces import Views  # noqa: E402
from lsm_registry.plugins import default_registry  # noqa: E402
from lsm_registry.recipe import load_recipe  # noqa: E402


def row(name: str, rho: torch.Tensor, overlap: torch.Tensor) -> str:
    if rho.numel() == 0:
        return f"| {name} | 0 | — | — |"
    return f"| {name} | {rho.numel()} | {rho.mean():.3f} | {overlap.mean():.3f} (min {overlap.min():.2f}) |"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "synthetic_lt" / "lsm_ce_cached.toml")
    ap.add_argument(
        "--epochs", type=int, default=8, help="epochs trained before the comparison (mixing from epoch 2 on)"
    )
    ap.add_argument("--images", type=int, default=1024, help="training images compared")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    # Mixing from epoch 2 to the end (the 40-epoch recipe's window would be empty or short
    # at --epochs 8): the last epochs are what a run's steady state looks like.
    overrides = [
        f"run.epochs={args.epochs}",
        "run.device=cpu",
        "mixer.start_epoch=2",
        "mixer.end_epoch=1000000",
        *args.overrides,
    ]
    recipe = load_recipe(args.recipe, overrides)
    registry = default_registry()
    trainer = Trainer(recipe, registry)
    if not trainer.observing:
        raise SystemExit(
            f"{args.recipe}: [saliency] is {recipe.saliency.name if recipe.saliency else None!r}, not an observing provider"
        )
    summary = trainer.fit()
    provider, model, patch = trainer.saliency, trainer.module, trainer.patch

    gen = torch.Generator().manual_seed(1234)
    n = min(args.images, len(trainer.data.train))
    idx = torch.randperm(len(trainer.data.train), generator=gen)[:n]
    trainer.generator.manual_seed(4321)  # the new view's crops and flips
    x, y, crops = trainer.prepare_with_crops(idx)
    views = Views(idx.to(trainer.device), crops, args.epochs)
    height, width = x.shape[-2:]

    fresh = provider.fresh(model, x, y, patch)
    stamps = provider.stamps[views.indices]
    age = args.epochs - stamps
    seen = stamps >= 0

    lines = [
        f"# saliency fidelity, {datetime.date.today().isoformat()}: {platform.node() or 'host'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        f"# command: python -m bench.saliency_fidelity {' '.join(sys.argv[1:])}",
        f"# recipe {args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe}, "
        f"{args.epochs} epochs (top-1 {100 * summary['top1']:.1f}), {n} training images, "
        f"{patch.grid(height, width)[0] * patch.grid(height, width)[1]} units (k = half), "
        f"head {type(model.classifier).__name__}; {int((~seen).sum())} images had no map",
        "",
    ]
    lines += ["| maps compared with fresh Grad-CAM | images | Spearman rho | top-k overlap |", "|---|---:|---:|---:|"]
    with trainer.held_batch_norm(), torch.no_grad():
        model.train()
        cam = class_activation_of(model, model.forward_features(x), y)
        model.eval()
    rho, overlap = unit_agreement(normalise_to_units(cam, height, width, patch), fresh)
    lines.append(row("same view, train-mode forward (batch statistics only)", rho, overlap))
    # The view change alone: a fresh (eval-mode, current weights) map of another view of each
    # image, stored and warped onto this view as the cache would.
    scratch = type(provider)(provider.params, provider.context)
    trainer.generator.manual_seed(8765)
    x_a, y_a, crops_a = trainer.prepare_with_crops(idx)
    model.eval()
    scratch.store(provider.fresh.class_activation(model, x_a, y_a), Views(views.indices, crops_a, args.epochs))
    for fill in ("mean", "zero"):
        scratch.params = attrs.evolve(scratch.params, uncovered=fill)
        raw, _ = scratch.stored_activation(views, height, width)
        rho, overlap = unit_agreement(normalise_to_units(raw, height, width, patch), fresh)
        lines.append(row(f"another view, fresh map warped (view change only), uncovered={fill}", rho, overlap))
    for fill in ("mean", "zero"):
        provider.params = attrs.evolve(provider.params, uncovered=fill)
        raw, covered = provider.stored_activation(views, height, width)
        cached = normalise_to_units(raw, height, width, patch)
        rho, overlap = unit_agreement(cached, fresh)
        full = covered.flatten(1).all(dim=1)
        for label, keep in (
            (f"age 1 (stored last epoch), uncovered={fill}", seen & (age <= 1)),
            (f"age 2, uncovered={fill}", seen & (age == 2)),
            (f"age 3+, uncovered={fill}", seen & (age >= 3)),
            (f"age <= 2 (max_age 2), uncovered={fill}", seen & (age <= 2)),
        ):
            lines.append(row(label, rho[keep], overlap[keep]))
        if fill == "mean":
            lines.append(
                row(
                    "age <= 2, view fully covered by the stored box",
                    rho[seen & (age <= 2) & full],
                    overlap[seen & (age <= 2) & full],
                )
            )
            lines.append(
                row(
                    "age <= 2, view partly uncovered",
                    rho[seen & (age <= 2) & ~full],
                    overlap[seen & (age <= 2) & ~full],
                )
            )
    chance = unit_agreement(torch.rand(fresh.shape, generator=gen), fresh)
    lines.append(row("random scores (chance)", *chance))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
