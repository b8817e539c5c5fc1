"""The iNaturalist 2018 recipes of the paper's rows train one tiny epoch, their data replaced by a
tiny synthetic set: the ResNet-50 models, the losses and the stages exactly as the recipes resolve."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_bbn import ROOT, SHRINK, tiny_copy

from lsm_registry.cli import cli

#: SHRINK without the width: torchvision's ResNet-50 has none (the bbn and ride ResNet-50s do).
NO_WIDTH = [a for i, a in enumerate(SHRINK) if a != "model.width=4" and SHRINK[i + 1 : i + 2] != ["model.width=4"]]
#: 32x32 images: LSM's 28-pixel blocks of 224x224 images become 4-pixel ones (8 x 8 units either way).
SMALL_BLOCKS = ["--set", "patch.size=4", "--set", "mixer.start_epoch=0", "--unset", "mixer.end_epoch"]


def run(recipe, out, *extra: str):
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize(
    "name, extra",
    [
        ("bbn.toml", SHRINK),
        ("ride.toml", SHRINK),
        ("ride_lsm.toml", [*SHRINK, *SMALL_BLOCKS, "--set", "mixer.prob=1.0"]),
        ("tsc.toml", [*NO_WIDTH, "--set", "loss.start_epoch=0", "--set", "loss.target_steps=20"]),
    ],
)
def test_the_inaturalist_recipe_trains_one_tiny_epoch(name, extra, tmp_path, registry):
    summary = run(tiny_copy(ROOT / "recipes" / "inat2018" / name, tmp_path, registry), tmp_path / "run", *extra)
    assert summary["top1"] is not None and summary["epochs"] == 1


def test_the_inaturalist_pc_stage_trains_on_a_tiny_ce_run(tmp_path, registry):
    parent = tmp_path / "ce"
    # lr 0.01: at the recipe's 0.1 a ResNet-50 on 16-image batches of 60 images diverges (features
    # ~1e22), and the prototypes' squared distances would overflow.
    ce = tiny_copy(ROOT / "recipes" / "inat2018" / "ce.toml", tmp_path, registry)
    assert run(ce, parent, *NO_WIDTH, "--set", "optim.lr=0.01")["final_loss"] < 10
    (tmp_path / "two").mkdir()
    recipe = tiny_copy(ROOT / "recipes" / "inat2018" / "pc.toml", tmp_path / "two", registry)
    summary = run(recipe, tmp_path / "pc", *NO_WIDTH, "--set", f"stage.init_from='{parent}'")
    assert summary["top1"] is not None and summary["parent"]["run_name"] == "inat2018-ce"
