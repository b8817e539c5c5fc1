"""The paper recipes as their reference code runs them ("Faithful rows"): one test per fix.

1. IB's learning-rate cut when its loss starts (``[optim] lr_factors``);
2. cRT / LWS re-estimate batch-norm statistics on the balanced batches (``[stage] bn``);
3. CC-SAM stage 1 under mixup groups by the un-mixed label (``mixed_labels = "unmixed"``);
4. per-group learning rates (``[optim] lr_groups``, MiSLAS), MiSLAS's and LADE's schedules,
   CC-SAM stage 2's ramp (``ramp_epochs``) and its start from the best checkpoint
   (``[stage] init_checkpoint``).

Each reference rule is transcribed from the authors' code, named where it is used.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RECIPE
from torch import nn

from lsm_registry.components.callbacks import learning_rate
from lsm_registry.components.cc_sam import CCSAM, CCSAMFeatureParams, CCSAMParams, flat_share
from lsm_registry.engine import Trainer
from lsm_registry.errors import LSMError, RecipeError
from lsm_registry.interfaces import Context
from lsm_registry.recipe import load_recipe, migrate

ROOT = Path(__file__).resolve().parents[1]


def recipe(name: str, registry, overrides=()):
    return load_recipe(ROOT / "recipes" / name, list(overrides), registry)


def schedule(r) -> list[float]:
    return [learning_rate(r.optim, r.run.epochs, e) for e in range(r.run.epochs)]


# ------------------------------------------------------------------ 1. IB: the lr cut at the loss's start


def ib_reference_lr(epoch: int, lr: float = 0.1, start_ib_epoch: int = 100) -> float:
    """pseulki/IB-Loss, cifar_train.py, adjust_learning_rate (0-based ``epoch``, IB loss)."""
    epoch = epoch + 1
    if epoch > start_ib_epoch:
        if epoch > 180:
            return lr * 0.000001
        if epoch > 160:
            return lr * 0.0001
        return lr * 0.01
    if epoch <= 5:
        return lr * epoch / 5
    if epoch > 180:
        return lr * 0.0001
    if epoch > 160:
        return lr * 0.01
    return lr


def test_ib_recipe_lr_sequence_is_the_reference_one(registry):
    ours = schedule(recipe("ib.toml", registry))
    assert len(ours) == 200
    for epoch, value in enumerate(ours):
        assert value == pytest.approx(ib_reference_lr(epoch), rel=1e-12), epoch
    assert ours[99] == pytest.approx(0.1) and ours[100] == pytest.approx(1e-3)  # the cut is there
    # The Fashion-MNIST-LT version: the same shape over 10 epochs (IB from epoch 5).
    small = recipe("fashion_mnist_lt/ib.toml", registry)
    assert small.loss.params.start_epoch == 5
    assert schedule(small) == pytest.approx([0.1] * 5 + [1e-3] * 3 + [1e-5, 1e-7], rel=1e-12)


def test_lr_factors_multiply_any_schedule_and_are_checked(registry, tiny_recipe):
    cosine = ["run.epochs=6", "optim.schedule=cosine"]
    r = load_recipe(tiny_recipe, cosine + ["optim.lr_factors=[[2, 0.5], [4, 0.1]]"], registry)
    plain = load_recipe(tiny_recipe, cosine, registry)
    factors = [1, 1, 0.5, 0.5, 0.1, 0.1]
    assert schedule(r) == pytest.approx([f * v for f, v in zip(factors, schedule(plain))], rel=1e-12)
    for bad, words in (
        ("[[4, 0.1], [2, 0.5]]", "[optim].lr_factors: epochs must be >= 0 and increasing"),
        ("[[2, 0]]", "[optim].lr_factors: every factor must be > 0"),
        ("[[2.5, 0.1]]", "[optim].lr_factors: expected [int, float] (got [2.5, 0.1])"),
    ):
        with pytest.raises(RecipeError) as info:
            load_recipe(tiny_recipe, [f"optim.lr_factors={bad}"], registry)
        (line,) = info.value.lines
        assert words in line, line


QUICK_IB = [
    "loss.name=ib",
    "loss.start_epoch=15",
    "model.width=4",
    "data.n_max=60",
    "data.imbalance_factor=10",
    "data.test_per_class=10",
    "data.val_per_class=0",
    "run.eval_every=15",
    "run.score_train=false",
    "run.channels_last=false",
]


def ib_losses(registry, extra: list[str]) -> list[float]:
    trainer = Trainer(recipe("quickstart.toml", registry, QUICK_IB + extra), registry)
    trainer.fit()
    return [h["train_loss"] for h in trainer.history]


def test_ib_on_the_quick_start_does_not_blow_up_when_its_loss_starts(registry):
    """Epoch 15 of 30 switches CE to IB; with the reference's x0.01 the IB loss only falls from there."""
    losses = ib_losses(registry, ["optim.lr_factors=[[15, 0.01]]"])
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    ib = losses[15:]
    assert max(ib) == ib[0], ib  # never above its first epoch
    assert ib[-1] < 0.5 * ib[0], ib


