"""cached-gradcam: exact inverse warps, closed-form heads, fallback, engine wiring, resume, DDP, fidelity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import attrs
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RECIPE
from torch import nn

from lsm_registry import ModelFactory, hookimpl
from lsm_registry.checkpoint import list_checkpoints, load_latest
from lsm_registry.components.cached_saliency import CachedGradCAM, class_activation_of, head_gradient, unit_agreement
from lsm_registry.components.models import CifarResNet
from lsm_registry.components.patches import PixelUnshuffle
from lsm_registry.components.saliency import GradCAM
from lsm_registry.data.augment import augment_with_crops, normalise
from lsm_registry.engine import Interrupted, Trainer
from lsm_registry.errors import LSMError
from lsm_registry.interfaces import Context, Crops, Views
from lsm_registry.plugins import build_registry
from lsm_registry.recipe import load_recipe
from lsm_registry.registry import Owner

N_IMAGES = 12
CTX = Context(class_counts=(6, 3, 2, 1), image_size=(3, 32, 32))


def provider(**kw) -> CachedGradCAM:
    return CachedGradCAM(CachedGradCAM.Params(**kw), CTX)


def patch(p: int = 4) -> PixelUnshuffle:
    return PixelUnshuffle(PixelUnshuffle.Params(size=p), CTX)


# ------------------------------------------------------------------ warps on a model with a known CAM


class PixelCAM(nn.Module):
    """A 1x1 conv (optionally average-pooled by ``pool``) + GAP + linear: the CAM of a pixel depends on it alone."""

    def __init__(self, pool: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 1), *([nn.AvgPool2d(pool)] if pool > 1 else []))
        self.classifier = nn.Linear(6, 4)
        with torch.no_grad():
            self.classifier.weight.mul_(1000.0)  # maps of order 1 after the 1/(h w): no float16 subnormals

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.classifier(self.forward_features(x).mean(dim=(2, 3)))

    def saliency_layers(self):
        return {"body": self.body}


def cut(source: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """crop32 views of ``source`` (B, 3, 32, 32): the 32x32 box at (left, top) of the zero-padded image, maybe mirrored."""
    padded = F.pad(source, (4, 4, 4, 4))
    views = []
    for img, (left, top, _, _), flip in zip(padded, boxes.long().tolist(), flips.tolist()):
        v = img[:, top + 4 : top + 36, left + 4 : left + 36]
        views.append(v.flip(-1) if flip else v)
    return torch.stack(views)


def crops(offsets: torch.Tensor, flips: torch.Tensor) -> Crops:
    b = offsets.shape[0]
    boxes = torch.cat([offsets.float(), torch.full((b, 2), 32.0)], dim=1)
    return Crops(boxes, flips, torch.tensor([[32, 32]]).expand(b, 2))


def source_columns(offsets: torch.Tensor, flips: torch.Tensor, n: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source x (B, n) and y (B, n) of the centres of a view's n cells of ``step`` pixels (flip mirrors x)."""
    centres = torch.arange(n) * step + step / 2
    xs = torch.where(flips.view(-1, 1), 32 - centres, centres) + offsets[:, 0:1]
    ys = centres + offsets[:, 1:2]
    return xs, ys


