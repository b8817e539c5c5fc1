"""Supervised contrastive losses: SupCon against its formula, the two views the engine gives, the model
check, Hybrid-SC's curriculum, TSC's targets and matching, and every recipe for one tiny epoch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import contrastive_tiny
from test_bbn import SHRINK, tiny_copy

from lsm_registry.cli import cli
from lsm_registry.components.contrastive import (
    TSC,
    HybridSC,
    SupCon,
    TSCState,
    match_targets,
    sampled_positives,
    supcon_loss,
    tsc_loss,
    uniform_targets,
)
from lsm_registry.engine import Trainer
from lsm_registry.errors import LSMError
from lsm_registry.interfaces import Context
from lsm_registry.plugins import build_registry
from lsm_registry.recipe import load_recipe
from lsm_registry.testing import check_component

ROOT = Path(__file__).resolve().parents[1]
SUPCON_TINY = contrastive_tiny('name = "supcon"')


@pytest.fixture(scope="module")
def registry():
    return build_registry(entry_points=False)


def _context(counts=(6, 4, 3, 2), epochs: int = 10) -> Context:
    return Context(class_counts=counts, image_size=(3, 32, 32), epochs=epochs)


# ------------------------------------------------------------------------ SupCon


def test_supcon_of_four_embeddings_is_the_formula_worked_by_hand():
    # Four unit vectors in the plane, classes [0, 0, 1, 1]; T = 0.5.
    r = math.sqrt(3) / 2
    z = torch.tensor([[1.0, 0.0], [0.5, r], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    # z_i . z_j / T for each anchor, other rows only, and the one positive of each:
    # anchor 1: z2 1.0, z3 -2.0, z4 0.0 (positive z2); anchor 2: z1 1.0, z3 -1.0, z4 2r
    # (positive z1); anchor 3: z1 -2.0, z2 -1.0, z4 0.0 (positive z4); anchor 4: z1 0.0,
    # z2 2r, z3 0.0 (positive z3). Each term is -(s_pos - log sum_k exp s_k).
    terms = [
        -(1.0 - math.log(math.exp(1.0) + math.exp(-2.0) + math.exp(0.0))),
        -(1.0 - math.log(math.exp(1.0) + math.exp(-1.0) + math.exp(2 * r))),
        -(0.0 - math.log(math.exp(-2.0) + math.exp(-1.0) + math.exp(0.0))),
        -(0.0 - math.log(math.exp(0.0) + math.exp(2 * r) + math.exp(0.0))),
    ]
    expected = (0.5 / 0.07) * sum(terms) / 4
    got = supcon_loss(z, F.one_hot(y, 2).double(), temperature=0.5, base_temperature=0.07)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    loss = SupCon(SupCon.Params(temperature=0.5, base_temperature=0.07), _context((2, 2)))
    from_loss = loss(torch.zeros(4, 2), y, outputs={"embeddings": z.float()})
    assert from_loss.item() == pytest.approx(expected, rel=1e-5)


def test_positives_are_pulled_together():
    y = torch.tensor([0, 0, 1, 1])
    t = F.one_hot(y, 2).float()
    far = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2], [0.2, -1.0]]), dim=1)
    near = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.2], [-0.9, 0.1]]), dim=1)
    assert supcon_loss(near, t, 0.1, 0.1) < supcon_loss(far, t, 0.1, 0.1)
    # One gradient step on the embeddings brings each same-class pair closer.
    z = far.clone().requires_grad_(True)
    supcon_loss(z, t, 0.1, 0.1).backward()
    moved = F.normalize(z.detach() - 0.01 * z.grad, dim=1)
    assert moved[0] @ moved[1] > far[0] @ far[1] and moved[2] @ moved[3] > far[2] @ far[3]


def test_soft_targets_that_are_one_hot_give_the_hard_loss_and_mixed_rows_weigh_by_shared_label():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(6, 5), dim=1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = SupCon(SupCon.Params(), _context((4, 4, 4)))
    hard = loss(torch.zeros(6, 3), y, outputs={"embeddings": z})
    soft = loss(torch.zeros(6, 3), F.one_hot(y, 3).float(), outputs={"embeddings": z})
    assert soft.item() == pytest.approx(hard.item(), rel=1e-6)
    mixed = F.one_hot(y, 3).float()
    mixed[0] = torch.tensor([0.5, 0.5, 0.0])
    assert not torch.isclose(loss(torch.zeros(6, 3), mixed, outputs={"embeddings": z}), hard)


@pytest.mark.parametrize("cls", [SupCon, HybridSC, TSC])
def test_the_losses_keep_the_contract(cls, registry):
    check_component(cls, registry)


# ------------------------------------------------------------------------ the engine


def test_the_engine_gives_two_differently_augmented_views_of_each_image(write_recipe, registry):
    trainer = Trainer(load_recipe(write_recipe(SUPCON_TINY), [], registry), registry)
    assert trainer.loss.views_per_image == 2
    bg, fg = next(iter(trainer.sampled(0, 8)))
    assert bg.shape == (16,) and torch.equal(bg[:8], bg[8:])
    x, y = trainer.prepare(bg)
    assert torch.equal(y[:8], y[8:])
    assert not torch.equal(x[:8], x[8:])  # each view its own crop and flip
    trainer.module.train()
    out = trainer.module(x)
    assert out.parts["embeddings"].shape == (16, 8)
    assert torch.allclose(out.parts["embeddings"].norm(dim=1), torch.ones(16), atol=1e-5)


def test_a_model_without_a_projection_head_is_refused_in_one_line(write_recipe, registry):
    text = SUPCON_TINY.replace("projection_dim = 8\n", "")
    with pytest.raises(LSMError) as info:
        Trainer(load_recipe(write_recipe(text), [], registry), registry)
    message = str(info.value)
    assert "\n" not in message
    assert "[loss].name = 'supcon': reads the model's embeddings" in message


# ------------------------------------------------------------------------ Hybrid-SC


def test_hybrid_moves_from_supcon_to_ce_parabolically():
    loss = HybridSC(HybridSC.Params(), _context(epochs=10))
    torch.manual_seed(1)
    logits, z = torch.randn(8, 4), F.normalize(torch.randn(8, 6), dim=1)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    t = F.one_hot(y, 4).float()
    scl = supcon_loss(z, t, 0.1, 0.1)
    ce = F.cross_entropy(logits, y)
    alphas = []
    for epoch in range(10):
        loss.set_epoch(epoch)
        alphas.append(loss.alpha())
        assert loss.alpha() == pytest.approx(1 - (epoch / 10) ** 2)
        got = loss(logits, y, outputs={"embeddings": z})
        assert got.item() == pytest.approx((loss.alpha() * scl + (1 - loss.alpha()) * ce).item(), rel=1e-5)
    assert alphas[0] == 1.0 and all(a > b for a, b in zip(alphas, alphas[1:]))


# ------------------------------------------------------------------------ TSC


def test_the_targets_are_unit_vectors_spread_as_far_as_they_go():
    u = uniform_targets(4, 3, torch.Generator().manual_seed(0), 500, torch.device("cpu"))
    assert torch.allclose(u.norm(dim=1), torch.ones(4), atol=1e-6)
    cos = u @ u.T
    off = cos[~torch.eye(4, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / 3), atol=1e-4)  # the tetrahedron
    six = uniform_targets(6, 3, torch.Generator().manual_seed(0), 500, torch.device("cpu"))
    assert (six @ six.T).fill_diagonal_(-2).max().item() == pytest.approx(0.0, abs=1e-4)  # the octahedron
    many = uniform_targets(100, 128, torch.Generator().manual_seed(0), 500, torch.device("cpu"))
    cos = (many @ many.T).fill_diagonal_(-2)
    assert cos.max().item() == pytest.approx(-1 / 99, abs=1e-4)  # C <= D + 1: the regular simplex
    again = uniform_targets(4, 3, torch.Generator().manual_seed(0), 500, torch.device("cpu"))
    assert torch.equal(u, again)


def test_the_matching_is_a_permutation_that_finds_the_closest_targets():
    targets = uniform_targets(6, 4, torch.Generator().manual_seed(0), 300, torch.device("cpu"))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    noisy = F.normalize(targets[perm] + 0.05 * torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    assignment = match_targets(noisy, targets)
    assert sorted(assignment.tolist()) == list(range(6))
    assert torch.equal(assignment, perm)


def test_kcl_keeps_the_other_views_and_k_drawn_rows_of_the_class():
    y = torch.tensor([0, 0, 0, 0, 1, 1])  # 6 images, two views each: 12 rows
    t = F.one_hot(y.repeat(2), 2).float()
    w = sampled_positives(t @ t.T, 2, 2, torch.Generator().manual_seed(0))
    for i in range(12):
        other_view = (i + 6) % 12
        assert w[i, other_view] == 1 and w[i, i] == 0
        drawn = [j for j in range(12) if w[i, j] > 0 and j != other_view]
        assert all(y.repeat(2)[j] == y.repeat(2)[i] for j in drawn)
        same_class = sum(1 for j in range(12) if j % 6 != i % 6 and y.repeat(2)[j] == y.repeat(2)[i])
        assert len(drawn) == min(2, same_class)


def test_the_target_is_one_more_positive_of_weight_tw():
    torch.manual_seed(2)
    z = F.normalize(torch.randn(4, 3), dim=1)
    t = F.one_hot(torch.tensor([0, 1, 0, 1]), 2).float()
    targets = F.normalize(torch.randn(2, 3), dim=1)
    w = t @ t.T
    got = tsc_loss(z, w, targets, t, 0.2, 0.5)
    keys = torch.cat([z, targets])
    expected = 0.0
    for i in range(4):
        s = keys @ z[i] / 0.5
        log_p = s - torch.logsumexp(torch.cat([s[:i], s[i + 1 :]]), dim=0)
        j = (i + 2) % 4  # its one same-class row
        c = int(t[i].argmax())
        expected += -(log_p[j] + 0.2 * log_p[4 + c]) / 2
    assert got.item() == pytest.approx(expected.item() / 4, rel=1e-5)
    assert tsc_loss(z, w, None, t, 0.2, 0.5).item() == pytest.approx(supcon_loss(z, t, 0.5, 0.5).item(), rel=1e-5)


def test_tsc_rematches_once_an_epoch_and_its_state_survives_a_checkpoint():
    context = _context((5, 4, 3, 2), epochs=4)
    loss = TSC(TSC.Params(target_steps=200), context)
    [callback] = loss.configure_callbacks()
    assert isinstance(callback, TSCState)
    assert callback.state_dict() == {}  # nothing made yet
    loss.set_epoch(0)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    z = F.normalize(torch.randn(8, 6, generator=torch.Generator().manual_seed(3)), dim=1)
    loss(torch.zeros(8, 4), y, outputs={"embeddings": z})
    assert torch.equal(loss.assignment, torch.arange(4))  # the first epoch: identity
    loss.set_epoch(1)
    expected = match_targets(F.normalize(F.one_hot(y, 4).double().T @ z.double(), dim=1), loss.targets)
    assert torch.equal(loss.assignment, expected)
    assert sorted(loss.assignment.tolist()) == [0, 1, 2, 3]
    loss(torch.zeros(8, 4), y, outputs={"embeddings": z})
    state = callback.state_dict()
    again = TSC(TSC.Params(target_steps=200), context)
    [restored] = again.configure_callbacks()
    restored.load_state_dict(state)
    again.set_epoch(1)  # a resume inside epoch 1: no rematch
    assert torch.equal(again.assignment, loss.assignment) and torch.equal(again.targets, loss.targets)
    assert torch.equal(again.sums, loss.sums) and torch.equal(again.counts, loss.counts)
    again.set_epoch(2)  # the next epoch re-matches from what was restored, as the first loss does
    loss.set_epoch(2)
    assert torch.equal(again.assignment, loss.assignment) and torch.equal(again.centres, loss.centres)


# ------------------------------------------------------------------------ recipes


@pytest.mark.parametrize(
    "name",
    [
        "supcon.toml",
        "hybrid_sc.toml",
        "tsc.toml",
        "fashion_mnist_lt/supcon.toml",
        "fashion_mnist_lt/hybrid_sc.toml",
        "fashion_mnist_lt/tsc.toml",
        "hybrid_sc_lsm.toml",
        "fashion_mnist_lt/hybrid_sc_lsm.toml",
    ],
)
def test_the_recipe_trains_one_tiny_epoch(name, tmp_path, registry):
    recipe = tiny_copy(ROOT / "recipes" / name, tmp_path, registry)
    extra = ["--set", "loss.start_epoch=0", "--set", "loss.target_steps=20"] if "tsc" in name else []
    if "lsm" in name:  # every step mixes, so the two-view batch goes through the mixing step
        extra = ["--set", "mixer.start_epoch=0", "--unset", "mixer.end_epoch", "--set", "mixer.prob=1.0"]
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--no-progress", *SHRINK, *extra])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["top1"] is not None and math.isfinite(record["train_loss"])
    assert record["mixed_fraction"] == (1.0 if "lsm" in name else 0.0)


@pytest.mark.parametrize("name", ["supcon_linear.toml", "fashion_mnist_lt/supcon_linear.toml"])
def test_the_linear_stage_trains_one_tiny_epoch_on_a_supcon_run(name, tmp_path, registry):
    first = tiny_copy(ROOT / "recipes" / name.replace("supcon_linear", "supcon"), tmp_path, registry)
    parent = tmp_path / "stage1"
    result = CliRunner().invoke(cli, ["run", str(first), "--out", str(parent), "--no-progress", *SHRINK])
    assert result.exit_code == 0, result.output
    (tmp_path / "two").mkdir()
    second = tiny_copy(ROOT / "recipes" / name, tmp_path / "two", registry)
    out = tmp_path / "run"
    args = ["run", str(second), "--out", str(out), "--no-progress", *SHRINK, "--set", f"stage.init_from={parent}"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["top1"] is not None