@pytest.mark.slow
def test_ib_on_the_quick_start_without_the_cut_climbs_after_its_start(registry):
    """The deviation the cut removes: at the full lr the IB loss rises after its first epoch."""
    losses = ib_losses(registry, [])
    assert losses[16] > losses[15], losses[14:18]


# ------------------------------------------------------------------ 2. cRT / LWS: batch-norm statistics


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory) -> Path:
    """A finished one-epoch stage-1 run of the tiny recipe, with a validation split (so a best.pt)."""
    from lsm_registry.plugins import default_registry

    registry = default_registry()
    folder = tmp_path_factory.mktemp("stage1")
    path = folder / "tiny.toml"
    path.write_text(TINY_RECIPE.replace("test_per_class = 6", "test_per_class = 6\nval_per_class = 2"))
    Trainer(load_recipe(path, registry=registry), registry, run_dir=folder / "run").fit()
    return folder / "run"


def stage(tmp_path: Path, parent: Path, body: str, registry, overrides=()):
    path = tmp_path / "stage.toml"
    path.write_text(TINY_RECIPE + f'\n[stage]\ninit_from = "{parent}"\n{body}\n[sampler]\nname = "class-balanced"\n')
    return Trainer(load_recipe(path, list(overrides), registry), registry)


def test_crt_stage_re_estimates_batch_norm_statistics_and_keeps_the_backbone(tmp_path, parent_run, registry):
    trainer = stage(tmp_path, parent_run, 'train = "classifier"\nreset_classifier = true\nbn = "train"', registry)
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    params = {name for name, _ in trainer.module.named_parameters()}
    trainer.fit()
    after = trainer.module.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(after[k], before[k]) for k in stats)  # every batch norm moved
    for key in params - {"classifier.weight", "classifier.bias"}:
        assert torch.equal(after[key], before[key]), f"{key} moved in the frozen backbone"
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])


def test_bn_frozen_keeps_the_statistics_and_auto_keeps_what_a_stored_recipe_meant(tmp_path, parent_run, registry):
    trainer = stage(tmp_path, parent_run, 'train = "classifier"\nbn = "frozen"', registry)
    before = trainer.module.state_dict()["bn1.running_mean"].clone()
    trainer.fit()
    assert torch.equal(trainer.module.state_dict()["bn1.running_mean"], before)
    # A run folder's recipe written before the key: migrated, it keeps its frozen statistics.
    crt = recipe("crt.toml", registry)
    assert crt.stage.bn == "train" and not crt.stage.bn_frozen
    old = crt.to_dict()
    del old["stage"]["bn"]
    again = migrate(old, registry)
    assert again["stage"]["bn"] == "auto"
    assert load_recipe_dict(again, registry).stage.bn_frozen
    for name in ("lws.toml", "fashion_mnist_lt/crt.toml", "fashion_mnist_lt/lws.toml"):
        assert recipe(name, registry).stage.bn == "train", name


def load_recipe_dict(raw, registry):
    from lsm_registry.recipe import validate

    return validate(raw, "stored.toml", registry)


def test_stage_bn_settings_that_do_nothing_are_refused(tmp_path, registry, tiny_recipe):
    for overrides, words in (
        (["stage.bn=frozen"], '[stage].bn: "frozen" without init_from does nothing'),
        (["stage.init_checkpoint=best"], '[stage].init_checkpoint: "best" without init_from does nothing'),
        (
            ["stage.init_from=runs/x", "stage.train=classifier+bn-stats", "stage.bn=frozen"],
            '[stage].bn: "frozen" contradicts train = "classifier+bn-stats"',
        ),
    ):
        with pytest.raises(RecipeError) as info:
            load_recipe(tiny_recipe, overrides, registry)
        (line,) = info.value.lines
        assert words in line, line


