"""Atomic checkpoints: a crash at any moment leaves the previous checkpoint loadable.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced,
then renamed over its final name (``os.replace`` is atomic on POSIX), and the folder
is fsynced so the rename itself survives a power cut. Only then are older
checkpoints beyond ``keep`` removed.

Checkpoints are data, not code: every load uses ``torch.load(..., weights_only=True)``,
so a file holding pickled objects other than tensors and plain containers is refused
(:class:`UnsafeCheckpointError`) instead of being run. RNG states are stored as plain
ints, lists and tensors for that reason.
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import attrs
import numpy as np
import torch
from torch import Tensor

from .errors import LSMError
from .files import atomic_write
from .formats import CHECKPOINT_FORMAT, format_problem
from .interfaces import LTData

CHECKPOINT_DIR = "checkpoints"
#: The checkpoint of the best epoch on the validation split (runs with one); never pruned.
BEST_CHECKPOINT = "best.pt"
_NAME = re.compile(r"^epoch-(\d{4,})(?:-step-(\d+))?\.pt$")


class ResumeError(LSMError):
    """The run folder cannot be resumed (no checkpoint, or a different recipe)."""


class UnsafeCheckpointError(ResumeError):
    """A checkpoint holds pickled code or objects that a weights-only load refuses."""


# What the weights-only unpickler says when it refuses a file's content (as opposed to a
# damaged file, which fails with EOFError, a zip error or "Unsupported operand").
_REFUSED = re.compile(
    r"Unsupported global|GLOBAL \S+ whose module|unrecognized function|Can only create new object|Can only build"
    r"|must be imported to load|persistent_load id|Only persistent_load of storage"
)
_OFFENDER = re.compile(r"GLOBAL (\S+)|unrecognized function (.+?)(?: which belongs|$)|but got (<[^>]+>)", re.M)


def _legacy_numpy_globals() -> list[Any]:
    """The one allow-list entry: NumPy's uint32 RNG key array, held by checkpoints of earlier versions.

    Rebuilding an ndarray runs no code of the file's choosing (its items, if any, still go
    through the weights-only unpickler); everything else stays refused.
    """
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def load_weights_only(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a refused file raises :class:`UnsafeCheckpointError`.

    Any other failure (a damaged or truncated file) is raised as torch raised it.
    """
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()), warnings.catch_warnings():
            # A plain pickle file of another protocol: the failure below says what it is.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if not _REFUSED.search(message):
            raise
        m = _OFFENDER.search(message)
        what = f" ({next(g for g in m.groups() if g)})" if m else ""
        raise UnsafeCheckpointError(
            f"{path}: refused, the file holds pickled code or objects{what} that a weights-only load refuses; "
            "checkpoints written by lsm-registry never need that, so it was not loaded"
        ) from None


