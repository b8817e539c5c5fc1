"""Losses against hand computations, DRW / CB schedules and the soft-target rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lsm_registry.components.losses import (
    LDAM,
    BalancedSoftmax,
    CrossEntropy,
    Focal,
    FocalParams,
    LDAMParams,
    LogitAdjust,
    LogitAdjustParams,
    ReweightParams,
    class_balanced_weights,
    ldam_margins,
)
from lsm_registry.interfaces import Context
from lsm_registry.params import ParamError

COUNTS = (1000, 100, 10)


def ctx(counts=COUNTS):
    return Context(class_counts=tuple(counts), image_size=(3, 32, 32))


def softmax_list(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_ce_matches_torch():
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 2, 1])
    loss = CrossEntropy(ReweightParams(), ctx())
    assert loss(z, y).item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)


def test_focal_by_hand():
    z = [2.0, 0.0, -1.0]
    p = softmax_list(z)
    for gamma in (0.0, 1.0, 2.0):
        loss = Focal(FocalParams(gamma=gamma), ctx())
        got = loss(torch.tensor([z]), torch.tensor([1])).item()
        assert got == pytest.approx((1 - p[1]) ** gamma * -math.log(p[1]), rel=1e-5)


def test_focal_default_gamma_is_one():
    assert FocalParams().gamma == 1.0


def test_ldam_margins_by_hand():
    m = ldam_margins(torch.tensor(COUNTS), 0.5)
    expected = [0.5 * (10 / 1000) ** 0.25, 0.5 * (10 / 100) ** 0.25, 0.5]
    assert m.tolist() == pytest.approx(expected, rel=1e-6)
    assert LDAM(LDAMParams(), ctx()).margins.tolist() == pytest.approx(expected, rel=1e-6)


def test_ldam_loss_by_hand():
    z = [0.3, -0.2, 0.1]
    s, m = 30.0, [0.5 * (10 / 1000) ** 0.25, 0.5 * (10 / 100) ** 0.25, 0.5]
    loss = LDAM(LDAMParams(max_m=0.5, s=s), ctx())
    for y in range(3):
        shifted = [s * (v - (m[y] if j == y else 0.0)) for j, v in enumerate(z)]
        expected = -math.log(softmax_list(shifted)[y])
        assert loss(torch.tensor([z]), torch.tensor([y])).item() == pytest.approx(expected, rel=1e-5)


def test_ldam_matrix_matches_shifted_copies_and_is_stable():
    g = torch.Generator().manual_seed(1)
    z = torch.rand(6, 4, generator=g, dtype=torch.float64) * 2 - 1
    z[0] = torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=torch.float64)  # p_top ~ 1 at s = 30
    z[1] = torch.tensor([0.5, 0.5, -0.3, 0.2], dtype=torch.float64)  # a tie at the top
    counts = (500, 50, 20, 5)
    loss = LDAM(LDAMParams(max_m=0.5, s=30.0), ctx(counts))
    got = loss.class_losses(z.float())
    m = loss.margins.double()
    ref = torch.empty(6, 4, dtype=torch.float64)
    for c in range(4):  # reference: C shifted copies (fine in a test)
        shifted = 30.0 * (z - m[c] * F.one_hot(torch.tensor(c), 4).double())
        ref[:, c] = F.cross_entropy(shifted, torch.full((6,), c), reduction="none")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


def test_ldam_asks_for_normed_head_and_has_finite_gradients():
    assert LDAM.needs_normed_head and not CrossEntropy.needs_normed_head
    z = torch.tensor([[1.0, -1.0, -1.0], [0.2, 0.1, 0.0]], requires_grad=True)
    LDAM(LDAMParams(), ctx())(z, torch.tensor([0, 2])).backward()
    assert torch.isfinite(z.grad).all()


def test_class_balanced_weights_by_hand():
    beta = 0.9
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    expected = [3 * w / sum(raw) for w in raw]
    got = class_balanced_weights(torch.tensor(COUNTS), beta)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert got.sum().item() == pytest.approx(3.0, rel=1e-6)


def test_drw_weights_before_and_after_switch():
    z = torch.tensor([[0.5, 0.2, -0.1], [0.1, 0.9, 0.3], [-0.4, 0.0, 0.7]])
    y = torch.tensor([0, 1, 2])
    per_sample = F.cross_entropy(z, y, reduction="none")
    loss = CrossEntropy(ReweightParams(reweight="drw", reweight_epoch=3, beta=0.9), ctx())
    loss.set_epoch(2)
    assert loss.class_weights() is None
    assert loss(z, y).item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    loss.set_epoch(3)
    raw = [(1 - 0.9) / (1 - 0.9**n) for n in COUNTS]
    w = torch.tensor([3 * r / sum(raw) for r in raw])
    expected = (w * per_sample).sum() / w.sum()
    assert loss(z, y).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss(z, y).item() == pytest.approx(F.cross_entropy(z, y, weight=w).item(), rel=1e-5)


def test_cb_weights_from_the_start():
    loss = CrossEntropy(ReweightParams(reweight="cb", beta=0.99), ctx())
    loss.set_epoch(0)
    assert loss.class_weights() is not None


def test_drw_applies_to_every_loss():
    for cls, params in ((Focal, FocalParams), (LDAM, LDAMParams), (BalancedSoftmax, ReweightParams), (LogitAdjust, LogitAdjustParams)):
        loss = cls(params(reweight="drw", reweight_epoch=1), ctx())
        loss.set_epoch(0)
        assert loss.class_weights() is None
        loss.set_epoch(1)
        assert loss.class_weights() is not None


def test_balanced_softmax_shift_by_hand():
    loss = BalancedSoftmax(ReweightParams(), ctx((3, 1)))
    z = torch.zeros(1, 2)
    assert loss(z, torch.tensor([0])).item() == pytest.approx(-math.log(3 / 4), rel=1e-6)
    assert loss(z, torch.tensor([1])).item() == pytest.approx(-math.log(1 / 4), rel=1e-6)
    logits = torch.randn(4, 2)
    assert torch.equal(loss.eval_logits(logits), logits)


def test_logit_adjust_shift_by_hand():
    counts = (6, 3, 1)
    pi = [n / 10 for n in counts]
    z = [0.4, -0.3, 0.2]
    for tau in (1.0, 0.5):
        loss = LogitAdjust(LogitAdjustParams(tau=tau), ctx(counts))
        adjusted = [v + tau * math.log(p) for v, p in zip(z, pi)]
        for y in range(3):
            got = loss(torch.tensor([z]), torch.tensor([y])).item()
            assert got == pytest.approx(-math.log(softmax_list(adjusted)[y]), rel=1e-5)
        logits = torch.randn(2, 3)
        assert torch.equal(loss.eval_logits(logits), logits)


def test_logit_adjust_tau_one_equals_balanced_softmax():
    counts = (40, 7, 2)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0, 1])
    a = LogitAdjust(LogitAdjustParams(tau=1.0), ctx(counts))(z, y)
    b = BalancedSoftmax(ReweightParams(), ctx(counts))(z, y)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


LOSSES = [
    (CrossEntropy, ReweightParams()),
    (Focal, FocalParams(gamma=2.0)),
    (LDAM, LDAMParams()),
    (BalancedSoftmax, ReweightParams()),
    (LogitAdjust, LogitAdjustParams(tau=0.7)),
]


@pytest.mark.parametrize("cls,params", LOSSES, ids=[c.name for c, _ in LOSSES])
def test_two_label_soft_target_is_the_mix_of_hard_losses(cls, params):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, 3, generator=g).tanh()
    ya = torch.tensor([0, 1, 2, 0, 2])
    yb = torch.tensor([1, 1, 0, 2, 0])
    lam = torch.tensor([0.3, 0.5, 0.9, 0.0, 1.0])
    target = lam[:, None] * F.one_hot(ya, 3) + (1 - lam[:, None]) * F.one_hot(yb, 3)
    loss = cls(params, ctx())
    for b in range(5):
        soft = loss(z[b : b + 1], target[b : b + 1]).item()
        mixed = lam[b].item() * loss(z[b : b + 1], ya[b : b + 1]).item() + (1 - lam[b].item()) * loss(z[b : b + 1], yb[b : b + 1]).item()
        assert soft == pytest.approx(mixed, rel=1e-5, abs=1e-6)
    batch = loss(z, target).item()
    per = [lam[b].item() * loss(z[b : b + 1], ya[b : b + 1]).item() + (1 - lam[b].item()) * loss(z[b : b + 1], yb[b : b + 1]).item() for b in range(5)]
    assert batch == pytest.approx(sum(per) / 5, rel=1e-5)


@pytest.mark.parametrize(
    "make,key",
    [
        (lambda: FocalParams(gamma=-1.0), "gamma"),
        (lambda: LDAMParams(max_m=0.0), "max_m"),
        (lambda: LDAMParams(s=-1.0), "s"),
        (lambda: LogitAdjustParams(tau=-0.5), "tau"),
        (lambda: FocalParams(beta=1.0), "beta"),
    ],
)
def test_bad_parameters_name_the_key(make, key):
    with pytest.raises(ParamError) as info:
        make()
    assert info.value.key == key
    assert "\n" not in str(info.value)


def test_registered_by_name():
    from lsm_registry.plugins import build_registry

    reg = build_registry(entry_points=False)
    for name in ("ce", "focal", "ldam", "balanced-softmax", "logit-adjust"):
        assert ("loss", name) in reg


def test_focal_gradient_finite_when_confident():
    z = torch.tensor([[60.0, -60.0, 0.0], [0.3, 0.1, -0.2]], requires_grad=True)
    loss = Focal(FocalParams(gamma=0.5), ctx())(z, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
