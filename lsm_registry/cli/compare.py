"""``lsm compare RUN_DIR...``: one table of finished runs, repeats over seeds grouped."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click
from rich.console import Console

from ..errors import LSMError
from ..runfolder import reader as runs
from ..viz.plots import plot_compare
from .common import output_console, user_errors


def render(groups, fmt: str, width: Optional[int] = None) -> str:
    """The comparison as text in ``fmt`` (table, markdown or csv)."""

    if fmt == "markdown":
        return runs.markdown(groups)
    if fmt == "csv":
        return runs.csv_text(groups)

    console = Console(width=width or 160, color_system=None, force_terminal=False)
    with console.capture() as capture:
        console.print(runs.rich_table(groups))
    return capture.get()


@click.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "markdown", "csv"]),
    default="table",
    show_default=True,
    help="table (rich, for the terminal; markdown when the output is not a terminal), markdown (for docs) or csv "
    "(mean and std columns, fractions).",
)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the comparison to this file (in --format; a table is written as plain text).",
)
@click.option(
    "--rank-by",
    "rank_by",
    type=click.Choice(["none", *runs.RANK_KEYS]),
    default="none",
    show_default=True,
    help="Order the settings best first by this mean: val_top1 chooses on the validation split, top1 on the test set.",
)
@click.option(
    "--plot",
    "plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw the per-class accuracy of every run against its training count into this PNG (needs matplotlib).",
)
@user_errors
def command(run_dirs: tuple[Path, ...], fmt: str, out: Optional[Path], rank_by: str, plot: Optional[Path]) -> None:
    """Compare finished runs: top-1, Many, Medium, Few, rarest three, epochs, wall time.

    Each RUN_DIR is a run folder (it holds summary.json) or a folder of run folders,
    such as the output of `lsm sweep`. Runs whose resolved recipes differ only in
    run.seed and run.name are grouped and shown as mean ± std (sample std over the
    seeds); the setting column names only what tells the groups apart (e.g. "mixer
    lsm, fuser saliency"). Accuracies are the last epoch's, in percent, on the test set;
    runs with a validation split also get a "val top-1" column, and --rank-by val_top1
    orders the settings by it, so that a choice is made on validation, not on the test set.
    """

    groups = runs.group_runs(runs.load_runs(list(run_dirs)))
    if rank_by != "none":
        if not any(g.stat(rank_by)[0] is not None for g in groups):
            raise LSMError(f"--rank-by {rank_by}: no run has it (val_top1 needs [data] val_per_class > 0)")
        groups = runs.rank_groups(groups, rank_by)
    if fmt == "table" and not sys.stdout.isatty():
        click.echo(render(groups, "markdown"), nl=False)  # a pipe or a file: every cell whole
    elif fmt == "table":
        output_console().print(runs.rich_table(groups))
    else:
        click.echo(render(groups, fmt), nl=False)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(render(groups, fmt), encoding="utf-8")
        except OSError as exc:
            raise LSMError(f"{out}: cannot write the comparison ({exc.strerror or exc})") from None
    if plot is not None:
        records = [r for group in groups for r in group.runs]
        # Run names when they tell the groups apart, else the recipe keys that do.
        by_name = len({g.name for g in groups}) == len(groups)
        labels = [
            (group.name if by_name else group.label or group.name) + (f" (seed {seed})" if len(group.runs) > 1 else "")
            for group in groups
            for seed in group.seeds
        ]
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_compare(list(zip(labels, (r.summary for r in records))), plot)
        click.echo(f"wrote {plot}")
