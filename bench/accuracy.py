"""Accuracy benchmark: recipes x seeds at one budget, paired differences to a base -> docs/results.md.

    python -m bench.accuracy --epochs 4 --seeds 0,1,2 --base ce --tag e4
    python -m bench.accuracy --epochs 4 --seeds 0,1,2 --tag e4-val --set data.val_per_class=20

Protocol: every recipe trains on the same --seeds, so each other recipe is compared to
the base (--base, default the first of --recipes) seed by seed: the paired difference
over the seeds both have, with a 95 % Student-t interval. A method whose top-1
interval contains 0 is "within spread": not told apart from the base at this many seeds.

Each (recipe, seed) trains in its own run folder under --out, named
<recipe>[-<tag>]-e<epochs>-s<seed>. A finished run's summary.json and recipe.toml are
copied into the committed store (--store, default results/runs/<folder name>/); a run
found in the store is not trained again, so seeds add up over time (--seeds 0,1 today,
--seeds 0,1,2 tomorrow trains seed 2 only). A reused run must have been trained with the
same setting (its recipe.toml is compared); otherwise it is reported as failed: give the
new protocol its own --tag. An unfinished run with a checkpoint under --out is resumed.

Schedules are scaled to the budget: the epoch-valued keys of a recipe
(optim.milestones, optim.warmup_epochs, loss.reweight_epoch, mixer.start_epoch and a
non-negative mixer.end_epoch) are multiplied by epochs / recipe epochs, so DRW and the
mixing window still happen in a short benchmark.

The tables go between <!-- bench/accuracy.py TAG: begin --> and <!-- ... TAG: end -->
in --results (without --tag: <!-- bench/accuracy.py: begin -->); text around the block
is kept, and a file without the markers gets the block appended.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

from bench import store as run_store
from bench.store import ROOT, collect, run_one

DEFAULT_RECIPES = "ce,ce_drw,ldam_drw,cmo,remix,lsm_ce,lsm_ce_drw,lsm_ldam_drw"

#: (summary key, column title) of the reported accuracies; val_top1 is added when the
#: summaries have it (runs with a validation split, data.val_per_class > 0).
METRICS = (("top1", "top-1"), ("many", "Many"), ("medium", "Medium"), ("few", "Few"), ("rare3", "rarest 3"))
VAL_METRIC = ("val_top1", "val top-1")
#: The training split scored in eval mode (run.score_train): did the method fit what it trained on?
TRAIN_METRICS = (("train_top1", "train top-1"), ("train_few", "train Few"))

#: Two-sided 95 % quantiles t_{0.975, df} of Student's t distribution for df = 1..30, as
#: printed in any table of Student's t (e.g. NIST/SEMATECH e-Handbook of Statistical
#: Methods, 1.3.6.7.2 "Critical values of the Student's t distribution", column 0.975),
#: rounded to 3 decimals. Above 30 degrees of freedom the df-30 value is used, which
#: makes the interval slightly wider (conservative); t_{0.975} is 1.96 in the limit.
T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


TAG_PATTERN = re.compile(r"[A-Za-z0-9._]+(-[A-Za-z0-9._]+)*")
MISSING = "—"


# ------------------------------------------------------------------------------ statistics


def t975(df: int) -> float:
    """t_{0.975, df}: the two-sided 95 % quantile of Student's t (table T975)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1 (got {df})")
    return T975[min(df, len(T975)) - 1]


class Interval(NamedTuple):
    """Mean, sample std and 95 % t-interval of n values; sd, lo and hi are None for n = 1."""

    n: int
    mean: float
    sd: Optional[float]
    lo: Optional[float]
    hi: Optional[float]

    def contains_zero(self) -> Optional[bool]:
        return None if self.lo is None or self.hi is None else self.lo <= 0.0 <= self.hi