def random_views(g: torch.Generator, b: int, multiple: int):
    offsets = torch.randint(-4 // multiple, 4 // multiple + 1, (b, 2), generator=g) * multiple
    flips = torch.rand(b, generator=g) < 0.5
    return offsets, flips


@pytest.mark.parametrize("uncovered", ["mean", "zero"])
def test_warp_is_exact_for_integer_crops_and_flips_at_full_resolution(uncovered):
    model = PixelCAM(pool=1)
    g = torch.Generator().manual_seed(3)
    b = 8
    source = torch.randn(b, 3, 32, 32, generator=g)
    y = torch.randint(0, 4, (b,), generator=g)
    idx = torch.randperm(N_IMAGES, generator=g)[:b]
    off1, flip1 = random_views(g, b, 1)
    off2, flip2 = random_views(g, b, 1)
    off2[0], flip2[0] = off1[0] + torch.tensor([3, -2]), ~flip1[0]  # surely a partly uncovered, mirrored view
    cached = provider(uncovered=uncovered)
    with torch.no_grad():
        cam1 = class_activation_of(
            model, model.forward_features(cut(source, crops(off1, flip1).boxes, flip1)), y
        ).clamp_min(0)
        cached.observe(
            model,
            model.forward_features(cut(source, crops(off1, flip1).boxes, flip1)),
            y,
            Views(idx, crops(off1, flip1), 0),
        )
        cam2 = class_activation_of(
            model, model.forward_features(cut(source, crops(off2, flip2).boxes, flip2)), y
        ).clamp_min(0)
    got, covered = cached.stored_activation(Views(idx, crops(off2, flip2), 1), 32, 32)
    assert got.shape == covered.shape == (b, 32, 32)
    # Covered: the view pixel's source pixel lies inside the stored box.
    xs, ys = source_columns(off2.float(), flip2, 32, 1)
    inside_x = (xs >= off1[:, 0:1]) & (xs < off1[:, 0:1] + 32)
    inside_y = (ys >= off1[:, 1:2]) & (ys < off1[:, 1:2] + 32)
    assert torch.equal(covered, inside_y.view(b, 32, 1) & inside_x.view(b, 1, 32))
    assert covered.any() and (~covered).any()
    scale = float(cam2.abs().max())
    err = (got - cam2).abs()
    assert bool((err <= 2e-3 * cam2.abs() + 1e-5 * scale)[covered].all()), float(err[covered].max() / scale)
    if uncovered == "mean":
        fill = cam1.half().float().clamp_min(0).mean(dim=(1, 2))
    else:
        fill = torch.zeros(b)
    expected_fill = fill.view(b, 1, 1).expand(b, 32, 32)
    assert torch.allclose(got[~covered], expected_fill[~covered], rtol=1e-5, atol=1e-7)
    # A shifted read differs from an unshifted one: the comparison above can fail.
    assert not torch.allclose(got, cam1, atol=1e-3 * scale)


def test_warp_is_exact_for_shifts_that_are_multiples_of_the_feature_stride():
    model = PixelCAM(pool=4)
    g = torch.Generator().manual_seed(5)
    b = 8
    source = torch.randn(b, 3, 32, 32, generator=g)
    y = torch.randint(0, 4, (b,), generator=g)
    idx = torch.arange(b)
    off1, flip1 = random_views(g, b, 4)
    off2, flip2 = random_views(g, b, 4)
    off1[0], off2[0], flip2[0] = torch.tensor([-4, 0]), torch.tensor([4, 4]), ~flip1[0]
    cached = provider()
    with torch.no_grad():
        feats1 = model.forward_features(cut(source, crops(off1, flip1).boxes, flip1))
        cached.observe(model, feats1, y, Views(idx, crops(off1, flip1), 0))
        cam2 = class_activation_of(
            model, model.forward_features(cut(source, crops(off2, flip2).boxes, flip2)), y
        ).clamp_min(0)
    assert feats1.shape[-2:] == cam2.shape[-2:] == (8, 8)
    scale = float(cam2.abs().max())
    # At the map's own resolution every covered cell is a stored cell, unchanged.
    got, covered = cached.stored_activation(Views(idx, crops(off2, flip2), 0), 8, 8)
    xs, ys = source_columns(off2.float(), flip2, 8, 4)
    inside_x = (xs >= off1[:, 0:1]) & (xs < off1[:, 0:1] + 32)
    inside_y = (ys >= off1[:, 1:2]) & (ys < off1[:, 1:2] + 32)
    assert torch.equal(covered, inside_y.view(b, 8, 1) & inside_x.view(b, 1, 8))
    assert covered.any() and (~covered).any()
    err = (got - cam2).abs()
    assert bool((err <= 2e-3 * cam2.abs() + 1e-5 * scale)[covered].all()), float(err[covered].max() / scale)
    # At image resolution: the shifted bilinear resize, wherever neither resize clamps at a border.
    got, covered = cached.stored_activation(Views(idx, crops(off2, flip2), 0), 32, 32)
    # (of the float16-rounded map: an interpolated value near 0 is far smaller than the rounding of its ends)
    resized = F.interpolate(
        cam2.half().float().unsqueeze(1), size=(32, 32), mode="bilinear", align_corners=False
    ).squeeze(1)
    xs, ys = source_columns(off2.float(), flip2, 32, 1)
    away = torch.arange(32)
    away = (away >= 2) & (away < 30)
    deep_x = (xs >= off1[:, 0:1] + 2) & (xs <= off1[:, 0:1] + 30) & away
    deep_y = (ys >= off1[:, 1:2] + 2) & (ys <= off1[:, 1:2] + 30) & away
    deep = deep_y.view(b, 32, 1) & deep_x.view(b, 1, 32)
    assert deep.sum() > 1000 and bool((covered | ~deep).all())
    err = (got - resized).abs()
    assert bool((err <= 1e-5 * scale)[deep].all()), float(err[deep].max() / scale)


def test_the_stored_view_reads_back_the_plain_resize():
    model = PixelCAM(pool=4)
    g = torch.Generator().manual_seed(7)
    b = 6
    source = torch.randn(b, 3, 32, 32, generator=g)
    y = torch.randint(0, 4, (b,), generator=g)
    idx = torch.tensor([0, 2, 4, 6, 8, 10])
    off, flip = random_views(g, b, 1)
    flip[:2] = torch.tensor([True, False])
    cached = provider()
    with torch.no_grad():
        feats = model.forward_features(cut(source, crops(off, flip).boxes, flip))
        cam = class_activation_of(model, feats, y).clamp_min(0)
        cached.observe(model, feats, y, Views(idx, crops(off, flip), 0))
    for h, w in ((32, 32), (8, 8), (16, 32)):
        got, covered = cached.stored_activation(Views(idx, crops(off, flip), 0), h, w)
        expected = F.interpolate(
            cam.half().float().unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False
        ).squeeze(1)
        assert bool(covered.all())
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max())), (h, w)


