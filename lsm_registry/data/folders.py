"""Class-folder trees (``root/train/<class>/*``, ``root/test/<class>/*`` or ``root/val/...``)
and the one image decoder shared with the split-file sets.

Every image is decoded with PIL (any format it reads), converted to RGB and resized
to a square ``size x size`` (aspect ratio not kept: the batched augmentation crops
later). A file PIL cannot read raises ValueError naming it. Decoding a tree of
PROGRESS_MIN_IMAGES images or more shows a transient progress bar on stderr (one
plain line instead when stderr is not a terminal; only on rank 0 under torchrun).
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor

TEST_FOLDERS = ("test", "val")
PROGRESS_MIN_IMAGES = 256  # below this, decoding is quick enough to stay silent


def load_image(path: str | Path, size: int) -> Tensor:
    """uint8 (3, size, size)."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when that suffices
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # DecompressionBombError: more pixels than PIL.Image.MAX_IMAGE_PIXELS allows (twice
        # its limit), a file that would exhaust memory if decoded.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, FileNotFoundError):
            reason = "no such file"
        raise ValueError(f"{path}: cannot read image ({reason})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _progress_console():
    """Where the decoding progress goes (a function, so tests can capture it)."""
    return Console(stderr=True)


@contextlib.contextmanager
def decode_progress(total: int, size: int) -> Iterator[Callable[[], None]]:
    """A callable to call once per decoded image: a transient rich bar on a terminal,
    one plain line otherwise, nothing for small sets or on ranks other than 0."""
    if total < PROGRESS_MIN_IMAGES or os.environ.get("RANK", "0").strip() not in ("", "0"):
        yield lambda: None
        return
    console = _progress_console()
    what = f"decoding {total} images to {size}x{size}"
    if not console.is_terminal:
        console.print(f"{what} ...", highlight=False, soft_wrap=True)
        yield lambda: None
        return
    with Progress(
        TextColumn(f"[bold]{what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("decode", total=total)
        yield lambda: progress.advance(task)


def decode_images(paths: Sequence[str | Path], size: int, workers: int = 4) -> Tensor:
    """uint8 (N, 3, size, size); PIL releases the GIL while decoding, so threads run in parallel."""
    if not paths:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    images: list[Tensor] = []
    with decode_progress(len(paths), size) as tick:
        if workers <= 1 or len(paths) < 8:
            for p in paths:
                images.append(load_image(p, size))
                tick()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for image in pool.map(lambda p: load_image(p, size), paths):  # in order of ``paths``
                    images.append(image)
                    tick()
    return torch.stack(images)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def scan_tree(root: Path) -> tuple[tuple[str, ...], list[Path], Tensor, list[Path], Tensor]:
    """(class names, train files, train labels, test files, test labels); classes sorted by name."""
    train_dir = root / "train"
    test_dir = next((root / t for t in TEST_FOLDERS if (root / t).is_dir()), None)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: no such folder; expected {root}/train/<class>/* and {root}/test/<class>/* (or val/)"
        )
    if not train_dir.is_dir() or test_dir is None:
        missing = "train/" if not train_dir.is_dir() else "test/ (or val/)"
        raise FileNotFoundError(
            f"{root}: no {missing} folder; expected {root}/train/<class>/* and {root}/test/<class>/* (or val/)"
        )
    classes = tuple(sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise ValueError(f"{train_dir}: no class folders; expected {train_dir}/<class>/<image files>")
    for name in classes:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes, kept by the file system's surrogateescape
            # Class names go into per_class.csv, summary.json and the report: they must be text.
            raise ValueError(f"{train_dir}: class folder {os.fsencode(name)!r} is not valid UTF-8; rename it") from None
    extra = sorted(
        p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in classes
    )
    if extra:
        raise ValueError(
            f"{test_dir / extra[0]}: class folder not in {train_dir} (test classes must be training classes)"
        )
    splits = []
    for split_dir in (train_dir, test_dir):
        files, labels = [], []
        for c, name in enumerate(classes):
            folder = split_dir / name
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: missing class folder (every class in {train_dir} needs one here)")
            found = _files(folder)
            if not found:
                raise ValueError(f"{folder}: empty class folder (no image files)")
            files.extend(found)
            labels.extend([c] * len(found))
        splits.append((files, torch.tensor(labels, dtype=torch.int64)))
    (train_files, train_labels), (test_files, test_labels) = splits
    return classes, train_files, train_labels, test_files, test_labels


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, ch, H, W) images, in [0, 1] units."""
    ch = images.shape[1]
    total = torch.zeros(ch, dtype=torch.float64)
    total_sq = torch.zeros(ch, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / max(n, 1)
    std = (total_sq / max(n, 1) - mean * mean).clamp(min=0).sqrt().clamp(min=1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
