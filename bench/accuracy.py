"""Accuracy benchmark: a named set of recipes at one fixed budget and seeds -> docs/results.md.

    python bench/accuracy.py --epochs 4 --seeds 0

Each (recipe, seed) trains in its own run folder under --out. A finished run (its
summary.json exists) is not trained again and a run with a checkpoint is resumed, so
an interrupted benchmark continues where it stopped. Schedules are scaled to the
budget: the epoch-valued keys of a recipe (optim.milestones, optim.warmup_epochs,
loss.reweight_epoch, mixer.start_epoch and a non-negative mixer.end_epoch) are
multiplied by epochs / recipe epochs, so DRW and the mixing window still happen in
a short benchmark.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_RECIPES = "ce,ce_drw,ldam_drw,cmo,remix,lsm_ce,lsm_ce_drw,lsm_ldam_drw"


def scaled_overrides(recipe, epochs: int) -> list[str]:
    """--set lines that move the recipe's epoch-valued keys to an ``epochs`` budget."""
    base = recipe.run.epochs
    if base == epochs:
        return []
    scale = epochs / base

    def at(e: int) -> int:
        return max(0, min(epochs, round(e * scale)))

    out = [f"optim.milestones=[{', '.join(str(at(m)) for m in recipe.optim.milestones)}]",
           f"optim.warmup_epochs={min(max(at(recipe.optim.warmup_epochs), 1 if recipe.optim.warmup_epochs else 0), max(epochs - 1, 0))}"]
    if hasattr(recipe.loss.params, "reweight_epoch"):
        out.append(f"loss.reweight_epoch={at(recipe.loss.params.reweight_epoch)}")
    if recipe.mixer is not None:
        params = recipe.mixer.params
        if getattr(params, "start_epoch", None) is not None:
            out.append(f"mixer.start_epoch={at(params.start_epoch)}")
        end = getattr(params, "end_epoch", None)
        if end is not None and 0 <= end < 10**6:
            out.append(f"mixer.end_epoch={max(at(end), at(params.start_epoch) + 1)}")
    return out


def run_one(path: Path, seed: int, epochs: int, out: Path, extra: list[str], registry) -> Path:
    from lsm_registry.checkpoint import list_checkpoints
    from lsm_registry.engine import Trainer
    from lsm_registry.recipe import load_recipe
    from lsm_registry.reporting import RunReporter

    folder = out / f"{path.stem}-e{epochs}-s{seed}"
    if (folder / "summary.json").is_file():
        print(f"[done]    {folder}")
        return folder
    base = load_recipe(path, extra, registry)
    overrides = [*extra, f"run.epochs={epochs}", f"run.seed={seed}", f"run.name={path.stem}", *scaled_overrides(base, epochs)]
    recipe = load_recipe(path, overrides, registry)
    resume = bool(list_checkpoints(folder))
    print(f"[{'resume' if resume else 'train'}]   {folder}  ({' '.join(overrides)})", flush=True)
    trainer = Trainer(recipe, registry, run_dir=folder, resume=resume)
    trainer.fit(RunReporter(show_progress=sys.stderr.isatty()))
    return folder


def write_results(folders: list[Path], command: str, path: Path, epochs: int, seeds: list[int], wall_s: float) -> None:
    from lsm_registry.runs import group_runs, load_runs, markdown

    groups = group_runs(load_runs(folders))
    today = dt.date.today().isoformat()
    text = f"""# Results

Measured on this project's development machine ({platform.machine()}, {_cpus()} CPU cores, no GPU)
on {today}, with

```sh
{command}
```

Budget: {epochs} epochs per run, seeds {', '.join(map(str, seeds))}, the recipes' own settings
otherwise (their epoch-valued keys scaled to the budget, see bench/accuracy.py). Accuracy of the
last epoch on the balanced test set, mean ± std over seeds (no std with one seed). Many / Medium /
Few: classes with > 100, 20-100, < 20 training images; "rarest 3": the three classes with the fewest
training images. Benchmark wall time: {wall_s / 60:.1f} min (runs already finished were not retrained).

{markdown(groups)}
"""
    begin, end = "<!-- bench/accuracy.py: begin -->", "<!-- bench/accuracy.py: end -->"
    block = f"{begin}\n{text.split(chr(10), 2)[2].strip()}\n{end}"
    old = path.read_text() if path.is_file() else ""
    if begin in old and end in old:
        # Keep what people wrote around the generated block (analysis, other budgets).
        text = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        text = "# Results\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote {path}")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated recipe stems (default: {DEFAULT_RECIPES})")
    parser.add_argument("--recipe-dir", type=Path, default=ROOT / "recipes" / "fashion_mnist_lt")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10, the folder's budget)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override, table.key=value")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "accuracy", help="folder of the run folders")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args(argv)

    from lsm_registry.plugins import default_registry

    registry = default_registry()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    paths = [args.recipe_dir / f"{name.strip()}.toml" for name in args.recipes.split(",") if name.strip()]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"error: no such recipe: {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    folders, failed = [], []
    for path in paths:
        for seed in seeds:
            try:
                folders.append(run_one(path, seed, args.epochs, args.out, args.overrides, registry))
            except Exception as exc:  # report and go on with the rest of the benchmark
                failed.append(f"{path.stem} seed {seed}: {type(exc).__name__}: {exc}")
                print(f"[failed]  {failed[-1]}", file=sys.stderr)
    command = "python bench/accuracy.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if folders:
        write_results(folders, command.strip(), args.results, args.epochs, seeds, time.perf_counter() - started)
    if failed:
        print(f"{len(failed)} run(s) failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
