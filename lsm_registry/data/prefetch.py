"""Decoding ahead of the training step, for file-backed training splits.

An epoch's batches are known before it starts: the sampler is seeded per (run seed,
epoch), and so are the mixing coins and the crop seeds the engine draws into its plan.
So the whole epoch is handed to a ``torch.utils.data.DataLoader`` as a list of
:class:`PlannedStep` (its sampler yields them, so one set of persistent workers serves
every epoch); each worker decodes whole steps (background and, only when the step
mixes with a fetched foreground, the foreground too) while the training process runs
the steps before. ``prefetch`` steps per worker are in flight and results come back in
plan order.

The workers decode into a ring of shared-memory slots allocated once, and hand back
only the slot number and the crops as plain lists; the training process copies the
step out of its slot (into pinned memory on CUDA, so the copy to the device can
overlap), or, with ``views = True`` on the CPU, hands out the slot itself. Returning
the batch as a tensor instead would cost, per tensor, a file-descriptor handshake with
the worker and the unmapping of the tensor's shared memory when it is freed: about
5 ms of the training process's time per step here (four tensors a batch), against
0.7-2 ms for a copy into fresh memory and nothing for a view. The ring has ``workers
x prefetch + 2`` slots: the DataLoader never has more than ``workers x prefetch``
steps in flight, so while the consumer works on step ``j`` and on step ``j + 1``, no
worker writes the slot of step ``j``.

What a step decodes depends only on its plan entry (indices and seeds), never on which
worker took it or what came before, so starting the plan at step ``k`` (a mid-epoch
resume) gives the same batches as the uninterrupted epoch from ``k`` on.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Optional, Sequence

import attrs
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..errors import DataError
from ..interfaces import Crops
from .split_files import FileSplit, crops_of, worker_init


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

    def request(self, slot: int) -> tuple[int, int, list[int], Optional[list[int]], int, int]:
        """What goes to a worker, decoding into ``slot``: plain lists (a tensor would cost a shared-memory file per step)."""
        fg = self.fg.tolist() if self.fg is not None else None
        return self.step, slot, self.bg.tolist(), fg, self.bg_seed, self.fg_seed


@attrs.frozen(eq=False)
class LoadedStep:
    """A planned step with its decoded uint8 batches (CPU, pinned on CUDA) and their crops.

    ``worker`` (-1: the training process) decoded it from ``decoded[0]`` to ``decoded[1]``
    on the ``time.perf_counter`` clock (system-wide, so comparable across processes): what
    the loader itself needed while it ran, as opposed to a separate measurement."""

    plan: PlannedStep
    bg: tuple[Tensor, Crops]
    fg: Optional[tuple[Tensor, Crops]]
    worker: int = -1
    decoded: tuple[float, float] = (0.0, 0.0)


class _Steps(Dataset):
    """Item = a step's request; decodes its background and (when asked) its foreground.

    With a ``ring`` (worker processes) the images go into the request's slot and only
    the crop lists come back; without one (``workers = 0``) the decoded tensors do."""

    def __init__(self, split: FileSplit):
        self.split = split
        self.ring: Optional[Tensor] = None

    def __len__(self) -> int:  # not used by the loader (its sampler is the plan)
        return len(self.split)

    def __getitem__(self, request: Any) -> dict[str, Any]:
        step, slot, bg, fg, bg_seed, fg_seed = request
        start = time.perf_counter()
        decoded, at = [], 0
        for positions, seed in [(bg, bg_seed)] + ([(fg, fg_seed)] if fg is not None else []):
            into = None if self.ring is None else self.ring[slot, at : at + len(positions)]
            images, *crops = self.split.decode_train(positions, seed, into)
            decoded.append((images if into is None else None, *crops))  # a slot's images stay in it
            at += len(positions)
        info = get_worker_info()
        return {
            "step": step,
            "slot": slot,
            "sizes": (len(bg), len(fg) if fg is not None else 0),
            "decoded": decoded,
            "worker": info.id if info is not None else -1,
            "span": (start, time.perf_counter()),
        }


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


class PlannedLoader:
    """Persistent workers that decode a plan of steps ahead of training, in plan order.

    ``workers = 0`` decodes each step in the training process when it is reached (no
    overlap, same batches). ``pin_memory`` only makes sense on CUDA. ``views``: hand out
    the ring's slots themselves (no copy, CPU only: pinned copies are taken regardless),
    for a consumer that is done with a step's images before it asks for the step after
    next, as the engine is (it normalises them into a new tensor at once); by default each
    step gets its own copy, safe to keep. With workers, the ring of slots takes
    ``(workers x prefetch + 2) x (background + foreground batch) x 3 x size x size`` bytes
    of shared memory (``/dev/shm``), allocated at the first epoch and again only if a
    later plan has larger steps (the first epoch that mixes, say), which restarts the
    workers.
    """

    def __init__(
        self, split: FileSplit, workers: int, prefetch: int = 2, pin_memory: bool = False, views: bool = False
    ):
        self.split = split
        self.workers = workers
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.views = views and not pin_memory
        self.slots = workers * prefetch + 2 if workers > 0 else 0
        self._plan = _Plan()
        self._steps = _Steps(split)
        self._loader: Optional[DataLoader] = None
        self._closed = False

    def _ready(self, room: int) -> DataLoader:
        """The DataLoader, with a ring of at least ``room`` images per slot (workers restart if it grows)."""
        ring = self._steps.ring
        if self._loader is not None and (self.workers == 0 or (ring is not None and ring.shape[1] >= room)):
            return self._loader
        self._shutdown()
        if self.workers > 0:
            size = self.split.size
            self._steps.ring = torch.empty(self.slots, room, 3, size, size, dtype=torch.uint8).share_memory_()
        self._loader = DataLoader(
            self._steps,
            batch_size=None,
            sampler=self._plan,
            num_workers=self.workers,
            collate_fn=_keep,
            persistent_workers=self.workers > 0,
            prefetch_factor=self.prefetch if self.workers > 0 else None,
            worker_init_fn=worker_init(self.split.worker_priority),
        )
        return self._loader

    def _take(self, images: Tensor) -> Tensor:
        """A slot's images as the step's own copy (pinned on CUDA) or, with ``views``, the slot itself;
        without a ring, the decoded tensor."""
        if self._steps.ring is None:
            return images.pin_memory() if self.pin_memory else images
        if self.views:
            return images
        out = torch.empty(images.shape, dtype=images.dtype, pin_memory=self.pin_memory)
        return out.copy_(images)

    def run(self, steps: Sequence[PlannedStep]) -> Iterator[LoadedStep]:
        """The steps, decoded, in the given order; an unreadable file raises DataError naming it."""
        if self._closed:
            raise RuntimeError("PlannedLoader is closed")
        room = max((len(s.bg) + (len(s.fg) if s.fg is not None else 0) for s in steps), default=1)
        loader = self._ready(room)
        by_step = {s.step: s for s in steps}
        self._plan.requests = [s.request(k % self.slots if self.slots else 0) for k, s in enumerate(steps)]
        for item in loader:
            ring = self._steps.ring
            slot = ring[item["slot"]] if ring is not None else None
            n_bg, n_fg = item["sizes"]
            parts = []
            for (images, boxes, flips, sizes, error), (start, n) in zip(item["decoded"], ((0, n_bg), (n_bg, n_fg))):
                if error is not None:
                    raise DataError(error)
                parts.append(
                    (self._take(images if slot is None else slot[start : start + n]), crops_of(boxes, flips, sizes))
                )
            yield LoadedStep(
                by_step[int(item["step"])], parts[0], parts[1] if len(parts) > 1 else None, item["worker"], item["span"]
            )

    def _shutdown(self) -> None:
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None) if loader is not None else None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def close(self) -> None:
        """Stop the workers now rather than when the loader is collected."""
        self._shutdown()
        self._steps.ring = None
        self._closed = True


def plan_epoch(
    batches: Sequence[tuple[Tensor, Optional[Tensor]]], coins: Sequence[bool], seeds: Tensor
) -> list[PlannedStep]:
    """Steps of one epoch: a foreground is fetched only where the coin says mix and the sampler gave one.

    ``seeds`` (steps, 2) int64: the crop seeds of background and foreground per step.
    """
    return [
        PlannedStep(i, bg, fg if (mix and fg is not None) else None, bool(mix), int(seeds[i, 0]), int(seeds[i, 1]))
        for i, ((bg, fg), mix) in enumerate(zip(batches, coins))
    ]
