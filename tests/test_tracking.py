"""Loggers: recipe keys, the hub that keeps a failing tracker from stopping a run, and the real trackers.

The tracker tests use the real parts: TensorBoard's own EventAccumulator, a real
`mlflow server` on a loopback port read back through MLflow's client, and W&B's
offline run file. Each skips, with the reason, when its package is not installed.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_RECIPE

from lsm_registry.engine import Trainer
from lsm_registry.errors import LSMError, RecipeError
from lsm_registry.interfaces import Logger
from lsm_registry.plugins import build_registry
from lsm_registry.recipe import load_recipe, without_loggers
from lsm_registry.registry import Owner
from lsm_registry.runfolder.reporter import RunReporter
from lsm_registry.runfolder.tracking import LoggerHub, check_loggers

TWO_EPOCHS = TINY_RECIPE.replace("epochs = 1", "epochs = 2")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _train(recipe_path: Path, run_dir: Path, overrides=(), registry=None, resume: bool = False) -> dict:
    registry = registry or build_registry(entry_points=False)
    recipe = load_recipe(recipe_path, list(overrides), registry)
    return Trainer(recipe, registry, run_dir=run_dir, resume=resume).fit(RunReporter(show_progress=False))


# ------------------------------------------------------------------------------ recipe


def test_loggers_and_their_tables_validate_and_round_trip(write_recipe, registry):
    path = write_recipe(
        TINY_RECIPE.replace('name = "tiny"', 'name = "tiny"\nloggers = ["tensorboard", "mlflow"]')
        + '\n[loggers.mlflow]\nexperiment = "lt"\n'
    )
    recipe = load_recipe(path, ["loggers.mlflow.tracking_uri=http://127.0.0.1:5999"], registry)
    assert [s.name for s in recipe.loggers] == ["tensorboard", "mlflow"]
    assert recipe.loggers[1].params.experiment == "lt"
    assert recipe.loggers[1].params.tracking_uri == "http://127.0.0.1:5999"
    again = write_recipe(recipe.to_toml(), "again.toml")
    assert load_recipe(again, [], registry).to_dict() == recipe.to_dict()
    # Loggers are not part of what a run computes: a comparison leaves them out.
    plain = load_recipe(write_recipe(TINY_RECIPE, "plain.toml"), [], registry)
    assert without_loggers(recipe.to_dict()) == without_loggers(plain.to_dict())


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        (TINY_RECIPE, ['run.loggers=["tensorbord"]'], "[run].loggers: unknown logger 'tensorbord'"),
        (
            TINY_RECIPE + '\n[loggers.mlflow]\nexperiment = "x"\n',
            [],
            "[loggers.mlflow]: logger 'mlflow' is not in [run].loggers",
        ),
        (
            TINY_RECIPE,
            ['run.loggers=["mlflow"]', "loggers.mlflow.experimant=x"],
            "[loggers.mlflow].experimant: unknown parameter",
        ),
        (TINY_RECIPE, ['run.loggers=["mlflow", "mlflow"]'], "'mlflow' is listed 2 times"),
    ],
)
def test_bad_logger_settings_are_one_line_errors(write_recipe, registry, text, overrides, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(text), overrides, registry)
    assert any(expected in line for line in err.value.lines), err.value.lines


class Missing(Logger):
    """Needs a package no machine has."""

    name = "missing-pkg"
    requires = ("no_such_tracker_package_xyz",)
    install_hint = "pip install no-such-tracker"

    def start(self, run):
        raise AssertionError("must not be started")


def test_a_missing_tracker_package_stops_the_run_before_training_with_the_hint(write_recipe):
    registry = build_registry(entry_points=False)
    registry.register(Missing, Owner("tests", "tests", "0"))
    recipe = load_recipe(write_recipe(TINY_RECIPE), ['run.loggers=["missing-pkg"]'], registry)
    with pytest.raises(
        LSMError,
        match=r"logger 'missing-pkg' needs the no_such_tracker_package_xyz package: pip install no-such-tracker",
    ):
        check_loggers(recipe, registry)


# ------------------------------------------------------------------------------ failures


class Recording(Logger):
    """Keeps every call, for the tests."""

    name = "recording"
    calls: list = []

    def start(self, run):
        Recording.calls.append(("start", run.run_name, run.resumed))

    def log_scalars(self, step, values):
        Recording.calls.append(("scalars", step, dict(values)))

    def log_evaluation(self, step, epoch, metrics, per_class):
        Recording.calls.append(("evaluation", step, epoch, dict(metrics), dict(per_class)))

    def log_image(self, name, path, step):
        Recording.calls.append(("image", name, Path(path).is_file()))

    def finish(self, summary):
        Recording.calls.append(("finish", summary["top1"]))

    def close(self):
        Recording.calls.append(("close",))


class Broken(Logger):
    """A tracker that goes down after its start."""

    name = "broken"

    def start(self, run):
        pass

    def log_scalars(self, step, values):
        raise ConnectionError("tracker at 127.0.0.1:9 refused\nthe connection")


def _registry_with(*classes):
    registry = build_registry(entry_points=False)
    for cls in classes:
        registry.register(cls, Owner("tests", "tests", "0"))
    return registry


def test_each_logger_gets_steps_evaluations_pictures_and_the_summary(write_recipe, tmp_path):
    Recording.calls = []
    mixing = (
        TWO_EPOCHS
        + '\n[sampler]\nname = "dual-branch"\n\n[mixer]\nname = "lsm"\nprob = 1.0\nstart_epoch = 0\nend_epoch = { none = true }\n'
    )
    summary = _train(write_recipe(mixing), tmp_path / "run", ['run.loggers=["recording"]'], _registry_with(Recording))
    kinds = [c[0] for c in Recording.calls]
    assert kinds[0] == "start" and kinds[-1] == "close" and kinds[-2] != "close"
    assert kinds.count("evaluation") == 2 and ("finish", summary["top1"]) in Recording.calls
    steps = [c[1] for c in Recording.calls if c[0] == "scalars"]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # the global step keeps rising over epochs
    scalars = next(c[2] for c in Recording.calls if c[0] == "scalars")
    assert set(scalars) >= {
        "train/loss",
        "train/lr",
        "train/images_per_s",
        "train/mixed_fraction",
        "train/fg_label_weight",
    }
    assert scalars["train/mixed_fraction"] == 1.0 and 0.0 < scalars["train/fg_label_weight"] < 1.0
    last = [c for c in Recording.calls if c[0] == "evaluation"][-1]
    assert last[2] == 2 and last[3]["test/top1"] == summary["top1"]
    assert list(last[4].values()) == summary["per_class"]
    assert {c[1] for c in Recording.calls if c[0] == "image"} == {"per_class", "confusion", "mixed_samples"}
    assert all(c[2] for c in Recording.calls if c[0] == "image")


def test_a_failing_logger_is_reported_in_one_line_and_the_run_goes_on(write_recipe, tmp_path, capsys):
    Recording.calls = []
    run_dir = tmp_path / "run"
    summary = _train(
        write_recipe(TWO_EPOCHS), run_dir, ['run.loggers=["broken", "recording"]'], _registry_with(Recording, Broken)
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "broken" in line]
    assert len(lines) == 1 and "ConnectionError: tracker at 127.0.0.1:9 refused the connection" in lines[0]
    assert "the run goes on without it" in lines[0]
    # The other logger and the run folder are untouched by the failure.
    assert ("finish", summary["top1"]) in Recording.calls
    assert json.loads((run_dir / "summary.json").read_text())["top1"] == summary["top1"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-0002.pt"]


def test_the_hub_never_shields_the_run_folder():
    class Folder(Broken):
        name = "folder"

    folder = Folder(None, None)
    hub = LoggerHub([folder], note=lambda text: None, required=(folder,))
    with pytest.raises(ConnectionError):
        hub.call("log_scalars", 1, {"train/loss": 1.0})


def test_a_logger_may_be_added_on_resume(write_recipe, tmp_path):
    Recording.calls = []
    registry = _registry_with(Recording)
    path = write_recipe(TINY_RECIPE)
    run_dir = tmp_path / "run"
    _train(path, run_dir, [], registry)
    _train(path, run_dir, ["run.epochs=2", 'run.loggers=["recording"]'], registry, resume=True)
    assert Recording.calls[0] == ("start", "tiny", True)
    assert [c[2] for c in Recording.calls if c[0] == "evaluation"] == [2]


# ------------------------------------------------------------------------------ real trackers


@pytest.mark.skipif(
    not _has("tensorboard"), reason="tensorboard is not installed (pip install 'lsm-registry[tensorboard]')"
)
def test_tensorboard_event_files_read_back_with_event_accumulator(write_recipe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    summary = _train(write_recipe(TWO_EPOCHS), run_dir, ['run.loggers=["tensorboard"]'])
    # TensorBoard, pointed at the folder of run folders, names the run after its folder.
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    assert list(EventMultiplexer().AddRunsFromDirectory(str(tmp_path)).Runs()) == ["run"]
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    top1 = acc.Scalars("test/top1")
    assert [round(e.value, 6) for e in top1][-1] == round(summary["top1"], 6) and len(top1) == 2
    assert len(acc.Scalars("train/loss")) >= 2
    assert {"pictures/per_class", "pictures/confusion"} <= set(tags["images"])
    assert any(tag.startswith("per_class/") for tag in tags["scalars"])
    assert "recipe/text_summary" in tags["tensors"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` with a sqlite backend on a free loopback port, stopped afterwards."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if not mlflow_bin.exists():
        pytest.skip("the mlflow command is not installed (pip install 'lsm-registry[mlflow]')")
    port = _free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(tmp_path / 'mlflow-server.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start in 120 s")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        log.close()


@pytest.mark.skipif(not _has("mlflow"), reason="mlflow is not installed (pip install 'lsm-registry[mlflow]')")
def test_mlflow_run_reads_back_from_a_real_tracking_server(write_recipe, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    summary = _train(
        write_recipe(TWO_EPOCHS),
        run_dir,
        ['run.loggers=["mlflow"]', f"loggers.mlflow.tracking_uri={mlflow_server}", "loggers.mlflow.experiment=tests"],
    )
    client = MlflowClient(tracking_uri=mlflow_server)
    run_id = json.loads((run_dir / "loggers" / "mlflow" / "state.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["data.name"] == "synthetic-lt"
    history = client.get_metric_history(run_id, "test/top1")
    assert len(history) == 2 and history[-1].value == pytest.approx(summary["top1"])
    assert len(client.get_metric_history(run_id, "train/loss")) >= 2
    assert run.data.metrics["summary/top1"] == pytest.approx(summary["top1"])
    pictures = {Path(f.path).name for f in client.list_artifacts(run_id, "pictures")}
    assert {"per_class.png", "confusion.png"} <= pictures


def _wandb_records(folder: Path) -> list:
    """The records of a W&B offline run file: a LevelDB-style log of 32 KiB blocks of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(folder / "wandb" / "offline-run-*" / "*.wandb"))  # not again through latest-run
    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, chunks, out = 7, 32768, [], []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(data)
        elif kind == 2:
            chunks = [data]
        elif kind in (3, 4):
            chunks.append(data)
            if kind == 4:
                out.append(b"".join(chunks))
    records = []
    for data in out:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        records.append(record)
    return records


