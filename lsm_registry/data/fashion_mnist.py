"""Fashion-MNIST from its four IDX files, read with gzip + numpy (no download).

IDX: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions,
then each dimension as a big-endian uint32, then the data. The 28x28 grey images
are zero-padded by 2 pixels on each side to 32x32, so that CIFAR models, the crop32
augmentation and a 4-pixel patch grid apply unchanged.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
#: Folders searched, in order, when the recipe gives no root (relative to the working directory).
DEFAULT_ROOTS = ("data/fashion-mnist",)
#: How to get the files, for the error of a missing folder (docs/data.md says the same at length).
HOW_TO_GET = (
    "get them with Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist puts them in "
    "/usr/share/datasets/fashion-mnist) or, with internet, torchvision.datasets.FashionMNIST(DOWNLOAD_DIR, download=True) "
    "(they land in DOWNLOAD_DIR/FashionMNIST/raw), then --set data.root=FASHION_MNIST_DIR, the folder holding them "
    "(docs/data.md)"
)
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PAD = 2


def read_idx(path: Path) -> Tensor:
    """An IDX file of unsigned bytes (gzipped when the name ends in .gz) as a uint8 tensor."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header truncated")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = int(np.prod(dims)) if dims else 1
    if len(data) - header != size:
        raise ValueError(f"{path}: IDX dimensions {dims} need {size} bytes of data, found {len(data) - header}")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy())


def find_folder(root: Optional[str]) -> Path:
    candidates = [Path(root)] if root is not None else [Path(r) for r in DEFAULT_ROOTS]
    for folder in candidates:
        if all((folder / name).is_file() for name in FILES.values()):
            return folder
    looked = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {looked}; expected the four IDX files {', '.join(FILES.values())}; {HOW_TO_GET}"
    )


def _pair(folder: Path, images: str, labels: str) -> tuple[Tensor, Tensor]:
    x, y = read_idx(folder / FILES[images]), read_idx(folder / FILES[labels])
    if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{folder / FILES[images]}: expected (N, 28, 28) images and N labels in {FILES[labels]} "
            f"(got {tuple(x.shape)} and {tuple(y.shape)})"
        )
    bad = (y >= len(CLASS_NAMES)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"{folder / FILES[labels]}: label {int(y[i])} of item {i} out of range 0..{len(CLASS_NAMES) - 1}"
        )
    return F.pad(x.unsqueeze(1), (PAD, PAD, PAD, PAD)), y.to(torch.int64)


def load_fashion_mnist(root: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, test images, test labels); images uint8 (N, 1, 32, 32)."""
    folder = find_folder(root)
    train_x, train_y = _pair(folder, "train_images", "train_labels")
    test_x, test_y = _pair(folder, "test_images", "test_labels")
    return train_x, train_y, test_x, test_y
