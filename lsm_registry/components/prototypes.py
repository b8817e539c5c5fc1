"""PC, the prototype classifier (Sharma et al., "Learning Prototype Classifiers for Long-Tailed Recognition", IJCAI 2023).

A softmax classifier trained on long-tailed data ties a class's weight norm to its image
count; distances to one learnable prototype per class have no norm to tie. PC is a second
stage on a frozen backbone: the prototypes start at the class means of the training
features and are trained, together with one scale per feature channel, on the logits
``z_c = -||s * f - s * p_c||`` (the Euclidean distance, not its square: its gradient with
respect to a prototype is a unit vector times ``s``, whatever the distance, so a far-away
outlier cannot dominate a step) with logit-adjusted cross-entropy.

Two parts, so that the engine names no method: ``[model] head = "prototypes"`` makes the
model's ``classifier`` a :class:`PrototypeHead` (a stage with ``train = "classifier"``
then trains exactly the prototypes and the scales), and the callback ``pc`` writes the
class means into it when the fit starts, after the parent's weights are loaded.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn

from ..data.augment import eval_view_batches
from ..errors import LSMError
from ..interfaces import Callback
from ..params import at_least, param, positive

#: The classifier heads a model factory may build: ``[model] head``.
Head = Literal["linear", "prototypes"]

HEAD_HELP = (
    'the classifier: "linear" (a linear layer on the pooled features) or "prototypes" (PC: logits '
    "-||s f - s p_c||, one learnable prototype per class and one learnable scale per feature channel; the "
    'callback "pc" starts the prototypes at the class means)'
)


def head_param() -> Any:
    """The ``head`` field of a model factory's Params, one definition for every factory that has it."""
    return param("linear", help=HEAD_HELP)


class PrototypeHead(nn.Module):
    """Logits ``-||s * h - s * p_c||_2`` of pooled features ``h`` (B, K) against prototypes ``p`` (C, K).

    ``s = exp(log_scale)`` (K,), one scale per channel, 1 at the start. Through ``exp``
    rather than the reference's division by a raw temperature ``T``: a scale moves by a
    factor per step whatever its size, it stays positive, and there is no ``1 / T`` to blow
    up when ``T`` crosses 0. (softplus would also keep it positive, but moves a small scale by
    absolute steps.) The prototypes start random; the ``pc`` callback sets the class means.
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(num_classes, in_features) / math.sqrt(in_features))
        self.log_scale = nn.Parameter(torch.zeros(in_features))

    @property
    def in_features(self) -> int:
        return int(self.prototypes.shape[1])

    @property
    def scale(self) -> Tensor:
        """The channel scales ``s`` (K,)."""
        return self.log_scale.exp()

    def forward(self, h: Tensor) -> Tensor:
        # The distances come from the expanded square, O(B C + (B + C) K) memory rather than the
        # (B, C, K) differences; float32 without autocast, since the expansion cancels digits.
        if torch.is_autocast_enabled(h.device.type):
            with torch.autocast(h.device.type, enabled=False):
                return self._logits(h.float())
        return self._logits(h.float())

    def _logits(self, h: Tensor) -> Tensor:
        s = self.scale
        a, b = h * s, self.prototypes * s
        aa, bb = a.pow(2).sum(dim=1, keepdim=True), b.pow(2).sum(dim=1)
        squared = aa + bb - 2.0 * (a @ b.t())
        # Below the expansion's resolution (eps times the squared norms) the distance is that
        # floor, with no gradient: 1 / sqrt of a cancelled, near-zero square would be a spike.
        floor = ((aa + bb) * torch.finfo(torch.float32).eps).clamp_min(torch.finfo(torch.float32).tiny)
        return -torch.maximum(squared, floor.detach()).sqrt()


def with_head(module: nn.Module, head: str) -> nn.Module:
    """``module`` with its ``classifier`` (a plain linear layer) replaced by a :class:`PrototypeHead` of the
    same size when ``head = "prototypes"``; ``module`` as it is for ``"linear"``."""
    if head == "linear":
        return module
    linear = getattr(module, "classifier", None)
    if not isinstance(linear, nn.Linear):
        raise ValueError(
            f'head = "prototypes" replaces a plain linear classifier (nn.Linear), and this model\'s is '
            f"{type(linear).__name__} (a cosine head, as LDAM's loss asks for, or a multi-layer head); "
            'use head = "linear" or another loss or model'
        )
    module.classifier = PrototypeHead(linear.in_features, linear.out_features)
    return module


# ------------------------------------------------------------------------------ the callback


def prototype_head_of(loop: Any) -> PrototypeHead:
    """The running model's :class:`PrototypeHead`, or a one-line error naming ``model.head``."""
    head = getattr(loop.module, "classifier", None)
    if isinstance(head, PrototypeHead):
        return head
    recipe = loop.recipe
    raise LSMError(
        f"{recipe.path} [run].callbacks: 'pc' starts the prototypes of a prototype classifier, and model "
        f'{recipe.model.name!r} has a {type(head).__name__} classifier; set model.head = "prototypes"'
    )


