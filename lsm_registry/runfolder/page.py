"""One self-contained HTML page for one or more run folders (``lsm report``).

A run folder holds what a reader needs to judge a run, but spread over seven files,
some of them JSON lines; the page puts them side by side, so that a run (or a
comparison of runs) can be read, archived or sent as one file. It is self-contained on
purpose: the style is inline, the pictures are ``data:`` URIs, and there is no script
and no link to the network, so it shows the same from a mail attachment, an archive or
a machine without network; a Content-Security-Policy tells the browser to load nothing
else. The pictures a run already drew (confusion matrix, mixed samples) are embedded as
they are; what the run folder has only as numbers (the learning curves, and per-class
accuracy against training count) is drawn in memory, so the run folders are only read,
never written. Every text taken from them is escaped, since a run name or a recipe
value is anyone's string.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import attrs

from ..errors import LSMError
from ..metrics import group_of
from ..version import __version__
from ..viz.pictures import MIXED_SAMPLES
from ..viz.plots import GROUP_COLOURS, PlotUnavailable, plot_compare, plot_per_class, png_bytes, pyplot
from . import reader as runs

#: What ``lsm report`` writes when ``--out`` is not given and one run is reported.
REPORT_NAME = "report.html"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: (metrics key, legend, colour) of the accuracy curves of one run.
CURVES = (
    ("top1", "top-1", "black"),
    ("many", "Many", GROUP_COLOURS["many"]),
    ("medium", "Medium", GROUP_COLOURS["medium"]),
    ("few", "Few", GROUP_COLOURS["few"]),
)
#: (summary key, column title) of the last-epoch table.
LAST_EPOCH = (("top1", "top-1"), ("many", "Many"), ("medium", "Medium"), ("few", "Few"), ("rare3", "rarest 3"))

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #222;
       background: #fff; margin: 0 auto; max-width: 1180px; padding: 16px 24px 48px; line-height: 1.4; }
h1 { font-size: 1.6em; margin: 0.3em 0 0.1em; }
h2 { font-size: 1.3em; margin: 1.6em 0 0.3em; padding-top: 0.6em; border-top: 2px solid #ccc; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.3em; }
.meta, .path, .note { color: #555; font-size: 0.9em; }
.note { font-style: italic; }
.badge { display: inline-block; font-size: 0.7em; padding: 1px 8px; border-radius: 8px; vertical-align: middle;
         margin-left: 6px; border: 1px solid #999; }
.finished { background: #e8f0e8; }
.unfinished { background: #f5f0d8; }
table { border-collapse: collapse; margin: 0.4em 0 0.8em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 3px 9px; }
th { background: #f2f2f2; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: 0.3em 0 0.8em; border: 1px solid #ddd; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: 8px 12px; overflow-x: auto; font-size: 0.85em; }
details > summary { cursor: pointer; color: #333; margin: 0.4em 0; }
nav ul { margin: 0.2em 0; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 0 20px; align-items: start; }
"""

#: No script, no network: only inline style and data: images may be used by the page.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ------------------------------------------------------------------------------ reading


@attrs.frozen
class ReportRun:
    """What the page shows of one run folder; ``record`` is None for a run that did not finish."""

    path: Path
    recipe: dict[str, Any]
    recipe_text: Optional[str]
    metrics: tuple[dict[str, Any], ...]
    record: Optional[runs.RunRecord]

    @property
    def finished(self) -> bool:
        return self.record is not None

    @property
    def summary(self) -> dict[str, Any]:
        return self.record.summary if self.record is not None else {}

    @property
    def name(self) -> str:
        if self.record is not None:
            return self.record.name
        return str(self.recipe.get("run", {}).get("name") or self.path.name)

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        return [m for m in self.metrics if "top1" in m]

    @property
    def planned_epochs(self) -> Optional[int]:
        epochs = self.summary.get("epochs", self.recipe.get("run", {}).get("epochs"))
        return epochs if isinstance(epochs, int) else None

    @property
    def has_mixer(self) -> bool:
        return isinstance(self.recipe.get("mixer"), dict) and self.recipe["mixer"].get("name") is not None


