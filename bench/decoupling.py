"""Decoupling on Fashion-MNIST-LT: CE, then its cRT, LWS and tau-norm stages, on paired seeds -> docs/results.md.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.decoupling --seeds 0,1,2

Run it from anywhere; it works in the repository root. Stage 1 is bench/accuracy.py's
`fmnist-e10` CE run (recipes/fashion_mnist_lt/ce.toml, 10 epochs, a validation split of 20
images per class: `bench/accuracy.py --recipes ce --epochs 10 --tag fmnist-e10 --set
data.val_per_class=20`), whose run folder keeps its checkpoint in
.bench/accuracy/ce-fmnist-e10-e10-s<seed>. A seed whose folder has no finished run is trained
there first, with that setting (the store, results/runs/, keeps no checkpoints). From each
seed's CE run, without touching it:

- cRT (recipes/fashion_mnist_lt/crt.toml) and LWS (recipes/fashion_mnist_lt/lws.toml), with
  stage.init_from = the CE folder, run.seed = the seed and the CE run's validation split
  (data.val_per_class, data.split_seed: stage 2 trains on the images stage 1 trained on), in
  .bench/accuracy/<crt|lws>-fmnist-e10-e<epochs>-s<seed>;
- tau-norm: `lsm tau-norm` of the CE run for every tau of --taus, on the validation split and
  on the test split. Reported twice: at tau = 1, and at the tau with the best validation
  top-1 of that seed (ties: the smaller tau), stored as results/runs/tau_norm-fmnist-e10-e10-s<seed>
  (the chosen tau's test summary.json, both tau-norm CSVs, the CE run's recipe.toml).

Each finished run's summary.json and recipe.toml are copied into results/runs/<folder>/ with
bench/accuracy.py's store_run; a run found there is not trained again (a stored run of another
setting is an error). The tables are bench/accuracy.py's (mean ± std per method over the seeds,
the paired difference to CE with a 95 % t-interval), written between
<!-- bench/decoupling.py: begin --> and <!-- bench/decoupling.py: end --> in --results.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Optional

#: The stage-1 protocol: bench/accuracy.py's fmnist-e10 CE run.
TAG = "fmnist-e10"
PARENT_EPOCHS = 10
PARENT_OVERRIDES = ("data.val_per_class=20",)
#: The stage-2 recipes, trained from each seed's CE run.
STAGES = ("crt", "lws")
DEFAULT_TAUS = "0.25,0.5,0.75,1.0"
BEGIN, END = "<!-- bench/decoupling.py: begin -->", "<!-- bench/decoupling.py: end -->"


from bench import accuracy  # noqa: E402
from bench import store as run_store  # noqa: E402
from bench.store import ROOT  # noqa: E402


def shown(path: Path) -> str:
    """``path`` relative to the repository root (runs start there), else as given."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def parent_recipe(seed: int, recipe_dir: Path, registry):
    from lsm_registry.recipe import load_recipe

    overrides = [*PARENT_OVERRIDES, f"run.epochs={PARENT_EPOCHS}", f"run.seed={seed}", "run.name=ce"]
    return load_recipe(recipe_dir / "ce.toml", overrides, registry)


def ensure_parent(seed: int, recipe_dir: Path, out: Path, store: Path, registry) -> tuple[Path, bool]:
    """The CE run folder of ``seed`` (with its checkpoint), trained first when it has not finished."""
    from lsm_registry.checkpoint import list_checkpoints

    recipe = parent_recipe(seed, recipe_dir, registry)
    folder = out / run_store.folder_name("ce", PARENT_EPOCHS, seed, TAG)
    trained = False
    if not (folder / "summary.json").is_file():
        resume = bool(list_checkpoints(folder))
        print(f"[{'resume' if resume else 'train'}]   {shown(folder)}  (stage 1)", flush=True)
        run_store.train_run(recipe, registry, folder, resume)
        trained = True
    differ = run_store.setting_differences(folder, recipe)
    if differ:
        raise RuntimeError(f"{folder} was trained with another setting ({'; '.join(differ)})")
    if not list_checkpoints(folder):
        raise RuntimeError(f"{folder}: no checkpoint left to start the stages from")
    if not (store / folder.name / "summary.json").is_file():
        run_store.store_run(folder, store)
    return folder, trained


def stage_overrides(parent: Path, seed: int, stem: str) -> list[str]:
    data = tomllib.loads((parent / "recipe.toml").read_text(encoding="utf-8")).get("data", {})
    split = [
        f"data.{key}={int(data[key])}" for key in ("val_per_class", "split_seed") if isinstance(data.get(key), int)
    ]
    return [f"stage.init_from={shown(parent)}", f"run.seed={seed}", f"run.name={stem}", *split]


