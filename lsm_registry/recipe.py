"""TOML recipes -> frozen attrs objects, validated before any work starts.

Every problem is collected and reported at once, one line each, in the form
``FILE [table].key: message``; unknown tables, components and parameters get a
"Did you mean" hint and the valid choices. A recipe file may ``extends`` shared base
files (:mod:`lsm_registry.recipe_files` merges them first); ``--set table.key=value``
overrides are applied to the merged TOML before validation, so they are checked the
same way and win over the bases and the file alike.
"""

from __future__ import annotations

import math
import tomllib
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import attrs

from .errors import RecipeError, RegistryError
from .formats import RECIPE_FORMAT, format_problem
from .params import NONE_TOML, ParamError, at_least, coerce, non_negative, param, positive
from .plugins import default_registry
from .recipe_files import EXTENDS_KEY, FORMAT_KEY, read_recipe, read_toml  # noqa: F401  (read_toml: runfolder.evaluate)
from .registry import Registry, suggest
from .renames import RenamedWarning, Target, renamed_recipe

#: Component tables and the registry kind each selects.
COMPONENT_TABLES: dict[str, str] = {
    "data": "dataset",
    "model": "model",
    "sampler": "sampler",
    "saliency": "saliency",
    "patch": "patch",
    "mixer": "mixer",
    "label_fuser": "label_fuser",
    "loss": "loss",
}
#: Components a recipe gets when it leaves their table out (mixing tables default later).
DEFAULT_COMPONENTS: dict[str, str] = {"model": "resnet32", "sampler": "instance", "loss": "ce"}
#: The component a table means when it is present but does not say ``name``
#: (e.g. ``--set patch.size=28`` on a recipe without a [patch] table).
TABLE_DEFAULT_NAMES: dict[str, str] = {**DEFAULT_COMPONENTS, "patch": "pixel-unshuffle", "saliency": "gradcam"}


