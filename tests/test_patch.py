"""The patch operator: exact, block-structured, and loud about sizes it cannot cut."""

import pytest
import torch

from lsm_registry.components.patches import PixelUnshuffle
from lsm_registry.interfaces import Context
from lsm_registry.params import ParamError


def make(p: int) -> PixelUnshuffle:
    return PixelUnshuffle(PixelUnshuffle.Params(size=p), Context(class_counts=(1, 1), image_size=(3, 32, 32)))


@pytest.mark.parametrize("p", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_round_trip_is_bit_exact(p, channels_last):
    g = torch.Generator().manual_seed(p)
    x = torch.randn(3, 3, 32, 16, generator=g) * 1e3
    x[0, 0, 0, 0] = float("inf")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    op = make(p)
    u = op.split(x)
    assert u.shape == (3, 3 * p * p, 32 // p, 16 // p)
    back = op.merge(u)
    assert torch.equal(back, x)


def test_each_unit_is_one_block():
    p = 4
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    u = make(p).split(x)
    for i in range(2):
        for j in range(3):
            block = x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]
            assert sorted(u[:, :, i, j].flatten().tolist()) == sorted(block.flatten().tolist())


def test_swapping_a_unit_swaps_exactly_that_block():
    op = make(2)
    a, b = torch.zeros(1, 1, 4, 6), torch.ones(1, 1, 4, 6)
    ua, ub = op.split(a), op.split(b)
    ua[:, :, 1, 2] = ub[:, :, 1, 2]
    mixed = op.merge(ua)
    expected = torch.zeros(1, 1, 4, 6)
    expected[:, :, 2:4, 4:6] = 1
    assert torch.equal(mixed, expected)


@pytest.mark.parametrize("p, h, w", [(3, 32, 32), (4, 30, 32), (5, 32, 35), (8, 28, 28)])
def test_grid_and_split_refuse_sizes_p_does_not_divide(p, h, w):
    op = make(p)
    with pytest.raises(ValueError, match=f"patch size {p}.*{h}x{w}"):
        op.grid(h, w)
    with pytest.raises(ValueError, match=f"patch size {p}"):
        op.split(torch.zeros(1, 1, h, w))


def test_grid_and_expand():
    op = make(4)
    assert op.grid(32, 16) == (8, 4)
    m = torch.tensor([[[1.0, 0.0], [0.5, 2.0]]])
    e = op.expand(m)
    assert e.shape == (1, 1, 8, 8)
    assert torch.equal(e[0, 0, :4, :4], torch.ones(4, 4))
    assert torch.equal(e[0, 0, 4:, 4:], torch.full((4, 4), 2.0))
    assert torch.equal(e[0, 0, :4, 4:], torch.zeros(4, 4))


def test_size_must_be_positive():
    with pytest.raises(ParamError) as info:
        PixelUnshuffle.Params(size=0)
    assert info.value.key == "size"
