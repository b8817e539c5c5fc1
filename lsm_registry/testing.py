"""Conformance checks for components: what a plugin's own tests call.

``check_component(cls)`` runs a component through the contracts of
:mod:`lsm_registry.interfaces` on tiny tensors (a 4-class context, 16x16 images,
4x4 units, a CIFAR ResNet-8 of width 4) in well under a second for most kinds. It
raises ``AssertionError`` with a message that names the component and the broken
promise. What it checks:

- registration: the class registers into a fresh registry holding the built-ins
  (so its name does not collide with one of them) and is returned by lookup;
- ``Params``: constructs from its defaults, every field has help text, and the
  defaults survive a round trip through recipe TOML (what ``lsm show`` writes);
- per kind, on random and on constant input: shapes, dtypes, value ranges (saliency
  ``>= 0`` (B, H/p, W/p); mixer weights in [0, 1] and images equal to
  ``w * x_f + (1 - w) * x_b``; fuser rows are distributions; a finite scalar loss on
  hard and soft targets, with one-hot soft targets equal to hard ones; sampler
  indices in range, as many batches as ``steps_per_epoch`` says, no repeat within an
  epoch and no overlap between ranks (a sampler with ``draws_with_replacement``:
  different streams on different ranks instead); patch
  ``merge(split(x)) == x`` bit for bit; model logits (B, C)), no NaN, inputs and
  model left unchanged;
- determinism: built twice with contexts whose generators are seeded equally (and
  the global torch seed set differently in between), the outputs are equal, which
  catches draws from the global RNG instead of ``context.generator``.

Model factories initialise weights from the global torch RNG (seeded by the engine),
so their builds are only checked for shapes, not compared. Data set factories get
only the Params checks (building one may need files).
The checks run on the CPU and leave the caller's global RNG state as it was.
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import attrs
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .checkpoint import list_checkpoints, load_weights_only
from .components.fusers import AreaFuser
from .components.models import CifarResNet
from .components.patches import PixelUnshuffle
from .components.saliency import RandomSaliency
from .engine import Trainer
from .interfaces import KINDS, Context, Loss, Mixer, MixResult, RunInfo, Sampler, StepClosure
from .mixing import MixingStep
from .params import ParamError
from .plugins import build_registry
from .recipe import ENGINE_CALLBACKS, _params_dict, build_params, dumps_toml, validate
from .registry import Owner, Registry, class_problem

__all__ = ["check_component", "check_params", "tiny_context", "tiny_model", "ReferencePatch", "TEST_OWNER"]

#: Owner under which check_component registers a class that is not registered yet.
TEST_OWNER = Owner("check_component", "lsm-registry-testing", "0")

CLASS_COUNTS = (12, 6, 3, 2)
IMAGE_SIZE = (3, 16, 16)
PATCH_SIZE = 4
BATCH = 4
EPOCHS = 6


def tiny_context(
    seed: int = 0, image_size: tuple[int, int, int] = IMAGE_SIZE, class_counts: tuple[int, ...] = CLASS_COUNTS
) -> Context:
    """A 4-class context on the CPU whose generator is seeded with ``seed``."""
    return Context(
        class_counts=class_counts,
        image_size=image_size,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(seed),
        epochs=EPOCHS,
        seed=seed,
    )


class ReferencePatch(PixelUnshuffle):
    """The checks' own patch operator: the built-in pixel-unshuffle, built from a block size alone."""

    def __init__(self, size: int = PATCH_SIZE):
        super().__init__(self.Params(size), tiny_context())


def tiny_model(num_classes: int = len(CLASS_COUNTS), seed: int = 0) -> nn.Module:
    """A CIFAR ResNet-8 of width 4 (about 5k parameters), built without touching the global RNG."""

    with _seeded(seed):
        return CifarResNet(8, num_classes, IMAGE_SIZE[0], normed_head=False, width=4)


