"""The benchmarks' run store: where a (recipe, seed) trains, when a stored run may be reused, what is kept.

Every accuracy benchmark (``python -m bench.accuracy``, ``bench.one_factor``,
``bench.decoupling``, ``bench.paired_table``, ``bench.curves``) reads and writes runs
through this module, so a run folder's name, the keys that do not change a setting and
what the committed store keeps (summary.json, recipe.toml with the data root replaced by a
placeholder, curve.jsonl) are defined once.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from lsm_registry.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]

#: The keys of each evaluated epoch kept in a stored run's curve.jsonl (learning curves).
CURVE_KEYS = ("epoch", "train_loss", "top1", "many", "medium", "few", "val_top1", "train_top1", "train_few")

#: Recipe keys that do not change what a run measures: a stored run may differ in them.
SETTING_IGNORED = ("run.device", "run.channels_last", "data.root")

#: Keys added to the library that change what a run measures, with the behaviour a stored
#: recipe without the key had: such a run counts as trained with that value.
BEFORE_THE_KEY = {
    "saliency.mask_padding": False,
    # [stage] bn: a stored cRT / LWS run without it kept batch norm frozen ("auto"), not "train".
    "stage.bn": "auto",
    "stage.init_checkpoint": "last",
    "optim.lr_factors": [],
    "optim.lr_groups": [],
    # cc-sam / cc-sam-feature before their reference options.
    "optim.mixed_labels": "soft",
    "optim.param_norm": "per-tensor",
    "optim.ramp_epochs": 0,
}


def scaled_overrides(recipe, epochs: int) -> list[str]:
    """--set lines that move the recipe's epoch-valued keys to an ``epochs`` budget."""
    base = recipe.run.epochs
    if base == epochs:
        return []
    scale = epochs / base

    def at(e: int) -> int:
        return max(0, min(epochs, round(e * scale)))

    out = [
        f"optim.milestones=[{', '.join(str(at(m)) for m in recipe.optim.milestones)}]",
        f"optim.warmup_epochs={min(max(at(recipe.optim.warmup_epochs), 1 if recipe.optim.warmup_epochs else 0), max(epochs - 1, 0))}",
    ]
    if hasattr(recipe.loss.params, "reweight_epoch"):
        out.append(f"loss.reweight_epoch={at(recipe.loss.params.reweight_epoch)}")
    if hasattr(recipe.loss.params, "start_epoch"):  # a loss's phase (IB), with the lr factor tied to it
        out.append(f"loss.start_epoch={at(recipe.loss.params.start_epoch)}")
    if recipe.optim.lr_factors:
        scaled = {at(e): f for e, f in recipe.optim.lr_factors}  # two that land on one epoch: the later wins
        out.append("optim.lr_factors=[" + ", ".join(f"[{e}, {f!r}]" for e, f in scaled.items()) + "]")
    if recipe.mixer is not None:
        params = recipe.mixer.params  # MixerParams: start_epoch and end_epoch always exist
        out.append(f"mixer.start_epoch={at(params.start_epoch)}")
        end = params.end_epoch
        if end is not None and 0 <= end < 10**6:
            out.append(f"mixer.end_epoch={max(at(end), at(params.start_epoch) + 1)}")
    return out


def folder_name(stem: str, epochs: int, seed: int, tag: str = "") -> str:
    """<recipe>[-<tag>]-e<epochs>-s<seed>: without a tag the names of earlier benchmarks."""
    return f"{stem}{'-' + tag if tag else ''}-e{epochs}-s{seed}"


def train_run(recipe, registry, folder: Path, resume: bool) -> None:
    """Train one run into ``folder`` (the only place the benchmark trains; tests replace it)."""
    from lsm_registry.engine import Trainer
    from lsm_registry.runfolder.reporter import RunReporter

    trainer = Trainer(recipe, registry, run_dir=folder, resume=resume)
    trainer.fit(RunReporter(show_progress=sys.stderr.isatty()))


def setting_differences(folder: Path, recipe) -> list[str]:
    """Keys whose value in ``folder``/recipe.toml differs from ``recipe`` (seed, name and SETTING_IGNORED aside).

    A key only one side has (added to the library since) does not count, unless BEFORE_THE_KEY says
    what a stored run without it did; no recipe.toml, no check.
    """
    from lsm_registry.runfolder.reader import flatten

    path = folder / "recipe.toml"
    if not path.is_file():
        return []
    stored = flatten(tomllib.loads(path.read_text(encoding="utf-8")))
    wanted = flatten(tomllib.loads(recipe.to_toml()))
    stored = {**{k: v for k, v in BEFORE_THE_KEY.items() if k in wanted}, **stored}
    return [
        f"{k}: stored {stored[k]!r}, now {wanted[k]!r}"
        for k in sorted(set(stored) & set(wanted))
        if k not in SETTING_IGNORED and stored[k] != wanted[k]
    ]