def run_stage(
    stem: str, seed: int, parent: Path, recipe_dir: Path, out: Path, store: Path, registry
) -> tuple[Path, bool]:
    """The store folder of the (stage recipe, seed) run from ``parent``, trained first unless it is stored."""
    from lsm_registry.checkpoint import list_checkpoints
    from lsm_registry.recipe import load_recipe

    path = recipe_dir / f"{stem}.toml"
    overrides = stage_overrides(parent, seed, stem)
    recipe = load_recipe(path, overrides, registry)
    name = run_store.folder_name(stem, recipe.run.epochs, seed, TAG)
    stored, folder = store / name, out / name
    reused = next((w for w in (stored, folder) if (w / "summary.json").is_file()), None)
    if reused is not None:
        differ = run_store.setting_differences(reused, recipe)
        if differ:
            raise RuntimeError(f"{reused} was trained with another setting ({'; '.join(differ)})")
    if (stored / "summary.json").is_file():
        print(f"[stored]  {shown(stored)}")
        return stored, False
    if (folder / "summary.json").is_file():
        return run_store.store_run(folder, store), False
    resume = bool(list_checkpoints(folder))
    print(f"[{'resume' if resume else 'train'}]   {shown(folder)}  ({' '.join(overrides)})", flush=True)
    run_store.train_run(recipe, registry, folder, resume)
    return run_store.store_run(folder, store), True


def read_tau_csv(path: Path) -> dict[float, dict[str, Optional[float]]]:
    """{tau: {top1, many, medium, few, rare3}} of a tau-norm CSV (an empty cell: no class in the group)."""
    with path.open(encoding="utf-8", newline="") as f:
        return {
            float(row["tau"]): {k: (float(v) if v not in ("", None) else None) for k, v in row.items() if k != "tau"}
            for row in csv.DictReader(f)
        }


def choose_tau(val: dict[float, dict[str, Optional[float]]]) -> float:
    """The tau with the best validation top-1; ties go to the smaller tau."""
    return min(val, key=lambda tau: (-(val[tau]["top1"] or 0.0), tau))


