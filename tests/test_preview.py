"""`lsm preview`: a legible PNG of one mixed batch, from the recipe's own components."""

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lsm_registry.cli import cli

RECIPE = """
[run]
seed = 3
epochs = 2
[data]
name = "synthetic-lt"
num_classes = 4
n_max = 24
imbalance_factor = 4.0
test_per_class = 2
[model]
name = "resnet32"
width = 4
[optim]
batch_size = 16
[sampler]
name = "dual-branch"
"""


@pytest.fixture()
def recipe(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE)
    return path


def run(*args):
    return CliRunner().invoke(cli, ["preview", *map(str, args)], catch_exceptions=False)


def test_preview_draws_one_row_per_pair(recipe, tmp_path):
    out = tmp_path / "p.png"
    res = run(recipe, "--set", 'mixer.name="lsm"', "--set", "mixer.start_epoch=0", "--set", "mixer.end_epoch=100", "--out", out, "--rows", 3)
    assert res.exit_code == 0, res.output
    assert "3 rows, mixer lsm, label fuser saliency" in res.output
    img = Image.open(out)
    two = tmp_path / "p2.png"
    assert run(recipe, "--set", 'mixer.name="lsm"', "--set", "mixer.start_epoch=0", "--set", "mixer.end_epoch=100", "--out", two, "--rows", 2).exit_code == 0
    # five columns of upscaled 32x32 tiles; height grows with the rows
    assert img.width == Image.open(two).width >= 5 * 96
    assert img.height > Image.open(two).height


def test_preview_loads_a_checkpoint_and_rejects_a_wrong_one(recipe, tmp_path):
    from lsm_registry.components.models import CifarResNet

    good = tmp_path / "good.pt"
    torch.save({"model": CifarResNet(32, 4, width=4).state_dict(), "epoch": 1}, good)
    res = run(recipe, "--set", 'mixer.name="lsm"', "--set", "mixer.start_epoch=0", "--set", "mixer.end_epoch=100", "--out", tmp_path / "c.png", "--checkpoint", good, "--rows", 1)
    assert res.exit_code == 0, res.output
    bad = tmp_path / "bad.pt"
    torch.save(CifarResNet(32, 4, width=8).state_dict(), bad)
    res = run(recipe, "--set", 'mixer.name="lsm"', "--set", "mixer.start_epoch=0", "--set", "mixer.end_epoch=100", "--out", tmp_path / "d.png", "--checkpoint", bad, "--rows", 1)
    assert res.exit_code == 2
    assert "bad.pt: does not fit the recipe's model" in res.output


def test_preview_needs_a_mixer(recipe, tmp_path):
    res = run(recipe, "--out", tmp_path / "x.png")
    assert res.exit_code == 2
    assert "no [mixer] table" in res.output
    assert not (tmp_path / "x.png").exists()


def test_preview_of_a_mixer_without_unit_masks(recipe, tmp_path):
    from lsm_registry.plugins import default_registry

    if ("mixer", "cutmix") not in default_registry():
        pytest.skip("no cutmix mixer registered")
    out = tmp_path / "cm.png"
    res = run(recipe, "--set", 'mixer.name="cutmix"', "--out", out, "--rows", 2)
    assert res.exit_code == 0, res.output
    assert Image.open(out).height > 0
