"""A run's model as files another program can use without lsm-registry (``lsm export``).

A checkpoint needs this library to be read: it holds the optimizer and RNG states, and
its weights only make sense with the model class that made them. An export holds what a
consumer needs and nothing else:

- ``model.pt2``, a ``torch.export`` program (graph and weights; ``torch.export.load``
  alone, with the batch dimension left free): today's torch format, the default;
- ``model.onnx`` (``--format onnx``, the ``export`` extra): for onnxruntime and the other
  ONNX runtimes, checked with onnxruntime before it is written;
- ``model.torchscript.pt`` only on request (``--format torchscript``): TorchScript is
  deprecated in torch, kept for C++ programs that still load it;
- ``model.pt``, the plain state_dict, always (it needs the model class rebuilt);
- ``model.json``, what the model expects (channels, size, the test-time resize / crop,
  the 0..1 pixel scale and the per-channel mean / std), what it returns, the class names
  and the epoch and step of the checkpoint it came from.

The model is exported on the CPU, in eval mode (batch-norm running statistics); every
graph file is checked against the model on a batch of another size before it is
written. Each file is written atomically and model.json last, so a folder with
model.json holds a whole export.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import attrs
import torch
from torch import Tensor, nn

from ..errors import LSMError
from ..files import atomic_write, check_output_folder
from ..interfaces import Context, Loss
from ..registry import Registry
from ..version import __version__
from .evaluate import TrainedModel, load_trained

#: Version of model.json; raise it when a key changes meaning or goes away (adding keys does not).
EXPORT_FORMAT = 1
FORMATS = ("pt2", "onnx", "torchscript", "state-dict")
DEFAULT_FORMATS = ("pt2",)
PT2_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
STATE_DICT_FILE = "model.pt"
META_FILE = "model.json"
#: The ONNX graph's input and output names (model.json repeats them).
ONNX_INPUT, ONNX_OUTPUT = "pixels", "logits"
#: What ``--format onnx`` needs besides torch: the exporter (onnx, onnxscript) and the checker (onnxruntime).
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")

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

#: How each graph file loads, for model.json: the library a consumer needs and one line of Python.
LOADERS = {
    "pt2": ("torch", 'model = torch.export.load("model.pt2").module()  # logits = model(x)'),
    "onnx": (
        "onnxruntime",
        'session = onnxruntime.InferenceSession("model.onnx")  # logits = session.run(None, {"pixels": x})[0]',
    ),
    "torchscript": ("torch", 'model = torch.jit.load("model.torchscript.pt")  # logits = model(x)'),
}


@attrs.frozen
class Exported:
    out: Path
    files: tuple[Path, ...]
    meta: dict[str, Any]


class _WithEvalLogits(nn.Module):
    """The model followed by its loss's test-time logit map, so the exported output is what is argmax-ed."""

    def __init__(self, model: nn.Module, loss: Loss):
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, x: Tensor) -> Tensor:
        return self._loss.eval_logits(self.model(x))


def maps_logits(loss: Loss) -> bool:
    """Whether the loss changes logits at test time (no built-in loss does)."""
    return type(loss).eval_logits is not Loss.eval_logits


def parse_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """``("pt2", "onnx,torchscript")`` -> the formats, in FORMATS order; an unknown one is one error line."""
    chosen = {part.strip() for item in formats for part in item.split(",") if part.strip()}
    unknown = sorted(chosen - set(FORMATS))
    if unknown:
        raise LSMError(f"--format {', '.join(unknown)}: choose among {', '.join(FORMATS)}")
    if "onnx" in chosen:
        missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise LSMError(
                f"--format onnx needs {', '.join(ONNX_MODULES)} (missing: {', '.join(missing)}); "
                "install them with: pip install 'lsm-registry[export]'"
            )
    return tuple(f for f in FORMATS if f in chosen) or DEFAULT_FORMATS


