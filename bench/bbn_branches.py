"""Which of BBN's two branches decides each class: per-class accuracy of a trained ``bbn`` run
scored three ways, on its training and test splits.

    python -m bench.bbn_branches RUN_DIR             # the run's best checkpoint
    python -m bench.bbn_branches RUN_DIR --checkpoint RUN_DIR/checkpoints/epoch-0100.pt

BBN's test-time logits are a sum, ``W_c f_c(x) + W_r f_r(x) + b``: the conventional
branch's features through its half of the classifier, plus the re-balancing branch's
through the other half. Scoring each term alone (with the bias) says whether a class the
model misses is lost in the conventional branch, which the instance sampler feeds, or
overruled by the re-balancing branch, which the reversed sampler feeds. The training split
is scored with the test-time view, as the engine's ``train_top1`` is; the logits are the
model's own (a loss's test-time adjustment, as logit adjustment's, is not applied).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder of model bbn")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the run's best checkpoint")
    args = parser.parse_args(argv)

    from lsm_registry.components.bbn import BilateralBranchNet
    from lsm_registry.data.augment import eval_view_batches, stats_tensor
    from lsm_registry.engine import build_data
    from lsm_registry.plugins import default_registry
    from lsm_registry.runfolder.evaluate import load_trained

    registry = default_registry()
    trained = load_trained(args.run_dir, registry, args.checkpoint)
    model = trained.module
    if not isinstance(model, BilateralBranchNet):
        parser.error(f"{args.run_dir}: model {trained.recipe.model.name!r}, not bbn")
    data = build_data(trained.recipe, registry)
    device = trained.device
    mean, std = stats_tensor(tuple(data.mean), device), stats_tensor(tuple(data.std), device)
    names, counts = data.class_names, data.class_counts()
    print(f"{args.run_dir} ({trained.checkpoint.name}, epoch {trained.epoch})")
    print("classes (training images): " + ", ".join(f"{n} ({c})" for n, c in zip(names, counts)))
    for split_name, split in (("train", data.train), ("test", data.test)):
        predictions: dict[str, list[Tensor]] = {}
        labels = []
        for idx, x in eval_view_batches(split, torch.arange(len(split.labels)), device, mean, std):
            with torch.no_grad():
                conventional, rebalancing = model.branch_logits(x)
                both = model(x)
            for part, logits in (("both", both), ("conventional", conventional), ("rebalancing", rebalancing)):
                predictions.setdefault(part, []).append(logits.argmax(dim=1).cpu())
            labels.append(split.labels[idx].cpu())
        y = torch.cat(labels)
        for part, chunks in predictions.items():
            pred = torch.cat(chunks)
            per_class = [float((pred[y == c] == c).float().mean()) * 100 for c in range(len(names))]
            top1 = float((pred == y).float().mean()) * 100
            print(f"{split_name:5} {part:12} top-1 {top1:5.1f}  per class " + " ".join(f"{a:3.0f}" for a in per_class))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
