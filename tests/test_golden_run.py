"""A short quick-start LSM run replayed bit for bit: the engine's refactors must not change a number.

The golden (tests/golden/quickstart_lsm.json) holds the hashes of the first mixed batches
(images and soft targets, as the mixing step returned them) and every deterministic value of
metrics.jsonl of a 2-epoch, one-thread run of recipes/quickstart_lsm.toml with mixing from
epoch 1 (epoch 0 trains unmixed, so cached Grad-CAM observes it and epoch 1 mixes with the
stored maps). Floating-point results depend on the CPU's vector unit and on torch, so the
test is skipped where either differs from the recording. Re-record, only when a change of
numbers is intended, with ``LSM_RECORD_GOLDEN=1 pytest tests/test_golden_run.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "quickstart_lsm.json"
OVERRIDES = ["run.epochs=2", "mixer.start_epoch=1", "mixer.end_epoch=2", "optim.warmup_epochs=1", "run.eval_every=1"]
#: Keys of metrics.jsonl that measure the machine, not the training.
TIMING = {"wall_s", "images_per_s"}
MIXED_BATCHES = 6

RUNNER = """
import hashlib, json, sys
from pathlib import Path
import torch
from lsm_registry import default_registry
from lsm_registry.engine import Trainer
from lsm_registry.mixing import MixingStep
from lsm_registry.recipe import load_recipe

recipe_path, out, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
hashes = []
original = MixingStep.__call__

def recording(self, *args, **kwargs):
    mixed = original(self, *args, **kwargs)
    if len(hashes) < limit:
        digest = hashlib.sha256()
        for t in (mixed.images, mixed.target):
            digest.update(t.detach().float().contiguous().cpu().numpy().tobytes())
        hashes.append(digest.hexdigest())
    return mixed

MixingStep.__call__ = recording
registry = default_registry()
recipe = load_recipe(recipe_path, sys.argv[4:], registry)
Trainer(recipe, registry, run_dir=out / "run").fit()
print(json.dumps({"mixed_batches": hashes}))
"""


def replay(tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            RUNNER,
            str(ROOT / "recipes" / "quickstart_lsm.toml"),
            str(tmp_path),
            str(MIXED_BATCHES),
            *OVERRIDES,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "mixed_batches": json.loads(done.stdout.strip().splitlines()[-1])["mixed_batches"],
        "metrics": [{k: v for k, v in record.items() if k not in TIMING} for record in history(tmp_path)],
    }


def history(tmp_path: Path) -> list[dict]:
    # Trainer.fit without a reporter writes no metrics.jsonl: read the checkpoint's history.
    from lsm_registry.checkpoint import list_checkpoints, load_weights_only

    return load_weights_only(list_checkpoints(tmp_path / "run")[-1])["history"]


def machine() -> dict:
    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def test_a_short_quickstart_lsm_run_replays_the_golden_bit_for_bit(tmp_path):
    got = replay(tmp_path)
    assert len(got["mixed_batches"]) == MIXED_BATCHES  # the run mixed: the golden covers the mixing step
    if os.environ.get("LSM_RECORD_GOLDEN"):
        GOLDEN.write_text(json.dumps({"machine": machine(), "overrides": OVERRIDES, **got}, indent=1) + "\n")
        pytest.skip(f"recorded {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    if golden["machine"] != machine():
        pytest.skip(f"the golden was recorded with {golden['machine']}, this is {machine()}")
    assert got["mixed_batches"] == golden["mixed_batches"]
    assert got["metrics"] == golden["metrics"]
