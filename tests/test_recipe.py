"""Recipe validation: every kind of bad input gets its own one-line message."""

from pathlib import Path

import pytest
from conftest import TINY_RECIPE

from lsm_registry.errors import RecipeError
from lsm_registry.recipe import load_recipe, parse_override


def errors_of(path, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    lines = info.value.lines
    assert all("\n" not in line for line in lines)
    return lines


def test_the_tiny_recipe_validates(tiny_recipe):
    recipe = load_recipe(tiny_recipe)
    assert recipe.run.epochs == 1 and recipe.data.name == "synthetic-lt"
    assert recipe.data.params.num_classes == 4
    assert recipe.sampler.name == "instance" and recipe.loss.name == "ce"
    assert recipe.mixer is None


def test_missing_file(tmp_path):
    (line,) = errors_of(tmp_path / "nope.toml")
    assert line == f"{tmp_path / 'nope.toml'}: no such recipe file"


def test_toml_syntax_error_names_line_and_column(write_recipe):
    path = write_recipe("[run]\nepochs = = 3\n")
    (line,) = errors_of(path)
    assert line.startswith(f"{path}: TOML syntax error") and "line 2" in line and "column" in line


def test_unknown_table_with_suggestion(write_recipe):
    path = write_recipe(TINY_RECIPE + "\n[mixr]\nname = 'x'\n")
    (line,) = errors_of(path)
    assert line.startswith(f"{path} [mixr]: unknown table. Did you mean [mixer]?")


def test_unknown_component_with_suggestion(write_recipe):
    path = write_recipe(TINY_RECIPE.replace('name = "ce"', 'name = "cee"'))
    (line,) = errors_of(path)
    assert line.startswith(f"{path} [loss].name: unknown loss 'cee'. Did you mean 'ce'?")
    assert "Available:" in line


def test_unknown_parameter_with_suggestion(write_recipe):
    path = write_recipe(TINY_RECIPE.replace("n_max = 24", "n_mx = 24"))
    (line,) = errors_of(path)
    assert line.startswith(f"{path} [data].n_mx: unknown parameter of dataset 'synthetic-lt'. Did you mean 'n_max'?")


def test_unknown_key_in_fixed_table(write_recipe):
    path = write_recipe(TINY_RECIPE.replace("seed = 3", "sed = 3"))
    (line,) = errors_of(path)
    assert "[run].sed: unknown parameter of table [run]. Did you mean 'seed'?" in line


def test_wrong_type(write_recipe):
    path = write_recipe(TINY_RECIPE.replace("batch_size = 16", 'batch_size = "big"'))
    (line,) = errors_of(path)
    assert line == f"{path} [optim].batch_size: expected an integer (got 'big')"


def test_out_of_range_value(write_recipe):
    path = write_recipe(TINY_RECIPE.replace("lr = 0.05", "lr = -1.0"))
    (line,) = errors_of(path)
    assert line == f"{path} [optim].lr: must be > 0 (got -1.0)"


def test_zero_epochs(write_recipe):
    path = write_recipe(TINY_RECIPE.replace("epochs = 1", "epochs = 0"))
    (line,) = errors_of(path)
    assert line == f"{path} [run].epochs: must be >= 1 (got 0)"


def test_bad_choice(write_recipe):
    path = write_recipe(TINY_RECIPE.replace("warmup_epochs = 0", 'warmup_epochs = 0\nschedule = "linear"'))
    (line,) = errors_of(path)
    assert "[optim].schedule: must be one of 'step' | 'cosine' (got 'linear')" in line


def test_missing_data_table(write_recipe):
    text = TINY_RECIPE.split("[data]")[0] + "[model]" + TINY_RECIPE.split("[model]")[1]
    (line,) = errors_of(write_recipe(text))
    assert "[data]: missing" in line


def test_bad_device(write_recipe):
    path = write_recipe(TINY_RECIPE.replace("seed = 3", 'seed = 3\ndevice = "gpu"'))
    (line,) = errors_of(path)
    assert "[run].device: must be" in line and "'gpu'" in line


def test_all_errors_are_reported_at_once(write_recipe):
    text = (
        TINY_RECIPE.replace("epochs = 1", "epochs = 0")
        .replace('name = "ce"', 'name = "cee"')
        .replace("lr = 0.05", "lr = -1.0")
    )
    lines = errors_of(write_recipe(text))
    assert len(lines) == 3


def test_set_overrides_are_validated_like_the_file(tiny_recipe):
    recipe = load_recipe(tiny_recipe, ["run.epochs=4", "data.num_classes=3", "loss.name=ce"])
    assert recipe.run.epochs == 4 and recipe.data.params.num_classes == 3
    (line,) = errors_of(tiny_recipe, ["run.epochs=0"])
    assert "[run].epochs: must be >= 1" in line
    (line,) = errors_of(tiny_recipe, ["epochs=3"])
    assert line.startswith("--set epochs=3: expected table.key=value")


def test_parse_override_uses_toml_values_and_bare_strings():
    assert parse_override("optim.milestones=[3, 4]") == ("optim", "milestones", [3, 4])
    assert parse_override('data.name="synthetic-lt"') == ("data", "name", "synthetic-lt")
    assert parse_override("data.name=synthetic-lt") == ("data", "name", "synthetic-lt")
    assert parse_override("optim.nesterov=true") == ("optim", "nesterov", True)


def test_resolved_recipe_round_trips_through_toml(tiny_recipe, write_recipe):
    recipe = load_recipe(tiny_recipe)
    again = load_recipe(write_recipe(recipe.to_toml(), "resolved.toml"))
    assert again.to_dict() == recipe.to_dict()


def test_run_name_defaults_to_the_file_stem(write_recipe):
    path = write_recipe(TINY_RECIPE.replace('name = "tiny"\n', ""), "my_exp.toml")
    assert load_recipe(path).run.name == "my_exp"


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=inf", "[optim].lr"),
        ("optim.weight_decay=1e400", "[optim].weight_decay"),
        ("optim.lr=nan", "[optim].lr"),
        ("run.seed=18446744073709551616", "[run].seed"),
    ],
)
def test_numbers_that_are_not_finite_or_too_large_are_refused_at_validation(tiny_recipe, override, key):
    (line,) = errors_of(tiny_recipe, [override])
    assert key in line and ("finite" in line or "64 bits" in line)


