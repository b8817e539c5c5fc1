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


@pytest.fixture(scope="session")
def registry():
    from lsm_registry.plugins import default_registry

    return default_registry()