# ------------------------------------------------------------------ the closed-form head


def tiny_resnet(normed=False, lws=False, seed=0) -> CifarResNet:
    torch.manual_seed(seed)
    model = CifarResNet(32, num_classes=4, width=4, normed_head=normed, lws=lws)
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 32, 32))  # batch-norm statistics that are not the initial ones
        if lws:
            model.logit_scale.copy_(torch.tensor([0.5, 1.7, 2.5, 0.9]))
    return model.eval()


HEADS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("normed,lws", HEADS)
def test_head_gradient_equals_autograd(normed, lws):
    model = tiny_resnet(normed, lws)
    g = torch.Generator().manual_seed(1)
    pooled = torch.randn(6, 16, generator=g).abs() + 0.1
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    leaf = pooled.clone().requires_grad_(True)
    logits = model.classifier(leaf)
    if lws:
        logits = logits * model.logit_scale
    (expected,) = torch.autograd.grad(logits.gather(1, y.view(-1, 1)).sum(), leaf)
    got = head_gradient(model, pooled, y)
    assert got.shape == (6, 16)
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())


@pytest.mark.parametrize("normed,lws", HEADS)
def test_class_activation_of_equals_autograd_gradcam(normed, lws):
    model = tiny_resnet(normed, lws)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([3, 0, 1, 2])
    with torch.no_grad():
        feats = model.forward_features(x)
    got = class_activation_of(model, feats, y)
    expected = GradCAM(GradCAM.Params(fast=False), CTX).class_activation(model, x, y)
    assert got.shape == expected.shape == (4, 8, 8)
    assert torch.allclose(got, expected, atol=1e-6 + 1e-5 * float(expected.abs().max()))