def load_report_run(folder: Path) -> ReportRun:
    """A run folder, finished (summary.json) or not (recipe.toml and the metrics so far)."""
    if not folder.exists():
        raise LSMError(f"{folder}: no such run folder")
    if not folder.is_dir():
        raise LSMError(f"{folder}: not a folder (give run folders, which hold recipe.toml or summary.json)")
    if not runs.is_run_dir(folder):
        raise LSMError(f"{folder}: not a run folder (it holds neither recipe.toml nor summary.json)")
    record = runs.load_run(folder) if (folder / "summary.json").is_file() else None
    recipe, text = runs.read_run_recipe(folder / "recipe.toml")
    return ReportRun(
        path=folder, recipe=recipe, recipe_text=text, metrics=runs.read_metrics(folder / "metrics.jsonl"), record=record
    )


def report_dirs(paths: Iterable[Path]) -> list[Path]:
    """Run folders named directly, or the run folders inside a folder of runs (a sweep's output).

    Unlike ``lsm compare``, unfinished runs count: the page shows them as unfinished.
    """
    out: list[Path] = []
    for path in paths:
        if path.is_dir() and not runs.is_run_dir(path):
            children = sorted(p for p in path.iterdir() if p.is_dir() and runs.is_run_dir(p))
            if not children:
                raise LSMError(
                    f"{path}: not a run folder (it holds neither recipe.toml nor summary.json), "
                    "and no run folder is in it"
                )
        else:
            children = [path]
        for child in children:
            if all(child.resolve() != seen.resolve() for seen in out):  # a run named twice counts once
                out.append(child)
    return out


def load_report_runs(paths: Iterable[Path]) -> list[ReportRun]:
    return [load_report_run(p) for p in report_dirs(paths)]


# ------------------------------------------------------------------------------ pictures