# ------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with the global torch seed set to ``seed``, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _Checker:
    def __init__(self, cls: type):
        self.cls = cls
        self.label = f"{getattr(cls, 'kind', '?')} {getattr(cls, 'name', '?')!r} ({cls.__module__}.{cls.__qualname__})"

    def fail(self, message: str) -> None:
        raise AssertionError(f"{self.label}: {message}")

    def check(self, ok: Any, message: str) -> None:
        if not ok:
            self.fail(message)

    def tensor(
        self,
        what: str,
        t: Any,
        shape: Optional[tuple[int, ...]] = None,
        dtype: str = "float",
        lo: Optional[float] = None,
        hi: Optional[float] = None,
    ) -> Tensor:
        self.check(isinstance(t, Tensor), f"{what} must be a torch.Tensor (got {type(t).__name__})")
        if shape is not None:
            self.check(tuple(t.shape) == tuple(shape), f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if dtype == "float":
            self.check(t.is_floating_point(), f"{what} must be a float tensor (got {t.dtype})")
        elif dtype == "long":
            self.check(t.dtype == torch.int64, f"{what} must be int64 (got {t.dtype})")
        elif dtype == "bool":
            self.check(t.dtype == torch.bool, f"{what} must be bool (got {t.dtype})")
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            self.check(bad == 0, f"{what} has {bad} NaN or infinite value(s)")
        if lo is not None and t.numel():
            self.check(float(t.min()) >= lo, f"{what} must be >= {lo} (min {float(t.min()):.6g})")
        if hi is not None and t.numel():
            self.check(float(t.max()) <= hi, f"{what} must be <= {hi} (max {float(t.max()):.6g})")
        return t

    def same(self, what: str, a: Any, b: Any) -> None:
        """Equal outputs of two builds whose generators were seeded alike."""
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            equal = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
            for x, y in zip(a, b):
                self.same(what, x, y)
            return
        else:
            equal = a == b
        self.check(
            equal,
            f"{what} differs between two builds with equally seeded context.generator; draw every random "
            "number from self.context.generator (not the global torch RNG)",
        )


# ------------------------------------------------------------------------------ class and Params


def _check_class(c: _Checker, cls: Any) -> None:
    problem = class_problem(cls)
    if problem is not None:
        raise AssertionError(problem)
    c.check(cls.summary(), "needs a class docstring; its first line is the summary `lsm list-components` shows")


def _check_registration(c: _Checker, cls: type, registry: Optional[Registry]) -> None:
    if registry is None:
        registry = build_registry(entry_points=False)
    key = (cls.kind, cls.name)
    if key in registry:
        entry = registry.entry(*key)
        c.check(
            entry.cls is cls,
            f"the name {cls.name!r} is already taken by {entry.cls.__module__}.{entry.cls.__qualname__} "
            f"from {entry.owner}; choose another name",
        )
    else:
        registry.register(cls, TEST_OWNER)
        c.check(registry.get(*key) is cls, "lookup after registration returned another class")


def check_params(cls: type) -> Any:
    """Params construct from their defaults, have help text and survive a recipe TOML round trip."""

    c = _Checker(cls)
    params_cls = cls.Params
    c.check(isinstance(params_cls, type) and attrs.has(params_cls), "Params must be an attrs class (@attrs.frozen)")
    try:
        attrs.resolve_types(params_cls)
    except Exception as exc:
        c.fail(f"Params annotations do not resolve ({type(exc).__name__}: {exc}); import the types they name")
    try:
        params = params_cls()
    except (ParamError, ValueError, TypeError) as exc:
        c.fail(f"Params() fails with the defaults: {type(exc).__name__}: {exc}")
    for f in attrs.fields(params_cls):
        c.check(
            f.metadata.get("help"),
            f"Params.{f.name} has no help text; declare it with lsm_registry.params.param(default, help=...)",
        )
    values = _params_dict(params)
    try:
        text = dumps_toml({"table": values})
    except TypeError as exc:
        c.fail(f"a Params default cannot be written to a recipe: {exc}")
    written = tomllib.loads(text).get("table", {})
    errors: list[str] = []
    rebuilt = build_params(params_cls, written, "<defaults>", "table", errors, owner=c.label)
    c.check(not errors, "the defaults, written as recipe TOML, do not read back: " + " | ".join(errors))
    c.check(
        _params_dict(rebuilt) == values,
        f"the defaults, written as recipe TOML, read back differently: {_params_dict(rebuilt)} != {values}",
    )
    return params


# ------------------------------------------------------------------------------ per kind


def _inputs(seed: int = 1234) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ch, h, w = IMAGE_SIZE
    gh, gw = h // PATCH_SIZE, w // PATCH_SIZE
    c = len(CLASS_COUNTS)
    return {
        "x": torch.randn((BATCH, ch, h, w), generator=g),
        "x2": torch.randn((BATCH, ch, h, w), generator=g),
        "y": torch.randint(0, c, (BATCH,), generator=g),
        "y2": torch.randint(0, c, (BATCH,), generator=g),
        "s": torch.rand((BATCH, gh, gw), generator=g),
        "s2": torch.rand((BATCH, gh, gw), generator=g),
        "mask": torch.rand((BATCH, gh, gw), generator=g) < 0.5,
        "logits": 2.0 * torch.randn((BATCH, c), generator=g),
        "soft": torch.softmax(torch.randn((BATCH, c), generator=g), dim=1),
    }


def _twice(make: Callable[[Context], Any], run: Callable[[Any], Any]) -> tuple[Any, Any]:
    """Build and run twice with equally seeded contexts and different global seeds."""
    outs = []
    for global_seed in (101, 202):
        with _seeded(global_seed):
            outs.append(run(make(tiny_context(seed=7))))
    return outs[0], outs[1]


def _model_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_saliency(c: _Checker, cls: type, params: Any) -> None:
    data = _inputs()
    patch = ReferencePatch()
    grid = (BATCH, IMAGE_SIZE[1] // PATCH_SIZE, IMAGE_SIZE[2] // PATCH_SIZE)
    model = tiny_model()
    provider = cls(params, tiny_context())
    for label, x in (("random", data["x"]), ("constant", torch.full_like(data["x"], 0.5))):
        for training in (True, False):
            model.train(training)
            before = _model_state(model)
            x_in = x.clone()
            with _seeded(0):
                out = provider(model, x_in, data["y"], patch)
            what = f"saliency of {label} images (model in {'train' if training else 'eval'} mode)"
            c.tensor(what, out, grid, "float", lo=0.0)
            c.check(out.device == x.device, f"{what} is on {out.device}, the images on {x.device}")
            c.check(torch.equal(x_in, x), f"changed its input images in place ({label})")
            c.check(model.training == training, "changed the model's train/eval mode")
            after = model.state_dict()
            changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
            c.check(not changed, f"changed the model's parameters or buffers: {', '.join(changed[:3])}")
            grads = [n for n, p in model.named_parameters() if p.grad is not None]
            c.check(not grads, f"left parameter gradients on the model: {', '.join(grads[:3])}")
    model.train(True)
    a, b = _twice(lambda ctx: cls(params, ctx), lambda prov: prov(model, data["x"].clone(), data["y"], patch))
    c.same("saliency", a, b)


def _check_mixer(c: _Checker, cls: type, params: Any) -> None:
    data = _inputs()
    patch = ReferencePatch()
    ch, h, w = IMAGE_SIZE
    gh, gw = h // PATCH_SIZE, w // PATCH_SIZE
    mixer = cls(params, tiny_context())
    for epoch in range(EPOCHS):
        active = mixer.active(epoch)
        c.check(isinstance(active, bool), f"active({epoch}) must return a bool (got {active!r})")
    coin = mixer.coin()
    c.check(isinstance(coin, bool), f"coin() must return a bool (got {coin!r})")

    def saliency(s: Tensor) -> Optional[Tensor]:
        return s if cls.needs_saliency else None

    cases = [
        ("random images", data["x"], data["x2"], saliency(data["s"])),
        (
            "constant images and saliency",
            torch.full_like(data["x"], 0.25),
            torch.full_like(data["x"], -0.75),
            saliency(torch.ones_like(data["s"])),
        ),
    ]
    if not cls.needs_saliency:
        cases.append(("random images with a saliency map", data["x"], data["x2"], data["s"]))
    for label, x_f, x_b, s_f in cases:
        xf_in, xb_in = x_f.clone(), x_b.clone()
        s_in = s_f.clone() if s_f is not None else None
        res = mixer.mix(xf_in, xb_in, s_in, patch)
        c.check(isinstance(res, MixResult), f"mix must return a MixResult (got {type(res).__name__})")
        c.check(torch.equal(xf_in, x_f) and torch.equal(xb_in, x_b), f"changed its input images in place ({label})")
        if s_f is not None:
            c.check(torch.equal(s_in, s_f), f"changed the saliency map in place ({label})")
        images = c.tensor(f"mixed images ({label})", res.images, (BATCH, ch, h, w), "float")
        weight = c.tensor(f"weight map ({label})", res.weight, (BATCH, 1, h, w), "float", lo=0.0, hi=1.0)
        expected = weight * x_f + (1.0 - weight) * x_b
        err = float((images - expected).abs().max())
        c.check(err <= 1e-5, f"images != weight * x_f + (1 - weight) * x_b ({label}; max error {err:.3g})")
        if res.unit_mask is not None:
            mask = c.tensor(f"unit_mask ({label})", res.unit_mask, (BATCH, gh, gw), "bool")
            c.check(
                torch.equal(patch.expand(mask.to(weight.dtype)), weight),
                f"weight is not the unit_mask expanded to pixels ({label}); fusers read one or the other",
            )

    def run(m: Mixer) -> list[Tensor]:
        res = m.mix(data["x"].clone(), data["x2"].clone(), saliency(data["s"]), patch)
        coins = torch.tensor([m.coin() for _ in range(8)])
        return [res.images, res.weight, coins]

    a, b = _twice(lambda ctx: cls(params, ctx), run)
    c.same("mix (images, weight, coin draws)", a, b)

    # The whole mixing step, as the engine, lsm preview and plugin code call it.
    ctx = tiny_context()
    step = MixingStep(
        cls(params, ctx),
        AreaFuser(AreaFuser.Params(), ctx),
        patch,
        RandomSaliency(RandomSaliency.Params(), ctx) if cls.needs_saliency else None,
    )
    batch = step(tiny_model(), data["x2"], data["y2"], data["x"], data["y"])
    target = c.tensor("MixingStep target", batch.target, (BATCH, len(CLASS_COUNTS)), "float", lo=0.0, hi=1.0)
    c.check(torch.allclose(target.sum(dim=1), torch.ones(BATCH), atol=1e-5), "MixingStep targets must sum to 1")
    c.tensor("MixingStep lam", batch.lam, (BATCH,), "float", lo=0.0, hi=1.0)
    err = float((batch.images - (batch.mask * batch.x_f + (1 - batch.mask) * batch.x_b)).abs().max())
    c.check(err <= 1e-5, f"MixingStep images != mask * x_f + (1 - mask) * x_b (max error {err:.3g})")


def _check_label_fuser(c: _Checker, cls: type, params: Any) -> None:
    data = _inputs()
    patch = ReferencePatch()
    num_classes = len(CLASS_COUNTS)
    mask = data["mask"]
    weight = patch.expand(mask.float())
    box = torch.zeros(BATCH, 1, IMAGE_SIZE[1], IMAGE_SIZE[2])
    box[:, :, 3:11, 5:14] = 1.0
    blend = torch.full((BATCH, 1, IMAGE_SIZE[1], IMAGE_SIZE[2]), 0.3)

    def mixed(w: Tensor, unit_mask: Optional[Tensor]) -> MixResult:
        return MixResult(images=w * data["x"] + (1 - w) * data["x2"], weight=w, unit_mask=unit_mask)

    def maps(s_f: Tensor, s_b: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        return s_f, (s_b if cls.needs_background_saliency else None)

    fuser = cls(params, tiny_context())
    ones = torch.ones_like(data["s"])
    cases = [
        ("unit mask", mixed(weight, mask), data["y"], data["y2"], *maps(data["s"], data["s2"])),
        ("box weight, no unit mask", mixed(box, None), data["y"], data["y2"], *maps(data["s"], data["s2"])),
        ("constant blend weight", mixed(blend, None), data["y"], data["y2"], *maps(data["s"], data["s2"])),
        ("constant saliency", mixed(weight, mask), data["y"], data["y2"], *maps(ones, ones)),
        ("same labels", mixed(weight, mask), data["y"], data["y"].clone(), *maps(data["s"], data["s2"])),
    ]
    for label, mix, y_f, y_b, s_f, s_b in cases:
        out = fuser.fuse(mix, y_f, y_b, s_f, s_b)
        what = f"soft targets ({label})"
        c.tensor(what, out, (BATCH, num_classes), "float", lo=0.0)
        err = float((out.sum(dim=1) - 1.0).abs().max())
        c.check(err <= 1e-5, f"{what}: rows must sum to 1 (max error {err:.3g})")
    a, b = _twice(
        lambda ctx: cls(params, ctx), lambda f: f.fuse(cases[0][1], data["y"], data["y2"], *maps(data["s"], data["s2"]))
    )
    c.same("soft targets", a, b)


def _takes_mixed(c: _Checker, cls: type, loss: Loss) -> bool:
    """The engine's call on a mixed batch is loss(logits, target, mixed), mixed with y_f, y_b, lam (a MixedBatch)."""
    try:
        inspect.signature(loss).bind(None, None, None, **({"features": None} if cls.needs_features else {}))
        takes_mixed = True
    except TypeError:
        takes_mixed = False
    except ValueError:  # no signature to read
        takes_mixed = True
    c.check(
        takes_mixed,
        "__call__ must take (logits, target, mixed=None"
        + (", *, features=None" if cls.needs_features else "")
        + "): the engine passes the mixed batch's labels"
        + (" and, as needs_features says, the features" if cls.needs_features else ""),
    )
    return takes_mixed


def _check_mixed_loss(
    c: _Checker, loss: Loss, data: dict[str, Tensor], logits: Tensor, feats: dict[str, Tensor]
) -> None:
    num_classes = len(CLASS_COUNTS)
    y_f, y_b = data["y"], data["y2"]
    lam = torch.linspace(0.1, 0.9, BATCH)
    mixed = SimpleNamespace(y_f=y_f, y_b=y_b, lam=lam)
    target = lam[:, None] * F.one_hot(y_f, num_classes) + (1 - lam[:, None]) * F.one_hot(y_b, num_classes)
    whole = SimpleNamespace(y_f=y_f, y_b=y_b, lam=torch.ones(BATCH))
    for epoch in (0, EPOCHS - 1):
        loss.set_epoch(epoch)
        z = logits.detach().clone().requires_grad_(True)
        value = loss(z, target, mixed, **feats)
        what = f"loss on a mixed batch (epoch {epoch})"
        c.tensor(what, value, (), "float")
        value.backward()
        c.tensor(f"gradient of the {what}", z.grad, (BATCH, num_classes), "float")
        hard = loss(logits, y_f, **feats)
        one = loss(logits, F.one_hot(y_f, num_classes).float(), whole, **feats)
        c.check(
            torch.allclose(hard, one, rtol=1e-4, atol=1e-5),
            f"a mixed batch with lam = 1 must give the hard-target loss of y_f (epoch {epoch}: {float(one):.6g} != {float(hard):.6g})",
        )


def _check_loss(c: _Checker, cls: type, params: Any) -> None:
    data = _inputs()
    num_classes = len(CLASS_COUNTS)
    logits = data["logits"]
    if cls.needs_normed_head:
        logits = torch.tanh(logits)  # cosine logits lie in [-1, 1]
    loss = cls(params, tiny_context())
    # A loss that reads the classifier's input gets it as the engine passes it: features=h.
    feats = (
        {"features": torch.rand((BATCH, 8), generator=torch.Generator().manual_seed(9)) + 0.1}
        if cls.needs_features
        else {}
    )
    for epoch in (0, EPOCHS - 1):
        loss.set_epoch(epoch)
        for label, z, target in (
            ("hard targets", logits, data["y"]),
            ("soft targets", logits, data["soft"]),
            ("constant logits", torch.zeros_like(logits), data["y"]),
            ("constant logits, soft targets", torch.zeros_like(logits), data["soft"]),
        ):
            z = z.clone().requires_grad_(True)
            value = loss(z, target, **feats)
            what = f"loss on {label} (epoch {epoch})"
            c.tensor(what, value, (), "float")
            value.backward()
            c.tensor(f"gradient of the {what}", z.grad, (BATCH, num_classes), "float")
        hard = loss(logits, data["y"], **feats)
        one_hot = loss(logits, F.one_hot(data["y"], num_classes).float(), **feats)
        c.check(
            torch.allclose(hard, one_hot, rtol=1e-4, atol=1e-5),
            f"one-hot soft targets must give the hard-target loss (epoch {epoch}: {float(one_hot):.6g} != {float(hard):.6g})",
        )
    c.tensor("eval_logits", loss.eval_logits(logits.detach()), (BATCH, num_classes), "float")

    if _takes_mixed(c, cls, loss):
        _check_mixed_loss(c, loss, data, logits, feats)

    def run(loss_: Loss) -> list[Tensor]:
        loss_.set_epoch(EPOCHS - 1)
        return [loss_(logits, data["y"], **feats).detach(), loss_(logits, data["soft"], **feats).detach()]

    a, b = _twice(lambda ctx: cls(params, ctx), run)
    c.same("loss", a, b)


def _check_sampler(c: _Checker, cls: type, params: Any) -> None:
    counts = CLASS_COUNTS
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(5))]
    n, batch = labels.numel(), 4

    def stream(s: Sampler, epoch: int) -> list[Tensor]:
        out = []
        for i, item in enumerate(s.batches(epoch, batch)):
            c.check(
                isinstance(item, tuple) and len(item) == 2,
                f"batches() must yield (background, foreground) pairs (got {item!r})",
            )
            bg, fg = item
            c.tensor(f"background indices (batch {i})", bg, None, "long", lo=0, hi=n - 1)
            c.check(
                bg.dim() == 1 and 0 < bg.numel() <= batch,
                f"background batch {i} has shape {tuple(bg.shape)}, expected ({batch},) or fewer",
            )
            out.append(bg)
            if fg is not None:
                c.tensor(f"foreground indices (batch {i})", fg, tuple(bg.shape), "long", lo=0, hi=n - 1)
                out.append(fg)
        return out

    for world in (1, 2):
        seen: list[Tensor] = []
        for rank in range(world):
            s = cls(params, tiny_context(), labels.clone(), rank=rank, world_size=world)
            steps = s.steps_per_epoch(batch)
            c.check(
                isinstance(steps, int) and steps >= 1, f"steps_per_epoch({batch}) must be an int >= 1 (got {steps!r})"
            )
            for epoch in (0, 1):
                items = list(s.batches(epoch, batch))
                c.check(
                    len(items) == steps, f"yielded {len(items)} batches in epoch {epoch}, steps_per_epoch said {steps}"
                )
                stream(s, epoch)
            bg = torch.cat([b for b, _ in s.batches(0, batch)])
            if not cls.draws_with_replacement:  # an instance branch: one pass over the shard
                c.check(
                    bg.unique().numel() == bg.numel(),
                    f"the background stream repeats an index within an epoch (rank {rank} of {world}); "
                    "a sampler that draws with replacement sets draws_with_replacement = True",
                )
                c.check(
                    bg.numel() >= n // world - batch,
                    f"the background stream covers {bg.numel()} of {n // world} indices (rank {rank} of {world})",
                )
            seen.append(bg)
        if world == 2 and not cls.draws_with_replacement:
            overlap = set(seen[0].tolist()) & set(seen[1].tolist())
            c.check(not overlap, f"ranks 0 and 1 of 2 draw the same background indices {sorted(overlap)[:5]}")
        elif world == 2:  # with replacement indices may recur on both ranks, but the streams must differ
            c.check(
                not torch.equal(seen[0], seen[1]),
                "ranks 0 and 1 of 2 draw the same background stream; seed the draws by rank",
            )
    a, b = _twice(lambda ctx: cls(params, ctx, labels.clone()), lambda s: stream(s, 1))
    c.same("index stream", a, b)


def _check_patch(c: _Checker, cls: type, params: Any) -> None:
    op = cls(params, tiny_context())
    p = op.size
    c.check(isinstance(p, int) and p >= 1, f"size must be an int >= 1 (got {p!r})")
    side = p * (4 if p <= 8 else 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, 3, side, side), generator=g)
    cells = side // p
    c.check(
        op.grid(side, side) == (cells, cells),
        f"grid({side}, {side}) = {op.grid(side, side)}, expected {(cells, cells)}",
    )
    try:
        op.grid(side + 1, side)
    except ValueError:
        pass
    else:
        c.fail(f"grid({side + 1}, {side}) must raise ValueError: {p} does not divide {side + 1}")
    u = op.split(x)
    c.tensor("split(x)", u, (2, 3 * p * p, cells, cells), "float")
    c.check(torch.equal(op.merge(u), x), "merge(split(x)) is not x bit for bit")
    c.check(torch.equal(op.split(op.merge(u)), u), "split(merge(u)) is not u bit for bit")
    hit = u.clone()
    hit[:, :, 1, cells - 1] = 1e6
    changed = (op.merge(hit) != x).any(dim=(0, 1))
    block = torch.zeros(side, side, dtype=torch.bool)
    block[p : 2 * p, (cells - 1) * p :] = True
    c.check(torch.equal(changed, block), "unit (1, last) of split(x) is not the p x p block at that place")
    expanded = op.expand(torch.rand((2, cells, cells), generator=g))
    c.tensor("expand(unit_map)", expanded, (2, 1, side, side), "float")