# ------------------------------------------------------------------ fallback


def some_views(b: int, idx: torch.Tensor, epoch: int, seed: int = 0) -> tuple[torch.Tensor, Views]:
    """b crop32 views of random sources: the normalised images and their Views."""
    g = torch.Generator().manual_seed(seed)
    source = torch.rand(b, 3, 32, 32, generator=g) * 255
    x, cut_crops = augment_with_crops(source, "crop32", g)
    return normalise(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), Views(idx, cut_crops, epoch)


def recording_fresh(cached: CachedGradCAM) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    original = cached.fresh.class_activation

    def record(model, x, y):
        seen.append(x.clone())
        return original(model, x, y)

    cached.fresh.class_activation = record
    return seen


def test_unseen_images_fall_back_to_a_fresh_gradcam_and_are_counted_and_stored():
    model = tiny_resnet()
    model.train()
    cached = provider()
    seen = recording_fresh(cached)
    idx = torch.tensor([0, 3, 5, 7, 1, 2, 9, 11])
    x, views = some_views(8, idx, epoch=1)
    y = torch.tensor([0, 0, 0, 1, 0, 0, 2, 3])
    observed = torch.arange(4)
    with torch.no_grad():
        cached.observe(model, model.forward_features(x[observed]), y[observed], views.take(observed))
    assert cached.stamps.tolist() == [1 if i in (0, 3, 5, 7) else -1 for i in range(N_IMAGES)]
    before = {k: v.clone() for k, v in model.state_dict().items()}  # (the train-mode forward above moved them)
    scores = cached.scores_of_views(model, x, y, patch(), views)
    assert scores.shape == (8, 8, 8) and bool((scores >= 0).all()) and bool((scores <= 1).all())
    assert len(seen) == 1 and torch.equal(seen[0], x[4:])  # a fresh pass of exactly the unseen rows
    assert cached.epoch_fractions() == {"saliency_fresh_fraction": (4.0, 8.0)}
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rows = torch.arange(4, 8)
    fresh = GradCAM(GradCAM.Params(), CTX).scores_of_views(model, x[4:], y[4:], patch(), views.take(rows))
    assert torch.allclose(scores[4:], fresh, atol=5e-3), float((scores[4:] - fresh).abs().max())
    assert cached.stamps[idx].tolist() == [1] * 8  # the fresh maps were stored
    again = cached.scores_of_views(model, x, y, patch(), views)
    assert len(seen) == 1 and torch.equal(again, scores)
    assert cached.epoch_fractions() == {"saliency_fresh_fraction": (0.0, 8.0)}
    assert cached.epoch_fractions() == {"saliency_fresh_fraction": (0.0, 0.0)}  # read, then reset


def test_maps_older_than_max_age_count_as_missing():
    model = tiny_resnet()
    cached = provider(max_age=1)
    seen = recording_fresh(cached)
    idx = torch.arange(4)
    x, views = some_views(4, idx, epoch=2)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        cached.observe(model, model.forward_features(x), y, views)
    for epoch, fresh_rows in ((2, 0), (3, 0), (4, 4), (5, 0)):  # epoch 4 refreshes them all, in epoch 4
        cached.scores_of_views(model, x, y, patch(), Views(idx, views.crops, epoch))
        assert cached.epoch_fractions()["saliency_fresh_fraction"] == (float(fresh_rows), 4.0), epoch
    assert len(seen) == 1 and cached.stamps[idx].tolist() == [4] * 4


