"""Saliency providers: one non-negative score per unit of the patch operator.

``gradcam`` implements docs/method.md §4: Grad-CAM on a named layer, resized to
the image, min-max normalised per image and averaged over each ``p x p`` unit.
``random`` fills the same contract with noise, the ablation that tells how much
of LSM's gain comes from where the blocks are taken rather than from mixing blocks
at all.
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interfaces import Crops, PatchOperator, SaliencyProvider, Views
from ..params import param
from .models import NormedLinear


def source_grid(view_boxes: Tensor, flips: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Source-image coordinates of the pixel centres of each view: x (B, W) and y (B, H).

    A view of ``height x width`` pixels shows the box ``(left, top, w, h)`` of its
    source, mirrored when flipped, so its pixel column ``j`` has centre
    ``left + (j + 1/2) w / width`` (``width - j - 1/2`` in place of ``j + 1/2`` when flipped).
    """
    boxes = view_boxes.float()
    cols = torch.arange(width, dtype=torch.float32, device=boxes.device) + 0.5
    rows = torch.arange(height, dtype=torch.float32, device=boxes.device) + 0.5
    cols = torch.where(flips.to(boxes.device).view(-1, 1), width - cols, cols)
    sx = boxes[:, 0:1] + cols * (boxes[:, 2:3] / width)
    sy = boxes[:, 1:2] + rows.view(1, -1) * (boxes[:, 3:4] / height)
    return sx, sy


def image_pixels(crops: Crops, height: int, width: int, device: torch.device) -> Tensor:
    """(B, H, W) bool: which pixels of each ``height x width`` view show its source image.

    The rest is what augmentation invented: the zero padding a shifted ``crop32`` crop
    reaches into, or the outside of a box that leaves its source. Grad-CAM can find
    that border salient (a sharp edge against the image), and LSM would then paste
    blocks of nothing with a high tail weight.
    """
    sx, sy = source_grid(crops.boxes.to(device), crops.flips, height, width)
    sizes = crops.sizes.to(device)
    inside_x = (sx >= 0) & (sx < sizes[:, 1:2])
    inside_y = (sy >= 0) & (sy < sizes[:, 0:1])
    return inside_y.unsqueeze(2) & inside_x.unsqueeze(1)


def normalise_to_units(
    cam: Tensor, height: int, width: int, patch: PatchOperator, valid: Optional[Tensor] = None
) -> Tensor:
    """(B, h, w) raw class activation -> (B, H/p, W/p) unit scores in [0, 1].

    ReLU, bilinear resize to (H, W), zero where ``valid`` (B, H, W) is False (pixels that
    are not image, :func:`image_pixels`), per-image min-max, then p x p average pooling.
    A map with no spread (constant, all zero, or non-finite everywhere) becomes uniform
    ones on the valid pixels: every unit of image equally salient, never NaN.
    """
    cam = torch.nan_to_num(cam.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    cam = F.interpolate(cam.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)
    if valid is not None:
        cam = cam * valid.unsqueeze(1).to(cam.dtype)
    flat = cam.flatten(1)
    lo = flat.amin(dim=1).view(-1, 1, 1, 1)
    spread = flat.amax(dim=1).view(-1, 1, 1, 1) - lo
    has_spread = spread > 0
    scaled = ((cam - lo) / torch.where(has_spread, spread, torch.ones_like(spread))).clamp(0.0, 1.0)
    flat_map = torch.ones_like(scaled) if valid is None else valid.unsqueeze(1).to(scaled.dtype)
    cam = torch.where(has_spread, scaled, flat_map)
    p = patch.size
    return F.avg_pool2d(cam, kernel_size=p, stride=p).squeeze(1)


def head_gradient(model: nn.Module, pooled: Tensor, y: Tensor) -> Tensor:
    """d logit_y / d pooled features, (B, K), in closed form for the heads this library builds.

    ``nn.Linear``: ``W[y]``. ``NormedLinear`` (cosine logits ``x^.w^_y``): ``(w^_y - cos x^) / |x|``,
    the exact derivative of the normalised product. LWS's per-class ``logit_scale``
    multiplies it. Divided by ``h w`` it is Grad-CAM's ``alpha`` for the final stage.
    """
    head = model.classifier
    if isinstance(head, nn.Linear):
        grad = head.weight.index_select(0, y).to(pooled.dtype)
    elif isinstance(head, NormedLinear):
        w = F.normalize(head.weight, dim=0).t().index_select(0, y).to(pooled.dtype)
        norm = pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)
        unit = pooled / norm
        grad = (w - (unit * w).sum(dim=1, keepdim=True) * unit) / norm
    else:
        raise ValueError(f"no closed form for the head {type(head).__name__} (nn.Linear or NormedLinear)")
    scale = getattr(model, "logit_scale", None)
    if scale is not None:
        grad = grad * scale.index_select(0, y).to(grad.dtype).unsqueeze(1)
    return grad


