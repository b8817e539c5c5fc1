"""A run whose output is not a terminal (a log file, CI, nohup) still says how each epoch went."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from lsm_registry import plugins
from lsm_registry.cli import cli
from lsm_registry.plugins import build_registry

EPOCH_LINE = re.compile(r"^epoch (\d+)/3  loss \d+\.\d{4}  lr [\d.e-]+  \d+ img/s  \d+\.\d s \(total \d+ s\)$")


@pytest.fixture
def builtins_only(monkeypatch):
    monkeypatch.setattr(plugins, "_default", build_registry(entry_points=False, env={}))
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "RANK"):
        monkeypatch.delenv(name, raising=False)


def epoch_lines(output: str) -> list[int]:
    return [int(m.group(1)) for m in map(EPOCH_LINE.match, output.splitlines()) if m]


@pytest.mark.parametrize("flags", [[], ["--no-progress"]], ids=["progress", "no-progress"])
def test_one_plain_line_per_epoch_when_not_a_terminal(tiny_recipe, tmp_path, builtins_only, flags):
    args = [
        "run",
        str(tiny_recipe),
        "--out",
        str(tmp_path / "run"),
        "--set",
        "run.epochs=3",
        "--set",
        "run.eval_every=2",
    ]
    result = CliRunner().invoke(cli, args + flags)
    assert result.exit_code == 0, result.output
    assert epoch_lines(result.output) == [1, 2, 3]  # also epoch 1, which is not evaluated


def test_a_terminal_keeps_the_bars_only(tiny_recipe, tmp_path, builtins_only):
    args = ["run", str(tiny_recipe), "--out", str(tmp_path / "run"), "--set", "run.epochs=3", "--no-progress"]
    result = CliRunner().invoke(cli, args, env={"TTY_COMPATIBLE": "1"})
    assert result.exit_code == 0, result.output
    assert epoch_lines(result.output) == []
