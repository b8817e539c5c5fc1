"""Shared fixtures: tiny recipes that train in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_RECIPE = """
[run]
name = "tiny"
seed = 3
epochs = 1
eval_every = 1

[data]
name = "synthetic-lt"
num_classes = 4
n_max = 24
imbalance_factor = 6.0
test_per_class = 6

[model]
name = "resnet32"
width = 4

[optim]
batch_size = 16
lr = 0.05
warmup_epochs = 0

[loss]
name = "ce"
"""


def contrastive_tiny(loss_table: str) -> str:
    """The tiny recipe with an 8-d projection head and ``loss_table`` as the body of its [loss] table."""
    return TINY_RECIPE.replace("width = 4", "width = 4\nprojection_dim = 8").replace(
        '[loss]\nname = "ce"', f"[loss]\n{loss_table}"
    )


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture
def write_recipe(tmp_path: Path):
    def write(text: str, name: str = "r.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory) -> Path:
    """A finished one-epoch stage-1 run of the tiny CE recipe (a linear classifier), trained once per
    test module through ``lsm run``: the parent of the stage-2 tests (a module may move it and back)."""
    from click.testing import CliRunner

    from lsm_registry.cli import cli

    folder = tmp_path_factory.mktemp("stage1")
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    args = ["run", str(recipe), "--out", str(folder / "run"), "--no-progress"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return folder / "run"


def trainer_for(write_recipe, text: str, registry, name: str = "stage.toml"):
    """A Trainer of the recipe ``text``, written to ``name`` by the ``write_recipe`` fixture."""
    from lsm_registry.engine import Trainer
    from lsm_registry.recipe import load_recipe

    return Trainer(load_recipe(write_recipe(text, name), registry=registry), registry)


@pytest.fixture(scope="session")
def registry():
    from lsm_registry.plugins import default_registry

    return default_registry()


def table_rows(output: str) -> list[list[str]]:
    """The body rows of a rich table as lists of cells (wrapped continuation lines joined on)."""
    rows: list[list[str]] = []
    for line in output.splitlines():
        if not line.startswith("\u2502"):  # a body line of the box: "│ a │ b │"
            continue
        cells = [cell.strip() for cell in line.strip().strip("\u2502").split("\u2502")]
        if cells[0]:
            rows.append(cells)
        else:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
    return rows


#: Loads an export in a process of its own, with torch alone (and onnxruntime for ONNX), and
#: writes the logits of the given uint8 images; argv: export folder, format, images.pt, out.pt.
#: It prepares the images from model.json only, as a program without this library would.
PLAIN_LOADER = """
import json, sys
import torch
export, fmt, images, out = sys.argv[1:5]
meta = json.load(open(f"{export}/model.json"))
inp = meta["input"]
pixels = torch.load(images, weights_only=True)
assert inp["test_view"]["steps"] == [], inp["test_view"]  # the tests' sets are stored at the input size
assert pixels.shape[1:] == (inp["channels"], inp["height"], inp["width"]) and inp["pixel_range"] == "0..1"
mean = torch.tensor(inp["mean"]).view(1, -1, 1, 1)
std = torch.tensor(inp["std"]).view(1, -1, 1, 1)
x = (pixels.float() / 255 - mean) / std
path = f"{export}/" + meta["files"][fmt]
with torch.no_grad():
    if fmt == "pt2":
        logits = torch.export.load(path).module()(x)
    elif fmt == "torchscript":
        logits = torch.jit.load(path)(x)
    else:
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(session.run(None, {meta["load"]["onnx"]["input"]: x.numpy()})[0])
assert logits.shape == (pixels.shape[0], meta["num_classes"]) and len(meta["classes"]) == meta["num_classes"]
imported = sorted(name for name in sys.modules if name.split(".")[0] in ("lsm_registry", "torchvision", "onnx", "onnxscript"))
assert not imported, imported
torch.save(logits, out)
"""


def load_export_plainly(export: Path, fmt: str, images, workdir: Path):
    """Logits of ``images`` through ``export``'s ``fmt`` file, computed by PLAIN_LOADER in a fresh process."""
    import os
    import subprocess
    import sys

    import torch

    torch.save(images, workdir / "images.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_LOADER, str(export), fmt, str(workdir / "images.pt"), str(workdir / "logits.pt")],
        env=env,
        cwd=workdir,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(workdir / "logits.pt", weights_only=True)
