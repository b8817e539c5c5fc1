"""One run per folder: `--out` never overwrites, a second process is refused, atomic writes never share a name."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from lsm_registry.cli import cli
from lsm_registry.engine import Trainer
from lsm_registry.errors import LSMError
from lsm_registry.files import FolderLock, atomic_write, holds_anything
from lsm_registry.recipe import load_recipe


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_run_out_refuses_a_folder_that_holds_anything(tiny_recipe, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    result = invoke("run", tiny_recipe, "--out", out, "--no-progress")
    assert result.exit_code == 2, result.output
    assert f"lsm resume {out}" in result.output and "not empty" in result.output
    assert (out / "summary.json").read_text() == "{}"  # nothing was touched


def test_a_stale_lock_alone_counts_as_empty(tmp_path):
    folder = tmp_path / "run"
    FolderLock(folder).acquire().release()
    assert (folder / ".lock").exists() and not holds_anything(folder)
    (folder / "x").write_text("")
    assert holds_anything(folder)


HOLDER = """
import sys, time
from pathlib import Path
from lsm_registry.files import FolderLock
FolderLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_process_on_a_run_folder_is_refused_and_named(tiny_recipe, registry, tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        trainer = Trainer(load_recipe(tiny_recipe, [], registry), registry, run_dir=folder)
        with pytest.raises(LSMError, match=f"PID {holder.pid}"):
            trainer.fit()
        assert not (folder / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died: its lock is stale and the folder trains.
    summary = Trainer(load_recipe(tiny_recipe, [], registry), registry, run_dir=folder).fit()
    assert summary["epochs"] == 1 and any((folder / "checkpoints").iterdir())


def test_atomic_writers_of_one_file_never_share_a_temporary(tmp_path):
    path = tmp_path / "summary.json"
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(text: str) -> None:
        def slow(fh):
            start.wait()  # both writers have their temporary open at once
            fh.write(text.encode())

        try:
            atomic_write(path, slow)
        except BaseException as exc:  # pragma: no cover - what the test would report
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and path.read_text() in ("first", "second")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_resume_keeps_the_runs_own_checkpoint_count(tiny_recipe, registry, tmp_path):
    from lsm_registry.checkpoint import list_checkpoints

    folder = tmp_path / "run"
    recipe = load_recipe(tiny_recipe, ["run.epochs=3"], registry)
    Trainer(recipe, registry, run_dir=folder, keep=3).fit()
    assert len(list_checkpoints(folder)) == 3
    longer = load_recipe(tiny_recipe, ["run.epochs=4"], registry)
    Trainer(longer, registry, run_dir=folder, resume=True).fit()  # no keep given: the run's own 3
    assert len(list_checkpoints(folder)) == 3
    longer = load_recipe(tiny_recipe, ["run.epochs=5"], registry)
    Trainer(longer, registry, run_dir=folder, keep=1, resume=True).fit()  # told otherwise
    assert len(list_checkpoints(folder)) == 1


def test_names_with_dollar_signs_are_drawn_as_text(tmp_path):
    """matplotlib would parse "$x^$" as broken mathtext and fail after the run had trained."""
    pytest.importorskip("matplotlib")
    from lsm_registry.viz.plots import plot_confusion, plot_per_class

    summary = {
        "per_class": [0.5, 0.25],
        "class_counts": [10, 2],
        "class_names": ["$x^$", "a$b"],
        "run_name": "$x^$",
        "top1": 0.4,
    }
    assert plot_per_class(summary, tmp_path / "per_class.png", title="$x^$").stat().st_size > 0
    assert (
        plot_confusion([[1, 0], [0, 1]], ["$x^$", "a$b"], tmp_path / "confusion.png", title="$\\frac{").stat().st_size
        > 0
    )


def test_a_full_disk_is_one_line_naming_the_intact_checkpoint(tiny_recipe, registry, tmp_path, monkeypatch):
    import errno

    import lsm_registry.engine as engine
    from lsm_registry.checkpoint import list_checkpoints

    folder = tmp_path / "run"
    trainer = Trainer(load_recipe(tiny_recipe, ["run.epochs=2"], registry), registry, run_dir=folder)
    real_save = engine.save_atomic
    calls = []

    def full_disk(state, path):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, path)

    monkeypatch.setattr(engine, "save_atomic", full_disk)
    with pytest.raises(LSMError) as info:
        trainer.fit()
    message = str(info.value)
    (first,) = list_checkpoints(folder)
    assert "\n" not in message and "No space left on device" in message
    assert f"{first} is intact" in message and f"lsm resume {folder}" in message


def test_pictures_that_cannot_be_written_never_fail_a_finished_run(tiny_recipe, registry, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import errno

    import lsm_registry.viz.plots as plots
    from lsm_registry.runfolder.reporter import RunReporter

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots, "atomic_write", full_disk)
    folder = tmp_path / "run"
    summary = Trainer(load_recipe(tiny_recipe, [], registry), registry, run_dir=folder).fit(
        RunReporter(show_progress=False)
    )
    assert summary["epochs"] == 1 and (folder / "summary.json").is_file()
    assert not (folder / "per_class.png").exists()


@pytest.mark.parametrize("damage", ["empty", "tensor", "no model", "bad epoch"])
def test_resume_of_a_checkpoint_with_the_wrong_structure_is_one_line(tiny_recipe, registry, tmp_path, damage):
    import torch

    from lsm_registry.checkpoint import list_checkpoints

    folder = tmp_path / "run"
    Trainer(load_recipe(tiny_recipe, [], registry), registry, run_dir=folder).fit()
    (path,) = list_checkpoints(folder)
    state = torch.load(path, weights_only=True)
    bad = {
        "empty": {},
        "tensor": torch.zeros(3),
        "no model": {k: v for k, v in state.items() if k != "model"},
        "bad epoch": {**state, "epoch": "three"},
    }[damage]
    torch.save(bad, path)
    (folder / "recipe.toml").write_text(load_recipe(tiny_recipe, [], registry).to_toml())
    result = invoke("resume", folder, "--set", "run.epochs=2", "--no-progress")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert str(folder) in errors[0]


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.width=1000000000", "[model] resnet32: resnet32 with width 1000000000 needs about"),
        ("data.num_classes=1000000000", "[data] synthetic-lt: num_classes 1000000000"),
        ("data.n_max=100000000", "[data] synthetic-lt: synthetic-lt needs about"),
    ],
)
def test_what_cannot_fit_in_memory_is_refused_before_it_is_allocated(tiny_recipe, registry, tmp_path, override, words):
    recipe = load_recipe(tiny_recipe, [override], registry)
    with pytest.raises(LSMError) as info:
        Trainer(recipe, registry, run_dir=tmp_path / "run")
    assert words in str(info.value) and not (tmp_path / "run").exists()