#: The fence of a block's command: shown, not run by tests/test_docs_blocks.py, which would
#: train and rewrite this page; the reason line is what a reader of the page sees.
COMMAND_FENCE = "```sh no-run\n# not run by the docs test: {why}"
TRAINS = "it trains the runs results/runs lacks and rewrites its block of this page"
READS = "it rewrites its block of this page (from the stored runs)"

#: What a stored recipe says instead of the data set's folder: where the images lie on the
#: machine that trained is not part of the setting, and must not land in the repository.
ROOT_PLACEHOLDER = "<data root>"


def without_data_root(recipe_text: str) -> str:
    """``recipe_text`` with ``root`` of its [data] table replaced by :data:`ROOT_PLACEHOLDER`."""
    out, table = [], ""
    for line in recipe_text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            table = stripped.strip("[]").strip()
        elif table == "data" and re.match(r"root\s*=", stripped):
            line = f'root = "{ROOT_PLACEHOLDER}"\n'
        out.append(line)
    return "".join(out)


def write_curve(metrics: Path, target: Path) -> None:
    """The evaluated epochs of a run's metrics.jsonl, :data:`CURVE_KEYS` only: a few hundred
    bytes that keep the learning curves (Medium and Few over the epochs) in the store."""
    lines = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("top1") is not None:
            lines.append(json.dumps({k: record.get(k) for k in CURVE_KEYS}))
    atomic_write(target, "\n".join(lines) + "\n")


def store_run(folder: Path, store: Path) -> Path:
    """Copy the run's recipe.toml (data.root replaced), its curve.jsonl and summary.json (last: it marks
    the run finished) into store/<name>."""
    target = store / folder.name
    target.mkdir(parents=True, exist_ok=True)
    if (folder / "recipe.toml").is_file():
        text = without_data_root((folder / "recipe.toml").read_text(encoding="utf-8"))
        (target / "recipe.toml").write_text(text, encoding="utf-8")
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    recipe = summary.get("recipe")
    if isinstance(recipe, str) and Path(recipe).is_absolute():
        try:  # no paths of this machine in committed files
            summary["recipe"] = Path(recipe).resolve().relative_to(ROOT).as_posix()
        except ValueError:
            pass
    if (folder / "metrics.jsonl").is_file():
        write_curve(folder / "metrics.jsonl", target / "curve.jsonl")
    atomic_write(target / "summary.json", json.dumps(summary, indent=2) + "\n")
    return target


def run_one(
    path: Path, seed: int, epochs: int, out: Path, extra: list[str], registry, store: Path, tag: str = ""
) -> tuple[Path, bool]:
    """The store folder of (recipe, seed), trained first unless it is there; and whether it was trained now."""
    from lsm_registry.checkpoint import list_checkpoints
    from lsm_registry.recipe import load_recipe

    name = folder_name(path.stem, epochs, seed, tag)
    base = load_recipe(path, extra, registry)
    overrides = [
        *extra,
        f"run.epochs={epochs}",
        f"run.seed={seed}",
        f"run.name={path.stem}",
        *scaled_overrides(base, epochs),
    ]
    recipe = load_recipe(path, overrides, registry)
    stored, folder = store / name, out / name
    reused = next((w for w in (stored, folder) if (w / "summary.json").is_file()), None)
    if reused is not None:
        differ = setting_differences(reused, recipe)
        if differ:
            raise RuntimeError(
                f"{reused} was trained with another setting ({'; '.join(differ)}); give this protocol its own --tag"
            )
    if (stored / "summary.json").is_file():
        print(f"[stored]  {stored}")
        return stored, False
    if (folder / "summary.json").is_file():  # finished before the store existed: store it now
        print(f"[done]    {folder}")
        return store_run(folder, store), False
    resume = bool(list_checkpoints(folder))
    print(f"[{'resume' if resume else 'train'}]   {folder}  ({' '.join(overrides)})", flush=True)
    train_run(recipe, registry, folder, resume)
    return store_run(folder, store), True


def collect(folders: dict[str, dict[int, Path]]) -> dict[str, dict[int, dict[str, Any]]]:
    """{method: {seed: summary}} read from the store folders."""
    from lsm_registry.runfolder.reader import load_run

    return {method: {seed: load_run(f).summary for seed, f in seeds.items()} for method, seeds in folders.items()}
