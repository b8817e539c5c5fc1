"""``lsm report RUN_DIR...``: one self-contained HTML page of runs (the page is built in lsm_registry.runfolder.page)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..errors import LSMError
from ..files import atomic_write
from ..runfolder import page as report
from .common import user_errors


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="HTML file to write (default: RUN_DIR/report.html for one run, report.html here for several).",
)
@user_errors
def command(run_dirs: tuple[Path, ...], out: Optional[Path]) -> None:
    """Write one HTML page of runs: curves, Many / Medium / Few, pictures, recipe.

    Each RUN_DIR is a run folder or a folder of run folders (a sweep's output). For a
    run the page holds its last-epoch table, learning curves from metrics.jsonl,
    per-class accuracy against training count, the confusion matrix and mixed samples
    the run drew, and its resolved recipe; for several runs also the table of
    `lsm compare` and their curves overlaid. A run that did not finish is shown as
    unfinished, with its curves so far. The page is one file that needs no network:
    pictures are embedded, there is no script. Needs matplotlib (the plot extra).
    """
    paths = list(run_dirs)
    reports = report.load_report_runs(paths)
    page = report.render_report(reports)
    target = out if out is not None else report.default_out(paths, reports)
    try:
        atomic_write(target, page)
    except OSError as exc:
        raise LSMError(f"{target}: cannot write the report ({exc.strerror or exc})") from None
    unfinished = sum(1 for r in reports if not r.finished)
    click.echo(f"wrote {target} ({len(reports)} run(s)" + (f", {unfinished} unfinished" if unfinished else "") + ")")
