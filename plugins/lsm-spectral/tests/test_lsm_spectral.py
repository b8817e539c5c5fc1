"""Tests of the lsm-spectral plugin: conformance (lsm_registry.testing) and properties."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsm_registry.params import ParamError
from lsm_registry.testing import ReferencePatch, check_component, tiny_context, tiny_model
from lsm_spectral.mixer import SaliencyMix
from lsm_spectral.saliency import SpectralResidual

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "spectral_lsm.toml"


# ------------------------------------------------------------------ conformance


@pytest.mark.parametrize("cls", [SpectralResidual, SaliencyMix], ids=lambda c: c.name)
def test_conforms_to_the_abi(cls):
    check_component(cls)


def test_conforms_with_other_params():
    check_component(SpectralResidual, params=SpectralResidual.Params(box=5, blur_sigma=0.0, max_side=8))
    check_component(SaliencyMix, params=SaliencyMix.Params(alpha=0.4, same_lam=True, prob=1.0))


def test_entry_point_is_registered_by_distribution():
    eps = [ep for ep in md.entry_points(group="lsm_registry") if ep.name == "spectral"]
    assert eps and eps[0].dist.name == "lsm-spectral" and eps[0].value == "lsm_spectral.plugin"
    from lsm_registry.plugins import build_registry

    registry = build_registry()
    assert registry.get("saliency", "spectral-residual") is SpectralResidual
    assert registry.get("mixer", "saliencymix") is SaliencyMix
    assert registry.entry("mixer", "saliencymix").owner.distribution == "lsm-spectral"
    assert not [p for p in registry.problems if "lsm-spectral" in p]


# ------------------------------------------------------------------ spectral residual


def _square(side: int, top: int, left: int, size: int, background: float, channels: int = 3) -> torch.Tensor:
    x = torch.full((1, channels, side, side), background)
    x[:, :, top : top + size, left : left + size] = background + 1.0
    return x


@settings(max_examples=30, deadline=None, database=None)
@given(
    top=st.integers(0, 32 - 6),
    left=st.integers(0, 32 - 6),
    size=st.integers(3, 6),
    background=st.floats(-2.0, 2.0),
)
def test_bright_square_on_flat_background_is_the_most_salient_unit(top, left, size, background):
    provider = SpectralResidual(SpectralResidual.Params(), tiny_context())
    patch = ReferencePatch(4)
    x = _square(32, top, left, size, background)
    scores = provider(tiny_model(), x, torch.zeros(1, dtype=torch.int64), patch)
    assert scores.shape == (1, 8, 8)
    r, c = divmod(int(scores.view(-1).argmax()), 8)
    # The unit with the highest score overlaps the square.
    assert r * 4 < top + size and top < (r + 1) * 4
    assert c * 4 < left + size and left < (c + 1) * 4


def test_flat_images_get_uniform_one_over_n():
    provider = SpectralResidual(SpectralResidual.Params(), tiny_context())
    x = torch.cat([torch.full((1, 3, 16, 16), v) for v in (0.0, -1.3, 7.0)])
    scores = provider(tiny_model(), x, torch.zeros(3, dtype=torch.int64), ReferencePatch(4))
    assert torch.equal(scores, torch.full((3, 4, 4), 1.0 / 16))


def test_each_image_is_scored_on_its_own():
    provider = SpectralResidual(SpectralResidual.Params(), tiny_context())
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    patch, model, y = ReferencePatch(4), tiny_model(), torch.zeros(5, dtype=torch.int64)
    batch = provider(model, x, y, patch)
    alone = torch.cat([provider(model, x[i : i + 1], y[i : i + 1], patch) for i in range(5)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
    assert float(batch.amin()) >= 0.0 and float(batch.amax()) <= 1.0


def test_large_images_are_shrunk_then_pooled_by_the_patch_size():
    provider = SpectralResidual(SpectralResidual.Params(max_side=32), tiny_context())
    x = _square(224, 100, 30, 30, 0.0)
    scores = provider(tiny_model(), x, torch.zeros(1, dtype=torch.int64), ReferencePatch(28))
    assert scores.shape == (1, 8, 8)
    r, c = divmod(int(scores.view(-1).argmax()), 8)
    assert r * 28 < 130 and 100 < (r + 1) * 28 and c * 28 < 60 and 30 < (c + 1) * 28


def test_even_box_is_refused():
    with pytest.raises(ParamError, match="must be odd"):
        SpectralResidual.Params(box=4)


# ------------------------------------------------------------------ saliencymix


def _mixer(seed: int = 0, **kw) -> SaliencyMix:
    return SaliencyMix(SaliencyMix.Params(**kw), tiny_context(seed))


def _box_bounds(weight: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of each image's box; asserts the weight is one filled rectangle."""
    out = []
    for w in weight[:, 0]:
        rows = w.any(dim=1).nonzero().view(-1)
        cols = w.any(dim=0).nonzero().view(-1)
        if rows.numel() == 0:
            out.append((0, 0, 0, 0))
            continue
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        expected = torch.zeros_like(w)
        expected[y0:y1, x0:x1] = 1
        assert torch.equal(w, expected), "the pasted region is not one box"
        out.append((y0, y1, x0, x1))
    return out