def _check_model(c: _Checker, cls: type, params: Any) -> None:
    num_classes = len(CLASS_COUNTS)
    factory = cls(params, tiny_context())
    side = None
    for s in (32, 64, 224):
        try:
            factory.check_input((3, s, s))
        except ValueError:
            continue
        side = s
        break
    c.check(side is not None, "check_input refuses 3x32x32, 3x64x64 and 3x224x224 images")
    x = torch.randn((2, 3, side, side), generator=torch.Generator().manual_seed(4))
    c.check(factory.check_input((3, side, side)) is None, "check_input must return None (raise ValueError to refuse)")

    def build(in_channels: int, normed: bool, seed: int = 0) -> nn.Module:
        with _seeded(seed):
            net = factory.build(num_classes, in_channels, normed)
        c.check(isinstance(net, nn.Module), f"build() must return an nn.Module (got {type(net).__name__})")
        return net.eval()

    net = build(3, False)
    with torch.no_grad():
        logits = net(x)
    c.tensor("logits", logits, (2, num_classes), "float")
    layers = net.saliency_layers() if hasattr(net, "saliency_layers") else None
    c.check(
        isinstance(layers, dict) and layers,
        "the model must expose saliency_layers() -> a non-empty dict of named layers",
    )
    modules = {id(m) for m in net.modules()}
    for name, layer in layers.items():
        c.check(
            isinstance(layer, nn.Module) and id(layer) in modules,
            f"saliency layer {name!r} is not a submodule of the model",
        )
    if hasattr(net, "forward_features"):
        with torch.no_grad():
            feats = net.forward_features(x)
        c.tensor("forward_features(x)", feats, None, "float")
        c.check(feats.dim() == 4, f"forward_features(x) must be (B, K, h, w) (got {tuple(feats.shape)})")
        c.check(hasattr(net, "classifier"), "a model with forward_features must expose its linear head as classifier")
        with torch.no_grad():
            pooled = net.classifier(feats.mean(dim=(2, 3)))
        c.check(
            torch.allclose(pooled, logits, rtol=1e-4, atol=1e-5),
            "classifier(forward_features(x).mean(dim=(2, 3))) differs from model(x); losses and optimizers that read "
            "the features compute the logits that way",
        )
    normed = build(1, True)
    with torch.no_grad():
        c.tensor("logits of the 1-channel normed-head model", normed(x[:, :1]), (2, num_classes), "float")


