"""Samplers: which training indices each step sees.

Every epoch's draws come from a generator seeded by (run seed, epoch, rank), not
from state carried across epochs, so a resumed run replays the same batches and
processes never draw the same stream.
"""

from __future__ import annotations

from typing import Iterator, Optional

import attrs
import torch
from torch import Tensor

from ..interfaces import Sampler
from ..params import non_negative, param


def epoch_generator(seed: int, epoch: int, rank: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_009 + rank) * 4 + stream)


class _ShuffledInstances(Sampler):
    """Shared instance branch: each index once per epoch, sharded by rank."""

    def _instance_order(self, epoch: int) -> Tensor:
        n = self.labels.numel()
        order = torch.randperm(n, generator=epoch_generator(self.context.seed, epoch, 0, 0))
        return order[self.rank :: self.world_size]

    def steps_per_epoch(self, batch_size: int) -> int:
        # Every process runs the same number of steps (DDP needs it); the last partial
        # batch is dropped, unless the whole shard is smaller than one batch.
        shard = self.labels.numel() // self.world_size
        return max(1, shard // batch_size)

    def _instance_batches(self, epoch: int, batch_size: int) -> Iterator[Tensor]:
        order = self._instance_order(epoch)
        steps = self.steps_per_epoch(batch_size)
        for s in range(steps):
            yield order[s * batch_size : (s + 1) * batch_size]


class InstanceSampler(_ShuffledInstances):
    """Instance-balanced shuffling: the usual one pass per epoch, no second branch."""

    name = "instance"

    @attrs.frozen
    class Params:
        pass

    def batches(self, epoch: int, batch_size: int) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        for idx in self._instance_batches(epoch, batch_size):
            yield idx, None


class DualBranchSampler(_ShuffledInstances):
    """Instance branch (background) plus a branch drawn with weight n_y ** -gamma (foreground)."""

    name = "dual-branch"

    @attrs.frozen
    class Params:
        gamma: float = param(
            1.0, help="rebalancing exponent: 0 instance-balanced, 1 class-balanced", validator=non_negative
        )

    def weights(self) -> Tensor:
        counts = torch.bincount(self.labels, minlength=self.context.num_classes).to(torch.float64)
        return counts[self.labels].pow(-float(self.params.gamma))

    def batches(self, epoch: int, batch_size: int) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        gen = epoch_generator(self.context.seed, epoch, self.rank, 1)
        weights = self.weights()
        for idx in self._instance_batches(epoch, batch_size):
            fg = torch.multinomial(weights, idx.numel(), replacement=True, generator=gen)
            yield idx, fg


class ReversedSampler(DualBranchSampler):
    """Instance branch plus BBN's reversed branch: class c drawn with probability proportional to n_max / n_c."""

    name = "reversed"

    @attrs.frozen
    class Params:
        pass

    def weights(self) -> Tensor:
        """Per-image weights ``(n_max / n_c) / n_c``: BBN's reversed sampler draws a class with
        probability ``w_c / sum_j w_j``, ``w_c = n_max / n_c``, then an image of it uniformly
        (reference code: ``get_weight`` and ``sample_class_index_by_weight``), so the rarest
        class comes up most often, n_max / n_min times as often as the largest one."""
        counts = torch.bincount(self.labels, minlength=self.context.num_classes).to(torch.float64)
        class_weight = counts.max() / counts
        return class_weight[self.labels] / counts[self.labels]


class ClassBalancedSampler(_ShuffledInstances):
    """Class-balanced sampling: one branch drawn with weight n_y ** -1, each class equally likely (cRT)."""

    name = "class-balanced"
    draws_with_replacement = True

    @attrs.frozen
    class Params:
        pass

    def batches(self, epoch: int, batch_size: int) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        # As many images per epoch as an instance-balanced epoch, so epochs, schedules and
        # eval_every mean what they mean for the stage-1 recipe.
        steps = self.steps_per_epoch(batch_size)
        counts = torch.bincount(self.labels, minlength=self.context.num_classes).to(torch.float64)
        weights = counts[self.labels].reciprocal()
        gen = epoch_generator(self.context.seed, epoch, self.rank, 2)
        drawn = torch.multinomial(weights, steps * batch_size, replacement=True, generator=gen)
        for s in range(steps):
            yield drawn[s * batch_size : (s + 1) * batch_size], None


COMPONENTS = [InstanceSampler, DualBranchSampler, ReversedSampler, ClassBalancedSampler]
