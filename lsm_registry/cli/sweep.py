"""``lsm sweep RECIPE --grid table.key=v1,v2 ...``: run a grid of one recipe, then compare.

Every grid point is validated before the first run starts, so a typo costs seconds,
not the hours of the runs before it. Runs go one after the other, each in its own
folder; a run that fails is reported and the sweep goes on.
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path
from typing import Any, Optional

import attrs
import click
from rich.console import Console
from rich.text import Text

from ..engine import Trainer
from ..errors import LSMError, RecipeError
from ..files import holds_anything
from ..recipe import ALL_TABLES, COMPONENT_TABLES, load_recipe
from ..registry import suggest
from ..runfolder import reader as runs
from ..runfolder.reporter import RunReporter, check_writable, fresh_run_dir
from .common import debug_enabled, registry_with_warnings, set_option, user_errors

GRID_HELP = (
    "A swept key and its values: table.key=v1,v2,... (values in TOML syntax as in --set, bare words are "
    "strings; commas inside [...] or quotes do not split). Repeat for a product grid."
)


@attrs.frozen
class GridAxis:
    table: str
    key: str
    values: tuple[str, ...]  # raw text of each value, parsed later like --set

    @property
    def dotted(self) -> str:
        return f"{self.table}.{self.key}"


@attrs.frozen
class GridPoint:
    assignments: tuple[tuple[str, str], ...]  # (table.key, raw value)
    seed: int

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.assignments] + [f"run.seed={self.seed}"]

    @property
    def label(self) -> str:
        return ",".join([f"{k}={v}" for k, v in self.assignments] + [f"seed={self.seed}"])

    @property
    def folder(self) -> str:
        parts = [f"{k}={_safe(v)}" for k, v in self.assignments] + [f"seed={self.seed}"]
        return ",".join(parts)


def _safe(raw: str) -> str:
    """A value as a folder-name fragment: quotes dropped, anything unusual becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._+\-\[\]]", "_", raw.strip().strip("\"'")) or "_"


def split_values(text: str) -> list[str]:
    """Split on commas that are outside brackets and quotes."""
    values, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    values.append("".join(current).strip())
    return values


def parse_grid(specs: list[str], errors: list[str]) -> list[GridAxis]:
    """Axes of the well-formed specs; one line per problem appended to ``errors``."""
    axes: list[GridAxis] = []
    seen: set[str] = set()
    for spec in specs:
        lhs, eq, rhs = spec.partition("=")
        table, dot, key = lhs.strip().partition(".")
        if not eq or not dot or not table or not key:
            errors.append(f"--grid {spec}: expected table.key=v1,v2 (e.g. --grid mixer.alpha=0.5,1.0)")
            continue
        dotted = f"{table}.{key}"
        if dotted == "run.seed":
            errors.append(f"--grid {spec}: sweep seeds with --seeds 0,1,2, not --grid")
            continue
        if dotted == "run.name":
            errors.append(f"--grid {spec}: run.name is not a setting; each grid point gets its own folder")
            continue
        if dotted in seen:
            errors.append(f"--grid {spec}: {dotted} is swept twice; give all its values in one --grid")
            continue
        values = split_values(rhs) if rhs.strip() else []
        if not values:
            errors.append(f"--grid {spec}: no values; give at least one, e.g. {dotted}=v1,v2")
            continue
        if any(v == "" for v in values):
            errors.append(f"--grid {spec}: an empty value between commas")
            continue
        if len(set(values)) != len(values):
            errors.append(f"--grid {spec}: a value is listed twice")
            continue
        seen.add(dotted)
        axes.append(GridAxis(table, key, tuple(values)))
    return axes