def _img(data: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{esc(alt)}">'


def _value(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    return 100 * float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _loss(record: dict[str, Any]) -> float:
    value = record.get("train_loss")
    return math.nan if value is None else float(value)


def _style_curves(acc, loss, acc_label: str, acc_title: str, loss_label: str, loss_title: str) -> None:
    """The axes of a (accuracy, train loss) pair of learning-curve panels, one look for every page."""
    acc.set_xlabel("epoch")
    acc.set_ylabel(acc_label)
    acc.set_ylim(-3, 103)
    acc.set_title(acc_title)
    acc.legend(fontsize=8, loc="best")
    loss.set_xlabel("epoch")
    loss.set_ylabel(loss_label)
    loss.set_title(loss_title)
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)


def _figure_png(fig) -> bytes:
    plt = pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def learning_curves_png(run: ReportRun) -> Optional[bytes]:
    """Top-1, Many, Medium, Few (and validation top-1) and train loss over the evaluated epochs."""
    points = run.evaluations
    if not points:
        return None
    plt = pyplot()
    epochs = [p.get("epoch") for p in points]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    for key, label, colour in CURVES:
        ys = [_value(p, key) for p in points]
        if not all(math.isnan(y) for y in ys):
            acc.plot(
                epochs, ys, marker="o", markersize=3, linewidth=1.8 if key == "top1" else 1.2, color=colour, label=label
            )
    if any(p.get("val_top1") is not None for p in points):
        acc.plot(
            epochs,
            [_value(p, "val_top1") for p in points],
            marker="s",
            markersize=3,
            linestyle="--",
            color="#555555",
            label="val top-1",
        )
    every = [
        m for m in run.metrics if m.get("train_loss") is not None
    ]  # every epoch (runs of earlier versions: evaluated ones)
    loss.plot([m.get("epoch") for m in every], [_loss(m) for m in every], marker="o", markersize=2, color="#8c564b")
    _style_curves(
        acc, loss, "test accuracy (%)", "accuracy by epoch", "train loss (mean over the epoch)", "train loss by epoch"
    )
    return _figure_png(fig)


def overlaid_curves_png(reports: Sequence[ReportRun], labels: Sequence[str]) -> Optional[bytes]:
    """Top-1 (validation top-1 dashed, when a run has it) and train loss of every run, one colour per run."""
    if not any(r.evaluations for r in reports):
        return None
    plt = pyplot()
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    colours = plt.get_cmap("tab10")
    for i, (run, label) in enumerate(zip(reports, labels)):
        points = run.evaluations
        if not points:
            continue
        colour = colours(i % 10)
        epochs = [p.get("epoch") for p in points]
        acc.plot(epochs, [_value(p, "top1") for p in points], marker="o", markersize=3, color=colour, label=label)
        if any(p.get("val_top1") is not None for p in points):
            acc.plot(
                epochs, [_value(p, "val_top1") for p in points], linestyle="--", color=colour, label=f"{label} (val)"
            )
        every = [m for m in run.metrics if m.get("train_loss") is not None]
        loss.plot(
            [m.get("epoch") for m in every],
            [_loss(m) for m in every],
            marker="o",
            markersize=2,
            color=colour,
            label=label,
        )
    _style_curves(acc, loss, "test top-1 (%)", "top-1 by epoch, per run", "train loss", "train loss by epoch, per run")
    return _figure_png(fig)


def _has_per_class(summary: dict[str, Any]) -> bool:
    counts, accs = summary.get("class_counts"), summary.get("per_class")
    return bool(counts) and isinstance(accs, list) and len(accs) == len(counts)


def _run_picture(run: ReportRun, name: str) -> tuple[Optional[bytes], str]:
    """A PNG the run drew itself, or why it is not there."""
    path = run.path / name
    if path.is_file():
        data = path.read_bytes()
        if data.startswith(PNG_SIGNATURE):
            return data, ""
        return None, f"not shown: {name} is not a PNG file"
    if name == MIXED_SAMPLES:
        if not run.has_mixer:
            return None, "not drawn: the recipe has no [mixer]"
        if not run.finished:
            return None, "not drawn: the run did not finish"
        return None, "not drawn: no batch was mixed in this run (or it was drawn before the run was resumed)"
    if not run.finished:
        return None, "not drawn: the run did not finish"
    return (
        None,
        f"not drawn: the run folder has no {name} (matplotlib was missing, or the picture could not be written, when the run finished)",
    )


# ------------------------------------------------------------------------------ HTML


def _pct(value: Any) -> str:
    return "—" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{100 * value:.1f}"


def _table(columns: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{esc(c)}</td>' if i >= numeric_from else f"<td>{esc(c)}</td>" for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _wall(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _last_epoch(run: ReportRun) -> str:
    """Many / Medium / Few of the last evaluation: the summary's, or the newest metrics line of an unfinished run."""
    source = run.summary if run.finished else (run.evaluations[-1] if run.evaluations else None)
    if source is None:
        return '<p class="note">no evaluation recorded yet</p>'
    counts = run.summary.get("class_counts") or []
    groups = {g: sum(1 for n in counts if group_of(n) == g) for g in ("many", "medium", "few")}
    columns = ["split"] + [
        f"{title} ({groups[key]} classes)" if counts and key in groups else title for key, title in LAST_EPOCH
    ]
    rows = [["test"] + [_pct(source.get(key)) for key, _ in LAST_EPOCH]]
    if any(source.get(f"val_{key}") is not None for key, _ in LAST_EPOCH):
        rows.append(["validation"] + [_pct(source.get(f"val_{key}")) for key, _ in LAST_EPOCH])
    epoch = source.get("epochs") if run.finished else source.get("epoch")
    return f"<h3>Last epoch ({esc(epoch)}), accuracy in %</h3>" + _table(columns, rows)


def _facts(run: ReportRun) -> str:
    s = run.summary
    if run.finished:
        best_on = "val top-1" if s.get("best_on") == "val" else "top-1"
        rows = [
            ("epochs", s.get("epochs")),
            (f"best {best_on} (epoch)", f"{_pct(s.get('best_top1'))} ({s.get('best_epoch', '—')})"),
            ("final train loss", f"{s['final_loss']:.4f}" if isinstance(s.get("final_loss"), (int, float)) else "—"),
            ("wall time", _wall(s.get("wall_time_s"))),
            ("seed", s.get("seed", run.recipe.get("run", {}).get("seed", "—"))),
            ("classes", len(s.get("class_counts") or []) or "—"),
        ]
    else:
        last = run.evaluations[-1] if run.evaluations else {}
        rows = [
            ("evaluations recorded", len(run.evaluations)),
            ("last evaluated epoch", last.get("epoch", "—")),
            ("planned epochs", run.planned_epochs if run.planned_epochs is not None else "—"),
            ("wall time so far", _wall(last.get("wall_s"))),
            ("seed", run.recipe.get("run", {}).get("seed", "—")),
        ]
    return (
        "<table><tbody>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows) + "</tbody></table>"
    )


def _per_class_rows(run: ReportRun) -> list[list[str]]:
    """per_class.csv as the run wrote it, or the same rows from summary.json."""
    path = run.path / "per_class.csv"
    if path.is_file():
        try:
            reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
            return [
                [
                    row.get("class", ""),
                    row.get("name", ""),
                    row.get("train_count", ""),
                    row.get("group", ""),
                    _pct(float(row["accuracy"])) if row.get("accuracy") else "—",
                ]
                for row in reader
            ]
        except (UnicodeDecodeError, ValueError, csv.Error) as exc:
            raise LSMError(f"{path}: cannot read the per-class table ({exc})") from None
    s = run.summary
    names = s.get("class_names") or [str(i) for i in range(len(s.get("class_counts") or []))]
    return [
        [str(c), str(name), str(n), group_of(n), _pct(acc)]
        for c, (name, n, acc) in enumerate(zip(names, s.get("class_counts") or [], s.get("per_class") or []))
    ]


def _per_class(run: ReportRun) -> str:
    out = ["<h3>Per-class accuracy against training count</h3>"]
    if not run.finished:
        out.append('<p class="note">not drawn: the run did not finish (summary.json holds the class counts)</p>')
        return "".join(out)
    if _has_per_class(run.summary):
        out.append(
            _img(png_bytes(plot_per_class, run.summary), f"{run.name}: per-class accuracy against training count")
        )
    else:
        out.append('<p class="note">not drawn: summary.json has no per-class accuracies and class counts</p>')
    rows = _per_class_rows(run)
    if rows:
        out.append(
            f"<details><summary>per-class table ({len(rows)} classes)</summary>"
            + _table(["class", "name", "training images", "group", "accuracy (%)"], rows, numeric_from=2)
            + "</details>"
        )
    return "".join(out)


def _picture_section(run: ReportRun, name: str, title: str) -> str:
    data, why = _run_picture(run, name)
    body = _img(data, f"{run.name}: {title}") if data is not None else f'<p class="note">{esc(why)}</p>'
    return f'<h3>{esc(title)} <span class="meta">({esc(name)})</span></h3>{body}'


def _run_section(run: ReportRun, anchor: str, recipe_open: bool) -> str:
    status = (
        '<span class="badge finished">finished</span>'
        if run.finished
        else '<span class="badge unfinished">unfinished</span>'
    )
    out = [
        f'<section id="{esc(anchor)}"><h2>{esc(run.name)}{status}</h2>',
        f'<p class="path">run folder: {esc(run.path)}</p>',
    ]
    if not run.finished:
        planned = f" of {run.planned_epochs} planned" if run.planned_epochs is not None else ""
        done = run.evaluations[-1].get("epoch", "?") if run.evaluations else "no"
        out.append(
            f'<p class="note">unfinished: no summary.json; curves of the evaluations so far '
            f"(last evaluated epoch: {esc(done)}{esc(planned)})</p>"
        )
    out.append(_last_epoch(run))
    out.append(_facts(run))
    out.append('<h3>Learning curves <span class="meta">(metrics.jsonl)</span></h3>')
    curves = learning_curves_png(run)
    out.append(
        _img(curves, f"{run.name}: learning curves")
        if curves is not None
        else '<p class="note">not drawn: metrics.jsonl holds no evaluation yet</p>'
    )
    out.append(
        f'<div class="pair"><div>{_per_class(run)}</div>'
        f"<div>{_picture_section(run, 'confusion.png', 'Confusion matrix')}</div></div>"
    )
    out.append(_picture_section(run, MIXED_SAMPLES, "Mixed samples"))
    recipe = (
        f"<pre>{esc(run.recipe_text)}</pre>"
        if run.recipe_text is not None
        else '<p class="note">the run folder has no recipe.toml</p>'
    )
    out.append(
        f"<details{' open' if recipe_open else ''}><summary><b>Resolved recipe</b> (recipe.toml)</summary>"
        f"{recipe}</details>"
    )
    out.append("</section>")
    return "".join(out)


def _labels(reports: Sequence[ReportRun]) -> list[str]:
    """Run names, with the folder name where two runs share a name."""
    names = [r.name for r in reports]
    return [n if names.count(n) == 1 else f"{n} ({r.path.name})" for n, r in zip(names, reports)]


def _comparison(reports: Sequence[ReportRun]) -> str:
    """The table of ``lsm compare`` (same grouping, same cells), the overlaid curves and per-class accuracy."""
    out = ['<section id="comparison"><h2>Comparison</h2>']
    finished = [r.record for r in reports if r.record is not None]
    if finished:
        groups = runs.group_runs(finished)
        out.append(
            '<p class="meta">last epoch, test set, accuracy in %; runs that differ only in seed and name '
            "are one row (mean ± std over seeds), as in <code>lsm compare</code></p>"
        )
        out.append(_table(runs.columns_of(groups), runs.text_rows(groups), numeric_from=2))
    else:
        out.append('<p class="note">no finished run to compare</p>')
    unfinished = [r.name for r in reports if not r.finished]
    if unfinished:
        out.append(f'<p class="note">not in the table (unfinished): {esc(", ".join(unfinished))}</p>')
    labels = _labels(reports)
    out.append("<h3>Learning curves, overlaid</h3>")
    curves = overlaid_curves_png(reports, labels)
    out.append(
        _img(curves, "top-1 and train loss by epoch, per run")
        if curves is not None
        else '<p class="note">not drawn: no run has an evaluation yet</p>'
    )
    per_class = [
        (label, r.summary)
        for label, r in zip(labels, reports)
        if r.finished and _has_per_class(r.summary) and isinstance(r.summary.get("top1"), (int, float))
    ]
    if per_class:
        out.append("<h3>Per-class accuracy against training count, overlaid</h3>")
        out.append(_img(png_bytes(plot_compare, per_class), "per-class accuracy by run"))
    out.append("</section>")
    return "".join(out)


def render_report(reports: Sequence[ReportRun], title: Optional[str] = None) -> str:
    """The page, as text: for one run its section; for several the comparison first, then each run."""
    if not reports:
        raise LSMError("no run folder to report")
    try:
        pyplot()  # fail before any work, with the install hint
    except PlotUnavailable:
        raise PlotUnavailable("lsm report draws its curves with matplotlib: pip install 'lsm-registry[plot]'") from None
    several = len(reports) > 1
    title = title or (f"lsm report: {reports[0].name}" if not several else f"lsm report: {len(reports)} runs")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">written by lsm-registry {esc(__version__)} on {esc(datetime.now().strftime("%Y-%m-%d %H:%M"))}; '
        "accuracies are on the test set unless marked val. Many / Medium / Few: classes with more than 100, "
        "20 to 100, fewer than 20 training images.</p>",
    ]
    anchors = [f"run-{i + 1}" for i in range(len(reports))]
    if several:
        items = "".join(
            f'<li><a href="#{a}">{esc(label)}</a>{"" if r.finished else " (unfinished)"}</li>'
            for a, label, r in zip(anchors, _labels(reports), reports)
        )
        parts.append(f"<nav><b>Runs</b><ul>{items}</ul></nav>")
        parts.append(_comparison(reports))
    parts += [_run_section(r, a, recipe_open=not several) for r, a in zip(reports, anchors)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def default_out(paths: Sequence[Path], reports: Sequence[ReportRun]) -> Path:
    """RUN_DIR/report.html for one run folder, report.html in the current folder otherwise."""
    if len(paths) == 1 and len(reports) == 1 and reports[0].path == paths[0]:
        return paths[0] / REPORT_NAME
    return Path(REPORT_NAME)