def lsm_tau_norm(parent: Path, taus: str, split: str, out: Path) -> None:
    """`lsm tau-norm PARENT --tau TAUS --split SPLIT --out OUT` (the only place this script scores; tests replace it)."""
    command = [
        sys.executable,
        "-m",
        "lsm_registry",
        "tau-norm",
        shown(parent),
        "--tau",
        taus,
        "--split",
        split,
        "--out",
        shown(out),
    ]
    print("[score]   " + " ".join(shlex.quote(c) for c in ["lsm", *command[3:]]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def run_tau_norm(seed: int, parent: Path, taus: str, out: Path, store: Path) -> tuple[Path, bool]:
    """The store folder of the tau-norm scores of ``parent``, scored first unless stored."""
    name = run_store.folder_name("tau_norm", PARENT_EPOCHS, seed, TAG)
    stored = store / name
    if (stored / "summary.json").is_file():
        grid = sorted(read_tau_csv(stored / "tau-norm,val.csv"))
        wanted = sorted(float(t) for t in taus.split(","))
        if grid != wanted:
            raise RuntimeError(f"{stored} was scored for tau {grid}, not {wanted}")
        print(f"[stored]  {shown(stored)}")
        return stored, False
    work = out / name
    if work.exists():
        shutil.rmtree(work)  # scores only, remade in a minute
    started = time.perf_counter()
    for split in ("val", "test"):
        lsm_tau_norm(parent, taus, split, work)
    val = read_tau_csv(work / "tau-norm,val.csv")
    tau = choose_tau(val)
    summary = json.loads((work / f"test,tau={tau:g}" / "summary.json").read_text(encoding="utf-8"))
    summary.update(
        {
            "tau": tau,
            "tau_chosen_on": "val",
            "taus": sorted(val),
            "val_top1": val[tau]["top1"],
            "wall_time_s": time.perf_counter() - started,
            "seed": seed,
        }
    )
    stored.mkdir(parents=True, exist_ok=True)
    for table in ("tau-norm,val.csv", "tau-norm,test.csv"):
        shutil.copyfile(work / table, stored / table)
    shutil.copyfile(parent / "recipe.toml", stored / "recipe.toml")
    tmp = stored / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, stored / "summary.json")  # last: it marks the scores finished
    return stored, True


def tau_rows(stored: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tau = 1, the validation-chosen tau) as summaries the tables read."""
    summary = json.loads((stored / "summary.json").read_text(encoding="utf-8"))
    val, test = read_tau_csv(stored / "tau-norm,val.csv"), read_tau_csv(stored / "tau-norm,test.csv")
    fixed = {**test[1.0], "val_top1": val[1.0]["top1"], "wall_time_s": summary.get("wall_time_s"), "tau": 1.0}
    return fixed, summary


def write_results(path: Path, text: str) -> None:
    """Put ``text`` between this script's markers in ``path`` (appended with a heading when they are missing)."""
    block = f"{BEGIN}\n{text.strip()}\n{END}"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if BEGIN in old and END in old[old.index(BEGIN) :]:
        start = old.index(BEGIN)
        new = old[:start] + block + old[old.index(END, start) + len(END) :]
    else:
        new = (
            old.rstrip("\n")
            + ("\n\n" if old.strip() else "# Results\n\n")
            + "## `bench/decoupling.py`\n\n"
            + block
            + "\n"
        )
    path.write_text(new, encoding="utf-8")
    print(f"wrote {path}")


def block_text(
    runs: dict[str, dict[int, dict[str, Any]]],
    chosen: dict[int, float],
    command: str,
    seeds: list[int],
    store: str,
    trained: int,
    wall_s: float,
    today: Optional[str] = None,
    where: Optional[str] = None,
) -> str:
    taus = ", ".join(f"seed {s}: {t:g}" for s, t in sorted(chosen.items()))
    return f"""Written on {today or dt.date.today().isoformat()} on {where or accuracy.machine()}, with

{run_store.COMMAND_FENCE.format(why=run_store.TRAINS)}
{command}
```

Stage 1: `ce`, bench/accuracy.py's `fmnist-e10` CE run (10 epochs, validation split of 20 per
class). From each seed's CE run: `crt` (recipes/fashion_mnist_lt/crt.toml: classifier re-initialised
and re-trained for 10 epochs with class-balanced sampling, backbone frozen), `lws`
(recipes/fashion_mnist_lt/lws.toml: one scale per class learned for 5 epochs, the rest frozen) and
tau-norm of the CE classifier without training, at tau = 1 and at the tau of the best validation
top-1 ({taus}). Seeds {", ".join(map(str, seeds))}: every stage of seed s starts from the CE run of seed s
(paired protocol). Runs: `{store}/`, {trained} trained or scored now, the others taken from the store.
Accuracy of the last epoch on the balanced test set ("val top-1": the validation split). Many /
Medium / Few: classes with > 100, 20-100, < 20 training images ("—": no class in the group);
"rarest 3": the three classes with the fewest training images. Wall time of this command:
{wall_s / 60:.1f} min.

{accuracy.tables(runs, "ce")}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument(
        "--taus", default=DEFAULT_TAUS, help=f"tau-norm powers to score (default {DEFAULT_TAUS}; must hold 1)"
    )
    parser.add_argument("--recipe-dir", type=Path, default=ROOT / "recipes" / "fashion_mnist_lt")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "accuracy", help="folder of the run folders")
    parser.add_argument(
        "--store", type=Path, default=ROOT / "results" / "runs", help="committed folder of finished runs"
    )
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args(argv)
    seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    if not seeds or 1.0 not in [float(t) for t in args.taus.split(",")]:
        print("error: give at least one seed, and --taus with 1", file=sys.stderr)
        return 2
    out, store, results, recipe_dir = (p.resolve() for p in (args.out, args.store, args.results, args.recipe_dir))
    os.chdir(ROOT)  # the stages name their parent by a path relative to the repository

    from lsm_registry.plugins import default_registry
    from lsm_registry.runfolder.reader import load_run

    registry = default_registry()
    started = time.perf_counter()
    runs: dict[str, dict[int, dict[str, Any]]] = {
        "ce": {},
        **{s: {} for s in STAGES},
        "tau-norm τ=1": {},
        "tau-norm τ val": {},
    }
    chosen: dict[int, float] = {}
    failed, trained = [], 0
    for seed in seeds:  # seed-major: a stopped benchmark leaves whole paired seeds
        try:
            parent, new = ensure_parent(seed, recipe_dir, out, store, registry)
            trained += new
            runs["ce"][seed] = load_run(parent).summary
            for stem in STAGES:
                folder, new = run_stage(stem, seed, parent, recipe_dir, out, store, registry)
                runs[stem][seed] = load_run(folder).summary
                trained += new
            folder, new = run_tau_norm(seed, parent, args.taus, out, store)
            trained += new
            runs["tau-norm τ=1"][seed], runs["tau-norm τ val"][seed] = tau_rows(folder)
            chosen[seed] = runs["tau-norm τ val"][seed]["tau"]
        except Exception as exc:  # report and go on with the other seeds
            failed.append(f"seed {seed}: {type(exc).__name__}: {exc}")
            print(f"[failed]  {failed[-1]}", file=sys.stderr)
    command = "OMP_NUM_THREADS=1 .venv/bin/python -m bench.decoupling " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    if runs["ce"]:
        write_results(
            results,
            block_text(runs, chosen, command.strip(), seeds, shown(store), trained, time.perf_counter() - started),
        )
    if failed:
        print(f"{len(failed)} seed(s) failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
