"""`lsm preview`: a legible PNG of one mixed batch, from the recipe's own components."""

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lsm_registry.cli import cli
from lsm_registry.viz.pictures import COLUMNS, TILE_MIN

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


# pictures.render's layout: 4 px padding, 20 px caption under each row (and under the
# picture for a footnote), a 22 px header; tiles scaled up (nearest) to >= TILE_MIN.
PAD, CAPTION, HEADER = 4, 20, 22


def tile_side(image_side: int = 32) -> int:
    return image_side * max(1, -(-TILE_MIN // image_side))


def expected_size(rows: int, footnote: bool, image_side: int = 32) -> tuple[int, int]:
    tile = tile_side(image_side)
    width = len(COLUMNS) * (tile + PAD) + PAD
    return width, HEADER + rows * (tile + PAD + CAPTION) + PAD + (CAPTION if footnote else 0)


def test_preview_draws_one_row_per_pair(recipe, tmp_path):
    out = tmp_path / "p.png"
    res = run(
        recipe,
        "--set",
        'mixer.name="lsm"',
        "--set",
        "mixer.start_epoch=0",
        "--set",
        "mixer.end_epoch=100",
        "--out",
        out,
        "--rows",
        3,
    )
    assert res.exit_code == 0, res.output
    assert "3 rows, mixer lsm, label fuser saliency" in res.output
    img = Image.open(out)
    two = tmp_path / "p2.png"
    assert (
        run(
            recipe,
            "--set",
            'mixer.name="lsm"',
            "--set",
            "mixer.start_epoch=0",
            "--set",
            "mixer.end_epoch=100",
            "--out",
            two,
            "--rows",
            2,
        ).exit_code
        == 0
    )
    # five columns of 32x32 images upscaled x3 to 96 px tiles; lsm uses saliency, so no footnote
    assert tile_side() == 96 and len(COLUMNS) == 5
    assert img.size == expected_size(3, footnote=False) == (504, 386)
    assert Image.open(two).size == expected_size(2, footnote=False)
    assert img.height - Image.open(two).height == 96 + PAD + CAPTION  # exactly one more row


def test_preview_loads_a_checkpoint_and_rejects_a_wrong_one(recipe, tmp_path):
    from lsm_registry.components.models import CifarResNet

    good = tmp_path / "good.pt"
    torch.save({"model": CifarResNet(32, 4, width=4).state_dict(), "epoch": 1}, good)
    res = run(
        recipe,
        "--set",
        'mixer.name="lsm"',
        "--set",
        "mixer.start_epoch=0",
        "--set",
        "mixer.end_epoch=100",
        "--out",
        tmp_path / "c.png",
        "--checkpoint",
        good,
        "--rows",
        1,
    )
    assert res.exit_code == 0, res.output
    bad = tmp_path / "bad.pt"
    torch.save(CifarResNet(32, 4, width=8).state_dict(), bad)
    res = run(
        recipe,
        "--set",
        'mixer.name="lsm"',
        "--set",
        "mixer.start_epoch=0",
        "--set",
        "mixer.end_epoch=100",
        "--out",
        tmp_path / "d.png",
        "--checkpoint",
        bad,
        "--rows",
        1,
    )
    assert res.exit_code == 2
    assert "bad.pt: does not fit the recipe's model" in res.output


def test_preview_needs_a_mixer(recipe, tmp_path):
    res = run(recipe, "--out", tmp_path / "x.png")
    assert res.exit_code == 2
    assert "no [mixer] table" in res.output
    assert not (tmp_path / "x.png").exists()


def test_preview_of_a_mixer_without_unit_masks(recipe, tmp_path):
    from lsm_registry.plugins import default_registry

    # cutmix is a built-in: it must be registered, not skipped when it is not
    assert default_registry().entry("mixer", "cutmix").owner.distribution == "lsm-registry"
    out = tmp_path / "cm.png"
    res = run(recipe, "--set", 'mixer.name="cutmix"', "--out", out, "--rows", 2)
    assert res.exit_code == 0, res.output
    assert "2 rows, mixer cutmix" in res.output
    # cutmix uses no saliency: the saliency column is Grad-CAM for display, explained in a footnote
    assert Image.open(out).size == expected_size(2, footnote=True) == (504, 286)


def test_preview_of_a_run_folder_uses_its_best_or_last_checkpoint(recipe, tmp_path):
    trained = CliRunner().invoke(
        cli,
        [
            "run",
            str(recipe),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "--set",
            'mixer.name="lsm"',
            "--set",
            "mixer.start_epoch=0",
            "--set",
            "mixer.end_epoch=100",
            "--set",
            "run.epochs=2",
            "--set",
            "data.val_per_class=2",
        ],
    )
    assert trained.exit_code == 0, trained.output
    folder = tmp_path / "run"
    last = run(folder, "--out", tmp_path / "last.png", "--rows", 1)
    assert last.exit_code == 0, last.output
    assert f"weights {folder / 'checkpoints' / 'epoch-0002.pt'}" in last.output and (tmp_path / "last.png").is_file()
    best = run(folder, "--out", tmp_path / "best.png", "--rows", 1, "--checkpoint", "best")
    assert best.exit_code == 0 and f"weights {folder / 'checkpoints' / 'best.pt'}" in best.output
    refused = run(recipe, "--out", tmp_path / "x.png", "--checkpoint", "best")
    assert refused.exit_code == 2 and "give the run folder" in refused.output and not (tmp_path / "x.png").exists()