@pytest.mark.skipif(not _has("wandb"), reason="wandb is not installed (pip install 'lsm-registry[wandb]')")
def test_wandb_offline_run_file_holds_the_metrics(write_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    summary = _train(write_recipe(TWO_EPOCHS), run_dir, ['run.loggers=["wandb"]'])
    records = _wandb_records(run_dir / "loggers" / "wandb")
    history = [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    top1 = [h["test/top1"] for h in history if "test/top1" in h]
    assert top1[-1] == pytest.approx(summary["top1"])
    assert any("train/loss" in h for h in history)
    config = {
        i.key: json.loads(i.value_json)
        for r in records
        if r.WhichOneof("record_type") == "run"
        for i in r.run.config.update
    }
    assert config["optim.lr"] == 0.05 and config["data.name"] == "synthetic-lt"
    assert glob.glob(
        str(
            run_dir
            / "loggers"
            / "wandb"
            / "wandb"
            / "offline-run-*"
            / "files"
            / "media"
            / "images"
            / "pictures"
            / "per_class_*.png"
        )
    )


def test_the_plugin_logger_of_docs_tracking_md_runs_and_conforms(write_recipe, tmp_path):
    from test_docs import python_block

    from lsm_registry.testing import check_component

    namespace: dict = {}
    exec(python_block("tracking.md", "A logger of your own"), namespace)
    cls = namespace["CsvLogger"]
    check_component(cls)
    run_dir = tmp_path / "run"
    summary = _train(write_recipe(TWO_EPOCHS), run_dir, ['run.loggers=["csv"]'], _registry_with(cls))
    rows = (run_dir / "loggers" / "csv" / "evaluations.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["step", "epoch"] and len(rows) == 3
    header, last = rows[0].split(","), rows[-1].split(",")
    assert float(last[header.index("test/top1")]) == pytest.approx(summary["top1"])


def test_without_loggers_keeps_the_top_level_format_key(registry, write_recipe):
    import tomllib

    text = load_recipe(write_recipe(TINY_RECIPE), ['run.loggers=["tensorboard"]'], registry).to_toml()
    stripped = without_loggers(tomllib.loads(text))
    assert "format" in stripped and "loggers" not in stripped["run"]


@pytest.mark.skipif(not _has("mlflow"), reason="mlflow is not installed (pip install 'lsm-registry[mlflow]')")
def test_mlflow_default_store_sits_beside_the_run_folders_with_tags_and_summary(write_recipe, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # MLflow's own default would put mlflow.db / mlruns here
    run_dir = tmp_path / "runs" / "run"
    summary = _train(write_recipe(TWO_EPOCHS), run_dir, ['run.loggers=["mlflow"]', "loggers.mlflow.experiment=tests"])
    assert (tmp_path / "runs" / "mlflow.db").is_file() and not any(work.iterdir())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run_id = json.loads((run_dir / "loggers" / "mlflow" / "state.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.tags["lsm.run_dir"] == str(run_dir) and "lsm.command" in run.data.tags
    assert "summary.json" in {Path(f.path).name for f in client.list_artifacts(run_id)}
    assert run.data.metrics["summary/top1"] == pytest.approx(summary["top1"])
    # The model: the newest checkpoint, as an artifact that lsm export can read.
    logged = {Path(f.path).name for f in client.list_artifacts(run_id, "checkpoints")}
    assert logged == {p.name for p in (run_dir / "checkpoints").glob("epoch-*.pt")} == {"epoch-0002.pt"}


def test_hparams_leave_out_logger_settings_and_keys_the_schedule_ignores(write_recipe):
    from lsm_registry.plugins import default_registry
    from lsm_registry.recipe import load_recipe
    from lsm_registry.runfolder.tracking import run_info

    recipe = load_recipe(
        write_recipe(TWO_EPOCHS),
        ['run.loggers=["tensorboard"]', "loggers.tensorboard.log_dir='x'", "optim.schedule='cosine'"],
        default_registry(),
    )
    hparams = run_info(recipe, None, ("a",), (1,), 1, False).hparams
    assert not any(k.startswith("loggers.") or k == "run.loggers" for k in hparams)
    assert "optim.milestones" not in hparams and "optim.gamma" not in hparams and hparams["optim.schedule"] == "cosine"
