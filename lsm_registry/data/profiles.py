"""Long-tailed class profiles (docs/method.md §1) and the per-class subsampling."""

from __future__ import annotations

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