def test_uniform_fallback_scores_unseen_rows_equally_without_a_pass():
    model = tiny_resnet()
    cached = provider(fallback="uniform", mask_padding=False)  # uniform over the whole view
    cached.fresh.class_activation = None  # any fresh pass would fail
    idx = torch.tensor([0, 1, 2, 3, 4, 5])
    x, views = some_views(6, idx, epoch=0)
    y = torch.tensor([0, 0, 1, 1, 2, 3])
    assert torch.equal(cached.scores_of_views(model, x, y, patch(), views), torch.ones(6, 8, 8))  # nothing stored yet
    with torch.no_grad():
        cached.observe(model, model.forward_features(x[:3]), y[:3], views.take(torch.arange(3)))
    scores = cached.scores_of_views(model, x, y, patch(), views)
    assert all(torch.all(s == s.flatten()[0]) for s in scores[3:])
    assert all(s.max() > s.min() for s in scores[:3])
    assert cached.stamps[3:6].tolist() == [-1, -1, -1]
    assert cached.epoch_fractions() == {"saliency_fresh_fraction": (0.0, 12.0)}


# ------------------------------------------------------------------ the engine

MIXING = (
    TINY_RECIPE.replace("epochs = 1", "epochs = 3")
    + """
[sampler]
name = "dual-branch"

[saliency]
name = "cached-gradcam"

[mixer]
name = "lsm"
prob = 0.5
start_epoch = 1
end_epoch = { none = true }
"""
)


def instrument(trainer: Trainer) -> list[dict]:
    """Per training step: epoch, whether it mixed, the background indices, and the observe calls it made."""
    steps: list[dict] = []
    observe, train_step = trainer.saliency.observe, trainer.train_step

    def recording_observe(model, features, labels, views):
        steps[-1]["observed"].append((labels.clone(), views, model.classifier.weight.detach().clone()))
        return observe(model, features, labels, views)

    def recording_step(epoch, bg, fg, stats, loaded=None):
        mixed = int(stats.mixed)
        steps.append(
            {
                "epoch": epoch,
                "bg": bg.clone(),
                "observed": [],
                "weight": trainer.module.classifier.weight.detach().clone(),
            }
        )
        train_step(epoch, bg, fg, stats, loaded)
        steps[-1]["mixed"] = int(stats.mixed) > mixed

    trainer.saliency.observe = recording_observe
    trainer.train_step = recording_step
    return steps


def test_engine_observes_only_unmixed_steps_and_records_the_fresh_fraction(write_recipe, registry):
    recipe = load_recipe(write_recipe(MIXING), [], registry)
    trainer = Trainer(recipe, registry)
    assert trainer.observing
    steps = instrument(trainer)
    trainer.fit()
    assert [s["epoch"] for s in steps] == [0] * 3 + [1] * 3 + [2] * 3
    assert any(s["mixed"] for s in steps) and not all(s["mixed"] for s in steps[3:])
    for s in steps:
        assert len(s["observed"]) == (0 if s["mixed"] else 1)
        for labels, views, _ in s["observed"]:
            assert torch.equal(views.indices.cpu(), s["bg"]) and views.epoch == s["epoch"]
            assert torch.equal(labels, trainer.labels_on_device[s["bg"]]) and len(views.crops) == len(s["bg"])
    observer = next(c for c in trainer.callbacks if c.name == "saliency-observer")
    assert observer._armed is None and observer._hook is None  # disarmed, and the hook removed at the end
    stamps = trainer.saliency.stamps
    assert stamps.shape == (sum(trainer.class_counts),) and bool((stamps >= 0).all())  # epoch 0 saw every image
    assert int(stamps.max()) == 2
    fractions = [h["saliency_fresh_fraction"] for h in trainer.history]
    assert fractions[0] is None  # nothing was scored before the mixing window
    assert all(0.0 <= f <= 1.0 for f in fractions[1:])


def test_fresh_fraction_counts_the_fallbacks_in_the_engine(write_recipe, registry):
    # max_age 0: only maps of this epoch count, so the foregrounds of the first mixed step are fresh.
    text = MIXING.replace('name = "cached-gradcam"', 'name = "cached-gradcam"\nmax_age = 0')
    recipe = load_recipe(write_recipe(text), ["mixer.prob=1.0"], registry)
    trainer = Trainer(recipe, registry)
    trainer.fit()
    fractions = [h["saliency_fresh_fraction"] for h in trainer.history]
    assert fractions[0] is None and 0.0 < fractions[1] <= 1.0 and 0.0 < fractions[2] <= 1.0


