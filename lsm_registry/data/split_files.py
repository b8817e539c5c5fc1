"""Split-file data sets (ImageNet-LT, iNaturalist 2018): lines ``relative/path label``.

These sets do not fit in memory, so :class:`FileSplit` keeps only the paths and
labels and decodes images when they are needed, with the standard views of
:mod:`lsm_registry.data.transforms`:

- training batches (``fetch_train``, and the engine's prefetching
  :class:`lsm_registry.data.prefetch.PlannedLoader`) are random-resized-cropped and
  flipped from the original file while decoding, and say per image which box and flip
  they got (:class:`lsm_registry.interfaces.Crops`);
- ``fetch`` (evaluation, ``lsm evaluate``) is the test view: shorter side resized,
  center crop. A ``torch.utils.data`` DataLoader whose worker processes stay alive
  between batches (a mutable batch sampler hands them the current batch, in chunks,
  one per worker) decodes it; batches smaller than ``MIN_PARALLEL`` are decoded in the
  calling process, where waking the workers would cost more than it saves.

A file that cannot be read comes back as an error string rather than an exception
from the worker, so the training process can raise it as one line naming the file
(a DataLoader re-raises worker exceptions wrapped in a multi-line traceback).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ..errors import DataError
from ..interfaces import Crops, DecodingSplit
from .transforms import RATIO, SCALE, default_resize, eval_view, train_view

MIN_PARALLEL = 16
PRIORITIES = ("normal", "idle")


def check_priority(priority: str, workers: int = 1) -> None:
    """A one-line error for a priority this platform cannot give, or that would do nothing."""
    if priority not in PRIORITIES:
        raise ValueError(f"worker_priority {priority!r}: expected one of {', '.join(PRIORITIES)}")
    if priority == "idle" and not hasattr(os, "SCHED_IDLE"):
        raise ValueError("worker_priority 'idle' needs Linux's SCHED_IDLE scheduling policy, which this platform lacks")
    if priority == "idle" and workers == 0:
        raise ValueError(
            "worker_priority 'idle' needs workers >= 1: with workers = 0 the training process decodes, and it is never put under SCHED_IDLE"
        )


def _idle(worker_id: int) -> None:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def worker_init(priority: str) -> Optional[Callable[[int], None]]:
    """The DataLoader's ``worker_init_fn`` for ``priority``.

    ``idle`` puts the decoding workers under Linux's SCHED_IDLE policy: they take only
    CPU time that nothing else wants, so the training process, woken at the end of a
    GPU step, runs at once instead of waiting out a worker's time slice when every
    core is decoding (3-6 ms a step on a 2-core machine with 2 workers). On a machine
    shared with other work the same policy starves the workers, hence not the default."""
    return _idle if priority == "idle" else None


def read_split_file(path: Path, num_classes: Optional[int] = None) -> tuple[list[str], Tensor]:
    """Paths and labels of a split file; a malformed line or a label out of range raises naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found (lines 'relative/path label')")
    paths: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.rsplit(None, 1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'relative/path label' (got {text!r})")
            try:
                label = int(parts[1])
            except ValueError:
                raise ValueError(f"{path}:{line_no}: label {parts[1]!r} is not an integer") from None
            if label < 0 or (num_classes is not None and label >= num_classes):
                bound = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
                raise ValueError(f"{path}:{line_no}: label {label} out of range {bound}")
            paths.append(parts[0])
            labels.append(label)
    if not paths:
        raise ValueError(f"{path}: no 'relative/path label' lines")
    return paths, torch.tensor(labels, dtype=torch.int64)


def _decode(path: str, size: int, resize: int) -> tuple[Tensor, Optional[str]]:
    try:
        return eval_view(path, size, resize)[0], None
    except ValueError as exc:
        return torch.zeros(3, size, size, dtype=torch.uint8), str(exc)


#: What ``FileSplit.decode_train`` returns: the uint8 images, and per image the crop box
#: ``[left, top, width, height]``, the flip and the source ``(height, width)`` as plain
#: lists (a worker hands them back pickled inline: every tensor in a worker's result
#: costs the training process a file-descriptor handshake with that worker, about 1 ms
#: here), and the first decoding error, if any.
Decoded = tuple[Tensor, list[list[float]], list[bool], list[tuple[int, int]], Optional[str]]


def crops_of(boxes: list[list[float]], flips: list[bool], sizes: list[tuple[int, int]]) -> Crops:
    """The :class:`Crops` of a decoded batch's lists."""
    return Crops(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(flips, dtype=torch.bool),
        torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2),
    )


