"""Learning curves of stored benchmark runs as a markdown table: one metric, methods x epochs.

    python -m bench.curves --recipes ce,lsm_ce --tag nat --epochs 60 --seeds 0,1,2 --metric medium

Reads the ``curve.jsonl`` that bench/accuracy.py keeps beside each stored run
(results/runs/<recipe>-<tag>-e<epochs>-s<seed>/) and prints, per method, the metric's mean
over the seeds at every evaluated epoch, with the seed standard deviation. The last
epoch alone hides when a method was ahead: LSM can lead in the middle of a run and lose
it in the low-learning-rate end, and only the curve shows that.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.store import ROOT, folder_name

TITLES = {
    "top1": "top-1",
    "many": "Many",
    "medium": "Medium",
    "few": "Few",
    "val_top1": "val top-1",
    "train_top1": "train top-1",
    "train_few": "train Few",
    "train_loss": "train loss",
}


def read_curve(folder: Path) -> dict[int, dict]:
    path = folder / "curve.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing (run bench/accuracy.py for it first)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {int(r["epoch"]): r for r in rows}


def cell(values: list[float], percent: bool) -> str:
    scale = 100.0 if percent else 1.0
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def table(curves: dict[str, list[dict[int, dict]]], metric: str) -> str:
    epochs = sorted(set.intersection(*(set(c) for runs in curves.values() for c in runs)))
    percent = metric != "train_loss"
    lines = ["| method | " + " | ".join(f"epoch {e}" for e in epochs) + " |", "|---|" + "---:|" * len(epochs)]
    for method, runs in curves.items():
        cells = []
        for e in epochs:
            values = [c[e].get(metric) for c in runs if c[e].get(metric) is not None]
            cells.append(cell(values, percent) if values else "—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", required=True, help="comma-separated recipe stems")
    parser.add_argument("--tag", default="", help="the protocol tag the runs were stored under")
    parser.add_argument("--epochs", type=int, required=True, help="the protocol's epochs")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--metric", default="medium", choices=sorted(TITLES), help="the curve to tabulate")
    parser.add_argument("--store", type=Path, default=ROOT / "results" / "runs")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    curves = {
        r: [read_curve(args.store / folder_name(r, args.epochs, s, args.tag)) for s in seeds]
        for r in args.recipes.split(",")
    }
    print(f"{TITLES[args.metric]} (mean ± std over seeds {args.seeds}) at each evaluated epoch\n")
    print(table(curves, args.metric))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
