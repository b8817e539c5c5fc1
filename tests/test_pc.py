"""PC, the prototype classifier as a second stage: the head's logits, the ``pc`` callback's class
means, what trains, the one-line refusals, and a tiny two-stage run with an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_RECIPE, trainer_for
from test_bbn import ROOT, SHRINK, tiny_copy

from lsm_registry.checkpoint import list_checkpoints, read_model_state
from lsm_registry.cli import cli
from lsm_registry.components.models import ResNet32
from lsm_registry.components.prototypes import PrototypeHead, PrototypeInit
from lsm_registry.data.augment import normalise
from lsm_registry.errors import LSMError
from lsm_registry.interfaces import Context

HEAD_KEYS = {"classifier.prototypes", "classifier.log_scale"}


def pc_recipe(parent: Path | str, head: str = "prototypes", reset: bool = True, extra: str = "") -> str:
    """The tiny recipe as a PC stage of ``parent``: prototype head, the ``pc`` callback, logit-adjusted CE."""
    text = TINY_RECIPE.replace('name = "tiny"', 'name = "tiny-pc"\ncallbacks = ["pc"]')
    text = text.replace("width = 4", f'width = 4\nhead = "{head}"')
    text = text.replace('name = "ce"', 'name = "logit-adjust"\ntau = 1.0')
    return (
        text
        + f"""
[callbacks.pc]
batch_size = 5