def test_sam_rho_infinity_is_refused(tiny_recipe):
    (line,) = errors_of(tiny_recipe, ["optim.name=sam", "optim.rho=inf"])
    assert "rho" in line and "finite" in line


@pytest.mark.parametrize(
    "override, key",
    [
        ('run.name="a\\u0000b"', "[run].name"),
        ('run.name="../elsewhere"', "[run].name"),
        ('run.device="cuda:123456789012"', "[run].device"),
    ],
)
def test_run_names_and_devices_that_cannot_work_are_refused(tiny_recipe, override, key):
    (line,) = errors_of(tiny_recipe, [override])
    assert key in line


def test_a_file_with_the_run_name_is_skipped(tmp_path):
    from lsm_registry.runfolder.reporter import fresh_run_dir

    (tmp_path / "quick").write_text("not a folder")
    assert fresh_run_dir(tmp_path, "quick") == tmp_path / "quick-2"


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_the_empty_window_error_prints_flags_that_fix_it(epochs):
    """Short runs of every mixing recipe: the error names the exact --set / --unset that make it valid."""
    import re
    import shlex

    from lsm_registry.plugins import default_registry

    registry = default_registry()
    tried = 0
    for path in sorted(p for p in Path("recipes").rglob("*.toml") if "_base" not in p.parts):  # bases: not recipes
        try:
            load_recipe(path, [f"run.epochs={epochs}"], registry)
            continue
        except RecipeError as exc:
            lines = [line for line in exc.lines if "is empty for run.epochs" in line]
            if not lines:
                continue
        flags = shlex.split(re.search(r"add (--.*)$", lines[0]).group(1))
        overrides = [f"run.epochs={epochs}"] + [v for f, v in zip(flags[::2], flags[1::2]) if f == "--set"]
        unsets = [v for f, v in zip(flags[::2], flags[1::2]) if f == "--unset"]
        load_recipe(path, overrides + [f"{key}={{ none = true }}" for key in unsets], registry)
        tried += 1
    assert tried > 0


def test_none_written_as_a_string_says_how_to_write_none(registry, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(TINY_RECIPE)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, ["mixer.name='lsm'", "sampler.name='dual-branch'", "mixer.end_epoch=none"], registry)
    line = next(line for line in caught.value.lines if "end_epoch" in line)
    assert "{ none = true }" in line and "--set 'KEY={none=true}'" in line
