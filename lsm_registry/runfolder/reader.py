"""Reading finished run folders and comparing them (``lsm compare``, ``lsm sweep``).

A run folder (written by :mod:`lsm_registry.runfolder.reporter`) holds ``recipe.toml`` (the
resolved recipe), ``metrics.jsonl``, ``summary.json`` and ``per_class.csv``. Runs
whose resolved recipes differ only in ``run.seed`` and ``run.name`` are repeats of
one setting and are grouped as mean +- standard deviation; each group is labelled by
the recipe keys that tell it apart from the other groups. A stage-2 run's
``stage.init_from`` counts as its parent's setting (the parent's recipe up to seed and
name, recorded in summary.json), not as the parent's path, so a two-stage method
trained from several stage-1 seeds is one setting. An older run's recipe.toml
may lack keys added to the library since: such a key counts as its default (see
:mod:`lsm_registry.formats`), so old and new runs of one setting group together.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Optional

import attrs
from rich.table import Table

from ..errors import LSMError
from ..formats import RECIPE_FORMAT, SUMMARY_FORMAT, format_problem
from ..plugins import default_registry
from ..recipe import ALL_TABLES, dumps_toml, migrate, without_loggers

#: Recipe keys that do not change what a run measures, ignored when grouping.
REPEAT_KEYS = (("run", "seed"), ("run", "name"))
#: (summary key, column title) of the accuracy columns, in order.
METRICS = (("top1", "top-1"), ("many", "Many"), ("medium", "Medium"), ("few", "Few"), ("rare3", "rarest 3"))


@attrs.frozen
class RunRecord:
    """One finished run: its folder, summary and resolved recipe (empty if recipe.toml is missing)."""

    path: Path
    summary: dict[str, Any]
    recipe: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.summary.get("run_name") or self.recipe.get("run", {}).get("name") or self.path.name)


@attrs.frozen
class RunGroup:
    """Runs of one setting (same resolved recipe up to seed and name)."""

    runs: tuple[RunRecord, ...]
    label: str = ""

    @property
    def name(self) -> str:
        return self.runs[0].name

    @property
    def seeds(self) -> list[Any]:
        return [r.summary.get("seed", r.recipe.get("run", {}).get("seed")) for r in self.runs]

    def stat(self, key: str) -> tuple[Optional[float], Optional[float]]:
        return mean_std([r.summary.get(key) for r in self.runs])

    @property
    def parents(self) -> str:
        """The runs the group's stage-2 runs started from (``[stage].init_from``), by run name; "—" for none.

        Parents that share a run name (the seeds of one stage-1 setting) are named once,
        with their seeds: ``ce (seeds 0, 1, 2)``.
        """
        by_name: dict[str, dict[str, Any]] = {}
        for r in self.runs:
            name = parent_name(r)
            if name is not None:
                parent = r.summary["parent"]
                by_name.setdefault(name, {})[str(parent.get("checkpoint") or parent.get("init_from"))] = _parent_seed(
                    parent
                )
        parts = []
        for name, checkpoints in by_name.items():
            seeds = sorted({s for s in checkpoints.values() if s is not None}, key=str)
            parts.append(f"{name} (seeds {', '.join(map(str, seeds))})" if len(checkpoints) > 1 and seeds else name)
        return " / ".join(parts) or "—"


def parent_name(record: RunRecord) -> Optional[str]:
    """The parent run's name (or its checkpoint) that a stage-2 run recorded in summary.json, else None."""
    parent = record.summary.get("parent")
    if not isinstance(parent, dict):
        return None
    return str(parent.get("run_name") or parent.get("checkpoint") or parent.get("init_from") or "?")


def _parent_seed(parent: dict[str, Any]) -> Any:
    recipe = parent.get("recipe")
    run = recipe.get("run") if isinstance(recipe, dict) else None
    return run.get("seed") if isinstance(run, dict) else None


def has_parents(groups: list[RunGroup]) -> bool:
    """Whether a comparison gets a "parent" column: only when some run is a stage 2."""
    return any(parent_name(r) is not None for g in groups for r in g.runs)


