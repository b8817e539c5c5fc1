"""What LSM adds to a training step: CE vs CE + LSM (fresh and cached Grad-CAM) vs CE + CMO (a CutMix-style mix) vs CE + Remix, and what the paper's multi-branch rows cost: BBN, RIDE (3 experts), SupCon.

Every variant is a real ``Trainer`` built from a recipe (ResNet-32, 32x32 images,
100 classes) and steps through ``Trainer.train_step``, the engine's own code path
(fetch, augment, mix, forward, backward, SGD). Variants are timed interleaved, one
step each per round, so that drift in the machine's load hits them alike; the
figures are medians over rounds. The LSM steps are also taken apart stage by stage.
"CE + LSM (cached)" uses the ``cached-gradcam`` provider on a warm cache: one unmixed
pass over the whole pool stores every image's map first (what the unmixed steps of a
run do), then its mixed steps are timed like the others.
A step samples the same ``--batch-size`` images for every variant; BBN forwards a
second (reversed) batch of that size with it and SupCon two views of each image, so
their steps process twice the images: the ratio to CE is what a step of the method
costs, not a per-image rate.

    python -m bench.step_cost --device cuda --repeats 30
    python -m bench.step_cost --device cpu --repeats 3 --warmup 1
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch


def recipe_for(variant: str, device: str, batch_size: int, channels_last: bool, n_max: int) -> Any:
    from lsm_registry.recipe import validate

    raw: dict[str, Any] = {
        "run": {"epochs": 1, "device": device, "channels_last": channels_last, "seed": 0},
        # 100 classes as CIFAR-100-LT; the image count only sets how often the pool repeats.
        "data": {
            "name": "synthetic-lt",
            "num_classes": 100,
            "n_max": n_max,
            "imbalance_factor": 10.0,
            "test_per_class": 1,
        },
        "model": {"name": "resnet32"},
        "optim": {"batch_size": batch_size, "warmup_epochs": 0},
        "loss": {"name": "ce"},
    }
    if variant in ("CE + LSM", "CE + LSM (cached)"):
        raw["sampler"] = {"name": "dual-branch", "gamma": 1.0}
        raw["saliency"] = {"name": "gradcam" if variant == "CE + LSM" else "cached-gradcam"}
        raw["mixer"] = {"name": "lsm", "prob": 1.0, "start_epoch": 0, "end_epoch": 1_000_000}
        raw["label_fuser"] = {"name": "saliency"}
    elif variant == "CE + CMO":
        # CMO: a CutMix box from the rebalanced branch on an instance-branch image.
        raw["sampler"] = {"name": "dual-branch", "gamma": 1.0}
        raw["mixer"] = {"name": "cmo", "prob": 1.0, "start_epoch": 0, "end_epoch": 1_000_000}
        raw["label_fuser"] = {"name": "area"}
    elif variant == "BBN":
        raw["model"] = {"name": "bbn"}
        raw["sampler"] = {"name": "reversed"}
    elif variant == "RIDE (3E)":
        raw["model"] = {"name": "ride", "num_experts": 3}
        raw["loss"] = {"name": "ride"}
    elif variant == "SupCon":
        raw["model"] = {"name": "resnet32", "projection_dim": 128}
        raw["loss"] = {"name": "supcon"}
    elif variant == "CE + Remix":
        # Remix: mixup on a permutation of the batch, with the Remix label rule.
        raw["mixer"] = {"name": "mixup", "prob": 1.0}
        raw["label_fuser"] = {"name": "remix"}
    return validate(raw, f"<bench {variant}>")


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


def batch_stream(trainer: Any, batch_size: int):
    """Full batches as the engine draws them (``Trainer.sampled``: a contrastive loss's views repeated)."""
    epoch, rows = 0, batch_size * trainer.loss.views_per_image
    while True:
        for bg, fg in trainer.sampled(epoch, batch_size):
            if bg.numel() == rows:
                yield bg, fg
        epoch += 1


def warm_cache(trainer: Any, batch_size: int) -> None:
    """Store every pool image's map, as the unmixed steps of a run would (train mode, batch norm untouched)."""
    from lsm_registry.interfaces import Views

    n = len(trainer.data.train)
    with trainer.held_batch_norm(), torch.no_grad():
        trainer.module.train()
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            x, y, crops = trainer.prepare_with_crops(idx)
            feats = trainer.module.forward_features(x)
            trainer.saliency.observe(trainer.module, feats, y, Views(idx.to(trainer.device), crops, 0))


def lsm_breakdown(trainer: Any, bg: torch.Tensor, fg: torch.Tensor, clock: Clock) -> dict[str, float]:
    """The stages of Trainer.mixed_batch + train_step, each timed on its own."""
    from lsm_registry.interfaces import Views

    times: dict[str, float] = {}
    times["fetch + augment (2 batches)"], ((xb, yb, _), (xf, yf, crops_f)) = clock.time(
        lambda: (trainer.prepare_with_crops(bg), trainer.prepare_with_crops(fg))
    )
    if trainer.observing:
        views = Views(fg.to(trainer.device), crops_f, 0)
        times["saliency (cached maps)"], s_f = clock.time(
            lambda: trainer.saliency.scores_of_views(trainer.module, xf, yf, trainer.patch, views)
        )
    else:
        times["saliency forward"], s_f = clock.time(lambda: trainer.saliency(trainer.module, xf, yf, trainer.patch))
    mixer = trainer.mixer
    times["mask"], mask = clock.time(lambda: mixer.select(s_f))
    mixer.select = lambda scores: mask  # time the mix alone, with the mask just drawn
    try:
        times["mix"], mix = clock.time(lambda: mixer.mix(xf, xb, s_f, trainer.patch))
    finally:
        del mixer.select
    times["fuse"], target = clock.time(lambda: trainer.fuser.fuse(mix, yf, yb, s_f, None))

    def learn() -> None:
        x = mix.images.contiguous(memory_format=trainer.memory_format)
        trainer.module.train()
        loss = trainer.loss(trainer.module(x).float(), target)
        trainer.optimizer.base.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.base.step()

    times["forward + backward + SGD"], _ = clock.time(learn)
    return times


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 30 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 5 on CUDA, 1 on CPU)")
    ap.add_argument(
        "--no-channels-last", action="store_true", help="contiguous (NCHW) tensors instead of channels_last"
    )
    ap.add_argument("--n-max", type=int, default=12, help="images of the largest synthetic class (pool size only)")
    args = ap.parse_args(argv)

    from lsm_registry.engine import StepStats, Trainer
    from lsm_registry.plugins import default_registry

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    repeats = args.repeats if args.repeats is not None else (30 if on_cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    registry = default_registry()
    variants = ["CE", "CE + LSM", "CE + LSM (cached)", "CE + CMO", "CE + Remix", "BBN", "RIDE (3E)", "SupCon"]
    notes = []
    optional = (
        ("CE + CMO", ("mixer", "cmo")),
        ("CE + Remix", ("label_fuser", "remix")),
        ("BBN", ("model", "bbn")),
        ("RIDE (3E)", ("model", "ride")),
        ("SupCon", ("loss", "supcon")),
    )
    for variant, key in optional:
        if key not in registry:
            variants.remove(variant)
            notes.append(f"{variant} skipped: no {key[0]} {key[1]!r} is registered")
    clock = Clock(device)
    trainers, streams = {}, {}
    for v in variants:
        trainers[v] = Trainer(
            recipe_for(v, args.device, args.batch_size, not args.no_channels_last, args.n_max), registry
        )
        streams[v] = batch_stream(trainers[v], args.batch_size)
    warm_cache(trainers["CE + LSM (cached)"], args.batch_size)
    step_times: dict[str, list[float]] = {v: [] for v in variants}
    peak: dict[str, int] = {v: 0 for v in variants}
    breakdowns: dict[str, list[dict[str, float]]] = {"CE + LSM": [], "CE + LSM (cached)": []}
    for r in range(warmup + repeats):
        for v in variants:
            tr = trainers[v]
            bg, fg = next(streams[v])
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(device)
            dt, _ = clock.time(lambda tr=tr, bg=bg, fg=fg: tr.train_step(0, bg, fg, StepStats.zeros(tr.device)))
            if on_cuda:
                peak[v] = max(peak[v], torch.cuda.max_memory_allocated(device))
            if r >= warmup:
                step_times[v].append(dt)
        if r >= warmup:
            for v, kept in breakdowns.items():
                bg, fg = next(streams[v])
                kept.append(lsm_breakdown(trainers[v], bg, fg, clock))

    when = datetime.date.today().isoformat()
    print(
        f"# step cost, {when}: {platform.node() or 'host'}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if on_cuda else f" ({torch.get_num_threads()} threads)")
        + f", torch {torch.__version__}"
    )
    print(
        f"# ResNet-32, 32x32x3, 100 classes, batch {args.batch_size}, channels_last {not args.no_channels_last}, "
        f"{repeats} rounds after {warmup} warm-up, medians"
    )
    print(f"# command: python -m bench.step_cost {' '.join(sys.argv[1:])}")
    ce = statistics.median(step_times["CE"])
    print()
    # Medians are the figures; minima are printed beside them because on a shared
    # machine the noise only ever adds time, so the minimum is the least disturbed round.
    ce_min = min(step_times["CE"])
    print(f"{'variant':<18} {'median ms':>10} {'/ CE':>6} {'min ms':>10} {'/ CE':>6} {'peak memory':>14}")
    for v in variants:
        med, low = statistics.median(step_times[v]), min(step_times[v])
        mem = f"{peak[v] / 2**20:.0f} MiB" if on_cuda else "n/a"
        print(f"{v:<18} {1000 * med:10.1f} {med / ce:6.2f} {1000 * low:10.1f} {low / ce_min:6.2f} {mem:>14}")
    if not on_cuda:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"(CPU: per-variant peak memory n/a; process peak RSS {rss:.0f} MiB)")
    shares: dict[str, float] = {}
    for v, kept in breakdowns.items():
        stages = {k: statistics.median(b[k] for b in kept) for k in kept[0]}
        total = sum(stages.values())
        print()
        print(
            f"{v} step, stage by stage (medians, sum {1000 * total:.1f} ms; whole step {1000 * statistics.median(step_times[v]):.1f} ms):"
        )
        for k, t in stages.items():
            print(f"  {k:<28} {1000 * t:9.2f} ms  {100 * t / total:5.1f} %")
        overhead = stages["mask"] + stages["mix"] + stages["fuse"]
        print(
            f"  mask + mix + fuse (LSM's own work, no saliency): {1000 * overhead:.2f} ms = {100 * overhead / total:.2f} % of the step"
        )
        shares[v] = overhead / total
        if v == "CE + LSM (cached)":
            shares["cached saliency"] = stages["saliency (cached maps)"] / total
    cached = trainers["CE + LSM (cached)"].saliency
    per_image = (
        cached.maps[0].numel() * cached.maps.element_size() + cached.boxes[0].numel() * 4 + cached.stamps.element_size()
    )
    print(
        f"  cache: {per_image} bytes per training image ({tuple(cached.maps.shape[1:])} float16 map, its box, its epoch)"
    )
    ratio = statistics.median(step_times["CE + LSM"]) / ce
    cached_ratio = statistics.median(step_times["CE + LSM (cached)"]) / ce
    print()
    print(
        f"targets: LSM/CE {ratio:.2f} (<= 1.35: {'met' if ratio <= 1.35 else 'NOT met'}); "
        f"mask + mix + fuse {100 * shares['CE + LSM']:.2f} % (< 5 %: {'met' if shares['CE + LSM'] < 0.05 else 'NOT met'}); "
        f"cached LSM/CE {cached_ratio:.2f} (<= 1.05: {'met' if cached_ratio <= 1.05 else 'NOT met'}); "
        f"cached saliency {100 * shares['cached saliency']:.2f} % of the step (<= 5 %: {'met' if shares['cached saliency'] <= 0.05 else 'NOT met'})"
    )
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
