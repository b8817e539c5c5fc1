"""Long-tailed class profiles (docs/method.md §1), the per-class subsampling and the
balanced validation hold-out (docs/data.md)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def lt_counts(profile: str, n_max: int, imbalance_factor: float, num_classes: int) -> list[int]:
    """Images kept per class: ``exp`` n_i = int(n_max * (1/IF) ** (i / (C - 1))), ``step``, ``none``."""
    if imbalance_factor < 1:
        raise ValueError(f"imbalance_factor must be >= 1 (got {imbalance_factor})")
    if profile == "none" or num_classes == 1:
        return [int(n_max)] * num_classes
    if profile == "exp":
        return [int(n_max * (1.0 / imbalance_factor) ** (i / (num_classes - 1))) for i in range(num_classes)]
    if profile == "step":
        half = num_classes // 2
        return [int(n_max)] * half + [int(n_max / imbalance_factor)] * (num_classes - half)
    raise ValueError(f"unknown profile {profile!r} (choices: exp, step, none)")


def long_tailed_indices(labels: Tensor, counts: list[int], split_seed: int = 0) -> Tensor:
    """Indices keeping the first ``counts[c]`` of each class after a seeded per-class shuffle.

    Follows the reference code (numpy shuffle per class with a generator seeded by the
    split seed), so the same seed gives the same subset as LDAM-DRW / CMO.
    """
    labels_np = labels.cpu().numpy()
    rng = np.random.RandomState(split_seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.where(labels_np == c)[0]
        rng.shuffle(idx)
        keep.append(idx[:n])
    return torch.from_numpy(np.concatenate(keep)).to(torch.int64) if keep else torch.empty(0, dtype=torch.int64)


def lt_subset(
    labels: Tensor, num_classes: int, profile: str, n_max: int | None, imbalance_factor: float, split_seed: int = 0
) -> Tensor:
    """Indices of the long-tailed training subset of a (roughly balanced) labelled split.

    ``n_max`` None means the largest class as it is. Class ``i`` (in the data set's
    class order) keeps ``min(available, n_i)`` images. ``profile = "none"`` with
    ``n_max`` None keeps every image, in the original order.
    """
    if profile == "none" and n_max is None:
        return torch.arange(labels.numel(), dtype=torch.int64)
    if n_max is None:
        n_max = int(torch.bincount(labels, minlength=num_classes).max()) if labels.numel() else 0
    counts = lt_counts(profile, n_max, imbalance_factor, num_classes)
    return long_tailed_indices(labels, counts, split_seed)


def hold_out(
    labels: Tensor,
    per_class: int,
    seed: int = 0,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    dataset: str = "the training split",
) -> tuple[Tensor, Tensor]:
    """(val indices, rest indices): ``per_class`` images of every class held out for validation.

    Per class, the indices are shuffled with ``numpy.random.RandomState(seed)`` (one
    generator, classes in order) and the first ``per_class`` go to validation (grouped
    by class); the rest keep their original order, so the long-tailed cut can run on
    them as on a full split. A class with ``per_class`` images or fewer (nothing left to
    train on) raises ValueError, one line naming ``dataset``, the class and the counts.
    """
    if per_class < 0:
        raise ValueError(f"val_per_class must be >= 0 (got {per_class})")
    labels_np = labels.cpu().numpy()
    if num_classes is None:
        num_classes = int(labels_np.max()) + 1 if labels_np.size else 0
    if per_class == 0:
        return torch.empty(0, dtype=torch.int64), torch.arange(labels.numel(), dtype=torch.int64)
    counts = np.bincount(labels_np, minlength=num_classes)
    for c, n in enumerate(counts.tolist()):
        if n <= per_class:
            name = class_names[c] if class_names is not None else str(c)
            raise ValueError(
                f"{dataset}: class {name!r} has {n} image(s), too few to hold out "
                f"val_per_class = {per_class} and keep any to train on (needs more than {per_class})"
            )
    rng = np.random.RandomState(seed)
    val = []
    for c in range(num_classes):
        idx = np.where(labels_np == c)[0]
        rng.shuffle(idx)
        val.append(idx[:per_class])
    val_idx = np.concatenate(val).astype(np.int64)
    rest = np.ones(labels_np.size, dtype=bool)
    rest[val_idx] = False
    return torch.from_numpy(val_idx), torch.from_numpy(np.flatnonzero(rest).astype(np.int64))