def mean_std(values: list[Any]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n - 1) of the values that are not None.

    The std is None for fewer than two values: a single run has no spread to show.
    """
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


# ------------------------------------------------------------------------------ reading


def is_run_dir(folder: Path) -> bool:
    return (folder / "summary.json").is_file() or (folder / "recipe.toml").is_file()


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run folders named directly, or the finished runs inside a folder of runs (a sweep).

    A run folder without summary.json (a run that did not finish) is an error, so is a
    folder that holds no run at all.
    """
    out: list[Path] = []

    def add(folder: Path) -> None:
        if all(folder.resolve() != seen.resolve() for seen in out):  # a run named twice counts once
            out.append(folder)

    for path in paths:
        if not path.exists():
            raise LSMError(f"{path}: no such run folder")
        if not path.is_dir():
            raise LSMError(f"{path}: not a folder (give run folders, which hold summary.json)")
        if is_run_dir(path):
            add(path)
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and (p / "summary.json").is_file())
        if not children:
            raise LSMError(f"{path}: no summary.json here or in its sub-folders; not a finished run folder")
        for child in children:
            add(child)
    return out


#: Summary keys that every reader does arithmetic on: a number (or null) each.
NUMBER_KEYS = (
    "top1",
    "many",
    "medium",
    "few",
    "rare3",
    "best_top1",
    "final_loss",
    "wall_time_s",
    *(f"{p}_{k}" for p in ("val", "train") for k in ("top1", "many", "medium", "few", "rare3")),
)
#: Summary keys that hold a list of numbers (or nulls).
NUMBER_LIST_KEYS = ("per_class", "class_counts", "train_per_class")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_summary_types(summary: dict[str, Any], path: Path) -> None:
    """One line naming the key when a summary.json holds text or a list where a number belongs
    (a hand-edited or hostile file), instead of a traceback in compare or report."""
    for key in NUMBER_KEYS:
        value = summary.get(key)
        if value is not None and not is_number(value):
            raise LSMError(f"{path}: {key} must be a number (got {type(value).__name__})")
    for key in NUMBER_LIST_KEYS:
        value = summary.get(key)
        if value is not None and not (isinstance(value, list) and all(v is None or is_number(v) for v in value)):
            raise LSMError(f"{path}: {key} must be a list of numbers")
    names = summary.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise LSMError(f"{path}: class_names must be a list of strings")


def load_run(folder: Path) -> RunRecord:
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise LSMError(f"{folder}: no summary.json (the run did not finish, or this is not a run folder)")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LSMError(f"{summary_path}: not valid JSON ({exc})") from None
    if not isinstance(summary, dict) or "top1" not in summary:
        raise LSMError(f"{summary_path}: not a run summary (no top1 key)")
    problem = format_problem(summary.get("format"), SUMMARY_FORMAT, str(summary_path))
    if problem is not None:
        raise LSMError(problem)
    check_summary_types(summary, summary_path)
    recipe, _ = read_run_recipe(folder / "recipe.toml")
    return RunRecord(path=folder, summary=summary, recipe=recipe)


def read_metrics(path: Path) -> tuple[dict[str, Any], ...]:
    """A run folder's metrics.jsonl, one checked record per line (() when there is none)."""
    if not path.is_file():
        return ()
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LSMError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
        if not isinstance(record, dict):
            raise LSMError(f"{path}:{number}: not a metrics record (a JSON object per line)")
        epoch = record.get("epoch")
        if not (isinstance(epoch, int) and not isinstance(epoch, bool)):
            raise LSMError(f"{path}:{number}: epoch must be an integer (got {type(epoch).__name__})")
        for key in ("train_loss", "lr", *NUMBER_KEYS):
            value = record.get(key)
            if value is not None and not is_number(value):
                raise LSMError(f"{path}:{number}: {key} must be a number (got {type(value).__name__})")
        out.append(record)
    return tuple(out)


def read_run_recipe(path: Path) -> tuple[dict[str, Any], Optional[str]]:
    """A run folder's resolved recipe.toml as a dict and its text; ({}, None) when there is none."""
    if not path.is_file():
        return {}, None
    try:
        text = path.read_text(encoding="utf-8")
        recipe = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LSMError(f"{path}: cannot read the resolved recipe ({exc})") from None
    problem = format_problem(recipe.get("format"), RECIPE_FORMAT, str(path))
    if problem is not None:
        raise LSMError(problem)
    return recipe, text


