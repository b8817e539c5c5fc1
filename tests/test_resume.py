"""Runs that survive: kill-and-resume equality, atomic checkpoints, NaN guard, refusal, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_RECIPE

from lsm_registry import Loss, hookimpl
from lsm_registry.checkpoint import list_checkpoints, load_latest, save_atomic
from lsm_registry.cli import cli
from lsm_registry.engine import Trainer, TrainingError
from lsm_registry.plugins import build_registry
from lsm_registry.recipe import load_recipe
from lsm_registry.registry import Owner

LONGER = TINY_RECIPE.replace("n_max = 24", "n_max = 160").replace("epochs = 1", "epochs = 3")
ENV = {**os.environ, "LSM_DISABLE_PLUGINS": os.environ.get("LSM_DISABLE_PLUGINS", ""), "OMP_NUM_THREADS": "1"}


def lsm(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lsm_registry", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("ref")
    recipe = folder / "r.toml"
    recipe.write_text(LONGER)
    proc = lsm("run", str(recipe), "--out", str(folder / "run"), "--no-progress")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return recipe, summary(folder / "run")


# `lsm` with one extra loss, registered by a throwaway plugin: ce-tripwire is the built-in
# cross-entropy that, armed through LSM_TRIPWIRE="SIGNAL:EPOCH:STEP" (both 1-based),
# sends SIGNAL to its own process when it computes the loss of that step. The signal
# lands at an exact step however busy the machine is; unarmed, it is plain CE.
TRIPWIRE_LSM = """
import os
import signal

from lsm_registry import hookimpl, plugins
from lsm_registry.cli import main
from lsm_registry.components.losses import CrossEntropy
from lsm_registry.registry import Owner


class TripwireCE(CrossEntropy):
    name = "ce-tripwire"

    def __init__(self, params, context):
        super().__init__(params, context)
        self.step = 0
        armed = os.environ.get("LSM_TRIPWIRE")
        self.trigger = None
        if armed:
            signame, epoch, step = armed.split(":")
            self.trigger = (getattr(signal, signame), int(epoch), int(step))

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.step = 0

    def __call__(self, logits, target, mixed=None):
        self.step += 1
        if self.trigger is not None and self.trigger[1:] == (self.epoch + 1, self.step):
            os.kill(os.getpid(), self.trigger[0])
        return super().__call__(logits, target, mixed)


class TripwirePlugin:
    @hookimpl
    def lsm_registry_components(self):
        return [TripwireCE]


plugins._default = plugins.build_registry(
    extra=[("tripwire", TripwirePlugin(), Owner("tripwire", "lsm-tests", "0"))], entry_points=False)
