"""The plugin ABI: the abstract base classes every component derives from.

A component class declares ``kind`` (through its base class), a unique ``name``
and an ``attrs.frozen`` ``Params`` class; it is built as ``cls(params, context)``.
Nothing here imports a built-in component, so a plugin can depend on this module
alone. The tensor contracts below are the whole agreement between the engine and a
component: keep to them and any sampler, saliency provider, mixer and label fuser
combine with any other.
"""

from __future__ import annotations

import abc
import importlib.util
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, Sequence

import attrs
import torch
from torch import Tensor, nn

from .params import ParamError, param
from .params import non_negative as _non_negative
from .params import probability as _probability

__all__ = [
    "KINDS",
    "Context",
    "Component",
    "Sampler",
    "SaliencyProvider",
    "PatchOperator",
    "Mixer",
    "MixerParams",
    "mix_prob",
    "mix_start",
    "mix_end",
    "MixResult",
    "LabelFuser",
    "Loss",
    "ModelFactory",
    "ModelOutput",
    "logits_of",
    "DatasetFactory",
    "LTData",
    "Split",
    "DecodingSplit",
    "TensorSplit",
    "Crops",
    "Views",
    "Logger",
    "RunInfo",
    "Optimizer",
    "StepClosure",
    "Callback",
    "StepBatch",
    "SecondBatch",
]

KINDS: tuple[str, ...] = (
    "sampler",
    "saliency",
    "patch",
    "mixer",
    "label_fuser",
    "loss",
    "model",
    "dataset",
    "logger",
    "optimizer",
    "callback",
)


