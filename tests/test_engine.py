import pytest
import torch

from lsm_registry.engine import Trainer
from lsm_registry.plugins import build_registry
from lsm_registry.recipe import load_recipe


@pytest.fixture(scope="module")
def registry():
    return build_registry(entry_points=False)


def train(path, registry, overrides=()):
    trainer = Trainer(load_recipe(path, list(overrides), registry), registry)
    return trainer, trainer.fit()


def test_one_tiny_epoch_trains_and_evaluates(tiny_recipe, registry):
    trainer, summary = train(tiny_recipe, registry)
    assert summary["epochs"] == 1
    assert 0.0 <= summary["top1"] <= 1.0
    assert len(summary["per_class"]) == 4
    assert summary["class_counts"] == [24, 13, 7, 4]
    assert torch.isfinite(torch.tensor(summary["final_loss"]))


def test_same_seed_same_metrics(tiny_recipe, registry):
    _, first = train(tiny_recipe, registry, ["run.epochs=2"])
    _, second = train(tiny_recipe, registry, ["run.epochs=2"])
    assert first["per_class"] == second["per_class"]
    assert first["final_loss"] == second["final_loss"]


def test_another_seed_changes_the_run(tiny_recipe, registry):
    _, first = train(tiny_recipe, registry)
    _, other = train(tiny_recipe, registry, ["run.seed=4"])
    assert first["final_loss"] != other["final_loss"]


def test_lr_schedule_warmup_then_steps(tiny_recipe, registry):
    recipe = load_recipe(
        tiny_recipe,
        ["optim.warmup_epochs=2", "optim.lr=0.1", "optim.milestones=[4, 6]", "optim.gamma=0.1", "run.epochs=8"],
        registry,
    )
    trainer = Trainer(recipe, registry)
    lrs = [round(trainer.lr_at(e), 8) for e in range(8)]
    assert lrs == [0.05, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


def test_cosine_schedule_decays_to_zero(tiny_recipe, registry):
    recipe = load_recipe(tiny_recipe, ["optim.schedule=cosine", "run.epochs=10"], registry)
    trainer = Trainer(recipe, registry)
    assert trainer.lr_at(0) == pytest.approx(0.05)
    assert trainer.lr_at(9) < trainer.lr_at(5) < trainer.lr_at(1)


def test_resnet32_takes_any_channel_count():
    from lsm_registry.components.models import CifarResNet

    net = CifarResNet(32, num_classes=3, in_channels=1, width=4)
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    assert sum(1 for m in net.modules() if isinstance(m, torch.nn.Conv2d)) == 31


def test_training_split_is_scored_with_the_test_view(tiny_recipe, registry):
    """train_* are the model's accuracy on its own training images in eval mode: they agree
    with scoring the split by hand, and the per-class list covers every class."""
    trainer, summary = train(tiny_recipe, registry)
    by_hand = trainer.evaluate(split="train")
    assert summary["train_top1"] == pytest.approx(by_hand["top1"])
    assert summary["train_per_class"] == pytest.approx(by_hand["per_class"])
    assert len(summary["train_per_class"]) == 4
    record = trainer.history[-1]
    assert {"train_top1", "train_many", "train_medium", "train_few"} <= set(record)


def test_score_train_off_leaves_no_train_metrics(tiny_recipe, registry):
    _, summary = train(tiny_recipe, registry, ["run.score_train=false"])
    assert not any(key.startswith("train_") for key in summary)
