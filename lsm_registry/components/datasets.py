"""Data set factories (kind ``dataset``). Readers live in lsm_registry.data.

Every file-backed set shares :class:`LTParams` (root, profile, imbalance_factor,
n_max, split_seed): the long-tailed training subset is cut from the full training
split with the reference code's per-class seeded shuffle
(:func:`lsm_registry.data.profiles.lt_subset`); test splits stay balanced. The sets
without their own validation files (CIFAR, Fashion-MNIST, class folders) add
``val_per_class`` (:class:`HoldOutParams`): a balanced validation split held out of
the full training split before the cut (:func:`lsm_registry.data.profiles.hold_out`).
File-backed splits (``imagenet-lt``, ``inat2018``, ``imagefolder-lt`` with
``storage = "files"``) crop while decoding (``augment = "decoded"``). Layouts, paths and
preprocessing: docs/data.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import attrs
import torch

from ..data.cifar import CIFAR_MEAN, CIFAR_STD, LAYOUTS, load_cifar
from ..data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from ..data.fashion_mnist import PAD as FMNIST_PAD
from ..data.folders import channel_stats, decode_images, scan_tree
from ..data.profiles import hold_out, lt_counts, lt_subset
from ..data.split_files import FileSplit, read_split_file
from ..data.synthetic import VERSIONS, class_name, max_classes, render_split
from ..data.transforms import default_resize
from ..interfaces import DatasetFactory, LTData, Split, TensorSplit
from ..memory import check_fits_in_memory
from ..params import at_least, non_negative, one_of, param, positive

#: Seed stream of synthetic-lt's validation split (train uses 2 * seed, test 2 * seed + 1).
SYNTHETIC_VAL_SEED = 1 << 32


class SyntheticLT(DatasetFactory):
    """Embedded long-tailed set of drawn objects on clutter, generated from a seed (no files)."""

    name = "synthetic-lt"

    @attrs.frozen
    class Params:
        num_classes: int = param(10, help="number of classes", validator=at_least(2))
        n_max: int = param(500, help="training images of the largest class", validator=positive)
        imbalance_factor: float = param(100.0, help="n_max / n_min", validator=at_least(1))
        profile: Literal["exp", "step", "none"] = param("exp", help="long-tailed profile of the train split")
        test_per_class: int = param(100, help="balanced test images per class", validator=positive)
        seed: int = param(0, help="generator seed (independent of the run seed)")
        val_per_class: int = param(
            0,
            help="balanced validation images per class, drawn like the test split from another seed stream (0: no validation split)",
            validator=non_negative,
        )
        version: int = param(
            1,
            help="generator version: 1 gives each class its own colour; 2 draws the colour per image, "
            "so a class is its shape and texture only; 3 shows the class's colour on half of the images, "
            "a random one on the others (docs/data.md)",
            validator=one_of(*VERSIONS),
        )

    def test_view(self) -> list[dict[str, Any]]:
        return []  # drawn at 32x32, used as drawn

    def build(self) -> LTData:
        p = self.params
        if p.num_classes > max_classes(p.version):
            raise ValueError(
                f"num_classes {p.num_classes}: version {p.version} draws at most {max_classes(p.version)} distinct classes"
            )
        counts = lt_counts(p.profile, p.n_max, p.imbalance_factor, p.num_classes)
        check_fits_in_memory(
            3 * 32 * 32 * (sum(counts) + (p.test_per_class + p.val_per_class) * p.num_classes), "synthetic-lt"
        )
        if min(counts) < 1:
            raise ValueError(f"n_max {p.n_max} with imbalance_factor {p.imbalance_factor} leaves a class with no image")
        train_x, train_y = render_split(counts, seed=2 * p.seed, version=p.version)
        test_x, test_y = render_split([p.test_per_class] * p.num_classes, seed=2 * p.seed + 1, version=p.version)
        val: Optional[Split] = None
        if p.val_per_class > 0:
            val = TensorSplit(
                *render_split([p.val_per_class] * p.num_classes, seed=SYNTHETIC_VAL_SEED + p.seed, version=p.version)
            )
        mean = tuple(float(m) for m in train_x.float().mean(dim=(0, 2, 3)) / 255.0)
        std = tuple(float(s) for s in train_x.float().std(dim=(0, 2, 3)) / 255.0)
        return LTData(
            train=TensorSplit(train_x, train_y),
            test=TensorSplit(test_x, test_y),
            class_names=tuple(class_name(c) for c in range(p.num_classes)),
            mean=mean,
            std=std,
            image_size=(3, 32, 32),
            augment="crop32",
            val=val,
        )


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@attrs.frozen
class LTParams:
    root: Optional[str] = param(None, help="folder holding the data set files (see docs/data.md)")
    profile: Literal["exp", "step", "none"] = param("exp", help="long-tailed profile cut from the training split")
    imbalance_factor: float = param(100.0, help="n_max / n_min of the profile", validator=at_least(1))
    n_max: Optional[int] = param(
        None, help="images kept of the first class (default: the set's natural count)", validator=positive
    )
    split_seed: int = param(0, help="seed of the per-class shuffle that picks the kept images")


def _cut(p: LTParams, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return lt_subset(labels, num_classes, p.profile, p.n_max, p.imbalance_factor, p.split_seed)


@attrs.frozen
class HoldOutParams(LTParams):
    val_per_class: int = param(
        0,
        help="images per class held out of the full training split, before the long-tailed cut, as a balanced validation split (0: none)",
        validator=non_negative,
    )


def _hold_out_and_cut(
    p: HoldOutParams, labels: torch.Tensor, names: tuple[str, ...], dataset: str
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(validation indices or None, training indices) into the full training split.

    ``val_per_class`` images per class are held out first (:func:`hold_out`, seeded by
    ``split_seed``); the long-tailed cut then runs on the rest, with ``n_max`` clamped to
    the largest class left. ``val_per_class = 0`` is the plain cut.
    """
    if p.val_per_class == 0:
        return None, _cut(p, labels, len(names))
    val_idx, rest = hold_out(
        labels, p.val_per_class, p.split_seed, num_classes=len(names), class_names=names, dataset=dataset
    )
    left = labels[rest]
    largest = int(torch.bincount(left, minlength=len(names)).max())
    n_max = largest if p.n_max is None else min(p.n_max, largest)
    if p.profile == "none" and p.n_max is None:
        n_max = None  # keep every image left, in order
    keep = lt_subset(left, len(names), p.profile, n_max, p.imbalance_factor, p.split_seed)
    return val_idx, rest[keep]


