"""Split-file data sets (ImageNet-LT, iNaturalist 2018): lines ``relative/path label``.

These sets do not fit in memory, so :class:`FileSplit` keeps only the paths and
labels and decodes each batch when the engine asks for it: a ``torch.utils.data``
DataLoader whose worker processes stay alive between batches (a mutable batch
sampler hands them the current batch, in chunks, one per worker) decodes and resizes
every image to ``size x size`` uint8; the engine then applies its batched
random-resized-crop on the device. Batches smaller than ``MIN_PARALLEL`` are decoded
in the calling process, where starting the workers would cost more than it saves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from ..interfaces import Split
from .folders import load_image

MIN_PARALLEL = 16


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


def _decode(path: str, size: int) -> tuple[Tensor, Optional[str]]:
    try:
        return load_image(path, size), None
    except ValueError as exc:
        return torch.zeros(3, size, size, dtype=torch.uint8), str(exc)


def _keep(batch: Any) -> Any:
    return batch


class _Files(Dataset):
    """Decodes a chunk of positions into one uint8 tensor and the first error, if any."""

    def __init__(self, paths: list[str], size: int):
        self.paths = paths
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, Optional[str]]:
        return _decode(self.paths[i], self.size)

    def __getitems__(self, positions: list[int]) -> tuple[Tensor, Optional[str]]:
        decoded = [_decode(self.paths[i], self.size) for i in positions]
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


class FileSplit(Split):
    """Images listed by path, decoded per batch by worker processes."""

    def __init__(self, image_root: Path, paths: list[str], labels: Tensor, size: int, workers: int = 4):
        self.image_root = Path(image_root)
        self.paths = [str(self.image_root / p) for p in paths]
        self.labels = labels.to(torch.int64)
        self.size = size
        self.workers = workers
        self._files = _Files(self.paths, size)
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
            )
        per = -(-len(positions) // self.workers)
        self._requests.chunks = [positions[i : i + per] for i in range(0, len(positions), per)]
        return list(self._loader)

    def fetch(self, idx: Tensor, device: torch.device) -> Tensor:
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
