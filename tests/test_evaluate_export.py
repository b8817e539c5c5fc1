"""`lsm evaluate` scores a run's model as the run did; `lsm export` hands it to plain torch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_RECIPE, load_export_plainly

from lsm_registry.cli import cli
from lsm_registry.engine import build_data
from lsm_registry.recipe import load_recipe
from lsm_registry.runfolder.evaluate import EVALUATION_KIND, EVALUATIONS_DIR, evaluate_run
from lsm_registry.runfolder.export import META_FILE, ONNX_FILE, PT2_FILE, REBUILD, STATE_DICT_FILE, TORCHSCRIPT_FILE

NUM_CLASSES = 4  # the tiny recipe's data
TEST_PER_CLASS = 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One tiny run (1 epoch) that every test of this module reads and none may change."""
    base = tmp_path_factory.mktemp("evaluate")
    recipe = base / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    out = base / "run"
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def run_files(run_dir: Path) -> dict[str, str]:
    """Digest of every file of the run itself (its evaluations aside)."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and EVALUATIONS_DIR not in p.relative_to(run_dir).parts
    }


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_evaluate_reproduces_the_runs_own_scores(run_dir):
    before = run_files(run_dir)
    result = CliRunner().invoke(cli, ["evaluate", str(run_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    folder = run_dir / EVALUATIONS_DIR / "test"
    summary = json.loads((folder / "summary.json").read_text())
    run = json.loads((run_dir / "summary.json").read_text())
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["top1"] == run["top1"] == last["top1"]
    for key in ("many", "medium", "few", "rare3", "per_class", "class_counts", "class_names", "run_name", "seed"):
        assert summary[key] == run[key], key
    assert summary["kind"] == EVALUATION_KIND and summary["split"] == "test" and summary["overrides"] == []
    assert Path(summary["checkpoint"]).name == "epoch-0001.pt" and summary["epochs"] == run["epochs"]
    assert summary["images"] == NUM_CLASSES * TEST_PER_CLASS
    assert (folder / "per_class.csv").read_text() == (run_dir / "per_class.csv").read_text()
    assert "Many" in result.output and str(folder) in result.output
    assert run_files(run_dir) == before, "evaluate must not change the run's own files"


def test_evaluate_on_other_data_keeps_the_training_groups(run_dir):
    result = CliRunner().invoke(
        cli, ["evaluate", str(run_dir), "--set", "data.seed=1", "--set", "data.test_per_class=3"]
    )
    assert result.exit_code == 0, result.output
    folder = run_dir / EVALUATIONS_DIR / "test,data.seed=1,data.test_per_class=3"
    summary = json.loads((folder / "summary.json").read_text())
    run = json.loads((run_dir / "summary.json").read_text())
    assert summary["images"] == NUM_CLASSES * 3
    assert summary["class_counts"] == run["class_counts"], "Many/Medium/Few are the training set's groups"
    assert summary["data"]["seed"] == 1 and summary["overrides"] == ["data.seed=1", "data.test_per_class=3"]


def test_evaluate_errors_are_one_line(run_dir, tmp_path):
    runner = CliRunner()
    missing = tmp_path / "nope.pt"
    assert str(missing) in one_error_line(runner.invoke(cli, ["evaluate", str(run_dir), "--checkpoint", str(missing)]))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "recipe.toml").write_text((run_dir / "recipe.toml").read_text())
    assert "no checkpoint" in one_error_line(runner.invoke(cli, ["evaluate", str(bare)]))
    line = one_error_line(runner.invoke(cli, ["evaluate", str(run_dir), "--set", "model.width=8"]))
    assert "model.width" in line
    line = one_error_line(
        runner.invoke(cli, ["evaluate", str(run_dir), "--set", f"data.num_classes={NUM_CLASSES - 1}"])
    )
    assert f"{NUM_CLASSES - 1} classes" in line and f"trained on {NUM_CLASSES}" in line
    assert "validation split" in one_error_line(runner.invoke(cli, ["evaluate", str(run_dir), "--split", "val"]))
    assert "no such run folder" in one_error_line(runner.invoke(cli, ["evaluate", str(tmp_path / "absent")]))


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "torchscript"])
def test_export_loads_without_the_library_and_predicts_as_evaluate(run_dir, registry, tmp_path, fmt):
    out = tmp_path / "export"
    args = ["export", str(run_dir), "--out", str(out)] + (["--format", fmt] if fmt != "pt2" else [])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    graph = {"pt2": PT2_FILE, "onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}[fmt]
    assert {p.name for p in out.iterdir()} == {graph, STATE_DICT_FILE, META_FILE}  # pt2 is the default
    meta = json.loads((out / META_FILE).read_text())
    assert meta["files"][fmt] == graph and fmt in meta["load"]
    expected = evaluate_run(run_dir, registry, keep_logits=True)
    assert meta["run"]["epoch"] == expected.summary["checkpoint_epoch"] and meta["run"]["step"] == 0
    images = build_data(load_recipe(run_dir / "recipe.toml", [], registry), registry).test.images
    logits = load_export_plainly(out, fmt, images, tmp_path)
    assert torch.equal(logits.argmax(dim=1), expected.predictions)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-3, atol=1e-4)


def test_export_formats_combine_and_bad_ones_are_one_line(run_dir, tmp_path):
    out = tmp_path / "both"
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(out), "--format", "pt2,torchscript"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {PT2_FILE, TORCHSCRIPT_FILE, STATE_DICT_FILE, META_FILE}
    line = one_error_line(
        CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(tmp_path / "x"), "--format", "tflite"])
    )
    assert "tflite" in line and "pt2" in line
    assert not (tmp_path / "x").exists()


def test_model_json_describes_each_data_sets_test_view(registry):
    from lsm_registry.interfaces import Context

    def steps(name: str, **params):
        factory_cls = registry.get("dataset", name)
        return factory_cls(factory_cls.Params(**params), Context(class_counts=(), image_size=(0, 0, 0))).test_view()

    assert steps("synthetic-lt") == [] and steps("cifar10-lt") == []
    assert steps("fashion-mnist-lt") == [{"op": "pad", "pixels": 2, "value": 0}]
    memory = steps("imagefolder-lt", root="x", image_size=64)
    assert [s["op"] for s in memory] == ["resize"] and memory[0]["size"] == [64, 64]
    files = steps("imagefolder-lt", root="x", image_size=224, storage="files")
    assert [(s["op"], s["size"]) for s in files] == [("resize_shorter_side", 256), ("center_crop", [224, 224])]
    assert steps("imagenet-lt", root="x", test_resize=288)[0]["size"] == 288


def test_state_dict_export_rebuilds_as_model_json_says(run_dir, registry, tmp_path, monkeypatch):
    out = tmp_path / "export"
    out.mkdir()
    (out / "other.txt").write_text("taken")
    assert "--force" in one_error_line(CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(out)]))
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(out), "--format", "state-dict", "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / TORCHSCRIPT_FILE).exists() and not (out / PT2_FILE).exists()
    meta = json.loads((out / META_FILE).read_text())
    assert meta["rebuild"]["python"] == list(REBUILD) and meta["architecture"]["name"] == "resnet32"
    monkeypatch.chdir(out)
    namespace: dict = {}
    exec("\n".join(meta["rebuild"]["python"]), namespace)
    expected = evaluate_run(run_dir, registry, keep_logits=True)
    images = build_data(load_recipe(run_dir / "recipe.toml", [], registry), registry).test.images
    mean = torch.tensor(meta["input"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["input"]["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = namespace["model"]((images.float() / 255 - mean) / std)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-4, atol=1e-5)


def test_export_errors_are_one_line(run_dir, tmp_path):
    runner = CliRunner()
    line = one_error_line(runner.invoke(cli, ["export", str(tmp_path / "absent"), "--out", str(tmp_path / "x")]))
    assert "no such run folder" in line
    missing = tmp_path / "nope.pt"
    line = one_error_line(
        runner.invoke(cli, ["export", str(run_dir), "--out", str(tmp_path / "y"), "--checkpoint", str(missing)])
    )
    assert str(missing) in line
    line = one_error_line(runner.invoke(cli, ["export", str(run_dir), "--out", str(run_dir), "--force"]))
    assert "run folder" in line