# ------------------------------------------------------------------ 3. CC-SAM stage 1 under mixup


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.classifier = nn.Linear(3, 4)


def cc_sam_train_reference(classifier, h, y_a, y_b, lam, noise_ratio, flat_ratio, counts, joint):
    """zzpustc/CC-SAM, train_cifar.py, train() under mixup, class by class: the per-class gradients of the
    mixed loss over the images of each un-mixed label y (= targets_a), the classifier perturbed, and the
    flat term hard-label CE on y. ``joint``: the radius's parameter norm is grad_norm(disturb_params)."""
    o = classifier(h)
    loss_ori = lam * F.cross_entropy(o, y_a, reduction="none") + (1 - lam) * F.cross_entropy(o, y_b, reduction="none")
    params = list(classifier.parameters())
    n_params = sum(p.numel() for p in params)
    joint_norm = torch.stack([p.detach().norm() for p in params]).norm() + 1e-12
    flat = []
    for c in y_a.unique().tolist():
        idx = (y_a == c).nonzero().squeeze(1)
        grads = torch.autograd.grad(loss_ori[idx].mean(), params, retain_graph=True)
        moved = []
        for p, g in zip(params, grads):
            p_norm = joint_norm if joint else p.detach().norm()
            rho_c = (
                noise_ratio
                * p_norm.sqrt()
                / g.norm().sqrt()
                / math.sqrt(2)
                / math.sqrt(math.sqrt(counts[c] - 1))
                / math.sqrt(math.sqrt(n_params))
            )
            moved.append(p + (rho_c * g / g.norm() * math.sqrt(n_params)).detach())
        flat.append(F.cross_entropy(F.linear(h[idx], moved[0], moved[1]), y_a[idx], reduction="none"))
    return (1 - flat_ratio) * loss_ori.mean() + flat_ratio * torch.cat(flat).mean()


@pytest.mark.parametrize("joint", [False, True])
def test_cc_sam_stage1_on_a_mixed_batch_matches_the_reference_gradient(joint):
    counts = (12, 6, 3, 2)
    model = Head()
    params = CCSAMParams(
        noise_ratio=0.5, flat_ratio=0.5, mixed_labels="unmixed", param_norm="joint" if joint else "per-tensor"
    )
    opt = CCSAM(params, Context(class_counts=counts, image_size=(3, 8, 8)), torch.optim.SGD(model.parameters(), lr=0.1))
    opt.attach(model)
    h0 = torch.randn(7, 3, generator=torch.Generator().manual_seed(6))
    y_a = torch.tensor([0, 0, 1, 3, 3, 0, 2])  # the batch's own labels
    y_b = y_a[torch.tensor([4, 2, 6, 0, 1, 3, 5])]  # the shuffled copy's
    lam = 0.7
    target = lam * F.one_hot(y_a, 4).float() + (1 - lam) * F.one_hot(y_b, 4).float()

    def grads(fn):
        h = h0.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        value = fn(h)
        value.backward()
        return value.detach(), [model.classifier.weight.grad.clone(), model.classifier.bias.grad.clone(), h.grad]

    def ours(h):
        opt.step_labels = y_a  # what the step-labels callback hands it on a mixed step
        return opt.head(h, model.classifier(h), target, lambda z: -(target * F.log_softmax(z, 1)).sum(1).mean())

    value, g_ours = grads(ours)
    ref, g_ref = grads(lambda h: cc_sam_train_reference(model.classifier, h, y_a, y_b, lam, 0.5, 0.5, counts, joint))
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    opt.step_labels = None  # "soft" grouping (the old form) is another gradient on this batch
    soft, _ = grads(
        lambda h: opt.head(h, model.classifier(h), target, lambda z: -(target * F.log_softmax(z, 1)).sum(1).mean())
    )
    assert not torch.allclose(soft, ref)