def test_single_branch_foreground_views_are_the_permuted_background(write_recipe, registry):
    recipe = load_recipe(
        write_recipe(MIXING.replace('"dual-branch"', '"instance"')), ["mixer.prob=1.0", "run.epochs=2"], registry
    )
    trainer = Trainer(recipe, registry)
    scored, backgrounds = [], []
    mixed_batch, scores_of_views = trainer.mixed_batch, trainer.saliency.scores_of_views

    def recording_mixed_batch(epoch, xb, yb, fg, loaded=None, views_b=None):
        assert fg is None
        backgrounds.append((xb.clone(), views_b))
        out = mixed_batch(epoch, xb, yb, fg, loaded, views_b)
        if out is not None:
            assert torch.equal(trainer.crops[1].boxes, scored[-1][2].crops.boxes)
            assert torch.equal(trainer.crops[1].flips, scored[-1][2].crops.flips)
        return out

    def recording_scores(model, x, y, p, views):
        scored.append((x.clone(), y.clone(), views))
        return scores_of_views(model, x, y, p, views)

    trainer.mixed_batch, trainer.saliency.scores_of_views = recording_mixed_batch, recording_scores
    trainer.fit()
    assert len(scored) == 3  # epoch 1's three steps; LSM with the saliency fuser scores the foreground only
    permuted = 0
    for (xb, views_b), (x, y, views) in zip(backgrounds[3:], scored):
        # where each foreground row sits in the background
        perm = torch.tensor([views_b.indices.tolist().index(i) for i in views.indices.tolist()])
        assert sorted(perm.tolist()) == list(range(len(perm)))
        assert torch.equal(x, xb[perm]) and torch.equal(y, trainer.labels_on_device[views.indices])
        assert torch.equal(views.crops.boxes, views_b.crops.boxes[perm])
        assert torch.equal(views.crops.flips, views_b.crops.flips[perm]) and views.epoch == 1
        permuted += not torch.equal(perm, torch.arange(len(perm)))
    assert permuted == 3
    assert trainer.saliency.epoch_fractions() == {"saliency_fresh_fraction": (0.0, 0.0)}
    assert trainer.history[1]["saliency_fresh_fraction"] == 0.0  # every image was seen in epoch 0


def test_sam_caches_from_the_first_forward_only(write_recipe, registry):
    recipe = load_recipe(write_recipe(MIXING), ["optim.name=sam", "run.epochs=2"], registry)
    trainer = Trainer(recipe, registry)
    steps = instrument(trainer)
    forwards = []
    trainer.module.register_forward_hook(lambda *a: forwards.append(1))
    trainer.fit()
    unmixed = [s for s in steps if not s["mixed"]]
    assert len(unmixed) >= 3 and sum(len(s["observed"]) for s in steps) == len(unmixed)
    for s in unmixed:
        ((_, _, weight),) = s["observed"]
        assert torch.equal(weight, s["weight"])  # observed at the weights before SAM's ascent
    assert len(forwards) >= 2 * len(steps)  # SAM did make two forwards per step


class SequentialHeadNet(CifarResNet):
    def __init__(self):
        super().__init__(32, num_classes=4, width=4)
        self.classifier = nn.Sequential(nn.Linear(16, 4))


class SequentialHead(ModelFactory):
    name = "sequential-head"

    @attrs.frozen
    class Params:
        pass

    def build(self, num_classes, in_channels, normed_head):
        return SequentialHeadNet()


class SequentialHeadPlugin:
    @hookimpl
    def lsm_registry_components(self):
        return [SequentialHead]


