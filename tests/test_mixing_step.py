"""The one mixing step: the Trainer and `lsm preview` mix through it, and anyone can call it."""

from __future__ import annotations

import torch
from conftest import TINY_RECIPE

from lsm_registry.engine import Trainer, epoch_seed
from lsm_registry.mixing import MixedBatch, MixingStep, mix_batches
from lsm_registry.recipe import load_recipe
from lsm_registry.testing import ReferencePatch, tiny_context, tiny_model
from lsm_registry.viz.pictures import preview_batch

MIXING = (
    TINY_RECIPE
    + """
[sampler]
name = "dual-branch"

[mixer]
name = "lsm"
prob = 1.0
start_epoch = 0
end_epoch = { none = true }
"""
)


def _first_training_mix(trainer: Trainer) -> MixedBatch:
    """The mixed batch the training step makes from the first batch of epoch 0."""
    seen = []
    step = trainer.mixing

    def recording(*args, **kwargs):
        seen.append(step(*args, **kwargs))
        return seen[-1]

    trainer.mixing = recording
    trainer.generator.manual_seed(epoch_seed(trainer.recipe.run.seed, 0))
    bg, fg = next(iter(trainer.sampler.batches(0, trainer.recipe.optim.batch_size)))
    xb, yb = trainer.prepare(bg)
    mixed = trainer.mixed_batch(0, xb, yb, fg)
    assert mixed is seen[0]
    return mixed


def test_preview_and_training_mix_the_same_batch(write_recipe, registry):
    recipe = load_recipe(write_recipe(MIXING), [], registry)
    trained = _first_training_mix(Trainer(recipe, registry))
    previewed, _, _ = preview_batch(Trainer(recipe, registry), rows=recipe.optim.batch_size, epoch=0)
    for field in ("images", "target", "mask", "y_f", "y_b", "lam", "x_f", "x_b", "unit_mask", "saliency_f"):
        assert torch.equal(getattr(trained, field), getattr(previewed, field)), field


def test_preview_rows_only_cut_the_picture(write_recipe, registry):
    recipe = load_recipe(write_recipe(MIXING), [], registry)
    three, _, _ = preview_batch(Trainer(recipe, registry), rows=3, epoch=0)
    five, _, _ = preview_batch(Trainer(recipe, registry), rows=5, epoch=0)
    assert len(three) == 3 and len(five) == 5
    assert torch.equal(three.images, five.images[:3]) and torch.equal(three.y_f, five.y_f[:3])


def test_anyone_can_mix_two_batches(registry):
    ctx = tiny_context()
    mixer = registry.get("mixer", "lsm")(registry.get("mixer", "lsm").Params(), ctx)
    fuser = registry.get("label_fuser", "saliency")(registry.get("label_fuser", "saliency").Params(), ctx)
    saliency = registry.get("saliency", "gradcam")(registry.get("saliency", "gradcam").Params(), ctx)
    g = torch.Generator().manual_seed(0)
    b, (ch, h, w), c = 4, ctx.image_size, ctx.num_classes
    x_b, x_f = torch.randn(b, ch, h, w, generator=g), torch.randn(b, ch, h, w, generator=g)
    y_b, y_f = torch.tensor([0, 1, 2, 0]), torch.tensor([3, 3, 1, 0])
    batch = mix_batches(
        tiny_model(), x_b, y_b, x_f, y_f, mixer=mixer, fuser=fuser, patch=ReferencePatch(), saliency=saliency
    )
    assert batch.images.shape == (b, ch, h, w) and batch.target.shape == (b, c)
    assert torch.allclose(batch.images, batch.mask * x_f + (1 - batch.mask) * x_b)
    two_label = batch.lam[:, None] * torch.eye(c)[y_f] + (1 - batch.lam[:, None]) * torch.eye(c)[y_b]
    assert torch.allclose(batch.target, two_label, atol=1e-6)
    # The last pair is of one class: its target is one-hot and lam is the pasted area.
    assert torch.allclose(batch.lam[3], batch.mask[3].mean())
    assert 0 < float(batch.lam[0]) < 1


def test_a_mixing_step_without_the_saliency_it_needs_is_refused(registry):
    ctx = tiny_context()
    mixer = registry.get("mixer", "lsm")(registry.get("mixer", "lsm").Params(), ctx)
    fuser = registry.get("label_fuser", "area")(registry.get("label_fuser", "area").Params(), ctx)
    try:
        MixingStep(mixer, fuser, ReferencePatch())
    except ValueError as exc:
        assert "needs a saliency provider" in str(exc)
    else:
        raise AssertionError("a saliency-driven mixer without a provider was accepted")