main()
"""

KILL_EPOCH, KILL_STEP = 2, 5  # 1-based: the fifth step of the second epoch (an epoch has 20)


@pytest.fixture(scope="module")
def tripwire(tmp_path_factory) -> tuple[Path, Path]:
    """(the tripwire `lsm` script, the LONGER recipe with loss ce-tripwire)."""
    folder = tmp_path_factory.mktemp("tripwire")
    script = folder / "tripwire_lsm.py"
    script.write_text(TRIPWIRE_LSM)
    recipe = folder / "r.toml"
    assert LONGER.count('name = "ce"') == 1
    recipe.write_text(LONGER.replace('name = "ce"', 'name = "ce-tripwire"'))
    return script, recipe


def tripwire_lsm(script: Path, *args: str, signal_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in ENV.items() if k != "LSM_TRIPWIRE"}
    if signal_at is not None:
        env["LSM_TRIPWIRE"] = signal_at
    return subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(reference, tripwire, tmp_path):
    _, expected = reference
    script, recipe = tripwire
    run_dir = tmp_path / "run"
    killed = tripwire_lsm(
        script,
        "run",
        str(recipe),
        "--out",
        str(run_dir),
        "--no-progress",
        signal_at=f"SIGKILL:{KILL_EPOCH}:{KILL_STEP}",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    # killed inside epoch 2: only epoch 1's checkpoint and metrics exist
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch-0001.pt"]
    assert not (run_dir / "summary.json").exists()
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    resumed = tripwire_lsm(script, "resume", str(run_dir), "--no-progress")
    assert resumed.returncode == 0, resumed.stdout
    got = summary(run_dir)
    assert got["per_class"] == expected["per_class"]
    assert got["final_loss"] == expected["final_loss"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_sigterm_writes_a_step_checkpoint_and_resume_is_exact(reference, tripwire, tmp_path):
    _, expected = reference
    script, recipe = tripwire
    run_dir = tmp_path / "run"
    stopped = tripwire_lsm(
        script,
        "run",
        str(recipe),
        "--out",
        str(run_dir),
        "--no-progress",
        signal_at=f"SIGTERM:{KILL_EPOCH}:{KILL_STEP}",
    )
    assert stopped.returncode == 130, stopped.stdout
    assert f"stopped by signal SIGTERM in epoch {KILL_EPOCH} at step {KILL_STEP}" in stopped.stdout
    assert f"lsm resume {run_dir}" in stopped.stdout
    step_checkpoint = f"epoch-{KILL_EPOCH - 1:04d}-step-{KILL_STEP}.pt"
    assert [p.name for p in list_checkpoints(run_dir)][-1] == step_checkpoint
    assert not (run_dir / "summary.json").exists()
    state, notes = load_latest(run_dir)
    assert notes == [] and (state["epoch"], state["step"]) == (KILL_EPOCH - 1, KILL_STEP)
    resumed = tripwire_lsm(script, "run", str(recipe), "--out", str(run_dir), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stdout
    got = summary(run_dir)
    assert got["per_class"] == expected["per_class"]
    assert got["final_loss"] == expected["final_loss"]


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_atomic({"epoch": 1}, tmp_path / "checkpoints" / "epoch-0001.pt")

    def broken_save(obj, fh, *a, **k):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_atomic({"epoch": 2}, tmp_path / "checkpoints" / "epoch-0002.pt")
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch-0001.pt"]
    state, notes = load_latest(tmp_path)
    assert state == {"epoch": 1} and notes == []


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    save_atomic({"epoch": 1}, tmp_path / "checkpoints" / "epoch-0001.pt")
    (tmp_path / "checkpoints" / "epoch-0002.pt").write_bytes(b"garbage")
    state, notes = load_latest(tmp_path)
    assert state == {"epoch": 1} and "epoch-0002.pt" in notes[0]


class NanAfterFirstEpoch(Loss):
    """Cross-entropy that turns NaN from the second epoch on (for the guard test)."""

    name = "nan-later"

    @attrs.frozen
    class Params:
        pass

    def __call__(self, logits, target, mixed=None):
        loss = torch.nn.functional.cross_entropy(logits, target)
        return loss * float("nan") if getattr(self, "epoch", 0) >= 1 else loss


class NanPlugin:
    @hookimpl
    def lsm_registry_components(self):
        return [NanAfterFirstEpoch]


def test_nan_guard_names_epoch_and_step_and_keeps_the_last_good_checkpoint(write_recipe, tmp_path):
    registry = build_registry(extra=[("nan", NanPlugin(), Owner("nan", "test", "0"))], entry_points=False)
    recipe = load_recipe(
        write_recipe(TINY_RECIPE.replace('name = "ce"', 'name = "nan-later"')), ["run.epochs=3"], registry
    )
    trainer = Trainer(recipe, registry, run_dir=tmp_path / "run")
    with pytest.raises(TrainingError, match=r"not finite at epoch 2, step 1;.*epoch-0001\.pt"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["epoch-0001.pt"]
    state, _ = load_latest(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_with_a_changed_recipe_is_refused_with_the_diff(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(cli, ["run", str(tiny_recipe), "--out", str(run_dir), "--no-progress"]).exit_code == 0
    result = runner.invoke(
        cli,
        ["run", str(tiny_recipe), "--out", str(run_dir), "--resume", "--set", "optim.lr=0.2", "--set", "run.epochs=2"],
    )
    assert result.exit_code == 2
    assert "cannot resume, the recipe differs in optim.lr (0.05 -> 0.2)" in result.output
    assert "run.epochs" not in result.output
    more = runner.invoke(cli, ["resume", str(run_dir), "--set", "run.epochs=2", "--no-progress"])
    assert more.exit_code == 0, more.output
    assert summary(run_dir)["epochs"] == 2


def test_keep_policy_prunes_old_checkpoints(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        cli, ["run", str(tiny_recipe), "--out", str(run_dir), "--set", "run.epochs=3", "--keep", "2", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch-0002.pt", "epoch-0003.pt"]


def test_two_process_gloo_run_writes_one_run_folder(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE.replace("n_max = 24", "n_max = 64"))
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "lsm_registry",
        "run",
        str(recipe),
        "--out",
        str(run_dir),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = summary(run_dir)
    assert got["world_size"] == 2 and len(got["per_class"]) == 4
    assert proc.stdout.count("run folder:") == 1
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch-0001.pt"]


def test_both_sampler_branches_shard_without_overlap():
    from lsm_registry.components.samplers import DualBranchSampler
    from lsm_registry.interfaces import Context

    labels = torch.repeat_interleave(torch.arange(4), torch.tensor([40, 20, 10, 10]))
    context = Context(class_counts=(40, 20, 10, 10), image_size=(3, 32, 32), seed=7)
    shards = [DualBranchSampler(DualBranchSampler.Params(), context, labels, rank, 2) for rank in (0, 1)]
    bg = [torch.cat([b for b, _ in s.batches(0, 8)]) for s in shards]
    fg = [torch.cat([f for _, f in s.batches(0, 8)]) for s in shards]
    assert set(bg[0].tolist()).isdisjoint(bg[1].tolist())
    assert len(bg[0]) == len(bg[1]) == 40
    assert not torch.equal(fg[0], fg[1])
    again = torch.cat([f for _, f in shards[0].batches(0, 8)])
    assert torch.equal(again, fg[0])
