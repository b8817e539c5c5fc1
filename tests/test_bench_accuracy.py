"""bench/accuracy.py: paired differences, their markdown, the run store (no training here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import accuracy as bench
from bench import store as run_store

ROOT = Path(__file__).resolve().parents[1]


def _summary(seed: int, top1: float, many: float, medium: float, rare3: float, **extra) -> dict:
    return {
        "format": 2,
        "top1": top1,
        "many": many,
        "medium": medium,
        "few": None,
        "rare3": rare3,
        "wall_time_s": 30.0,
        "seed": seed,
        "epochs": 1,
        **extra,
    }


def test_t_interval_on_hand_numbers():
    iv = bench.t_interval([1.0, 2.0, 3.0])
    assert iv.n == 3 and iv.mean == pytest.approx(2.0) and iv.sd == pytest.approx(1.0)
    half = 4.303 / math.sqrt(3)
    assert (iv.lo, iv.hi) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert iv.contains_zero() is True
    assert bench.t975(1) == 12.706 and bench.t975(30) == 2.042 and bench.t975(100) == 2.042
    one = bench.t_interval([0.5])
    assert one.sd is None and one.lo is None and one.contains_zero() is None
    assert bench.t_interval([]) is None
    # paired over the seeds both have, a missing value skipped
    base = {0: {"top1": 0.5}, 1: {"top1": 0.6}, 2: {"top1": None}}
    other = {0: {"top1": 0.7}, 1: {"top1": 0.7}, 2: {"top1": 0.9}, 3: {"top1": 0.1}}
    assert bench.paired_diffs(base, other, "top1") == [pytest.approx(0.2), pytest.approx(0.1)]
    assert bench.fmt_interval(bench.t_interval([0.012])) == "+1.2 [n/a]"


def test_markdown_two_methods_three_seeds():
    runs = {
        "ce": {s: _summary(s, t, 0.8, 0.5, r) for s, t, r in zip((0, 1, 2), (0.50, 0.52, 0.54), (0.1, 0.2, 0.3))},
        "lsm_ce": {
            s: _summary(s, t, 0.9, m, r)
            for s, t, m, r in zip((0, 1, 2), (0.51, 0.54, 0.57), (0.40, 0.45, 0.50), (0.3, 0.4, 0.5))
        },
    }
    methods = bench.method_table(runs, "ce").splitlines()
    assert methods[0] == "| method | seeds | top-1 | Many | Medium | Few | rarest 3 | wall time / run |"
    assert methods[2] == "| ce (base) | 0,1,2 | 52.0 ± 2.0 | 80.0 ± 0.0 | 50.0 ± 0.0 | — | 20.0 ± 10.0 | 30 s |"
    assert methods[3].startswith("| lsm_ce | 0,1,2 | 54.0 ± 3.0 | 90.0 ± 0.0 | 45.0 ± 5.0 | — | 40.0 ± 10.0 |")
    diffs = bench.difference_table(runs, "ce").splitlines()
    assert diffs[0] == "| method | paired seeds | top-1 | Many | Medium | Few | rarest 3 | within spread? |"
    assert len(diffs) == 3  # header, rule, lsm_ce: no row for the base
    assert diffs[2] == (
        "| lsm_ce | 3 | +2.0 [−0.5, +4.5] | +10.0 [+10.0, +10.0] | −5.0 [−17.4, +7.4] | — "
        "| +20.0 [+20.0, +20.0] | yes |"
    )
    assert "Paired difference to ce" in bench.tables(runs, "ce")
    # a validation split adds its column; one seed gives n/a
    one = {
        "ce": {0: _summary(0, 0.5, 0.8, 0.5, 0.1, val_top1=0.6)},
        "cmo": {0: _summary(0, 0.6, 0.8, 0.5, 0.1, val_top1=0.55)},
    }
    row = bench.difference_table(one, "ce").splitlines()
    assert (
        "val top-1" in row[0]
        and row[2] == "| cmo | 1 | +10.0 [n/a] | +0.0 [n/a] | +0.0 [n/a] | — | +0.0 [n/a] | −5.0 [n/a] | n/a |"
    )


def test_write_block_keeps_other_text_and_protocols(tmp_path):
    results = tmp_path / "results.md"
    results.write_text(
        "# Results\n\nintro\n\n<!-- bench/accuracy.py: begin -->\nold\n<!-- bench/accuracy.py: end -->\n\nafter\n"
    )
    bench.write_block(results, "new untagged", "")
    bench.write_block(results, "tagged one", "e4-val")
    bench.write_block(results, "tagged two", "e4-val")
    text = results.read_text()
    assert "old" not in text and "intro" in text and "after" in text and "new untagged" in text
    assert (
        text.count("<!-- bench/accuracy.py e4-val: begin -->") == 1
        and "tagged two" in text
        and "tagged one" not in text
    )


def test_stored_run_is_not_retrained(tmp_path, monkeypatch, tiny_recipe):
    from lsm_registry.plugins import default_registry
    from lsm_registry.recipe import load_recipe

    def no_training(*args, **kwargs):
        raise AssertionError("a stored run was trained again")

    monkeypatch.setattr(run_store, "train_run", no_training)
    monkeypatch.setattr(bench, "machine", lambda: "test machine")
    store, results = tmp_path / "store", tmp_path / "results.md"
    registry = default_registry()
    for seed in (0, 1):
        recipe = load_recipe(tiny_recipe, ["run.epochs=1", f"run.seed={seed}", "run.name=tiny"], registry)
        folder = store / run_store.folder_name("tiny", 1, seed, "t")
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(_summary(seed, 0.5 + seed / 10, 0.8, 0.5, 0.2)))
        (folder / "recipe.toml").write_text(recipe.to_toml())
    argv = [
        "--recipe-dir",
        str(tiny_recipe.parent),
        "--recipes",
        "tiny",
        "--epochs",
        "1",
        "--seeds",
        "0,1",
        "--tag",
        "t",
        "--store",
        str(store),
        "--out",
        str(tmp_path / "out"),
        "--results",
        str(results),
    ]
    assert bench.main(argv) == 0
    text = results.read_text()
    assert "<!-- bench/accuracy.py t: begin -->" in text and "| tiny (base) | 0,1 | 55.0 ± 7.1 |" in text
    assert "0 trained now, 2 taken from the store" in text and "no paired differences" in text
    # a stored run of another setting is refused, not mixed in (and not retrained)
    other = store / run_store.folder_name("tiny", 1, 0, "t") / "recipe.toml"
    other.write_text(other.read_text().replace("lr = 0.05", "lr = 0.5"))
    assert bench.main(argv) == 1


def test_base_tag_reuses_the_stored_base_of_another_protocol(tmp_path, monkeypatch, tiny_recipe):
    from lsm_registry.plugins import default_registry
    from lsm_registry.recipe import load_recipe

    trained = []
    monkeypatch.setattr(run_store, "train_run", lambda recipe, registry, folder, resume: trained.append(folder.name))
    monkeypatch.setattr(bench, "machine", lambda: "test machine")
    variant = tiny_recipe.parent / "tiny2.toml"
    variant.write_text(tiny_recipe.read_text().replace("lr = 0.05", "lr = 0.5"))
    store, results = tmp_path / "store", tmp_path / "results.md"
    registry = default_registry()
    for stem, path, tag, top1 in (("tiny", tiny_recipe, "old", 0.5), ("tiny2", variant, "new", 0.6)):
        for seed in (0, 1):
            recipe = load_recipe(path, ["run.epochs=1", f"run.seed={seed}", f"run.name={stem}"], registry)
            folder = store / run_store.folder_name(stem, 1, seed, tag)
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps(_summary(seed, top1 + seed / 10, 0.8, 0.5, 0.2)))
            (folder / "recipe.toml").write_text(recipe.to_toml())
    argv = [
        "--recipe-dir",
        str(tiny_recipe.parent),
        "--recipes",
        "tiny,tiny2",
        "--epochs",
        "1",
        "--seeds",
        "0,1",
        "--tag",
        "new",
        "--base-tag",
        "old",
        "--store",
        str(store),
        "--out",
        str(tmp_path / "out"),
        "--results",
        str(results),
    ]
    assert bench.main(argv) == 0 and trained == []
    text = results.read_text()
    assert "<!-- bench/accuracy.py new: begin -->" in text and "| tiny2 | 2 | +10.0 [+10.0, +10.0] |" in text
    # without --base-tag the base would be looked for under the new tag, and trained there
    argv.remove("--base-tag"), argv.remove("old")
    monkeypatch.setattr(run_store, "store_run", lambda folder, store: store / "x")
    monkeypatch.setattr(bench, "collect", lambda folders: {})
    bench.main(argv)
    assert trained == ["tiny-new-e1-s0", "tiny-new-e1-s1"]


def test_stored_recipe_names_no_data_folder(tmp_path):
    run = tmp_path / "ce-e60-s0"
    run.mkdir()
    (run / "recipe.toml").write_text('[run]\nname = "x"\n\n[data]\nname = "imagefolder-lt"\nroot = "/home/me/images"\n')
    (run / "summary.json").write_text(json.dumps({"top1": 0.5}))
    (run / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1, "train_loss": 2.0})
        + "\n"
        + json.dumps({"epoch": 2, "top1": 0.5, "few": 0.1, "per_class": [0.9, 0.1]})
        + "\n"
    )
    stored = run_store.store_run(run, tmp_path / "store")
    text = (stored / "recipe.toml").read_text()
    assert "/home/me/images" not in text and f'root = "{run_store.ROOT_PLACEHOLDER}"' in text
    curve = [json.loads(line) for line in (stored / "curve.jsonl").read_text().splitlines()]
    assert [c["epoch"] for c in curve] == [2] and curve[0]["few"] == 0.1 and "per_class" not in curve[0]


def test_a_run_stored_before_a_measuring_key_counts_as_its_old_value(tmp_path, registry, write_recipe):
    from lsm_registry.recipe import load_recipe

    lsm = (
        '[run]\nepochs = 10\n[data]\nname = "synthetic-lt"\n[model]\nname = "resnet32"\n[sampler]\nname = "dual-branch"\n'
        '[saliency]\nname = "gradcam"\n[mixer]\nname = "lsm"\n[loss]\nname = "ce"\n'
    )
    recipe = load_recipe(write_recipe(lsm), [], registry)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "recipe.toml").write_text(recipe.to_toml().replace("mask_padding = true\n", ""))
    assert any("saliency.mask_padding" in d for d in run_store.setting_differences(folder, recipe))
    (folder / "recipe.toml").write_text(recipe.to_toml())
    assert run_store.setting_differences(folder, recipe) == []
