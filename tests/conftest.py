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
