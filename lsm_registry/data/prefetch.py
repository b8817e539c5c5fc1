"""Decoding ahead of the training step, for file-backed training splits.

An epoch's batches are known before it starts: the sampler is seeded per (run seed,
epoch), and so are the mixing coins and the crop seeds the engine draws into its plan.
So the whole epoch is handed to a ``torch.utils.data.DataLoader`` as a list of
:class:`PlannedStep` (its sampler yields them, so one set of persistent workers serves
every epoch); each worker decodes whole steps (background and, only when the step
mixes with a fetched foreground, the foreground too) while the training process runs
the steps before. ``prefetch`` steps per worker are in flight, results come back in
plan order, and the pinned host memory (on CUDA) lets the copy to the device overlap.

What a step decodes depends only on its plan entry (indices and seeds), never on which
worker took it or what came before, so starting the plan at step ``k`` (a mid-epoch
resume) gives the same batches as the uninterrupted epoch from ``k`` on.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import attrs
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from ..interfaces import Crops
from .split_files import Decoded, FileSplit


@attrs.frozen(eq=False)
class PlannedStep:
    """One training step of the plan: ``bg`` indices, ``fg`` indices or None (nothing to
    fetch: the step does not mix, or its sampler has no foreground branch), whether it
    ``mix``-es (the pre-drawn coin) and the crop seeds of the two batches."""

    step: int
    bg: Tensor
    fg: Optional[Tensor]
    mix: bool
    bg_seed: int
    fg_seed: int

    def request(self) -> tuple[int, list[int], Optional[list[int]], int, int]:
        """What goes to a worker: plain lists (a tensor would cost a shared-memory file per step)."""
        fg = self.fg.tolist() if self.fg is not None else None
        return self.step, self.bg.tolist(), fg, self.bg_seed, self.fg_seed


@attrs.frozen(eq=False)
class LoadedStep:
    """A planned step with its decoded uint8 batches (CPU, pinned on CUDA) and their crops."""

    plan: PlannedStep
    bg: tuple[Tensor, Crops]
    fg: Optional[tuple[Tensor, Crops]]


class _Steps(Dataset):
    """Item = a step's request; decodes its background and (when asked) its foreground."""

    def __init__(self, split: FileSplit):
        self.split = split

    def __len__(self) -> int:  # not used by the loader (its sampler is the plan)
        return len(self.split)

    def __getitem__(self, request: Any) -> dict[str, Any]:
        step, bg, fg, bg_seed, fg_seed = request
        out: dict[str, Any] = {"step": step, "bg": self.split.decode_train(bg, bg_seed)}
        out["fg"] = self.split.decode_train(fg, fg_seed) if fg is not None else None
        return out


class _Plan:
    """The loader's sampler: the epoch's requests, refilled before each pass."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def __iter__(self):
        return iter(self.requests)

    def __len__(self) -> int:
        return len(self.requests)


def _keep(item: Any) -> Any:
    return item


def _unpack(decoded: Decoded) -> tuple[Tensor, Crops]:
    images, boxes, flips, sizes, error = decoded
    if error is not None:
        raise DataError(error)
    return images, Crops(boxes, flips, sizes)


class PlannedLoader:
    """Persistent workers that decode a plan of steps ahead of training, in plan order.

    ``workers = 0`` decodes each step in the training process when it is reached (no
    overlap, same batches). ``pin_memory`` only makes sense on CUDA.
    """

    def __init__(self, split: FileSplit, workers: int, prefetch: int = 2, pin_memory: bool = False):
        self.split = split
        self.workers = workers
        self._plan = _Plan()
        self._loader: Optional[DataLoader] = DataLoader(
            _Steps(split),
            batch_size=None,
            sampler=self._plan,
            num_workers=workers,
            collate_fn=_keep,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
            prefetch_factor=prefetch if workers > 0 else None,
        )

    def run(self, steps: Sequence[PlannedStep]) -> Iterator[LoadedStep]:
        """The steps, decoded, in the given order; an unreadable file raises DataError naming it."""
        if self._loader is None:
            raise RuntimeError("PlannedLoader is closed")
        by_step = {s.step: s for s in steps}
        self._plan.requests = [s.request() for s in steps]
        for item in self._loader:
            bg = _unpack(item["bg"])
            fg = _unpack(item["fg"]) if item["fg"] is not None else None
            yield LoadedStep(by_step[int(item["step"])], bg, fg)

    def close(self) -> None:
        """Stop the workers now rather than when the loader is collected."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None) if loader is not None else None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def plan_epoch(batches: Sequence[tuple[Tensor, Optional[Tensor]]], coins: Sequence[bool], seeds: Tensor) -> list[PlannedStep]:
    """Steps of one epoch: a foreground is fetched only where the coin says mix and the sampler gave one.

    ``seeds`` (steps, 2) int64: the crop seeds of background and foreground per step.
    """
    return [PlannedStep(i, bg, fg if (mix and fg is not None) else None, bool(mix), int(seeds[i, 0]), int(seeds[i, 1]))
            for i, ((bg, fg), mix) in enumerate(zip(batches, coins))]
