"""BBN: the cumulative-learning schedule, the reversed sampler, the bilateral-branch model and its
test-time combination, the engine's second-batch extension point, and the recipes."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import TINY_RECIPE

from lsm_registry.cli import cli
from lsm_registry.components.bbn import BBN, TEST_ALPHA, BilateralBranchNet, CumulativeLearning, cumulative_alpha
from lsm_registry.components.losses import CrossEntropy
from lsm_registry.components.samplers import ReversedSampler
from lsm_registry.engine import Trainer
from lsm_registry.errors import LSMError
from lsm_registry.interfaces import Context
from lsm_registry.plugins import build_registry
from lsm_registry.recipe import RECIPE_FORMAT, dumps_toml, load_recipe
from lsm_registry.testing import check_component

ROOT = Path(__file__).resolve().parents[1]
BBN_TINY = TINY_RECIPE.replace('name = "resnet32"', 'name = "bbn"') + '\n[sampler]\nname = "reversed"\n'
#: A data set small enough for one epoch in a second, in place of the recipe's own.
TINY_DATA = {"name": "synthetic-lt", "num_classes": 4, "n_max": 24, "imbalance_factor": 6.0, "test_per_class": 4}
#: What shrinks a shipped recipe to one tiny epoch on the CPU.
SHRINK = [
    "--set",
    "run.epochs=1",
    "--set",
    "optim.batch_size=16",
    "--set",
    "model.width=4",
    "--set",
    "optim.warmup_epochs=0",
    "--set",
    "run.device=cpu",
]


@pytest.fixture(scope="module")
def registry():
    return build_registry(entry_points=False)


def tiny_copy(recipe: Path, folder: Path, registry) -> Path:
    """The shipped recipe as it resolves, with the tiny synthetic set in place of its data."""
    tables = {t: v for t, v in load_recipe(recipe, registry=registry).to_dict().items() if isinstance(v, dict)}
    tables["data"] = dict(TINY_DATA)
    path = folder / recipe.name
    path.write_text(dumps_toml(tables, format=RECIPE_FORMAT))
    return path


# ------------------------------------------------------------------------ cumulative learning


def test_alpha_falls_parabolically_from_one():
    epochs = 200
    alphas = [cumulative_alpha(e, epochs) for e in range(epochs)]
    assert alphas[0] == 1.0 and alphas[100] == pytest.approx(0.75) and alphas[-1] == pytest.approx(1 - (199 / 200) ** 2)
    assert all(a > b for a, b in zip(alphas, alphas[1:]))
    assert alphas == pytest.approx([1 - (e / epochs) ** 2 for e in range(epochs)])


def test_the_callback_sets_alpha_on_the_model_every_epoch_and_logs_it(write_recipe, registry):
    recipe = load_recipe(write_recipe(BBN_TINY), ["run.epochs=3", "run.eval_every=3"], registry)
    trainer = Trainer(recipe, registry)
    assert [c.name for c in trainer.callbacks].count("cumulative-learning") == 1  # brought by the model factory
    seen = []
    trainer.module.register_forward_pre_hook(
        lambda module, args: seen.append(module.alpha) if module.training else None
    )
    trainer.fit()
    expected = [1.0, 1 - (1 / 3) ** 2, 1 - (2 / 3) ** 2]
    steps = trainer.sampler.steps_per_epoch(recipe.optim.batch_size)
    assert seen == pytest.approx([a for a in expected for _ in range(steps)])
    assert [r["bbn_alpha"] for r in trainer.history] == pytest.approx(expected)


def test_the_callback_refuses_a_model_without_the_weight(tiny_recipe, registry):
    recipe = load_recipe(tiny_recipe, ["run.callbacks=['cumulative-learning']"], registry)
    with pytest.raises(LSMError, match="has no cumulative-learning weight"):
        Trainer(recipe, registry).fit()


# ------------------------------------------------------------------------ reversed sampler


def test_the_reversed_branch_draws_classes_in_proportion_to_n_max_over_n():
    counts = (400, 160, 64, 26, 10, 4)
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(1))]
    sampler = ReversedSampler(
        ReversedSampler.Params(), Context(class_counts=counts, image_size=(3, 32, 32), seed=7), labels
    )
    drawn, backgrounds = [], []
    for epoch in range(60):
        for bg, fg in sampler.batches(epoch, 64):
            drawn.append(labels[fg])
            backgrounds.append(bg)
        assert (
            torch.cat(backgrounds[-sampler.steps_per_epoch(64) :]).unique().numel() == sampler.steps_per_epoch(64) * 64
        )
    observed = torch.bincount(torch.cat(drawn), minlength=len(counts)).double()
    n = torch.tensor(counts, dtype=torch.float64)
    expected_p = (n.max() / n) / (n.max() / n).sum()
    expected = expected_p * observed.sum()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # 5 degrees of freedom: P(chi2 > 25.7) = 1e-4 for a sampler that is right.
    assert chi2 < 25.7, (observed.tolist(), expected.tolist())
    balanced = torch.full_like(expected, observed.sum() / len(counts))
    assert float(((observed - balanced) ** 2 / balanced).sum()) > 1000  # and it is not class-balanced sampling
    assert observed[-1] > 50 * observed[0]  # the rarest class comes up n_max / n_min = 100 times as often


def test_the_reversed_sampler_conforms(registry):
    check_component(registry.get("sampler", "reversed"), registry)


# ------------------------------------------------------------------------ the model


def _net(normed: bool = False) -> BilateralBranchNet:
    torch.manual_seed(0)
    return BilateralBranchNet(num_classes=5, in_channels=3, width=4, normed_head=normed)


def test_test_time_output_weights_both_branches_of_one_image_alike():
    net = _net().eval()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    net.set_alpha(0.9)  # training's weight must not leak into the test-time output
    with torch.no_grad():
        shared = net.shared(x)
        f_c = net.branches.conventional(shared).mean(dim=(2, 3))
        f_r = net.branches.rebalancing(shared).mean(dim=(2, 3))
        k = f_c.shape[1]
        w, b = net.classifier.weight, net.classifier.bias
        # 0.5 / 0.5, times the reference's factor 2: each branch's own classifier half, summed.
        expected = 2 * TEST_ALPHA * f_c @ w[:, :k].T + 2 * (1 - TEST_ALPHA) * f_r @ w[:, k:].T + b
        logits = net(x)
        assert torch.allclose(logits, expected, atol=1e-5)
        net.set_alpha(TEST_ALPHA)
        assert torch.allclose(net(x, x), logits, atol=1e-6)  # the same image through both branches at 0.5
        assert torch.allclose(net.classifier(net.forward_features(x).mean(dim=(2, 3))), logits, atol=1e-6)


def test_training_mixes_the_two_batches_features_by_alpha():
    net = _net().eval()  # eval: batch norm by running statistics, so each pass is a fixed function
    g = torch.Generator().manual_seed(3)
    x, x2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    net.set_alpha(0.7)
    with torch.no_grad():
        f_c = net.branches.conventional(net.shared(x)).mean(dim=(2, 3))
        f_r = net.branches.rebalancing(net.shared(x2)).mean(dim=(2, 3))
        expected = net.classifier(torch.cat((2 * 0.7 * f_c, 2 * 0.3 * f_r), dim=1))
        assert torch.allclose(net(x, x2), expected, atol=1e-5)
    assert net.second_batch_share == pytest.approx(0.3)


def test_the_step_target_and_loss_are_alpha_weighted_over_the_two_labels(write_recipe, registry):
    recipe = load_recipe(write_recipe(BBN_TINY), [], registry)
    trainer = Trainer(recipe, registry)
    trainer.module.set_alpha(0.7)
    bg, fg = next(iter(trainer.sampler.batches(0, recipe.optim.batch_size)))
    _, yb = trainer.prepare(bg)
    second = trainer.second_batch(yb, fg)
    y2 = trainer.data.train.labels[fg]
    assert torch.equal(second.y_f, y2) and torch.equal(second.y_b, yb) and second.images.shape[0] == fg.numel()
    expected = 0.7 * F.one_hot(yb, 4) + 0.3 * F.one_hot(y2, 4)
    assert torch.allclose(second.target, expected.float())
    z = torch.randn(fg.numel(), 4, generator=torch.Generator().manual_seed(4))
    ce = trainer.loss(z, second.target, second)
    assert torch.allclose(ce, 0.7 * F.cross_entropy(z, yb) + 0.3 * F.cross_entropy(z, y2), atol=1e-6)
    # With DRW weights: each label's term normalised by its own weights, the reference's weighted CE pair.
    drw = CrossEntropy(CrossEntropy.Params(reweight="cb"), trainer.context)
    w = drw.class_weights()
    assert torch.allclose(
        drw(z, second.target, second),
        0.7 * F.cross_entropy(z, yb, weight=w) + 0.3 * F.cross_entropy(z, y2, weight=w),
        atol=1e-6,
    )


def test_a_training_step_feeds_both_batches_to_the_model(write_recipe, registry):
    recipe = load_recipe(write_recipe(BBN_TINY), [], registry)
    trainer = Trainer(recipe, registry)
    calls = []
    trainer.module.register_forward_hook(lambda m, args, out: calls.append(len(args)))
    trainer.fit()
    assert calls and set(calls[: trainer.sampler.steps_per_epoch(recipe.optim.batch_size)]) == {2}
    assert trainer.history[-1]["bbn_alpha"] == 1.0 and "top1" in trainer.history[-1]


def test_a_file_backed_set_decodes_the_second_batch_of_every_planned_step(tmp_path, registry):
    from test_file_loader import jpeg_tree

    root = jpeg_tree(tmp_path / "tree")
    path = tmp_path / "r.toml"
    path.write_text(f"""
