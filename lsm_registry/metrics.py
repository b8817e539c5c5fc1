"""Test-set metrics of a long-tailed run: top-1 overall, per class, Many / Medium / Few, rarest three.

One module so that the engine (which counts), the run folder (which writes) and the
pictures (which colour by group) agree on where Many ends and Few begins.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

MANY_ABOVE = 100  # Many: n_c > 100
FEW_BELOW = 20  # Few: n_c < 20; Medium: 20 <= n_c <= 100


def group_of(count: int) -> str:
    if count > MANY_ABOVE:
        return "many"
    if count < FEW_BELOW:
        return "few"
    return "medium"


def summarise_predictions(pred: Tensor, labels: Tensor, class_counts: tuple[int, ...]) -> dict[str, Any]:
    """Top-1 overall, per class, Many / Medium / Few (None when a group has no class) and rarest three."""
    num_classes = len(class_counts)
    correct = torch.bincount(labels[pred == labels], minlength=num_classes)
    total = torch.bincount(labels, minlength=num_classes)
    return summarise_counts(correct, total, class_counts)


def summarise_counts(correct: Tensor, total: Tensor, class_counts: tuple[int, ...]) -> dict[str, Any]:
    """Metrics from per-class correct / total counts (what processes all-reduce).

    Group accuracies average the per-class accuracies of the group's classes (the test
    sets are balanced, so this equals pooling their images).
    """
    correct, total = correct.double().cpu(), total.double().cpu()
    per_class = [float(c / t) if t > 0 else None for c, t in zip(correct.tolist(), total.tolist())]
    result: dict[str, Any] = {"top1": float(correct.sum() / total.sum()) if total.sum() > 0 else None}
    for group in ("many", "medium", "few"):
        accs = [a for a, n in zip(per_class, class_counts) if group_of(n) == group and a is not None]
        result[group] = sum(accs) / len(accs) if accs else None
    order = sorted((n, c) for c, n in enumerate(class_counts))
    rare = [per_class[c] for _, c in order[:3] if per_class[c] is not None]
    result["rare3"] = sum(rare) / len(rare) if rare else None
    result["per_class"] = per_class
    return result
