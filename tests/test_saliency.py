"""Grad-CAM: the closed form equals autograd, the pass leaves the model alone, no NaN ever."""

import copy
import functools

import pytest
import torch

from lsm_registry.components.models import CifarResNet
from lsm_registry.components.patches import PixelUnshuffle
from lsm_registry.components.saliency import GradCAM, RandomSaliency, normalise_to_units
from lsm_registry.interfaces import Context

CTX = Context(class_counts=(5, 3, 2, 1), image_size=(3, 32, 32))


def patch(p=4):
    return PixelUnshuffle(PixelUnshuffle.Params(size=p), CTX)


def gradcam(**kw):
    return GradCAM(GradCAM.Params(**kw), CTX)


def tiny_model(normed=False, seed=0):
    return copy.deepcopy(_tiny_model(normed, seed))


@functools.lru_cache(maxsize=None)
def _tiny_model(normed, seed):
    torch.manual_seed(seed)
    model = CifarResNet(32, num_classes=4, width=4, normed_head=normed)
    # Non-trivial batch-norm statistics, so eval mode differs from train mode.
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 32, 32))
    return model


def batch(seed=1, b=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 4, (b,), generator=g)


def test_fast_path_equals_autograd_path():
    model = tiny_model()
    x, y = batch()
    fast, slow = gradcam(), gradcam(fast=False)
    assert fast.can_use_fast_path(model) and not slow.can_use_fast_path(model)
    model.eval()
    raw_fast = fast.class_activation(model, x, y)
    raw_slow = slow.class_activation(model, x, y)
    assert raw_fast.shape == (4, 8, 8)
    assert torch.allclose(raw_fast, raw_slow, atol=1e-6, rtol=1e-4)
    s_fast, s_slow = fast(model, x, y, patch()), slow(model, x, y, patch())
    assert s_fast.shape == (4, 8, 8)
    assert torch.allclose(s_fast, s_slow, atol=1e-5)


