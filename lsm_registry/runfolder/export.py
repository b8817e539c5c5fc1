"""A run's model as files another program can use without lsm-registry (``lsm export``).

A checkpoint needs this library to be read: it holds the optimizer and RNG states, and
its weights only make sense with the model class that made them. An export holds what
a consumer needs and nothing else: the weights, as a TorchScript module (graph and
weights in one file, loaded with ``torch.jit.load`` alone, from Python or C++) and/or a
plain state_dict, and ``model.json``, which says what the model expects (channels, size,
the 0..1 pixel scale and the per-channel mean/std it was trained with), what it returns
and the class names. A state_dict still needs the model class rebuilt; model.json says
how, and the TorchScript file is the form for a program without this library.

The model is exported on the CPU, in eval mode (batch-norm running statistics), and the
traced module is checked against the model on a batch of another size before it is
written. Each file is written atomically and model.json last, so a folder with
model.json holds a whole export.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import attrs
import torch
from torch import Tensor, nn

from ..errors import LSMError
from .evaluate import TrainedModel, load_trained
from ..files import atomic_write, check_output_folder
from ..interfaces import Loss
from ..registry import Registry
from ..version import __version__

#: Version of model.json; raise it when a key changes meaning or goes away (adding keys does not).
EXPORT_FORMAT = 1
FORMATS = ("torchscript", "state-dict")
TORCHSCRIPT_FILE = "model.torchscript.pt"
STATE_DICT_FILE = "model.pt"
META_FILE = "model.json"

#: How to rebuild the model from model.pt; it needs lsm-registry (or a copy of the model's code).
REBUILD = (
    "import json, torch",
    "from lsm_registry import default_registry",
    "from lsm_registry.interfaces import Context",
    'meta = json.load(open("model.json"))',
    'arch, inp = meta["architecture"], meta["input"]',
    'factory_cls = default_registry().get("model", arch["name"])',
    'context = Context(class_counts=tuple(meta["class_counts"]), image_size=(inp["channels"], inp["height"], inp["width"]))',
    'model = factory_cls(factory_cls.Params(**arch["params"]), context).build(meta["num_classes"], inp["channels"], arch["normed_head"])',
    'model.load_state_dict(torch.load("model.pt", weights_only=True))',
    "model.eval()",
)


@attrs.frozen
class Exported:
    out: Path
    files: tuple[Path, ...]
    meta: dict[str, Any]


class _WithEvalLogits(nn.Module):
    """The model followed by its loss's test-time logit map, so the traced output is what is argmax-ed."""

    def __init__(self, model: nn.Module, loss: Loss):
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, x: Tensor) -> Tensor:
        return self._loss.eval_logits(self.model(x))


def maps_logits(loss: Loss) -> bool:
    """Whether the loss changes logits at test time (no built-in loss does)."""
    return type(loss).eval_logits is not Loss.eval_logits


def check_out(out: Path, force: bool) -> None:
    check_output_folder(out, "an export", lambda _: force, "choose another --out or pass --force to write into it")


def _example(model: TrainedModel, batch: int, seed: int) -> Tensor:
    ch, h, w = model.facts.image_size
    return torch.randn(batch, ch, h, w, generator=torch.Generator().manual_seed(seed))


def trace(model: TrainedModel) -> torch.jit.ScriptModule:
    """The model traced on the CPU; refused when the trace does not reproduce it on another batch size."""
    wrapped = _WithEvalLogits(model.module, model.loss) if maps_logits(model.loss) else model.module
    wrapped.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript is what loads
        # with the least (torch.jit.load, from Python or C++), which is the point here.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        traced = torch.jit.trace(wrapped, _example(model, 2, 0))
        probe = _example(model, 3, 1)
        expected, got = wrapped(probe), traced(probe)
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise LSMError(f"[model] {model.recipe.model.name}: the traced module does not reproduce the model "
                       f"(max difference {float((expected - got).abs().max()):.3g}); use --format state-dict")
    return traced


def model_meta(model: TrainedModel, class_names: tuple[str, ...], files: dict[str, str]) -> dict[str, Any]:
    recipe, facts = model.recipe, model.facts
    ch, h, w = facts.image_size
    mapped = maps_logits(model.loss)
    output = "logits (N, num_classes), float32; the predicted class is the argmax"
    if mapped:
        output += (f"; loss {recipe.loss.name!r} maps logits at test time: {TORCHSCRIPT_FILE} includes that map, "
                   f"the model rebuilt from {STATE_DICT_FILE} returns the logits before it")
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "files": files,
        "architecture": {"name": recipe.model.name, "params": attrs.asdict(recipe.model.params, recurse=False),
                         "normed_head": bool(model.loss.needs_normed_head)},
        "num_classes": len(class_names),
        "classes": list(class_names),
        "class_counts": list(facts.class_counts),
        "input": {
            "layout": "NCHW", "dtype": "float32", "channels": ch, "height": h, "width": w,
            "pixel_range": "0..1", "mean": list(facts.mean), "std": list(facts.std), "normalised_by_model": False,
            "preprocess": "x = (pixels / 255 - mean) / std per channel, pixels uint8 0..255 (i.e. 0..1 floats "
                          "minus mean, over std); the model does not normalise",
        },
        "output": output,
        "run": {"name": recipe.run.name, "seed": recipe.run.seed, "checkpoint": str(model.checkpoint),
                "epoch": model.epoch, "step": model.step, "lsm_registry": __version__},
    }
    if STATE_DICT_FILE in files.values():
        meta["rebuild"] = {
            "note": f"{STATE_DICT_FILE} holds weights only: the model class must be rebuilt, which needs lsm-registry "
                    f"(or a copy of the model's code); a program without this library loads {TORCHSCRIPT_FILE} with "
                    "torch.jit.load (lsm export --format torchscript)",
            "python": list(REBUILD),
        }
    return meta


def export_run(run_dir: Path, out: Path, registry: Registry, checkpoint: Optional[Path] = None,
               fmt: str = "torchscript", force: bool = False) -> Exported:
    """Write the run's model to ``out``: ``torchscript`` writes model.torchscript.pt and model.pt,
    ``state-dict`` model.pt only; both write model.json."""
    if fmt not in FORMATS:
        raise LSMError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    check_out(out, force)
    model = load_trained(run_dir, registry, checkpoint, device=torch.device("cpu"))
    traced = trace(model) if fmt == "torchscript" else None
    files: dict[str, str] = {}
    written: list[Path] = []
    if traced is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
            atomic_write(out / TORCHSCRIPT_FILE, lambda fh: torch.jit.save(traced, fh))
        files["torchscript"] = TORCHSCRIPT_FILE
        written.append(out / TORCHSCRIPT_FILE)
    state = {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}
    atomic_write(out / STATE_DICT_FILE, lambda fh: torch.save(state, fh))
    files["state_dict"] = STATE_DICT_FILE
    written.append(out / STATE_DICT_FILE)
    meta = model_meta(model, model.facts.class_names, files)
    atomic_write(out / META_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    written.append(out / META_FILE)
    return Exported(out, tuple(written), meta)