def test_check_model_refuses_a_head_without_a_closed_form(write_recipe):
    with pytest.raises(ValueError) as info:
        provider().check_model(SequentialHeadNet())
    text = str(info.value)
    assert "\n" not in text and text.startswith("cached-gradcam:") and "Sequential" in text
    provider().check_model(tiny_resnet(normed=True))  # the heads it knows pass
    registry = build_registry(
        extra=[("seq", SequentialHeadPlugin(), Owner("seq", "lsm-tests", "0"))], entry_points=False
    )
    recipe = load_recipe(
        write_recipe(MIXING.replace('name = "resnet32"\nwidth = 4', 'name = "sequential-head"')), [], registry
    )
    with pytest.raises(LSMError) as info:
        Trainer(recipe, registry)
    text = str(info.value)
    assert "\n" not in text and "[saliency]" in text and "cached-gradcam" in text


# ------------------------------------------------------------------ checkpoints


def stop_at(trainer: Trainer, epoch: int, step: int) -> None:
    """Ask ``trainer`` to stop (as SIGTERM does) after 0-based ``epoch``'s ``step``-th step."""
    train_step = trainer.train_step

    def stepping(e, bg, fg, stats, loaded=None):
        train_step(e, bg, fg, stats, loaded)
        if (e, stats.steps) == (epoch, step):
            trainer._stop_signal = signal.SIGTERM

    trainer.train_step = stepping


def saliency_state(trainer: Trainer) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in trainer.saliency.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from lsm_registry.plugins import default_registry

    registry = default_registry()
    folder = tmp_path_factory.mktemp("cached")
    path = folder / "r.toml"
    path.write_text(MIXING)
    trainer = Trainer(load_recipe(path, ["mixer.prob=0.6"], registry), registry, run_dir=folder / "run")
    trainer.fit()
    return (
        path,
        {k: v.clone() for k, v in trainer.module.state_dict().items()},
        saliency_state(trainer),
        trainer.history,
    )


@pytest.mark.parametrize("epoch,step", [(1, 1), (0, 3)], ids=["mid-epoch", "epoch-end"])
def test_an_interrupted_run_resumes_bit_identical(uninterrupted, registry, tmp_path, epoch, step):
    path, weights, state, history = uninterrupted
    recipe = load_recipe(path, ["mixer.prob=0.6"], registry)
    first = Trainer(recipe, registry, run_dir=tmp_path / "run")
    stop_at(first, epoch, step)
    with pytest.raises(Interrupted):
        first.fit()
    saved, _ = load_latest(tmp_path / "run")
    assert (saved["epoch"], saved["step"]) == ((epoch, step) if step < 3 else (epoch + 1, 0))
    assert set(saved["saliency"]) == {"maps", "boxes", "stamps", "fresh_rows", "scored_rows"}
    assert saved["saliency"]["maps"].dtype == torch.float16 and int(saved["saliency"]["stamps"].max()) == epoch
    resumed = Trainer(recipe, registry, run_dir=tmp_path / "run", resume=True)
    resumed.fit()
    got = resumed.module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in weights.items())
    now = saliency_state(resumed)
    for key in ("maps", "boxes", "stamps"):
        assert torch.equal(now[key], state[key]), key
    assert [h["saliency_fresh_fraction"] for h in resumed.history] == [h["saliency_fresh_fraction"] for h in history]
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in history]


# ------------------------------------------------------------------ DDP