class _TinyClosure(StepClosure):
    """The engine's closure on the kit's ResNet-8: zero grads, forward, soft CE, backward; counts its calls."""

    def __init__(self, model: nn.Module, x: Tensor, target: Tensor):
        self.model, self.x, self.target = model, x, target
        self.losses: list[Tensor] = []
        self.heads = 0

    def __call__(self, head: Any = None) -> Tensor:
        self.model.zero_grad(set_to_none=True)

        def loss_of(z: Tensor) -> Tensor:
            return -(self.target * F.log_softmax(z, dim=1)).sum(dim=1).mean()

        if head is not None:
            self.heads += 1
            h = self.model.forward_features(self.x).mean(dim=(2, 3))
            loss = head(h, self.model.classifier(h), self.target, loss_of)
        else:
            loss = loss_of(self.model(self.x))
        loss.backward()
        self.losses.append(loss.detach())
        return loss.detach()


def _check_optimizer(c: _Checker, cls: type, params: Any) -> None:
    """Two steps on the kit's ResNet-8: the closure runs, the base updates once per step, nothing goes NaN."""
    data = _inputs()
    x = torch.randn((BATCH, 3, 32, 32), generator=torch.Generator().manual_seed(11))
    targets = {"hard targets": F.one_hot(data["y"], len(CLASS_COUNTS)).float(), "soft targets": data["soft"]}

    def run(ctx: Context, target: Tensor) -> list[Tensor]:
        model = tiny_model()
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        opt = cls(params, ctx, base)
        c.check(opt.base is base, "must keep the base optimizer it is built with as self.base")
        try:
            opt.attach(model)
        except ValueError as exc:
            c.fail(f"attach() refuses the kit's ResNet-8 (forward_features + nn.Linear classifier): {exc}")
        updates = []
        step = base.step

        def counted(*args: Any, **kwargs: Any) -> Any:
            updates.append(1)
            return step(*args, **kwargs)

        base.step = counted  # type: ignore[method-assign]
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for i in range(2):
            before = len(updates)
            closure = _TinyClosure(model, x, target)
            loss = opt.step(closure, scaler)
            c.check(closure.losses, f"step {i}: never called the closure")
            c.check(
                len(updates) - before == 1,
                f"step {i}: updated the base optimizer {len(updates) - before} times, expected once",
            )
            c.check(
                cls.needs_features or closure.heads == 0,
                "passed a head to the closure without declaring needs_features = True",
            )
            c.tensor(f"loss returned by step {i} ({label})", loss, (), "float")
            c.check(
                torch.equal(loss.detach(), closure.losses[0]),
                f"step {i} must return the loss of its first closure call",
            )
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        c.tensor(f"parameters after two steps ({label})", flat, None, "float")
        state = opt.state_dict()
        opt.load_state_dict(state)
        return [flat]

    for label, target in targets.items():
        with _seeded(0):
            run(tiny_context(), target)
        a, b = _twice(lambda ctx: ctx, lambda ctx, target=target: run(ctx, target))
        c.same(f"parameters after two steps ({label})", a, b)


