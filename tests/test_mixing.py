"""LSM's mask, mix and label fusion, the dual-branch sampler, and a seeded mixed run."""

import math

import pytest
import torch

from lsm_registry.components.fusers import AreaFuser, Saliency2Fuser, SaliencyFuser
from lsm_registry.components.mixers import LSM
from lsm_registry.components.patches import PixelUnshuffle
from lsm_registry.components.samplers import DualBranchSampler
from lsm_registry.errors import RecipeError
from lsm_registry.interfaces import Context, MixResult
from lsm_registry.ops import rank_descending
from lsm_registry.params import ParamError

B, H, W, P = 5, 16, 16, 4
N = (H // P) * (W // P)


def ctx(seed=0, classes=6, epochs=10):
    return Context(
        class_counts=(1,) * classes, image_size=(3, H, W), generator=torch.Generator().manual_seed(seed), epochs=epochs
    )


def lsm(seed=0, **kw):
    return LSM(LSM.Params(**kw), ctx(seed))


PATCH = PixelUnshuffle(PixelUnshuffle.Params(size=P), ctx())


def images(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, H, W, generator=g), torch.randn(B, 3, H, W, generator=g)


def distinct_scores(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(B * N, generator=g).float().view(B, H // P, W // P) / (B * N)


# ---------------------------------------------------------------------- mask


def test_topk_picks_exactly_k_of_the_most_salient_units():
    mixer = lsm(seed=3, same_k=True)
    expected_gen = torch.Generator().manual_seed(3)
    rho = torch.rand(1, generator=expected_gen)
    k = int(min(max(round(float(rho) * N), 1), N - 1))
    s = distinct_scores()
    mask = mixer.select(s)
    assert mask.dtype == torch.bool and mask.shape == s.shape
    assert mask.flatten(1).sum(1).tolist() == [k] * B
    flat, m = s.flatten(1), mask.flatten(1)
    for i in range(B):
        assert flat[i][m[i]].min() > flat[i][~m[i]].max()
        assert set(torch.topk(flat[i], k).indices.tolist()) == set(torch.nonzero(m[i]).flatten().tolist())


def test_topk_per_image_k_in_range_and_follows_beta():
    mixer = lsm(seed=1, alpha=0.3)
    counts = torch.cat([mixer.select(distinct_scores(s)).flatten(1).sum(1) for s in range(40)])
    assert counts.min() >= 1 and counts.max() <= N - 1
    # Beta(0.3, 0.3) is U-shaped: most images paste few or many units, not half.
    extreme = ((counts <= 3) | (counts >= N - 3)).float().mean()
    assert extreme > 0.5
    assert len(set(counts.tolist())) > 3  # one k per image, not per batch


def test_ties_break_by_index():
    ranks = rank_descending(torch.tensor([[0.5, 0.5, 0.9, 0.5]]))
    assert ranks.tolist() == [[1, 2, 0, 3]]
    mask = lsm(seed=0, same_k=True).select(torch.ones(1, 4, 4))
    k = int(mask.sum())
    assert mask.flatten().tolist() == [True] * k + [False] * (N - k)


def test_threshold_mask_hand_computed():
    s = torch.tensor([[[0.1, 0.6], [0.5, 1.0]]])  # threshold 0.5 * 1.0, inclusive
    mask = lsm(mask="threshold", tau=0.5).select(s)
    assert mask.tolist() == [[[False, True], [True, True]]]


# ---------------------------------------------------------------------- mix


def test_mix_takes_masked_units_from_the_foreground():
    xf, xb = images(0)
    s = distinct_scores()
    res = lsm(seed=5).mix(xf, xb, s, PATCH)
    assert res.unit_mask.shape == (B, H // P, W // P) and res.unit_mask.dtype == torch.bool
    assert res.weight.shape == (B, 1, H, W)
    assert torch.equal(res.weight, PATCH.expand(res.unit_mask.float()))
    assert torch.equal(res.images, torch.where(res.weight.bool(), xf, xb))


def test_mask_all_gives_the_foreground_and_none_the_background(monkeypatch):
    xf, xb = images(1)
    s = distinct_scores()
    all_in = lsm(mask="threshold", tau=0.0).mix(xf, xb, s, PATCH)
    assert torch.equal(all_in.images, xf)
    mixer = lsm()
    monkeypatch.setattr(mixer, "select", lambda scores: torch.zeros_like(scores, dtype=torch.bool))
    none_in = mixer.mix(xf, xb, s, PATCH)
    assert torch.equal(none_in.images, xb)
    assert float(none_in.weight.sum()) == 0.0


def test_mix_is_vectorised_and_keeps_channels_last():
    xf, xb = images(2)
    cl = lsm(seed=4).mix(
        xf.contiguous(memory_format=torch.channels_last),
        xb.contiguous(memory_format=torch.channels_last),
        distinct_scores(),
        PATCH,
    )
    plain = lsm(seed=4).mix(xf, xb, distinct_scores(), PATCH)
    assert torch.equal(cl.images, plain.images)


def test_mix_needs_saliency_and_matching_shapes():
    xf, xb = images(3)
    with pytest.raises(ValueError, match="needs the foreground saliency"):
        lsm().mix(xf, xb, None, PATCH)
    with pytest.raises(ValueError, match="saliency has shape"):
        lsm().mix(xf, xb, torch.ones(B, 2, 2), PATCH)


# ---------------------------------------------------------------------- params and window


def test_params_validation_names_the_key():
    with pytest.raises(ParamError) as info:
        LSM.Params(prob=1.5)
    assert info.value.key == "prob"
    with pytest.raises(ParamError) as info:
        LSM.Params(start_epoch=5, end_epoch=3)
    assert info.value.key == "end_epoch"
    LSM.Params(start_epoch=5, end_epoch=-100)  # negative: relative to the run, checked at run time


def test_recipe_error_line_for_a_bad_window():
    from lsm_registry.recipe import validate

    raw = {"data": {"name": "synthetic-lt"}, "mixer": {"name": "lsm", "start_epoch": 6, "end_epoch": 2, "prob": 2.0}}
    with pytest.raises(RecipeError) as info:
        validate(raw, "x.toml")
    text = "\n".join(info.value.lines)
    assert "x.toml [mixer].prob: must be in [0, 1]" in text
    raw["mixer"]["prob"] = 0.5
    with pytest.raises(RecipeError) as info:
        validate(raw, "x.toml")
    assert any(line.startswith("x.toml [mixer].end_epoch: must be > start_epoch = 6") for line in info.value.lines)


def test_window_matches_cmo():
    mixer = LSM(LSM.Params(), ctx(epochs=10))  # start 4, end -3: 3 < epoch < 10 - 3
    assert [e for e in range(10) if mixer.active(e)] == [4, 5, 6]
    absolute = LSM(LSM.Params(start_epoch=1, end_epoch=3), ctx(epochs=10))
    assert [e for e in range(10) if absolute.active(e)] == [1, 2]


# ---------------------------------------------------------------------- fusers


def fuser(cls):
    return cls(cls.Params(), ctx())


def test_saliency_labels_equal_the_pasted_share():
    xf, xb = images(4)
    s_f = distinct_scores(1)
    s_b = distinct_scores(2)
    res = lsm(seed=2).mix(xf, xb, s_f, PATCH)
    y_f, y_b = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 5, 0, 3, 1])
    for cls in (SaliencyFuser, AreaFuser, Saliency2Fuser):
        t = fuser(cls).fuse(res, y_f, y_b, s_f, s_b)
        assert t.shape == (B, 6)
        assert (t >= 0).all() and torch.allclose(t.sum(1), torch.ones(B))
    t = fuser(SaliencyFuser).fuse(res, y_f, y_b, s_f, None)
    m = res.unit_mask
    for i in range(B):
        share = float(s_f[i][m[i]].sum() / s_f[i].sum())
        if y_f[i] != y_b[i]:
            assert t[i, y_f[i]] == pytest.approx(share, abs=1e-6)
            assert t[i, y_b[i]] == pytest.approx(1 - share, abs=1e-6)
        else:
            assert t[i, y_f[i]] == pytest.approx(1.0)
    area = fuser(AreaFuser).fuse(res, y_f, y_b, None, None)
    assert area[0, 0] == pytest.approx(float(m[0].float().mean()))
    two = fuser(Saliency2Fuser).fuse(res, y_f, y_b, s_f, s_b)
    lam_f = float(s_f[0][m[0]].sum() / s_f[0].sum())
    lam_b = float(s_b[0][~m[0]].sum() / s_b[0].sum())
    assert two[0, 0] == pytest.approx(lam_f / (lam_f + lam_b), abs=1e-6)
    assert two[0, 5] == pytest.approx(lam_b / (lam_f + lam_b), abs=1e-6)


def test_fusers_read_the_weight_map_without_a_unit_mask():
    weight = torch.zeros(1, 1, H, W)
    weight[:, :, :8, :] = 1.0  # top half pasted
    weight[:, :, 8:12, :] = 0.5  # a blend on the next quarter
    res = MixResult(images=torch.zeros(1, 3, H, W), weight=weight)
    y_f, y_b = torch.tensor([1]), torch.tensor([2])
    area = fuser(AreaFuser).fuse(res, y_f, y_b, None, None)
    assert area[0, 1] == pytest.approx(0.5 + 0.125)
    s = torch.zeros(1, 4, 4)
    s[0, 0, 0] = 3.0
    s[0, 2, 0] = 1.0
    sal = fuser(SaliencyFuser).fuse(res, y_f, y_b, s, None)
    assert sal[0, 1] == pytest.approx((3.0 + 0.5 * 1.0) / 4.0)


def test_saliency_fusers_refuse_missing_saliency():
    res = MixResult(images=torch.zeros(1, 3, H, W), weight=torch.zeros(1, 1, H, W))
    with pytest.raises(ValueError, match="'saliency' needs"):
        fuser(SaliencyFuser).fuse(res, torch.tensor([0]), torch.tensor([1]), None, None)
    with pytest.raises(ValueError, match="'saliency2' needs"):
        fuser(Saliency2Fuser).fuse(res, torch.tensor([0]), torch.tensor([1]), torch.ones(1, 4, 4), None)


# ---------------------------------------------------------------------- sampler


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_dual_branch_frequencies_follow_n_to_the_one_minus_gamma(gamma):
    counts = torch.tensor([400, 100, 25])
    labels = torch.repeat_interleave(torch.arange(3), counts)
    context = Context(class_counts=tuple(counts.tolist()), image_size=(3, H, W), seed=11)
    sampler = DualBranchSampler(DualBranchSampler.Params(gamma=gamma), context, labels)
    drawn = torch.cat([fg for epoch in range(8) for _, fg in sampler.batches(epoch, 25)])
    freq = torch.bincount(labels[drawn], minlength=3).double() / drawn.numel()
    expected = counts.double() ** (1 - gamma)
    expected /= expected.sum()
    tol = 4 * torch.sqrt(expected * (1 - expected) / drawn.numel()) + 1e-3
    assert ((freq - expected).abs() <= tol).all(), (freq.tolist(), expected.tolist())


# ---------------------------------------------------------------------- the whole step


def tiny_recipe():
    from lsm_registry.recipe import validate

    raw = {
        "run": {"epochs": 1, "seed": 5, "eval_every": 1},
        "data": {"name": "synthetic-lt", "num_classes": 4, "n_max": 16, "imbalance_factor": 4.0, "test_per_class": 2},
        "model": {"name": "resnet32", "width": 4},
        "optim": {"batch_size": 8, "warmup_epochs": 0},
        "sampler": {"name": "dual-branch"},
        "mixer": {"name": "lsm", "prob": 1.0, "start_epoch": 0, "end_epoch": 100},
    }
    return validate(raw, "tiny.toml")


def test_mixed_training_is_deterministic_for_a_seed():
    from lsm_registry.engine import Trainer
    from lsm_registry.plugins import default_registry

    recipe = tiny_recipe()
    assert (
        recipe.saliency.name == "gradcam"
        and recipe.label_fuser.name == "saliency"
        and recipe.patch.name == "pixel-unshuffle"
    )
    records = []
    for _ in range(2):
        trainer = Trainer(recipe, default_registry())
        trainer.fit()
        records.append(trainer.history[0])
    a, b = records
    assert math.isfinite(a["train_loss"])
    assert a["train_loss"] == b["train_loss"]
    assert a["mixed_fraction"] == 1.0
    assert 0.0 < a["fg_label_weight"] <= 1.0 and a["fg_label_weight"] == b["fg_label_weight"]