@settings(max_examples=30, deadline=None, database=None)
@given(
    units=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=4, max_size=4),
    alpha=st.sampled_from([0.3, 1.0, 2.0]),
    seed=st.integers(0, 1000),
)
def test_box_is_centred_on_the_most_salient_unit(units, alpha, seed):
    saliency = torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(seed)) * 0.5
    for i, (r, c) in enumerate(units):
        saliency[i, r, c] = 1.0
    x_f, x_b = torch.ones(4, 3, 16, 16), torch.zeros(4, 3, 16, 16)
    res = _mixer(seed, alpha=alpha).mix(x_f, x_b, saliency, ReferencePatch(4))
    assert res.unit_mask is None
    assert torch.equal(res.images[:, :1], res.weight)  # x_f = 1 and x_b = 0: the image is the box
    for (y0, y1, x0, x1), (r, c) in zip(_box_bounds(res.weight), units):
        cy, cx = 4 * r + 2, 4 * c + 2  # pixel centre of the unit
        if y1 > y0:
            assert y0 <= cy < y1 and x0 <= cx < x1
            if 0 < y0 and y1 < 16:  # not clipped: centred, within the integer rounding
                assert abs((y0 + y1) / 2 - cy) <= 0.5
            if 0 < x0 and x1 < 16:
                assert abs((x0 + x1) / 2 - cx) <= 0.5


def test_box_side_follows_sqrt_one_minus_lam():
    mixer = _mixer(3, alpha=1.0)
    saliency = torch.zeros(64, 8, 8)
    saliency[:, 4, 4] = 1.0  # unit (4, 4): pixel centre (18, 18)
    x = torch.zeros(64, 1, 32, 32)
    lam = torch.rand(64, generator=torch.Generator().manual_seed(3))  # the draws the mixer makes (alpha = 1)
    res = mixer.mix(x + 1, x, saliency, ReferencePatch(4))
    sides = (32 * torch.sqrt(1 - lam)).to(torch.int64).tolist()
    for (y0, y1, x0, x1), s in zip(_box_bounds(res.weight), sides):
        lo, hi = max(0, 18 - s // 2), min(32, 18 - s // 2 + s)  # the box, clipped to the image
        assert (y0, y1, x0, x1) == ((lo, hi, lo, hi) if s > 0 else (0, 0, 0, 0))
    assert len(set(sides)) > 10


def test_flat_saliency_ties_are_broken_at_random():
    res = _mixer(1, alpha=0.5).mix(
        torch.ones(64, 3, 16, 16), torch.zeros(64, 3, 16, 16), torch.ones(64, 4, 4), ReferencePatch(4)
    )
    centres = {b for b in _box_bounds(res.weight) if b[1] > b[0]}
    assert len(centres) > 8


def test_needs_saliency_and_matching_shapes():
    mixer = _mixer()
    x = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="needs the foreground saliency"):
        mixer.mix(x, x, None, ReferencePatch(4))
    with pytest.raises(ValueError, match="expected"):
        mixer.mix(x, x, torch.ones(2, 2, 2), ReferencePatch(4))
    assert SaliencyMix.needs_saliency and SaliencyMix.default_fuser == "area"


def test_mixing_window_and_params():
    mixer = SaliencyMix(SaliencyMix.Params(start_epoch=2, end_epoch=-2), tiny_context())  # 6 epochs
    assert [mixer.active(e) for e in range(6)] == [False, False, True, True, False, False]
    with pytest.raises(ParamError, match="must be > start_epoch") as info:
        SaliencyMix.Params(start_epoch=5, end_epoch=3)
    assert info.value.key == "end_epoch"
    with pytest.raises(ParamError, match="must be > 0") as info:
        SaliencyMix.Params(alpha=0.0)
    assert info.value.key == "alpha"


# ------------------------------------------------------------------ the recipe


def test_recipe_trains_and_mixes(tmp_path):
    from lsm_registry.engine import Trainer
    from lsm_registry.plugins import build_registry
    from lsm_registry.recipe import load_recipe

    registry = build_registry()
    tiny = [
        "run.epochs=2",
        "run.eval_every=2",
        "data.num_classes=4",
        "data.n_max=24",
        "data.imbalance_factor=6.0",
        "data.test_per_class=4",
        "model.width=4",
        "optim.batch_size=16",
        "optim.warmup_epochs=0",
        "mixer.prob=1.0",
        "mixer.start_epoch=0",
        "mixer.end_epoch=-1",
    ]
    recipe = load_recipe(RECIPE, tiny, registry)
    assert (recipe.mixer.name, recipe.saliency.name, recipe.label_fuser.name, recipe.sampler.name) == (
        "saliencymix",
        "spectral-residual",
        "saliency",
        "dual-branch",
    )
    trainer = Trainer(recipe, registry, run_dir=tmp_path / "run")
    summary = trainer.fit()
    assert [h["mixed_fraction"] for h in trainer.history] == [1.0, 0.0]
    assert 0.0 < trainer.history[0]["fg_label_weight"] < 1.0
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in trainer.history)
    assert summary["top1"] is not None
