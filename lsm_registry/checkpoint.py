"""Atomic checkpoints: a crash at any moment leaves the previous checkpoint loadable.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced,
then renamed over its final name (``os.replace`` is atomic on POSIX), and the folder
is fsynced so the rename itself survives a power cut. Only then are older
checkpoints beyond ``keep`` removed.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .errors import LSMError

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^epoch-(\d{4,})(?:-step-(\d+))?\.pt$")


class ResumeError(LSMError):
    """The run folder cannot be resumed (no checkpoint, or a different recipe)."""


def checkpoint_name(epoch: int, step: int = 0) -> str:
    """``epoch`` completed epochs; ``step`` > 0 for a checkpoint taken inside epoch ``epoch + 1``."""
    return f"epoch-{epoch:04d}" + (f"-step-{step}" if step else "") + ".pt"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint files, oldest first (temporary files are never listed)."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return [p for _, p in sorted(found)]


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` epoch checkpoints; step checkpoints older than the newest file go too."""
    files = list_checkpoints(run_dir)
    if not files:
        return
    newest = files[-1]
    epoch_files = [p for p in files if "-step-" not in p.name]
    doomed = set(epoch_files[:-keep] if keep > 0 else epoch_files[:-1])
    doomed |= {p for p in files if "-step-" in p.name and p != newest}
    for p in doomed:
        if p != newest:
            p.unlink(missing_ok=True)


def load_latest(run_dir: Path, map_location: Any = "cpu") -> tuple[Optional[dict[str, Any]], list[str]]:
    """The newest checkpoint that loads, and a note per file that did not."""
    notes = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return torch.load(path, map_location=map_location, weights_only=False), notes
        except Exception as exc:  # a damaged file: fall back to the previous one
            notes.append(f"{path}: unreadable ({type(exc).__name__}); using an older checkpoint")
    return None, notes


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def estimate_size(model: torch.nn.Module) -> int:
    """Bytes of a checkpoint: weights, momentum buffers and slack."""
    n = sum(p.numel() * p.element_size() for p in model.state_dict().values() if torch.is_tensor(p))
    return 3 * n + (1 << 20)


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < 2 * needed:
        raise LSMError(
            f"{folder}: only {free / 2**20:.1f} MiB free, a checkpoint needs about {needed / 2**20:.1f} MiB (twice that while writing)"
        )


def recipe_diff(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]], ignore: set[str]) -> list[str]:
    """``table.key (old -> new)`` for every key that differs, except those in ``ignore``."""
    changes = []
    for table in sorted(set(old) | set(new)):
        a, b = old.get(table, {}), new.get(table, {})
        for key in sorted(set(a) | set(b)):
            dotted = f"{table}.{key}"
            if dotted in ignore:
                continue
            va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
            if isinstance(va, tuple):
                va = list(va)
            if isinstance(vb, tuple):
                vb = list(vb)
            if va != vb:
                changes.append(f"{dotted} ({va!r} -> {vb!r})")
    return changes
