"""File-backed sets: the standard views, the planned prefetching loader and resume through it.

Everything runs on tiny JPEG trees and split files generated here.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from PIL import Image
from test_resume import ENV, TRIPWIRE_LSM
from torchvision.transforms import v2

from lsm_registry.components.datasets import ImageFolderLT, ImageNetLT
from lsm_registry.data import transforms
from lsm_registry.data.augment import augment, augment_with_crops
from lsm_registry.data.prefetch import PlannedLoader, plan_epoch
from lsm_registry.data.split_files import FileSplit
from lsm_registry.engine import Trainer
from lsm_registry.errors import DataError
from lsm_registry.interfaces import Context
from lsm_registry.plugins import build_registry
from lsm_registry.recipe import load_recipe

CPU = torch.device("cpu")


def gradient(width: int, height: int) -> Image.Image:
    """Red encodes x, green encodes y: a crop's colours say where it came from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 90)], axis=2).round().astype(np.uint8))


def jpeg_tree(root: Path, n: int = 48, classes: int = 4, bad: int | None = None) -> Path:
    rng = np.random.default_rng(1)
    lines = []
    for i in range(n):
        y = i % classes if i >= classes * 6 else i // 6  # every class has at least 6 images
        w, h = int(rng.integers(40, 96)), int(rng.integers(40, 96))
        path = root / "imgs" / f"c{y}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        noise = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        Image.fromarray(np.clip(np.asarray(gradient(w, h)) // 2 + noise + 40 * y, 0, 255).astype(np.uint8)).save(
            path, quality=90
        )
        if i == bad:
            path.write_bytes(b"\xff\xd8 not really a jpeg")
        lines.append(f"imgs/c{y}/{i}.jpg {y}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(lines) + "\n")
    (root / "ImageNet_LT_test.txt").write_text("\n".join(lines[::6]) + "\n")
    return root


def split_of(root: Path, size: int = 32, workers: int = 0) -> FileSplit:
    data = ImageNetLT(
        ImageNetLT.Params(root=str(root), image_size=size, workers=workers), Context((), (0, 0, 0))
    ).build()
    assert data.augment == "decoded"
    return data.train


# ------------------------------------------------------------------ the views


@pytest.mark.parametrize("seed", range(12))
def test_train_view_crops_the_original_keeping_its_aspect_ratio(tmp_path, seed):
    path = tmp_path / "g.png"  # lossless, so the colours are exact
    width, height, size = 150, 90, 32
    gradient(width, height).save(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out, (left, top, w, h), flip, hw = transforms.train_view(path, size)
    assert out.shape == (3, size, size) and out.dtype == torch.uint8 and hw == (height, width)
    assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
    ratio, area = w / h, w * h / (width * height)
    fallback = (w, h) == (int(round(height * 4 / 3)), height)  # the center crop RandomResizedCrop falls back to
    assert fallback or (0.75 - 0.02 <= ratio <= 4 / 3 + 0.02 and 0.08 - 0.01 <= area <= 1.0)
    # every output pixel shows the source pixel its box maps it to: a scale per axis, nothing squashed
    cols = left + (torch.arange(size) + 0.5) * w / size
    rows = top + (torch.arange(size) + 0.5) * h / size
    if flip:
        cols = cols.flip(0)
    want_r = (cols / (width - 1) * 255).view(1, -1).expand(size, size)
    want_g = (rows / (height - 1) * 255).view(-1, 1).expand(size, size)
    assert (out[0].float() - want_r).abs().mean() < 4 and (out[1].float() - want_g).abs().mean() < 4


def test_train_view_drafts_only_as_far_as_the_crop_keeps_size_pixels(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    gradient(1600, 1200).save(path, quality=92)
    seen = []
    draft = transforms._draft_to_keep

    def spy(img, need_w, need_h):
        scale = draft(img, need_w, need_h)
        seen.append(scale)
        return scale

    monkeypatch.setattr(transforms, "_draft_to_keep", spy)
    shrunk = full = 0
    for seed in range(20):
        before = len(seen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out, (_, _, w, h), _, _ = transforms.train_view(path, 224)
        assert out.shape == (3, 224, 224)
        if len(seen) == before:  # no draft could apply: decoded at full size by torchvision
            keep = max(min(224, w) / w, min(224, h) / h)
            assert transforms.draft_scale(1600, 1200, 1600 * keep, 1200 * keep) == 1
            full += 1
            continue
        sx, sy = seen[-1]
        assert w * sx >= 224 and h * sy >= 224  # never fewer than 224 source pixels under the crop
        shrunk += sx < 1
    assert shrunk > 0 and full > 0  # large crops of a large file decode at a reduced scale, small ones do not


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_decoded_by_torchvision_gives_the_pixels_pil_gives(tmp_path, monkeypatch, mode):
    path = tmp_path / "p.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)).convert(mode).save(path, quality=90)
    views = {}
    for decoder in ("torchvision", "pil"):
        if decoder == "pil":
            monkeypatch.setattr(transforms, "_decoded_by_torchvision", lambda *args: None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            views[decoder] = transforms.train_view(path, 32)[0], transforms.eval_view(path, 32)[0]
    assert torch.equal(views["torchvision"][0], views["pil"][0]) and torch.equal(
        views["torchvision"][1], views["pil"][1]
    )


def test_train_view_is_torchvisions_resized_crop_then_flip_to_the_last_bit(tmp_path):
    """The view packs (and mirrors) the box before resizing; the reference crops, resizes, then flips."""
    from torchvision.transforms.v2 import functional as F

    rng = np.random.default_rng(5)
    path = tmp_path / "r.jpg"
    Image.fromarray(rng.integers(0, 255, (150, 210, 3), dtype=np.uint8)).save(path, quality=90)
    decoded = F.pil_to_tensor(Image.open(path).convert("RGB"))
    flips = set()
    scales = set()
    for seed in range(16):  # crops smaller and larger than the 112 px output (too small for a draft)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out, (left, top, w, h), flip, _ = transforms.train_view(path, 112)
        want = F.resized_crop(decoded, int(top), int(left), int(h), int(w), [112, 112], antialias=True)
        assert torch.equal(out, F.horizontal_flip(want) if flip else want), seed
        flips.add(flip)
        scales.add(w > 112)
    assert flips == {True, False} and scales == {True, False}


def test_jpeg_frame_reads_the_size_pil_reads_and_declines_what_torchvision_should_not_decode(tmp_path):
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    cases = {
        "base.jpg": (rgb, {}),
        "prog.jpg": (rgb, {"progressive": True}),
        "grey.jpg": (rgb.convert("L"), {}),
        "cmyk.jpg": (rgb.convert("CMYK"), {}),
        "exif.jpg": (rgb, {"exif": Image.Exif()}),
    }
    for name, (img, options) in cases.items():
        img.save(tmp_path / name, quality=85, **options)
        width, height, components = transforms.jpeg_frame((tmp_path / name).read_bytes())
        assert (width, height) == (53, 37) and components == len(img.getbands())
    rgb.save(tmp_path / "x.png")
    assert transforms.jpeg_frame((tmp_path / "x.png").read_bytes()) is None
    assert transforms.jpeg_frame(b"\xff\xd8\xff") is None  # truncated before any frame header
    # CMYK and PNG go through PIL and still give RGB views of the right size
    for name in ("cmyk.jpg", "x.png"):
        out = transforms.train_view(tmp_path / name, 16)[0]
        assert out.shape == (3, 16, 16) and transforms.eval_view(tmp_path / name, 16)[0].shape == (3, 16, 16)


def test_a_truncated_jpeg_is_named(tmp_path):
    path = tmp_path / "cut.jpg"
    gradient(200, 150).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:400])  # the header survives, the scan does not
    for view in (lambda: transforms.train_view(path, 32), lambda: transforms.eval_view(path, 32)):
        with pytest.raises(ValueError) as info:
            view()
        assert str(path) in str(info.value) and "cannot read image" in str(info.value) and "\n" not in str(info.value)


def test_eval_view_is_resize_256_then_center_crop_224(tmp_path):
    path = tmp_path / "t.jpg"
    gradient(400, 300).save(path, quality=95)
    out, box, hw = transforms.eval_view(path, 224)
    standard = v2.Compose([v2.PILToTensor(), v2.Resize(256, antialias=True), v2.CenterCrop(224)])
    assert torch.equal(out, standard(Image.open(path).convert("RGB")))
    on_pil = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.PILToTensor()])(
        Image.open(path).convert("RGB")
    )
    assert (out.float() - on_pil.float()).abs().max() <= 2  # torchvision's uint8 kernel vs PIL's
    assert hw == (300, 400) and box == pytest.approx([(400 - 224 * 300 / 256) / 2, (300 - 262.5) / 2, 262.5, 262.5])
    big = tmp_path / "big.jpg"
    gradient(1600, 1000).save(big, quality=95)
    drafted, _, _ = transforms.eval_view(big, 224)  # decoded at 1/2 scale, still >= 256 on the short side
    plain = standard(Image.open(big).convert("RGB"))
    assert drafted.shape == (3, 224, 224) and (drafted.float() - plain.float()).abs().mean() < 2


def test_split_fetch_is_the_test_view_and_fetch_train_repeats_per_seed(tmp_path):
    train = split_of(jpeg_tree(tmp_path), size=32)
    x = train.fetch(torch.tensor([3, 0]), CPU)
    assert torch.equal(x[1], transforms.eval_view(train.paths[0], 32, 37)[0])
    a, crops = train.fetch_train(torch.arange(6), seed=11)
    b, again = train.fetch_train(torch.arange(6), seed=11)
    c, _ = train.fetch_train(torch.arange(6), seed=12)
    assert torch.equal(a, b) and torch.equal(crops.boxes, again.boxes) and not torch.equal(a, c)
    assert crops.boxes.shape == (6, 4) and crops.flips.shape == (6,) and len(crops) == 6
    assert crops.sizes[0].tolist() == list(Image.open(train.paths[0]).size[::-1])


def test_in_memory_augmentation_reports_its_crops_from_the_same_draws():
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    for kind in ("crop32", "rrc", "none"):
        out, crops = augment_with_crops(x, kind, torch.Generator().manual_seed(4))
        assert torch.equal(out, augment(x, kind, torch.Generator().manual_seed(4)))
        assert crops.boxes.shape == (5, 4) and crops.sizes[0].tolist() == [32, 32]
    out, crops = augment_with_crops(x, "crop32", torch.Generator().manual_seed(4))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for k in range(5):
        left, top = (int(v) + 4 for v in crops.boxes[k, :2])
        cut = padded[k, :, top : top + 32, left : left + 32].float()
        assert torch.equal(out[k], cut.flip(2) if crops.flips[k] else cut)


# ------------------------------------------------------------------ the planned loader


RECIPE = """
[run]
name = "files"
seed = 3
epochs = 3
eval_every = 1

[data]
name = "imagenet-lt"
root = "{root}"
image_size = 32
workers = {workers}

[model]
name = "resnet32"
width = 4

[optim]
batch_size = 8
lr = 0.05
warmup_epochs = 0

[sampler]
name = "dual-branch"

[mixer]
name = "cmo"
prob = 0.5
start_epoch = 0
end_epoch = {{ none = true }}

[label_fuser]
name = "area"

[loss]
name = "ce"
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return jpeg_tree(tmp_path_factory.mktemp("tree"))


def trainer_for(tree: Path, tmp_path: Path, workers: int) -> Trainer:
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(root=tree.as_posix(), workers=workers))
    registry = build_registry(entry_points=False)
    return Trainer(load_recipe(path, registry=registry), registry)


def test_prefetch_order_is_the_samplers_and_only_mixing_steps_fetch_a_foreground(tree, tmp_path):
    trainer = trainer_for(tree, tmp_path, workers=2)
    trainer.generator.manual_seed(99)
    plan = trainer.plan(0, 8)
    expected = list(trainer.sampler.batches(0, 8))
    assert len(plan) == len(expected) == 6
    loaded = list(trainer._steps(0, 8, plan, 0))
    assert [s.plan.step for _, _, s in loaded] == list(range(6))
    coins = [s.mix for s in plan]
    assert 0 < sum(coins) < 6  # prob 0.5: some steps mix, some do not
    for (bg, fg, step), (want_bg, want_fg), mix in zip(loaded, expected, coins):
        assert torch.equal(bg, want_bg)
        assert (step.fg is not None) == mix and (fg is None) == (not mix)
        if mix:
            assert torch.equal(fg, want_fg)
            assert torch.equal(step.fg[0], trainer.data.train.fetch_train(want_fg, step.plan.fg_seed)[0])
        assert torch.equal(step.bg[0], trainer.data.train.fetch_train(want_bg, step.plan.bg_seed)[0])
    # starting the plan at step 4 (a mid-epoch resume) decodes the same steps 4 and 5
    tail = list(trainer._steps(0, 8, plan, 4))
    assert [s.plan.step for _, _, s in tail] == [4, 5]
    assert torch.equal(tail[0][2].bg[0], loaded[4][2].bg[0])
    trainer.close_loader()


def test_the_same_plan_with_and_without_workers_trains_alike(tree, tmp_path):
    results = [trainer_for(tree, tmp_path, workers).fit() for workers in (0, 2)]
    assert results[0]["final_loss"] == results[1]["final_loss"]
    assert results[0]["per_class"] == results[1]["per_class"]


@pytest.mark.parametrize("views", [False, True])
def test_the_ring_of_slots_never_hands_out_a_step_a_worker_has_overwritten(tree, views):
    """One worker, one step ahead: 3 slots for 10 steps, so every slot is reused three times."""
    train = split_of(tree)
    steps = [(torch.arange(k, k + 5), torch.arange(40 - k, 44 - k) if k % 3 else None) for k in range(10)]
    seeds = torch.arange(20, dtype=torch.int64).view(10, 2) * 7 + 1
    plan = plan_epoch(steps, [k % 2 == 0 for k in range(10)], seeds)
    loader = PlannedLoader(train, workers=1, prefetch=1, views=views)
    assert loader.slots == 3
    kept, checked = [], 0
    for step in loader.run(plan):
        if views:  # a view is good until the step after next is asked for: check it now
            kept.append((step.plan, step.bg[0].clone(), None if step.fg is None else step.fg[0].clone()))
        else:  # a copy is good for good: check them all at the end
            kept.append((step.plan, step.bg[0], None if step.fg is None else step.fg[0]))
        start, end = step.decoded
        assert step.worker == 0 and 0 < start <= end
    loader.close()
    for planned, bg, fg in kept:
        assert torch.equal(bg, train.fetch_train(planned.bg, planned.bg_seed)[0])
        assert (fg is None) == (planned.fg is None)
        if fg is not None:
            assert torch.equal(fg, train.fetch_train(planned.fg, planned.fg_seed)[0])
            checked += 1
    assert len(kept) == 10 and checked == 3  # steps 2, 4 and 8 mix and have a foreground
    with pytest.raises(RuntimeError, match="closed"):
        next(loader.run(plan))


def test_an_unreadable_file_stops_training_naming_it(tmp_path):
    root = jpeg_tree(tmp_path, bad=7)
    train = split_of(root, workers=1)
    loader = PlannedLoader(train, workers=1)
    plan = plan_epoch(
        [(torch.arange(8), None), (torch.arange(8, 16), None)], [False, False], torch.zeros(2, 2, dtype=torch.int64)
    )
    with pytest.raises(DataError) as info:
        list(loader.run(plan))
    loader.close()
    message = str(info.value)
    assert str(root / "imgs" / "c1" / "7.jpg") in message and "cannot read image" in message and "\n" not in message


def test_imagefolder_files_storage_uses_the_file_backed_path(tmp_path):
    for split, n in (("train", 5), ("test", 2)):
        for c, name in enumerate(("ant", "bee")):
            for i in range(n):
                path = tmp_path / split / name / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                gradient(60 + 10 * i, 45 + 5 * c).save(path)
    params = ImageFolderLT.Params(
        root=str(tmp_path), profile="none", storage="files", image_size=32, workers=0, val_per_class=1
    )
    data = ImageFolderLT(params, Context((), (0, 0, 0))).build()
    assert isinstance(data.train, FileSplit) and data.augment == "decoded" and data.image_size == (3, 32, 32)
    assert data.class_counts() == (4, 4) and len(data.val) == 2 and len(data.test) == 4
    assert data.test.fetch(torch.arange(4), CPU).shape == (4, 3, 32, 32)
    assert data.train.fetch_train(torch.arange(3), 0)[0].shape == (3, 3, 32, 32)
    memory = ImageFolderLT(attrs.evolve(params, storage="memory"), Context((), (0, 0, 0))).build()
    assert memory.augment == "crop32" and memory.train.images.shape == (8, 3, 32, 32)


# ------------------------------------------------------------------ resume through the loader


def run_lsm(script: Path, *args: str, signal_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in ENV.items() if k != "LSM_TRIPWIRE"}
    if signal_at is not None:
        env["LSM_TRIPWIRE"] = signal_at
    return subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopped_mid_epoch_and_resumed_through_the_loader_is_bit_identical(tree, tmp_path, how):
    script = tmp_path / "tripwire_lsm.py"
    script.write_text(TRIPWIRE_LSM)
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(root=tree.as_posix(), workers=2).replace('name = "ce"', 'name = "ce-tripwire"'))
    ref = run_lsm(script, "run", str(recipe), "--out", str(tmp_path / "ref"), "--no-progress")
    assert ref.returncode == 0, ref.stdout
    expected = json.loads((tmp_path / "ref" / "summary.json").read_text())
    run_dir = tmp_path / "run"
    stopped = run_lsm(script, "run", str(recipe), "--out", str(run_dir), "--no-progress", signal_at=f"{how}:2:3")
    if how == "SIGTERM":
        assert stopped.returncode == 130 and "in epoch 2 at step 3" in stopped.stdout, stopped.stdout
    else:
        assert stopped.returncode == -signal.SIGKILL, stopped.stdout
    assert not (run_dir / "summary.json").exists()
    resumed = run_lsm(script, "resume", str(run_dir), "--no-progress")
    assert resumed.returncode == 0, resumed.stdout
    got = json.loads((run_dir / "summary.json").read_text())
    assert got["final_loss"] == expected["final_loss"] and got["per_class"] == expected["per_class"]
    ref_lines = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    got_lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in got_lines] == [r["train_loss"] for r in ref_lines]
    assert [r["mixed_fraction"] for r in got_lines] == [r["mixed_fraction"] for r in ref_lines]


# ------------------------------------------------------------------ worker priority


@pytest.mark.skipif(not hasattr(__import__("os"), "SCHED_IDLE"), reason="SCHED_IDLE is Linux only")
def test_idle_priority_puts_the_decoding_workers_under_sched_idle_and_decodes_the_same(tree):
    import os

    from lsm_registry.data.split_files import worker_init

    code = (
        "import os; from lsm_registry.data.split_files import worker_init; "
        "worker_init('idle')(0); print(os.sched_getscheduler(0) == os.SCHED_IDLE)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr
    assert worker_init("normal") is None and os.sched_getscheduler(0) != os.SCHED_IDLE  # this process untouched
    plan = plan_epoch(
        [(torch.arange(6), None), (torch.arange(6, 12), None)], [False, False], torch.ones(2, 2, dtype=torch.int64)
    )
    got = {}
    for priority in ("normal", "idle"):
        train = (
            ImageNetLT(
                ImageNetLT.Params(root=str(tree), image_size=32, workers=1, worker_priority=priority),
                Context((), (0, 0, 0)),
            )
            .build()
            .train
        )
        loader = PlannedLoader(train, workers=1)
        got[priority] = [step.bg[0] for step in loader.run(plan)]
        loader.close()
    assert all(torch.equal(a, b) for a, b in zip(got["normal"], got["idle"]))


def test_worker_priority_is_refused_where_it_would_do_nothing_or_is_unknown(tmp_path):
    from lsm_registry.data.split_files import check_priority

    with pytest.raises(ValueError, match="expected one of normal, idle"):
        check_priority("fast")
    for c, name in enumerate(("ant", "bee")):
        for split, n in (("train", 4), ("test", 1)):
            for i in range(n):
                path = tmp_path / split / name / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                gradient(40 + i, 30 + c).save(path)
    params = ImageFolderLT.Params(
        root=str(tmp_path), profile="none", storage="memory", image_size=32, workers=0, worker_priority="idle"
    )
    with pytest.raises(ValueError, match='^worker_priority applies to storage = "files" only'):
        ImageFolderLT(params, Context((), (0, 0, 0))).build()
    with pytest.raises(ValueError, match="^test_resize, prefetch applies to storage"):  # nor do these
        ImageFolderLT(
            attrs.evolve(params, worker_priority="normal", test_resize=40, prefetch=3), Context((), (0, 0, 0))
        ).build()
    with pytest.raises(ValueError, match="needs workers >= 1"):
        ImageFolderLT(attrs.evolve(params, storage="files"), Context((), (0, 0, 0))).build()