def file_test_view(size: int, resize: Optional[int]) -> list[dict[str, Any]]:
    """The file-backed test view (data.transforms.eval_view): shorter side, then a center crop."""
    return [
        {
            "op": "resize_shorter_side",
            "size": resize or default_resize(size),
            "interpolation": "bilinear",
            "antialias": True,
        },
        {"op": "center_crop", "size": [size, size]},
    ]


class _Cifar(DatasetFactory):
    which = ""

    @attrs.frozen
    class Params(HoldOutParams):
        download: bool = param(False, help="download the archive into root with torchvision when it is missing")

    def test_view(self) -> list[dict[str, Any]]:
        return []  # the batches hold 32x32 images

    def build(self) -> LTData:

        p = self.params
        root = Path(p.root if p.root is not None else f"data/{self.which}")
        train_x, train_y, test_x, test_y, names = load_cifar(self.which, root, p.download)
        val_idx, keep = _hold_out_and_cut(p, train_y, names, f"{root}: {LAYOUTS[self.which]['title']} training split")
        return LTData(
            train=TensorSplit(train_x[keep], train_y[keep]),
            test=TensorSplit(test_x, test_y),
            class_names=names,
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
            image_size=(3, 32, 32),
            augment="crop32",
            val=TensorSplit(train_x[val_idx], train_y[val_idx]) if val_idx is not None else None,
        )


class Cifar10LT(_Cifar):
    """CIFAR-10-LT: the CIFAR-10 python batches, training split cut to a long-tailed profile."""

    name = "cifar10-lt"
    which = "cifar10"


class Cifar100LT(_Cifar):
    """CIFAR-100-LT: the CIFAR-100 python batches, training split cut to a long-tailed profile."""

    name = "cifar100-lt"
    which = "cifar100"


