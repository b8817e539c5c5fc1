"""CutMix, Mixup, Remix and CMO (docs/method.md §9), and every mixer with every fuser."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_RECIPE

from lsm_registry.components.fusers import Remix
from lsm_registry.components.mixers import CMO, CutMix, Mixup
from lsm_registry.engine import Trainer
from lsm_registry.errors import RecipeError
from lsm_registry.interfaces import Context, MixResult
from lsm_registry.ops import box_masks
from lsm_registry.plugins import build_registry
from lsm_registry.recipe import load_recipe


@pytest.fixture(scope="module")
def registry():
    return build_registry(entry_points=False)


def context(counts=(40, 20, 10, 5), size=(3, 16, 16), seed=0, epochs=10):
    return Context(
        class_counts=tuple(counts),
        image_size=size,
        generator=torch.Generator().manual_seed(seed),
        epochs=epochs,
        seed=seed,
    )


def is_box(mask: torch.Tensor) -> bool:
    """A 2-D 0/1 mask is an axis-aligned rectangle (or empty) iff it equals the outer product of its row and column supports."""
    rows, cols = mask.any(dim=1), mask.any(dim=0)
    return torch.equal(mask.bool(), rows[:, None] & cols[None, :])


# ------------------------------------------------------------------------ CutMix


def test_box_side_and_clipping_by_hand():
    lam = torch.tensor([0.75, 0.75, 0.0, 1.0])
    cy = torch.tensor([4, 0, 3, 5])
    cx = torch.tensor([4, 0, 7, 5])
    masks = box_masks(lam, cy, cx, 8, 8)[:, 0]
    # lam 0.75: side ratio 0.5 -> 4 x 4; centred at (4, 4) it spans rows/cols 2..5.
    assert masks[0].sum() == 16 and masks[0][2:6, 2:6].all()
    # At the corner it is clipped to 2 x 2: the pasted area is 4/64, not 1 - lam = 16/64.
    assert masks[1].sum() == 4 and masks[1][:2, :2].all()
    # lam 0: a full-size 8 x 8 box centred at (3, 7) spans rows -1..6 and columns 3..10;
    # clipped, rows 0..6 and columns 3..7 remain.
    assert masks[2].sum() == 7 * 5 and masks[2][:7, 3:].all()
    # lam 1: nothing is pasted.
    assert masks[3].sum() == 0
    assert all(is_box(m) for m in masks)


def test_cutmix_pastes_one_box_per_image_and_the_weight_is_the_mask():
    mixer = CutMix(CutMix.Params(), context())
    x_f = torch.rand(64, 3, 16, 16) + 2.0  # foreground values > 2, background < 1: pixels tell their source
    x_b = torch.rand(64, 3, 16, 16)
    mix = mixer.mix(x_f, x_b, None, None)
    assert mix.unit_mask is None and mix.weight.shape == (64, 1, 16, 16)
    assert set(mix.weight.unique().tolist()) <= {0.0, 1.0}
    from_f = mix.images > 1.5
    assert torch.equal(from_f, mix.weight.bool().expand_as(from_f))
    assert torch.equal(mix.images, torch.where(from_f, x_f, x_b))
    assert all(is_box(m) for m in mix.weight[:, 0])
    areas = mix.weight.mean(dim=(1, 2, 3))
    assert len(set(areas.tolist())) > 10  # one box per image, not one per batch


def test_cutmix_area_fuser_gives_the_real_clipped_area(registry):
    assert registry.entry("label_fuser", "area").owner.distribution == "lsm-registry"
    ctx = context()
    mixer = CutMix(CutMix.Params(), ctx)
    fuser = registry.get("label_fuser", "area")(registry.get("label_fuser", "area").Params(), ctx)
    x_f, x_b = torch.ones(256, 1, 16, 16), torch.zeros(256, 1, 16, 16)
    mix = mixer.mix(x_f, x_b, None, None)
    y_f, y_b = torch.zeros(256, dtype=torch.int64), torch.ones(256, dtype=torch.int64)
    target = fuser.fuse(mix, y_f, y_b, None, None)
    pasted = mix.images.mean(dim=(1, 2, 3))  # the share of pixels that really came from x_f
    assert torch.allclose(target[:, 0], pasted, atol=1e-6)
    assert torch.allclose(target.sum(dim=1), torch.ones(256))
    # Many boxes are clipped: their area is below (floor(16 * sqrt(1 - lam)))^2 / 256.
    assert (pasted < 0.999).any() and (pasted > 0).any()


def test_cutmix_box_area_follows_beta_one():
    # alpha = 1: lam uniform, so the unclipped box area ~ 1 - lam has mean 1/2; clipping
    # and flooring only shrink it. The mean pasted share must sit clearly below 1/2.
    mixer = CutMix(CutMix.Params(alpha=1.0), context(size=(1, 32, 32)))
    mix = mixer.mix(torch.ones(4000, 1, 32, 32), torch.zeros(4000, 1, 32, 32), None, None)
    mean = float(mix.weight.mean())
    assert 0.2 < mean < 0.45


def test_cutmix_is_reproducible_from_the_generator():
    x_f, x_b = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    a = CutMix(CutMix.Params(), context(seed=5)).mix(x_f, x_b, None, None)
    b = CutMix(CutMix.Params(), context(seed=5)).mix(x_f, x_b, None, None)
    c = CutMix(CutMix.Params(), context(seed=6)).mix(x_f, x_b, None, None)
    assert torch.equal(a.weight, b.weight)
    assert not torch.equal(a.weight, c.weight)


def test_window_parameters_are_validated():
    from lsm_registry.params import ParamError

    with pytest.raises(ParamError, match="start_epoch = 5") as info:
        CutMix.Params(start_epoch=5, end_epoch=5)
    assert info.value.key == "end_epoch"
    assert CutMix.Params(start_epoch=5, end_epoch=-3).end_epoch == -3
    with pytest.raises(ValueError):
        Mixup.Params(alpha=0.0)


# ------------------------------------------------------------------------ Mixup


def test_mixup_one_lam_per_batch_is_a_constant_weight():
    mixer = Mixup(Mixup.Params(alpha=0.4), context())
    x_f, x_b = torch.rand(6, 3, 8, 8), torch.rand(6, 3, 8, 8)
    mix = mixer.mix(x_f, x_b, None, None)
    lam = float(mix.weight.flatten()[0])
    assert 0.0 <= lam <= 1.0
    assert torch.allclose(mix.weight, torch.full((6, 1, 8, 8), lam))
    assert torch.allclose(mix.images, lam * x_f + (1 - lam) * x_b, atol=1e-6)


def test_mixup_per_image_draws_differ_and_blend_exactly():
    mixer = Mixup(Mixup.Params(per_image=True), context())
    x_f, x_b = torch.rand(32, 3, 8, 8), torch.rand(32, 3, 8, 8)
    mix = mixer.mix(x_f, x_b, None, None)
    lam = mix.weight[:, :, :1, :1]
    assert torch.allclose(mix.weight, lam.expand(32, 1, 8, 8))
    assert len(set(lam.flatten().tolist())) == 32
    assert torch.allclose(mix.images, lam * x_f + (1 - lam) * x_b, atol=1e-6)


def test_mixup_lam_law():
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); a = 0.2 -> 0.1786.
    mixer = Mixup(Mixup.Params(alpha=0.2, per_image=True), context())
    lam = mixer.mix(torch.ones(20000, 1, 1, 1), torch.zeros(20000, 1, 1, 1), None, None).weight.flatten()
    assert abs(float(lam.mean()) - 0.5) < 0.015
    assert abs(float(lam.var()) - 1 / (4 * 1.4)) < 0.01


# ------------------------------------------------------------------------ Remix


def constant_mix(lams):
    lam = torch.tensor(lams, dtype=torch.float32).view(-1, 1, 1, 1)
    return MixResult(images=torch.zeros(len(lams), 1, 4, 4), weight=lam.expand(-1, 1, 4, 4))


@pytest.mark.parametrize(
    "lam, y_f, y_b, expected",
    [
        (0.3, 0, 1, 0.0),  # faint majority foreground (100 vs 10, ratio 10 >= 3): label to the minority
        (0.3, 0, 2, 0.0),  # 100 / 30 = 3.33 >= 3
        (0.3, 2, 1, 0.0),  # 30 / 10 = 3: the boundary counts
        (0.3, 3, 1, 0.3),  # 12 / 10 = 1.2 < 3: plain mixup label
        (0.3, 1, 0, 0.3),  # minority foreground with lam < tau: 1 - lam = 0.7 >= tau, unchanged
        (0.8, 1, 0, 1.0),  # faint majority background (1 - lam < tau, 3 * 10 / 100 <= 1): label to the foreground
        (0.6, 1, 2, 1.0),  # 3 * 10 / 30 = 1 <= 1: the boundary counts
        (0.6, 3, 2, 0.6),  # 3 * 12 / 30 = 1.2 > 1: unchanged
        (0.8, 0, 1, 0.8),  # majority foreground with lam >= tau: unchanged
        (0.5, 0, 1, 0.5),  # lam = tau is not < tau: unchanged
    ],
)
def test_remix_rule_branches(lam, y_f, y_b, expected):
    fuser = Remix(Remix.Params(), context(counts=(100, 10, 30, 12)))
    target = fuser.fuse(constant_mix([lam]), torch.tensor([y_f]), torch.tensor([y_b]), None, None)
    assert target.shape == (1, 4)
    assert target[0, y_f].item() == pytest.approx(expected)
    assert target[0, y_b].item() == pytest.approx(1.0 - expected)
    assert target.sum().item() == pytest.approx(1.0)


def test_remix_is_vectorised_over_a_batch_and_reads_the_mean_weight():
    fuser = Remix(Remix.Params(kappa=3.0, tau=0.5), context(counts=(100, 10, 30, 12)))
    # A box-shaped weight of area 0.25 acts as lam = 0.25.
    box = torch.zeros(3, 1, 4, 4)
    box[:, :, :2, :2] = 1.0
    mix = MixResult(images=torch.zeros(3, 1, 4, 4), weight=box)
    target = fuser.fuse(mix, torch.tensor([0, 1, 3]), torch.tensor([1, 0, 2]), None, None)
    assert torch.allclose(target[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))  # faint majority fg dropped
    assert torch.allclose(target[1], torch.tensor([0.75, 0.25, 0.0, 0.0]))
    assert torch.allclose(target[2], torch.tensor([0.0, 0.0, 0.75, 0.25]))


# ------------------------------------------------------------------------ CMO

CMO_RECIPE = (
    TINY_RECIPE
    + """
