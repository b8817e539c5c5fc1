"""Building a run from a recipe: device, seed, data, model, processes, components and optimizer.

:func:`build_run` returns a plain :class:`RunParts`; the training loop
(:class:`lsm_registry.engine.Trainer`) takes it and only trains. Each step below is its
own function, so a test, a benchmark or another loop can build what it needs and no more,
and every check that can fail runs before the first step, with one line naming the
setting.
"""

from __future__ import annotations

import os
import random
from typing import Any, Optional

import attrs
import numpy as np
import torch
from torch import Tensor, nn

from .components.callbacks import LR_FACTOR
from .data.augment import stats_tensor
from .errors import DataError, LSMError
from .interfaces import (
    Context,
    LabelFuser,
    Loss,
    LTData,
    Mixer,
    ModelFactory,
    Optimizer,
    PatchOperator,
    SaliencyProvider,
    Sampler,
)
from .mixing import MixingStep
from .recipe import Recipe
from .registry import Registry
from .stages import batch_norms, load_parent, trainable_parameters


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LSMError(f'[run].device = "{spec}" but CUDA is not available here; use "cpu" or "auto"')
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LSMError(f'[run].device = "{spec}" but this machine has {torch.cuda.device_count()} GPU(s)')
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@attrs.frozen
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size from torchrun's environment (one process when absent)."""
    env = os.environ
    return DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def build_data(recipe: Recipe, registry: Registry) -> LTData:
    """The recipe's data set; a missing file or a bad value becomes one line naming the data set."""
    spec = recipe.data
    factory = spec.build(registry, Context(class_counts=(), image_size=(0, 0, 0), seed=recipe.run.seed))
    try:
        return factory.build()
    except (FileNotFoundError, ValueError, OSError) as exc:
        message = str(exc) if not isinstance(exc, FileNotFoundError) or str(exc) else f"missing file {exc.filename}"
        raise DataError(f"[data] {spec.name}: {message}") from None


@attrs.define(eq=False)
class RunParts:
    """Everything a run trains with, built and checked; the loop's attributes of the same names."""

    recipe: Recipe
    registry: Registry
    dist: DistInfo
    device: torch.device
    data: LTData
    class_counts: tuple[int, ...]
    generator: torch.Generator
    context: Context
    loss: Loss
    module: nn.Module  # the bare model (SyncBatchNorm-converted under CUDA DDP)
    model: nn.Module  # what the forward goes through: ``module``, or its DDP wrapper
    memory_format: torch.memory_format
    parent: Optional[dict[str, Any]]
    sampler: Sampler
    mixer: Optional[Mixer]
    patch: Optional[PatchOperator]
    saliency: Optional[SaliencyProvider]
    fuser: Optional[LabelFuser]
    mixing: Optional[MixingStep]
    optimizer: Optimizer
    needs_features: bool
    scaler: torch.amp.GradScaler
    autocast_dtype: Optional[torch.dtype]
    _batch_norms: list[nn.Module]
    labels_on_device: Tensor
    mean: Tensor
    std: Tensor
    #: The model's factory: a component like the others, which may bring callbacks (configure_callbacks).
    model_factory: Optional[ModelFactory] = None