@attrs.frozen
class RunParams:
    name: str = param("", help="run folder name under runs/ (default: the recipe file's stem)")
    seed: int = param(0, help="seed of every random draw in the run")
    epochs: int = param(200, help="training epochs", validator=at_least(1))
    device: str = param("cpu", help='"cpu", "cuda", "cuda:N" or "auto" (CUDA when present)')
    eval_every: int = param(10, help="evaluate every N epochs (and always after the last)", validator=at_least(1))
    channels_last: bool = param(False, help="use the channels_last memory format (faster convolutions on CPU and GPU)")
    score_train: bool = param(
        True,
        help="at each evaluation also score the training split in eval mode with the test-time "
        "view (train_top1 ... train_few): whether the model fits its own training set, which the "
        "running loss of augmented or mixed batches does not show",
    )
    amp: Literal["none", "bf16", "fp16"] = param("none", help="mixed precision (fp16 uses a grad scaler; CUDA only)")
    loggers: tuple[str, ...] = param(
        (),
        help='trackers that also get the run, e.g. ["tensorboard", "mlflow"]; '
        "parameters in [loggers.NAME] (the run folder is always written)",
    )
    callbacks: tuple[str, ...] = param(
        (),
        help="callbacks (kind callback) added to the training loop after the "
        "engine's and the components' own, in this order; parameters in [callbacks.NAME]",
    )

    def __attrs_post_init__(self):
        dev = self.device
        if not (dev in ("cpu", "cuda", "auto", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ParamError("device", f'must be "cpu", "cuda", "cuda:N", "mps" or "auto" (got {dev!r})')
        if dev.startswith("cuda:") and len(dev) > 9:  # cuda:N with N < 10000: no machine has more
            raise ParamError("device", f"names no GPU a machine could have (got {dev!r})")
        name = self.name
        if "\0" in name or "/" in name or "\\" in name or name in (".", ".."):
            raise ParamError(
                "name", f"must be a plain folder name, without '/', '\\' or NUL, and not '.' or '..' (got {name!r})"
            )


@attrs.frozen
class OptimParams:
    """The engine's half of [optim]: batch, schedule and the base SGD every optimizer updates with.

    ``name`` picks the optimizer component (kind ``optimizer``); the table's other keys
    are that component's parameters, so [optim] stays one table while every key is
    still validated by whoever reads it.
    """

    name: str = param(
        "sgd",
        help='optimizer component: "sgd", "sam", "cc-sam" or a plugin\'s; the other keys of '
        "[optim] that are not listed here are its parameters",
    )
    batch_size: int = param(128, help="images per step (per process)", validator=at_least(1))
    lr: float = param(0.1, help="initial learning rate after warm-up", validator=positive)
    momentum: float = param(0.9, help="SGD momentum", validator=non_negative)
    weight_decay: float = param(2e-4, help="SGD weight decay", validator=non_negative)
    nesterov: bool = param(False, help="Nesterov momentum")
    warmup_epochs: int = param(5, help="linear warm-up epochs", validator=non_negative)
    schedule: Literal["step", "cosine"] = param("step", help="learning-rate schedule after warm-up")
    milestones: tuple[int, ...] = param((160, 180), help="step schedule: epochs at which lr is multiplied by gamma")
    gamma: float = param(0.01, help="step schedule: factor per milestone", validator=positive)
    lr_factors: tuple[tuple[int, float], ...] = param(
        (),
        help="[[epoch, factor], ...]: from that 0-based epoch on, the schedule's lr times factor (the latest "
        "pair begun counts; epochs increasing), e.g. [[100, 0.01]] for a loss whose phase starts at 100",
    )
    lr_groups: tuple[tuple[str, float], ...] = param(
        (),
        help='[["name", factor], ...]: the parameters named name or name.* (e.g. "classifier") train at '
        "factor x the scheduled lr; the others at the lr itself",
    )

    def __attrs_post_init__(self):
        epochs = [e for e, _ in self.lr_factors]
        if any(e < 0 for e in epochs) or epochs != sorted(set(epochs)):
            raise ParamError("lr_factors", f"epochs must be >= 0 and increasing (got {epochs})")
        if any(f <= 0 for _, f in (*self.lr_factors, *self.lr_groups)):
            key = "lr_factors" if any(f <= 0 for _, f in self.lr_factors) else "lr_groups"
            raise ParamError(key, "every factor must be > 0")
        names = [n for n, _ in self.lr_groups]
        if len(set(names)) != len(names) or any(not n or n.startswith(".") or n.endswith(".") for n in names):
            raise ParamError("lr_groups", f"names must be distinct parameter or module names (got {names})")


TRAIN_PARTS = ("all", "classifier", "classifier+bn", "classifier+bn-stats", "scales")
#: ``train`` values whose batch norm ``bn = "auto"`` keeps in eval mode: what they meant before ``bn`` existed.
FROZEN_BN_PARTS = ("classifier", "scales")


@attrs.frozen
class StageParams:
    """Where a run's weights start and which of them train: what makes a second stage (cRT, LWS).

    Run-level settings rather than [model] parameters, so that every key of a component
    table stays a parameter of its component. The parent run is looked for when the run
    starts, not here: a stage-2 recipe validates before its stage 1 has trained.
    """

    init_from: Optional[str] = param(
        None,
        help="run folder (its newest checkpoint) or checkpoint file whose model weights "
        "this run starts from; none: a fresh initialisation",
    )
    train: Literal["all", "classifier", "classifier+bn", "classifier+bn-stats", "scales"] = param(
        "all",
        help='what trains: "all"; "classifier" (backbone frozen); "classifier+bn" (also batch-norm affine '
        'parameters); "classifier+bn-stats" (the classifier, batch-norm statistics re-estimated with the affine '
        'parameters frozen: MiSLAS\'s shift learning); "scales" (only the per-class logit scales of a model with '
        "lws = true: LWS); whether batch-norm statistics move is [stage] bn",
    )
    reset_classifier: bool = param(
        False, help="start the classifier from a fresh initialisation instead of the parent's (cRT)"
    )
    init_checkpoint: Literal["last", "best"] = param(
        "last",
        help='which checkpoint of the init_from run folder: "last" (its newest) or "best" (checkpoints/best.pt, '
        "the best epoch on its validation split)",
    )
    bn: Literal["auto", "train", "frozen"] = param(
        "auto",
        help='batch-norm statistics of the stage: "train" (re-estimated on the stage\'s batches: every module in '
        'train mode, as Kang et al.\'s code does), "frozen" (kept: batch norm in eval mode); "auto": frozen for '
        'train = "classifier" and "scales", re-estimated otherwise (what recipes without this key mean)',
    )

    def __attrs_post_init__(self):
        if self.init_from is not None and not self.init_from.strip():
            raise ParamError(
                "init_from",
                "must name a run folder or a checkpoint file (got an empty string); "
                "unset it for a fresh initialisation",
            )
        if self.init_from is None and self.reset_classifier:
            raise ParamError(
                "reset_classifier",
                "true without init_from does nothing: a fresh model's classifier is "
                "already freshly initialised; set stage.init_from or remove it",
            )
        if self.init_from is None and self.train != "all":
            raise ParamError(
                "train",
                f'"{self.train}" without init_from would train part of a randomly initialised '
                'model; set stage.init_from to the stage-1 run or use train = "all"',
            )
        for key, value, default in (("init_checkpoint", self.init_checkpoint, "last"), ("bn", self.bn, "auto")):
            if self.init_from is None and value != default:
                raise ParamError(key, f'"{value}" without init_from does nothing: there is no parent; remove it')
        if self.bn == "frozen" and self.train == "classifier+bn-stats":
            raise ParamError(
                "bn", '"frozen" contradicts train = "classifier+bn-stats", whose point is to re-estimate the statistics'
            )

    @property
    def bn_frozen(self) -> bool:
        """Whether the stage keeps batch norm in eval mode (its running statistics fixed)."""
        return self.bn == "frozen" or (self.bn == "auto" and self.train in FROZEN_BN_PARTS)


FIXED_TABLES: dict[str, type] = {"run": RunParams, "optim": OptimParams, "stage": StageParams}
ALL_TABLES = (
    "run",
    "data",
    "model",
    "optim",
    "stage",
    "sampler",
    "saliency",
    "patch",
    "mixer",
    "label_fuser",
    "loss",
    "loggers",
    "callbacks",
)
#: The table of the loggers' parameters, one sub-table per logger: [loggers.mlflow].
LOGGERS_TABLE = "loggers"
#: The table of the recipe's callbacks' parameters: [callbacks.NAME].
CALLBACKS_TABLE = "callbacks"
#: Tables of named sub-tables, each listed in [run] under the same key: (table, kind).
LISTED_TABLES = {LOGGERS_TABLE: "logger", CALLBACKS_TABLE: "callback"}
#: Callbacks the engine always adds: listing them in [run] callbacks would run them twice.
ENGINE_CALLBACKS = ("lr-schedule", "nan-guard")
#: The tables that name one component, whose old names (lsm_registry.renames) are replaced before
#: validation; [optim] names the optimizer, and its own keys are never an optimizer's parameter.
RENAME_TARGETS = (
    *(Target(table, kind, TABLE_DEFAULT_NAMES.get(table)) for table, kind in COMPONENT_TABLES.items()),
    Target("optim", "optimizer", OptimParams().name, frozenset(f.name for f in attrs.fields(OptimParams))),
)


@attrs.frozen
class ComponentSpec:
    """A component chosen by a recipe: its kind, name and validated parameters."""

    kind: str
    name: str
    params: Any

    def build(self, registry: Registry, context: Any, *args: Any, **kwargs: Any) -> Any:
        return registry.get(self.kind, self.name)(self.params, context, *args, **kwargs)


@attrs.frozen
class Recipe:
    path: str
    run: RunParams
    optim: OptimParams
    data: ComponentSpec
    model: ComponentSpec
    sampler: ComponentSpec
    loss: ComponentSpec
    saliency: Optional[ComponentSpec] = None
    patch: Optional[ComponentSpec] = None
    mixer: Optional[ComponentSpec] = None
    label_fuser: Optional[ComponentSpec] = None
    loggers: tuple[ComponentSpec, ...] = ()
    callbacks: tuple[ComponentSpec, ...] = ()
    stage: StageParams = StageParams()
    #: The optimizer named by [optim].name, its parameters taken from the same table.
    optimizer: Optional[ComponentSpec] = None

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict of the resolved recipe (every key, defaults included)."""
        out: dict[str, dict[str, Any]] = {}
        for table in ALL_TABLES:
            value = getattr(self, table)
            if value is None or value == ():
                continue
            if table in LISTED_TABLES:
                out[table] = {spec.name: _params_dict(spec.params) for spec in value}
            elif isinstance(value, ComponentSpec):
                out[table] = {"name": value.name, **_params_dict(value.params)}
            else:
                out[table] = _params_dict(value)
                if table == "optim" and self.optimizer is not None:
                    out[table].update(_params_dict(self.optimizer.params))
        return out

    def to_toml(self) -> str:
        """The resolved recipe as TOML, led by ``format = RECIPE_FORMAT`` (see :mod:`lsm_registry.formats`)."""
        return dumps_toml(self.to_dict(), format=RECIPE_FORMAT)


def _params_dict(params: Any) -> dict[str, Any]:
    return attrs.asdict(params, recurse=False)


def without_loggers(recipe: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe dict less its loggers, which say where a run is watched, not what it computes.

    Resume and run comparisons use it, so adding or removing a tracker never makes a
    run "another setting".
    """
    out = {
        table: dict(keys) if isinstance(keys, dict) else keys
        for table, keys in recipe.items()
        if table != LOGGERS_TABLE
    }
    if isinstance(out.get("run"), dict):
        out["run"].pop("loggers", None)
    return out


# ------------------------------------------------------------------------------ TOML out


def _toml_value(value: Any) -> str:
    if value is None:
        return NONE_TOML
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return "nan"
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dumps_toml(tables: dict[str, dict[str, Any]], format: Optional[int] = None) -> str:
    """Writes flat tables of scalars and lists (all a recipe holds); ``None`` is written as ``{ none = true }``.

    ``format``, when given, is written first as the top-level key ``format = N``.
    """
    lines: list[str] = [f"format = {int(format)}", ""] if format is not None else []
    for table, keys in tables.items():
        if keys and all(isinstance(v, dict) for v in keys.values()):  # [loggers.NAME] sub-tables
            sections = [(f"{table}.{name}", body) for name, body in keys.items()]
        else:
            sections = [(table, keys)]
        for header, body in sections:
            lines.append(f"[{header}]")
            for key, value in body.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ parsing


def parse_override(text: str) -> tuple[str, str, Any]:
    """``table.key=value`` with value in TOML syntax (a bare word is taken as a string)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise RecipeError([f"--set {text}: expected table.key=value (e.g. --set run.epochs=10)"])
    lhs, raw = text.split("=", 1)
    table, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return table, key, value


def load_recipe(path: str | Path, overrides: list[str] = (), registry: Optional[Registry] = None) -> Recipe:
    """Read (bases merged in), override and validate a recipe; raises RecipeError listing every problem."""
    path = Path(path)
    raw = read_recipe(path)  # its bases merged in: overrides apply to the whole recipe
    errors: list[str] = []
    apply_overrides(raw, parse_overrides(overrides, errors), errors)
    return validate(raw, str(path), registry, errors)


def parse_overrides(overrides: Sequence[str], errors: list[str]) -> list[tuple[str, str, str, Any]]:
    """``--set`` lines as (text, table, key, value); a line that does not parse adds its error."""
    parsed = []
    for text in overrides:
        try:
            parsed.append((text, *parse_override(text)))
        except RecipeError as exc:
            errors.extend(exc.lines)
    return parsed


def apply_overrides(raw: dict[str, Any], parsed: Sequence[tuple[str, str, str, Any]], errors: list[str]) -> None:
    """Write parsed overrides into a raw recipe dict; ``loggers.NAME.KEY`` and ``callbacks.NAME.KEY``
    reach the named sub-table."""
    for text, table, key, value in parsed:
        if table in LISTED_TABLES and "." in key:  # --set loggers.mlflow.tracking_uri=...
            sub, key = key.split(".", 1)
            parent = raw.setdefault(table, {})
            section = parent.setdefault(sub, {}) if isinstance(parent, dict) else None
            table = f"{table}.{sub}"
        else:
            section = raw.setdefault(table, {})
        if not isinstance(section, dict):
            errors.append(f"--set {text}: [{table}] is not a table")
            continue
        section[key] = value


def validate(
    raw: dict[str, Any], where: str, registry: Optional[Registry] = None, errors: Optional[list[str]] = None
) -> Recipe:
    """A parsed recipe as a frozen :class:`Recipe`; every problem is collected, then raised at once."""
    if registry is None:
        registry = default_registry()
    errors = list(errors or [])
    # The one top-level key: the recipe format (absent: the current one). A newer format
    # is refused alone: its other lines would only be noise from keys this version lacks.
    problem = format_problem(raw.get(FORMAT_KEY), RECIPE_FORMAT, where)
    if problem is not None:
        raise RecipeError([problem])
    # Old names of renamed components and parameters become the current ones, one warning each.
    raw = renamed_recipe(raw, registry, where, RENAME_TARGETS, LISTED_TABLES, errors)
    _check_tables(raw, where, errors)
    fixed, optimizer_keys = _fixed_tables(raw, where, errors)
    specs = {
        table: _component_table(registry, raw, table, kind, where, errors) for table, kind in COMPONENT_TABLES.items()
    }
    _fill_mixing_defaults(registry, specs, where, errors)
    _check_mixing_happens(specs.get("mixer"), fixed["run"], where, errors)
    _check_stage(fixed["stage"], specs.get("model"), where, errors)
    optimizer = _optimizer(registry, fixed["optim"], fixed["run"], optimizer_keys, where, errors)
    loggers = _listed(registry, LOGGERS_TABLE, fixed["run"], raw.get(LOGGERS_TABLE), where, errors)
    callbacks = _listed(registry, CALLBACKS_TABLE, fixed["run"], raw.get(CALLBACKS_TABLE), where, errors)
    if errors:
        raise RecipeError(errors)
    return Recipe(
        path=where,
        run=fixed["run"],
        optim=fixed["optim"],
        stage=fixed["stage"],
        loggers=loggers,
        callbacks=callbacks,
        optimizer=optimizer,
        **specs,
    )


def _check_tables(raw: dict[str, Any], where: str, errors: list[str]) -> None:
    for table, value in raw.items():
        if table == FORMAT_KEY:
            continue
        if table == EXTENDS_KEY:  # read_recipe merges the bases and drops the key; a dict built otherwise keeps it
            errors.append(
                f"{where} {EXTENDS_KEY}: bases are merged when a recipe file is read (load_recipe); "
                "this recipe was not read from a file, so its bases would be ignored"
            )
            continue
        top_hint = None if table in ALL_TABLES or isinstance(value, dict) else suggest(table, (FORMAT_KEY, EXTENDS_KEY))
        if top_hint:
            errors.append(
                f"{where} {table}: unknown top-level key. Did you mean {top_hint!r}? "
                f"Top-level keys: {FORMAT_KEY}, {EXTENDS_KEY}"
            )
        elif table not in ALL_TABLES:
            hint = suggest(table, ALL_TABLES)
            errors.append(
                f"{where} [{table}]: unknown table."
                + (f" Did you mean [{hint}]?" if hint else "")
                + f" Tables: {', '.join(ALL_TABLES)}"
            )
        elif not isinstance(value, dict):
            errors.append(f"{where} [{table}]: must be a table (got {value!r})")


def _section(raw: dict[str, Any], table: str) -> Optional[dict[str, Any]]:
    value = raw.get(table)
    return value if isinstance(value, dict) else None


def _fixed_tables(raw: dict[str, Any], where: str, errors: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """[run], [optim], [stage] built (None where invalid), and the [optim] keys left to the optimizer component."""
    fixed: dict[str, Any] = {}
    optimizer_keys: dict[str, Any] = {}
    for table, cls in FIXED_TABLES.items():
        body = _section(raw, table) or {}
        if table == "optim":
            own = {f.name for f in attrs.fields(cls)}
            optimizer_keys = {k: v for k, v in body.items() if k not in own}
            body = {k: v for k, v in body.items() if k in own}
        fixed[table] = build_params(cls, body, where, table, errors, owner=f"table [{table}]")
    if fixed["run"] is not None and not fixed["run"].name:
        fixed["run"] = attrs.evolve(fixed["run"], name=Path(where).stem)
    return fixed, optimizer_keys


def _component_table(
    registry: Registry, raw: dict[str, Any], table: str, kind: str, where: str, errors: list[str]
) -> Optional[ComponentSpec]:
    body = _section(raw, table)
    if body is None:
        if table == "data":
            errors.append(
                f'{where} [data]: missing; a recipe must say which data set to train on (e.g. name = "synthetic-lt")'
            )
        default = DEFAULT_COMPONENTS.get(table)
        return _component(registry, kind, default, {}, where, table, errors) if default else None
    name = body.get("name", TABLE_DEFAULT_NAMES.get(table))
    if name is None:
        errors.append(f"{where} [{table}].name: missing; choose one of {', '.join(registry.names(kind))}")
        return None
    if not isinstance(name, str):
        errors.append(f"{where} [{table}].name: expected a string (got {name!r})")
        return None
    params = {k: v for k, v in body.items() if k != "name"}
    return _component(registry, kind, name, params, where, table, errors)


def _optimizer(
    registry: Registry,
    optim: Optional[OptimParams],
    run: Optional[RunParams],
    keys: dict[str, Any],
    where: str,
    errors: list[str],
) -> Optional[ComponentSpec]:
    """[optim].name's component, built from the keys of [optim] that are not the engine's own."""
    if optim is None:
        return None
    name = optim.name
    try:
        entry = registry.entry("optimizer", name)
    except RegistryError as exc:
        errors.append(f"{where} [optim].name: {exc}")
        return None
    own = [f.name for f in attrs.fields(OptimParams)]
    attrs.resolve_types(entry.cls.Params)
    theirs = [f.name for f in attrs.fields(entry.cls.Params)]
    clash = sorted(set(own) & set(theirs))
    if clash:
        errors.append(
            f"{where} [optim]: optimizer {name!r} has parameter(s) {', '.join(clash)} of the same name as "
            "[optim]'s own keys, so a recipe could not set them; the optimizer must rename them"
        )
        return None
    unknown = [k for k in keys if k not in theirs]
    for key in unknown:
        hint = suggest(key, own + theirs)
        errors.append(
            f"{where} [optim].{key}: neither a key of [optim] nor a parameter of optimizer {name!r}."
            + (f" Did you mean {hint!r}?" if hint else "")
            + f" [optim] keys: {', '.join(own)}; {name!r} parameters: {', '.join(theirs) or '(none)'}"
        )
    if unknown:
        return None
    built = build_params(entry.cls.Params, keys, where, "optim", errors, owner=f"optimizer {name!r}")
    if built is None:
        return None
    if run is not None and run.amp == "fp16" and not entry.cls.supports_grad_scaler:
        errors.append(
            f"{where} [optim].name: optimizer {name!r} does not work with fp16's gradient scaler "
            '([run].amp = "fp16"); use amp = "bf16" or "none", or name = "sgd"'
        )
    return ComponentSpec("optimizer", name, built)


def _check_stage(stage: Optional[StageParams], model: Optional[ComponentSpec], where: str, errors: list[str]) -> None:
    """``train = "scales"`` needs scales to train; without them the run would change nothing."""
    if stage is None or model is None or stage.train != "scales":
        return
    if not getattr(model.params, "lws", False):
        errors.append(
            f'{where} [stage].train: "scales" trains only the per-class logit scales, and model '
            f"{model.name!r} has none; set model.lws = true (LWS)"
        )


def _listed(
    registry: Registry, table: str, run: Optional[RunParams], body: Any, where: str, errors: list[str]
) -> tuple[ComponentSpec, ...]:
    """[run].loggers / [run].callbacks name the components; [TABLE.NAME] holds one's parameters."""
    kind = LISTED_TABLES[table]
    if body is not None and not isinstance(body, dict):
        return ()  # reported with the other tables
    body = body or {}
    names = getattr(run, table) if run is not None else ()
    for name, params in body.items():
        if not isinstance(params, dict):
            errors.append(
                f"{where} [{table}].{name}: expected a table [{table}.{name}] of that {kind}'s parameters (got {params!r})"
            )
        elif name not in names:
            errors.append(
                f"{where} [{table}.{name}]: {kind} {name!r} is not in [run].{table} ({list(names)}), "
                "so this table is never used; add it there or remove the table"
            )
    specs = []
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            errors.append(f"{where} [run].{table}: {name!r} is listed {names.count(name)} times")
        if kind == "callback" and name in ENGINE_CALLBACKS:
            errors.append(f"{where} [run].{table}: {name!r} is always on (the engine adds it); remove it from the list")
            continue
        try:
            registry.entry(kind, name)
        except RegistryError as exc:
            errors.append(f"{where} [run].{table}: {exc}")
            continue
        params = body.get(name, {})
        spec = _component(
            registry, kind, name, params if isinstance(params, dict) else {}, where, f"{table}.{name}", errors
        )
        if spec is not None:
            specs.append(spec)
    return tuple(specs)


def migrate(
    old: dict[str, Any], registry: Optional[Registry] = None, where: str = "recipe"
) -> dict[str, dict[str, Any]]:
    """An older resolved recipe (a checkpoint's dict, a run's recipe.toml) as this version resolves it.

    Keys added to the library since it was written take their defaults, so it compares
    equal to a new recipe of the same settings. A dict that no longer validates (a value
    a newer validator refuses, a component no longer installed) is returned as it was,
    without its format key: comparing it then shows what differs. Old component and
    parameter names become the current ones silently: a stored run is history, not
    something its reader should edit.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RenamedWarning)
            return validate(dict(old), where, registry).to_dict()
    except RecipeError:
        return {table: keys for table, keys in old.items() if table != FORMAT_KEY}


def _fill_mixing_defaults(
    registry: Registry, specs: dict[str, Optional[ComponentSpec]], where: str, errors: list[str]
) -> None:
    """A mixer brings what it needs: a patch operator, a saliency provider, a label fuser."""
    mixer = specs.get("mixer")
    if mixer is None:
        for table in ("saliency", "patch", "label_fuser"):
            if specs.get(table) is not None:
                errors.append(
                    f"{where} [{table}]: there is no [mixer] table, so no batch is mixed and this table is never "
                    "used; add a [mixer] or remove it"
                )
        return
    mixer_cls = registry.get("mixer", mixer.name)
    required, sampler = mixer_cls.requires_sampler, specs.get("sampler")
    if required and sampler is not None and sampler.name != required:
        errors.append(
            f'{where} [sampler].name: mixer {mixer.name!r} needs name = "{required}" (got {sampler.name!r}); '
            "otherwise its foreground would be a permutation of the batch"
        )
    if specs.get("patch") is None and ("patch", "pixel-unshuffle") in registry:
        specs["patch"] = _component(registry, "patch", "pixel-unshuffle", {}, where, "patch", errors)
    if specs.get("label_fuser") is None:
        specs["label_fuser"] = _component(
            registry, "label_fuser", mixer_cls.default_fuser, {}, where, "label_fuser", errors
        )
    fuser = specs.get("label_fuser")
    fuser_cls = registry.get("label_fuser", fuser.name) if fuser is not None else None
    wants = mixer_cls.needs_saliency or bool(
        fuser_cls and (fuser_cls.needs_saliency or fuser_cls.needs_background_saliency)
    )
    if wants and specs.get("saliency") is None:
        specs["saliency"] = _component(registry, "saliency", "gradcam", {}, where, "saliency", errors)


def window_fix(params: Any, epochs: int) -> str:
    """The flags that give a mixer's window epochs to mix in a run of ``epochs``: the start moved
    to at most a quarter of the run, the end dropped when it would still close the window."""
    start = min(params.start_epoch, epochs // 4)
    flags = [f"--set mixer.start_epoch={start}"] if start != params.start_epoch else []
    if not attrs.evolve(params, start_epoch=start).window(epochs):
        flags.append("--unset mixer.end_epoch")
    return " ".join(flags)


def _check_mixing_happens(
    mixer: Optional[ComponentSpec], run: Optional[RunParams], where: str, errors: list[str]
) -> None:
    """A [mixer] that can never mix is refused: the run would silently train without it."""
    if mixer is None or run is None:
        return
    params = mixer.params
    if not params.window(run.epochs):
        errors.append(
            f"{where} [mixer] {params.describe_window()} is empty for run.epochs = {run.epochs}: "
            f"no batch would be mixed; for a run this short add {window_fix(params, run.epochs)}"
        )
    if params.prob == 0.0:
        errors.append(f"{where} [mixer].prob: 0 means no batch would be mixed; raise it or remove the [mixer] table")


def _component(
    registry: Registry, kind: str, name: str, params: dict[str, Any], where: str, table: str, errors: list[str]
) -> Optional[ComponentSpec]:
    try:
        entry = registry.entry(kind, name)
    except RegistryError as exc:
        errors.append(f"{where} [{table}].name: {exc}")
        return None
    built = build_params(entry.cls.Params, params, where, table, errors, owner=f"{kind} {name!r}")
    return ComponentSpec(kind, name, built) if built is not None else None


def build_params(cls: type, values: dict[str, Any], where: str, table: str, errors: list[str], owner: str) -> Any:
    """Validate ``values`` against an attrs Params class; append one line per problem."""
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    before = len(errors)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            hint = suggest(key, fields)
            valid = ", ".join(fields) or "(none)"
            errors.append(
                f"{where} [{table}].{key}: unknown parameter of {owner}."
                + (f" Did you mean {hint!r}?" if hint else "")
                + f" Parameters: {valid}"
            )
            continue
        field = fields[key]
        try:
            value = coerce(value, field.type)
        except ValueError as exc:
            errors.append(f"{where} [{table}].{key}: {exc}")
            continue
        if field.validator is not None:
            try:
                field.validator(None, field, value)
            except ParamError as exc:
                errors.append(f"{where} [{table}].{exc.key}: {exc}")
                continue
            except (ValueError, TypeError) as exc:
                errors.append(f"{where} [{table}].{key}: {exc}")
                continue
        kwargs[key] = value
    if len(errors) > before:
        return None
    try:
        # Each field's validator ran above (so that every bad key is reported at once);
        # building the class runs only the cross-field checks of __attrs_post_init__.
        with attrs.validators.disabled():
            return cls(**kwargs)
    except ParamError as exc:
        errors.append(f"{where} [{table}].{exc.key}: {exc}")
    except (ValueError, TypeError) as exc:
        errors.append(f"{where} [{table}]: {exc}")
    return None