@torch.no_grad()
def class_means(loop: Any, head: PrototypeHead, batch_size: int) -> Tensor:
    """Per class, the mean (C, K) float32 of what ``head`` receives for the training images.

    The test-time view (``Split.fetch``: no augmentation) with the model in eval mode, batch
    by batch; the features are caught on their way into the head, so they are exactly the
    classifier's input whatever the model pools. Sums and counts are per shard of a
    multi-process run, then added up over the processes.
    """
    module, split, device = loop.module, loop.data.train, loop.device
    dist = getattr(loop, "dist", None)
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    num_classes = loop.data.num_classes
    sums = torch.zeros(num_classes, head.in_features, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    caught: list[Tensor] = []
    hook = head.register_forward_pre_hook(lambda _, inputs: caught.append(inputs[0].detach()))
    autocast = getattr(loop, "autocast_dtype", None)
    was_training = module.training
    module.eval()
    try:
        indices = torch.arange(rank, len(split), world)
        for idx, x in eval_view_batches(split, indices, device, loop.mean, loop.std, batch_size, loop.memory_format):
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                module(x)
            labels = split.labels[idx].to(device)
            sums.index_add_(0, labels, caught[-1].double())
            caught.clear()
            counts += torch.bincount(labels, minlength=num_classes).double()
    finally:
        hook.remove()
        module.train(was_training)
    loop.all_reduce(sums)
    loop.all_reduce(counts)
    return (sums / counts.clamp_min(1).unsqueeze(1)).float()


class PrototypeInit(Callback):
    """PC (Sharma et al. 2023): the prototypes start at the class means of the training features when the fit starts.

    Needs ``[model] head = "prototypes"``. Runs after the parent's weights are loaded (they
    are, when the run is built) and before the first step, on the frozen backbone in eval
    mode; the channel scales start at ``scale``. A resumed run keeps the trained prototypes
    of its checkpoint: the callback's state says they were set.
    """

    name = "pc"
    # It starts the prototypes of a prototype classifier, which the model must have.
    conformance_tables = {"model": {"name": "resnet32", "width": 4, "head": "prototypes"}}

    @attrs.frozen
    class Params:
        scale: float = param(
            1.0,
            help="the channel scales s start here (the reference's logits -||(f - c) / T|| / 2 at T = 1 are s = 0.5)",
            validator=positive,
        )
        batch_size: int = param(
            512, help="images per forward pass while the class means are computed", validator=at_least(1)
        )

    def __init__(self, params: Any, context: Any):
        super().__init__(params, context)
        self.initialised = False

    def on_fit_start(self, loop: Any) -> None:
        head = prototype_head_of(loop)
        if self.initialised:  # resumed: the checkpoint holds the trained prototypes and scales
            return
        means = class_means(loop, head, self.params.batch_size)
        with torch.no_grad():
            head.prototypes.copy_(means)
            head.log_scale.fill_(math.log(self.params.scale))
        self.initialised = True

    def state_dict(self) -> dict[str, Any]:
        return {"initialised": True} if self.initialised else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initialised = bool(state.get("initialised", False))


COMPONENTS = [PrototypeInit]