def test_cc_sam_gets_the_own_labels_of_each_mixed_step_in_training(registry):
    overrides = [
        "model.width=4",
        "data.n_max=40",
        "data.imbalance_factor=4",
        "data.test_per_class=4",
        "data.val_per_class=0",
        "run.epochs=1",
        "run.score_train=false",
        "optim.name=cc-sam",
        "optim.mixed_labels=unmixed",
    ]
    path = ROOT / "recipes" / "quickstart.toml"
    r = load_recipe(path, overrides + ["mixer.name=mixup", "mixer.start_epoch=0"], registry)
    trainer = Trainer(r, registry)
    seen, labels = [], []
    head = trainer.optimizer.head
    trainer.optimizer.head = lambda h, z, t, l: (seen.append(trainer.optimizer.step_labels), head(h, z, t, l))[1]
    on_batch = trainer.fire

    def fire(hook, *args):
        if hook == "on_batch":
            labels.append(args[0].labels)
        on_batch(hook, *args)

    trainer.fire = fire
    trainer.fit()
    assert seen and len(seen) == len(labels)
    assert all(s is not None and torch.equal(s, y) for s, y in zip(seen, labels))  # mixup mixes every batch
    assert trainer.optimizer.step_labels is None  # cleared after each step


# ------------------------------------------------------------------ 4. the documented approximations


def test_cc_sam_stage2_ramp_is_the_reference_one(registry):
    """train_sample: alpha = min((epoch - stage + 1) / (max_epoch - stage), up_limit) = min((e + 1) / 30, 0.3)."""
    r = recipe("cc_sam_stage2.toml", registry)
    p = r.optimizer.params
    assert (p.flat_ratio, p.ramp_epochs, r.run.epochs) == (0.3, 9, 30)
    for e in range(30):
        assert flat_share(p, e) == pytest.approx(min((e + 1) / 30, 0.3), rel=1e-12), e
    assert flat_share(CCSAMFeatureParams(flat_ratio=0.3), 0) == 0.3  # ramp_epochs = 0: constant, as before
    assert r.stage.init_checkpoint == "best"


def test_the_ramp_reaches_the_optimizer_epoch_by_epoch(tmp_path, parent_run, registry):
    body = 'train = "classifier+bn-stats"'
    trainer = stage(
        tmp_path, parent_run, body, registry, ["run.epochs=3", "optim.name=cc-sam-feature", "optim.ramp_epochs=2"]
    )
    trainer.fit()
    assert [h["flat_share"] for h in trainer.history] == pytest.approx([0.15, 0.3, 0.3])


def test_init_checkpoint_best_starts_from_best_pt_or_says_why_not(tmp_path, parent_run, registry):
    trainer = stage(tmp_path, parent_run, 'train = "classifier"\ninit_checkpoint = "best"', registry)
    assert trainer.parent["checkpoint"] == str(parent_run / "checkpoints" / "best.pt")
    (parent_run / "checkpoints" / "best.pt").rename(tmp_path / "kept.pt")
    try:
        with pytest.raises(LSMError) as info:
            stage(tmp_path, parent_run, 'train = "classifier"\ninit_checkpoint = "best"', registry)
    finally:
        (tmp_path / "kept.pt").rename(parent_run / "checkpoints" / "best.pt")
    message = str(info.value)
    assert "\n" not in message and '[stage].init_checkpoint = "best"' in message and "no checkpoints/best.pt" in message


def test_lr_groups_give_mislas_classifier_a_fifth_of_the_scales_lr(tmp_path, parent_run, registry):
    r = recipe("mislas.toml", registry)
    assert r.optim.lr == 0.1 and r.optim.lr_groups == (("classifier", 0.2),)
    body = 'train = "classifier+bn-stats"'
    trainer = stage(
        tmp_path,
        parent_run,
        body,
        registry,
        [
            "model.lws=true",
            "optim.lr=0.1",
            "optim.lr_groups=[['classifier', 0.2]]",
            "optim.schedule=cosine",
            "run.epochs=2",
        ],
    )
    groups = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    trainer.fire("on_epoch_start", 1)
    lr = learning_rate(trainer.recipe.optim, 2, 1)
    assert groups[id(trainer.module.classifier.weight)]["lr"] == pytest.approx(0.2 * lr)
    assert groups[id(trainer.module.logit_scale)]["lr"] == pytest.approx(lr)
    trainer.fit()
    assert [h["lr"] for h in trainer.history] == pytest.approx([0.1, 0.05])  # the schedule's lr, not a group's
    with pytest.raises(LSMError) as info:
        stage(tmp_path, parent_run, body, registry, ["optim.lr_groups=[['clasifier', 0.2]]"])
    assert "[optim].lr_groups: 'clasifier' names no trainable parameter" in str(info.value)


