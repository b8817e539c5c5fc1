"""`lsm sweep` (grid expansion, validation, a tiny real sweep) and `lsm compare` (grouping, formats)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_RECIPE

from lsm_registry.cli import cli
from lsm_registry.cli.sweep import GridAxis, expand, parse_grid, split_values
from lsm_registry.recipe import dumps_toml
from lsm_registry.runfolder import reader as runs


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------ grid


def test_split_values_keeps_lists_and_quoted_commas():
    assert split_values("0.5,1.0") == ["0.5", "1.0"]
    assert split_values("[8, 9],[5,9]") == ["[8, 9]", "[5,9]"]
    assert split_values('"a,b",c') == ['"a,b"', "c"]
    assert split_values("saliency, area") == ["saliency", "area"]


def test_grid_product_order_and_folders():
    errors: list[str] = []
    axes = parse_grid(["mixer.alpha=0.5,1.0", "label_fuser.name=saliency,area,remix"], errors)
    assert errors == []
    points = expand(axes, [0, 1])
    assert len(points) == 2 * 3 * 2
    # seeds innermost, then the last axis: repeats of one setting run back to back
    assert [p.label for p in points[:3]] == [
        "mixer.alpha=0.5,label_fuser.name=saliency,seed=0",
        "mixer.alpha=0.5,label_fuser.name=saliency,seed=1",
        "mixer.alpha=0.5,label_fuser.name=area,seed=0",
    ]
    assert points[0].overrides == ["mixer.alpha=0.5", "label_fuser.name=saliency", "run.seed=0"]
    assert len({p.folder for p in points}) == len(points)
    assert expand([GridAxis("optim", "milestones", ("[8, 9]",))], [3])[0].folder == "optim.milestones=[8__9],seed=3"


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("mixer.alpha=", "no values"),
        ("mixer.alpha=1,,2", "empty value"),
        ("alpha=1,2", "expected table.key=v1,v2"),
        ("run.seed=0,1", "--seeds"),
        ("mixer.alpha=1,1", "listed twice"),
    ],
)
def test_malformed_grid_specs(spec, needle):
    errors: list[str] = []
    parse_grid([spec], errors)
    assert len(errors) == 1 and needle in errors[0]


def test_sweep_bad_keys_exit_2_one_line_each(write_recipe):
    path = write_recipe(TINY_RECIPE)
    result = invoke(
        "sweep", str(path), "--grid", "optim.lrr=0.1,0.2", "--grid", "mixer.alpha=1,2", "--grid", "optim.lr="
    )
    assert result.exit_code == 2
    lines = error_lines(result)
    assert len(lines) == 3
    assert any("optim.lrr" in line and "Did you mean 'lr'" in line for line in lines)
    assert any("mixer.alpha" in line and "no [mixer] table" in line for line in lines)
    assert any("no values" in line for line in lines)
    assert "Traceback" not in result.output


def test_sweep_checks_every_point_before_running(write_recipe, tmp_path):
    path = write_recipe(TINY_RECIPE)
    out = tmp_path / "sw"
    result = invoke(
        "sweep",
        str(path),
        "--grid",
        "mixer.name=cutmix,mixup",
        "--grid",
        "mixer.alpha=1.0,-1.0",
        "--seeds",
        "0,1",
        "--out",
        str(out),
    )
    assert result.exit_code == 2
    lines = error_lines(result)
    assert len(lines) == 1  # the same problem once, not once per mixer and seed
    assert "grid point mixer.name=cutmix,mixer.alpha=-1.0,seed=0 (and 3 more)" in lines[0]
    assert "[mixer].alpha: must be > 0 (got -1.0)" in lines[0]
    assert not out.exists()


def test_sweep_grid_over_a_component_parameter_of_a_swept_name(write_recipe):
    path = write_recipe(TINY_RECIPE)
    result = invoke(
        "sweep", str(path), "--grid", "mixer.name=cutmix,mixup", "--grid", "mixer.per_image=true", "--dry-run"
    )
    assert result.exit_code == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "unknown parameter of mixer 'cutmix'" in lines[0]


def test_sweep_dry_run_lists_the_plan(write_recipe, tmp_path):
    path = write_recipe(TINY_RECIPE)
    result = invoke(
        "sweep",
        str(path),
        "--grid",
        "mixer.name=cutmix,mixup",
        "--seeds",
        "0,1",
        "--out",
        str(tmp_path / "sw"),
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    assert "4 run(s)" in result.output
    assert "mixer.name=mixup,seed=1" in result.output
    assert not (tmp_path / "sw").exists()


def test_tiny_sweep_runs_reports_a_failed_point_and_compares(write_recipe, tmp_path):
    path = write_recipe(TINY_RECIPE)
    out = tmp_path / "sw"
    # n_max = 1 leaves classes without an image: that run fails when its data is built.
    result = invoke("sweep", str(path), "--grid", "data.n_max=24,1", "--out", str(out), "--no-progress")
    assert result.exit_code == 1
    assert "1 of 2 run(s) failed" in result.output
    assert "data.n_max=1,seed=3" in result.output and "leaves a class with no image" in result.output
    done = out / "data.n_max=24,seed=3"
    assert (done / "summary.json").is_file() and (done / "recipe.toml").is_file()
    assert not (out / "data.n_max=1,seed=3" / "summary.json").exists()
    assert "sweep" in result.output and "data.n_max" in result.output
    # the same folder again: refused before anything runs
    again = invoke("sweep", str(path), "--grid", "data.n_max=24,1", "--out", str(out))
    assert again.exit_code == 2 and "already holds runs" in again.output


# ------------------------------------------------------------------------ compare


def fake_run(folder: Path, seed: int, alpha: float, top1: float, few=None, name="lsm_ce", wall=60.0) -> Path:
    folder.mkdir(parents=True)
    recipe = {
        "run": {"name": name, "seed": seed, "epochs": 10},
        "data": {"name": "synthetic-lt", "n_max": 24},
        "mixer": {"name": "lsm", "alpha": alpha},
    }
    (folder / "recipe.toml").write_text(dumps_toml(recipe))
    summary = {
        "top1": top1,
        "many": top1 + 0.1,
        "medium": top1,
        "few": few,
        "rare3": 0.1,
        "per_class": [],
        "epochs": 10,
        "best_top1": top1,
        "best_epoch": 10,
        "final_loss": 1.0,
        "wall_time_s": wall,
        "class_counts": [],
        "class_names": [],
        "recipe": "r.toml",
        "run_name": name,
        "seed": seed,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_compare_groups_seeds_and_labels_the_difference(tmp_path):
    a0 = fake_run(tmp_path / "a0", 0, 1.0, 0.40, few=0.10)
    a1 = fake_run(tmp_path / "a1", 1, 1.0, 0.44, few=None, name="lsm_ce-seed1")  # names are not a setting
    b0 = fake_run(tmp_path / "b0", 0, 0.5, 0.50, few=0.20)
    groups = runs.group_runs(runs.load_runs([a0, b0, a1]))
    assert [len(g.runs) for g in groups] == [2, 1]
    assert [g.label for g in groups] == ["mixer.alpha=1.0", "mixer.alpha=0.5"]
    mean, std = groups[0].stat("top1")
    assert mean == pytest.approx(0.42) and std == pytest.approx(0.0282842712, rel=1e-6)
    assert groups[0].stat("few") == (pytest.approx(0.10), None)  # None values are left out
    assert groups[1].stat("top1") == (pytest.approx(0.50), None)


def test_compare_cli_formats(tmp_path):
    fake_run(tmp_path / "sw" / "a0", 0, 1.0, 0.40)
    fake_run(tmp_path / "sw" / "a1", 1, 1.0, 0.44)
    fake_run(tmp_path / "sw" / "b0", 0, 0.5, 0.50, wall=7200.0)
    md = invoke("compare", str(tmp_path / "sw"), "--format", "markdown", "--out", str(tmp_path / "cmp.md"))
    assert md.exit_code == 0, md.output
    assert "| lsm_ce | mixer.alpha=1.0 | 2 | 42.0 ± 2.8 |" in md.output
    assert "| lsm_ce | mixer.alpha=0.5 | 1 | 50.0 |" in md.output and "2.0 h" in md.output
    assert (tmp_path / "cmp.md").read_text() == md.output
    text = invoke("compare", str(tmp_path / "sw" / "a0"), str(tmp_path / "sw" / "a1"), "--format", "csv").output
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 1 and rows[0]["runs"] == "2" and rows[0]["seeds"] == "0 1"
    assert float(rows[0]["top1_mean"]) == pytest.approx(0.42) and rows[0]["few_mean"] == ""
    table = invoke("compare", str(tmp_path / "sw"))
    assert table.exit_code == 0 and "42.0" in table.output


def test_compare_errors_name_the_folder(tmp_path):
    unfinished = tmp_path / "crashed"
    unfinished.mkdir()
    (unfinished / "recipe.toml").write_text("[run]\nname = 'x'\n")
    result = invoke("compare", str(unfinished))
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"error: {unfinished}: no summary.json (the run did not finish, or this is not a run folder)"
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("compare", str(empty), str(tmp_path / "missing"))
    assert result.exit_code == 2 and str(empty) in result.output and len(error_lines(result)) == 1
    result = invoke("compare", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "no such run folder" in result.output


def test_compare_plot_overlays_per_class_accuracy(tmp_path):
    pytest.importorskip("matplotlib")
    folders = []
    for i, top1 in enumerate((0.4, 0.5)):
        folder = fake_run(tmp_path / f"r{i}", 0, 1.0 + i, top1)
        summary = json.loads((folder / "summary.json").read_text())
        summary.update(class_counts=[100, 30, 5], per_class=[0.9, 0.5, top1 - 0.3])
        (folder / "summary.json").write_text(json.dumps(summary))
        folders.append(str(folder))
    out = tmp_path / "plot.png"
    result = invoke("compare", *folders, "--plot", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_setting_labels_name_only_what_differs():
    ce = {"loss.name": "ce", "optim.lr": 0.1}
    lsm = {**ce, "mixer.name": "lsm", "mixer.prob": 0.5, "label_fuser.name": "saliency"}
    lsm_area = {**lsm, "label_fuser.name": "area"}
    lsm_p1 = {**lsm, "mixer.prob": 1.0}
    labels = runs.setting_labels([ce, lsm, lsm_area, lsm_p1])
    assert labels == [
        "no mixer",
        "mixer lsm, fuser saliency, mixer.prob=0.5",
        "mixer lsm, fuser area, mixer.prob=0.5",
        "mixer lsm, fuser saliency, mixer.prob=1.0",
    ]
    # A parameter that differs only because the component differs is not spelt out.
    cutmix = {**ce, "mixer.name": "cutmix", "mixer.prob": 1.0, "label_fuser.name": "area"}
    assert runs.setting_labels([lsm, cutmix]) == ["mixer lsm, fuser saliency", "mixer cutmix, fuser area"]
    assert "(unset)" not in " ".join(labels)


def test_compare_ranks_by_validation_and_shows_it(tmp_path):
    def with_val(folder: Path, val: float) -> Path:
        summary = json.loads((folder / "summary.json").read_text())
        summary["val_top1"] = val
        (folder / "summary.json").write_text(json.dumps(summary))
        return folder

    good_on_test = with_val(fake_run(tmp_path / "a", 0, 1.0, 0.60), 0.30)
    good_on_val = with_val(fake_run(tmp_path / "b", 0, 0.5, 0.40), 0.50)
    groups = runs.rank_groups(runs.group_runs(runs.load_runs([good_on_test, good_on_val])), "val_top1")
    assert [g.label for g in groups] == ["mixer.alpha=0.5", "mixer.alpha=1.0"]
    md = invoke("compare", str(good_on_test), str(good_on_val), "--format", "markdown", "--rank-by", "val_top1")
    assert md.exit_code == 0, md.output
    lines = md.output.splitlines()
    assert "val top-1" in lines[0]
    assert lines[2].startswith("| lsm_ce | mixer.alpha=0.5 | 1 | 50.0 | 40.0 |")
    refused = invoke("compare", str(fake_run(tmp_path / "c", 0, 1.0, 0.4)), "--rank-by", "val_top1")
    assert refused.exit_code == 2 and "val_per_class" in refused.output


def test_compare_shows_train_fit_uncut_in_a_pipe(tmp_path):
    """Runs that scored their training split get train top-1 / train Few columns, and a table written
    to a pipe is wide enough that no column is cut."""
    a = fake_run(tmp_path / "a", 0, 1.0, 0.40)
    b = fake_run(tmp_path / "b", 0, 0.5, 0.50)
    for folder, fit in ((a, 0.97), (b, 0.99)):
        summary = json.loads((folder / "summary.json").read_text())
        summary.update(train_top1=fit, train_few=fit - 0.5)
        (folder / "summary.json").write_text(json.dumps(summary))
    table = invoke("compare", str(a), str(b))
    assert table.exit_code == 0, table.output
    assert "train top-1" in table.output and "train Few" in table.output and "wall time" in table.output
    assert "97.0" in table.output and "49.0" in table.output and "…" not in table.output


@pytest.mark.parametrize("key, value", [("top1", "<b>x</b>"), ("wall_time_s", [1, 2]), ("per_class", ["a"])])
def test_a_summary_with_wrongly_typed_values_is_one_line(tmp_path, key, value):
    a = fake_run(tmp_path / "a", 0, 1.0, 0.40)
    summary = json.loads((a / "summary.json").read_text())
    summary[key] = value
    (a / "summary.json").write_text(json.dumps(summary))
    result = invoke("compare", str(a))
    assert result.exit_code == 2 and key in result.output and "Traceback" not in result.output


def test_every_differing_key_is_shown_and_collisions_get_their_folder(tmp_path):
    """Two sweep points beside runs that differ in more keys: the key that tells the points apart
    is never hidden behind "(+N more)"; in a pipe the table is markdown, every cell whole."""
    base = {f"mixer.k{i}": i for i in range(6)}
    flats = [
        {"mixer.name": "lsm", **base, "optim.lr": 0.05},
        {"mixer.name": "lsm", **base, "optim.lr": 0.1},
        {"mixer.name": "lsm", **{k: v + 1 for k, v in base.items()}, "optim.lr": 0.1},
    ]
    labels = runs.setting_labels(flats)
    assert all("more)" not in label for label in labels)
    assert "optim.lr=0.05" in labels[0] and "optim.lr=0.1" in labels[1] and "mixer.k5=6" in labels[2]
    a = fake_run(tmp_path / "quickstart_lsm", 0, 1.0, 0.40)
    b = fake_run(tmp_path / "quickstart_lsm-2", 0, 0.5, 0.50)
    out = invoke("compare", str(a), str(b))
    assert out.exit_code == 0 and out.output.startswith("| run | setting |")


def test_settings_whose_labels_collide_get_their_folder(tmp_path, monkeypatch):
    a = fake_run(tmp_path / "quickstart_lsm", 0, 1.0, 0.40)
    b = fake_run(tmp_path / "quickstart_lsm-2", 0, 0.5, 0.50)
    monkeypatch.setattr(runs, "setting_labels", lambda flats: ["mixer lsm"] * len(flats))
    groups = runs.group_runs(runs.load_runs([a, b]))
    assert [g.label for g in groups] == ["mixer lsm, quickstart_lsm", "mixer lsm, quickstart_lsm-2"]
