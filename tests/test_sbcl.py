"""SBCL: the subclass counts, the k-means, the loss against its formula by hand, the clustering
callback (schedule, batch lookup by StepBatch.indices, resume) and the recipes."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import attrs
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import contrastive_tiny
from test_bbn import SHRINK, tiny_copy

from lsm_registry.cli import cli
from lsm_registry.components.contrastive import supcon_loss
from lsm_registry.components.projection import EMBEDDINGS
from lsm_registry.components.sbcl import (
    SBCL,
    SubclassClustering,
    class_temperatures,
    cluster_counts,
    kmeans,
    sbcl_loss,
)
from lsm_registry.engine import Trainer
from lsm_registry.interfaces import Callback, Context
from lsm_registry.plugins import build_registry
from lsm_registry.recipe import load_recipe
from lsm_registry.testing import check_component

ROOT = Path(__file__).resolve().parents[1]
#: The tiny recipe with SBCL clustering from the first epoch, every epoch, subclasses of 4 images.
SBCL_TINY = contrastive_tiny('name = "sbcl"\ncluster_start = 0\ncluster_every = 1\nmin_cluster_size = 1')


@pytest.fixture(scope="module")
def registry():
    return build_registry(entry_points=False)


def _clustering(trainer: Trainer) -> SubclassClustering:
    return next(c for c in trainer.callbacks if isinstance(c, SubclassClustering))


# ------------------------------------------------------------------------ subclasses


def test_the_cluster_counts_follow_n_c_over_m():
    # M = max(smallest count, min_cluster_size): 10 when the tail (5) is smaller, as on CIFAR-100-LT.
    assert cluster_counts([500, 120, 30, 9, 5], 10) == [50, 12, 3, 1, 1]
    # A tail larger than min_cluster_size sets M itself: every tail class one subclass, the head n_c // n_min.
    assert cluster_counts([200, 50, 20], 10) == [10, 2, 1]
    assert cluster_counts([7, 7], 10) == [1, 1]


def test_kmeans_separates_two_well_separated_blobs():
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(30, 3, generator=g)
    b = torch.tensor([0.0, 1.0, 0.0]) + 0.05 * torch.randn(20, 3, generator=g)
    x = torch.cat([a, b])[torch.randperm(50, generator=g)]
    truth = (x[:, 1] > x[:, 0]).long()
    assign = kmeans(x, 2, torch.Generator().manual_seed(1))
    assert set(assign.tolist()) == {0, 1}
    assert bool((assign == truth).all()) or bool((assign == 1 - truth).all())
    assert torch.equal(assign, kmeans(x, 2, torch.Generator().manual_seed(1)))  # repeats from the generator
    assert torch.equal(kmeans(x, 1, torch.Generator()), torch.zeros(50, dtype=torch.int64))


def test_a_spread_class_gets_a_higher_class_level_temperature():
    g = torch.Generator().manual_seed(2)
    centres = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    spread = torch.tensor([0.5, 0.3, 0.1, 0.05])
    labels = torch.arange(4).repeat_interleave(40)
    x = F.normalize(centres[labels] + spread[labels, None] * torch.randn(160, 6, generator=g), dim=1)
    temps = class_temperatures(x, labels, [3, 2, 2, 1], 0.1)
    assert temps[3] == pytest.approx(0.1)  # one subclass: the base temperature
    assert temps[0] > temps[1] > temps[2]
    assert torch.allclose(class_temperatures(x, labels, [3, 2, 2, 1], 0.1, adaptive=False), torch.full((4,), 0.1))


# ------------------------------------------------------------------------ the loss


def _by_hand(z, y, s, temps, tau, tau_base, beta, per_view):
    """The SBCL loss written out from the formula, one anchor and one pair at a time."""
    n = len(y)
    dot = lambda i, j: float(z[i] @ z[j])  # noqa: E731
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        sub_pos = [j for j in others if s[j] == s[i]]
        below = sum(math.exp(dot(i, a) / tau) for a in others)
        l_sub = -sum(math.log(math.exp(dot(i, p) / tau) / below) for p in sub_pos) / len(sub_pos)
        views = [j for j in others if j % per_view == i % per_view]
        cls_pos = [j for j in others if y[j] == y[i] and s[j] != s[i]] + views
        cands = [j for j in others if s[j] != s[i]] + views
        t = temps[y[i]]
        below = sum(math.exp(dot(i, a) / t) for a in cands)
        l_cls = -sum(math.log(math.exp(dot(i, p) / t) / below) for p in cls_pos) / len(cls_pos)
        total += tau / tau_base * l_sub + beta * l_cls
    return total / n


def _hand_case():
    # Three images, two views each (rows v * 3 + i): images 0 and 1 of class 0 in subclasses 0
    # and 1, image 2 of class 1 (its one subclass 2).
    angles = torch.tensor([0.0, 0.5, 2.5, 0.2, 0.9, 2.2])
    z = torch.stack([angles.cos(), angles.sin()], dim=1)
    y = [0, 0, 1, 0, 0, 1]
    s = [0, 1, 2, 0, 1, 2]
    return z, y, s, [0.2, 0.1]


def test_the_loss_against_its_formula_by_hand():
    z, y, s, temps = _hand_case()
    expected = _by_hand(z, y, s, temps, tau=0.1, tau_base=0.07, beta=0.25, per_view=3)
    got = sbcl_loss(z, F.one_hot(torch.tensor(y), 2).float(), torch.tensor(s), 2, torch.tensor(temps), 0.1, 0.07, 0.25)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # The component, fed its subclasses as the clustering callback feeds them, on the projection.
    loss = SBCL(SBCL.Params(), Context((4, 2), (3, 32, 32)))
    loss.use_subclasses(torch.tensor(s), torch.tensor(temps))
    logits = torch.randn(6, 2)
    assert float(loss(logits, torch.tensor(y), outputs={EMBEDDINGS: z})) == pytest.approx(expected, rel=1e-5)
    # Without subclasses (before the first clustering): SupCon on the classes, unscaled.
    loss.use_subclasses(None, None)
    warm = supcon_loss(z, F.one_hot(torch.tensor(y), 2).float(), 0.1, 0.1)
    assert torch.allclose(loss(logits, torch.tensor(y), outputs={EMBEDDINGS: z}), warm)
    loss.use_subclasses(torch.tensor(s[:4]), torch.tensor(temps))
    with pytest.raises(ValueError, match="4 subclass labels for a batch of 6 rows"):
        loss(logits, torch.tensor(y), outputs={EMBEDDINGS: z})


def test_same_subclass_positives_are_pulled_together():
    # Six images, two views: class 0 in subclasses 0 (images 0, 1) and 1 (images 2, 3), class 1 one subclass.
    y, s = torch.tensor([0, 0, 0, 0, 1, 1] * 2), torch.tensor([0, 0, 1, 1, 2, 2] * 2)
    image = torch.arange(12) % 6
    other_image = image.unsqueeze(1) != image.unsqueeze(0)
    pairs = {
        "same subclass": (s.unsqueeze(1) == s.unsqueeze(0)) & other_image,
        "same class, other subclass": (y.unsqueeze(1) == y.unsqueeze(0)) & (s.unsqueeze(1) != s.unsqueeze(0)),
        "other class": y.unsqueeze(1) != y.unsqueeze(0),
    }

    def mean_cosines(z):
        e = F.normalize(z.detach(), dim=1)
        return [float((e @ e.T)[mask].mean()) for mask in pairs.values()]

    free = torch.randn(12, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    before = mean_cosines(free)
    args = (F.one_hot(y, 2).float(), s, 2, torch.tensor([0.2, 0.1]), 0.1, 0.07, 0.25)
    opt = torch.optim.SGD([free], lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        sbcl_loss(F.normalize(free, dim=1), *args).backward()
        opt.step()
    same_subclass, same_class, other_class = mean_cosines(free)
    assert same_subclass > before[0] + 0.3  # different images of one subclass came together
    # ... closer than their class's other subclass, which stays closer than the other class.
    assert same_subclass > same_class > other_class


def test_the_loss_conforms(registry):
    check_component(registry.get("loss", "sbcl"), registry)


# ------------------------------------------------------------------------ the callback and the engine


class IndexRecorder(Callback):
    name = "t-indices"

    @attrs.frozen
    class Params:
        pass

    def __init__(self, params, context):
        super().__init__(params, context)
        self.batches = []

    def on_batch(self, loop, batch):
        self.batches.append((batch.indices.clone(), batch.labels.clone(), loop.loss.subclasses.clone()))


def test_each_step_gets_its_rows_subclasses_by_the_sampled_indices(write_recipe, registry):
    trainer = Trainer(load_recipe(write_recipe(SBCL_TINY), [], registry), registry)
    recorder = IndexRecorder(IndexRecorder.Params(), trainer.context)
    trainer.callbacks.append(recorder)
    trainer.fit()
    clustering = _clustering(trainer)
    train_labels = trainer.data.train.labels
    clusters = cluster_counts(trainer.class_counts, 1)
    assert clusters == [max(1, n // min(trainer.class_counts)) for n in trainer.class_counts]
    offsets = torch.tensor([0, *clusters]).cumsum(0)
    for c, k in enumerate(clusters):  # class c's images lie in its own k subclasses, all of them used
        own = clustering.labels[train_labels == c]
        assert set(own.tolist()) == set(range(int(offsets[c]), int(offsets[c]) + k))
    assert recorder.batches
    for indices, labels, subclasses in recorder.batches:
        b = indices.numel() // 2
        assert torch.equal(indices[:b], indices[b:])  # two views, view-major
        assert torch.equal(labels, train_labels[indices])
        assert torch.equal(subclasses, clustering.labels[indices])
    assert trainer.history[-1]["sbcl_subclasses"] == sum(clusters)


def test_the_schedule_clusters_from_cluster_start_every_cluster_every_epochs():
    loss = SBCL(SBCL.Params(cluster_start=10, cluster_every=10), Context((4, 2), (3, 32, 32)))
    (clustering,) = loss.configure_callbacks()
    assert [e for e in range(45) if clustering.due(e)] == [10, 20, 30, 40]


def test_a_resumed_run_keeps_its_subclasses_until_the_next_clustering(write_recipe, registry, tmp_path):
    recipe = load_recipe(write_recipe(SBCL_TINY), ["loss.cluster_every=2"], registry)
    first = Trainer(recipe, registry, run_dir=tmp_path / "run")
    first.fit()
    saved = _clustering(first)
    longer = attrs.evolve(recipe, run=attrs.evolve(recipe.run, epochs=2))
    resumed = Trainer(longer, registry, run_dir=tmp_path / "run", resume=True)
    resumed.fit()  # epoch 1 is not a clustering epoch: it trains on epoch 0's subclasses
    kept = _clustering(resumed)
    assert kept.clustered_epoch == 0 and torch.equal(kept.labels, saved.labels)
    assert torch.equal(kept.temperatures, saved.temperatures)
    # The same epoch 0 clustered again from the same seed gives the same subclasses.
    again = Trainer(recipe, registry)
    again.fit()
    assert torch.equal(_clustering(again).labels, saved.labels)


# ------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("name", ["sbcl.toml", "fashion_mnist_lt/sbcl.toml"])
def test_the_recipe_trains_one_tiny_epoch(name, tmp_path, registry):
    recipe = tiny_copy(ROOT / "recipes" / name, tmp_path, registry)
    out = tmp_path / "run"
    clustering = ["--set", "loss.cluster_start=0", "--set", "loss.min_cluster_size=1"]
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--no-progress", *SHRINK, *clustering])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["top1"] is not None and record["sbcl_subclasses"] > 4
    resolved = tomllib.loads((out / "recipe.toml").read_text())
    assert resolved["loss"]["name"] == "sbcl" and resolved["model"]["projection_dim"] == 128


@pytest.mark.parametrize("name", ["sbcl_linear.toml", "fashion_mnist_lt/sbcl_linear.toml"])
def test_the_linear_stage_trains_on_the_sbcl_representation(name, tmp_path, registry):
    stage1 = tiny_copy(ROOT / "recipes" / name.replace("sbcl_linear", "sbcl"), tmp_path, registry)
    parent = tmp_path / "sbcl"
    result = CliRunner().invoke(cli, ["run", str(stage1), "--out", str(parent), "--no-progress", *SHRINK])
    assert result.exit_code == 0, result.output
    (tmp_path / "stage2").mkdir()
    stage2 = tiny_copy(ROOT / "recipes" / name, tmp_path / "stage2", registry)
    out = tmp_path / "linear"
    args = ["run", str(stage2), "--out", str(out), "--no-progress", *SHRINK, "--set", f"stage.init_from='{parent}'"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    resolved = tomllib.loads((out / "recipe.toml").read_text())
    assert resolved["loss"]["name"] == "ldam" and resolved["stage"]["train"] == "classifier"
