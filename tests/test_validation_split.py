"""The balanced validation split (``[data] val_per_class``): held out before the long-tailed cut."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lsm_registry.components.datasets import Cifar10LT, ImageFolderLT, SyntheticLT
from lsm_registry.data.profiles import hold_out, lt_counts
from lsm_registry.engine import Trainer
from lsm_registry.interfaces import Context
from lsm_registry.recipe import load_recipe

CTX = Context(class_counts=(), image_size=(0, 0, 0))


def build(cls, **params):
    return cls(cls.Params(**params), CTX).build()


def test_hold_out_is_balanced_disjoint_and_deterministic():
    labels = torch.tensor([0, 1, 2] * 7 + [0] * 5)  # class 0 has 12, classes 1 and 2 have 7
    val, rest = hold_out(labels, 3, seed=4)
    assert torch.bincount(labels[val], minlength=3).tolist() == [3, 3, 3]
    assert torch.bincount(labels[rest], minlength=3).tolist() == [9, 4, 4]
    assert not set(val.tolist()) & set(rest.tolist())
    assert sorted(val.tolist() + rest.tolist()) == list(range(labels.numel()))
    assert rest.tolist() == sorted(rest.tolist())  # the rest keeps its order
    again, _ = hold_out(labels, 3, seed=4)
    assert again.tolist() == val.tolist()
    assert hold_out(labels, 3, seed=5)[0].tolist() != val.tolist()


def test_synthetic_val_split_leaves_training_unchanged():
    plain = build(SyntheticLT, num_classes=3, n_max=6, imbalance_factor=3.0, test_per_class=2)
    data = build(SyntheticLT, num_classes=3, n_max=6, imbalance_factor=3.0, test_per_class=2, val_per_class=3)
    assert plain.val is None
    assert torch.bincount(data.val.labels, minlength=3).tolist() == [3, 3, 3]
    assert data.class_counts() == plain.class_counts() == tuple(lt_counts("exp", 6, 3.0, 3))
    assert torch.equal(data.train.images, plain.train.images)
    assert not torch.equal(data.val.images[:2], data.test.images[:2])  # another seed stream


def write_cifar10(root: Path, per_class: int) -> None:
    """Training rows whose first two bytes encode the row's index in the full training split."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    n = 10 * per_class
    rows = np.zeros((n, 3072), np.uint8)
    rows[:, 0], rows[:, 1] = np.arange(n) // 256, np.arange(n) % 256
    labels = [i % 10 for i in range(n)]
    chunks = np.array_split(np.arange(n), 5)
    for b, idx in enumerate(chunks, start=1):
        with open(folder / f"data_batch_{b}", "wb") as fh:
            pickle.dump({b"data": rows[idx], b"labels": [labels[i] for i in idx]}, fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": rows[:10], b"labels": list(range(10))}, fh)


def row_ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()


def test_cifar_holds_out_before_the_cut(tmp_path):
    write_cifar10(tmp_path, per_class=20)
    data = build(Cifar10LT, root=str(tmp_path), imbalance_factor=3.0, val_per_class=5)
    assert torch.bincount(data.val.labels, minlength=10).tolist() == [5] * 10
    # n_max is what is left of the largest class (20 - 5), the profile runs from there.
    assert data.class_counts() == tuple(lt_counts("exp", 15, 3.0, 10))
    val_ids, train_ids = row_ids(data.val.images), row_ids(data.train.images)
    assert not set(val_ids) & set(train_ids)
    assert [i % 10 for i in val_ids] == data.val.labels.tolist()
    again = build(Cifar10LT, root=str(tmp_path), imbalance_factor=3.0, val_per_class=5)
    assert row_ids(again.val.images) == val_ids


def test_too_small_set_is_refused_in_one_line(tmp_path):
    write_cifar10(tmp_path, per_class=2)
    with pytest.raises(ValueError) as info:
        build(Cifar10LT, root=str(tmp_path), val_per_class=2)
    message = str(info.value)
    assert "\n" not in message
    assert "CIFAR-10" in message and "'0'" in message and "2 image" in message and "val_per_class = 2" in message


def test_imagefolder_val_split(tmp_path):
    for split, n in (("train", 4), ("test", 1)):
        for name in ("a", "b"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    data = build(ImageFolderLT, root=str(tmp_path), profile="none", image_size=8, workers=0, val_per_class=1)
    assert data.val.labels.tolist() == [0, 1] and data.val.images.shape == (2, 3, 8, 8)
    assert data.class_counts() == (3, 3)


def test_tiny_run_picks_best_on_val(tiny_recipe, registry):
    recipe = load_recipe(tiny_recipe, ["data.val_per_class=2"])
    trainer = Trainer(recipe, registry)
    summary = trainer.fit()
    record = trainer.history[-1]
    assert all(f"val_{k}" in record for k in ("top1", "many", "medium", "few", "rare3"))
    assert "val_per_class" not in record and record["top1"] is not None  # no per-class list for val
    assert summary["best_on"] == "val"
    assert summary["val_top1"] is not None and 0.0 <= summary["val_top1"] <= 1.0
    assert all(k in summary for k in ("val_many", "val_medium", "val_few", "val_rare3"))
    assert summary["best_top1"] == summary["val_top1"]  # one epoch: the best is the last
    assert "top1" in summary and summary["best_epoch"] == 1