def check_out(out: Path, force: bool) -> None:
    check_output_folder(out, "an export", lambda _: force, "choose another --out or pass --force to write into it")


def _example(model: TrainedModel, batch: int, seed: int) -> Tensor:
    ch, h, w = model.facts.image_size
    return torch.randn(batch, ch, h, w, generator=torch.Generator().manual_seed(seed))


def _exported_module(model: TrainedModel) -> nn.Module:
    wrapped = _WithEvalLogits(model.module, model.loss) if maps_logits(model.loss) else model.module
    return wrapped.eval()


def _check(
    model: TrainedModel, reference: nn.Module, run: Callable[[Tensor], Tensor], what: str, fallback: str
) -> None:
    """Refuse a file whose graph does not reproduce the model on a batch size it was not made with."""
    probe = _example(model, 3, 1)
    with torch.no_grad():
        expected, got = reference(probe), run(probe)
    if got.shape != expected.shape or not torch.allclose(expected, got, rtol=1e-3, atol=1e-4):
        gap = float((expected - got).abs().max()) if got.shape == expected.shape else f"shape {tuple(got.shape)}"
        raise LSMError(
            f"[model] {model.recipe.model.name}: the {what} does not reproduce the model on a batch of 3 "
            f"(max difference {gap}); {fallback}"
        )


def torch_export(model: TrainedModel) -> torch.export.ExportedProgram:
    """The model as a torch.export program with a free batch dimension."""
    wrapped = _exported_module(model)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        try:
            program = torch.export.export(wrapped, (_example(model, 2, 0),), dynamic_shapes=({0: batch},))
        except Exception as exc:  # torch.export raises many types; the user needs the first line and a way out
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LSMError(
                f"[model] {model.recipe.model.name}: torch.export failed ({first}); "
                "try --format torchscript or state-dict"
            ) from None
    _check(model, wrapped, program.module(), "torch.export program", "try --format torchscript or state-dict")
    return program


def onnx_bytes(model: TrainedModel, program: torch.export.ExportedProgram) -> bytes:
    """The program as an ONNX model (batch dimension free), checked with onnxruntime."""
    import onnxruntime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program,
            (_example(model, 2, 0),),
            dynamo=True,
            verbose=False,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
        )
    data = onnx_program.model_proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    _check(
        model,
        _exported_module(model),
        lambda x: torch.from_numpy(session.run(None, {ONNX_INPUT: x.numpy()})[0]),
        "ONNX model (run by onnxruntime)",
        "use --format pt2",
    )
    return data


def trace(model: TrainedModel) -> torch.jit.ScriptModule:
    """The model traced on the CPU (TorchScript, on request only)."""
    wrapped = _exported_module(model)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export; it is written only when asked for.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        traced = torch.jit.trace(wrapped, _example(model, 2, 0))
    _check(model, wrapped, traced, "traced module", "use --format pt2 or state-dict")
    return traced


def test_view(model: TrainedModel, registry: Registry) -> dict[str, Any]:
    """model.json's account of how a test image is prepared, from the data set's declaration."""
    spec = model.recipe.data
    factory = spec.build(registry, Context(class_counts=(), image_size=(0, 0, 0), seed=model.recipe.run.seed))
    steps = factory.test_view()
    if steps is None:
        return {
            "steps": None,
            "note": f"data set {spec.name!r} does not declare its test-time view; "
            "prepare images as its documentation says",
        }
    ch, h, w = model.facts.image_size
    note = (
        "applied in order to the decoded RGB image (uint8), giving the input size; then scale and normalise"
        if steps
        else f"the data set's images are {ch}x{h}x{w} already: no resize or crop"
    )
    return {"steps": steps, "note": note}


