"""Losses against hand computations, DRW / CB schedules and the soft-target rule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import attrs
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
    for cls, params in (
        (Focal, FocalParams),
        (LDAM, LDAMParams),
        (BalancedSoftmax, ReweightParams),
        (LogitAdjust, LogitAdjustParams),
    ):
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
        mixed = (
            lam[b].item() * loss(z[b : b + 1], ya[b : b + 1]).item()
            + (1 - lam[b].item()) * loss(z[b : b + 1], yb[b : b + 1]).item()
        )
        assert soft == pytest.approx(mixed, rel=1e-5, abs=1e-6)
    batch = loss(z, target).item()
    per = [
        lam[b].item() * loss(z[b : b + 1], ya[b : b + 1]).item()
        + (1 - lam[b].item()) * loss(z[b : b + 1], yb[b : b + 1]).item()
        for b in range(5)
    ]
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


# ---------------------------------------------------------------- class weights on mixed batches


def test_per_label_is_the_default():
    assert ReweightParams().mixed_weighting == "per-label"
    assert FocalParams().mixed_weighting == LDAMParams().mixed_weighting == "per-label"


W3 = [0.5, 1.0, 1.5]
Z3 = [[0.8, -0.4, 0.1], [0.2, 0.9, -0.6], [-0.5, 0.3, 0.7]]
YF3, YB3, LAM3 = [0, 1, 2], [2, 0, 1], [0.7, 0.4, 0.2]


def hand_ce(z, c):
    return -math.log(softmax_list(z)[c])


def hand_focal2(z, c):
    p = softmax_list(z)[c]
    return (1 - p) ** 2 * -math.log(p)


def weighted(cls, params, w, counts=COUNTS):
    loss = cls(params, ctx(counts))
    loss._balanced = torch.tensor(w)  # explicit class weights for the hand computations
    loss.set_epoch(0)
    assert loss.class_weights() is not None
    return loss


def mixed3():
    y_f, y_b, lam = torch.tensor(YF3), torch.tensor(YB3), torch.tensor(LAM3)
    target = lam[:, None] * F.one_hot(y_f, 3) + (1 - lam[:, None]) * F.one_hot(y_b, 3)
    return target, SimpleNamespace(y_f=y_f, y_b=y_b, lam=lam)


HAND = [
    ("ce", CrossEntropy, lambda form: ReweightParams(reweight="cb", mixed_weighting=form), hand_ce),
    ("focal", Focal, lambda form: FocalParams(gamma=2.0, reweight="cb", mixed_weighting=form), hand_focal2),
]


@pytest.mark.parametrize("name,cls,make,l", HAND, ids=[h[0] for h in HAND])
def test_per_label_weighting_by_hand(name, cls, make, l):
    target, mixed = mixed3()
    term_f = sum(LAM3[b] * W3[YF3[b]] * l(Z3[b], YF3[b]) for b in range(3)) / sum(W3[YF3[b]] for b in range(3))
    term_b = sum((1 - LAM3[b]) * W3[YB3[b]] * l(Z3[b], YB3[b]) for b in range(3)) / sum(W3[YB3[b]] for b in range(3))
    loss = weighted(cls, make("per-label"), W3)
    assert loss(torch.tensor(Z3), target, mixed).item() == pytest.approx(term_f + term_b, rel=1e-5)


@pytest.mark.parametrize("name,cls,make,l", HAND, ids=[h[0] for h in HAND])
def test_joint_weighting_by_hand(name, cls, make, l):
    target, mixed = mixed3()
    num = sum(LAM3[b] * W3[YF3[b]] * l(Z3[b], YF3[b]) + (1 - LAM3[b]) * W3[YB3[b]] * l(Z3[b], YB3[b]) for b in range(3))
    den = sum(LAM3[b] * W3[YF3[b]] + (1 - LAM3[b]) * W3[YB3[b]] for b in range(3))
    joint = weighted(cls, make("joint"), W3)
    assert joint(torch.tensor(Z3), target, mixed).item() == pytest.approx(num / den, rel=1e-5)
    # without ``mixed`` a soft target gets the joint form whatever the parameter says
    per_label = weighted(cls, make("per-label"), W3)
    assert per_label(torch.tensor(Z3), target).item() == pytest.approx(num / den, rel=1e-5)
    # the two forms differ on this case, so the tests above tell them apart
    assert per_label(torch.tensor(Z3), target, mixed).item() != pytest.approx(num / den, rel=1e-3)


def test_per_label_equals_cmo_reference_for_constant_lam():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(8, 3, generator=g)
    y_f = torch.tensor([0, 1, 2, 2, 1, 0, 2, 1])
    y_b = torch.tensor([1, 0, 0, 2, 2, 0, 1, 1])  # with y_f == y_b on some rows
    lam = 0.35
    lam_b = torch.full((8,), lam)
    target = lam * F.one_hot(y_f, 3) + (1 - lam) * F.one_hot(y_b, 3)
    loss = CrossEntropy(ReweightParams(reweight="drw", reweight_epoch=2, beta=0.9), ctx())
    loss.set_epoch(2)
    w = loss.class_weights()
    ref = lam * F.cross_entropy(z, y_f, weight=w) + (1 - lam) * F.cross_entropy(z, y_b, weight=w)
    got = loss(z, target, SimpleNamespace(y_f=y_f, y_b=y_b, lam=lam_b))
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    qw = target * w
    old = (qw * loss.class_losses(z)).sum() / qw.sum()
    assert got.item() != pytest.approx(old.item(), rel=1e-3)


@pytest.mark.parametrize("cls,params", LOSSES, ids=[c.name for c, _ in LOSSES])
def test_joint_parameter_reproduces_the_single_denominator(cls, params):
    g = torch.Generator().manual_seed(6)
    z = torch.randn(6, 3, generator=g).tanh()
    y_f = torch.tensor([0, 1, 2, 0, 2, 1])
    y_b = torch.tensor([1, 1, 0, 2, 0, 2])
    lam = torch.rand(6, generator=g)
    target = lam[:, None] * F.one_hot(y_f, 3) + (1 - lam[:, None]) * F.one_hot(y_b, 3)
    mixed = SimpleNamespace(y_f=y_f, y_b=y_b, lam=lam)
    loss = cls(attrs.evolve(params, reweight="cb", beta=0.99, mixed_weighting="joint"), ctx())
    qw = target * loss.class_weights()
    expected = (qw * loss.class_losses(z)).sum() / qw.sum()
    assert loss(z, target, mixed).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss(z, target).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("cls,params", LOSSES, ids=[c.name for c, _ in LOSSES])
def test_uniform_weights_make_both_forms_the_plain_mean(cls, params):
    counts = (50, 50, 50)  # equal counts: class-balanced weights are all 1
    g = torch.Generator().manual_seed(7)
    z = torch.randn(5, 3, generator=g).tanh()
    y_f = torch.tensor([0, 1, 2, 0, 2])
    y_b = torch.tensor([1, 1, 0, 2, 0])
    lam = torch.tensor([0.3, 0.5, 0.9, 0.0, 1.0])
    target = lam[:, None] * F.one_hot(y_f, 3) + (1 - lam[:, None]) * F.one_hot(y_b, 3)
    mixed = SimpleNamespace(y_f=y_f, y_b=y_b, lam=lam)
    values = []
    for form in ("per-label", "joint"):
        loss = cls(attrs.evolve(params, reweight="cb", mixed_weighting=form), ctx(counts))
        torch.testing.assert_close(loss.class_weights(), torch.ones(3))
        values.append(loss(z, target, mixed).item())
    plain = cls(params, ctx(counts))
    m = plain.class_losses(z)
    mean = (lam * m.gather(1, y_f[:, None]).squeeze(1) + (1 - lam) * m.gather(1, y_b[:, None]).squeeze(1)).mean()
    assert values[0] == pytest.approx(mean.item(), rel=1e-5)
    assert values[1] == pytest.approx(mean.item(), rel=1e-5)
    assert plain(z, target, mixed).item() == pytest.approx(mean.item(), rel=1e-5)


def test_hard_targets_ignore_the_weighting_form():
    z = torch.tensor(Z3)
    y = torch.tensor(YF3)
    ref = F.cross_entropy(z, y, weight=torch.tensor(W3))
    for form in ("per-label", "joint"):
        loss = weighted(CrossEntropy, ReweightParams(reweight="cb", mixed_weighting=form), W3)
        assert loss(z, y).item() == pytest.approx(ref.item(), rel=1e-5)
        assert loss(z, y, None).item() == pytest.approx(ref.item(), rel=1e-5)
