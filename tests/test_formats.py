"""Formats that can grow: run folders carry format versions, older ones are migrated on load."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_RECIPE

from lsm_registry.checkpoint import list_checkpoints, load_weights_only
from lsm_registry.cli import cli
from lsm_registry.formats import CHECKPOINT_FORMAT, RECIPE_FORMAT, SUMMARY_FORMAT
from lsm_registry.recipe import load_recipe
from lsm_registry.runfolder import reader as runs

MIXING_RECIPE = TINY_RECIPE.replace(
    '[loss]\nname = "ce"',
    '[loss]\nname = "ce"\n\n[sampler]\nname = "dual-branch"\n\n[mixer]\nname = "lsm"\nstart_epoch = 0\nend_epoch = 100',
)


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished tiny run (1 epoch, seed 3), copied by the tests that change it."""
    folder = tmp_path_factory.mktemp("formats")
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    result = invoke("run", recipe, "--out", folder / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    return folder / "run"


def copy_run(trained: Path, to: Path) -> Path:
    shutil.copytree(trained, to)
    return to


def make_old(run_dir: Path, drop: dict[str, tuple[str, ...]], seed: int | None = None) -> None:
    """Turn a run folder into one written before formats and before the keys in ``drop`` existed."""
    text = (run_dir / "recipe.toml").read_text()
    text = re.sub(r"\Aformat = \d+\n\n?", "", text)
    table = None
    lines = []
    for line in text.splitlines():
        if line.startswith("["):
            table = line.strip("[]")
        elif table in drop and line.split(" = ")[0] in drop[table]:
            continue
        if seed is not None and table == "run" and line.startswith("seed = "):
            line = f"seed = {seed}"
        lines.append(line)
    (run_dir / "recipe.toml").write_text("\n".join(lines) + "\n")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("format", None)
    if seed is not None:
        summary["seed"] = seed
    (run_dir / "summary.json").write_text(json.dumps(summary))
    for path in list_checkpoints(run_dir):
        state = load_weights_only(path)
        state["format"] = 1
        state.pop("recipe_format", None)
        for table, keys in drop.items():
            for key in keys:
                del state["recipe"][table][key]
        torch.save(state, path)


def test_written_files_carry_their_format(trained, tiny_recipe):
    recipe_text = (trained / "recipe.toml").read_text()
    assert recipe_text.startswith(f"format = {RECIPE_FORMAT}\n")
    assert tomllib.loads(recipe_text)["format"] == RECIPE_FORMAT
    assert json.loads((trained / "summary.json").read_text())["format"] == SUMMARY_FORMAT
    state = load_weights_only(list_checkpoints(trained)[-1])
    assert state["format"] == CHECKPOINT_FORMAT and state["recipe_format"] == RECIPE_FORMAT
    # what `lsm show` prints is a resolved recipe too, and it loads again as it was
    shown = invoke("show", tiny_recipe)
    assert shown.exit_code == 0 and shown.output.startswith(f"format = {RECIPE_FORMAT}\n")
    assert load_recipe(trained / "recipe.toml").to_dict() == load_recipe(tiny_recipe).to_dict()


def test_an_older_run_folder_resumes_with_the_new_keys_at_their_defaults(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path / "old")
    make_old(run_dir, {"optim": ("nesterov",), "loss": ("mixed_weighting",)})
    assert "nesterov" not in (run_dir / "recipe.toml").read_text()
    result = invoke("resume", run_dir, "--set", "run.epochs=2", "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["format"] == SUMMARY_FORMAT
    # the resumed run writes the current formats, with every key
    assert tomllib.loads((run_dir / "recipe.toml").read_text())["optim"]["nesterov"] is False
    assert load_weights_only(list_checkpoints(run_dir)[-1])["format"] == CHECKPOINT_FORMAT

    # an older mixing run's recipe.toml (no format, no mixed_weighting) still shows and previews
    path = tmp_path / "mixing.toml"
    path.write_text(MIXING_RECIPE)
    shown = invoke("show", path)
    assert shown.exit_code == 0, shown.output
    old = tmp_path / "old-recipe.toml"  # as an older run folder holds it: no format, no mixed_weighting
    old.write_text(
        "\n".join(
            line for line in shown.output.splitlines() if not line.startswith(("format = ", "mixed_weighting = "))
        )
        + "\n"
    )
    assert invoke("show", old).output == shown.output
    result = invoke("preview", old, "--out", tmp_path / "p.png", "--rows", 2)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").is_file()


def test_compare_groups_an_older_run_with_a_new_one_of_the_same_setting(trained, tmp_path):
    new = copy_run(trained, tmp_path / "new")
    old = copy_run(trained, tmp_path / "old")
    make_old(old, {"optim": ("nesterov",), "loss": ("mixed_weighting",)}, seed=4)
    groups = runs.group_runs(runs.load_runs([new, old]))
    assert [len(g.runs) for g in groups] == [2]
    text = invoke("compare", new, old, "--format", "csv").output
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 1 and rows[0]["runs"] == "2" and rows[0]["seeds"] == "3 4"


def test_a_newer_format_is_refused_in_one_line(trained, tmp_path, tiny_recipe):
    newer = RECIPE_FORMAT + 1
    path = tmp_path / "future.toml"
    path.write_text(
        f'format = {newer}\n\n[data]\nname = "synthetic-lt"\nadded_later = 1\n\n[table_added_later]\nx = 1\n'
    )
    result = invoke("show", path)
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"error: {path}: written by a newer lsm-registry (format {newer} > {RECIPE_FORMAT}); upgrade"
    ]
    path.write_text(f'format = "two"\n\n{TINY_RECIPE}')
    assert error_lines(invoke("show", path)) == [f"error: {path}: format must be a whole number >= 1 (got 'two')"]
    path.write_text(f"format = 1\n\n{TINY_RECIPE}")  # an older format loads
    assert invoke("show", path).exit_code == 0

    run_dir = copy_run(trained, tmp_path / "run")
    (run_dir / "summary.json").write_text(
        json.dumps({**json.loads((run_dir / "summary.json").read_text()), "format": SUMMARY_FORMAT + 1})
    )
    result = invoke("compare", run_dir)
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"error: {run_dir / 'summary.json'}: written by a newer lsm-registry "
        f"(format {SUMMARY_FORMAT + 1} > {SUMMARY_FORMAT}); upgrade"
    ]
    checkpoint = list_checkpoints(run_dir)[-1]
    state = load_weights_only(checkpoint)
    torch.save({**state, "format": CHECKPOINT_FORMAT + 1}, checkpoint)
    result = invoke("resume", run_dir, "--set", "run.epochs=2", "--no-progress")
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"error: {run_dir / 'checkpoints'}: written by a newer lsm-registry "
        f"(format {CHECKPOINT_FORMAT + 1} > {CHECKPOINT_FORMAT}); upgrade"
    ]


def test_a_missing_key_counts_as_its_default_only(trained, tmp_path):
    old = copy_run(trained, tmp_path / "old")
    make_old(old, {"optim": ("nesterov",)})
    # resume: the old run used nesterov's default (false); true is a change
    result = invoke("resume", old, "--set", "run.epochs=2", "--set", "optim.nesterov=true", "--no-progress")
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {old}: cannot resume, the recipe differs in optim.nesterov (False -> True)"]
    # compare: a new run with nesterov = true is another setting, and the labels say so
    new = copy_run(trained, tmp_path / "new")
    recipe = (new / "recipe.toml").read_text()
    (new / "recipe.toml").write_text(recipe.replace("nesterov = false", "nesterov = true"))
    groups = runs.group_runs(runs.load_runs([old, new]))
    assert [g.label for g in groups] == ["optim.nesterov=false", "optim.nesterov=true"]
