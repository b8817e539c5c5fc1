"""The mixing step, callable on its own: two batches in, mixed images and soft targets out.

This is the one place where saliency, patch operator, mixer and label fuser meet
(sample -> saliency -> mix -> fuse). The engine's training step, ``lsm preview``, the
run folder's ``mixed_samples.png`` and the conformance kit all go through it, so what
a picture shows is what training saw, and a plugin author can mix a batch outside the
engine the way torchvision's ``CutMix()(images, labels)`` does. It decides nothing
about *when* to mix (the mixer's window and coin, which the engine asks): given two
batches, it always mixes them.
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch
from torch import Tensor, nn

from .interfaces import LabelFuser, Mixer, PatchOperator, SaliencyProvider, Views

__all__ = ["MixedBatch", "MixingStep", "foreground_order", "mix_batches", "permuted_foreground"]


@attrs.frozen(eq=False)
class MixedBatch:
    """One mixed batch and everything it was made from.

    ``images`` (B, ch, H, W) and ``target`` (B, C) are what the model trains on.
    ``mask`` (B, 1, H, W) is the per-pixel foreground weight, ``unit_mask``
    (B, H/p, W/p) the pasted units when the mixer works on units. ``y_f``, ``y_b``
    and ``lam`` (B,) say the same as ``target`` for two-label targets:
    ``target = lam e_{y_f} + (1 - lam) e_{y_b}``; losses that weight each label on
    its own (CMO's class-weighted form) need them. When ``y_f == y_b`` the target is
    one-hot whatever ``lam`` is, and ``lam`` is then the pasted area. The inputs
    ``x_f``, ``x_b`` and the saliency maps are kept for pictures and checks.
    """

    images: Tensor
    target: Tensor
    mask: Tensor
    y_f: Tensor
    y_b: Tensor
    lam: Tensor
    x_f: Tensor
    x_b: Tensor
    unit_mask: Optional[Tensor] = None
    saliency_f: Optional[Tensor] = None
    saliency_b: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def rows(self, n: int) -> "MixedBatch":
        """A copy of the first ``n`` images (for pictures), every field cut alike.

        A copy, not a view, so that keeping it does not keep the whole batch alive.
        """
        cut = {
            f.name: (v[:n].detach().clone() if isinstance(v := getattr(self, f.name), Tensor) else v)
            for f in attrs.fields(MixedBatch)
        }
        return MixedBatch(**cut)


@attrs.frozen(eq=False)
class MixingStep:
    """The components of one mix, bound together; call it with a model and two batches.

    ``saliency`` is required when the mixer or the fuser needs saliency; ``patch`` when
    the mixer works on units or a saliency provider scores them.
    """

    mixer: Mixer
    fuser: LabelFuser
    patch: Optional[PatchOperator] = None
    saliency: Optional[SaliencyProvider] = None

    def __attrs_post_init__(self) -> None:
        wants = self.mixer.needs_saliency or self.fuser.needs_saliency or self.fuser.needs_background_saliency
        if wants and self.saliency is None:
            raise ValueError(
                f"mixer {self.mixer.name!r} with label fuser {self.fuser.name!r} needs a saliency provider"
            )
        if (self.mixer.uses_patch or self.saliency is not None) and self.patch is None:
            raise ValueError(f"mixer {self.mixer.name!r} needs a patch operator")

    def __call__(
        self,
        model: Optional[nn.Module],
        x_b: Tensor,
        y_b: Tensor,
        x_f: Tensor,
        y_f: Tensor,
        views_f: Optional[Views] = None,
        views_b: Optional[Views] = None,
    ) -> MixedBatch:
        """Mix foreground ``x_f`` (labels ``y_f``) into background ``x_b`` (labels ``y_b``).

        ``model`` is what the saliency provider explains (None for model-free setups).
        Images are normalised float (B, ch, H, W), labels int64 (B,), all on one device.
        ``views_f`` / ``views_b``: which training images the batches are and how they were
        cut (the engine knows); a provider that observes training reuses what it saw of
        them, ``gradcam`` masks the crops' padding, any other provider ignores them.
        """
        s_f = s_b = None
        if self.saliency is not None:
            s_f = self._saliency(model, x_f, y_f, views_f)
            if self.fuser.needs_background_saliency:
                s_b = self._saliency(model, x_b, y_b, views_b)
        mix = self.mixer.mix(x_f, x_b, s_f, self.patch)
        target = self.fuser.fuse(mix, y_f, y_b, s_f, s_b)
        # Two images of one class leave lam free in the target; the pasted area is the
        # share CMO's per-label loss gives the foreground label then.
        area = mix.weight.float().mean(dim=(1, 2, 3))
        lam = torch.where(y_f == y_b, area, target.gather(1, y_f.view(-1, 1)).squeeze(1))
        return MixedBatch(
            images=mix.images,
            target=target,
            mask=mix.weight,
            y_f=y_f,
            y_b=y_b,
            lam=lam,
            x_f=x_f,
            x_b=x_b,
            unit_mask=mix.unit_mask,
            saliency_f=s_f,
            saliency_b=s_b,
        )

    def _saliency(self, model: Optional[nn.Module], x: Tensor, y: Tensor, views: Optional[Views]) -> Tensor:
        assert self.saliency is not None and self.patch is not None
        if views is not None:
            return self.saliency.scores_of_views(model, x, y, self.patch, views)
        return self.saliency(model, x, y, self.patch)


def mix_batches(
    model: Optional[nn.Module],
    x_b: Tensor,
    y_b: Tensor,
    x_f: Tensor,
    y_f: Tensor,
    *,
    mixer: Mixer,
    fuser: LabelFuser,
    patch: Optional[PatchOperator] = None,
    saliency: Optional[SaliencyProvider] = None,
) -> MixedBatch:
    """One-call form of :class:`MixingStep`."""
    return MixingStep(mixer, fuser, patch, saliency)(model, x_b, y_b, x_f, y_f)


def foreground_order(batch_size: int, generator: torch.Generator) -> Tensor:
    """The order (CPU int64) in which a single-branch sampler's batch is its own foreground (Mixup, CutMix)."""
    return torch.randperm(batch_size, generator=generator)


def permuted_foreground(x_b: Tensor, y_b: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The foreground of a single-branch sampler: the batch itself in :func:`foreground_order`."""
    perm = foreground_order(x_b.shape[0], generator).to(x_b.device)
    return x_b[perm], y_b[perm]
