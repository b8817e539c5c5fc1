"""bench/decoupling.py: the tau choice, the stored runs it reuses and the block it writes (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import decoupling as bench
from bench import store as run_store
from lsm_registry.plugins import default_registry
from lsm_registry.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]

TAU_CSV = "tau,top1,many,medium,few,rare3\n0.5,{a},0.8,0.6,,0.5\n1,{b},0.7,0.8,,0.9\n"


def _summary(seed: int, top1: float, rare3: float, **extra) -> dict:
    return {
        "format": 2,
        "top1": top1,
        "many": 0.8,
        "medium": 0.6,
        "few": None,
        "rare3": rare3,
        "val_top1": top1,
        "wall_time_s": 10.0,
        "seed": seed,
        "epochs": 1,
        **extra,
    }


def test_choose_tau_takes_the_best_validation_top1_and_the_smaller_tau_on_a_tie(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("tau,top1,many,medium,few,rare3\n0.25,0.7,,,,\n0.5,0.8,,,,\n1,0.8,,,,\n")
    table = bench.read_tau_csv(path)
    assert table[0.5] == {"top1": 0.8, "many": None, "medium": None, "few": None, "rare3": None}
    assert bench.choose_tau(table) == 0.5


def test_stored_runs_are_reused_and_the_block_is_written(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a finished or stored run was trained again")

    monkeypatch.setattr(run_store, "train_run", no_training)
    monkeypatch.setattr(bench, "lsm_tau_norm", no_training)
    monkeypatch.setattr(bench.accuracy, "machine", lambda: "test machine")
    registry = default_registry()
    out, store, results = tmp_path / "out", tmp_path / "store", tmp_path / "results.md"
    results.write_text("# Results\n\nbefore\n")
    recipe_dir = ROOT / "recipes" / "fashion_mnist_lt"
    for seed in (0, 1):
        parent = out / run_store.folder_name("ce", 10, seed, bench.TAG)
        (parent / "checkpoints").mkdir(parents=True)
        (parent / "checkpoints" / "epoch-0010.pt").write_bytes(b"")
        (parent / "recipe.toml").write_text(bench.parent_recipe(seed, recipe_dir, registry).to_toml())
        (parent / "summary.json").write_text(json.dumps(_summary(seed, 0.80, 0.70)))
        for stem, top1, rare3 in (("crt", 0.78, 0.90), ("lws", 0.79, 0.85)):
            recipe = load_recipe(recipe_dir / f"{stem}.toml", bench.stage_overrides(parent, seed, stem), registry)
            assert recipe.stage.init_from == bench.shown(parent) and recipe.data.params.val_per_class == 20
            folder = store / run_store.folder_name(stem, recipe.run.epochs, seed, bench.TAG)
            folder.mkdir(parents=True)
            (folder / "recipe.toml").write_text(recipe.to_toml())
            (folder / "summary.json").write_text(json.dumps(_summary(seed, top1 + seed / 100, rare3)))
        tau = store / run_store.folder_name("tau_norm", 10, seed, bench.TAG)
        tau.mkdir(parents=True)
        (tau / "tau-norm,val.csv").write_text(TAU_CSV.format(a=0.9, b=0.8))
        (tau / "tau-norm,test.csv").write_text(TAU_CSV.format(a=0.81, b=0.79))
        (tau / "summary.json").write_text(json.dumps(_summary(seed, 0.81, 0.5, tau=0.5)))
    argv = ["--seeds", "0,1", "--taus", "0.5,1", "--out", str(out), "--store", str(store), "--results", str(results)]
    assert bench.main(argv) == 0
    text = results.read_text()
    assert text.startswith("# Results\n\nbefore\n") and text.count(bench.BEGIN) == 1
    assert "| ce (base) | 0,1 | 80.0 ± 0.0 |" in text and "| crt | 0,1 | 78.5 ± 0.7 |" in text
    assert "| tau-norm τ=1 | 0,1 | 79.0 ± 0.0 | 70.0 ± 0.0 | 80.0 ± 0.0 | — | 90.0 ± 0.0 | 80.0 ± 0.0 |" in text
    assert "seed 0: 0.5, seed 1: 0.5" in text and "0 trained or scored now" in text
    # the parents went into the store (summary.json and recipe.toml)
    assert (store / "ce-fmnist-e10-e10-s1" / "summary.json").is_file()
    # a stored stage run of another setting is refused, not reused
    crt = store / "crt-fmnist-e10-e10-s0" / "recipe.toml"
    crt.write_text(crt.read_text().replace("lr = 0.05", "lr = 0.5"))
    assert bench.main(argv) == 1
    # a second run rewrites the block in place
    assert results.read_text().count(bench.BEGIN) == 1