@pytest.fixture
def finished_run(tiny_recipe, tmp_path) -> Path:
    folder = tmp_path / "finished"
    result = invoke("run", tiny_recipe, "--out", folder, "--no-progress")
    assert result.exit_code == 0, result.output
    return folder


def test_resume_of_a_folder_another_process_holds_is_one_line_naming_it(finished_run):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(finished_run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
        result = invoke("resume", finished_run, "--set", "run.epochs=2", "--no-progress")
        assert result.exit_code == 2, result.output
        assert f"PID {holder.pid}" in result.output and len(result.output.strip().splitlines()) == 1
        assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", ["evaluate", "export", "tau-norm"])
def test_an_unwritable_out_is_refused_before_the_work(finished_run, tmp_path, monkeypatch, command):
    import os

    import lsm_registry.runfolder.evaluate as evaluation

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if Path(p) == readonly else real_access(p, mode, **kw)
    )

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(evaluation, "find_checkpoint", no_work)
    extra = ["--tau", "1"] if command == "tau-norm" else []
    result = invoke(command, finished_run, *extra, "--out", readonly / "new")
    assert result.exit_code == 2, result.output
    assert f"{readonly / 'new'}: cannot be written" in result.output and "choose another --out" in result.output
    assert not (readonly / "new").exists()


def test_a_plain_pickle_checkpoint_is_named_and_never_loaded_with_code(finished_run, tmp_path):
    import pickle

    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"model": {}}, protocol=4))
    result = invoke("evaluate", finished_run, "--checkpoint", plain, "--out", tmp_path / "ev")
    assert result.exit_code == 2, result.output
    assert "plain pickle file (protocol 4)" in result.output
    assert "weights_only" not in result.output and "damaged" not in result.output


def test_evaluate_and_export_take_the_training_facts_from_the_checkpoint(finished_run, tmp_path, monkeypatch):
    """Scoring another seed of the data, or exporting, builds no training data."""
    import json

    import lsm_registry.runfolder.evaluate as evaluation

    built = []
    real_build = evaluation.build_data
    monkeypatch.setattr(
        evaluation, "build_data", lambda recipe, registry: built.append(recipe.data) or real_build(recipe, registry)
    )
    result = invoke("export", finished_run, "--out", tmp_path / "export", "--format", "state-dict")
    assert result.exit_code == 0, result.output
    assert built == []
    summary = json.loads((finished_run / "summary.json").read_text())
    assert json.loads((tmp_path / "export" / "model.json").read_text())["class_counts"] == summary["class_counts"]
    result = invoke("evaluate", finished_run, "--set", "data.seed=9", "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert len(built) == 1 and built[0].params.seed == 9  # the scored data only


def test_metrics_jsonl_has_every_epoch_and_a_resume_keeps_them(tiny_recipe, tmp_path):
    import json

    folder = tmp_path / "run"
    assert (
        invoke(
            "run", tiny_recipe, "--out", folder, "--no-progress", "--set", "run.epochs=3", "--set", "run.eval_every=3"
        ).exit_code
        == 0
    )
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and ["top1" in r for r in lines] == [False, False, True]
    assert all(r["train_loss"] is not None and r["lr"] > 0 for r in lines)
    assert invoke("resume", folder, "--set", "run.epochs=4", "--no-progress").exit_code == 0
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