def t_interval(values: list[float]) -> Optional[Interval]:
    """mean ± t_{0.975, n-1} * sd / sqrt(n) of the values (None when there are none)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return None
    mean = sum(xs) / n
    if n == 1:
        return Interval(1, mean, None, None, None)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half)


def paired_diffs(base: dict[int, dict[str, Any]], other: dict[int, dict[str, Any]], key: str) -> list[float]:
    """other - base of ``key`` for each seed both runs have a value for, in seed order."""
    out = []
    for seed in sorted(set(base) & set(other)):
        a, b = base[seed].get(key), other[seed].get(key)
        if a is not None and b is not None:
            out.append(float(b) - float(a))
    return out


def paired_difference(
    base: dict[int, dict[str, Any]], other: dict[int, dict[str, Any]], key: str
) -> Optional[Interval]:
    """The paired difference other - base of ``key`` over the shared seeds, with its 95 % t-interval."""
    return t_interval(paired_diffs(base, other, key))


# ------------------------------------------------------------------------------ tables


def metric_columns(runs: dict[str, dict[int, dict[str, Any]]]) -> list[tuple[str, str]]:
    """The reported columns; rarest 3 is always there, val top-1 when a summary has it."""
    cols = list(METRICS)
    if any(VAL_METRIC[0] in s for seeds in runs.values() for s in seeds.values()):
        cols.append(VAL_METRIC)
    if any(s.get(TRAIN_METRICS[0][0]) is not None for seeds in runs.values() for s in seeds.values()):
        cols.extend(TRAIN_METRICS)
    return cols


def _num(x: float) -> str:
    """A percentage with one decimal; a value that rounds to zero prints without a sign."""
    text = f"{100 * x:.1f}"
    return "0.0" if text == "-0.0" else text.replace("-", "−")


def _signed(x: float) -> str:
    text = _num(x)
    return text if text.startswith("−") else "+" + text


def fmt_mean_std(values: list[Any]) -> str:
    """ "52.0 ± 2.0" of the values that are not None; the mean alone for one value; — for none."""
    iv = t_interval([v for v in values if v is not None])
    if iv is None:
        return MISSING
    return _num(iv.mean) + ("" if iv.sd is None else f" ± {100 * iv.sd:.1f}")


def fmt_interval(iv: Optional[Interval]) -> str:
    """ "+1.2 [−0.3, +2.7]"; "+1.2 [n/a]" for one pair; — for none."""
    if iv is None:
        return MISSING
    if iv.lo is None or iv.hi is None:
        return f"{_signed(iv.mean)} [n/a]"
    return f"{_signed(iv.mean)} [{_signed(iv.lo)}, {_signed(iv.hi)}]"


def _wall(values: list[Any]) -> str:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return MISSING
    mean = sum(xs) / len(xs)
    if mean >= 3600:
        return f"{mean / 3600:.1f} h"
    if mean >= 120:
        return f"{mean / 60:.1f} min"
    return f"{mean:.0f} s"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def method_table(runs: dict[str, dict[int, dict[str, Any]]], base: str) -> str:
    """Markdown: one row per method (base first), each column "mean ± std" over its seeds."""
    cols = metric_columns(runs)
    header = ["method", "seeds", *(title for _, title in cols), "wall time / run"]
    lines = [_row(header), "|---|---|" + "---:|" * (len(header) - 2)]
    for method in [base, *(m for m in runs if m != base)]:
        seeds = runs.get(method, {})
        cells = [method + (" (base)" if method == base else ""), ",".join(str(s) for s in sorted(seeds)) or MISSING]
        cells += [fmt_mean_std([seeds[s].get(key) for s in sorted(seeds)]) for key, _ in cols]
        cells.append(_wall([seeds[s].get("wall_time_s") for s in sorted(seeds)]))
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def difference_table(runs: dict[str, dict[int, dict[str, Any]]], base: str) -> str:
    """Markdown: one row per non-base method, each column the paired difference to the base."""
    cols = metric_columns(runs)
    header = ["method", "paired seeds", *(title for _, title in cols), "within spread?"]
    lines = [_row(header), "|---|---:|" + "---:|" * len(cols) + "---|"]
    base_runs = runs.get(base, {})
    for method, seeds in runs.items():
        if method == base:
            continue
        shared = sorted(set(base_runs) & set(seeds))
        cells = [method, str(len(shared))]
        cells += [fmt_interval(paired_difference(base_runs, seeds, key)) for key, _ in cols]
        top1 = paired_difference(base_runs, seeds, "top1")
        inside = None if top1 is None else top1.contains_zero()
        cells.append(MISSING if top1 is None else "n/a" if inside is None else "yes" if inside else "no")
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def tables(runs: dict[str, dict[int, dict[str, Any]]], base: str) -> str:
    """The per-method table and the paired-difference table, with what they show."""
    text = f"""Per method: mean ± sample std (n − 1) over the seeds, in percent (the mean alone for one seed).

{method_table(runs, base)}"""
    if len(runs) < 2:
        return text + "\n(one method: no paired differences)\n"
    return (
        text
        + f"""