class FashionMnistLT(DatasetFactory):
    """Fashion-MNIST-LT: the four IDX files, 28x28 grey zero-padded to 32x32, long-tailed train split."""

    name = "fashion-mnist-lt"

    Params = HoldOutParams

    def test_view(self) -> list[dict[str, Any]]:
        return [{"op": "pad", "pixels": FMNIST_PAD, "value": 0}]

    def build(self) -> LTData:

        p = self.params
        train_x, train_y, test_x, test_y = load_fashion_mnist(p.root)
        val_idx, keep = _hold_out_and_cut(p, train_y, CLASS_NAMES, "Fashion-MNIST training split")
        val = TensorSplit(train_x[val_idx], train_y[val_idx]) if val_idx is not None else None
        train_x, train_y = train_x[keep], train_y[keep]
        mean, std = channel_stats(train_x)
        return LTData(
            train=TensorSplit(train_x, train_y),
            test=TensorSplit(test_x, test_y),
            class_names=CLASS_NAMES,
            mean=mean,
            std=std,
            image_size=(1, 32, 32),
            augment="crop32",
            val=val,
        )


class ImageFolderLT(DatasetFactory):
    """Any class-folder tree (root/train/<class>/*, root/test or val/<class>/*), in memory or decoded per batch."""

    name = "imagefolder-lt"

    @attrs.frozen
    class Params(HoldOutParams):
        image_size: int = param(
            32,
            help="memory: images are resized to image_size x image_size when decoded; files: the crop side",
            validator=at_least(8),
        )
        workers: int = param(
            4,
            help="decoding threads (memory) or worker processes (files; 0: in the training process)",
            validator=non_negative,
        )
        storage: Literal["memory", "files"] = param(
            "memory",
            help="memory: decode the tree once, squashed to image_size, augment on the device; files: decode per batch with the standard ImageNet views (docs/data.md), for trees that do not fit in memory",
        )
        test_resize: Optional[int] = param(
            None,
            help="files: the test view's shorter side before the center crop (default: image_size * 256 / 224)",
            validator=positive,
        )
        prefetch: int = param(2, help="files: training steps decoded ahead per worker", validator=positive)
        worker_priority: Literal["normal", "idle"] = param(
            "normal",
            help="files: idle runs the decoding workers under Linux's SCHED_IDLE, so the training process never waits for a core (docs/data.md)",
        )

    def test_view(self) -> list[dict[str, Any]]:
        p = self.params
        if p.storage == "files":
            return file_test_view(p.image_size, p.test_resize)
        # decode_images: PIL's bilinear resize of the whole image, aspect ratio not kept.
        return [
            {
                "op": "resize",
                "size": [p.image_size, p.image_size],
                "interpolation": "bilinear",
                "keep_aspect_ratio": False,
            }
        ]

    def build(self) -> LTData:

        p = self.params
        if p.root is None:
            raise ValueError("root is not set; expected root/train/<class>/* and root/test/<class>/* (or val/)")
        names, train_files, train_y, test_files, test_y = scan_tree(Path(p.root))
        val_idx, keep = _hold_out_and_cut(p, train_y, names, str(Path(p.root) / "train"))
        if p.storage == "files":
            return self._file_backed(names, train_files, train_y, test_files, test_y, val_idx, keep)
        files_only = [
            key
            for key, unset in (
                ("test_resize", p.test_resize is None),
                ("prefetch", p.prefetch == 2),
                ("worker_priority", p.worker_priority == "normal"),
            )
            if not unset
        ]
        if files_only:
            raise ValueError(
                f'{", ".join(files_only)} applies to storage = "files" only (the memory storage decodes once, '
                "with threads, and augments on the device)"
            )
        train_x = decode_images([train_files[i] for i in keep.tolist()], p.image_size, p.workers)
        test_x = decode_images(test_files, p.image_size, p.workers)
        val: Optional[Split] = None
        if val_idx is not None:
            val = TensorSplit(
                decode_images([train_files[i] for i in val_idx.tolist()], p.image_size, p.workers), train_y[val_idx]
            )
        mean, std = channel_stats(train_x)
        return LTData(
            train=TensorSplit(train_x, train_y[keep]),
            test=TensorSplit(test_x, test_y),
            class_names=names,
            mean=mean,
            std=std,
            image_size=(3, p.image_size, p.image_size),
            augment="crop32" if p.image_size == 32 else "rrc",
            val=val,
        )

    def _file_backed(self, names, train_files, train_y, test_files, test_y, val_idx, keep) -> LTData:
        """The tree as split files would give it: nothing decoded now, ImageNet statistics
        (computing the tree's own would mean decoding it all)."""
        p = self.params

        def split(files, labels) -> FileSplit:
            return FileSplit(
                Path("."),
                [str(f) for f in files],
                labels,
                p.image_size,
                p.workers,
                p.test_resize,
                p.prefetch,
                p.worker_priority,
            )

        val = split([train_files[i] for i in val_idx.tolist()], train_y[val_idx]) if val_idx is not None else None
        return LTData(
            train=split([train_files[i] for i in keep.tolist()], train_y[keep]),
            test=split(test_files, test_y),
            class_names=names,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            image_size=(3, p.image_size, p.image_size),
            augment="decoded",
            val=val,
        )


