"""The optimizer kind: SAM's two-step update by hand, CC-SAM against a per-class loop, recipes and the engine."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from lsm_registry import Optimizer
from lsm_registry.cli import cli
from lsm_registry.components.cc_sam import (
    CCSAM,
    CCSAMFeature,
    CCSAMFeatureParams,
    CCSAMParams,
    cc_sam_feature_weights,
)
from lsm_registry.components.optimizers import SAM, SGD, SAMParams
from lsm_registry.engine import StepStats, Trainer
from lsm_registry.errors import LSMError, RecipeError
from lsm_registry.interfaces import Context, StepClosure
from lsm_registry.plugins import build_registry
from lsm_registry.recipe import load_recipe, validate
from lsm_registry.registry import Owner
from lsm_registry.testing import check_component

CTX = Context(class_counts=(12, 6, 3, 2), image_size=(3, 16, 16))
X = [[1.0, 2.0], [3.0, -1.0]]
T = [1.0, 0.0]
W0 = [0.5, -0.3]


class LinearClosure(StepClosure):
    """L(w) = mean_b (w . x_b - t_b)^2 on a 2-parameter linear model, as the engine's closure runs it."""

    def __init__(self, model):
        self.model, self.calls, self.weights_seen = model, 0, []

    def __call__(self, head=None):
        self.model.zero_grad(set_to_none=True)
        self.weights_seen.append(self.model.weight.detach().clone().view(-1).tolist())
        loss = (self.model(torch.tensor(X)).squeeze(1) - torch.tensor(T)).pow(2).mean()
        loss.backward()
        self.calls += 1
        return loss.detach()


def grad_by_hand(w):
    r = [w[0] * x[0] + w[1] * x[1] - t for x, t in zip(X, T)]
    return [2 / len(X) * sum(ri * x[k] for ri, x in zip(r, X)) for k in range(2)], sum(v * v for v in r) / len(X)


def linear_model():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([W0]))
    return model


def test_sam_two_step_update_by_hand():
    rho, lr = 0.2, 0.1
    model = linear_model()
    opt = SAM(SAMParams(rho=rho), CTX, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0))
    closure = LinearClosure(model)
    loss = opt.step(closure, torch.amp.GradScaler("cpu", enabled=False))

    g, l0 = grad_by_hand(W0)
    norm = math.hypot(*g)
    w_up = [w + rho * gi / norm for w, gi in zip(W0, g)]
    g_up, _ = grad_by_hand(w_up)
    expected = [w - lr * gi for w, gi in zip(W0, g_up)]

    assert closure.calls == 2
    assert closure.weights_seen[0] == pytest.approx(W0) and closure.weights_seen[1] == pytest.approx(w_up, rel=1e-6)
    assert model.weight.detach().view(-1).tolist() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(l0, rel=1e-6)


def test_sam_with_momentum_and_weight_decay_uses_the_original_weights():
    rho, lr, wd = 0.1, 0.05, 0.01
    model = linear_model()
    opt = SAM(SAMParams(rho=rho), CTX, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd))
    opt.step(LinearClosure(model), torch.amp.GradScaler("cpu", enabled=False))
    g, _ = grad_by_hand(W0)
    norm = math.hypot(*g)
    g_up, _ = grad_by_hand([w + rho * gi / norm for w, gi in zip(W0, g)])
    # First SGD step: buffer = g + wd * w, w <- w - lr * buffer, w the weights before the ascent.
    expected = [w - lr * (gi + wd * w) for w, gi in zip(W0, g_up)]
    assert model.weight.detach().view(-1).tolist() == pytest.approx(expected, rel=1e-6)


def test_sgd_is_one_pass_and_one_plain_step():
    model = linear_model()
    opt = SGD(SGD.Params(), CTX, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0))
    closure = LinearClosure(model)
    opt.step(closure, torch.amp.GradScaler("cpu", enabled=False))
    g, _ = grad_by_hand(W0)
    assert closure.calls == 1
    assert model.weight.detach().view(-1).tolist() == pytest.approx([w - 0.1 * gi for w, gi in zip(W0, g)], rel=1e-6)


# ------------------------------------------------------------------ CC-SAM


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.classifier = nn.Linear(3, 4)


