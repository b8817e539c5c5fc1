"""Paired-seed tables of finished run folders, such as the output of `lsm sweep`.

    python -m bench.paired_table .bench/sel-ce .bench/sel-fuser --base quickstart --name-by label_fuser.name

Runs are grouped into settings as `lsm compare` groups them (same resolved recipe up to
seed and name); each setting is named by its `lsm compare` label, and every other setting
is compared with the one whose label contains --base, seed by seed, with the tables of
bench/accuracy.py (mean ± std per setting, paired difference with a 95 % t-interval).
Validation top-1 comes first when the runs have a validation split: choose on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders or folders of run folders")
    parser.add_argument("--base", required=True, help="the base setting's name, or a part of it")
    parser.add_argument(
        "--name-by",
        default=None,
        metavar="TABLE.KEY",
        help="name each setting by this recipe key's value (the run name where it lacks the key) "
        "instead of its lsm compare label",
    )
    args = parser.parse_args(argv)

    from lsm_registry.runfolder.reader import group_runs, load_runs

    groups = group_runs(load_runs(args.run_dirs))

    def name(group) -> str:
        if args.name_by:
            table, _, key = args.name_by.partition(".")
            value = group.runs[0].recipe.get(table, {}).get(key)
            return f"{group.name} ({args.name_by} = {value})" if value is not None else group.name
        return group.label or group.name

    runs = {name(g): {int(r.summary["seed"]): r.summary for r in g.runs} for g in groups}
    base = [n for n in runs if n == args.base] or [n for n in runs if args.base in n]
    if len(base) != 1:
        print(f"error: --base {args.base!r} matches {len(base)} settings: {', '.join(runs)}", file=sys.stderr)
        return 2
    print(accuracy.tables(runs, base[0]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