def _check_dataset(c: _Checker, cls: type, params: Any) -> None:
    cls(params, Context(class_counts=(), image_size=(0, 0, 0)))


def _check_logger(c: _Checker, cls: type, params: Any) -> None:
    """Drives the logger through one short run in a temporary run folder (when its packages are here)."""
    c.check(isinstance(cls.requires, tuple), "requires must be a tuple of module names")
    if cls.missing_modules():
        return  # cannot be driven on this machine; a run asking for it fails with install_hint
    logger = cls(params, tiny_context())
    names = tuple(f"class {i}" for i in range(len(CLASS_COUNTS)))
    # In a temporary current folder too: a tracker's default store may be relative (MLflow's mlflow.db).
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        picture = run_dir / "per_class.png"
        Image.new("RGB", (8, 8), (200, 30, 30)).save(picture)
        logger.start(
            RunInfo(
                run_name="conformance",
                run_dir=run_dir,
                hparams={"run.seed": 0, "optim.milestones": (1, 2)},
                recipe_toml="[run]\nseed = 0\n",
                class_names=names,
                class_counts=CLASS_COUNTS,
                epochs=1,
                steps_per_epoch=2,
                resumed=False,
            )
        )
        try:
            logger.log_scalars(1, {"train/loss": 1.0, "train/lr": 0.1})
            logger.log_evaluation(2, 1, {"test/top1": 0.5}, {n: (0.5 if i else None) for i, n in enumerate(names)})
            logger.log_record({"epoch": 1, "top1": 0.5, "per_class": [None, 0.5, 0.5, 0.5]})
            logger.log_image("per_class", picture, 2)
            logger.finish({"top1": 0.5, "epochs": 1})
        finally:
            logger.close()


