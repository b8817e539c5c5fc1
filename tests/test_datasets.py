"""Data sets from tiny files the tests write themselves, in every supported layout."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lsm_registry.components.datasets import (
    Cifar10LT,
    Cifar100LT,
    FashionMnistLT,
    ImageFolderLT,
    ImageNetLT,
    INaturalist2018,
)
from lsm_registry.data.profiles import lt_counts, lt_subset
from lsm_registry.errors import DataError
from lsm_registry.interfaces import Context

CTX = Context(class_counts=(), image_size=(0, 0, 0))


def build(cls, **params):
    return cls(cls.Params(**params), CTX).build()


def one_line_error(exc_type, cls, **params) -> str:
    with pytest.raises(exc_type) as info:
        build(cls, **params)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# ------------------------------------------------------------------ long-tailed totals


@pytest.mark.parametrize(
    "classes,n_max,totals",
    [(10, 5000, {100: 12406, 50: 13996, 10: 20431}), (100, 500, {100: 10847, 50: 12608, 10: 19573})],
)
def test_cifar_lt_totals_from_labels(classes, n_max, totals):
    labels = torch.arange(classes).repeat_interleave(n_max)
    for factor, total in totals.items():
        keep = lt_subset(labels, classes, "exp", None, float(factor), 0)
        assert keep.numel() == total
        counts = torch.bincount(labels[keep], minlength=classes).tolist()
        assert counts == lt_counts("exp", n_max, factor, classes)
        assert counts[0] == n_max and counts[-1] == int(n_max / factor)


def test_split_seed_changes_the_images_not_the_counts():
    labels = torch.arange(5).repeat(40)
    a = lt_subset(labels, 5, "exp", None, 10.0, 0)
    b = lt_subset(labels, 5, "exp", None, 10.0, 1)
    assert torch.equal(a, lt_subset(labels, 5, "exp", None, 10.0, 0))
    assert torch.equal(torch.bincount(labels[a]), torch.bincount(labels[b]))
    assert not torch.equal(torch.sort(a).values, torch.sort(b).values)


def test_step_profile_and_none():
    assert lt_counts("step", 100, 10, 4) == [100, 100, 10, 10]
    labels = torch.arange(3).repeat(7)
    assert torch.equal(lt_subset(labels, 3, "none", None, 1.0), torch.arange(21))


def test_imbalance_factor_below_one_is_a_recipe_error():
    from lsm_registry.errors import RecipeError
    from lsm_registry.plugins import build_registry
    from lsm_registry.recipe import validate

    raw = {"data": {"name": "cifar10-lt", "imbalance_factor": 0.5}}
    with pytest.raises(RecipeError) as info:
        validate(raw, "r.toml", build_registry(entry_points=False))
    assert info.value.lines == ["r.toml [data].imbalance_factor: must be >= 1 (got 0.5)"]


# ------------------------------------------------------------------ Fashion-MNIST (IDX)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def fashion_tree(root: Path, per_class: int = 3) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class)
    images = rng.integers(1, 256, size=(labels.size, 28, 28), dtype=np.uint8)
    write_idx(root / "train-images-idx3-ubyte.gz", images)
    write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    write_idx(root / "t10k-images-idx3-ubyte.gz", images[::per_class])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels[::per_class])
    return images, labels


def test_fashion_mnist_reads_idx_and_pads(tmp_path):
    images, labels = fashion_tree(tmp_path)
    data = build(FashionMnistLT, root=str(tmp_path), profile="exp", imbalance_factor=3.0)
    assert data.image_size == (1, 32, 32) and data.augment == "crop32"
    assert data.class_counts() == tuple(lt_counts("exp", 3, 3.0, 10))
    assert data.class_names[0] == "T-shirt/top" and len(data.class_names) == 10
    x = data.test.images
    assert x.shape == (10, 1, 32, 32)
    assert torch.equal(x[:, 0, 2:30, 2:30], torch.from_numpy(images[::3]))
    assert (
        x[:, :, :2].sum() == 0 and x[:, :, 30:].sum() == 0 and x[:, :, :, :2].sum() == 0 and x[:, :, :, 30:].sum() == 0
    )
    assert data.test.labels.tolist() == list(range(10))
    train = data.train.images.double() / 255
    assert data.mean[0] == pytest.approx(train.mean().item(), rel=1e-6)
    assert data.std[0] == pytest.approx(train.std(unbiased=False).item(), rel=1e-5)


def test_fashion_mnist_missing_folder(tmp_path):
    msg = one_line_error(FileNotFoundError, FashionMnistLT, root=str(tmp_path / "nowhere"))
    assert (
        str(tmp_path / "nowhere") in msg and "train-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    )


def test_fashion_mnist_bad_idx_names_the_file(tmp_path):
    fashion_tree(tmp_path)
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(b"\x08\x03\x00\x01junk")
    msg = one_line_error(ValueError, FashionMnistLT, root=str(tmp_path))
    assert "train-labels-idx1-ubyte.gz" in msg and "magic" in msg


def test_fashion_mnist_label_out_of_range(tmp_path):
    fashion_tree(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 12]))
    msg = one_line_error(ValueError, FashionMnistLT, root=str(tmp_path))
    assert "t10k-labels-idx1-ubyte.gz" in msg and "label 12" in msg and "out of range" in msg


# ------------------------------------------------------------------ CIFAR python batches


def write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def cifar_tree(root: Path, which: str, per_batch: int = 4) -> np.ndarray:
    rng = np.random.default_rng(1)
    if which == "cifar10":
        folder, train, test, meta, key, names_key, classes = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            "batches.meta",
            b"labels",
            b"label_names",
            10,
        )
    else:
        folder, train, test, meta, key, names_key, classes = (
            root / "cifar-100-python",
            ["train"],
            "test",
            "meta",
            b"fine_labels",
            b"fine_label_names",
            100,
        )
    folder.mkdir(parents=True)
    first = None
    for i, name in enumerate(train + [test]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(i * per_batch + j) % classes for j in range(per_batch)]
        write_pickle(folder / name, {b"data": data, key: labels, b"batch_label": b"x"})
        first = data if first is None else first
    write_pickle(folder / meta, {names_key: [f"class{c}".encode() for c in range(classes)]})
    return first


def test_cifar10_batches(tmp_path):
    first = cifar_tree(tmp_path, "cifar10")
    data = build(Cifar10LT, root=str(tmp_path), profile="none")
    assert len(data.train) == 20 and len(data.test) == 4
    assert data.class_names[3] == "class3" and data.num_classes == 10
    assert data.image_size == (3, 32, 32) and data.augment == "crop32"
    assert data.train.images.dtype == torch.uint8
    # Rows are channel-major: 1024 red values, then green, then blue.
    x = data.train.images[0]
    assert x[0, 0, 5] == first[0, 5] and x[1, 0, 0] == first[0, 1024] and x[2, 31, 31] == first[0, 3071]
    assert data.train.labels[:4].tolist() == [0, 1, 2, 3]
    assert data.mean == pytest.approx((0.4914, 0.4822, 0.4465))


def test_cifar100_batches_with_lt_cut(tmp_path):
    cifar_tree(tmp_path, "cifar100", per_batch=200)
    data = build(Cifar100LT, root=str(tmp_path), profile="exp", imbalance_factor=2.0, n_max=2)
    assert data.num_classes == 100
    assert data.class_counts() == tuple(lt_counts("exp", 2, 2.0, 100))
    assert len(data.test) == 200


def test_cifar_missing_names_folder_and_files(tmp_path):
    msg = one_line_error(FileNotFoundError, Cifar10LT, root=str(tmp_path / "c10"))
    assert str(tmp_path / "c10") in msg and "cifar-10-batches-py/data_batch_1" in msg and "test_batch" in msg
    msg = one_line_error(FileNotFoundError, Cifar100LT, root=str(tmp_path))
    assert "cifar-100-python/train" in msg and "cifar-100-python/test" in msg


def test_cifar_label_out_of_range_names_the_batch(tmp_path):
    cifar_tree(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_pickle(path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]})
    msg = one_line_error(ValueError, Cifar10LT, root=str(tmp_path), profile="none")
    assert str(path) in msg and "label 10" in msg and "out of range" in msg


# ------------------------------------------------------------------ class folders


def png(path: Path, colour, size=(10, 6)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def folder_tree(root: Path, test="test") -> None:
    colours = {"bird": (255, 0, 0), "ant": (0, 255, 0), "cat": (0, 0, 255)}
    counts = {"ant": 4, "bird": 3, "cat": 2}
    for name, n in counts.items():
        for i in range(n):
            png(root / "train" / name / f"{i}.png", colours[name])
        png(root / test / name / "t.png", colours[name], size=(5, 5))


def test_imagefolder_classes_sorted_resized_and_cut(tmp_path):
    folder_tree(tmp_path, test="val")
    data = build(ImageFolderLT, root=str(tmp_path), profile="exp", imbalance_factor=2.0, n_max=4, image_size=16)
    assert data.class_names == ("ant", "bird", "cat")
    assert data.class_counts() == (4, 2, 2)  # min(available, int(4 * 0.5 ** (i / 2)))
    assert data.image_size == (3, 16, 16) and data.augment == "rrc"
    assert data.train.images.shape == (8, 3, 16, 16) and data.test.images.shape == (3, 3, 16, 16)
    assert data.test.images[2, 2].float().mean() == 255 and data.test.images[2, 0].max() == 0  # cat is blue
    train = data.train.images.double() / 255
    assert data.mean == pytest.approx(tuple(train.mean(dim=(0, 2, 3)).tolist()), rel=1e-6)
    assert build(ImageFolderLT, root=str(tmp_path), profile="none").augment == "crop32"


def test_imagefolder_missing_root(tmp_path):
    msg = one_line_error(FileNotFoundError, ImageFolderLT, root=str(tmp_path / "absent"))
    assert str(tmp_path / "absent") in msg and "train/<class>" in msg


def test_imagefolder_empty_class_folder(tmp_path):
    folder_tree(tmp_path)
    (tmp_path / "train" / "dog").mkdir()
    msg = one_line_error(ValueError, ImageFolderLT, root=str(tmp_path))
    assert str(tmp_path / "train" / "dog") in msg and "empty" in msg


def test_imagefolder_unreadable_image(tmp_path):
    folder_tree(tmp_path)
    bad = tmp_path / "test" / "bird" / "broken.png"
    bad.write_bytes(b"not a png at all")
    msg = one_line_error(ValueError, ImageFolderLT, root=str(tmp_path), profile="none", workers=0)
    assert str(bad) in msg and "cannot read image" in msg


# ------------------------------------------------------------------ split files


def split_tree(root: Path, n: int = 20, classes: int = 4) -> list[int]:
    labels = [i % classes for i in range(n)]
    lines = []
    for i, y in enumerate(labels):
        png(root / "imgs" / f"c{y}" / f"{i}.png", (i * 10 % 256, y * 60, 7), size=(9, 7))
        lines.append(f"imgs/c{y}/{i}.png {y}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(lines) + "\n")
    (root / "ImageNet_LT_test.txt").write_text("\n".join(lines[:classes]) + "\n")
    return labels


def test_split_files_fetch_in_process_and_with_workers(tmp_path):
    labels = split_tree(tmp_path)
    serial = build(ImageNetLT, root=str(tmp_path), image_size=16, workers=0)
    assert serial.num_classes == 4 and serial.image_size == (3, 16, 16) and serial.augment == "decoded"
    assert serial.train.labels.tolist() == labels and len(serial.test) == 4
    assert serial.mean == (0.485, 0.456, 0.406)
    idx = torch.arange(20).flip(0)
    x = serial.train.fetch(idx, torch.device("cpu"))
    assert x.shape == (20, 3, 16, 16) and x.dtype == torch.uint8
    assert x[0, 1].float().mean() == pytest.approx(labels[19] * 60, abs=1)
    parallel = build(ImageNetLT, root=str(tmp_path), image_size=16, workers=2)
    assert torch.equal(parallel.train.fetch(idx, torch.device("cpu")), x)
    assert torch.equal(parallel.train.fetch(idx[:3], torch.device("cpu")), x[:3])


def test_inat_defaults_and_missing_root(tmp_path):
    assert INaturalist2018.Params().train_file == "iNaturalist18_train.txt"
    assert INaturalist2018.Params().test_file == "iNaturalist18_val.txt"
    msg = one_line_error(FileNotFoundError, INaturalist2018, root=str(tmp_path / "inat"))
    assert str(tmp_path / "inat") in msg and "iNaturalist18_train.txt" in msg


def test_split_file_label_out_of_range_names_file_and_line(tmp_path):
    split_tree(tmp_path)
    test_file = tmp_path / "ImageNet_LT_test.txt"
    test_file.write_text("imgs/c0/0.png 0\nimgs/c1/1.png 4\n")
    msg = one_line_error(ValueError, ImageNetLT, root=str(tmp_path))
    assert f"{test_file}:2:" in msg and "label 4 out of range 0..3" in msg


def test_split_file_malformed_line(tmp_path):
    split_tree(tmp_path)
    train_file = tmp_path / "ImageNet_LT_train.txt"
    train_file.write_text("imgs/c0/0.png 0\n\nimgs/c1/1.png\n")
    msg = one_line_error(ValueError, ImageNetLT, root=str(tmp_path))
    assert f"{train_file}:3:" in msg


def test_split_file_unreadable_image_at_fetch(tmp_path):
    split_tree(tmp_path)
    bad = tmp_path / "imgs" / "c1" / "5.png"
    bad.write_bytes(b"garbage")
    data = build(ImageNetLT, root=str(tmp_path), image_size=8, workers=0)
    with pytest.raises(DataError) as info:
        data.train.fetch(torch.tensor([4, 5, 6]), torch.device("cpu"))
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_decoding_a_large_tree_shows_progress_without_changing_the_images(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from lsm_registry.data import folders

    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.png")
        png(paths[-1], (20 * i, 255 - 20 * i, 7), size=(9, 5))
    quiet = folders.decode_images(paths, 8, workers=0)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(folders, "PROGRESS_MIN_IMAGES", 10)
    for workers in (0, 3):  # in-process and with the thread pool
        out = io.StringIO()
        monkeypatch.setattr(
            folders, "_progress_console", lambda out=out: Console(file=out, force_terminal=True, width=100)
        )
        assert torch.equal(folders.decode_images(paths, 8, workers=workers), quiet)
        shown = out.getvalue()
        assert "decoding 12 images to 8x8" in shown and "12/12" in shown  # the bar, ticked once per image


def test_decoding_progress_is_one_line_in_a_log_and_silent_for_small_sets(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from lsm_registry.data import folders

    paths = [tmp_path / f"{i}.png" for i in range(10)]
    for p in paths:
        png(p, (1, 2, 3))
    out = io.StringIO()
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.setattr(folders, "_progress_console", lambda: Console(file=out))
    folders.decode_images(paths, 8, workers=2)
    assert out.getvalue() == ""  # below PROGRESS_MIN_IMAGES
    monkeypatch.setattr(folders, "PROGRESS_MIN_IMAGES", 10)
    folders.decode_images(paths, 8, workers=2)
    assert out.getvalue() == "decoding 10 images to 8x8 ...\n"
    monkeypatch.setenv("RANK", "1")  # other torchrun ranks stay quiet
    folders.decode_images(paths, 8, workers=2)
    assert out.getvalue() == "decoding 10 images to 8x8 ...\n"


class _Payload:
    """Unpickling this would create a file: what a crafted 'data batch' could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    cifar_tree(tmp_path, "cifar10")
    marker = tmp_path / "ran"
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    write_pickle(path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2], b"x": _Payload(marker)})
    msg = one_line_error(ValueError, Cifar10LT, root=str(tmp_path), profile="none")
    assert not marker.exists()
    assert str(path) in msg and "refused global pathlib" in msg


