"""MiSLAS label-aware smoothing, LADE and the IB loss against their formulas, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lsm_registry.components.losses import (
    LADE,
    IBParams,
    InfluenceBalanced,
    LabelAwareSmoothing,
    LabelAwareSmoothingParams,
    LADEParams,
    label_aware_smoothing,
)
from lsm_registry.interfaces import Context
from lsm_registry.testing import check_component

COUNTS = (1000, 100, 10)
Z = [[2.0, 0.0, -1.0], [0.5, 1.5, -0.5]]


def ctx(counts=COUNTS):
    return Context(class_counts=tuple(counts), image_size=(3, 32, 32))


def log_softmax(z):
    lse = math.log(sum(math.exp(v) for v in z))
    return [v - lse for v in z]


# ------------------------------------------------------------------ label-aware smoothing


def eps_by_hand(shape, head=0.4, tail=0.1):
    t = [(n - 10) / 990 for n in COUNTS]
    f = {
        "concave": [math.sin(math.pi / 2 * v) for v in t],
        "linear": t,
        "convex": [1 - math.cos(math.pi / 2 * v) for v in t],
    }[shape]
    return [tail + (head - tail) * v for v in f]


@pytest.mark.parametrize("shape", ["concave", "linear", "convex"])
def test_smoothing_goes_from_eps_1_at_the_head_to_eps_k_at_the_tail(shape):
    eps = label_aware_smoothing(torch.tensor(COUNTS), 0.4, 0.1, shape).tolist()
    assert eps == pytest.approx(eps_by_hand(shape), abs=1e-6)
    assert eps[0] == pytest.approx(0.4) and eps[2] == pytest.approx(0.1)


def test_concave_lies_above_linear_above_convex_in_between():
    c, l, v = (eps_by_hand(s)[1] for s in ("concave", "linear", "convex"))
    assert c > l > v


def test_label_aware_smoothing_by_hand_hard_and_soft():
    loss = LabelAwareSmoothing(LabelAwareSmoothingParams(smooth_head=0.4, smooth_tail=0.1), ctx())
    eps = eps_by_hand("concave")

    def l(z, c):
        lp = log_softmax(z)
        return (1 - eps[c]) * -lp[c] + eps[c] * -sum(lp) / 3

    got = loss(torch.tensor(Z), torch.tensor([1, 2])).item()
    assert got == pytest.approx((l(Z[0], 1) + l(Z[1], 2)) / 2, rel=1e-5)
    q = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.25, 0.75]])
    soft = loss(torch.tensor(Z), q).item()
    by_hand = (0.3 * l(Z[0], 0) + 0.7 * l(Z[0], 1) + 0.25 * l(Z[1], 1) + 0.75 * l(Z[1], 2)) / 2
    assert soft == pytest.approx(by_hand, rel=1e-5)


def test_zero_smoothing_is_cross_entropy():
    loss = LabelAwareSmoothing(LabelAwareSmoothingParams(smooth_head=0.0, smooth_tail=0.0), ctx())
    z, y = torch.tensor(Z), torch.tensor([0, 2])
    assert loss(z, y).item() == pytest.approx(torch.nn.functional.cross_entropy(z, y).item(), rel=1e-6)


def test_equal_counts_give_every_class_eps_1():
    assert label_aware_smoothing(torch.tensor([5, 5]), 0.3, 0.0, "concave").tolist() == pytest.approx([0.3, 0.3])


# ------------------------------------------------------------------ LADE


def lade_by_hand(z, q, alpha, lam, counts=COUNTS):
    n = sum(counts)
    pi = [c / n for c in counts]
    b, c = len(z), len(counts)
    pc = (
        sum(
            -sum(q[i][k] * log_softmax([z[i][j] + math.log(pi[j]) for j in range(c)])[k] for k in range(c))
            for i in range(b)
        )
        / b
    )
    lader = 0.0
    for k in range(c):
        mass = sum(q[i][k] for i in range(b))
        first = sum(q[i][k] * z[i][k] for i in range(b)) / (mass + 1e-8)
        second = math.log(sum(math.exp(z[i][k] - math.log(pi[k]) + math.log(1 / c)) for i in range(b))) - math.log(b)
        lader -= pi[k] * (first - second - lam * second**2)
    return pc + alpha * lader


def test_lade_by_hand_hard_targets():
    loss = LADE(LADEParams(alpha=0.1, remine_lambda=0.1), ctx())
    q = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    got = loss(torch.tensor(Z), torch.tensor([0, 2])).item()
    assert got == pytest.approx(lade_by_hand(Z, q, 0.1, 0.1), rel=1e-5)


def test_lade_by_hand_soft_targets():
    loss = LADE(LADEParams(alpha=0.5, remine_lambda=0.2), ctx())
    q = [[0.6, 0.4, 0.0], [0.0, 0.1, 0.9]]
    got = loss(torch.tensor(Z), torch.tensor(q)).item()
    assert got == pytest.approx(lade_by_hand(Z, q, 0.5, 0.2), rel=1e-5)


def test_lade_alpha_zero_is_the_pc_softmax_and_predicts_with_plain_logits():
    loss = LADE(LADEParams(alpha=0.0), ctx())
    z, y = torch.tensor(Z), torch.tensor([1, 0])
    shifted = z + torch.tensor(COUNTS, dtype=torch.float32).div(sum(COUNTS)).log()
    assert loss(z, y).item() == pytest.approx(torch.nn.functional.cross_entropy(shifted, y).item(), rel=1e-6)
    assert torch.equal(loss.eval_logits(z), z)


# ------------------------------------------------------------------ IB


H = [[1.0, -2.0, 0.5], [0.25, 0.0, 3.0]]


def ib_by_hand(z, q, h, alpha=1000.0, eps=1e-3):
    inv = [1 / n for n in COUNTS]
    w = [v / sum(inv) * 3 for v in inv]
    total = 0.0
    for i in range(len(z)):
        lp = log_softmax(z[i])
        p = [math.exp(v) for v in lp]
        grad = sum(abs(p[k] - q[i][k]) for k in range(3))
        feat = sum(abs(v) for v in h[i])
        total += alpha / (grad * feat + eps) * sum(q[i][k] * w[k] * -lp[k] for k in range(3))
    return total / len(z)


def test_ib_is_plain_cross_entropy_before_start_epoch():
    loss = InfluenceBalanced(IBParams(start_epoch=3), ctx())
    loss.set_epoch(2)
    z, y = torch.tensor(Z), torch.tensor([0, 2])
    assert loss(z, y, features=torch.tensor(H)).item() == pytest.approx(
        torch.nn.functional.cross_entropy(z, y).item(), rel=1e-6
    )


def test_ib_by_hand_hard_and_soft_from_start_epoch():
    loss = InfluenceBalanced(IBParams(start_epoch=3, alpha=1000.0), ctx())
    loss.set_epoch(3)
    hard = loss(torch.tensor(Z), torch.tensor([0, 2]), features=torch.tensor(H)).item()
    assert hard == pytest.approx(ib_by_hand(Z, [[1, 0, 0], [0, 0, 1]], H), rel=1e-5)
    q = [[0.5, 0.5, 0.0], [0.0, 0.2, 0.8]]
    soft = loss(torch.tensor(Z), torch.tensor(q), features=torch.tensor(H)).item()
    assert soft == pytest.approx(ib_by_hand(Z, q, H), rel=1e-5)


def test_ib_declares_that_it_reads_features_and_refuses_to_run_without_them():
    assert InfluenceBalanced.needs_features
    loss = InfluenceBalanced(IBParams(start_epoch=0), ctx())
    with pytest.raises(ValueError, match="features"):
        loss(torch.tensor(Z), torch.tensor([0, 1]))


@pytest.mark.parametrize("cls", [LabelAwareSmoothing, LADE, InfluenceBalanced])
def test_the_new_losses_conform(cls):
    check_component(cls)