def test_fast_path_matches_hand_computed_cam():
    model = tiny_model().eval()
    x, y = batch(b=2)
    with torch.no_grad():
        feats = model.forward_features(x)
    w = model.classifier.weight
    for i in range(2):
        hand = sum(w[y[i], k] / 64 * feats[i, k] for k in range(feats.shape[1]))
        assert torch.allclose(gradcam().class_activation(model, x, y)[i], hand, atol=1e-5)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_pass_leaves_model_state_alone(fast, mode):
    model = tiny_model()
    model.train(mode == "train")
    for i, prm in enumerate(model.parameters()):
        if i % 2:
            prm.grad = torch.full_like(prm, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if prm.grad is None else prm.grad.clone() for prm in model.parameters()]
    x, y = batch()
    gradcam(fast=fast)(model, x, y, patch())
    assert model.training == (mode == "train")
    assert all(m.training == (mode == "train") for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights, running stats, num_batches_tracked
    for prm, g in zip(model.parameters(), grads):
        assert (prm.grad is None) == (g is None)
        if g is not None:
            assert torch.equal(prm.grad, g)


@pytest.mark.parametrize("fill", [0.0, 1.0, -3.0])
@pytest.mark.parametrize("fast", [True, False])
def test_constant_images_give_finite_uniform_scores(fill, fast):
    model = tiny_model()
    x = torch.full((3, 3, 32, 32), fill)
    s = gradcam(fast=fast)(model, x, torch.tensor([0, 1, 2]), patch())
    assert s.shape == (3, 8, 8)
    assert torch.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()


def test_scores_in_unit_range_with_a_one():
    model = tiny_model()
    x, y = batch(b=6)
    s = gradcam()(model, x, y, patch())
    assert torch.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()


def test_normalise_hand_computed():
    cam = torch.tensor([[[0.0, 2.0], [4.0, -1.0]]])  # ReLU -> 0, 2, 4, 0 -> min-max /4
    s = normalise_to_units(cam, 2, 2, patch(1))
    assert torch.allclose(s, torch.tensor([[[0.0, 0.5], [1.0, 0.0]]]))
    s = normalise_to_units(cam, 2, 2, patch(2))
    assert torch.allclose(s, torch.tensor([[[0.375]]]))
    const = normalise_to_units(torch.full((2, 3, 3), 7.0), 12, 12, patch(4))
    assert torch.equal(const, torch.ones(2, 3, 3))
    bad = normalise_to_units(torch.tensor([[[float("nan"), float("inf")], [1.0, 0.0]]]), 4, 4, patch(2))
    assert torch.isfinite(bad).all() and (bad >= 0).all()


def test_normed_head_takes_autograd_path_and_works():
    model = tiny_model(normed=True)
    g = gradcam()
    assert not g.can_use_fast_path(model)
    x, y = batch()
    s = g(model, x, y, patch())
    assert s.shape == (4, 8, 8) and torch.isfinite(s).all()


def test_other_layer_and_unknown_layer():
    model = tiny_model()
    x, y = batch()
    s = gradcam(layer="layer2")(model, x, y, patch(2))
    assert s.shape == (4, 16, 16) and torch.isfinite(s).all()
    assert not gradcam(layer="layer2").can_use_fast_path(model)
    assert gradcam(layer="layer3").can_use_fast_path(model)
    with pytest.raises(ValueError, match="no layer 'layer9'; valid layers: layer3, layer2, layer1"):
        gradcam(layer="layer9")(model, x, y, patch())


def test_channels_last_gives_the_same_scores():
    model = tiny_model()
    x, y = batch()
    s = gradcam()(model, x, y, patch())
    model_cl = model.to(memory_format=torch.channels_last)
    s_cl = gradcam()(model_cl, x.contiguous(memory_format=torch.channels_last), y, patch())
    assert torch.allclose(s, s_cl, atol=1e-5)


def test_random_provider_is_seeded_and_in_range():
    x = torch.zeros(2, 3, 32, 32)
    a = RandomSaliency(RandomSaliency.Params(), Context((1,), (3, 32, 32), generator=torch.Generator().manual_seed(3)))
    b = RandomSaliency(RandomSaliency.Params(), Context((1,), (3, 32, 32), generator=torch.Generator().manual_seed(3)))
    sa, sb = a(None, x, None, patch()), b(None, x, None, patch())
    assert sa.shape == (2, 8, 8) and torch.equal(sa, sb)
    assert (sa >= 0).all() and (sa < 1).all()


def _shifted_views(b: int, left: float, top: float, flip: bool = False):
    from lsm_registry.interfaces import Crops, Views

    boxes = torch.tensor([[left, top, 32.0, 32.0]] * b)
    crops = Crops(boxes, torch.full((b,), flip), torch.tensor([[32, 32]] * b))
    return Views(torch.arange(b), crops, epoch=0)


def test_image_pixels_marks_the_padding_of_a_shifted_crop():
    from lsm_registry.components.saliency import image_pixels

    views = _shifted_views(1, left=-4.0, top=3.0)
    valid = image_pixels(views.crops, 32, 32, torch.device("cpu"))[0]
    assert not valid[:, :4].any() and valid[:29, 4:].all()  # 4 padded columns on the left
    assert not valid[29:].any()  # the crop reaches 3 rows below the image
    flipped = image_pixels(_shifted_views(1, -4.0, 3.0, flip=True).crops, 32, 32, torch.device("cpu"))[0]
    assert torch.equal(flipped, valid.flip(-1))


@pytest.mark.parametrize("mask", [True, False])
def test_gradcam_masks_padding_only_when_asked(mask):
    model = tiny_model()
    torch.manual_seed(3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    views = _shifted_views(4, left=-4.0, top=-4.0)
    provider = gradcam(mask_padding=mask)
    scores = provider.scores_of_views(model, x, y, patch(), views)
    plain = provider(model, x, y, patch())
    # The corner unit (4x4 pixels) is all padding.
    if mask:
        assert torch.all(scores[:, 0, 0] == 0)
        assert not torch.equal(scores, plain)
    else:
        assert torch.equal(scores, plain)