_CALLBACK_RUN = """
[run]
name = "conformance"
epochs = 2
eval_every = 1
callbacks = ["{name}"]

[data]
name = "synthetic-lt"
num_classes = 4
n_max = 24
imbalance_factor = 4.0
test_per_class = 4

[model]
name = "resnet32"
width = 4

[optim]
batch_size = 16
warmup_epochs = 0

[loss]
name = "ce"
"""


def _check_callback(c: _Checker, cls: type, params: Any) -> None:
    """Drives the callback through a short run (2 epochs of a tiny synthetic set, a run folder and a
    resume): no hook raises, and its state survives the weights-only checkpoint."""
    registry = build_registry(entry_points=False)
    if (cls.kind, cls.name) not in registry:
        registry.register(cls, Owner("conformance", "conformance", "0"))
    raw = tomllib.loads(_CALLBACK_RUN.replace("{name}", cls.name))
    raw["callbacks"] = {cls.name: _params_dict(params)}
    # Always on (the engine's), or brought by a component: listing them would be refused.
    if cls.name in ENGINE_CALLBACKS or getattr(cls, "brought_by_component", False):
        raw["run"]["callbacks"], raw["callbacks"] = [], {}
    for table, values in getattr(cls, "conformance_tables", {}).items():
        raw[table] = {**raw.get(table, {}), **values}
    recipe = validate(raw, "conformance.toml", registry)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        Trainer(recipe, registry, run_dir=run_dir).fit()
        saved = load_weights_only(list_checkpoints(run_dir)[-1]).get("callbacks") or {}
        c.check(all(isinstance(v, dict) for v in saved.values()), "state_dict() must return a dict")
        longer = attrs.evolve(recipe, run=attrs.evolve(recipe.run, epochs=3))
        Trainer(longer, registry, run_dir=run_dir, resume=True).fit()