Paired difference to {base}: method − {base} on each seed both have, in percentage points;
mean [95 % t-interval: mean ± t(0.975, n − 1) · sd / √n over the n paired seeds]; "n/a" with one
pair. "within spread?": yes when the top-1 interval contains 0, i.e. this many seeds do not tell
the method from {base} (read the other columns' intervals the same way).

{difference_table(runs, base)}"""
    )


# ------------------------------------------------------------------------------ docs


def markers(tag: str = "", tool: str = "bench/accuracy.py") -> tuple[str, str]:
    name = f"{tool} {tag}" if tag else tool
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # torch missing or broken: say nothing about a GPU
        gpu = "GPU unknown"
    return f"{platform.machine()}, {_cpus()} CPU cores, {gpu}"


def block_text(
    runs: dict[str, dict[int, dict[str, Any]]],
    base: str,
    command: str,
    epochs: int,
    seeds: list[int],
    store: str,
    trained: int,
    wall_s: float,
    today: Optional[str] = None,
    where: Optional[str] = None,
) -> str:
    """What goes between the markers."""
    reused = sum(len(s) for s in runs.values()) - trained
    return f"""Written on {today or dt.date.today().isoformat()} on {where or machine()}, with

{run_store.COMMAND_FENCE.format(why=run_store.TRAINS)}
{command}
```

Budget: {epochs} epoch{"" if epochs == 1 else "s"} per run; seeds {", ".join(map(str, seeds))}, the same for every recipe
(paired protocol); the recipes' own settings otherwise (their epoch-valued keys scaled to the
budget, see bench/accuracy.py).
Runs: `{store}/`, {trained} trained now, {reused} taken from the store (trained earlier, possibly elsewhere).
Accuracy of the last epoch on the balanced test set ("val top-1": on the validation split, when there is one). Many / Medium / Few: classes
with > 100, 20-100, < 20 training images ("{MISSING}": no class in the group); "rarest 3": the three
classes with the fewest training images. Benchmark wall time: {wall_s / 60:.1f} min.

{tables(runs, base)}"""


def write_block(path: Path, text: str, tag: str = "", tool: str = "bench/accuracy.py") -> None:
    """Put ``text`` between the markers of ``tool`` and ``tag`` in ``path``, keeping what is around them."""
    begin, end = markers(tag, tool)
    block = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if begin in old and end in old[old.index(begin) :]:
        # Keep what people wrote around the generated block (analysis, other protocols).
        start = old.index(begin)
        stop = old.index(end, start) + len(end)
        new = old[:start] + block + old[stop:]
    elif old.strip():  # another protocol's file: add this one at the end
        heading = f"## `{tool} --tag {tag}`" if tag else f"## `{tool}`"
        new = old.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    else:
        new = "# Results\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")
    print(f"wrote {path}")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _shown(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--recipes", default=DEFAULT_RECIPES, help=f"comma-separated recipe stems (default: {DEFAULT_RECIPES})"
    )
    parser.add_argument(
        "--base", default=None, help="the recipe the others are compared to (default: the first of --recipes)"
    )
    parser.add_argument("--recipe-dir", type=Path, default=ROOT / "recipes" / "fashion_mnist_lt")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10, the folder's budget)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, the same for every recipe (default 0)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="extra recipe override for every run, table.key=value",
    )
    parser.add_argument(
        "--tag", default="", help="protocol name: part of the run folder names and of the results.md markers"
    )
    parser.add_argument(
        "--base-tag",
        default=None,
        help="the base recipe's runs under this tag instead of --tag: a new protocol for the other "
        "recipes reuses the stored base runs (their setting is still checked)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / ".bench" / "accuracy", help="folder of the run folders (training)"
    )
    parser.add_argument(
        "--store",
        type=Path,
        default=ROOT / "results" / "runs",
        help="committed folder of finished runs' summary.json + recipe.toml (default results/runs)",
    )
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args(argv)

    for option, tag in (("--tag", args.tag), ("--base-tag", args.base_tag or "")):
        if tag and not TAG_PATTERN.fullmatch(tag):
            print(f"error: {option} {tag!r}: use letters, digits, '.', '_' and single '-'", file=sys.stderr)
            return 2
    seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    names = list(dict.fromkeys(n.strip() for n in args.recipes.split(",") if n.strip()))
    if not seeds or not names:
        print("error: give at least one recipe and one seed", file=sys.stderr)
        return 2
    base = args.base or names[0]
    if base not in names:
        print(f"error: --base {base} is not one of --recipes ({', '.join(names)})", file=sys.stderr)
        return 2
    paths = [args.recipe_dir / f"{name}.toml" for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"error: no such recipe: {', '.join(missing)}", file=sys.stderr)
        return 2

    from lsm_registry.plugins import default_registry

    registry = default_registry()
    started = time.perf_counter()
    folders: dict[str, dict[int, Path]] = {}
    failed, trained = [], 0
    # Seed-major, so that a benchmark stopped early leaves whole paired seeds behind.
    for seed in seeds:
        for path in paths:
            try:
                tag = args.base_tag if args.base_tag is not None and path.stem == base else args.tag
                folder, new = run_one(path, seed, args.epochs, args.out, args.overrides, registry, args.store, tag)
            except Exception as exc:  # report and go on with the rest of the benchmark
                failed.append(f"{path.stem} seed {seed}: {type(exc).__name__}: {exc}")
                print(f"[failed]  {failed[-1]}", file=sys.stderr)
                continue
            folders.setdefault(path.stem, {})[seed] = folder
            trained += new
    command = "python -m bench.accuracy " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    if folders:
        found = collect(folders)
        runs = {name: found.get(name, {}) for name in names}
        text = block_text(
            runs, base, command.strip(), args.epochs, seeds, _shown(args.store), trained, time.perf_counter() - started
        )
        write_block(args.results, text, args.tag)
    if failed:
        print(f"{len(failed)} run(s) failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
