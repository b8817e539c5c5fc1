"""Recipes that share bases (``extends``): how files merge, what is refused, and that the
shipped recipes resolve exactly as the snapshot tests/data/resolved_recipes.json says."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_RECIPE

from bench import resolved_recipes as dump
from lsm_registry.cli import cli
from lsm_registry.errors import RecipeError
from lsm_registry.recipe import load_recipe, validate

SNAPSHOT = json.loads(dump.SNAPSHOT.read_text(encoding="utf-8"))
SHIPPED = dump.shipped_recipes()
REGENERATE = "if the change is meant, run python -m bench.resolved_recipes and review the snapshot's diff"

#: The tiny recipe of conftest split in two: a base with everything but the run's name, a recipe that names it.
TINY_BASE = TINY_RECIPE.replace('name = "tiny"\n', "", 1)


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _lines(exc: pytest.ExceptionInfo) -> list[str]:
    return exc.value.lines


# ------------------------------------------------------------------ the shipped recipes


def test_the_snapshot_lists_every_shipped_recipe():
    names = sorted(p.relative_to(dump.RECIPES).as_posix() for p in SHIPPED)
    assert names == sorted(SNAPSHOT), f"recipes added or removed: {REGENERATE}"
    assert not any(name.startswith("_base/") for name in names)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(dump.RECIPES).as_posix() for p in SHIPPED])
def test_a_shipped_recipe_resolves_as_in_the_snapshot(path, registry):
    name = path.relative_to(dump.RECIPES).as_posix()
    resolved = dump.resolve(path, registry)
    for table in sorted(set(resolved) | set(SNAPSHOT[name])):
        assert resolved.get(table) == SNAPSHOT[name].get(table), f"{name} [{table}] changed: {REGENERATE}"


def test_the_bases_are_not_recipes_on_their_own():
    """Every file under recipes/_base is named by a recipe (an unused base is dead settings)."""
    bases = sorted((dump.RECIPES / "_base").glob("*.toml"))
    assert bases
    named: set[Path] = set()
    for path in dump.RECIPES.rglob("*.toml"):
        value = tomllib.loads(path.read_text(encoding="utf-8")).get("extends", [])
        for entry in [value] if isinstance(value, str) else value:
            named.add((path.parent / entry).resolve())
    assert [b.name for b in bases if b.resolve() not in named] == []


# ------------------------------------------------------------------ merging


def test_a_recipe_with_extends_resolves_like_the_same_recipe_written_out(tmp_path, registry):

    _write(tmp_path, "_base/tiny.toml", TINY_BASE)
    extended = _write(tmp_path, "exp/tiny.toml", 'extends = "../_base/tiny.toml"\n\n[run]\nname = "tiny"\n')
    flat = _write(tmp_path, "flat/tiny.toml", TINY_RECIPE)
    assert load_recipe(extended, [], registry).to_dict() == load_recipe(flat, [], registry).to_dict()


def test_the_file_wins_over_its_bases_and_set_wins_over_both(tmp_path, registry):
    _write(tmp_path, "base.toml", TINY_BASE)
    path = _write(
        tmp_path,
        "r.toml",
        'extends = ["base.toml"]\n\n[optim]\nlr = 0.2\nmilestones = [5]\n\n[loss]\nname = "focal"\ngamma = 2.0\n',
    )
    recipe = load_recipe(path, ["optim.lr=0.3", "run.epochs=2"], registry)
    assert recipe.optim.lr == 0.3 and recipe.run.epochs == 2  # --set, after the merge
    assert recipe.optim.batch_size == 16 and recipe.optim.warmup_epochs == 0  # the base's other [optim] keys
    assert recipe.optim.milestones == (5,)  # a list is a value: replaced whole
    assert recipe.loss.name == "focal" and recipe.loss.params.gamma == 2.0
    assert recipe.run.name == "r"  # the run is named after the recipe file, not its base
    assert load_recipe(path, [], registry).optim.lr == 0.2


def test_later_bases_win_over_earlier_ones(tmp_path, registry):
    _write(tmp_path, "a.toml", TINY_BASE)
    _write(tmp_path, "b.toml", "[optim]\nlr = 0.4\n\n[model]\nwidth = 8\n")
    recipe = load_recipe(_write(tmp_path, "r.toml", 'extends = ["a.toml", "b.toml"]\n'), [], registry)
    assert (recipe.optim.lr, recipe.model.params.width, recipe.model.name) == (0.4, 8, "resnet32")
    recipe = load_recipe(_write(tmp_path, "s.toml", 'extends = ["b.toml", "a.toml"]\n'), [], registry)
    assert (recipe.optim.lr, recipe.model.params.width) == (0.05, 4)


def test_a_two_level_chain_merges_with_paths_relative_to_each_file(tmp_path, registry):
    _write(tmp_path, "_base/common/tiny.toml", TINY_BASE)
    _write(
        tmp_path,
        "_base/lsm.toml",
        'extends = "common/tiny.toml"\n\n[sampler]\nname = "dual-branch"\n\n'
        '[mixer]\nname = "lsm"\nprob = 0.5\nstart_epoch = 0\nend_epoch = { none = true }\n\n[label_fuser]\nname = "saliency"\n',
    )
    path = _write(tmp_path, "exp/deep/r.toml", 'extends = "../../_base/lsm.toml"\n\n[mixer]\nprob = 0.25\n')
    recipe = load_recipe(path, [], registry)
    assert recipe.data.name == "synthetic-lt" and recipe.optim.lr == 0.05  # two levels up
    assert recipe.sampler.name == "dual-branch" and recipe.mixer.name == "lsm"  # one level up
    assert recipe.mixer.params.prob == 0.25 and recipe.mixer.params.start_epoch == 0  # [mixer] merged key by key


def test_nested_tables_merge_key_by_key(tmp_path, registry):
    _write(tmp_path, "base.toml", TINY_BASE + '\n[loggers.mlflow]\ntracking_uri = "file:./mlruns"\nexperiment = "a"\n')
    path = _write(
        tmp_path,
        "r.toml",
        'extends = "base.toml"\n\n[run]\nloggers = ["mlflow"]\n\n[loggers.mlflow]\nexperiment = "b"\n',
    )
    recipe = load_recipe(path, [], registry)
    (mlflow,) = recipe.loggers
    assert (mlflow.params.tracking_uri, mlflow.params.experiment) == ("file:./mlruns", "b")
    assert recipe.run.epochs == 1  # [run] merged too: the file's loggers next to the base's epochs


# ------------------------------------------------------------------ refused, one line each


def test_a_cycle_is_refused_in_one_line_naming_the_chain(tmp_path, registry):
    _write(tmp_path, "a.toml", 'extends = "b.toml"\n' + TINY_BASE)
    _write(tmp_path, "b.toml", 'extends = "c.toml"\n')
    _write(tmp_path, "c.toml", 'extends = "b.toml"\n')
    with pytest.raises(RecipeError) as exc:
        load_recipe(tmp_path / "a.toml", [], registry)
    (line,) = _lines(exc)
    assert "b.toml -> c.toml -> b.toml" in line and line.startswith(f"{tmp_path / 'c.toml'} extends:")


def test_a_recipe_that_extends_itself_is_a_cycle(tmp_path, registry):
    path = _write(tmp_path, "a.toml", 'extends = ["./a.toml"]\n' + TINY_BASE)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, [], registry)
    (line,) = _lines(exc)
    assert "a.toml -> a.toml" in line


def test_a_diamond_is_not_a_cycle(tmp_path, registry):
    _write(tmp_path, "d.toml", TINY_BASE)
    _write(tmp_path, "b.toml", 'extends = "d.toml"\n[optim]\nlr = 0.2\n')
    _write(tmp_path, "c.toml", 'extends = "d.toml"\n[model]\nwidth = 8\n')
    recipe = load_recipe(_write(tmp_path, "a.toml", 'extends = ["b.toml", "c.toml"]\n'), [], registry)
    assert (recipe.optim.lr, recipe.model.params.width) == (0.05, 8)  # c's copy of d comes later


def test_a_missing_base_is_one_line_naming_the_file_and_the_path(tmp_path, registry):
    _write(tmp_path, "base.toml", 'extends = "../_base/nothing.toml"\n')
    path = _write(tmp_path, "r.toml", 'extends = ["base.toml"]\n' + TINY_BASE)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, [], registry)
    (line,) = _lines(exc)
    assert line.startswith(f"{tmp_path / 'base.toml'} extends:") and "../_base/nothing.toml" in line


@pytest.mark.parametrize("value", ["3", '[""]', '["a.toml", 1]', '{ path = "a.toml" }'])
def test_extends_must_be_a_path_or_a_list_of_paths(value, tmp_path, registry):
    path = _write(tmp_path, "r.toml", f"extends = {value}\n" + TINY_BASE)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, [], registry)
    (line,) = _lines(exc)
    assert line.startswith(f"{path} extends: expected a path or a list of paths")


def test_a_syntax_error_in_a_base_names_the_base(tmp_path, registry):
    base = _write(tmp_path, "base.toml", "[run\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(_write(tmp_path, "r.toml", 'extends = "base.toml"\n'), [], registry)
    (line,) = _lines(exc)
    assert line.startswith(f"{base}: TOML syntax error")


def test_a_misspelled_extends_or_one_left_in_a_dict_is_reported(tmp_path, registry):
    with pytest.raises(RecipeError) as exc:
        load_recipe(_write(tmp_path, "r.toml", 'extend = "base.toml"\n' + TINY_BASE), [], registry)
    assert any("Did you mean 'extends'?" in line for line in _lines(exc))
    with pytest.raises(RecipeError) as exc:  # a dict that never went through read_recipe
        validate({"extends": "base.toml", **tomllib.loads(TINY_BASE)}, "dict", registry)
    assert _lines(exc)[0].startswith("dict extends:")


# ------------------------------------------------------------------ a run


def test_a_recipe_with_extends_trains_and_its_run_folder_holds_the_flat_recipe(tmp_path):
    _write(tmp_path, "_base/tiny.toml", TINY_BASE)
    path = _write(tmp_path, "exp/tiny.toml", 'extends = ["../_base/tiny.toml"]\n\n[optim]\nlr = 0.02\n')
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(out), "--no-progress", "--set", "run.seed=4"])
    assert result.exit_code == 0, result.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    written = tomllib.loads((out / "recipe.toml").read_text(encoding="utf-8"))
    assert "extends" not in written and "extends" not in (out / "recipe.toml").read_text()
    assert written["optim"]["lr"] == 0.02 and written["run"]["seed"] == 4 and written["data"]["n_max"] == 24
    assert written["run"]["name"] == "tiny"
    # The run folder's recipe stands alone: it loads with the bases gone.
    (tmp_path / "_base" / "tiny.toml").unlink()
    assert load_recipe(out / "recipe.toml").to_toml() == (out / "recipe.toml").read_text(encoding="utf-8")