class _SplitFiles(DatasetFactory):
    default_train = ""
    default_test = ""
    title = ""

    def test_view(self) -> list[dict[str, Any]]:
        return file_test_view(self.params.image_size, self.params.test_resize)

    def build(self) -> LTData:

        p = self.params
        if p.root is None:
            raise ValueError(f"root is not set; expected {self.default_train} and {self.default_test} under it")
        root = Path(p.root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"{root}: no such folder; expected {p.train_file}, {p.test_file} and the images they list there"
            )
        image_root = Path(p.image_root) if p.image_root is not None else root
        train_paths, train_y = read_split_file(root / p.train_file, p.num_classes)
        num_classes = p.num_classes if p.num_classes is not None else int(train_y.max()) + 1
        test_paths, test_y = read_split_file(root / p.test_file, num_classes)
        first = image_root / train_paths[0]
        if not first.is_file():
            raise FileNotFoundError(
                f"{first}: image listed first in {root / p.train_file} not found (image_root is {image_root})"
            )
        keep = _cut(p, train_y, num_classes)
        train: Split = FileSplit(
            image_root,
            [train_paths[i] for i in keep.tolist()],
            train_y[keep],
            p.image_size,
            p.workers,
            p.test_resize,
            p.prefetch,
            p.worker_priority,
        )
        test: Split = FileSplit(
            image_root, test_paths, test_y, p.image_size, p.workers, p.test_resize, p.prefetch, p.worker_priority
        )
        return LTData(
            train=train,
            test=test,
            class_names=tuple(str(c) for c in range(num_classes)),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            image_size=(3, p.image_size, p.image_size),
            augment="decoded",
        )


@attrs.frozen
class SplitFileParams(LTParams):
    profile: Literal["exp", "step", "none"] = param(
        "none", help="extra long-tailed cut on top of the split file (none: use it as is)"
    )
    imbalance_factor: float = param(
        1.0, help="n_max / n_min of the extra cut (with profile exp or step)", validator=at_least(1)
    )
    image_root: Optional[str] = param(None, help="folder the listed paths are relative to (default: root)")
    num_classes: Optional[int] = param(
        None, help="number of classes (default: largest train label + 1)", validator=positive
    )
    image_size: int = param(
        224, help="crop side: RandomResizedCrop(image_size) for training, center crop for test", validator=at_least(8)
    )
    test_resize: Optional[int] = param(
        None,
        help="the test view's shorter side before the center crop (default: image_size * 256 / 224, i.e. 256)",
        validator=positive,
    )
    workers: int = param(
        4, help="decoding worker processes (0: decode in the training process)", validator=non_negative
    )
    prefetch: int = param(2, help="training steps decoded ahead per worker", validator=positive)
    worker_priority: Literal["normal", "idle"] = param(
        "normal",
        help="idle runs the decoding workers under Linux's SCHED_IDLE, so the training process never waits for a core (docs/data.md)",
    )


class ImageNetLT(_SplitFiles):
    """ImageNet-LT (Liu et al. 2019): split files of 'path label' lines over the ImageNet images."""

    name = "imagenet-lt"
    default_train = "ImageNet_LT_train.txt"
    default_test = "ImageNet_LT_test.txt"

    @attrs.frozen
    class Params(SplitFileParams):
        train_file: str = param("ImageNet_LT_train.txt", help="training split file, relative to root")
        test_file: str = param("ImageNet_LT_test.txt", help="test split file, relative to root")


class INaturalist2018(_SplitFiles):
    """iNaturalist 2018: split files of 'path label' lines over the iNat images (test = the val split)."""

    name = "inat2018"
    default_train = "iNaturalist18_train.txt"
    default_test = "iNaturalist18_val.txt"

    @attrs.frozen
    class Params(SplitFileParams):
        train_file: str = param("iNaturalist18_train.txt", help="training split file, relative to root")
        test_file: str = param("iNaturalist18_val.txt", help="validation split file (used as test), relative to root")


COMPONENTS = [SyntheticLT, Cifar10LT, Cifar100LT, FashionMnistLT, ImageFolderLT, ImageNetLT, INaturalist2018]