def run_device(recipe: Recipe, dist: DistInfo) -> torch.device:
    device = resolve_device(recipe.run.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if recipe.run.amp != "none" and device.type != "cuda":
        raise LSMError(f'[run].amp = "{recipe.run.amp}" needs a CUDA device (device is {device})')
    return device


def training_data(recipe: Recipe, registry: Registry, dist: DistInfo) -> tuple[LTData, tuple[int, ...]]:
    """The data set and its class counts: every class keeps an image, and a batch fits the shard."""
    data = build_data(recipe, registry)
    counts = data.class_counts()
    if min(counts) == 0:
        empty = [data.class_names[c] for c, n in enumerate(counts) if n == 0]
        raise DataError(f"[data] {recipe.data.name}: no training image left for class(es) {', '.join(empty[:5])}")
    # A batch larger than the training shard would train on a short batch every step, silently.
    batch_size, shard = recipe.optim.batch_size, len(data.train) // dist.world_size
    if batch_size > shard:
        where = f"{shard} images per process" if dist.enabled else f"{shard} images"
        raise LSMError(
            f"{recipe.path} [optim].batch_size = {batch_size} is larger than the training set of "
            f"{recipe.data.name} ({where}); lower optim.batch_size"
        )
    return data, counts


def build_model(
    recipe: Recipe,
    registry: Registry,
    context: Context,
    data: LTData,
    loss: Loss,
    factory: Optional[ModelFactory] = None,
) -> nn.Module:
    """The recipe's model, from ``factory`` when the caller keeps it (its callbacks), else a new one."""
    factory = factory or recipe.model.build(registry, context)
    try:
        factory.check_input(data.image_size)
        return factory.build(data.num_classes, data.image_size[0], loss.needs_normed_head)
    except ValueError as exc:
        raise LSMError(f"[model] {recipe.model.name}: {exc}") from None


def wrap_distributed(module: nn.Module, dist: DistInfo, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(the bare module, what the forward goes through): DDP under several processes."""
    if not dist.enabled:
        return module, module
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return module, nn.parallel.DistributedDataParallel(module, device_ids=[device.index])
    # CPU: SyncBatchNorm needs CUDA; DDP broadcasts rank 0's batch-norm buffers every
    # forward instead, so every process evaluates with the same statistics.
    return module, nn.parallel.DistributedDataParallel(module)


def mixing_components(
    recipe: Recipe,
    registry: Registry,
    context: Context,
    module: nn.Module,
    image_size: tuple[int, int, int],
) -> tuple[Optional[Mixer], Optional[PatchOperator], Optional[SaliencyProvider], Optional[LabelFuser]]:
    """The mixer, patch operator, saliency provider and label fuser, checked against the images and the model."""
    mixer = recipe.mixer.build(registry, context) if recipe.mixer else None
    patch = recipe.patch.build(registry, context) if recipe.patch else None
    saliency = recipe.saliency.build(registry, context) if recipe.saliency else None
    fuser = recipe.label_fuser.build(registry, context) if recipe.label_fuser else None
    if mixer is not None and patch is not None and (mixer.uses_patch or saliency is not None):
        try:
            patch.grid(image_size[1], image_size[2])
        except ValueError as exc:
            raise LSMError(f"[patch] {recipe.patch.name}: {exc}") from None
    if saliency is not None:
        try:
            saliency.check_model(module)
        except ValueError as exc:
            raise LSMError(f"{recipe.path} [saliency]: {exc}") from None
    return mixer, patch, saliency, fuser


def parameter_groups(recipe: Recipe, module: nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters as SGD's groups: those ``[optim] lr_groups`` names, each with its
    ``lr_factor`` on the scheduled lr, after one group of the rest (left out when empty).

    A name takes the parameter of that name or every parameter under the module of that name
    (``classifier`` takes ``classifier.weight`` and ``classifier.bias``); the first name that
    matches a parameter wins. A name that matches no trainable parameter would set nothing and
    stops the run in one line.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    lr = recipe.optim.lr
    groups: list[dict[str, Any]] = [
        {"params": [], "lr": lr * factor, LR_FACTOR: factor} for _, factor in recipe.optim.lr_groups
    ]
    rest: list[nn.Parameter] = []
    for name, p in named:
        hit = next(
            (i for i, (g, _) in enumerate(recipe.optim.lr_groups) if name == g or name.startswith(g + ".")), None
        )
        (groups[hit]["params"] if hit is not None else rest).append(p)
    for (name, _), group in zip(recipe.optim.lr_groups, groups):
        if not group["params"]:
            trainable = ", ".join(n for n, _ in named[:6]) + (", ..." if len(named) > 6 else "")
            raise LSMError(
                f"{recipe.path} [optim].lr_groups: {name!r} names no trainable parameter of model "
                f"{recipe.model.name!r} (trainable: {trainable or 'none'})"
            )
    return ([{"params": rest}] if rest else []) + groups


def build_optimizer(recipe: Recipe, registry: Registry, context: Context, module: nn.Module) -> Optimizer:
    """The optimizer component around the SGD update every optimizer uses (not yet attached to the model)."""
    opt = recipe.optim
    base = torch.optim.SGD(
        parameter_groups(recipe, module),
        lr=opt.lr,
        momentum=opt.momentum,
        weight_decay=opt.weight_decay,
        nesterov=opt.nesterov and opt.momentum > 0,
    )
    spec = recipe.optimizer
    return registry.get("optimizer", spec.name)(spec.params, context, base)


def attach_optimizer(recipe: Recipe, optimizer: Optimizer, module: nn.Module) -> None:
    try:
        optimizer.attach(module)
    except ValueError as exc:
        raise LSMError(f"{recipe.path} [optim] {recipe.optimizer.name}: {exc}") from None


def check_feature_api(recipe: Recipe, module: nn.Module, loss: Loss, optimizer: Optimizer, dist: DistInfo) -> None:
    """A loss or optimizer that reads the features needs the model's documented feature API."""
    who = " and ".join(
        w
        for w, needs in (
            (f"loss {recipe.loss.name!r}", loss.needs_features),
            (f"optimizer {recipe.optimizer.name!r}", optimizer.needs_features),
        )
        if needs
    )
    if not (
        callable(getattr(module, "forward_features", None))
        and isinstance(getattr(module, "classifier", None), nn.Module)
    ):
        raise LSMError(
            f"{recipe.path} [model] {recipe.model.name}: {who} reads the features the classifier "
            "sees, and this model has no forward_features(x) and classifier (docs/contracts.md, model)"
        )
    if dist.enabled:
        raise LSMError(
            f"{recipe.path}: {who} reads the model's features, which bypasses DistributedDataParallel's "
            "gradient synchronisation; run it in one process"
        )


def check_second_batch(
    recipe: Recipe, module: nn.Module, sampler: Sampler, mixer: Optional[Mixer], loss: Loss, optimizer: Optimizer
) -> None:
    """A model that trains on the sampler's two batches at once (``takes_second_batch``, the
    ModelFactory contract) needs a sampler that yields a second index set (its first batch of
    epoch 0 tells), and nothing else may claim that batch or bypass the two-input forward:
    not a mixer (its foreground) nor a loss or optimizer that reads the features of one batch."""
    if not getattr(module, "takes_second_batch", False):
        return
    model = recipe.model.name
    if mixer is not None:
        raise LSMError(
            f"{recipe.path} [mixer].name = {recipe.mixer.name!r}: model {model!r} trains on the sampler's "
            "second batch itself, so no mixer can take it as its foreground; remove [mixer]"
        )
    for table, name, component in (("loss", recipe.loss.name, loss), ("optim", recipe.optimizer.name, optimizer)):
        if component.needs_features:
            raise LSMError(
                f"{recipe.path} [{table}] {name}: reads the features of one batch, and model {model!r} trains "
                "on two batches at once through its own forward; choose another"
            )
    _, second = next(iter(sampler.batches(0, recipe.optim.batch_size)), (None, None))
    if second is None:
        raise LSMError(
            f"{recipe.path} [sampler].name = {recipe.sampler.name!r}: model {model!r} trains on the sampler's "
            "second index set, and this sampler yields none; use a two-branch sampler (reversed, dual-branch)"
        )


def check_model_outputs(recipe: Recipe, module: nn.Module, loss: Loss, optimizer: Optimizer) -> None:
    """A loss that reads parts of the model's training output (``Loss.reads_outputs``) needs a
    model that declares them (``output_parts``), reached through its forward (not the feature path)."""
    wanted = tuple(loss.reads_outputs)
    if not wanted:
        return
    given = tuple(getattr(module, "output_parts", ()))
    missing = [part for part in wanted if part not in given]
    where = f"{recipe.path} [loss].name = {recipe.loss.name!r}"
    if missing:
        gives = ", ".join(given) if given else "nothing but its logits"
        raise LSMError(
            f"{where}: reads the model's {', '.join(missing)} from its training output, and model "
            f"{recipe.model.name!r} gives {gives}; choose a model that gives them (docs: ModelOutput)"
        )
    if loss.needs_features or optimizer.needs_features:
        who = f"optimizer {recipe.optimizer.name!r}" if optimizer.needs_features else "its own needs_features"
        raise LSMError(
            f"{where}: reads the model's training output, which the feature path of {who} bypasses "
            "(it computes the logits from the features); choose another"
        )


def build_run(recipe: Recipe, registry: Registry, resume: bool = False, dist: Optional[DistInfo] = None) -> RunParts:
    """Every part of a run, in the order their checks depend on each other.

    A stage's parent weights are loaded only on a fresh start: a resume loads the run's
    own checkpoint, which already holds them (the parent may be gone by then).
    """
    dist = dist or dist_info()
    device = run_device(recipe, dist)
    seed_everything(recipe.run.seed)
    data, counts = training_data(recipe, registry, dist)
    generator = torch.Generator().manual_seed(recipe.run.seed)
    context = Context(
        class_counts=counts,
        image_size=data.image_size,
        device=device,
        generator=generator,
        epochs=recipe.run.epochs,
        seed=recipe.run.seed,
    )
    loss = recipe.loss.build(registry, context)
    memory_format = torch.channels_last if recipe.run.channels_last else torch.contiguous_format
    model_factory = recipe.model.build(registry, context)
    module = (
        build_model(recipe, registry, context, data, loss, model_factory).to(device).to(memory_format=memory_format)
    )
    parent = (
        load_parent(recipe, module, data.num_classes) if recipe.stage.init_from is not None and not resume else None
    )
    trainable_parameters(module, recipe)
    sampler = recipe.sampler.build(registry, context, data.train.labels, dist.rank, dist.world_size)
    mixer, patch, saliency, fuser = mixing_components(recipe, registry, context, module, data.image_size)
    mixing = MixingStep(mixer, fuser, patch, saliency) if mixer is not None else None
    module, model = wrap_distributed(module, dist, device)
    optimizer = build_optimizer(recipe, registry, context, module)
    needs_features = loss.needs_features or optimizer.needs_features
    if needs_features:
        check_feature_api(recipe, module, loss, optimizer, dist)
    check_second_batch(recipe, module, sampler, mixer, loss, optimizer)
    check_model_outputs(recipe, module, loss, optimizer)
    attach_optimizer(recipe, optimizer, module)
    return RunParts(
        recipe=recipe,
        registry=registry,
        dist=dist,
        device=device,
        data=data,
        class_counts=counts,
        generator=generator,
        context=context,
        loss=loss,
        module=module,
        model=model,
        memory_format=memory_format,
        parent=parent,
        sampler=sampler,
        mixer=mixer,
        patch=patch,
        saliency=saliency,
        fuser=fuser,
        mixing=mixing,
        optimizer=optimizer,
        needs_features=needs_features,
        scaler=torch.amp.GradScaler(device.type, enabled=recipe.run.amp == "fp16"),
        autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.run.amp),
        batch_norms=batch_norms(module),
        labels_on_device=data.train.labels.to(device),
        # Normalisation constants live on the device once, not one host copy per batch.
        mean=stats_tensor(data.mean, device),
        std=stats_tensor(data.std, device),
        model_factory=model_factory,
    )