[stage]
init_from = "{parent}"
train = "classifier"
reset_classifier = {"true" if reset else "false"}
{extra}"""
    )


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# ------------------------------------------------------------------------------ the head


def test_logits_are_minus_the_scaled_euclidean_distance():
    torch.manual_seed(0)
    head = PrototypeHead(6, 5)
    assert torch.equal(head.scale, torch.ones(6))  # the channel scales start at 1
    with torch.no_grad():
        head.log_scale.normal_()
    f = 3 * torch.randn(9, 6)
    f[0] = head.prototypes[2].detach()  # a feature on a prototype: distance 0, no NaN
    s = head.log_scale.exp()
    expected = -(s * f.unsqueeze(1) - s * head.prototypes.unsqueeze(0)).norm(dim=2)
    logits = head(f)
    torch.testing.assert_close(logits[1:], expected[1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[0, [0, 1, 3, 4]], expected[0, [0, 1, 3, 4]], rtol=1e-4, atol=1e-4)
    # On the prototype: 0 up to the expanded square's resolution, sqrt(eps) times the norms.
    assert -1e-3 < logits[0, 2] <= 0
    logits.sum().backward()
    assert torch.isfinite(head.prototypes.grad).all() and torch.isfinite(head.log_scale.grad).all()
    # The Euclidean (not squared) distance: each logit's gradient in its prototype has norm at most max(s).
    head.zero_grad()
    head(f[1:2])[0, 3].backward()
    assert head.prototypes.grad[3].norm() <= s.max() * (1 + 1e-5)


def test_the_model_option_builds_the_head_and_refuses_a_cosine_one():
    context = Context(class_counts=(5, 3, 2), image_size=(3, 32, 32))
    model = ResNet32(ResNet32.Params(width=4, head="prototypes"), context).build(3, 3, False)
    assert isinstance(model.classifier, PrototypeHead) and tuple(model.classifier.prototypes.shape) == (3, 16)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="plain linear classifier"):
        ResNet32(ResNet32.Params(width=4, head="prototypes"), context).build(3, 3, True)


# ------------------------------------------------------------------------------ the callback


def test_the_prototypes_start_at_the_class_means_of_the_frozen_features(write_recipe, registry, parent_run):
    trainer = trainer_for(write_recipe, pc_recipe(parent_run), registry)
    parent, _ = read_model_state(list_checkpoints(parent_run)[-1])
    state = trainer.module.state_dict()
    assert HEAD_KEYS <= set(state) and "classifier.weight" not in state  # the parent's linear layer is not loaded
    assert all(torch.equal(state[k], parent[k]) for k in state if k not in HEAD_KEYS)  # the backbone is
    callback = next(c for c in trainer.callbacks if isinstance(c, PrototypeInit))
    callback.on_fit_start(trainer)
    assert trainer.module.training  # the model is back in the mode it was in
    module, split = trainer.module.eval(), trainer.data.train
    with torch.no_grad():
        x = normalise(split.fetch(torch.arange(len(split)), trainer.device), trainer.data.mean, trainer.data.std)
        features = module.forward_features(x).mean(dim=(2, 3))
    means = torch.stack([features[split.labels == c].mean(dim=0) for c in range(trainer.data.num_classes)])
    head = trainer.module.classifier
    torch.testing.assert_close(head.prototypes.detach(), means, rtol=1e-5, atol=1e-5)
    assert torch.equal(head.log_scale.detach(), torch.zeros(16))
    assert callback.state_dict() == {"initialised": True}


def test_a_classifier_stage_trains_only_the_prototypes_and_scales(write_recipe, registry, parent_run):
    trainer = trainer_for(write_recipe, pc_recipe(parent_run), registry)
    head = trainer.module.classifier
    trainable = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trainable == {id(head.prototypes), id(head.log_scale)}
    trainer.fire("on_fit_start")
    x, y = trainer.prepare(torch.arange(16))
    trainer.forward_loss(x, y, None).backward()
    for name, p in trainer.module.named_parameters():
        if name in HEAD_KEYS:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    trainer.fit()
    after = trainer.module.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k not in HEAD_KEYS)
    assert not torch.equal(after["classifier.prototypes"], before["classifier.prototypes"])


def test_pc_refuses_a_model_without_a_prototype_head_in_one_line(write_recipe, registry, parent_run):
    trainer = trainer_for(write_recipe, pc_recipe(parent_run, head="linear"), registry)
    with pytest.raises(LSMError) as info:
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message and "[run].callbacks: 'pc'" in message and 'model.head = "prototypes"' in message


def test_another_head_without_reset_classifier_is_refused_in_one_line(write_recipe, registry, parent_run):
    with pytest.raises(LSMError) as info:
        trainer_for(write_recipe, pc_recipe(parent_run, reset=False), registry)
    message = str(info.value)
    assert "\n" not in message and "stage.reset_classifier = true" in message and "model.head" in message


# ------------------------------------------------------------------------------ end to end


def test_stage1_then_pc_end_to_end_and_a_resume_keeps_the_trained_prototypes(write_recipe, parent_run, tmp_path):
    pc = write_recipe(pc_recipe(parent_run).replace("epochs = 1", "epochs = 2"), "pc.toml")
    straight = tmp_path / "pc-straight"
    result = invoke("run", str(pc), "--out", str(straight), "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["parent"]["run_name"] == "tiny" and 0.0 <= summary["top1"] <= 1.0
    # One epoch, then a resume: the callback must not put the class means back over the trained prototypes.
    split = tmp_path / "pc-split"
    result = invoke("run", str(pc), "--out", str(split), "--no-progress", "--set", "run.epochs=1")
    assert result.exit_code == 0, result.output
    result = invoke("resume", str(split), "--no-progress", "--set", "run.epochs=2")
    assert result.exit_code == 0, result.output
    a, _ = read_model_state(list_checkpoints(straight)[-1])
    b, _ = read_model_state(list_checkpoints(split)[-1])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "stage1, stage2", [("ce.toml", "pc.toml"), ("fashion_mnist_lt/ce.toml", "fashion_mnist_lt/pc.toml")]
)
def test_the_shipped_pc_recipe_trains_one_tiny_epoch_on_its_stage1(stage1, stage2, tmp_path, registry):
    parent = tmp_path / "stage1"
    result = invoke(
        "run",
        str(tiny_copy(ROOT / "recipes" / stage1, tmp_path, registry)),
        "--out",
        str(parent),
        "--no-progress",
        *SHRINK,
    )
    assert result.exit_code == 0, result.output
    (tmp_path / "two").mkdir()
    recipe = tiny_copy(ROOT / "recipes" / stage2, tmp_path / "two", registry)
    out = tmp_path / "pc"
    result = invoke(
        "run", str(recipe), "--out", str(out), "--no-progress", *SHRINK, "--set", f"stage.init_from='{parent}'"
    )
    assert result.exit_code == 0, result.output
    state, _ = read_model_state(list_checkpoints(out)[-1])
    assert HEAD_KEYS <= set(state) and json.loads((out / "summary.json").read_text())["top1"] is not None