def class_activation_of(model: nn.Module, features: Tensor, y: Tensor) -> Tensor:
    """The raw map ``sum_k alpha_k A_k`` (B, h, w) of class ``y`` from final-stage ``features`` (B, K, h, w)."""
    feats = features.float()
    h, w = feats.shape[-2:]
    grad = head_gradient(model, feats.mean(dim=(2, 3)), y)
    return torch.einsum("bk,bkhw->bhw", grad, feats) / (h * w)


class GradCAM(SaliencyProvider):
    """Grad-CAM on a named layer, patch-averaged; eval mode, no parameter gradients.

    With the model's default (final) stage and a global-average-pooling + nn.Linear
    head, alpha_k = W[y, k] / (h w) exactly, so one no-grad forward of the features
    suffices: the saliency pass then costs about a third of a training step instead
    of a second forward + backward. Every other layer or head (LDAM's normalised
    linear) takes the autograd path, which asks only for d z_y / d A.
    """

    name = "gradcam"

    @attrs.frozen
    class Params:
        layer: Optional[str] = param(
            None, help="layer to explain, a key of model.saliency_layers(); None: the model's default (final stage)"
        )
        fast: bool = param(
            True, help="use the one-forward closed form when the layer and head allow it (false forces autograd)"
        )
        mask_padding: bool = param(
            True,
            help="inside the engine, score the pixels a crop took from outside its image "
            "(zero padding) as not salient, before the min-max; false scores them like any pixel",
        )

    def _layer(self, model: nn.Module) -> tuple[str, nn.Module, bool]:
        getter = getattr(model, "saliency_layers", None)
        if getter is None:
            raise ValueError(
                f"gradcam: model {type(model).__name__} has no saliency_layers(); it cannot name a layer to explain"
            )
        layers = getter()
        if not layers:
            raise ValueError(f"gradcam: model {type(model).__name__} lists no saliency layers")
        names = list(layers)
        name = self.params.layer if self.params.layer is not None else names[0]
        if name not in layers:
            raise ValueError(
                f"gradcam: model {type(model).__name__} has no layer {name!r}; valid layers: {', '.join(names)}"
            )
        return name, layers[name], name == names[0]

    def check_model(self, model: nn.Module) -> None:
        self._layer(model)

    def can_use_fast_path(self, model: nn.Module) -> bool:
        _, _, is_default = self._layer(model)
        return bool(
            self.params.fast
            and is_default
            and hasattr(model, "forward_features")
            and isinstance(getattr(model, "classifier", None), nn.Linear)
        )

    def class_activation(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The raw map sum_k alpha_k A_k, (B, h, w), before ReLU; model mode untouched by the caller."""
        _, layer, _ = self._layer(model)
        if self.can_use_fast_path(model):
            with torch.no_grad():
                return class_activation_of(model, model.forward_features(x), y)
        captured: list[Tensor] = []

        def hook(module: nn.Module, inputs: object, output: Tensor) -> Tensor:
            # A fresh leaf: the backward stops here, so no parameter gradient is ever
            # computed and the graph before the layer is freed at once.
            leaf = output.detach().requires_grad_(True)
            captured.append(leaf)
            return leaf

        handle = layer.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                logits = model(x)
                if not captured:
                    raise ValueError(f"gradcam: layer {type(layer).__name__} was not called by the model's forward")
                act = captured[-1]
                score = logits.gather(1, y.view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(score, act)
        finally:
            handle.remove()
        alpha = grad.mean(dim=(2, 3), keepdim=True)
        return (alpha * act.detach()).sum(dim=1)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, patch: PatchOperator) -> Tensor:
        return self._scores(model, x, y, patch, None)

    def scores_of_views(self, model: nn.Module, x: Tensor, y: Tensor, patch: PatchOperator, views: Views) -> Tensor:
        """Training images with known crops: with ``mask_padding``, the padding is not salient."""
        valid = image_pixels(views.crops, x.shape[-2], x.shape[-1], x.device) if self.params.mask_padding else None
        return self._scores(model, x, y, patch, valid)

    def _scores(self, model: nn.Module, x: Tensor, y: Tensor, patch: PatchOperator, valid: Optional[Tensor]) -> Tensor:
        height, width = x.shape[-2:]
        patch.grid(height, width)
        was_training = model.training
        model.eval()
        try:
            cam = self.class_activation(model, x, y)
        finally:
            model.train(was_training)
        return normalise_to_units(cam, height, width, patch, valid)


class RandomSaliency(SaliencyProvider):
    """Uniform noise scores (ablation: mixing blocks without knowing where the object is)."""

    name = "random"

    @attrs.frozen
    class Params:
        pass

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, patch: PatchOperator) -> Tensor:
        gh, gw = patch.grid(x.shape[-2], x.shape[-1])
        scores = torch.rand((x.shape[0], gh, gw), generator=self.context.generator)
        return scores.to(x.device)


COMPONENTS = [GradCAM, RandomSaliency]
