"""How much of what LSM pastes is padding: fresh Grad-CAM with and without ``mask_padding``.

    python -m bench.padding_share                      # the quick start, model after 4 epochs
    python -m bench.padding_share --epochs 10 --batches 40

Trains the CE quick start (recipes/quickstart.toml) for ``--epochs`` epochs (the point
where the LSM quick start starts mixing is epoch 4), then draws ``--batches`` training
batches as the LSM quick start's step does (class-balanced foregrounds, crop32 views) and
mixes each with fresh Grad-CAM, once per ``mask_padding`` value, and with random scores
(what pasting blocks blind to the image would hit). For each it reports
the share of the pasted pixels that are not image (the zero padding of the foreground's
crop) and the mean label weight the ``saliency`` rule gave the foreground. Without the
mask, Grad-CAM of an early model can find the padding's sharp edge salient, and LSM then
pastes blocks of nothing with a high tail weight.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.store import ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="CE epochs before measuring (default 4)")
    parser.add_argument("--batches", type=int, default=20, help="mixed batches measured (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from lsm_registry.components.saliency import GradCAM, RandomSaliency, image_pixels
    from lsm_registry.engine import Trainer
    from lsm_registry.interfaces import Views
    from lsm_registry.mixing import MixingStep
    from lsm_registry.plugins import default_registry
    from lsm_registry.recipe import load_recipe

    registry = default_registry()
    with tempfile.TemporaryDirectory() as tmp:
        ce = load_recipe(
            ROOT / "recipes" / "quickstart.toml",
            [f"run.epochs={args.epochs}", f"run.seed={args.seed}", "run.score_train=false"],
            registry,
        )
        trainer = Trainer(ce, registry, run_dir=Path(tmp) / "ce")
        trainer.fit()
        lsm = load_recipe(ROOT / "recipes" / "quickstart_lsm.toml", [f"run.seed={args.seed}"], registry)
        mixer = Trainer(lsm, registry)  # the LSM step's sampler, mixer, patch and fuser
        model = trainer.module
        rows = {}
        providers = {
            "gradcam, mask_padding = false": GradCAM(GradCAM.Params(mask_padding=False), mixer.context),
            "gradcam, mask_padding = true": GradCAM(GradCAM.Params(mask_padding=True), mixer.context),
            "random scores (chance)": RandomSaliency(RandomSaliency.Params(), mixer.context),
        }
        for label, provider in providers.items():
            step = MixingStep(mixer.mixer, mixer.fuser, mixer.patch, provider)
            mixer.generator.manual_seed(args.seed)
            padded = pasted = weight = 0.0
            batches = iter(mixer.sampler.batches(0, lsm.optim.batch_size))
            for _ in range(args.batches):
                bg, fg = next(batches)
                xb, yb, crops_b = mixer.prepare_with_crops(bg)
                xf, yf, crops_f = mixer.prepare_with_crops(fg)
                views_f = Views(fg, crops_f, 0)
                mixed = step(model, xb, yb, xf, yf, views_f=views_f, views_b=Views(bg, crops_b, 0))
                valid = image_pixels(crops_f, xf.shape[-2], xf.shape[-1], xf.device).unsqueeze(1)
                paste = mixed.mask.float()
                padded += float((paste * ~valid).sum())
                pasted += float(paste.sum())
                weight += float(mixed.lam.mean())
            rows[label] = (padded / max(pasted, 1e-9), weight / args.batches)
    print(
        f"quick start, CE model after {args.epochs} epochs (seed {args.seed}), {args.batches} batches of "
        f"{lsm.optim.batch_size}, fresh Grad-CAM, 4x4 blocks, saliency labels\n"
    )
    print("| saliency | pasted pixels that are padding | mean foreground label weight |")
    print("|---|---:|---:|")
    for label, (share, lam) in rows.items():
        print(f"| {label} | {100 * share:.1f} % | {lam:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