[run]
epochs = 1
[data]
name = "imagenet-lt"
root = "{root.as_posix()}"
image_size = 32
workers = 0
[model]
name = "bbn"
width = 4
[optim]
batch_size = 8
warmup_epochs = 0
[sampler]
name = "reversed"
[loss]
name = "ce"
""")
    trainer = Trainer(load_recipe(path, registry=registry), registry)
    plan = trainer.plan(0, 8)
    expected = list(trainer.sampler.batches(0, 8))
    assert [torch.equal(step.fg, fg) for step, (_, fg) in zip(plan, expected)] == [True] * len(expected)
    trainer.fit()
    assert trainer.history[-1]["top1"] is not None


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["sampler.name='instance'"],
            "[sampler].name = 'instance': model 'bbn' trains on the sampler's second index set",
        ),
        (["sampler.name='dual-branch'", "mixer.name='cutmix'"], "[mixer].name = 'cutmix': model 'bbn' trains on"),
        (["sampler.name='reversed'", "optim.name='cc-sam'"], "[optim] cc-sam: reads the features of one batch"),
    ],
)
def test_what_cannot_train_bbn_is_refused_in_one_line(write_recipe, registry, overrides, words):
    path = write_recipe(TINY_RECIPE.replace('name = "resnet32"', 'name = "bbn"'))
    with pytest.raises(LSMError) as info:
        Trainer(load_recipe(path, overrides, registry), registry)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_the_model_and_its_callback_conform(registry):
    check_component(registry.get("model", "bbn"), registry)
    check_component(registry.get("callback", "cumulative-learning"), registry)
    factory = registry.get("model", "bbn")
    brought = factory(factory.Params(), Context((3, 1), (3, 32, 32))).configure_callbacks()
    assert [type(c) for c in brought] == [CumulativeLearning]


# ------------------------------------------------------------------------ the ResNet-50 version


def _net50(width: int = 2, classes: int = 5) -> BilateralBranchNet:
    torch.manual_seed(0)
    return BilateralBranchNet(num_classes=classes, in_channels=3, width=width, arch="resnet50")


def test_the_resnet50_branches_are_layer4s_last_bottleneck_duplicated():
    import torchvision

    net, reference = _net50(width=16, classes=10), torchvision.models.resnet50(num_classes=10)
    ours = {k: v.shape for k, v in net.state_dict().items()}
    theirs = {k: v.shape for k, v in reference.state_dict().items()}
    last = {k[len("layer4.2.") :]: v for k, v in theirs.items() if k.startswith("layer4.2.")}
    # Stem, layer1 .. layer3 and layer4's first two bottlenecks: torchvision's resnet50, tensor for tensor.
    shared = {k.replace("stem.", "", 1): v for k, v in ours.items() if not k.startswith(("branches.", "classifier."))}
    assert shared == {k: v for k, v in theirs.items() if not k.startswith(("layer4.2.", "fc."))}
    for branch in ("conventional", "rebalancing"):
        assert {
            k[len(f"branches.{branch}.0.") :]: v for k, v in ours.items() if k.startswith(f"branches.{branch}.")
        } == last
    assert net.branches.conventional is not net.branches.rebalancing
    assert tuple(net.classifier.weight.shape) == (10, 2 * 2048)
    # The parameter count: torchvision's, plus one more last bottleneck, plus the head's second 2048 inputs.
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(net) == count(reference) + count(reference.layer4[2]) + 2048 * 10
    factory = BBN(BBN.Params(arch="resnet50"), Context((3, 1), (3, 224, 224)))
    weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert factory.weights(10) == weights  # the memory check counts what is built


def test_the_resnet50_version_keeps_the_forward_contract():
    net = _net50().eval()
    g = torch.Generator().manual_seed(6)
    x, x2 = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        logits = net(x)
        assert logits.shape == (2, 5)
        features = net.forward_features(x)
        assert features.shape == (2, 2 * 128 * 2, 2, 2)  # 1/32 of 64, both branches' 128 x width channels
        assert torch.allclose(net.classifier(features.mean(dim=(2, 3))), logits, atol=1e-5)
        net.set_alpha(0.7)
        f_c = net.branches.conventional(net.shared(x)).mean(dim=(2, 3))
        f_r = net.branches.rebalancing(net.shared(x2)).mean(dim=(2, 3))
        assert torch.allclose(net(x, x2), net.classifier(torch.cat((1.4 * f_c, 0.6 * f_r), dim=1)), atol=1e-5)
    assert list(net.saliency_layers()) == ["branches", "layer4", "layer3", "layer2", "layer1"]
    net.train()
    out = net(x, x2)
    out.sum().backward()
    assert out.shape == (2, 5) and net.branches.rebalancing[0].conv1.weight.grad is not None
    assert net.stem.conv1.weight.grad is not None


def test_the_resnet50_model_conforms_and_wants_32_pixels(registry):
    factory = registry.get("model", "bbn")
    check_component(factory, registry, params=factory.Params(arch="resnet50", width=2))
    resnet50 = factory(factory.Params(arch="resnet50"), Context((3, 1), (3, 224, 224)))
    resnet50.check_input((3, 32, 32))
    with pytest.raises(ValueError, match="bbn with arch 'resnet50' needs images of at least 32x32"):
        resnet50.check_input((3, 28, 28))
    factory(factory.Params(), Context((3, 1), (3, 28, 28))).check_input((3, 28, 28))  # resnet32: 8x8 will do


# ------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("name", ["bbn.toml", "fashion_mnist_lt/bbn.toml"])
def test_the_recipe_trains_one_tiny_epoch(name, tmp_path, registry):
    recipe = tiny_copy(ROOT / "recipes" / name, tmp_path, registry)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--no-progress", *SHRINK])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["bbn_alpha"] == 1.0 and record["top1"] is not None
    resolved = tomllib.loads((out / "recipe.toml").read_text())
    assert resolved["model"]["name"] == "bbn" and resolved["sampler"]["name"] == "reversed"


def test_the_branch_logits_add_up_to_the_test_time_output():
    net = _net().eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        conventional, rebalancing = net.branch_logits(x)
        f_c = net.branches.conventional(net.shared(x)).mean(dim=(2, 3))
        k = f_c.shape[1]
        assert torch.allclose(conventional, f_c @ net.classifier.weight[:, :k].T + net.classifier.bias, atol=1e-5)
        assert torch.allclose(conventional + rebalancing - net.classifier.bias, net(x), atol=1e-5)
    with pytest.raises(LSMError, match="linear classifier"):
        _net(normed=True).branch_logits(x)


def test_the_branch_benchmark_scores_each_branch_of_a_finished_run(write_recipe, registry, tmp_path, capsys):
    import lsm_registry
    from bench.bbn_branches import main

    lsm_registry.train(write_recipe(BBN_TINY), out=tmp_path / "bbn", registry=registry)
    assert main([str(tmp_path / "bbn")]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split()[:2] for line in lines if line.startswith(("train", "test"))]
    assert rows == [[s, p] for s in ("train", "test") for p in ("both", "conventional", "rebalancing")]
    assert all(len(line.split("per class")[1].split()) == 4 for line in lines if "per class" in line)


def test_the_branch_benchmark_refuses_a_run_of_another_model(write_recipe, registry, tmp_path, capsys):
    import lsm_registry
    from bench.bbn_branches import main

    lsm_registry.train(write_recipe(TINY_RECIPE), out=tmp_path / "ce", registry=registry)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "ce")])
    assert "not bbn" in capsys.readouterr().err