def test_real_cifar_batches_need_only_numpy_arrays(tmp_path):
    """The batches the test tree writes hold numpy arrays, which the data unpickler admits."""
    cifar_tree(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    write_pickle(path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": np.array([1, 2])})
    data = build(Cifar10LT, root=str(tmp_path), profile="none")
    assert len(data.train) == 18


def test_a_decompression_bomb_is_one_line_naming_the_image(tmp_path, monkeypatch):
    from PIL import Image

    folder_tree(tmp_path)
    bomb = tmp_path / "train" / "ant" / "huge.png"
    png(bomb, (1, 2, 3), size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels is more than twice the limit
    msg = one_line_error(ValueError, ImageFolderLT, root=str(tmp_path), workers=0)
    assert str(bomb) in msg and "cannot read image" in msg


def test_a_class_folder_name_that_is_not_utf8_is_one_line(tmp_path):
    import os

    folder_tree(tmp_path)
    bad = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: not UTF-8, kept as a surrogate escape
    for split in ("train", "test"):
        png(tmp_path / split / bad / "0.png", (9, 9, 9))
    msg = one_line_error(ValueError, ImageFolderLT, root=str(tmp_path), workers=0)
    assert "b'caf\\xe9'" in msg and "not valid UTF-8" in msg


SHARED_CIFAR_RUN = """
[run]
name = "shared"
epochs = 1
eval_every = 1

[data]
name = "cifar10-lt"
root = "{root}"
imbalance_factor = 1.0
profile = "none"

[model]
name = "resnet32"
width = 4

[optim]
batch_size = 8
warmup_epochs = 0

[loss]
name = "ce"
"""


def test_a_shared_run_folder_whose_data_would_run_code_runs_none(tmp_path):
    """A run folder handed on with crafted CIFAR batches beside it: evaluate, export and resume
    never run the batches' code (export reads the training facts from the checkpoint and builds no
    data at all; evaluate and resume refuse the batch in one line)."""
    from click.testing import CliRunner

    from lsm_registry.cli import cli

    run = tmp_path / "shared-run"
    data = tmp_path / "data"  # where the shared recipe.toml points
    cifar_tree(data, "cifar10")
    recipe = tmp_path / "r.toml"
    recipe.write_text(SHARED_CIFAR_RUN.format(root=data))
    runner = CliRunner()
    trained = runner.invoke(cli, ["run", str(recipe), "--out", str(run), "--no-progress"])
    assert trained.exit_code == 0, trained.output
    marker = tmp_path / "ran"
    batch = data / "cifar-10-batches-py" / "data_batch_2"
    write_pickle(batch, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2], b"x": _Payload(marker)})
    for args in (["evaluate", str(run)], ["resume", str(run), "--set", "run.epochs=2", "--no-progress"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert str(batch) in result.output and "refused global pathlib" in result.output, result.output
    exported = runner.invoke(cli, ["export", str(run), "--out", str(tmp_path / "export")])
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "export" / "model.json").read_text())["classes"][:2] == ["class0", "class1"]
    assert not marker.exists()