_KIND_CHECKS: dict[str, Callable[[_Checker, type, Any], None]] = {
    "saliency": _check_saliency,
    "mixer": _check_mixer,
    "label_fuser": _check_label_fuser,
    "loss": _check_loss,
    "sampler": _check_sampler,
    "patch": _check_patch,
    "model": _check_model,
    "dataset": _check_dataset,
    "logger": _check_logger,
    "optimizer": _check_optimizer,
    "callback": _check_callback,
}
assert set(_KIND_CHECKS) == set(KINDS)


def check_component(cls: type, registry: Optional[Registry] = None, *, params: Any = None) -> None:
    """Check that ``cls`` keeps the contracts of its kind; raise AssertionError if not.

    ``registry``: where to check registration (default: a fresh registry with only the
    built-ins; a class already registered there under its name passes). Pass
    ``params`` (an instance of ``cls.Params``) to check a non-default configuration;
    the defaults are always checked for construction and the TOML round trip.
    """
    c = _Checker(cls)
    _check_class(c, cls)
    _check_registration(c, cls, registry)
    defaults = check_params(cls)
    if params is not None:
        c.check(isinstance(params, cls.Params), f"params must be an instance of {cls.__qualname__}.Params")
    try:
        _KIND_CHECKS[cls.kind](c, cls, params if params is not None else defaults)
    except AssertionError:
        raise
    except Exception as exc:
        raise AssertionError(
            f"{c.label}: raised {type(exc).__name__} during the {cls.kind} checks: {' '.join(str(exc).split())}"
        ) from exc
