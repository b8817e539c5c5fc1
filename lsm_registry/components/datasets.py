"""Data set factories (kind ``dataset``). Builders live in lsm_registry.data."""

from __future__ import annotations

from typing import Literal

import attrs

from ..data.profiles import lt_counts
from ..data.synthetic import class_name, render_split
from ..interfaces import DatasetFactory, LTData, TensorSplit
from ..params import at_least, param, positive


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

    def build(self) -> LTData:
        p = self.params
        counts = lt_counts(p.profile, p.n_max, p.imbalance_factor, p.num_classes)
        if min(counts) < 1:
            raise ValueError(f"n_max {p.n_max} with imbalance_factor {p.imbalance_factor} leaves a class with no image")
        train_x, train_y = render_split(counts, seed=2 * p.seed)
        test_x, test_y = render_split([p.test_per_class] * p.num_classes, seed=2 * p.seed + 1)
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
        )


COMPONENTS = [SyntheticLT]