def mislas_stage1_reference_lr(epoch: int, lr: float = 0.1) -> float:
    """dvlab-research/MiSLAS, train_stage1.py, adjust_learning_rate (cos: False), 0-based ``epoch``."""
    epoch = epoch + 1
    if epoch <= 5:
        return lr * epoch / 5
    if epoch > 180:
        return lr * 0.01
    if epoch > 160:
        return lr * 0.1
    return lr


def warmup_multistep_after_warmup(epoch: int, lr: float, steps: list[int], factor: float) -> float:
    """WarmupMultiStepLR (LADE's utils.py, CC-SAM's lr_scheduler.py) stepped before each epoch: epoch e
    (0-based) trains at last_epoch = e + 1; past the warm-up, lr * factor ** bisect_right(steps, e + 1)."""
    return lr * factor ** bisect_right(steps, epoch + 1)


def test_mislas_lade_and_cc_sam_schedules_are_the_reference_ones(registry):
    ours = schedule(recipe("mislas_stage1.toml", registry))
    assert ours == pytest.approx([mislas_stage1_reference_lr(e) for e in range(200)], rel=1e-12)
    assert recipe("mislas.toml", registry).stage.init_from == "runs/mislas_stage1"
    lade = recipe("lade.toml", registry)
    assert (lade.optim.batch_size, lade.optim.weight_decay) == (256, 5e-4)
    cc = recipe("cc_sam.toml", registry)
    for r, lr, steps, factor in ((lade, 0.2, [120, 160], 0.01), (cc, 0.1, [160, 180], 0.1)):
        values = schedule(r)
        for e in range(5, 200):  # the warm-up differs (documented in the headers)
            assert values[e] == pytest.approx(warmup_multistep_after_warmup(e, lr, steps, factor), rel=1e-12), e
    assert cc.optimizer.params.mixed_labels == "unmixed" and cc.optimizer.params.param_norm == "joint"


def test_a_stage_run_folder_from_before_the_bn_key_resumes_as_it_was(tmp_path, parent_run):
    """Its recipe.toml and checkpoint lack [stage] bn (and the other keys added here): they mean "auto"."""
    from click.testing import CliRunner

    from lsm_registry.checkpoint import list_checkpoints, load_weights_only
    from lsm_registry.cli import cli

    path = tmp_path / "crt.toml"
    path.write_text(TINY_RECIPE + f'\n[stage]\ninit_from = "{parent_run}"\ntrain = "classifier"\n')
    run = tmp_path / "crt"
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(run), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    added = {"stage": ("bn", "init_checkpoint"), "optim": ("lr_factors", "lr_groups")}
    text = (run / "recipe.toml").read_text()
    for keys in added.values():
        text = "".join(line for line in text.splitlines(True) if line.split(" = ")[0] not in keys)
    (run / "recipe.toml").write_text(text)
    newest = list_checkpoints(run)[-1]
    state = load_weights_only(newest)
    for table, keys in added.items():
        for key in keys:
            del state["recipe"][table][key]
    torch.save(state, newest)
    before = state["model"]["bn1.running_mean"].clone()
    result = CliRunner().invoke(cli, ["resume", str(run), "--no-progress", "--set", "run.epochs=2"])
    assert result.exit_code == 0, result.output
    after = load_weights_only(list_checkpoints(run)[-1])["model"]["bn1.running_mean"]
    assert torch.equal(after, before)  # still frozen, as train = "classifier" meant before the key


def test_a_stored_crt_run_from_before_the_bn_key_is_another_setting(tmp_path, registry):
    """bench/store.py: a stored cRT run without stage.bn kept batch norm frozen; the recipe now says "train"."""
    from bench import store as run_store

    crt = recipe("fashion_mnist_lt/crt.toml", registry)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "recipe.toml").write_text(crt.to_toml().replace('bn = "train"\n', ""))
    assert any(d.startswith("stage.bn: stored 'auto'") for d in run_store.setting_differences(folder, crt))
    ce = recipe("fashion_mnist_lt/ce.toml", registry)  # a run without a stage: nothing changed for it
    (folder / "recipe.toml").write_text(ce.to_toml().replace('bn = "auto"\n', "").replace("lr_factors = []\n", ""))
    assert run_store.setting_differences(folder, ce) == []