def test_two_process_gloo_run_merges_maps_and_records_the_fresh_fraction(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        MIXING.replace("n_max = 24", "n_max = 64")
        .replace("epochs = 3", "epochs = 2")
        .replace("prob = 0.5", "prob = 1.0")
    )
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29547",
        "-m",
        "lsm_registry",
        "run",
        str(recipe),
        "--out",
        str(run_dir),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["saliency_fresh_fraction"] is None  # epoch 1 never mixed
    # Each rank saw only its own shard (64 of 129 images) unmixed in epoch 1; merged at the epoch's
    # end, the maps serve the other rank's foregrounds too (unmerged about half would be fresh).
    assert records[1]["saliency_fresh_fraction"] is not None and 0.0 <= records[1]["saliency_fresh_fraction"] < 0.1
    state, _ = load_latest(run_dir)
    assert state["world_size"] == 2 and [p.name for p in list_checkpoints(run_dir)] == ["epoch-0002.pt"]
    ranks = state["saliency"]
    assert isinstance(ranks, list) and len(ranks) == 2  # each rank's own state, to resume with
    for key in ("maps", "boxes", "stamps"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # Every image seen by either rank in epoch 1 (stamp 0); fresh fallbacks of epoch 2 store stamp 1.
    assert int((ranks[0]["stamps"] >= 0).sum()) >= 128 and int(ranks[0]["stamps"].max()) <= 1


def test_fresh_fraction_is_summed_over_processes_before_dividing(write_recipe, registry):
    from lsm_registry.engine import DistInfo

    trainer = Trainer(load_recipe(write_recipe(MIXING), [], registry), registry)
    trainer.saliency.fresh_rows, trainer.saliency.scored_rows = 1, 16  # this rank: 1 of 16
    trainer.dist = DistInfo(0, 2, 0)
    reduced = []

    def all_reduce(t, op="sum"):  # the other rank: 15 of 48
        reduced.append(t.clone())
        return t + torch.tensor([15.0, 48.0], dtype=t.dtype)

    trainer._all_reduce = all_reduce
    from lsm_registry.components.callbacks import SaliencyObserver

    assert SaliencyObserver.fractions(trainer, trainer.saliency) == {"saliency_fresh_fraction": 16 / 64}
    assert reduced[0].tolist() == [1.0, 16.0] and trainer.saliency.scored_rows == 0


# ------------------------------------------------------------------ fidelity


FIDELITY = MIXING.replace("n_max = 24", "n_max = 64").replace("epochs = 3", "epochs = 6")


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    ta = torch.zeros_like(a.flatten(1), dtype=torch.bool).scatter_(1, a.flatten(1).topk(k, dim=1).indices, True)
    tb = torch.zeros_like(b.flatten(1), dtype=torch.bool).scatter_(1, b.flatten(1).topk(k, dim=1).indices, True)
    return (ta & tb).sum(dim=1).float() / k


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra = a.flatten(1).argsort(dim=1).argsort(dim=1).float()
    rb = b.flatten(1).argsort(dim=1).argsort(dim=1).float()
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    return (ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1))


def fidelity(write_recipe, registry) -> tuple[float, float, int]:
    recipe = load_recipe(write_recipe(FIDELITY), [], registry)
    trainer = Trainer(recipe, registry)
    trainer.fit()
    last = recipe.run.epochs - 1
    cached = trainer.saliency
    idx = (cached.stamps >= last - 1).nonzero().squeeze(1)
    x, y, crops_new = trainer.prepare_with_crops(idx)  # a new augmentation of those images
    views = Views(idx, crops_new, last)
    p = trainer.patch
    got = cached.scores_of_views(trainer.module, x, y, p, views)
    assert cached.epoch_fractions()["saliency_fresh_fraction"][0] == 0.0  # every row from the cache
    fresh = GradCAM(GradCAM.Params(), trainer.context)(trainer.module, x, y, p)
    k = got[0].numel() // 2
    overlap, rho = topk_overlap(got, fresh, k), spearman(got, fresh)
    lib_rho, lib_overlap = unit_agreement(got, fresh)  # the library's own measure says the same
    assert torch.allclose(lib_rho, rho, atol=1e-5) and torch.equal(lib_overlap, overlap)
    return float(overlap.mean()), float(rho.mean()), int(idx.numel())


def test_cached_scores_agree_with_fresh_gradcam_on_a_tiny_model(write_recipe, registry):
    overlap, rho, n = fidelity(write_recipe, registry)
    print(f"fidelity: top-half overlap {overlap:.3f}, Spearman {rho:.3f} over {n} images")
    assert n >= 50
    assert overlap > 0.65, overlap