[sampler]
name = "dual-branch"

[mixer]
name = "cmo"
prob = 1.0
start_epoch = 0
end_epoch = 100

[label_fuser]
name = "remix"
"""
)


def test_cmo_needs_the_dual_branch_sampler(write_recipe, registry):
    path = write_recipe(CMO_RECIPE.replace('name = "dual-branch"', 'name = "instance"'))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [], registry)
    assert len(info.value.lines) == 1
    assert "[sampler].name" in info.value.lines[0] and "dual-branch" in info.value.lines[0]


def test_cmo_defaults_follow_the_reference_window():
    mixer = CMO(CMO.Params(), context(epochs=200))
    assert mixer.params.prob == 0.5
    active = [e for e in range(200) if mixer.active(e)]
    assert active[0] == 4 and active[-1] == 196  # 3 < epoch < 200 - 3
    assert all(CutMix(CutMix.Params(), context(epochs=200)).active(e) for e in range(200))


def test_cmo_foreground_comes_from_the_rebalanced_branch(write_recipe, registry):
    path = write_recipe(
        CMO_RECIPE.replace("n_max = 24", "n_max = 64").replace("imbalance_factor = 6.0", "imbalance_factor = 16.0")
    )
    trainer = Trainer(load_recipe(path, ["run.epochs=6"], registry), registry)
    seen: dict[str, list[torch.Tensor]] = {"f": [], "b": []}
    fuse = trainer.fuser.fuse

    def recording_fuse(mix, y_f, y_b, s_f, s_b):
        seen["f"].append(y_f)
        seen["b"].append(y_b)
        return fuse(mix, y_f, y_b, s_f, s_b)

    trainer.fuser.fuse = recording_fuse
    for epoch in range(6):
        for bg, fg in trainer.sampler.batches(epoch, 16):
            assert fg is not None
            xb, yb = trainer.prepare(bg)
            assert trainer.mixed_batch(epoch, xb, yb, fg) is not None
    counts = torch.tensor(trainer.class_counts, dtype=torch.float64)
    fg_freq = torch.bincount(torch.cat(seen["f"]), minlength=4).double()
    bg_freq = torch.bincount(torch.cat(seen["b"]), minlength=4).double()
    fg_freq, bg_freq = fg_freq / fg_freq.sum(), bg_freq / bg_freq.sum()
    # Background: instance-balanced (proportional to n_c); foreground: class-balanced (~1/4 each).
    assert torch.allclose(bg_freq, counts / counts.sum(), atol=0.05)
    assert torch.allclose(fg_freq, torch.full((4,), 0.25, dtype=torch.float64), atol=0.08)
    rarest = int(counts.argmin())
    assert fg_freq[rarest] > 3 * bg_freq[rarest]


# ------------------------------------------------------------------------ every mixer x every fuser


def _build(registry, kind, name, ctx):
    cls = registry.get(kind, name)
    return cls(cls.Params(), ctx)


def test_every_mixer_with_every_fuser(registry):
    mixers, fusers = registry.names("mixer"), registry.names("label_fuser")
    assert {"cutmix", "mixup", "cmo"} <= set(mixers) and "remix" in fusers
    has_patch = ("patch", "pixel-unshuffle") in registry
    counts = (30, 12, 6, 3)
    checked = 0
    for m in mixers:
        for f in fusers:
            ctx = context(counts=counts, size=(3, 16, 16), seed=1)
            mixer, fuser = _build(registry, "mixer", m, ctx), _build(registry, "label_fuser", f, ctx)
            needs_sal = mixer.needs_saliency or fuser.needs_saliency or fuser.needs_background_saliency
            if needs_sal and not has_patch:
                continue  # saliency maps are per unit of the patch operator
            patch = _build(registry, "patch", "pixel-unshuffle", ctx) if has_patch else None
            x_f, x_b = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
            y_f, y_b = torch.randint(0, 4, (8,)), torch.randint(0, 4, (8,))
            grid = patch.grid(16, 16) if patch is not None else None
            s_f = torch.rand(8, *grid) if needs_sal else None
            s_b = torch.rand(8, *grid) if fuser.needs_background_saliency else None
            mix = mixer.mix(x_f, x_b, s_f, patch)
            assert mix.images.shape == x_f.shape and mix.weight.shape == (8, 1, 16, 16), (m, f)
            assert float(mix.weight.min()) >= 0.0 and float(mix.weight.max()) <= 1.0, (m, f)
            assert torch.allclose(mix.images, mix.weight * x_f + (1 - mix.weight) * x_b, atol=1e-5), (m, f)
            target = fuser.fuse(mix, y_f, y_b, s_f, s_b)
            assert target.shape == (8, 4), (m, f)
            assert torch.isfinite(target).all() and (target >= 0).all(), (m, f)
            assert torch.allclose(target.sum(dim=1), torch.ones(8), atol=1e-5), (m, f)
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("mixer", ["cutmix", "mixup"])
def test_baseline_mixers_train_through_the_engine_with_every_loss(mixer, write_recipe, registry):
    from lsm_registry.engine import Trainer

    # A loss that reads parts of a model's training output (ride: expert_logits) is refused on this
    # single-head model; tests/test_ride.py mixes through the engine with its own model.
    losses = [name for name in registry.names("loss") if not registry.get("loss", name).reads_outputs]
    path = write_recipe(TINY_RECIPE + f'\n[mixer]\nname = "{mixer}"\n\n[label_fuser]\nname = "remix"\n')
    for loss in losses:
        recipe = load_recipe(path, [f"loss.name={loss}"], registry)
        trainer = Trainer(recipe, registry)
        bg, fg = next(iter(trainer.sampler.batches(0, 16)))
        xb, yb = trainer.prepare(bg)
        mixed = trainer.mixed_batch(0, xb, yb, fg)
        x, target = mixed.images, mixed.target
        value = trainer.loss(trainer.model(x), target)
        assert torch.isfinite(value), (mixer, loss)
