"""How fast the file-backed training loader decodes, and how well it hides behind a step.

Generates its own JPEG tree (``--images`` files, long side 300-500 px, aspect 3:4 to
4:3, smooth shapes plus noise so the files compress like photographs, quality 90) and
an ImageNet-LT-style split file, then measures the engine's own path for file-backed
sets (``FileSplit`` and ``PlannedLoader``, training view: RandomResizedCrop + flip):

1. per-image cost, single-threaded: a plain ``Image.open(f).convert("RGB")`` of the
   files (the baseline: decoding alone, nothing less is possible) against the training
   view of the same files, taking turns on chunks of 25 files (the cost: the median
   over chunks of the view's time over the baseline's), so drifting load hits both alike;
2. loader images/s at each ``--workers`` count (after ``--warmup`` batches);
3. overlap: a stand-in for a GPU step that only sleeps T ms per batch, for T from a
   quarter of the loader's time per batch L (measured alone) to twice it; the overlap
   ratio is the loader-fed time over ``max(T, L') x batches``, L' the loader's own time
   per batch in that same pass (1.0: loading fully hidden, or the loader itself the
   bottleneck and never idle). The ratio against L is printed beside it.

    python -m bench.loader --images 3000 --batch-size 32 --batches 50
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import v2

from lsm_registry.data.prefetch import PlannedLoader, plan_epoch
from lsm_registry.data.split_files import PRIORITIES, FileSplit
from lsm_registry.data.transforms import RATIO, SCALE, train_view

FRACTIONS = (0.25, 0.5, 1.0, 1.5, 2.0)  # T as a fraction of the loader's time per batch


def make_tree(root: Path, n: int, classes: int = 100, seed: int = 0) -> list[str]:
    """The tree's relative paths; files already there (same count) are kept."""
    listing = root / "train.txt"
    if listing.is_file() and len(listing.read_text().splitlines()) == n:
        return [line.rsplit(None, 1)[0] for line in listing.read_text().splitlines()]
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        long_side = int(rng.integers(300, 501))
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        w, h = (long_side, int(long_side / aspect)) if aspect >= 1 else (int(long_side * aspect), long_side)
        y = np.linspace(0, 1, h)[:, None, None]
        x = np.linspace(0, 1, w)[None, :, None]
        base = rng.uniform(0, 255, 3) * (1 - y) + rng.uniform(0, 255, 3) * x
        img = Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
            draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        rel = f"train/c{i % classes:03d}/{i:06d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel, quality=90)
        lines.append(f"{rel} {i % classes}")
    listing.write_text("\n".join(lines) + "\n")
    return [line.rsplit(None, 1)[0] for line in lines]


