"""lsm_registry: saliency-guided local semantic mixing for long-tailed classification.

Public API: the interfaces (the plugin ABI), ``hookimpl`` for plugins, the errors
and ``__version__``. Components are found through :func:`default_registry`.
"""

from .errors import DataError, LSMError, RecipeError, RegistryError
from .hookspecs import hookimpl
from .interfaces import (
    KINDS,
    Callback,
    Component,
    Context,
    Crops,
    DatasetFactory,
    DecodingSplit,
    LabelFuser,
    Logger,
    Loss,
    LTData,
    Mixer,
    MixerParams,
    MixResult,
    ModelFactory,
    Optimizer,
    PatchOperator,
    RunInfo,
    SaliencyProvider,
    Sampler,
    Split,
    StepBatch,
    TensorSplit,
    Views,
    mix_end,
    mix_prob,
    mix_start,
)
from .params import param
from .plugins import default_registry
from .version import __version__

#: Loaded on first use (PEP 562): the training API pulls in the engine and the run folder.
_LAZY = {"train": "api", "load_run": "api", "TrainedRun": "api", "RunFolder": "api"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")



__all__ = [
    "KINDS", "Component", "Context", "Crops", "DatasetFactory", "LabelFuser", "Logger", "Loss", "LTData", "Mixer",
    "MixerParams", "mix_prob", "mix_start", "mix_end",
    "MixResult", "ModelFactory", "Optimizer", "PatchOperator", "RunInfo", "SaliencyProvider", "Sampler", "Split",
    "TensorSplit", "DecodingSplit", "Callback", "StepBatch", "Views", "hookimpl", "param", "default_registry", "LSMError", "RecipeError",
    "RegistryError", "DataError", "__version__", "train", "load_run", "TrainedRun", "RunFolder",
]