def unreadable_checkpoint(path: Path, exc: BaseException) -> str:
    """One line on why ``path`` did not load: a plain pickle file is named as such, and torch's
    advice to retry with ``weights_only=False`` is never repeated (that would run the file's code)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError:
        head = b""
    if len(head) == 2 and head[0] == 0x80 and not isinstance(exc, UnsafeCheckpointError):
        return (
            f"{path}: not a checkpoint written by torch.save but a plain pickle file (protocol {head[1]}); "
            "lsm-registry loads checkpoints weights-only and never unpickles other files"
        )
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if any("weights_only" in line for line in lines):
        lines = [
            line
            for line in lines
            if "weights_only" not in line
            and "torch.load" not in line
            and not line.startswith(("Please file an issue", "Check the documentation"))
        ] or ["refused by the weights-only loader"]
    reason = lines[0] if lines else ""
    return f"{path}: cannot read the checkpoint ({type(exc).__name__}: {reason})"


def checkpoint_name(epoch: int, step: int = 0) -> str:
    """``epoch`` completed epochs; ``step`` > 0 for a checkpoint taken inside epoch ``epoch + 1``."""
    return f"epoch-{epoch:04d}" + (f"-step-{step}" if step else "") + ".pt"


def save_atomic(obj: Any, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


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
    """The newest checkpoint that loads, and a note per file that did not.

    A damaged file is noted and an older one is tried; a file that a weights-only load
    refuses (pickled code or objects) raises :class:`UnsafeCheckpointError`: it was not
    damaged by a crash, someone put it there.
    """
    notes = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_weights_only(path, map_location=map_location), notes
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # a damaged file: fall back to the previous one
            notes.append(f"{unreadable_checkpoint(path, exc)}; using an older checkpoint")
    return None, notes


def rng_state() -> dict[str, Any]:
    """Every RNG state as plain ints, floats, lists and tensors (what a weights-only load reads)."""
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(name),
            "key": key.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(py["state"]), py["gauss_next"])
    random.setstate(py)
    if isinstance(npy, dict):  # checkpoints of earlier versions hold NumPy's own tuple
        npy = (
            npy["bit_generator"],
            np.asarray(npy["key"], dtype=np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    np.random.set_state(npy)
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


@attrs.frozen
class TrainingFacts:
    """What the model took from its training set: class counts (the groups), names, normalisation, input size."""

    class_counts: tuple[int, ...]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: tuple[int, int, int]

    @classmethod
    def of(cls, data: LTData) -> "TrainingFacts":
        return cls(
            data.class_counts(), tuple(data.class_names), tuple(data.mean), tuple(data.std), tuple(data.image_size)
        )


@attrs.frozen(eq=False)
class CheckpointFile:
    """A checkpoint read weights-only: the model's state, its epoch and step, and the training
    data's facts when the engine stored them (checkpoints of earlier versions have none)."""

    path: Path
    state: dict[str, Tensor]
    epoch: Optional[int]  # completed epochs (None for a bare state_dict)
    step: int
    facts: Optional[TrainingFacts]
    raw: dict[str, Any]  # the whole engine checkpoint ({} for a bare state_dict)


def _stored_facts(path: Path, stored: Any) -> Optional[TrainingFacts]:
    if stored is None:
        return None
    try:
        counts, names = stored["class_counts"], stored["class_names"]
        mean, std, size = stored["mean"], stored["std"], stored["image_size"]
        if not (len(counts) == len(names) and len(mean) == len(std) and len(size) == 3):
            raise ValueError("lengths disagree")
        return TrainingFacts(
            tuple(int(n) for n in counts),
            tuple(str(n) for n in names),
            tuple(float(v) for v in mean),
            tuple(float(v) for v in std),
            tuple(int(v) for v in size),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LSMError(f"{path}: its 'data' entry is not what lsm-registry writes ({exc})") from None


def read_checkpoint(path: Path) -> CheckpointFile:
    """An engine checkpoint or a bare state_dict, weights only."""
    try:
        state = load_weights_only(path, map_location="cpu")
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise LSMError(unreadable_checkpoint(path, exc)) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        problem = format_problem(state.get("format"), CHECKPOINT_FORMAT, str(path))
        if problem is not None:
            raise LSMError(problem)
        epoch = state.get("epoch")
        if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0):
            raise LSMError(f"{path}: its 'epoch' is {epoch!r}, not a count of epochs")
        return CheckpointFile(
            path, state["model"], epoch, int(state.get("step") or 0), _stored_facts(path, state.get("data")), state
        )
    if not isinstance(state, dict):
        raise LSMError(f"{path}: expected a state_dict or a dict with key 'model' (got {type(state).__name__})")
    return CheckpointFile(path, state, None, 0, None, {})


def read_model_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state_dict, the rest of the engine checkpoint or {} for a bare state_dict), weights only:
    what a stage-2 recipe's ``init_from`` reads (:func:`read_checkpoint` is the one reader)."""
    read = read_checkpoint(path)
    return read.state, read.raw


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a state_dict, or the model of an engine checkpoint, into ``model`` (``lsm preview --checkpoint``)."""
    state, _ = read_model_state(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise LSMError(f"{path}: does not fit the recipe's model ({' '.join(first[:2])})") from None
