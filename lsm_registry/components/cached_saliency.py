"""``cached-gradcam``: Grad-CAM taken from the training forward the step already makes.

Fresh Grad-CAM costs LSM a second forward of the foreground batch. For a global-pooling
head the class activation map is ``sum_k alpha_k A_k`` with ``alpha`` in closed form
from the head (:func:`head_gradient`), so the map of an image's true class can be
read off the features of any forward that saw it. This provider watches the engine's
unmixed training forwards (through the ``saliency-observer`` callback it brings), stores
each image's map at feature resolution in the image's own coordinates (the crop box
it covered, un-flipped), and when that image is drawn as a foreground later, warps
the stored map into the new crop and flip instead of running the model again. Images
without a usable map (never seen unmixed, or seen more than ``max_age`` epochs ago)
fall back to a fresh Grad-CAM of just those rows, whose maps are stored in turn.

Two ways the maps differ from what ``gradcam`` computes on the same view, both
measured in docs/benchmarks.md: the training forward normalises with batch statistics
(``gradcam`` runs in eval mode) and uses weights up to ``max_age`` epochs old; and
parts of the new view the stored box never covered (the zero padding of a shifted
``crop32`` crop, or outside an old random-resized box) are filled with the
``uncovered`` value. Pixels of the new view that are not image at all (the padding)
score zero with ``mask_padding``, as in ``gradcam``.

Under several processes each rank stores the maps of the images its own steps saw,
and with ``share = "gather"`` (the default) the ranks merge their maps at the end of
every epoch (the newest map of each image wins), so a foreground seen by another rank
needs no fresh pass. ``share = "local"`` skips the merge: an image then has a usable
map on a rank only if that rank saw it, which with a new shard split every epoch
makes most foregrounds fall back (docs/benchmarks.md measures both).
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interfaces import Callback, PatchOperator, SaliencyProvider, Views
from ..params import non_negative, one_of, param
from .callbacks import SaliencyObserver
from .models import NormedLinear
from .saliency import GradCAM, class_activation_of, head_gradient, image_pixels, normalise_to_units, source_grid  # noqa: F401 (re-exported)


def warp_maps(
    maps: Tensor, map_boxes: Tensor, view_boxes: Tensor, flips: Tensor, height: int, width: int, fill: Tensor
) -> tuple[Tensor, Tensor]:
    """Stored maps (B, h, w) covering ``map_boxes`` -> (B, H, W) on the views, and where they were covered.

    Bilinear with ``align_corners=False``, the same sampling as ``gradcam``'s resize: a
    view equal to the stored box reads back exactly the resize of the stored map, and
    an integer shift reads back the shifted resize. A view pixel whose centre lies
    outside the stored box gets ``fill`` (B,).
    """
    sx, sy = source_grid(view_boxes, flips, height, width)
    boxes = map_boxes.float().to(sx.device)
    gx = 2 * (sx - boxes[:, 0:1]) / boxes[:, 2:3] - 1  # (B, W)
    gy = 2 * (sy - boxes[:, 1:2]) / boxes[:, 3:4] - 1  # (B, H)
    b = maps.shape[0]
    grid = torch.stack(
        [gx.view(b, 1, width).expand(b, height, width), gy.view(b, height, 1).expand(b, height, width)], dim=-1
    )
    out = F.grid_sample(
        maps.float().unsqueeze(1), grid, mode="bilinear", padding_mode="border", align_corners=False
    ).squeeze(1)
    covered = (gx.abs() <= 1).view(b, 1, width) & (gy.abs() <= 1).view(b, height, 1)
    return torch.where(covered, out, fill.view(b, 1, 1).to(out.dtype)), covered


def unit_agreement(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Per image, how alike two unit-score maps (B, gh, gw) rank the units: Spearman's rho and the
    top-k overlap ``|top_k(a) & top_k(b)| / k`` with k = half the units (LSM pastes about that many).

    Ranks are ordinal (ties broken by position), so a constant map has arbitrary ranks; an
    unrelated pair overlaps by k / n = 0.5 on average.
    """
    a, b = a.flatten(1).float(), b.flatten(1).float()
    n = a.shape[1]
    k = max(1, n // 2)
    ranks = [m.argsort(dim=1).argsort(dim=1).float() for m in (a, b)]
    ra, rb = (r - r.mean(dim=1, keepdim=True) for r in ranks)
    rho = (ra * rb).sum(dim=1) / ((ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt().clamp_min(1e-12))
    top = torch.zeros_like(a, dtype=torch.bool).scatter(1, a.topk(k, dim=1).indices, True)
    top_b = torch.zeros_like(b, dtype=torch.bool).scatter(1, b.topk(k, dim=1).indices, True)
    return rho, (top & top_b).sum(dim=1).float() / k


class CachedGradCAM(SaliencyProvider):
    """Grad-CAM from the training forward: maps stored when an image is seen unmixed, warped when it is a foreground."""

    name = "cached-gradcam"

    @attrs.frozen
    class Params:
        max_age: int = param(
            2,
            validator=non_negative,
            help="epochs a stored map stays usable: one stored in epoch e serves epochs e .. e + max_age",
        )
        fallback: str = param(
            "gradcam",
            validator=one_of("gradcam", "uniform"),
            help='images with no usable map: "gradcam" (a fresh Grad-CAM of just those, then stored) or "uniform" (all units equal, no extra pass)',
        )
        uncovered: str = param(
            "zero",
            validator=one_of("zero", "mean"),
            help='value of the parts of a view the stored map never covered: "zero" (not salient) or "mean" (of the map, after ReLU)',
        )
        mask_padding: bool = param(
            True,
            help="score the pixels a crop took from outside its image (zero padding) "
            "as not salient, before the min-max, as gradcam does; false scores them like any pixel",
        )
        share: str = param(
            "gather",
            validator=one_of("gather", "local"),
            help='several processes: "gather" merges the ranks\' maps after every epoch, "local" keeps each rank\'s own',
        )

    def __init__(self, params: Any, context: Any):
        super().__init__(params, context)
        self.fresh = GradCAM(GradCAM.Params(), context)
        self.size = sum(context.class_counts)
        self.maps: Optional[Tensor] = None  # (N, h, w) float16, raw CAM before ReLU
        self.boxes: Optional[Tensor] = None  # (N, 4) float32, the source box each map covers
        self.stamps: Optional[Tensor] = None  # (N,) int32, epoch stored; -1 never
        self.fresh_rows = 0
        self.scored_rows = 0

    def configure_callbacks(self) -> list[Callback]:
        """The observer that hands this provider the unmixed training forwards."""
        return [SaliencyObserver(SaliencyObserver.Params(), self.context)]

    # -------------------------------------------------------------- checks

    def check_model(self, model: nn.Module) -> None:
        if not callable(getattr(model, "forward_features", None)):
            raise ValueError(f"cached-gradcam: model {type(model).__name__} has no forward_features(x); use gradcam")
        head = getattr(model, "classifier", None)
        if not isinstance(head, (nn.Linear, NormedLinear)):
            raise ValueError(
                f"cached-gradcam: the classifier {type(head).__name__} has no closed-form Grad-CAM "
                "(nn.Linear or NormedLinear after global average pooling); use gradcam"
            )
        self.fresh.check_model(model)

    def observed_layer(self, model: nn.Module) -> nn.Module:
        layers = model.saliency_layers()
        return layers[next(iter(layers))]

    # -------------------------------------------------------------- store

    def _allocate(self, shape: tuple[int, int], device: torch.device) -> None:
        if self.maps is None or self.maps.shape[1:] != shape or self.maps.device != device:
            self.maps = torch.zeros((self.size, *shape), dtype=torch.float16, device=device)
            self.boxes = torch.zeros((self.size, 4), dtype=torch.float32, device=device)
            self.stamps = torch.full((self.size,), -1, dtype=torch.int32, device=device)

    def store(self, cam: Tensor, views: Views) -> None:
        """Keep the raw maps ``cam`` (B, h, w) of ``views``, un-flipped into their boxes' orientation."""
        self._allocate(tuple(cam.shape[-2:]), cam.device)
        flips = views.crops.flips.to(cam.device).view(-1, 1, 1)
        idx = views.indices.to(cam.device)
        self.maps[idx] = torch.where(flips, cam.flip(-1), cam).to(torch.float16)
        self.boxes[idx] = views.crops.boxes.to(cam.device, torch.float32)
        self.stamps[idx] = views.epoch

    @torch.no_grad()
    def observe(self, model: nn.Module, features: Tensor, labels: Tensor, views: Views) -> None:
        self.store(class_activation_of(model, features.detach(), labels), views)

    # -------------------------------------------------------------- read

    def usable(self, views: Views) -> Tensor:
        """(B,) bool: the image has a map no older than ``max_age`` epochs."""
        if self.stamps is None:
            return torch.zeros(views.indices.shape[0], dtype=torch.bool, device=views.indices.device)
        stamps = self.stamps[views.indices.to(self.stamps.device)]
        return (stamps >= 0) & (views.epoch - stamps <= self.params.max_age)

    def stored_activation(self, views: Views, height: int, width: int) -> tuple[Tensor, Tensor]:
        """The stored maps (after ReLU) read on ``views`` at (height, width), and where the stored boxes covered them."""
        assert self.maps is not None and self.boxes is not None
        idx = views.indices.to(self.maps.device)
        # ReLU before the resize, as gradcam's normalise_to_units does: the same view then
        # reads back exactly what gradcam would score.
        maps = self.maps[idx].float().clamp_min(0)
        if self.params.uncovered == "mean":
            fill = maps.mean(dim=(1, 2))
        else:
            fill = torch.zeros(maps.shape[0], device=maps.device)
        return warp_maps(
            maps, self.boxes[idx], views.crops.boxes.to(maps.device), views.crops.flips, height, width, fill
        )

    def scores_of_views(self, model: nn.Module, x: Tensor, y: Tensor, patch: PatchOperator, views: Views) -> Tensor:
        height, width = x.shape[-2:]
        patch.grid(height, width)
        usable = self.usable(views)
        missing = (~usable).nonzero().squeeze(1)
        self.scored_rows += int(usable.numel())
        if missing.numel() and self.params.fallback == "gradcam":
            self.fresh_rows += int(missing.numel())
            was_training = model.training
            model.eval()
            try:
                cam = self.fresh.class_activation(model, x[missing], y[missing])
            finally:
                model.train(was_training)
            self.store(cam.detach(), views.take(missing))
            usable = torch.ones_like(usable)
        if self.maps is None:  # nothing seen yet and no fresh pass: a constant map, so uniform scores
            raw = torch.zeros((x.shape[0], height, width), device=x.device)
        else:
            raw, _ = self.stored_activation(views, height, width)
            raw = torch.where(usable.view(-1, 1, 1), raw, torch.zeros_like(raw))  # no map: constant, so uniform scores
        valid = image_pixels(views.crops, height, width, x.device) if self.params.mask_padding else None
        return normalise_to_units(raw, height, width, patch, valid)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, patch: PatchOperator) -> Tensor:
        """Without views (outside the engine) nothing can be looked up: a fresh Grad-CAM."""
        return self.fresh(model, x, y, patch)

    # -------------------------------------------------------------- bookkeeping

    def end_epoch(self, epoch: int) -> None:
        if self.params.share == "gather" and self.maps is not None:
            self.merge_ranks()

    def merge_ranks(self) -> None:
        """Every rank ends with the newest map of each image any rank stored (a no-op in one process)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        assert self.maps is not None and self.boxes is not None and self.stamps is not None
        world = dist.get_world_size()

        def gathered(t: Tensor) -> Tensor:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            return torch.stack(parts)

        # float32 on the wire: not every backend gathers float16 (gloo does not).
        stamps, maps, boxes = gathered(self.stamps), gathered(self.maps.float()), gathered(self.boxes)
        newest = stamps.argmax(dim=0)  # ties: the lowest rank, the same choice on every rank
        rows = torch.arange(self.size, device=newest.device)
        self.stamps = stamps[newest, rows]
        self.maps = maps[newest, rows].to(torch.float16)
        self.boxes = boxes[newest, rows]

    def epoch_fractions(self) -> dict[str, tuple[float, float]]:
        counts = {"saliency_fresh_fraction": (float(self.fresh_rows), float(self.scored_rows))}
        self.fresh_rows = self.scored_rows = 0
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {
            "maps": self.maps,
            "boxes": self.boxes,
            "stamps": self.stamps,
            "fresh_rows": self.fresh_rows,
            "scored_rows": self.scored_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.maps, self.boxes, self.stamps = state["maps"], state["boxes"], state["stamps"]
        self.fresh_rows, self.scored_rows = state["fresh_rows"], state["scored_rows"]


COMPONENTS = [CachedGradCAM]