def _keep(batch: Any) -> Any:
    return batch


class _Files(Dataset):
    """Decodes a chunk of positions into one uint8 tensor and the first error, if any."""

    def __init__(self, paths: list[str], size: int, resize: int):
        self.paths = paths
        self.size = size
        self.resize = resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, Optional[str]]:
        return _decode(self.paths[i], self.size, self.resize)

    def __getitems__(self, positions: list[int]) -> tuple[Tensor, Optional[str]]:
        decoded = [_decode(self.paths[i], self.size, self.resize) for i in positions]
        error = next((e for _, e in decoded if e is not None), None)
        return torch.stack([img for img, _ in decoded]), error


class _Requests:
    """A batch sampler the split refills before each pass of the persistent loader."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class FileSplit(DecodingSplit):
    """Images listed by path, decoded per batch by worker processes.

    ``size``: the crop side (training and test); ``resize``: the test view's shorter side
    (default 256 for 224); ``workers`` decoding processes, at ``worker_priority``
    (:func:`worker_init`); ``prefetch`` batches decoded ahead per worker by the planned loader.
    """

    def __init__(
        self,
        image_root: Path,
        paths: list[str],
        labels: Tensor,
        size: int,
        workers: int = 4,
        resize: Optional[int] = None,
        prefetch: int = 2,
        worker_priority: str = "normal",
    ):
        check_priority(worker_priority, workers)
        self.image_root = Path(image_root)
        self.paths = [str(self.image_root / p) for p in paths]
        self.labels = labels.to(torch.int64)
        self.size = size
        self.resize = resize or default_resize(size)
        self.workers = workers
        self.prefetch = prefetch
        self.worker_priority = worker_priority
        self._crop = v2.RandomResizedCrop(size, scale=SCALE, ratio=RATIO, antialias=True)
        self._files = _Files(self.paths, size, self.resize)
        self._requests = _Requests()
        self._loader: Optional[DataLoader] = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_loader"] = None
        return state

    def _parallel(self, positions: list[int]) -> list[tuple[Tensor, Optional[str]]]:
        if self._loader is None:
            self._loader = DataLoader(
                self._files,
                batch_sampler=self._requests,
                num_workers=self.workers,
                collate_fn=_keep,
                persistent_workers=True,
                prefetch_factor=2,
                worker_init_fn=worker_init(self.worker_priority),
            )
        per = -(-len(positions) // self.workers)
        self._requests.chunks = [positions[i : i + per] for i in range(0, len(positions), per)]
        return list(self._loader)

    def decode_train(self, positions: list[int], seed: int, out: Optional[Tensor] = None) -> Decoded:
        """The training view of ``positions``, in this process; the crops are drawn from ``seed`` alone.

        ``out``: a uint8 ``(len(positions), 3, size, size)`` tensor to decode into (a
        planned loader's shared-memory slot); a new one by default."""
        n, size = len(positions), self.size
        images = out if out is not None else torch.empty(n, 3, size, size, dtype=torch.uint8)
        boxes: list[list[float]] = []
        flips: list[bool] = []
        sizes: list[tuple[int, int]] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for k, i in enumerate(positions):
                try:
                    image, box, flip, hw = train_view(self.paths[i], size, self._crop)
                except ValueError as exc:
                    return images, boxes, flips, sizes, str(exc)
                images[k].copy_(image)
                boxes.append(box)
                flips.append(flip)
                sizes.append(hw)
        return images, boxes, flips, sizes, None

    def fetch_train(self, idx: Tensor, seed: int) -> tuple[Tensor, Crops]:
        """uint8 training crops (B, 3, size, size) on the CPU and their :class:`Crops`; an unreadable file raises DataError."""
        images, boxes, flips, sizes, error = self.decode_train([int(i) for i in idx.cpu().tolist()], seed)
        if error is not None:
            raise DataError(error)
        return images, crops_of(boxes, flips, sizes)

    def fetch(self, idx: Tensor, device: torch.device) -> Tensor:
        """The test view (resize the shorter side, center crop) of ``idx``, uint8 on ``device``."""
        positions = [int(i) for i in idx.cpu().tolist()]
        if self.workers > 0 and len(positions) >= MIN_PARALLEL:
            parts = self._parallel(positions)
        else:
            parts = [self._files.__getitems__(positions)] if positions else []
        error = next((e for _, e in parts if e is not None), None)
        if error is not None:
            raise DataError(error)
        if not parts:
            return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8, device=device)
        images = torch.cat([imgs for imgs, _ in parts])
        return images.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else images.to(device)
