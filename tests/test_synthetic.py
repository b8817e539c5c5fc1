import torch

from lsm_registry.data.profiles import lt_counts
from lsm_registry.data.synthetic import class_identity, render_split


def test_profile_matches_the_cifar_formula():
    counts = lt_counts("exp", 500, 100.0, 10)
    assert counts[0] == 500 and counts[-1] == 5
    assert counts == sorted(counts, reverse=True)


def test_render_is_seeded_and_uint8():
    a, ya = render_split([3, 2], seed=1)
    b, yb = render_split([3, 2], seed=1)
    c, _ = render_split([3, 2], seed=2)
    assert a.dtype == torch.uint8 and a.shape == (5, 3, 32, 32)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c)
    assert ya.tolist() == [0, 0, 0, 1, 1]


def test_class_identities_are_distinct():
    assert len({class_identity(c) for c in range(40)}) == 40


def test_the_object_not_the_background_carries_the_class():
    """Same seed, different labels: the images differ only where an object is drawn."""
    from lsm_registry.data.synthetic import render

    labels_a = torch.zeros(64, dtype=torch.int64)
    labels_b = torch.ones(64, dtype=torch.int64)
    a = render(labels_a, torch.Generator().manual_seed(5)).float()
    b = render(labels_b, torch.Generator().manual_seed(5)).float()
    changed = (a - b).abs().sum(dim=1) > 0
    # objects cover a minority of the image: the background is shared
    assert 0.0 < changed.float().mean() < 0.35


def _object_colours(images: torch.Tensor) -> set[int]:
    """Each image's commonest saturated colour, quantised: the solid object's colour (the background
    is mid-range noise, the clutter strokes are thin)."""
    q = images.long() // 64  # 4 levels per channel
    codes = q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]  # (N, H, W)
    spread = images.float().amax(dim=1) - images.float().amin(dim=1)
    colours = set()
    for code, keep in zip(codes, spread > 100):
        if keep.any():
            colours.add(int(torch.mode(code[keep]).values))
    return colours


def test_version_2_draws_the_colour_per_image_and_version_1_per_class():
    one, _ = render_split([40], seed=3, version=1)
    two, _ = render_split([40], seed=3, version=2)
    assert len(_object_colours(one)) <= 2  # one class colour (and its jitter)
    assert len(_object_colours(two)) >= 5  # colours from the whole palette
    assert torch.equal(one, render_split([40], seed=3)[0])  # version 1 is the default, unchanged


def test_version_2_has_fewer_distinct_classes(registry):
    import pytest

    from lsm_registry.components.datasets import SyntheticLT
    from lsm_registry.interfaces import Context

    factory = SyntheticLT(SyntheticLT.Params(num_classes=20, version=2), Context(class_counts=(), image_size=(0, 0, 0)))
    with pytest.raises(ValueError, match="version 2 draws at most 18"):
        factory.build()


def test_version_3_shows_the_class_colour_on_about_half_of_the_images():
    from lsm_registry.data.synthetic import CLASS_COLOUR_SHARE, PALETTE, object_colours

    labels = torch.arange(4).repeat_interleave(500)
    own = torch.tensor([PALETTE[c] for c in range(4)], dtype=torch.float32) / 255.0
    colours = object_colours(labels, own, torch.Generator().manual_seed(0), version=3)
    palette = torch.tensor(PALETTE, dtype=torch.float32) / 255.0
    assert bool((colours[:, None, :] == palette[None]).all(dim=2).any(dim=1).all())  # always a palette colour
    shown = (colours == own[labels]).all(dim=1).float()
    # The class's own colour: the coin's share, plus 1/8 of the others by chance; per class too.
    expected = CLASS_COLOUR_SHARE + (1 - CLASS_COLOUR_SHARE) / len(PALETTE)
    assert abs(float(shown.mean()) - expected) < 0.04
    assert all(abs(float(shown[labels == c].mean()) - expected) < 0.08 for c in range(4))
    three, _ = render_split([40], seed=3, version=3)
    assert 2 <= len(_object_colours(three))  # the class colour and drawn ones
