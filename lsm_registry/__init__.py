"""lsm_registry: saliency-guided local semantic mixing for long-tailed classification.

Public API: the interfaces (the plugin ABI), ``hookimpl`` for plugins, the errors,
``__version__``, and :func:`train` / :func:`load_run` for scripts and notebooks.
Components are found through :func:`default_registry`.
"""

from .errors import DataError, LSMError, RecipeError, RegistryError
from .version import __version__

#: Everything else loads on first use (PEP 562), so that `import lsm_registry` and `lsm --help`
#: do not import torch: name -> the module (of this package) that defines it.
_LAZY = {
    **{
        name: "interfaces"
        for name in (
            "KINDS",
            "Callback",
            "Component",
            "Context",
            "Crops",
            "DatasetFactory",
            "DecodingSplit",
            "LabelFuser",
            "Logger",
            "Loss",
            "LTData",
            "Mixer",
            "MixerParams",
            "MixResult",
            "ModelFactory",
            "ModelOutput",
            "Optimizer",
            "PatchOperator",
            "RunInfo",
            "SaliencyProvider",
            "Sampler",
            "SecondBatch",
            "Split",
            "StepBatch",
            "TensorSplit",
            "Views",
            "mix_end",
            "mix_prob",
            "mix_start",
        )
    },
    "hookimpl": "hookspecs",
    "param": "params",
    "RenamedWarning": "renames",
    "default_registry": "plugins",
    **{name: "api" for name in ("train", "load_run", "TrainedRun", "RunFolder")},
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["DataError", "LSMError", "RecipeError", "RegistryError", "__version__", *_LAZY]
