"""CIFAR-10 / CIFAR-100 from the python batches torchvision (and the original site) ship.

The batches are read here rather than through ``torchvision.datasets.CIFAR10``
because torchvision checks the archive's MD5 sums, so a folder with a hand-made or
trimmed batch could not be read; torchvision is still what downloads the archive
when ``download = true``. Each batch is a pickled dict with ``data`` (N, 3072) uint8
rows in channel-major order and ``labels`` (CIFAR-10) or ``fine_labels``
(CIFAR-100); the meta file names the classes.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor

#: Normalisation of the reference code (LDAM-DRW, CMO), used for both CIFAR sets.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

LAYOUTS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "title": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
        "classes": 10,
        "torchvision": "CIFAR10",
    },
    "cifar100": {
        "title": "CIFAR-100",
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
        "classes": 100,
        "torchvision": "CIFAR100",
    },
}


def _expected(layout: dict[str, Any]) -> str:
    files = layout["train"] + layout["test"]
    if len(files) > 3:
        files = [f"{layout['train'][0]}..{layout['train'][-1]}", *layout["test"]]
    return ", ".join(f"{layout['folder']}/{f}" for f in files)


def find_folder(root: Path, layout: dict[str, Any]) -> Path:
    """``root/<batches folder>`` or ``root`` itself, whichever holds every batch."""
    for folder in (root / layout["folder"], root):
        if all((folder / f).is_file() for f in layout["train"] + layout["test"]):
            return folder
    raise FileNotFoundError(
        f"{root}: {layout['title']} not found; expected {_expected(layout)} there "
        f"(unpack {layout['archive']} into it, "
        f"or set download = true)"
    )


#: The only globals a real CIFAR python batch refers to: numpy's array reconstruction (under
#: its NumPy 1 and NumPy 2 module names), the array type and its dtype.
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class DataUnpickler(pickle.Unpickler):
    """A pickle reader for data files: any global outside :data:`ALLOWED_GLOBALS` is refused.

    A plain ``pickle.load`` runs whatever callable the file names, so a shared run folder
    whose recipe points ``root`` at a crafted batch would run code on ``lsm run``,
    ``evaluate`` or ``resume``. Data files hold dicts, lists, bytes and numpy arrays only.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR batch holds data only, never code")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            raw = DataUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as exc:
        raise ValueError(f"{path}: not a CIFAR python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (holds a {type(raw).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def read_batches(folder: Path, files: list[str], layout: dict[str, Any]) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for name in files:
        path = folder / name
        batch = _load_pickle(path)
        if "data" not in batch or layout["label_key"] not in batch:
            raise ValueError(f"{path}: not a CIFAR python batch (needs keys 'data' and {layout['label_key']!r})")
        data = np.asarray(batch["data"], dtype=np.uint8)
        y = np.asarray(batch[layout["label_key"]], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != y.shape[0]:
            raise ValueError(
                f"{path}: 'data' must be (N, 3072) with one label per row (got {data.shape} and {y.shape[0]} labels)"
            )
        bad = np.flatnonzero((y < 0) | (y >= layout["classes"]))
        if bad.size:
            raise ValueError(
                f"{path}: label {int(y[bad[0]])} of row {int(bad[0])} out of range 0..{layout['classes'] - 1}"
            )
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(y))
    return torch.cat(images), torch.cat(labels)


def class_names(folder: Path, layout: dict[str, Any]) -> tuple[str, ...]:
    path = folder / layout["meta"]
    if path.is_file():
        names = _load_pickle(path).get(layout["names_key"])
        if names is not None and len(names) == layout["classes"]:
            return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return tuple(str(c) for c in range(layout["classes"]))


def download(root: Path, layout: dict[str, Any]) -> None:
    cls = getattr(torchvision.datasets, layout["torchvision"])
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # offline machines fail in many ways (URLError, socket, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(
            f"{root}: downloading {layout['title']} failed ({reason}); put {_expected(layout)} there by hand"
        ) from None


def load_cifar(which: str, root: Path, allow_download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[str, ...]]:
    """(train images, train labels, test images, test labels, class names); images uint8 (N, 3, 32, 32)."""
    layout = LAYOUTS[which]
    try:
        folder = find_folder(root, layout)
    except FileNotFoundError:
        if not allow_download:
            raise
        download(root, layout)
        folder = find_folder(root, layout)
    train_x, train_y = read_batches(folder, layout["train"], layout)
    test_x, test_y = read_batches(folder, layout["test"], layout)
    return train_x, train_y, test_x, test_y, class_names(folder, layout)