def load_runs(paths: list[Path]) -> list[RunRecord]:
    return [load_run(p) for p in expand_run_dirs(paths)]


# ------------------------------------------------------------------------------ grouping


def flatten(recipe: dict[str, Any]) -> dict[str, Any]:
    """{"table.key": value} of a resolved recipe, the repeat keys and the loggers left out."""
    flat = {}
    for table, keys in without_loggers(recipe).items():
        if not isinstance(keys, dict):
            continue
        for key, value in keys.items():
            if (table, key) not in REPEAT_KEYS:
                flat[f"{table}.{key}"] = value
    return flat


#: What a stage-2 run's ``stage.init_from`` is replaced by when grouping: {PARENT_SETTING: the parent's flat setting}.
PARENT_SETTING = "parent setting"


def _migrated_flat(recipe: dict[str, Any], registry: Any, where: str) -> dict[str, Any]:
    return flatten(tomllib.loads(dumps_toml(migrate(recipe, registry, where))))


def parent_setting(parent: Any, registry: Any, where: str) -> Optional[dict[str, Any]]:
    """The setting of the parent a stage-2 run recorded (summary.json ``parent``), flattened and migrated; else None.

    That is the parent's resolved recipe without its seed and name, so stage 1 trained
    on seeds 0, 1, 2 is one setting. When the parent was a stage itself, its own
    ``stage.init_from`` is replaced by its parent's setting in turn. None for a run
    recorded before the parent's recipe was kept, or started from a bare state_dict:
    such a run is grouped by the parent's path, as written.
    """
    if not isinstance(parent, dict) or not isinstance(parent.get("recipe"), dict):
        return None
    flat = _migrated_flat(parent["recipe"], registry, where)
    grand = parent_setting(parent.get("parent"), registry, where)
    if grand is not None and "stage.init_from" in flat:
        flat["stage.init_from"] = {PARENT_SETTING: grand}
    return flat


def migrated_flats(records: list[RunRecord]) -> list[dict[str, Any]]:
    """:func:`flatten` of each run's recipe as this version resolves it (:func:`recipe.migrate`).

    An older recipe.toml lacks the keys added to the library since it was written; the
    run used what their defaults do, and migrating fills them in. The result is read back
    through TOML, so every run's values have the form recipe.toml gives them (lists for
    tuples, ``{ none = true }`` for None). A recipe that no longer validates (a component
    not installed here) is compared as written. A stage-2 run's ``stage.init_from`` is
    replaced by its parent's setting (:func:`parent_setting`) where the run recorded it.
    """
    registry = default_registry()
    flats = []
    for r in records:
        flat = _migrated_flat(r.recipe, registry, str(r.path)) if r.recipe else {}
        parent = parent_setting(r.summary.get("parent"), registry, str(r.path))
        if parent is not None and "stage.init_from" in flat:
            flat["stage.init_from"] = {PARENT_SETTING: parent}
        flats.append(flat)
    return flats


def _method(flat: dict[str, Any]) -> str:
    """``no mixer, loss ce``: a setting's leading components, for a label with nothing to compare it to."""
    parts = []
    for table in LEADING_TABLES:
        name = flat.get(f"{table}.name")
        if isinstance(name, str):
            parts.append(f"{SHORT_TABLES.get(table, table)} {name}")
        elif table == "mixer":
            parts.append("no mixer")
    return ", ".join(parts)


