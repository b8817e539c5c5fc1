"""One-factor-at-a-time sweep table, from runs already in the store (it trains nothing).

Each variant is a ``bench/accuracy.py`` protocol of one recipe with one ``--set`` and its
own ``--tag``; the base is the same recipe under the base tag. This script reads their
stored summaries (results/runs/<recipe>-<tag>-e<epochs>-s<seed>/), names every variant by
the recipe keys in which its stored recipe.toml differs from the base's, and writes the
paired tables of bench/accuracy.py, base first. The criterion for choosing is the
validation top-1 (``val top-1``); the test columns are only reported.

    python -m bench.accuracy --recipe-dir recipes/synthetic_lt --recipes lsm_ce_cached \\
        --epochs 40 --seeds 0,1 --tag syn-e40-p8 --set patch.size=8
    python -m bench.one_factor --recipe lsm_ce_cached --epochs 40 --seeds 0,1 \\
        --base-tag syn-e40 --variants syn-e40-p8,syn-e40-prob1 --tag syn-e40-sweep
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tomllib
from pathlib import Path
from typing import Any

from bench import accuracy as acc
from bench import store as run_store
from lsm_registry.runfolder.reader import flatten

IGNORED = {"run.name", "run.seed", *run_store.SETTING_IGNORED}


def differing(base: Path, other: Path) -> str:
    """'key = value, ...' where ``other``'s recipe.toml differs from ``base``'s."""
    a = flatten(tomllib.loads((base / "recipe.toml").read_text(encoding="utf-8")))
    b = flatten(tomllib.loads((other / "recipe.toml").read_text(encoding="utf-8")))
    # A key only one side has was added to the library between the runs (as bench/store.py reads it).
    keys = sorted(k for k in set(a) & set(b) if k not in IGNORED and a[k] != b[k])
    return ", ".join(f"{k} = {b.get(k)!r}" for k in keys) or "(same setting)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True, help="the recipe stem all variants share")
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--base-tag", required=True)
    ap.add_argument("--variants", required=True, help="comma-separated tags, one per variant")
    ap.add_argument("--tag", required=True, help="marker name of the block in --results")
    ap.add_argument("--store", default=str(run_store.ROOT / "results" / "runs"))
    ap.add_argument("--results", default=str(run_store.ROOT / "docs" / "results.md"))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    store = Path(args.store)

    def folders(tag: str) -> dict[int, Path]:
        found = {s: store / run_store.folder_name(args.recipe, args.epochs, s, tag) for s in seeds}
        return {s: f for s, f in found.items() if (f / "summary.json").is_file()}

    base_folders = folders(args.base_tag)
    if not base_folders:
        sys.exit(f"error: no stored run of the base ({args.recipe}, tag {args.base_tag}) in {store}")
    reference = next(iter(base_folders.values()))
    base = args.base_tag
    by_label: dict[str, dict[int, Path]] = {base: base_folders}
    missing = []
    for tag in [t for t in args.variants.split(",") if t]:
        found = folders(tag)
        if not found:
            missing.append(tag)
            continue
        by_label[f"{differing(reference, next(iter(found.values())))} ({tag})"] = found
    runs: dict[str, dict[int, dict[str, Any]]] = run_store.collect(by_label)

    def val(label: str) -> float:
        values = [r["val_top1"] for r in runs[label].values() if r.get("val_top1") is not None]
        return statistics.fmean(values) if values else float("-inf")

    best = max(runs, key=val)
    command = "python -m bench.one_factor " + " ".join(sys.argv[1:] if argv is None else argv)
    text = f"""Written on {acc.dt.date.today().isoformat()} on {acc.machine()} from the stored runs, with

{run_store.COMMAND_FENCE.format(why=run_store.READS)}
{command}
```

One recipe (`{args.recipe}`), {args.epochs} epochs, seeds {", ".join(map(str, seeds))}; each variant changes the
keys named in its row (read from its stored recipe.toml against the base's) and was trained by
`bench/accuracy.py --tag <its tag> --set ...`. Choose on "val top-1" (the validation split);
the test columns are reported only. Highest mean val top-1: **{best}**.
{"Not in the store (not trained): " + ", ".join(missing) + "." if missing else ""}

{acc.tables(runs, base)}"""
    acc.write_block(Path(args.results), text, args.tag, tool="bench/one_factor.py")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
