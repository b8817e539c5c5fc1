"""RIDE: the multi-expert model (expert average at test time, expert logits in training), the
diversity loss against its formula, Grad-CAM of the experts' mean logit, the engine's
training-output extension point, and the recipes."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import TINY_RECIPE
from test_bbn import SHRINK, tiny_copy

from lsm_registry.cli import cli
from lsm_registry.components.losses import LDAM, LDAMParams
from lsm_registry.components.patches import COMPONENTS as PATCHES
from lsm_registry.components.ride import EXPERT_LOGITS, RIDE, MultiExpertNet, RIDELoss, diversity_temperatures
from lsm_registry.components.saliency import GradCAM
from lsm_registry.engine import Trainer
from lsm_registry.errors import LSMError
from lsm_registry.interfaces import Context, ModelOutput
from lsm_registry.plugins import build_registry
from lsm_registry.recipe import load_recipe
from lsm_registry.testing import check_component

ROOT = Path(__file__).resolve().parents[1]
COUNTS = (50, 20, 8, 3, 1)
RIDE_TINY = TINY_RECIPE.replace('name = "resnet32"', 'name = "ride"').replace(
    '[loss]\nname = "ce"', '[loss]\nname = "ride"\nreweight = "drw"\nreweight_epoch = 1'
)


@pytest.fixture(scope="module")
def registry():
    return build_registry(entry_points=False)


def _net(normed: bool = True, experts: int = 3) -> MultiExpertNet:
    torch.manual_seed(0)
    return MultiExpertNet(
        num_classes=5, in_channels=3, width=4, num_experts=experts, expert_widths=(6, 12), normed_head=normed
    )


# ------------------------------------------------------------------------ the model


@pytest.mark.parametrize("normed", [True, False])
def test_the_prediction_is_the_experts_mean_logit(normed):
    net = _net(normed).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        experts = net.expert_logits(x)
        logits = net(x)
    assert experts.shape == (3, 4, 5) and isinstance(logits, torch.Tensor)
    assert torch.allclose(logits, experts.mean(dim=0), atol=1e-6)
    # Each expert is its own network after the shared stage: its logits from its own stages and head.
    with torch.no_grad():
        shared = net.layer1(F.relu(net.bn1(net.conv1(x))))
        for e, stages in enumerate(net.experts.experts):
            h = stages(shared).mean(dim=(2, 3))
            head = net.classifier
            if normed:
                own = F.normalize(h, dim=1) @ F.normalize(head.weight[e], dim=0)
            else:
                own = h @ head.weight[e].T + head.bias[e]
            assert torch.allclose(experts[e], own, atol=1e-5)
            assert not torch.allclose(experts[e], experts[(e + 1) % 3], atol=1e-3)


def test_in_training_the_forward_gives_every_experts_logits():
    net = _net().train()
    out = net(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    assert isinstance(out, ModelOutput) and set(out.parts) == {EXPERT_LOGITS}
    assert out.parts[EXPERT_LOGITS].shape == (3, 4, 5)
    assert torch.allclose(out.logits, out.parts[EXPERT_LOGITS].mean(dim=0))


def test_the_model_conforms(registry):
    check_component(registry.get("model", "ride"), registry)


# ------------------------------------------------------------------------ the ResNet-50 version


def _factory50(**params) -> RIDE:
    return RIDE(RIDE.Params(arch="resnet50", **params), Context(COUNTS, (3, 224, 224)))


def test_the_resnet50_experts_share_stem_layer1_layer2_and_own_layer3_layer4():
    import torchvision

    reference = {k: v.shape for k, v in torchvision.models.resnet50(num_classes=5).state_dict().items()}
    for reduce, planes in ((True, (192, 384)), (False, (256, 512))):
        factory = _factory50(reduce_dimension=reduce)
        torch.manual_seed(0)
        net = factory.build(len(COUNTS), 3, True)
        ours = {k: v.shape for k, v in net.state_dict().items()}
        # Shared: torchvision's resnet50 stem, layer1 and layer2, once.
        shared = {
            k.replace("stem.", "", 1): v for k, v in ours.items() if not k.startswith(("experts.", "classifier."))
        }
        assert shared == {k: v for k, v in reference.items() if k.startswith(("conv1.", "bn1.", "layer1.", "layer2."))}
        # Per expert: layer3 and layer4 of 6 and 3 bottlenecks; full width without reduce_dimension.
        experts = net.experts.experts
        assert len(experts) == 3 and len({id(e) for e in experts}) == 3
        for expert in experts:
            assert len(expert.layer3) == 6 and len(expert.layer4) == 3
            assert expert.layer3[0].conv1.weight.shape[:2] == (planes[0], 512)
            assert expert.layer4[-1].conv3.weight.shape[0] == 4 * planes[1]
        if not reduce:
            own = {k.split(".", 3)[3]: v for k, v in ours.items() if k.startswith("experts.experts.0.")}
            assert own == {k: v for k, v in reference.items() if k.startswith(("layer3.", "layer4."))}
        assert tuple(net.classifier.weight.shape) == (3, 4 * planes[1], len(COUNTS))
        weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        assert factory.weights(len(COUNTS)) == weights + net.classifier.weight.numel()  # what the memory check counts


def test_the_resnet50_version_keeps_the_forward_contract():
    torch.manual_seed(0)
    net = _factory50(width=2).build(len(COUNTS), 3, True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    assert list(net.saliency_layers()) == ["experts", "layer2", "layer1"]
    assert net.experts(net.shared(x)).shape == (2, 3 * 4 * 48, 2, 2)  # every expert's final map, side by side
    net.train()
    out = net(x)
    assert isinstance(out, ModelOutput) and out.parts[EXPERT_LOGITS].shape == (3, 2, len(COUNTS))
    assert torch.allclose(out.logits, out.parts[EXPERT_LOGITS].mean(dim=0), atol=1e-6)
    # Expert 1's logits reach its own layer3 / layer4 and the shared stages, not another expert's.
    out.parts[EXPERT_LOGITS][1].sum().backward()
    experts = net.experts.experts
    assert experts[1].layer3[0].conv1.weight.grad is not None and experts[1].layer4[0].conv1.weight.grad is not None
    untouched = (experts[0].layer3[0].conv1.weight.grad, experts[2].layer4[0].conv1.weight.grad)
    assert all(g is None or not g.any() for g in untouched)
    assert net.layer2[0].conv1.weight.grad is not None and net.stem.conv1.weight.grad is not None
    net.eval()
    with torch.no_grad():
        logits = net(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, len(COUNTS))


def test_the_resnet50_model_conforms_and_wants_32_pixels(registry):
    factory = registry.get("model", "ride")
    check_component(factory, registry, params=factory.Params(arch="resnet50", width=2))
    _factory50().check_input((3, 32, 32))
    with pytest.raises(ValueError, match="ride with arch 'resnet50' needs images of at least 32x32"):
        _factory50().check_input((3, 16, 16))


# ------------------------------------------------------------------------ the loss


def _loss(epoch: int, **params) -> RIDELoss:
    loss = RIDELoss(RIDELoss.Params(reweight="drw", reweight_epoch=2, **params), Context(COUNTS, (3, 32, 32)))
    loss.set_epoch(epoch)
    return loss


def _experts() -> torch.Tensor:
    return torch.tanh(torch.randn(3, 6, len(COUNTS), generator=torch.Generator().manual_seed(3)))  # cosine logits


def test_the_temperatures_follow_the_class_frequencies():
    t = diversity_temperatures(torch.tensor(COUNTS), base=1.5, reweight=0.05)
    prior = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    w = len(COUNTS) * prior * 0.05 + 0.95
    assert torch.allclose(t.double(), 1.5 * w / w.max())
    assert t[0] == pytest.approx(1.5) and bool((t[:-1] >= t[1:]).all())


@pytest.mark.parametrize("epoch", [0, 2])  # before DRW: one temperature; from reweight_epoch: per class
def test_the_diversity_term_against_its_formula(epoch):
    loss = _loss(epoch, diversity_factor=-0.45, diversity_temperature=1.5)
    experts = _experts()
    s = 30.0
    if epoch < 2:
        t, t_mean = 1.5, 1.5
    else:
        t = diversity_temperatures(torch.tensor(COUNTS), 1.5, 0.05)
        t_mean = float(t.mean())
    mean_dist = F.softmax(s * experts.mean(dim=0) / t, dim=1)
    # The reference's RIDELoss: per expert, T_mean^2 * KL(mean || expert), batch mean, summed over experts.
    expected = sum(
        t_mean**2 * F.kl_div(F.log_softmax(s * z / t, dim=1), mean_dist, reduction="batchmean") for z in experts
    )
    assert torch.allclose(loss.diversity(experts), expected, atol=1e-5)
    # By hand on one expert: sum_c q_c (log q_c - log p_c) / B.
    p0 = F.softmax(s * experts[0] / t, dim=1)
    by_hand = (mean_dist * (mean_dist.log() - p0.log())).sum() / experts.shape[1]
    assert torch.allclose(F.kl_div(p0.log(), mean_dist, reduction="batchmean"), by_hand, atol=1e-5)


@pytest.mark.parametrize("epoch", [0, 2])
def test_the_loss_is_ldam_per_expert_plus_the_weighted_diversity(epoch):
    loss = _loss(epoch)
    experts = _experts()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    ldam = LDAM(LDAMParams(reweight="drw", reweight_epoch=2), Context(COUNTS, (3, 32, 32)))
    ldam.set_epoch(epoch)
    expected = sum(ldam(z, y) for z in experts) - 0.2 * loss.diversity(experts)
    got = loss(experts.mean(dim=0), y, outputs={EXPERT_LOGITS: experts})
    assert torch.allclose(got, expected, atol=1e-5)
    # LDAM with DRW by hand on one expert: margins on the true class, scale 30, class-balanced weights from epoch 2.
    m = ldam.margins
    z = 30.0 * (experts[0] - F.one_hot(y, len(COUNTS)) * m)
    w = ldam.class_weights()
    assert torch.allclose(ldam(experts[0], y), F.cross_entropy(z, y, weight=w), atol=1e-5)
    # Without the experts (a model that gives none, the conformance kit): LDAM on the logits it gets.
    assert torch.allclose(loss(experts[0], y), ldam(experts[0], y), atol=1e-6)


def test_the_loss_takes_mixed_soft_targets_per_expert():
    loss, experts = _loss(0), _experts()
    y_f, y_b = torch.tensor([1, 2, 3, 4, 0, 1]), torch.tensor([0, 0, 1, 1, 2, 2])
    lam = torch.full((6,), 0.25)
    soft = lam[:, None] * F.one_hot(y_f, 5) + (1 - lam[:, None]) * F.one_hot(y_b, 5)
    got = loss(experts.mean(dim=0), soft, None, outputs={EXPERT_LOGITS: experts})
    ldam = LDAM(LDAMParams(reweight="drw", reweight_epoch=2), Context(COUNTS, (3, 32, 32)))
    expected = sum(0.25 * ldam(z, y_f) + 0.75 * ldam(z, y_b) for z in experts) - 0.2 * loss.diversity(experts)
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_loss_conforms(registry):
    check_component(registry.get("loss", "ride"), registry)


# ------------------------------------------------------------------------ the engine


def test_the_engine_hands_the_expert_logits_to_the_loss(write_recipe, registry):
    trainer = Trainer(load_recipe(write_recipe(RIDE_TINY), ["run.epochs=2"], registry), registry)
    x, y = trainer.prepare(next(iter(trainer.sampler.batches(0, 16)))[0])
    trainer.module.train()
    trainer.loss.set_epoch(1)  # DRW weights and per-class temperatures on
    got = trainer.forward_loss(x, y, None)
    out = trainer.module(x)  # train mode: batch statistics, so the same forward again
    assert torch.allclose(got, trainer.loss(out.logits, y, outputs=dict(out.parts)), atol=1e-5)
    assert not torch.allclose(got, trainer.loss(out.logits, y), atol=1e-3)  # the experts' terms, not the mean's
    trainer.fit()
    assert trainer.history[-1]["top1"] is not None


@pytest.mark.parametrize("mixer", ["cutmix", "mixup"])
def test_baseline_mixers_train_the_experts_through_the_engine(mixer, write_recipe, registry):
    path = write_recipe(RIDE_TINY + f'\n[mixer]\nname = "{mixer}"\n\n[label_fuser]\nname = "remix"\n')
    trainer = Trainer(load_recipe(path, [], registry), registry)
    bg, fg = next(iter(trainer.sampler.batches(0, 16)))
    xb, yb = trainer.prepare(bg)
    mixed = trainer.mixed_batch(0, xb, yb, fg)
    trainer.module.train()
    value = trainer.forward_loss(mixed.images, mixed.target, mixed)
    assert torch.isfinite(value)
    value.backward()
    heads = trainer.module.classifier.weight.grad
    assert heads is not None and bool((heads.flatten(1).abs().sum(dim=1) > 0).all())  # every expert's head learns


def test_a_loss_that_reads_expert_logits_refuses_a_model_without_them(tiny_recipe, registry):
    recipe = load_recipe(tiny_recipe, ["loss.name='ride'"], registry)
    with pytest.raises(LSMError) as info:
        Trainer(recipe, registry)
    message = str(info.value)
    assert "[loss].name = 'ride': reads the model's expert_logits" in message and "'resnet32'" in message
    assert "\n" not in message


# ------------------------------------------------------------------------ saliency


def test_gradcam_explains_the_experts_mean_logit_on_every_experts_last_stage():
    net = _net().eval()
    patch = next(c for c in PATCHES if c.name == "pixel-unshuffle")
    patch = patch(patch.Params(size=4), Context(COUNTS, (3, 32, 32)))
    gradcam = GradCAM(GradCAM.Params(), Context(COUNTS, (3, 32, 32)))
    gradcam.check_model(net)
    assert not gradcam.can_use_fast_path(net)  # no single linear head: the autograd path
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 2, 3])
    cam = gradcam.class_activation(net, x, y)
    # By hand: A = every expert's final map side by side; alpha = spatial mean of d mean-logit_y / d A.
    shared = net.layer1(F.relu(net.bn1(net.conv1(x)))).detach()
    maps = net.experts(shared).detach().requires_grad_(True)
    mean_logit = net.classifier(maps.mean(dim=(2, 3))).mean(dim=0)
    (grad,) = torch.autograd.grad(mean_logit.gather(1, y.view(-1, 1)).sum(), maps)
    expected = (grad.mean(dim=(2, 3), keepdim=True) * maps.detach()).sum(dim=1)
    assert torch.allclose(cam, expected, atol=1e-6)
    # ... which is the mean over experts of each expert's own Grad-CAM of the mean logit.
    k = maps.shape[1] // 3
    per_expert = [
        (grad[:, e * k : (e + 1) * k].mean(dim=(2, 3), keepdim=True) * maps[:, e * k : (e + 1) * k]).sum(dim=1)
        for e in range(3)
    ]
    assert torch.allclose(cam, sum(per_expert), atol=1e-6)
    scores = gradcam(net, x, y, patch)
    assert scores.shape == (4, 8, 8) and bool(torch.isfinite(scores).all()) and bool((scores >= 0).all())
    assert all(p.grad is None for p in net.parameters()) and not net.training


def test_cached_gradcam_refuses_the_multi_expert_model_in_one_line(write_recipe, registry):
    text = (
        RIDE_TINY + '\n[sampler]\nname = "dual-branch"\n\n[saliency]\nname = "cached-gradcam"\n\n'
        '[mixer]\nname = "lsm"\nstart_epoch = 0\nend_epoch = { none = true }\n'
    )
    with pytest.raises(LSMError, match=r"\[saliency\]: cached-gradcam: model MultiExpertNet has no forward_features"):
        Trainer(load_recipe(write_recipe(text), [], registry), registry)


# ------------------------------------------------------------------------ recipes


@pytest.mark.parametrize(
    "name", ["ride.toml", "ride_lsm.toml", "fashion_mnist_lt/ride.toml", "fashion_mnist_lt/ride_lsm.toml"]
)
def test_the_recipe_trains_one_tiny_epoch(name, tmp_path, registry):
    recipe = tiny_copy(ROOT / "recipes" / name, tmp_path, registry)
    mixing = (
        ["--set", "mixer.start_epoch=0", "--unset", "mixer.end_epoch", "--set", "mixer.prob=1.0"]
        if "lsm" in name
        else []
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--no-progress", *SHRINK, *mixing])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["top1"] is not None
    assert record["mixed_fraction"] == (1.0 if "lsm" in name else 0.0)
    resolved = tomllib.loads((out / "recipe.toml").read_text())
    assert resolved["model"]["name"] == "ride" and resolved["loss"]["name"] == "ride"
    if "lsm" in name:
        assert resolved["saliency"]["name"] == "gradcam" and (out / "mixed_samples.png").is_file()