def cc_sam_by_loop(classifier, h, y, noise_ratio, flat_ratio, counts):
    """The reference code's algorithm, class by class: per-class classifier gradients, per-tensor radius."""
    z = classifier(h)
    per_image = F.cross_entropy(z, y, reduction="none")
    params = list(classifier.parameters())
    n_params = sum(p.numel() for p in params)
    flat = torch.zeros_like(per_image)
    for c in y.unique().tolist():
        idx = (y == c).nonzero().squeeze(1)
        grads = torch.autograd.grad(per_image[idx].mean(), params, retain_graph=True)
        shifted = []
        for p, g in zip(params, grads):
            g_norm = g.norm()
            magnitude = (
                noise_ratio
                * p.detach().norm().sqrt()
                / g_norm.sqrt()
                / math.sqrt(2)
                / max(counts[c] - 1, 1) ** 0.25
                / n_params**0.25
                * math.sqrt(n_params)
            )
            shifted.append(p + (magnitude * g / g_norm).detach())
        z_c = F.linear(h[idx], shifted[0], shifted[1])
        flat = flat.index_put((idx,), F.cross_entropy(z_c, y[idx], reduction="none"))
    return (1 - flat_ratio) * per_image.mean() + flat_ratio * flat.mean()


def test_cc_sam_head_matches_the_per_class_loop_in_value_and_gradients():
    counts = (12, 6, 3, 2)
    ctx = Context(class_counts=counts, image_size=(3, 16, 16))
    model = Head()
    opt = CCSAM(CCSAMParams(noise_ratio=0.5, flat_ratio=0.5), ctx, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.attach(model)
    g = torch.Generator().manual_seed(1)
    h0 = torch.randn(6, 3, generator=g)
    y = torch.tensor([0, 0, 1, 3, 3, 0])

    def grads(fn):
        h = h0.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        value = fn(h)
        value.backward()
        return value.detach(), [
            model.classifier.weight.grad.clone(),
            model.classifier.bias.grad.clone(),
            h.grad.clone(),
        ]

    ours, g_ours = grads(lambda h: opt.head(h, model.classifier(h), y, lambda z: F.cross_entropy(z, y)))
    ref, g_ref = grads(lambda h: cc_sam_by_loop(model.classifier, h, y, 0.5, 0.5, counts))
    plain, _ = grads(lambda h: F.cross_entropy(model.classifier(h), y))
    assert not torch.allclose(ours, plain)  # the perturbation is there
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cc_sam_soft_one_hot_targets_equal_hard_ones():
    model = Head()
    opt = CCSAM(CCSAMParams(noise_ratio=0.5), CTX, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.attach(model)
    h = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 2, 2, 0, 3])
    q = F.one_hot(y, 4).float()
    hard = opt.head(h, model.classifier(h), y, lambda z: F.cross_entropy(z, y))
    soft = opt.head(h, model.classifier(h), q, lambda z: -(q * F.log_softmax(z, 1)).sum(1).mean())
    torch.testing.assert_close(hard, soft)


