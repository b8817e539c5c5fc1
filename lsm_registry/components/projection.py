"""The projection head of contrastive learning, a model option (``[model] projection_dim``).

SupCon (Khosla et al. 2020) and the losses built on it compare images in a small
normalised embedding computed from the pooled features by a two-layer MLP, not in the
feature space the classifier reads: the MLP can discard what the contrastive loss does not
need while the features keep it. A model given ``projection_dim > 0`` carries the head as
``projection`` and, in training mode, returns its L2-normalised output as the part
``"embeddings"`` of its training output (``ModelOutput``); in eval mode (evaluation,
saliency, export) it returns the logits alone, so the head costs nothing at test time.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..interfaces import ModelOutput
from ..params import at_least, param

#: The part of the training output that holds the normalised projections (B, projection_dim).
EMBEDDINGS = "embeddings"

PROJECTION_HELP = (
    "size of the contrastive projection head (Linear-ReLU-Linear on the pooled features, "
    'L2-normalised), given in training as the output part "embeddings"; 0: no head'
)


def projection_param(default: int = 0):
    return param(default, help=PROJECTION_HELP, validator=at_least(0))


class ProjectionHead(nn.Module):
    """SupCon's MLP head: ``normalize(W2 relu(W1 h))``, hidden width the feature width (as its reference code)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_features, in_features), nn.ReLU(inplace=True), nn.Linear(in_features, out_features)
        )

    def forward(self, h: Tensor) -> Tensor:
        return F.normalize(self.mlp(h), dim=1)


def projection_head(in_features: int, out_features: int) -> Optional[ProjectionHead]:
    return ProjectionHead(in_features, out_features) if out_features > 0 else None


def output_parts(head: Optional[nn.Module]) -> tuple[str, ...]:
    """The training-output parts a model with this head gives (``ModelFactory``'s ``output_parts``)."""
    return (EMBEDDINGS,) if head is not None else ()


def training_output(module: nn.Module, pooled: Tensor, logits: Tensor) -> Tensor | ModelOutput:
    """The logits, with the projection of the pooled features as ``"embeddings"`` in training mode."""
    head = getattr(module, "projection", None)
    if module.training and head is not None:
        return ModelOutput(logits, {EMBEDDINGS: head(pooled)})
    return logits