@attrs.frozen(eq=False)
class Context:
    """What a component may know about the run, passed explicitly (no global state).

    ``class_counts[c]`` is the number of training images of class ``c`` (the order
    is the data set's class order, not sorted). ``image_size`` is ``(ch, H, W)``.
    ``generator`` is a torch.Generator on the CPU seeded from the run seed; every
    random draw a component makes should come from it so that runs repeat exactly.
    ``epochs`` is the run's total epoch count (for schedules such as DRW or CMO's
    mixing window).
    """

    class_counts: tuple[int, ...]
    image_size: tuple[int, int, int]
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    generator: torch.Generator = attrs.field(factory=lambda: torch.Generator().manual_seed(0))
    epochs: int = 1
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    def counts_tensor(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.tensor(self.class_counts, dtype=dtype, device=self.device)


class Component(abc.ABC):  # noqa: B024 - the abstract methods are each kind's (Sampler.batches, ...)
    """Base of every registered class.

    Subclasses set ``name`` (unique within the kind) and ``Params`` (an
    ``attrs.frozen`` class whose fields all have defaults, made with
    :func:`lsm_registry.params.param`). The first line of the class docstring is the
    one-line summary shown by ``lsm list-components``. A component that was renamed lists
    its old names in ``renamed_from`` and ``renamed_params``, so that recipes written for
    them keep working for a release (docs/compatibility.md).
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    #: Earlier names of this component: a recipe naming one still gets it, with a RenamedWarning
    #: (lsm_registry.renames). Read from the class's own body, never inherited.
    renamed_from: ClassVar[tuple[str, ...]] = ()
    #: Earlier parameter names, old -> current ``Params`` field; same rules as ``renamed_from``.
    renamed_params: ClassVar[Mapping[str, str]] = MappingProxyType({})

    @attrs.frozen
    class Params:
        pass

    def __init__(self, params: Any, context: Context):
        self.params = params
        self.context = context

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def configure_callbacks(self) -> Sequence["Callback"]:
        """Callbacks this component needs in the training loop (:class:`Callback`), fired after
        the engine's own and before the recipe's ``[run] callbacks``. A component that must see
        the training forwards, or act at an epoch's end, brings a callback here instead of
        asking the engine for a new method."""
        return ()


# ---------------------------------------------------------------------------- samplers


class Sampler(Component):
    """Yields the index batches of one epoch.

    Contract: ``batches(epoch, batch_size)`` yields exactly ``steps_per_epoch(batch_size)``
    pairs ``(background, foreground)``. ``background`` is a LongTensor (B,) of
    training-set indices; it is what an unmixed step trains on. By default it is an
    instance branch: each index at most once per epoch, shards of different ``rank``
    disjoint, together covering the set up to a dropped last batch. A sampler that
    sets ``draws_with_replacement = True`` instead draws its background with
    replacement by its own rule (cRT's class-balanced sampling), so an index may
    repeat within an epoch and on several ranks; its ranks still draw different
    streams. ``foreground`` is a LongTensor (B,) drawn by a rebalanced rule, or
    ``None`` for a single-branch sampler (mixers then use a permutation of the batch).
    Draws come from generators re-seeded per (run seed, epoch, rank), so a run and a
    resumed epoch repeat exactly.
    """

    kind = "sampler"
    #: True: the background stream is drawn with replacement (not one pass over the set).
    draws_with_replacement: ClassVar[bool] = False

    def __init__(self, params: Any, context: Context, labels: Tensor, rank: int = 0, world_size: int = 1):
        super().__init__(params, context)
        self.labels = labels
        self.rank = rank
        self.world_size = world_size

    @abc.abstractmethod
    def batches(self, epoch: int, batch_size: int) -> Iterator[tuple[Tensor, Optional[Tensor]]]: ...

    @abc.abstractmethod
    def steps_per_epoch(self, batch_size: int) -> int: ...


# ---------------------------------------------------------------------------- saliency


class SaliencyProvider(Component):
    """Scores every unit of the patch operator for each image.

    Contract: ``__call__(model, x, y, patch)`` takes the normalised float images
    ``x`` (B, ch, H, W) on the device, their labels ``y`` (B,) int64, and the patch
    operator; returns a float tensor (B, H/p, W/p) on the same device, every value
    ``>= 0`` and finite, for any input (a constant map becomes uniform). It must not
    change the model's parameters, its gradients, its batch-norm statistics or its
    train/eval mode.
    """

    kind = "saliency"

    @abc.abstractmethod
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, patch: "PatchOperator") -> Tensor: ...

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError before training when this provider cannot explain ``model``."""
        return None

    # Inside the engine every provider is called through ``scores_of_views`` with the
    # images' :class:`Views` (indices, crops, epoch), so it can mask the crops' padding or
    # reuse what it saw. Outside the engine (``lsm preview``, ``mix_batches`` without
    # views) ``__call__`` is used, so it must still work on its own. A provider with state
    # keeps it in ``state_dict`` (saved in every checkpoint, so a resumed run is
    # bit-identical). A provider that watches the training forwards (``cached-gradcam``)
    # does so through a callback it brings (``configure_callbacks`` returning the
    # ``saliency-observer`` callback, :mod:`lsm_registry.components.callbacks`), which
    # calls ``observed_layer``, ``observe``, ``end_epoch`` and ``epoch_fractions`` below.
    #
    # Deprecated: ``observes_training = True`` without such a callback. The engine then
    # attaches the observer itself and warns (DeprecationWarning); nothing of the 0.x ABI
    # is removed before 1.0.

    #: Deprecated; bring the ``saliency-observer`` callback from ``configure_callbacks`` instead.
    observes_training: ClassVar[bool] = False

    def observed_layer(self, model: nn.Module) -> nn.Module:
        """The module whose output ``observe`` receives (asked once, before training)."""
        raise NotImplementedError(f"saliency {self.name!r} sets observes_training but has no observed_layer()")

    def observe(self, model: nn.Module, features: Tensor, labels: Tensor, views: "Views") -> None:
        """One training forward's ``features`` (the observed layer's output, detached) of the images
        ``views``: what the ``saliency-observer`` callback hands on, after the first forward of every
        unmixed training step (train mode, before the update)."""

    def scores_of_views(self, model: nn.Module, x: Tensor, y: Tensor, patch: "PatchOperator", views: "Views") -> Tensor:
        """``__call__``'s contract, for training images whose indices and crops are known: what the
        engine calls for every provider, so that one can use the crops (``gradcam`` masks their
        padding) or, observing training, reuse what it saw."""
        return self(model, x, y, patch)

    def end_epoch(self, epoch: int) -> None:
        """A training epoch ended (called by the ``saliency-observer`` callback, on every process,
        so collectives are allowed here)."""

    def epoch_fractions(self) -> dict[str, tuple[float, float]]:
        """Per-epoch (numerator, denominator) pairs for metrics.jsonl, then reset; the
        ``saliency-observer`` callback sums them over processes and writes ``name = numerator / denominator``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


# ---------------------------------------------------------------------------- patches


class PatchOperator(Component):
    """Maps images to independent units and back, exactly.

    Contract: ``split(x)`` maps (B, ch, H, W) to (B, ch*p*p, H/p, W/p), one spatial
    cell per unit; ``merge`` is its exact inverse (bit for bit). ``grid(H, W)`` is
    the unit grid ``(H/p, W/p)`` and raises ValueError naming the sizes when p does
    not divide H and W.
    """

    kind = "patch"

    @property
    @abc.abstractmethod
    def size(self) -> int: ...

    @abc.abstractmethod
    def split(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def merge(self, u: Tensor) -> Tensor: ...

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.size
        if height % p or width % p:
            raise ValueError(f"patch size {p} does not divide the image size {height}x{width}")
        return height // p, width // p

    def expand(self, unit_map: Tensor) -> Tensor:
        """(B, h, w) per-unit values -> (B, 1, H, W) per-pixel values."""
        p = self.size
        return unit_map.unsqueeze(1).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)


# ---------------------------------------------------------------------------- mixers


@attrs.frozen(eq=False)
class MixResult:
    """What a mixer hands to the label fuser.

    ``images``: (B, ch, H, W) float, ``images = weight * x_f + (1 - weight) * x_b``.
    ``weight``: (B, 1, H, W) float in [0, 1], the per-pixel foreground weight.
    ``unit_mask``: (B, H/p, W/p) bool of pasted units, or None for mixers that do not
    work on units (CutMix boxes, Mixup); fusers then fall back to ``weight``.
    """

    images: Tensor
    weight: Tensor
    unit_mask: Optional[Tensor] = None


_WINDOW_HELP = "mixing stops at this 0-based epoch; negative counts from the end (-3: the last 3 epochs are not mixed); none: never stops"


@attrs.frozen
class MixerParams:
    """The knobs every mixer has: the mixing probability and the epoch window.

    Defined once so that every mixer, built-in or plugin, means the same thing by
    them and the recipe check for an empty window covers all of them. A mixer's
    ``Params`` derives from this class and may override the defaults by redeclaring a
    field with :func:`mix_prob`, :func:`mix_start` or :func:`mix_end`. The window
    is the 0-based epochs ``start_epoch <= epoch < stop``, where ``stop`` is
    ``end_epoch``, or ``epochs + end_epoch`` when negative, or ``epochs`` when None.
    """

    prob: float = param(1.0, help="probability that a batch is mixed", validator=_probability)
    start_epoch: int = param(0, help="first 0-based epoch that may be mixed", validator=_non_negative)
    end_epoch: Optional[int] = param(None, help=_WINDOW_HELP)

    def __attrs_post_init__(self) -> None:
        if self.end_epoch is not None and 0 <= self.end_epoch <= self.start_epoch:
            raise ParamError(
                "end_epoch",
                f"must be > start_epoch = {self.start_epoch} or negative (counted from the end) (got {self.end_epoch})",
            )

    def window(self, epochs: int) -> range:
        """The 0-based epochs in which a batch may be mixed, for a run of ``epochs``."""
        end = self.end_epoch
        stop = epochs if end is None else (end if end >= 0 else epochs + end)
        return range(self.start_epoch, min(stop, epochs))

    def describe_window(self) -> str:
        end = "none" if self.end_epoch is None else str(self.end_epoch)
        return f"start_epoch = {self.start_epoch} .. end_epoch = {end}"


def mix_prob(default: float, help: str = "probability that a batch is mixed") -> Any:
    """A ``prob`` field with another default, for a mixer's Params."""
    return param(default, help=help, validator=_probability)


def mix_start(default: int, help: str = "first 0-based epoch that may be mixed") -> Any:
    """A ``start_epoch`` field with another default, for a mixer's Params."""
    return param(default, help=help, validator=_non_negative)


def mix_end(default: Optional[int], help: str = "") -> Any:
    """An ``end_epoch`` field with another default, for a mixer's Params."""
    return param(default, help=help or _WINDOW_HELP)


class Mixer(Component):
    """Mixes a foreground (tail) batch into a background (head) batch.

    Contract: ``mix(x_f, x_b, saliency_f, patch)`` takes two float batches of equal
    shape (B, ch, H, W), the foreground's saliency (B, H/p, W/p) when the recipe
    has a saliency provider (always when ``needs_saliency``; otherwise None), and returns a :class:`MixResult`. ``Params`` derives
    from :class:`MixerParams` (probability and epoch window). ``active(epoch)`` says
    whether mixing may happen in this epoch (0-based) and ``coin()`` draws the
    per-batch decision; both use only ``params`` and ``context``.
    """

    kind = "mixer"
    Params = MixerParams  # type: ignore[assignment]  # each kind's Params replaces Component's empty one
    needs_saliency: ClassVar[bool] = False
    #: Label fuser used when the recipe has no [label_fuser] table.
    default_fuser: ClassVar[str] = "area"
    #: Whether ``mix`` works on the patch operator's units (then p must divide H and W).
    uses_patch: ClassVar[bool] = True
    #: Sampler the mixer needs (e.g. CMO: "dual-branch"); None: any sampler.
    requires_sampler: ClassVar[Optional[str]] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not (isinstance(cls.Params, type) and issubclass(cls.Params, MixerParams)):
            raise TypeError(
                f"mixer {cls.__qualname__}: Params must derive from lsm_registry.interfaces.MixerParams "
                "(the mixing probability and epoch window every mixer shares)"
            )

    @abc.abstractmethod
    def mix(self, x_f: Tensor, x_b: Tensor, saliency_f: Optional[Tensor], patch: PatchOperator) -> MixResult: ...

    def active(self, epoch: int) -> bool:
        return epoch in self.params.window(self.context.epochs)

    def coin(self) -> bool:
        prob = float(self.params.prob)
        if prob >= 1.0:
            return True
        if prob <= 0.0:
            return False
        return bool(torch.rand((), generator=self.context.generator).item() < prob)


# ---------------------------------------------------------------------------- label fusers


class LabelFuser(Component):
    """Turns a mix into soft targets.

    Contract: ``fuse(mix, y_f, y_b, saliency_f, saliency_b)`` returns a float tensor
    (B, C), each row a probability distribution (non-negative, sums to 1), where
    ``C = context.num_classes``. ``saliency_b`` is given only when
    ``needs_background_saliency`` is True.
    """

    kind = "label_fuser"
    needs_saliency: ClassVar[bool] = False
    needs_background_saliency: ClassVar[bool] = False

    @abc.abstractmethod
    def fuse(
        self,
        mix: MixResult,
        y_f: Tensor,
        y_b: Tensor,
        saliency_f: Optional[Tensor],
        saliency_b: Optional[Tensor],
    ) -> Tensor: ...

    def two_label(self, lam_f: Tensor, y_f: Tensor, y_b: Tensor) -> Tensor:
        """``lam_f e_{y_f} + (1 - lam_f) e_{y_b}`` without a Python loop."""
        c = self.context.num_classes
        lam_f = lam_f.reshape(-1, 1).to(torch.float32)
        target = (1.0 - lam_f) * nn.functional.one_hot(y_b, c).to(lam_f.dtype)
        return target + lam_f * nn.functional.one_hot(y_f, c).to(lam_f.dtype)


# ---------------------------------------------------------------------------- losses


class Loss(Component):
    """A training loss on logits and class indices or soft targets.

    Contract: ``__call__(logits, target, mixed=None)`` with logits (B, C) float and
    target either (B,) int64 class indices or (B, C) float distributions; returns a
    scalar. ``mixed`` is None for an unmixed batch, otherwise an object with ``y_f``,
    ``y_b`` (B,) int64 and ``lam`` (B,) float (a MixedBatch) such that
    ``target = lam e_{y_f} + (1 - lam) e_{y_b}``, for losses that weight each label on
    its own; a loss may ignore it and use ``target`` alone.
    ``set_epoch(epoch)`` is called at the start of every epoch (0-based) for
    schedules such as DRW. ``eval_logits`` maps model logits to the ones used for
    prediction at test time (identity unless the loss says otherwise).
    ``needs_normed_head``: the model must end in a normalised (cosine) linear layer.
    ``needs_features``: the loss also reads the features the classifier sees (IB's
    feature norm). The engine then computes the logits as ``classifier(h)`` with
    ``h = forward_features(x).mean(dim=(2, 3))`` (the model's documented feature API;
    a model without it is refused before training) and calls
    ``loss(logits, target, mixed, features=h)``, ``h`` float32 (B, K). Losses that do
    not declare it are called without the keyword, so they need not accept it.
    ``reads_outputs``: names of the parts of the model's training output
    (:class:`ModelOutput`, e.g. ``"expert_logits"``) the loss reads; the engine then calls
    ``loss(logits, target, mixed, outputs=parts)`` with the model's ``parts`` (float32), and
    a model whose ``output_parts`` lacks one is refused before training. Such a loss must
    still work when called without ``outputs`` (the conformance kit does), on ``logits``
    alone. ``mixed`` may also be the :class:`SecondBatch` of a model that trains on two
    batches: the same ``y_f``, ``y_b``, ``lam``.
    ``views_per_image``: how many independently augmented copies of each sampled image a
    step trains on (contrastive losses compare two views of one image; 1 otherwise). With
    V > 1 the engine repeats the sampler's index sets V times, view-major, before fetching
    and augmenting them: row ``v * B + i`` of the logits, target and output parts is view
    ``v`` of image ``i``, each view with its own crop and flip (its own decode-time crop
    for a file-backed set), and a mixer mixes the V * B rows like any batch.
    """

    kind = "loss"
    needs_normed_head: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    #: Parts of the model's training output (ModelOutput.parts) this loss reads; () reads logits only.
    reads_outputs: ClassVar[tuple[str, ...]] = ()

    @property
    def views_per_image(self) -> int:
        """Independently augmented views of each sampled image per step (1: the image once)."""
        return 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @abc.abstractmethod
    def __call__(self, logits: Tensor, target: Tensor, mixed: Any = None) -> Tensor: ...

    def eval_logits(self, logits: Tensor) -> Tensor:
        return logits


# ---------------------------------------------------------------------------- factories


class ModelFactory(Component):
    """Builds a classifier.

    Contract: ``build(num_classes, in_channels, normed_head)`` returns an
    ``nn.Module`` mapping (B, ch, H, W) float to logits (B, C). The module exposes
    ``saliency_layers() -> dict[str, nn.Module]`` (named layers Grad-CAM may hook,
    the default first) and, when its head is global-average-pooling followed by a
    linear layer, ``forward_features(x) -> (B, K, h, w)`` and ``classifier`` (the
    linear layer), which allows the one-forward Grad-CAM fast path. A second stage
    (``[stage]``) tells the head from the backbone by ``classifier`` alone, and LWS
    (``train = "scales"``) trains an ``nn.Parameter`` ``logit_scale`` (C,) that the
    module multiplies its logits by, so a plugin model takes part by exposing them.
    ``check_input(image_size)`` raises ValueError when the model cannot take it.
    The context given to a model factory has the class counts of the training split.

    Two general extension points, for models that are more than one forward of one batch
    (the engine names no model; each is declared by the module and checked before training):

    - **Training output.** In training mode the forward may return a :class:`ModelOutput`
      (its logits and named ``parts``, e.g. every expert's logits) instead of a tensor, as
      torchvision's GoogLeNet returns its auxiliary logits in training only; it declares
      the part names in a class attribute ``output_parts``. The engine trains on
      ``ModelOutput.logits`` and hands ``parts`` to a loss that names them in
      ``Loss.reads_outputs``. In eval mode (evaluation, saliency, export) it returns the
      tensor.
    - **A second batch.** A module with ``takes_second_batch = True`` is trained on the
      sampler's two index sets at once: ``forward(x, x_second)`` every step, ``x`` the
      sampler's first (instance) batch, ``x_second`` its second one. Its attribute
      ``second_batch_share`` (a float in [0, 1], read once per step) is the share of the loss
      the second batch's labels get: the target is the two-label mix
      ``share e_{y_second} + (1 - share) e_y`` (:class:`SecondBatch`). ``forward(x)`` alone
      is its test-time output. The sampler must yield a second index set, and neither a
      mixer nor a feature-reading loss or optimizer may be configured with it.

    Like every component, a model factory may bring callbacks (``configure_callbacks``):
    the place for a per-epoch setting of the module (BBN's cumulative-learning weight).
    """

    kind = "model"

    @abc.abstractmethod
    def build(self, num_classes: int, in_channels: int, normed_head: bool) -> nn.Module: ...

    def check_input(self, image_size: tuple[int, int, int]) -> None:
        return None


@attrs.frozen(eq=False)
class ModelOutput:
    """What a model's forward may return in training mode: its ``logits`` (B, C), the output
    everything that reads logits uses (the loss by default, ``on_forward``, the running metrics),
    and named ``parts`` (tensors) for a loss that declares ``reads_outputs``; e.g. RIDE's
    ``{"expert_logits": (E, B, C)}``. See :class:`ModelFactory`."""

    logits: Tensor
    parts: Mapping[str, Tensor] = attrs.field(factory=dict)


def logits_of(output: Any) -> Tensor:
    """The logits of a model's output: the tensor itself, or :attr:`ModelOutput.logits`."""
    return output.logits if isinstance(output, ModelOutput) else output


@attrs.frozen(eq=False)
class Crops:
    """Where each training image of a batch came from: the crop and flip its augmentation applied.

    Kept so that per-image results computed on the source image (a cached saliency
    map, say) can be cut to what the model saw. ``boxes`` (B, 4) float32 is
    ``(left, top, width, height)`` in pixels of the source: the stored image for
    in-memory sets (``crop32`` boxes may reach into the zero padding, so they can start
    at -4), the original file for file-backed ones. ``flips`` (B,) bool: the crop was
    mirrored left-right after cropping. ``sizes`` (B, 2) int64: the source's
    ``(height, width)``. All on the CPU.
    """

    boxes: Tensor
    flips: Tensor
    sizes: Tensor

    def __len__(self) -> int:
        return int(self.flips.numel())

    def take(self, rows: Tensor) -> "Crops":
        """The crops of ``rows`` (indices into this batch), in that order."""
        rows = rows.cpu()
        return Crops(self.boxes[rows], self.flips[rows], self.sizes[rows])


@attrs.frozen(eq=False)
class Views:
    """Which training images a batch holds and how each was cut, in epoch ``epoch`` (0-based).

    ``indices`` (B,) int64 are indices into the training split, on the device;
    ``crops`` says the box and flip of each (:class:`Crops`). What an observing
    saliency provider (``SaliencyProvider.observes_training``) is given.
    """

    indices: Tensor
    crops: Crops
    epoch: int

    def take(self, rows: Tensor) -> "Views":
        return Views(self.indices[rows.to(self.indices.device)], self.crops.take(rows), self.epoch)


class Split(abc.ABC):
    """One split of a data set: labels in memory, images fetched by index batch.

    ``fetch(idx)`` returns uint8 images (B, ch, H, W) for a LongTensor of indices, on
    ``device``. In-memory sets index a tensor; file-backed sets decode with workers,
    and their ``fetch`` is the test-time view (resize + center crop): their training
    view is cut while decoding (``augment = "decoded"``, :class:`LTData`).
    """

    labels: Tensor

    @abc.abstractmethod
    def fetch(self, idx: Tensor, device: torch.device) -> Tensor: ...

    def __len__(self) -> int:
        return int(self.labels.numel())


class DecodingSplit(Split):
    """A split that cuts its training view while it decodes (file-backed sets, random-resized crops).

    ``fetch`` is the test-time view; ``fetch_train(idx, seed)`` returns uint8 training crops
    (B, ch, H, W) on the CPU with their :class:`Crops`, drawn from ``seed`` alone, so a step
    repeats exactly. ``workers`` decoding processes and ``prefetch`` batches decoded ahead
    per worker tell the engine's planned loader how far ahead to decode. The engine only
    normalises what it returns.
    """

    workers: int = 0
    prefetch: int = 2

    @abc.abstractmethod
    def fetch_train(self, idx: Tensor, seed: int) -> tuple[Tensor, "Crops"]: ...


class TensorSplit(Split):
    """A split decoded once into a uint8 tensor (small sets: CIFAR, Fashion-MNIST, synthetic)."""

    def __init__(self, images: Tensor, labels: Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, ch, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError("images and labels differ in length")
        self.images = images
        self.labels = labels.to(torch.int64)
        self._device_images: dict[str, Tensor] = {}

    def fetch(self, idx: Tensor, device: torch.device) -> Tensor:
        key = str(device)
        if key not in self._device_images:
            self._device_images[key] = self.images.to(device)
        images = self._device_images[key]
        return images.index_select(0, idx.to(images.device))


@attrs.frozen(eq=False)
class LTData:
    """A long-tailed data set ready for the engine.

    ``train`` / ``test`` splits, ``class_names`` (C,), ``mean`` / ``std`` per channel
    for normalisation, ``image_size`` (ch, H, W) of what ``fetch`` returns and
    ``augment`` = "crop32" (pad-4 random crop + flip) | "rrc" (random resized crop +
    flip) | "none", applied by the engine on the device. A training split that is a
    :class:`DecodingSplit` crops and flips while it decodes instead, and the engine only
    normalises (its ``augment`` then says "decoded", kept for 0.x readers; the split's
    type decides). ``val`` is an optional balanced validation split (``val_per_class``
    of the sets that support it; docs/data.md); the engine then picks ``best_*`` on it.
    """

    train: Split
    test: Split
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: tuple[int, int, int]
    augment: str = "crop32"
    val: Optional[Split] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def decodes_training_view(self) -> bool:
        """Whether the training split cuts its own crops while decoding (a :class:`DecodingSplit`)."""
        return isinstance(self.train, DecodingSplit)

    def __attrs_post_init__(self) -> None:
        if self.augment == "decoded" and not self.decodes_training_view:
            raise ValueError(
                f'augment = "decoded" needs a DecodingSplit as the training split (got {type(self.train).__name__})'
            )

    def class_counts(self) -> tuple[int, ...]:
        counts = torch.bincount(self.train.labels, minlength=self.num_classes)
        return tuple(int(c) for c in counts)


class DatasetFactory(Component):
    """Builds an :class:`LTData`.

    Contract: ``build()`` returns the data set or raises ``FileNotFoundError`` /
    ``ValueError`` with one line naming what is missing and where it looked. The
    context given to a dataset factory has empty class counts (they are not known
    yet) and the run seed.
    """

    kind = "dataset"

    @abc.abstractmethod
    def build(self) -> LTData: ...

    def test_view(self) -> Optional[list[dict[str, Any]]]:
        """How a test image becomes the model's input, in order (resize, crop, pad), for the
        model.json of an export: a program scoring its own images must prepare them the way
        the test split was, or the exported model sees another distribution. [] when the
        stored images are the input as they are; None when the data set does not say (an
        export then says the view is unknown rather than guess). Needs no data built."""
        return None


# ----------------------------------------------------------------------------- loggers


@attrs.frozen
class RunInfo:
    """What a logger learns once, when a run starts (or resumes).

    ``hparams`` is the resolved recipe flattened to ``"table.key": value`` (tuples and
    None as they are: a tracker that takes only scalars converts them itself).
    ``run_dir`` is the run folder, None when the run writes nothing (tests, benchmarks);
    a logger keeps its own files under ``run_dir / "loggers" / name`` so that a resume
    finds them again (e.g. the tracker's run id). ``recipe_toml`` is the resolved
    recipe as the run folder's recipe.toml holds it.
    """

    run_name: str
    run_dir: Optional[Path]
    hparams: dict[str, Any]
    recipe_toml: str
    class_names: tuple[str, ...]
    class_counts: tuple[int, ...]
    epochs: int
    steps_per_epoch: int
    resumed: bool = False


class Logger(Component):
    """Sends a run to an experiment tracker (TensorBoard, MLflow, W&B, a plugin's own).

    Contract: the engine's reporter calls, on rank 0 only and in this order,
    ``start`` once, then ``log_scalars`` every log interval, ``log_evaluation``
    after every evaluation, ``log_record`` after every epoch (``step`` is the global step, steps of earlier epochs
    included, so curves from a resumed run continue), ``log_image`` for each picture
    the run folder gets, ``finish`` with the summary when the run completes, and
    ``close`` always (also after a failure or a stop). Scalar keys are
    ``"group/name"``: ``train/loss``, ``train/lr``, ``train/images_per_s``,
    ``train/mixed_fraction``, ``train/fg_label_weight``, ``test/top1``, ``test/many``,
    ``test/medium``, ``test/few``, ``test/rare3`` and ``val/...`` when the run has a
    validation split. ``per_class`` maps class names to test accuracy (None: no
    test image of that class).

    A logger may raise anything: the reporter reports it in one line, stops calling
    that logger and the run goes on; checkpoints never depend on a logger. Set
    ``requires`` to the modules the logger imports (e.g. ``("mlflow",)``) and
    ``install_hint`` to the command that installs them: a run that asks for a logger
    whose modules are missing fails before training, with that hint.
    """

    kind = "logger"
    requires: ClassVar[tuple[str, ...]] = ()
    install_hint: ClassVar[str] = ""

    @classmethod
    def missing_modules(cls) -> list[str]:
        return [m for m in cls.requires if importlib.util.find_spec(m) is None]

    @abc.abstractmethod
    def start(self, run: RunInfo) -> None: ...

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """Per-step training scalars, every log interval."""

    def log_evaluation(
        self, step: int, epoch: int, metrics: dict[str, float], per_class: dict[str, Optional[float]]
    ) -> None:
        """One evaluation's accuracies (fractions in 0..1), after ``epoch`` (1-based) epochs."""

    def log_record(self, record: dict[str, Any]) -> None:
        """An epoch's whole record, as metrics.jsonl gets it (per_class as a list; ``top1`` only after an evaluation)."""

    def log_image(self, name: str, path: Path, step: int) -> None:
        """A PNG the run folder just got (per_class.png, confusion.png, mixed_samples.png)."""

    def finish(self, summary: dict[str, Any]) -> None:
        """The run completed; ``summary`` is what summary.json holds."""

    def close(self) -> None:
        """Release the tracker (flush files, end its run); called after ``finish`` or a failure."""


# ----------------------------------------------------------------------------- optimizers


#: ``head(features, logits, target, loss_of) -> loss``: what an optimizer with
#: ``needs_features`` may put between the classifier and the loss (see :class:`Optimizer`).
Head = Callable[[Tensor, Tensor, Tensor, Callable[[Tensor], Tensor]], Tensor]


class StepClosure(abc.ABC):
    """One training step's batch, as a callable the optimizer may run more than once.

    ``closure(head=None)`` zeroes the gradients, runs the model on the step's (already
    mixed) batch, the loss and its backward pass, and returns the loss, detached. Its
    images and targets are fixed for the step, so a second call recomputes the loss of
    the same batch at the current weights (SAM's second pass). From the second call of
    a step on, batch-norm running statistics are held, so a step counts its batch
    once. ``head`` (optimizers with ``needs_features`` only) receives the pooled
    features ``h`` (B, K) float32, the logits ``classifier(h)`` (B, C), the target and
    ``loss_of(logits)``, the recipe's loss bound to this batch, and returns the scalar
    to backpropagate.
    """

    @abc.abstractmethod
    def __call__(self, head: Optional[Head] = None) -> Tensor: ...


class Optimizer(Component):
    """Turns a step's loss into one parameter update; it owns the forward/backward passes.

    Built as ``cls(params, context, base)``. ``base`` is the ``torch.optim.SGD`` over
    the trainable parameters, set up from [optim] (``lr``, ``momentum``,
    ``weight_decay``, ``nesterov``); the engine writes the scheduled learning rate
    into ``base.param_groups`` every epoch. Contract: ``step(closure, scaler)`` is
    called once per training step with a :class:`StepClosure`; it calls the closure
    at least once and ends the step with exactly one update of ``base`` (through
    ``scaler.step(base); scaler.update()`` when it declares
    ``supports_grad_scaler``), leaving the parameters where that update puts them.
    It returns the loss of its first closure call (the loss at the step's starting
    weights). ``state_dict()`` / ``load_state_dict()`` are what the run's checkpoints
    keep (default: the base optimizer's state, so a resume is exact).
    ``supports_grad_scaler``: False makes a recipe with ``[run].amp = "fp16"`` fail
    validation (the scaler's loss scale cannot be undone between two passes).
    ``needs_features``: the optimizer passes a ``head`` to the closure; the engine then
    refuses a model without ``forward_features`` and ``classifier``. ``attach(model)`` is
    called once with the (unwrapped) model before the first step; raise ValueError when
    the optimizer cannot train it (the run stops with ``[optim] NAME: MESSAGE``).
    """

    kind = "optimizer"
    supports_grad_scaler: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False

    def __init__(self, params: Any, context: Context, base: torch.optim.Optimizer):
        super().__init__(params, context)
        self.base = base

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    def attach(self, model: nn.Module) -> None:
        return None

    @abc.abstractmethod
    def step(self, closure: StepClosure, scaler: "torch.amp.GradScaler") -> Tensor: ...

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state)


# ----------------------------------------------------------------------------- callbacks


@attrs.frozen(eq=False)
class StepBatch:
    """One training step as the callbacks see it, before the optimizer's passes.

    ``images`` (B, ch, H, W) and ``target`` (labels (B,) or soft targets (B, C)) are what
    the model trains on; ``labels`` (B,) and ``views`` are the background batch's (``views``
    None unless a saliency provider is configured); ``mixed`` is the step's
    :class:`lsm_registry.mixing.MixedBatch` or None when the step did not mix. ``step`` counts
    the epoch's steps from 1, a resumed epoch included. ``second`` is the step's
    :class:`SecondBatch` when the model trains on two batches (``takes_second_batch``), else None.
    ``indices`` (B,) int64 are the background batch's indices into the training split, row for
    row (repeated view-major like the rows when ``Loss.views_per_image`` > 1), as the sampler
    yielded them (on the CPU: the step copies nothing to the device for them): what a callback
    keeping per-image state (SBCL's subclass labels) looks its rows up by, moving them itself.
    """

    epoch: int
    step: int
    images: Tensor
    target: Tensor
    labels: Tensor
    views: Optional["Views"]
    mixed: Any
    second: Optional["SecondBatch"] = None
    indices: Optional[Tensor] = None


@attrs.frozen(eq=False)
class SecondBatch:
    """The sampler's second batch, for a model that trains on two batches at once (``takes_second_batch``, :class:`ModelFactory`).

    ``images`` (B, ch, H, W) are the second input of the model's forward; ``y_f`` (B,) their
    labels, ``y_b`` (B,) the first batch's labels and ``lam`` (B,) the model's
    ``second_batch_share``, so that ``target = lam e_{y_f} + (1 - lam) e_{y_b}`` (B, C) has the
    two-label form of a mixed batch: the loss gets this object as its ``mixed`` argument and
    weights each label on its own (with DRW weights: ``(1 - lam) CE_w(y_b) + lam CE_w(y_f)``,
    BBN's loss).
    """

    images: Tensor
    target: Tensor
    y_f: Tensor
    y_b: Tensor
    lam: Tensor


class Callback(Component):
    """Code that runs at the training loop's fixed points; every hook does nothing by default.

    ``loop`` is the running :class:`lsm_registry.engine.Trainer`. A callback may read
    ``loop.recipe``, ``loop.module`` (the bare model), ``loop.optimizer`` (its
    ``param_groups``), ``loop.saliency``, ``loop.device``, ``loop.history``,
    ``loop.run_dir`` (None without a run folder), ``loop.last_checkpoint()`` and
    ``loop.all_reduce(tensor, op)`` (a no-op in one process); it changes the run only
    through what it is documented to own (the learning rate, a provider's state, the per-epoch
    setting of the model whose factory brings it) or by
    raising. Keep device work asynchronous: only ``on_check`` runs where the loop reads
    the device anyway.

    Order within one point: the engine's own callbacks (``lr-schedule``, ``nan-guard``),
    then those the components bring (``configure_callbacks``: sampler, saliency, patch,
    mixer, label fuser, loss, optimizer, model), then the recipe's ``[run] callbacks`` in the
    order listed; the run reporter (progress, run folder, trackers) comes after all of
    them. Order of points in one epoch: ``on_epoch_start``; per step ``on_batch``, one
    ``on_forward`` per forward pass, ``on_step_end``; ``on_check`` every 10 steps, before a
    checkpoint and at the epoch's end; ``on_epoch_end``; ``on_evaluate`` when the epoch
    evaluates; then the checkpoint (``state_dict``). ``on_fit_start`` comes once before the
    first epoch (after a resume has loaded the checkpoint and ``load_state_dict``),
    ``on_fit_end`` once after the last with the summary.
    """

    kind = "callback"
    #: Recipe tables the conformance kit's short run needs for this callback, each merged over
    #: the kit's tiny recipe: the model it sets (BBN's weight needs model ``bbn``), or the
    #: component that brings it. Empty: the tiny CE run as it is.
    conformance_tables: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: True for a callback a component brings (``configure_callbacks``) and a recipe does not
    #: list: the conformance run then names only ``conformance_tables``.
    brought_by_component: ClassVar[bool] = False

    def on_fit_start(self, loop: Any) -> None:
        """Training starts or resumes (``loop.history`` holds the epochs already done)."""

    def on_epoch_start(self, loop: Any, epoch: int) -> None:
        """0-based ``epoch`` starts (after the epoch's re-seed)."""

    def on_batch(self, loop: Any, batch: StepBatch) -> None:
        """A step's batch is ready and the optimizer is about to run its passes."""

    def on_forward(self, loop: Any, batch: StepBatch, logits: Tensor, features: Optional[Tensor]) -> None:
        """One forward pass of the step (SAM makes two): its logits and, when the loss or the
        optimizer reads them, the pooled features."""

    def on_step_end(self, loop: Any, batch: StepBatch, loss: Tensor) -> None:
        """The optimizer updated the weights; ``loss`` is the step's loss on the device."""

    def on_check(self, loop: Any, epoch: int) -> None:
        """The loop reads the device here (every 10 steps, before any checkpoint, at the epoch's
        end): the place for checks that need a host sync; raise to stop the run."""

    def on_epoch_end(self, loop: Any, epoch: int, record: dict[str, Any]) -> None:
        """The epoch's steps are done; ``record`` (what metrics.jsonl gets) may gain keys."""

    def on_evaluate(self, loop: Any, epoch: int, record: dict[str, Any]) -> None:
        """The epoch was evaluated; ``record`` holds the test (and val, train) metrics."""

    def on_fit_end(self, loop: Any, summary: dict[str, Any]) -> None:
        """Every epoch ran; ``summary`` is what summary.json gets."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of this callback (saved in every checkpoint; tensors, numbers,
        strings, lists and dicts only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