def test_cc_sam_refuses_a_cosine_head():
    from lsm_registry.components.models import NormedLinear

    model = nn.Module()
    model.classifier = NormedLinear(3, 4)
    opt = CCSAM(CCSAMParams(), CTX, torch.optim.SGD(Head().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="nn.Linear"):
        opt.attach(model)


def cc_sam_feature_by_loop(classifier, h, y, radius, flat_ratio, weights):
    """The reference code's stage 2, class by class: the gradient of the class's mean loss with respect to the
    features, normalised over the class's rows, moves them by radius * w_c; the moved images' CE is weighted by w_c."""
    feats = h.detach().clone().requires_grad_(True)
    per_image = F.cross_entropy(classifier(feats), y, reduction="none")
    flat = torch.zeros_like(per_image)
    for c in y.unique().tolist():
        idx = (y == c).nonzero().squeeze(1)
        (g,) = torch.autograd.grad(per_image[idx].mean(), feats, retain_graph=True)
        moved = classifier(feats + radius * weights[c] * g / g.norm())
        flat = flat.index_put((idx,), F.cross_entropy(moved, y, reduction="none")[idx] * weights[c])
    return (1 - flat_ratio) * per_image.mean() + flat_ratio * flat.mean()


def test_cc_sam_feature_weights_by_hand():
    w = cc_sam_feature_weights(torch.tensor([100, 10, 1]), 2.0)
    expected = [math.log(1.01) / 2, math.log(10.01) / 2, math.log(100.01) / 2]
    assert w.tolist() == pytest.approx(expected, rel=1e-6)


def test_cc_sam_feature_head_matches_the_per_class_loop_in_value_and_gradients():
    counts = (12, 6, 3, 2)
    ctx = Context(class_counts=counts, image_size=(3, 16, 16))
    model = Head()
    opt = CCSAMFeature(CCSAMFeatureParams(radius=0.7, flat_ratio=0.3), ctx, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.attach(model)
    weights = cc_sam_feature_weights(torch.tensor(counts), 2.0)
    h = torch.randn(7, 3, generator=torch.Generator().manual_seed(4))  # a frozen backbone's features: no grad
    y = torch.tensor([0, 0, 1, 3, 3, 0, 2])

    def grads(fn):
        model.zero_grad(set_to_none=True)
        value = fn()
        value.backward()
        return value.detach(), [model.classifier.weight.grad.clone(), model.classifier.bias.grad.clone()]

    ours, g_ours = grads(lambda: opt.head(h, model.classifier(h), y, lambda z: F.cross_entropy(z, y)))
    ref, g_ref = grads(lambda: cc_sam_feature_by_loop(model.classifier, h, y, 0.7, 0.3, weights))
    plain, g_plain = grads(lambda: F.cross_entropy(model.classifier(h), y))
    assert not torch.allclose(ours, plain)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    q = F.one_hot(y, 4).float()  # a one-hot soft target is the hard label
    soft = opt.head(h, model.classifier(h), q, lambda z: -(q * F.log_softmax(z, 1)).sum(1).mean())
    torch.testing.assert_close(soft.detach(), ours)


def test_a_tiny_crt_like_stage_with_cc_sam_feature_trains_only_the_classifier(tmp_path):
    registry = build_registry(entry_points=False)
    parent = Trainer(load_recipe("recipes/quickstart.toml", TINY, registry), registry, run_dir=tmp_path / "s1")
    parent.fit()
    stage = TINY + [
        f"stage.init_from={tmp_path / 's1'}",
        "stage.train=classifier+bn-stats",
        "sampler.name=class-balanced",
        "optim.name=cc-sam-feature",
    ]
    trainer = Trainer(load_recipe("recipes/quickstart.toml", stage, registry), registry)
    before = {k: v.clone() for k, v in trainer.module.named_parameters()}
    assert math.isfinite(trainer.fit()["final_loss"])
    changed = {k for k, v in trainer.module.named_parameters() if not torch.equal(v, before[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("cls", [SGD, SAM, CCSAM, CCSAMFeature])
def test_builtin_optimizers_conform(cls):
    check_component(cls)


# ------------------------------------------------------------------ recipes, CLI, plugins


def test_list_components_kind_optimizer_lists_the_three():
    out = CliRunner().invoke(cli, ["list-components", "--kind", "optimizer"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    for name in ("sgd", "sam", "cc-sam"):
        assert f" {name} " in out.output


def test_optim_keeps_its_keys_and_takes_the_optimizer_parameters():
    registry = build_registry(entry_points=False)
    recipe = load_recipe("recipes/ce.toml", ["optim.name=sam", "optim.rho=0.1"], registry)
    assert recipe.optim.lr == 0.1 and recipe.optim.milestones == (160, 180)
    assert recipe.optimizer.name == "sam" and recipe.optimizer.params.rho == 0.1
    # The resolved recipe writes both halves into [optim] and reads back to the same recipe.
    again = validate(recipe.to_dict(), "resolved.toml", registry)
    assert again.to_dict() == recipe.to_dict()
    assert load_recipe("recipes/ce.toml", registry=registry).optimizer.name == "sgd"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.rho=0.1"], r"\[optim\]\.rho: neither a key of \[optim\] nor a parameter of optimizer 'sgd'"),
        (["optim.name=sam", "optim.rh=0.1"], r"Did you mean 'rho'\?"),
        (["optim.name=sam", "optim.rho=-1"], r"\[optim\]\.rho: must be > 0"),
        (["optim.name=sam", "run.amp=fp16"], r"\[optim\]\.name: optimizer 'sam' does not work with fp16"),
        (["optim.name=cc-sam", "optim.flat_ratio=0"], r"\[optim\]\.flat_ratio: must be in \(0, 1\]"),
        (["optim.name=adam"], r"\[optim\]\.name: unknown optimizer 'adam'"),
    ],
)
def test_bad_optimizer_settings_are_one_line_errors(overrides, message):
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe("recipes/ce.toml", overrides, build_registry(entry_points=False))
    assert all("\n" not in line for line in info.value.lines)


class Lookahead(Optimizer):
    """A plugin's optimizer: SGD that steps at half the learning rate."""

    name = "t-half-step"
    supports_grad_scaler = True

    @attrs.frozen
    class Params:
        pass

    def step(self, closure, scaler):
        loss = closure()
        for group in self.base.param_groups:
            group["lr"] *= 0.5
        scaler.step(self.base)
        scaler.update()
        for group in self.base.param_groups:
            group["lr"] *= 2.0
        return loss


def test_a_plugin_can_add_an_optimizer():
    registry = build_registry(entry_points=False)
    registry.register(Lookahead, Owner("t", "t-dist", "0"))
    check_component(Lookahead, registry)
    recipe = load_recipe("recipes/ce.toml", ["optim.name=t-half-step"], registry)
    assert recipe.optimizer.name == "t-half-step"


# ------------------------------------------------------------------ the engine

TINY = [
    "run.epochs=1",
    "run.device=cpu",
    "run.eval_every=1",
    "data.n_max=120",
    "data.imbalance_factor=10",
    "data.test_per_class=5",
    "data.val_per_class=2",
    "model.width=4",
    "optim.batch_size=32",
    "optim.warmup_epochs=0",
]


def test_a_tiny_run_with_sam_trains_end_to_end():
    registry = build_registry(entry_points=False)
    recipe = load_recipe("recipes/quickstart.toml", TINY + ["optim.name=sam", "optim.rho=0.05"], registry)
    summary = Trainer(recipe, registry).fit()
    assert math.isfinite(summary["final_loss"]) and 0.0 <= summary["top1"] <= 1.0


@pytest.mark.parametrize("extra", [["optim.name=cc-sam"], ["loss.name=ib", "loss.start_epoch=0"]])
def test_features_reach_the_loss_and_the_optimizer_in_a_tiny_run(extra):
    registry = build_registry(entry_points=False)
    recipe = load_recipe("recipes/quickstart.toml", TINY + extra, registry)
    trainer = Trainer(recipe, registry)
    assert trainer.needs_features
    assert math.isfinite(trainer.fit()["final_loss"])


def test_sam_counts_its_batch_once_in_the_batch_norm_statistics():
    registry = build_registry(entry_points=False)
    buffers = {}
    for name in ("sgd", "sam"):
        recipe = load_recipe("recipes/quickstart.toml", TINY + [f"optim.name={name}"], registry)
        trainer = Trainer(recipe, registry)
        trainer.generator.manual_seed(5)
        bg, fg = next(iter(trainer.sampler.batches(0, 32)))
        trainer.train_step(0, bg, fg, StepStats.zeros(trainer.device))
        buffers[name] = {
            k: v.clone() for k, v in trainer.module.state_dict().items() if "running" in k or "tracked" in k
        }
    for key, value in buffers["sgd"].items():
        assert torch.equal(value, buffers["sam"][key]), key


def test_a_loss_that_reads_features_needs_the_feature_api():
    registry = build_registry(entry_points=False)
    recipe = load_recipe("recipes/quickstart.toml", TINY + ["loss.name=ib"], registry)
    trainer = Trainer(recipe, registry)
    trainer.module.forward_features = None  # a model without the feature API
    with pytest.raises(LSMError, match=r"\[model\] resnet32: loss 'ib' reads the features .* no forward_features"):
        trainer._check_feature_api()