def per_image_costs(paths: list[str], size: int, rounds: int, chunk: int = 25) -> tuple[float, float, float]:
    """(baseline ms, training view ms, view / baseline) per image, one thread.

    The two take turns on the same ``chunk`` files (which goes first alternates), and the
    cost figure is the median over all chunks and rounds of the view's time over the
    baseline's on the same chunk, measured a few milliseconds apart: the speed of this
    VM drifts by 10-20 % within a minute, which a ratio of whole-round times turned into
    noise of +-0.1. Each still runs a block of files, as a worker does (alternating file
    by file puts PIL's and torchvision's decoders in each other's caches and slows the
    view by a fifth). A first pass, not timed, warms the page cache."""
    crop = v2.RandomResizedCrop(size, scale=SCALE, ratio=RATIO, antialias=True)  # built once, as FileSplit does
    for p in paths:
        Image.open(p).convert("RGB")
        train_view(p, size, crop)
    base, view, ratio = 0.0, 0.0, []
    clock = time.perf_counter
    for r in range(rounds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(r)
            for k in range(0, len(paths), chunk):
                part = paths[k : k + chunk]
                took = {}
                for which in ("view", "base") if (k // chunk + r) % 2 else ("base", "view"):
                    t = clock()
                    for p in part:
                        if which == "base":
                            Image.open(p).convert("RGB")
                        else:
                            train_view(p, size, crop)
                    took[which] = clock() - t
                base, view = base + took["base"], view + took["view"]
                ratio.append(took["view"] / took["base"])
    n = rounds * len(paths)
    return base / n * 1e3, view / n * 1e3, statistics.median(ratio)


def epoch_plan(n: int, batch_size: int, steps: int, seed: int):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    batches = [(order[(s * batch_size) % (n - batch_size) :][:batch_size], None) for s in range(steps)]
    seeds = torch.randint(0, 2**62, (steps, 2), generator=torch.Generator().manual_seed(seed + 1))
    return plan_epoch(batches, [False] * steps, seeds)


def timed_pass(
    loader: PlannedLoader, plan, warmup: int, step_s: float, device: torch.device
) -> tuple[float, float, float]:
    """(seconds for the batches after ``warmup``, seconds the stand-in steps really slept in
    them, the loader's own time per batch in them).

    The loader's own time per batch is its busiest worker's decoding time inside the timed
    window (the decode intervals the workers report, clipped to the window), over the
    number of batches: what the loader needed in this very pass, so a drift of the
    machine's speed between passes counts neither as good nor as bad overlap. On a busy
    machine a sleep overruns by the scheduler's latency; the second figure lets the ratio
    be taken against the step as it really ran, too.
    """
    t0, slept = 0.0, 0.0
    spans: list[tuple[int, float, float]] = []
    for k, loaded in enumerate(loader.run(plan)):
        if k == warmup:
            t0, slept = time.perf_counter(), 0.0
        spans.append((loaded.worker, *loaded.decoded))
        images = loaded.bg[0]
        if device.type == "cuda":
            images.to(device, non_blocking=True)
        if step_s > 0:
            ts = time.perf_counter()
            time.sleep(step_s)
            slept += time.perf_counter() - ts
    t1 = time.perf_counter()
    busy: dict[int, float] = {}
    for worker, start, end in spans:
        busy[worker] = busy.get(worker, 0.0) + max(0.0, min(end, t1) - max(start, t0))
    return t1 - t0, slept, max(busy.values()) / (len(plan) - warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tree", default=".bench/loader-tree", help="where the generated JPEG tree lives (kept between runs)"
    )
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=60, help="timed batches per measurement (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument(
        "--prefetch", type=int, default=2, help="steps decoded ahead per worker (the data sets' `prefetch`, default 2)"
    )
    ap.add_argument(
        "--worker-priority",
        default="normal",
        choices=PRIORITIES,
        help="the data sets' `worker_priority` (idle: Linux SCHED_IDLE)",
    )
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--baseline-images", type=int, default=300, help="files in the single-threaded cost comparison")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to also pin and copy each batch to the GPU")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    root = Path(args.tree)
    t = time.perf_counter()
    rel = make_tree(root, args.images)
    made = time.perf_counter() - t
    paths = [str(root / r) for r in rel]
    workers = [int(w) for w in args.workers.split(",")]
    command = "python -m bench.loader " + " ".join(sys.argv[1:])
    print(
        f"# loader, {datetime.date.today()}: {platform.node()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, device {device}"
    )
    print(
        f"# {len(paths)} JPEGs (long side 300-500 px; tree ready in {made:.0f} s), batch {args.batch_size}, "
        f"crop {args.size}, prefetch {args.prefetch}, worker priority {args.worker_priority}, {args.batches} timed batches after {args.warmup} warm-up"
    )
    print(f"# command: {command}\n")

    base_ms, view_ms, cost = per_image_costs(paths[: args.baseline_images], args.size, args.rounds)
    print(
        f"per image, one thread ({args.baseline_images} files, {args.rounds} rounds, the two taking turns on chunks of 25 files):"
    )
    print(f"  Image.open(f).convert('RGB')          {base_ms:6.2f} ms")
    print(
        f"  training view (RRC {args.size} + flip)      {view_ms:6.2f} ms   {cost:.2f}x the baseline "
        f"(median over the chunks of the view's time / the baseline's)\n"
    )

    labels = torch.zeros(len(paths), dtype=torch.int64)
    # the split's own `workers` serves only its test view; each PlannedLoader below gets its count
    split = FileSplit(Path("."), paths, labels, args.size, workers=1, worker_priority=args.worker_priority)
    steps = args.warmup + args.batches
    per_batch: dict[int, float] = {}
    print("loader alone:")
    for w in workers:
        loader = PlannedLoader(split, w, prefetch=args.prefetch, pin_memory=device.type == "cuda", views=True)
        elapsed, _, _ = timed_pass(
            loader, epoch_plan(len(paths), args.batch_size, steps, seed=w), args.warmup, 0.0, device
        )
        loader.close()
        per_batch[w] = elapsed / args.batches
        print(
            f"  {w} worker(s): {args.batches * args.batch_size / elapsed:7.1f} images/s   {per_batch[w] * 1e3:7.1f} ms per batch"
        )

    print("\noverlap with a stand-in step sleeping T ms per batch, T a fraction of the loader's time per batch L")
    print("measured alone just before: ratio = fed time / (max(T, L') x batches) with L' the loader's own time per")
    print("batch in the same pass (its busiest worker); ratio(L) takes L instead, ratio* takes the step's measured")
    print("duration, sleep overrun included, for T:")
    worst, worst_alone, worst_real = 0.0, 0.0, 0.0
    by_workers: dict[int, float] = {}
    for w in [w for w in workers if w >= 1]:
        loader = PlannedLoader(split, w, prefetch=args.prefetch, pin_memory=device.type == "cuda", views=True)
        # L again, right before the series, with these workers warm
        lat = (
            timed_pass(loader, epoch_plan(len(paths), args.batch_size, steps, seed=100 + w), args.warmup, 0.0, device)[
                0
            ]
            / args.batches
        )
        for f in FRACTIONS:
            step_s = f * lat
            fed, slept, own = timed_pass(
                loader,
                epoch_plan(len(paths), args.batch_size, steps, seed=int(f * 100) + w),
                args.warmup,
                step_s,
                device,
            )
            ideal = max(step_s, own) * args.batches
            ratio = fed / ideal
            alone = fed / (max(step_s, lat) * args.batches)
            real = fed / (max(slept / args.batches, own) * args.batches)
            worst, worst_alone, worst_real = max(worst, ratio), max(worst_alone, alone), max(worst_real, real)
            by_workers[w] = max(by_workers.get(w, 0.0), ratio)
            print(
                f"  {w} worker(s), L {lat * 1e3:6.1f} ms, T {step_s * 1e3:6.1f} ms ({f:.2f} L, ran {slept / args.batches * 1e3:6.1f}), "
                f"L' {own * 1e3:6.1f} ms: fed {fed:6.2f} s, ideal {ideal:6.2f} s, ratio {ratio:.3f}, ratio(L) {alone:.3f}, ratio* {real:.3f}"
            )
        loader.close()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    print(
        "worst overlap ratio per worker count: "
        + (", ".join(f"{w}: {r:.3f}" for w, r in by_workers.items()) or "none (no count >= 1 in --workers)")
    )
    cost_ok = cost <= 1.3
    verdicts = [
        f"{w} worker(s){' (as many as the cores: the training process has none of its own)' if w >= cores else ''} "
        f"worst {r:.3f}: {'met' if r <= 1.05 else 'missed'}"
        for w, r in by_workers.items()
    ]
    overlap = (
        "; ".join(verdicts) + f"; ratio(L) worst {worst_alone:.3f}, ratio* worst {worst_real:.3f}"
        if by_workers
        else "not measured: --workers has no count >= 1"
    )
    print(
        f"\ntargets: overlap ratio <= 1.05 at every T ({overlap}); "
        f"per-image cost <= 1.3x the baseline ({cost:.2f}x: {'met' if cost_ok else 'missed'})"
    )


if __name__ == "__main__":
    main()