def _label_flats(flats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The flats with each parent setting replaced by what tells it apart from the other parents: ``parent(mixer mixup)``."""
    settings = {
        json.dumps(f["stage.init_from"], sort_keys=True, default=str): f["stage.init_from"][PARENT_SETTING]
        for f in flats
        if isinstance(f.get("stage.init_from"), dict) and PARENT_SETTING in f["stage.init_from"]
    }
    if not settings:
        return flats
    parents = [_label_flats([s])[0] for s in settings.values()]
    # One parent setting has nothing to be told apart from: name its method instead.
    names = dict(zip(settings, setting_labels(parents) if len(parents) > 1 else [_method(parents[0])]))
    out = []
    for f in flats:
        value = f.get("stage.init_from")
        if isinstance(value, dict) and PARENT_SETTING in value:
            f = {**f, "stage.init_from": f"parent({names[json.dumps(value, sort_keys=True, default=str)] or 'same'})"}
        out.append(f)
    return out


def setting_key(record: RunRecord, flat: Optional[dict[str, Any]] = None) -> str:
    """What repeats of one setting share; ``flat`` is the run's (migrated) flattened recipe."""
    if not record.recipe:  # no resolved recipe: only identical run names can be repeats
        return json.dumps({"__run__": record.name})
    return json.dumps(flatten(record.recipe) if flat is None else flat, sort_keys=True, default=str)


def _table_order(key: str) -> tuple[int, bool, str]:
    """Recipe table order, a component's name first within its table."""

    table, _, name = key.partition(".")
    return (ALL_TABLES.index(table) if table in ALL_TABLES else len(ALL_TABLES), name != "name", key)


def _fmt_value(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, list):
        return "[" + ",".join(_fmt_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


#: How a setting label names a component table ("mixer lsm", "fuser saliency", "no mixer").
SHORT_TABLES = {"label_fuser": "fuser"}
#: Tables named first in a label: what a comparison of methods is usually about.
LEADING_TABLES = ("mixer", "label_fuser", "loss")
#: Tables a recipe gets with its mixer; a run without a mixer is not labelled "no fuser" too.
MIXING_TABLES = ("label_fuser", "saliency", "patch")


def setting_labels(flats: list[dict[str, Any]]) -> list[str]:
    """Per setting, only what tells it apart from the others: ``mixer lsm, fuser saliency``, ``loss.gamma=2.0``.

    A component chosen differently (or absent: ``no mixer``) is named once by its table;
    its parameters are listed only where they differ between settings that use the same
    component, since a different component already explains any difference in them.
    """
    keys = sorted({k for f in flats for k in f}, key=_table_order)
    tables = list(dict.fromkeys(k.partition(".")[0] for k in keys))
    named = [t for t in tables if f"{t}.name" in keys and len({json.dumps(f.get(f"{t}.name")) for f in flats}) > 1]
    named.sort(key=lambda t: (t not in LEADING_TABLES, LEADING_TABLES.index(t) if t in LEADING_TABLES else 0))
    params = []
    for k in keys:
        table, _, key = k.partition(".")
        if key == "name":
            continue
        by_component: dict[str, set[str]] = {}
        for f in flats:
            if k in f:
                by_component.setdefault(json.dumps(f.get(f"{table}.name")), set()).add(json.dumps(f[k], default=str))
        if any(len(values) > 1 for values in by_component.values()):
            params.append(k)
    labels = []
    for flat in flats:
        parts = []
        for t in named:
            name = flat.get(f"{t}.name")
            if name is None and t in MIXING_TABLES and "mixer.name" not in flat:
                continue  # "no mixer" says it: the mixing tables come with a mixer
            short = SHORT_TABLES.get(t, t)
            parts.append(f"{short} {name}" if name is not None else f"no {short}")
        parts += [f"{k}={_fmt_value(flat[k])}" for k in params if k in flat]
        labels.append(", ".join(parts))  # every key that tells the settings apart: none is hidden
    return labels


#: Metrics a comparison can be ranked by.
RANK_KEYS = ("val_top1", "top1")


def rank_groups(groups: list[RunGroup], by: str) -> list[RunGroup]:
    """Best first by the mean of ``by`` (``val_top1``: choose on validation, report the test set)."""

    def key(group: RunGroup) -> float:
        mean = group.stat(by)[0]
        return -mean if mean is not None else float("inf")

    return sorted(groups, key=key)


def metrics_of(groups: list[RunGroup]) -> tuple[tuple[str, str], ...]:
    """The accuracy columns; validation top-1 first when some run has a validation split, and
    train top-1 and Few last when some run scored its training split (``run.score_train``)."""
    runs = [r for g in groups for r in g.runs]
    has_val = any(r.summary.get("val_top1") is not None for r in runs)
    has_train = any(r.summary.get("train_top1") is not None for r in runs)
    return (
        ((("val_top1", "val top-1"),) if has_val else ())
        + METRICS
        + ((("train_top1", "train top-1"), ("train_few", "train Few")) if has_train else ())
    )


def group_runs(records: list[RunRecord]) -> list[RunGroup]:
    """Groups of repeats in order of first appearance, each labelled by what sets it apart."""
    order: list[str] = []
    members: dict[str, list[RunRecord]] = {}
    first_flat: dict[str, dict[str, Any]] = {}
    for record, flat in zip(records, migrated_flats(records)):
        key = setting_key(record, flat)
        if key not in members:
            order.append(key)
            members[key] = []
            first_flat[key] = flat
        members[key].append(record)
    flats = [first_flat[k] for k in order]
    labels = setting_labels(_label_flats(flats))
    # Settings the label cannot tell apart (they differ only in keys a label leaves out) get their folder.
    clashing = {label for label in labels if labels.count(label) > 1}
    for i, label in enumerate(labels):
        if label in clashing:
            folder = members[order[i]][0].path.name
            labels[i] = f"{label}, {folder}" if label else folder
    groups = [RunGroup(runs=tuple(members[key]), label=label) for key, label in zip(order, labels)]
    return groups


# ------------------------------------------------------------------------------ output


def columns_of(groups: list[RunGroup]) -> tuple[str, ...]:
    parent = ("parent",) if has_parents(groups) else ()
    return (
        ("run", "setting", "runs") + tuple(title for _, title in metrics_of(groups)) + ("epochs", "wall time") + parent
    )


def _pct(mean: Optional[float], std: Optional[float], plus_minus: str = " ± ") -> str:
    if mean is None:
        return "—"
    text = f"{100 * mean:.1f}"
    return text + (f"{plus_minus}{100 * std:.1f}" if std is not None else "")


def _wall(mean: Optional[float]) -> str:
    if mean is None:
        return "—"
    if mean >= 3600:
        return f"{mean / 3600:.1f} h"
    if mean >= 120:
        return f"{mean / 60:.1f} min"
    return f"{mean:.0f} s"


def _epochs(group: RunGroup) -> str:
    values = sorted({r.summary.get("epochs") for r in group.runs}, key=str)
    return "/".join(str(v) for v in values)


def text_rows(groups: list[RunGroup], plus_minus: str = " ± ") -> list[list[str]]:
    rows = []
    for g in groups:
        row = [g.name, g.label or "—", str(len(g.runs))]
        row += [_pct(*g.stat(key), plus_minus=plus_minus) for key, _ in metrics_of(groups)]
        row += [_epochs(g), _wall(g.stat("wall_time_s")[0])]
        if has_parents(groups):
            row.append(g.parents)
        rows.append(row)
    return rows


def rich_table(groups: list[RunGroup], title: str = "comparison: last epoch (mean ± std over seeds)"):

    table = Table(title=title)
    for column in columns_of(groups):
        if column in ("run", "setting", "parent"):
            table.add_column(column, overflow="fold", min_width=8 if column != "setting" else 12)
        else:  # a narrow terminal puts the std under the mean
            table.add_column(column, justify="right")
    for row in text_rows(groups, plus_minus=" ±"):
        table.add_row(*row)
    return table


def markdown(groups: list[RunGroup]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    columns = columns_of(groups)
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if c in ("run", "setting") else "---:" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in text_rows(groups)]
    return "\n".join(lines) + "\n"


def csv_text(groups: list[RunGroup]) -> str:
    """One line per group; accuracies as fractions with mean and std columns (std empty for one run)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["run", "setting", "runs", "seeds", "folders"]
    for key, _ in metrics_of(groups):
        header += [f"{key}_mean", f"{key}_std"]
    header += ["epochs", "wall_time_s_mean"] + (["parent"] if has_parents(groups) else [])
    writer.writerow(header)
    for g in groups:
        row: list[Any] = [
            g.name,
            g.label,
            len(g.runs),
            " ".join(str(s) for s in g.seeds),
            " ".join(str(r.path) for r in g.runs),
        ]
        for key, _ in metrics_of(groups):
            mean, std = g.stat(key)
            row += ["" if mean is None else f"{mean:.6f}", "" if std is None else f"{std:.6f}"]
        row += [_epochs(g), "" if g.stat("wall_time_s")[0] is None else f"{g.stat('wall_time_s')[0]:.1f}"]
        if has_parents(groups):
            row.append("" if g.parents == "—" else g.parents)
        writer.writerow(row)
    return buf.getvalue()
