"""checkpoints/best.pt: the best epoch on validation, kept beside the newest, reachable as --checkpoint best."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from click.testing import CliRunner
from conftest import load_export_plainly

from lsm_registry.assembly import build_data
from lsm_registry.checkpoint import load_weights_only
from lsm_registry.cli import cli
from lsm_registry.recipe import load_recipe


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def run(tiny_recipe: Path, folder: Path, *sets: str):
    args = ["run", tiny_recipe, "--out", folder, "--no-progress", "--keep", "1", "--set", "run.epochs=4"]
    for s in sets:
        args += ["--set", s]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return json.loads((folder / "summary.json").read_text())


def test_best_is_kept_beside_the_newest_and_scores_the_best_epoch(tiny_recipe, registry, tmp_path):
    folder = tmp_path / "run"
    summary = run(tiny_recipe, folder, "data.val_per_class=3", "optim.lr=0.5")
    files = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert files == ["best.pt", "epoch-0004.pt"]  # --keep 1 never removes best.pt
    best = load_weights_only(folder / "checkpoints" / "best.pt")
    assert best["epoch"] == summary["best_epoch"]
    evaluated = invoke("evaluate", folder, "--checkpoint", "best", "--split", "val", "--out", tmp_path / "ev")
    assert evaluated.exit_code == 0, evaluated.output
    ev = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert abs(ev["top1"] - summary["best_top1"]) < 1e-9
    exported = invoke("export", folder, "--checkpoint", "best", "--out", tmp_path / "export")
    assert exported.exit_code == 0, exported.output
    meta = json.loads((tmp_path / "export" / "model.json").read_text())
    assert meta["run"]["epoch"] == summary["best_epoch"] and meta["files"]["pt2"] == "model.pt2"
    # The exported file, loaded with torch alone, gives the best epoch's validation top-1 and evaluate's predictions.
    data = build_data(load_recipe(folder / "recipe.toml", [], registry), registry)
    logits = load_export_plainly(tmp_path / "export", "pt2", data.val.images, tmp_path)
    predictions = logits.argmax(1)
    assert abs(float((predictions == data.val.labels).float().mean()) - summary["best_top1"]) < 1e-9
    rows = list(csv.DictReader(open(tmp_path / "ev" / "predictions.csv")))
    assert [int(r["prediction"]) for r in rows] == predictions.tolist()


def test_without_a_validation_split_there_is_no_best(tiny_recipe, tmp_path):
    folder = tmp_path / "run"
    run(tiny_recipe, folder)
    assert not (folder / "checkpoints" / "best.pt").exists()
    result = invoke("evaluate", folder, "--checkpoint", "best")
    assert result.exit_code == 2 and "data.val_per_class" in result.output
    assert len(result.output.strip().splitlines()) == 1
    last = invoke("evaluate", folder, "--checkpoint", "last", "--out", tmp_path / "ev")
    assert last.exit_code == 0, last.output