def model_meta(
    model: TrainedModel, class_names: tuple[str, ...], files: dict[str, str], view: dict[str, Any]
) -> dict[str, Any]:
    recipe, facts = model.recipe, model.facts
    ch, h, w = facts.image_size
    output = "logits (N, num_classes), float32; the predicted class is the argmax"
    if maps_logits(model.loss):
        output += (
            f"; loss {recipe.loss.name!r} maps logits at test time: the graph files include that map, "
            f"the model rebuilt from {STATE_DICT_FILE} returns the logits before it"
        )
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "files": files,
        "load": {fmt: {"needs": LOADERS[fmt][0], "python": LOADERS[fmt][1]} for fmt in files if fmt in LOADERS},
        "architecture": {
            "name": recipe.model.name,
            "params": attrs.asdict(recipe.model.params, recurse=False),
            "normed_head": bool(model.loss.needs_normed_head),
        },
        "num_classes": len(class_names),
        "classes": list(class_names),
        "class_counts": list(facts.class_counts),
        "input": {
            "layout": "NCHW",
            "dtype": "float32",
            "channels": ch,
            "height": h,
            "width": w,
            "test_view": view,
            "pixel_range": "0..1",
            "mean": list(facts.mean),
            "std": list(facts.std),
            "normalised_by_model": False,
            "preprocess": "x = (pixels / 255 - mean) / std per channel, pixels uint8 0..255 (i.e. 0..1 floats "
            "minus mean, over std); the model does not normalise",
        },
        "output": output,
        "run": {
            "name": recipe.run.name,
            "seed": recipe.run.seed,
            "checkpoint": str(model.checkpoint),
            "epoch": model.epoch,
            "step": model.step,
            "position": "epoch: completed epochs; step: optimiser steps into the epoch after it "
            "(0: the checkpoint was taken at the end of an epoch)",
            "lsm_registry": __version__,
            "torch": torch.__version__,
        },
    }
    if "onnx" in files:
        meta["load"]["onnx"].update({"input": ONNX_INPUT, "output": ONNX_OUTPUT})
    meta["rebuild"] = {
        "note": f"{STATE_DICT_FILE} holds weights only: the model class must be rebuilt, which needs lsm-registry "
        f"(or a copy of the model's code); a program without this library loads {PT2_FILE} "
        "(lsm export --format pt2)",
        "python": list(REBUILD),
    }
    return meta


def export_run(
    run_dir: Path,
    out: Path,
    registry: Registry,
    checkpoint: Optional[Path] = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    force: bool = False,
) -> Exported:
    """Write the run's model to ``out`` in ``formats`` (see FORMATS), model.pt and model.json always."""
    chosen = parse_formats(formats)
    check_out(out, force)
    model = load_trained(run_dir, registry, checkpoint, device=torch.device("cpu"))
    view = test_view(model, registry)
    # Every graph is built and checked before the first file is written: a format that fails leaves no half export.
    program = torch_export(model) if {"pt2", "onnx"} & set(chosen) else None
    graphs: list[tuple[str, str, Callable[[Any], None]]] = []
    if "pt2" in chosen:
        graphs.append(("pt2", PT2_FILE, lambda fh: torch.export.save(program, fh)))
    if "onnx" in chosen:
        data = onnx_bytes(model, program)
        graphs.append(("onnx", ONNX_FILE, lambda fh: fh.write(data)))
    if "torchscript" in chosen:
        traced = trace(model)

        def save_script(fh: Any) -> None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
                torch.jit.save(traced, fh)

        graphs.append(("torchscript", TORCHSCRIPT_FILE, save_script))
    files: dict[str, str] = {}
    written: list[Path] = []
    for fmt, name, write in graphs:
        atomic_write(out / name, write)
        files[fmt] = name
        written.append(out / name)
    state = {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}
    atomic_write(out / STATE_DICT_FILE, lambda fh: torch.save(state, fh))
    files["state_dict"] = STATE_DICT_FILE
    written.append(out / STATE_DICT_FILE)
    meta = model_meta(model, model.facts.class_names, files, view)
    atomic_write(out / META_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    written.append(out / META_FILE)
    return Exported(out, tuple(written), meta)
