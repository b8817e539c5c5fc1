"""Checkpoints are data, not code: every load is weights-only, pickled code is refused."""

from __future__ import annotations

import os
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_RECIPE

from lsm_registry.checkpoint import UnsafeCheckpointError, load_latest, rng_state, save_atomic, set_rng_state
from lsm_registry.checkpoint import load_model_weights as load_checkpoint
from lsm_registry.cli import cli


class SystemPayload:
    """Unpickling this runs a shell command (``os.system``), which creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class CustomObject:
    """A custom class whose ``__setstate__`` creates ``marker`` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __setstate__(self, state):
        Path(state["marker"]).touch()
        self.__dict__.update(state)


PAYLOADS = {"os.system": SystemPayload, "custom-class": CustomObject}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A one-epoch run folder written by the engine (recipe.toml + checkpoints/epoch-0001.pt)."""
    folder = tmp_path_factory.mktemp("safety")
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    res = CliRunner().invoke(
        cli, ["run", str(recipe), "--out", str(folder / "run"), "--no-progress"], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    return folder / "run"


def plant(path: Path, kind: str, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, "epoch": 9, "step": 0, "model": {}, "extra": PAYLOADS[kind](marker)}, path)
    return path


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_refusal(message: str, path: Path) -> None:
    assert "\n" not in message
    assert str(path) in message
    assert "pickled code or objects" in message and "weights-only load refuses" in message
    assert "checkpoints written by lsm-registry never need that" in message


def test_an_engine_checkpoint_loads_weights_only(tiny_run):
    path = tiny_run / "checkpoints" / "epoch-0001.pt"
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and state["history"][0]["epoch"] == 1
    assert state["recipe"]["model"]["name"] == "resnet32"
    assert isinstance(state["rng"]["python"], dict) and isinstance(state["rng"]["numpy"], dict)
    # the stored states restore the generators exactly
    set_rng_state(state["rng"])
    first = (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    set_rng_state(state["rng"])
    assert (random.random(), float(np.random.rand()), torch.rand(3).tolist()) == first


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    torch.manual_seed(3)
    save_atomic({"rng": rng_state()}, tmp_path / "s.pt")
    expected = (random.gauss(0, 1), float(np.random.randn()), torch.randn(2).tolist())
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert (random.gauss(0, 1), float(np.random.randn()), torch.randn(2).tolist()) == expected


def test_a_checkpoint_of_an_earlier_version_still_resumes(tmp_path):
    """Earlier versions stored NumPy's own state tuple (an ndarray): still read, weights-only."""
    np.random.seed(5)
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    save_atomic({"epoch": 1, "rng": legacy}, tmp_path / "checkpoints" / "epoch-0001.pt")
    expected = float(np.random.rand())
    state, notes = load_latest(tmp_path)
    assert notes == [] and state["epoch"] == 1
    set_rng_state(state["rng"])
    assert float(np.random.rand()) == expected


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_load_latest_refuses_pickled_code_and_does_not_run_it(tmp_path, kind):
    save_atomic({"epoch": 1}, tmp_path / "checkpoints" / "epoch-0001.pt")
    marker = tmp_path / "pwned"
    evil = plant(tmp_path / "checkpoints" / "epoch-0002.pt", kind, marker)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_latest(tmp_path)  # not skipped in favour of epoch-0001.pt
    assert_refusal(str(info.value), evil)
    assert not marker.exists()


def test_a_damaged_newest_file_still_falls_back_but_a_refused_older_one_is_not_loaded(tmp_path):
    marker = tmp_path / "pwned"
    evil = plant(tmp_path / "checkpoints" / "epoch-0001.pt", "os.system", marker)
    (tmp_path / "checkpoints" / "epoch-0002.pt").write_bytes(b"garbage")
    with pytest.raises(UnsafeCheckpointError) as info:
        load_latest(tmp_path)
    assert_refusal(str(info.value), evil)
    assert not marker.exists()


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_lsm_resume_refuses_pickled_code_with_one_line(tiny_run, tmp_path, kind):
    marker = tmp_path / "pwned"
    evil = plant(tiny_run / "checkpoints" / "epoch-0002.pt", kind, marker)
    try:
        res = CliRunner().invoke(
            cli, ["resume", str(tiny_run), "--set", "run.epochs=3", "--no-progress"], catch_exceptions=False
        )
    finally:
        evil.unlink()
    assert not marker.exists(), "the payload ran"
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    (line,) = error_lines(res.output)
    assert_refusal(line, evil)


def preview(*args) -> object:
    # the tiny run's recipe plus a mixer whose window holds its one epoch
    mix = ["--set", 'mixer.name="lsm"', "--set", "mixer.start_epoch=0", "--set", "mixer.end_epoch=1"]
    return CliRunner().invoke(cli, ["preview", *map(str, args), *mix], catch_exceptions=False)


def test_lsm_preview_loads_an_engine_checkpoint_weights_only(tiny_run, tmp_path):
    res = preview(
        tiny_run / "recipe.toml",
        "--out",
        tmp_path / "p.png",
        "--checkpoint",
        tiny_run / "checkpoints" / "epoch-0001.pt",
        "--rows",
        1,
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.png").is_file()


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_lsm_preview_refuses_pickled_code_with_one_line(tiny_run, tmp_path, kind):
    marker = tmp_path / "pwned"
    evil = plant(tmp_path / "evil.pt", kind, marker)
    res = preview(tiny_run / "recipe.toml", "--out", tmp_path / "p.png", "--checkpoint", evil, "--rows", 1)
    assert not marker.exists(), "the payload ran"
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    (line,) = error_lines(res.output)
    assert_refusal(line, evil)
    assert not (tmp_path / "p.png").exists()
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(torch.nn.Linear(2, 2), evil)
    assert not marker.exists()