def parse_seeds(text: Optional[str], default: int) -> list[int]:
    if text is None:
        return [default]
    parts = [p.strip() for p in text.split(",")]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise LSMError(f"--seeds {text}: expected comma-separated integers, e.g. --seeds 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise LSMError(f"--seeds {text}: a seed is listed twice")
    return seeds


def expand(axes: list[GridAxis], seeds: list[int]) -> list[GridPoint]:
    """The product of the axes in the order given, seeds innermost (repeats run back to back)."""
    combos = itertools.product(*[[(a.dotted, v) for v in a.values] for a in axes])
    return [GridPoint(tuple(combo), seed) for combo in combos for seed in seeds]


def check_keys(axes: list[GridAxis], base: Any, errors: list[str]) -> None:
    """Each swept key must exist in the resolved recipe (or in a component swept by name)."""

    resolved = base.to_dict()
    by_name = {a.table for a in axes if a.key == "name"}
    for axis in axes:
        table, key = axis.table, axis.key
        if table not in ALL_TABLES:
            hint = suggest(table, ALL_TABLES)
            errors.append(
                f"--grid {axis.dotted}: unknown table [{table}]."
                + (f" Did you mean [{hint}]?" if hint else "")
                + f" Tables: {', '.join(ALL_TABLES)}"
            )
        elif key == "name" and table in COMPONENT_TABLES:
            continue
        elif table in resolved and key in resolved[table]:
            continue
        elif table in by_name:
            continue  # a parameter of a component chosen per point: checked on each point
        elif table not in resolved:
            errors.append(
                f"--grid {axis.dotted}: the resolved recipe has no [{table}] table; add one to the recipe or also sweep {table}.name"
            )
        else:
            keys = [k for k in resolved[table] if k != "name"]
            owner = f"{table} {resolved[table]['name']!r}" if "name" in resolved[table] else f"table [{table}]"
            hint = suggest(key, keys)
            errors.append(
                f"--grid {axis.dotted}: not a parameter of {owner}."
                + (f" Did you mean {hint!r}?" if hint else "")
                + f" Parameters: {', '.join(keys) or '(none)'}"
            )


def resolve_points(recipe: Path, sets: list[str], points: list[GridPoint], registry: Any) -> list[Any]:
    """Validate every grid point up front; one error line per distinct problem.

    A problem shared by several points (a bad value shows up once per seed and per
    value of the other axes) is reported once, naming the first point and how many more.
    """

    parsed = []
    where: dict[str, list[GridPoint]] = {}
    for point in points:
        try:
            parsed.append(load_recipe(recipe, sets + point.overrides, registry))
        except RecipeError as exc:
            for line in exc.lines:
                where.setdefault(line, []).append(point)
    if where:
        raise RecipeError(
            [
                f"grid point {pts[0].label}" + (f" (and {len(pts) - 1} more)" if len(pts) > 1 else "") + f": {line}"
                for line, pts in where.items()
            ]
        )
    return parsed


@click.command("sweep")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--grid", "grids", multiple=True, metavar="TABLE.KEY=V1,V2", help=GRID_HELP)
@click.option(
    "--seeds",
    default=None,
    metavar="S1,S2",
    help="Seeds to repeat every grid point with (default: the recipe's run.seed).",
)
@set_option
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Sweep folder (default: runs/sweep-<recipe stem>, with -2, -3, ... when taken); one sub-folder per run.",
)
@click.option("--dry-run", is_flag=True, help="Validate every point and print the plan without training.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
@user_errors
def command(
    recipe: Path,
    grids: tuple[str, ...],
    seeds: Optional[str],
    overrides: tuple[str, ...],
    out: Optional[Path],
    dry_run: bool,
    no_progress: bool,
) -> None:
    """Train RECIPE at every point of the --grid product (times --seeds), then compare.

    Example: lsm sweep recipes/fashion_mnist_lt/lsm_ce.toml --grid label_fuser.name=saliency,area --seeds 0,1.
    --set / --unset apply to every point. Each run lands in OUT/<key=value,...,seed=N>/ with the usual run files; the sweep
    ends with the `lsm compare` table of the finished runs. Exit status: 0 when every
    run finished, 1 when some failed (the others still run), 2 for bad input.
    """

    registry = registry_with_warnings()
    sets = list(overrides)
    points = sweep_points(recipe, grids, seeds, sets, registry)
    parsed = resolve_points(recipe, sets, points, registry)
    out = sweep_folder(recipe, out, points)
    click.echo(f"sweep of {recipe}: {len(points)} run(s) into {out}")
    if dry_run:
        for i, point in enumerate(points, 1):
            click.echo(f"  [{i}/{len(points)}] {out / point.folder}")
        return
    check_writable(out)
    console = Console()
    finished, failures = train_points(points, parsed, registry, out, console, no_progress)
    if finished:
        groups = runs.group_runs(runs.load_runs(finished))
        ranked = any(g.stat("val_top1")[0] is not None for g in groups)
        if ranked:  # choose on validation; the test set is only reported
            groups = runs.rank_groups(groups, "val_top1")
        order = ", ranked by validation top-1" if ranked else ""
        console.print(runs.rich_table(groups, title=f"sweep {out}: last epoch (mean ± std over seeds{order})"))
    if failures:
        click.echo(f"{len(failures)} of {len(points)} run(s) failed:", err=True)
        for label, message in failures:
            click.echo(f"  {label}: {message}", err=True)
        sys.exit(1)


def sweep_points(recipe: Path, grids: tuple[str, ...], seeds: Optional[str], sets: list[str], registry) -> list:
    """The grid's points times the seeds; every bad --grid, --set or key is reported at once."""
    errors: list[str] = []
    axes = parse_grid(list(grids), errors)
    try:
        base = load_recipe(recipe, sets, registry)
    except RecipeError as exc:
        raise RecipeError(errors + exc.lines) from None
    check_keys(axes, base, errors)
    if errors:
        raise RecipeError(errors)
    points = expand(axes, parse_seeds(seeds, base.run.seed))
    folders = [p.folder for p in points]
    clash = sorted({f for f in folders if folders.count(f) > 1})
    if clash:
        raise LSMError(f"--grid: two grid points would share the folder {clash[0]}; list each value once")
    return points


def sweep_folder(recipe: Path, out: Optional[Path], points: list) -> Path:
    """``out``, refused when it already holds one of the points' runs; by default a new runs/sweep-<stem>."""
    if out is None:
        return fresh_run_dir(Path("runs"), f"sweep-{recipe.stem}")
    taken = [p.folder for p in points if holds_anything(out / p.folder)]
    if taken:
        raise LSMError(
            f"{out}: already holds runs ({', '.join(taken[:3])}{', ...' if len(taken) > 3 else ''}); choose another --out"
        )
    return out


def train_points(
    points: list, parsed: list, registry, out: Path, console: Console, no_progress: bool
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Train every point; a failed run is reported and the others still run. (finished folders, failures)."""
    failures: list[tuple[str, str]] = []
    finished: list[Path] = []
    for i, (point, spec) in enumerate(zip(points, parsed), 1):
        folder = out / point.folder
        console.rule(Text(f"[{i}/{len(points)}] {point.label}", style="bold"))
        try:
            trainer = Trainer(spec, registry, run_dir=folder)
            trainer.fit(RunReporter(console, show_progress=not no_progress))
            finished.append(folder)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one failed run must not lose the others
            if debug_enabled():
                raise
            lines = exc.lines if isinstance(exc, RecipeError) else [str(exc) or type(exc).__name__]
            message = "; ".join(lines) if isinstance(exc, LSMError) else f"{type(exc).__name__}: {'; '.join(lines)}"
            failures.append((point.label, message))
            click.echo(f"error: run {point.label} failed: {message}", err=True)
    return finished, failures
