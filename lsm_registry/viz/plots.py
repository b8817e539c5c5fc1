"""Pictures of a run: per-class accuracy against training count, the confusion matrix,
and per-class accuracy of several runs overlaid.

matplotlib is the ecosystem's default for such plots, but it is heavy and training
does not need it: it is the optional extra ``lsm-registry[plot]``. Without it these
functions raise ``PlotUnavailable`` and the run folder simply has no pictures.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import LSMError
from ..files import atomic_write
from ..metrics import group_of

GROUP_COLOURS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}


class PlotUnavailable(LSMError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("pictures need matplotlib: pip install 'lsm-registry[plot]'") from None
    # Run, class and component names are user text: "$x^$" must be drawn as written, not
    # parsed as mathtext (which fails after training, on the pictures and the report).
    matplotlib.rcParams["text.parse_math"] = False
    return plt


def pyplot():
    """matplotlib.pyplot on the Agg backend, for modules that draw figures of their own.

    The one place that imports the optional extra, so every caller fails with the same
    one-line hint (``PlotUnavailable``) when it is missing.
    """
    return _pyplot()


def png_bytes(plot: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes:
    """What ``plot(*args, path=FILE, **kwargs)`` would write to FILE, as PNG bytes.

    A page that embeds its pictures (``lsm report``) needs them in memory, and must not
    write into the run folders it reads; the ``plot_*`` functions are reused as they are.
    """
    plt = _pyplot()
    buf = io.BytesIO()
    with plt.rc_context({"savefig.format": "png"}):  # a file-like object has no suffix to tell the format
        plot(*args, path=buf, **kwargs)
    return buf.getvalue()


def _save(fig, path: Any) -> None:
    """``fig`` as PNG to ``path``: a file is written atomically (a full disk leaves no half
    picture behind), a file-like object (``png_bytes``) directly."""
    if isinstance(path, (str, Path)):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write(Path(path), buf.getvalue())
    else:
        fig.savefig(path)


def _group_guides(ax) -> None:
    for x in (20, 100):
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
    ax.text(0.01, 0.98, "Few < 20 ≤ Medium ≤ 100 < Many", transform=ax.transAxes, va="top", fontsize=8, color="grey")


def plot_per_class(summary: dict[str, Any], path: Path, title: Optional[str] = None) -> Path:
    """Per-class test accuracy (y) against training images of the class (x, log scale)."""
    plt = _pyplot()
    counts = summary["class_counts"]
    accs = summary["per_class"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for group, colour in GROUP_COLOURS.items():
        pts = [(n, 100 * a) for n, a in zip(counts, accs) if a is not None and group_of(n) == group]
        if pts:
            ax.scatter(*zip(*pts), s=18, color=colour, label=f"{group.capitalize()} ({len(pts)} classes)", alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_ylim(-3, 103)
    _group_guides(ax)
    top1 = summary.get("top1")
    ax.set_title(
        title or f"{summary.get('run_name', 'run')}: per-class accuracy (top-1 {100 * top1:.1f} %)"
        if top1 is not None
        else "per-class accuracy"
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_confusion(
    confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str = "confusion matrix"
) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), head classes first."""

    plt = _pyplot()
    m = np.asarray(confusion, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    c = len(class_names)
    size = min(4 + 0.35 * c, 14)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=120)
    image = ax.imshow(100 * m, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, label="% of the true class")
    if c <= 40:
        ax.set_xticks(range(c), labels=class_names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(c), labels=class_names, fontsize=7)
    if c <= 15:
        for i in range(c):
            for j in range(c):
                if m[i, j] >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{100 * m[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if m[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (ordered as the data set: head first)")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_compare(runs: Sequence[tuple[str, dict[str, Any]]], path: Path) -> Path:
    """Per-class accuracy of several runs against training count, one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 5), dpi=120)
    for label, summary in runs:
        pairs = sorted((n, 100 * a) for n, a in zip(summary["class_counts"], summary["per_class"]) if a is not None)
        if pairs:
            xs, ys = zip(*pairs)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=f"{label} ({100 * summary['top1']:.1f} %)")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_ylim(-3, 103)
    _group_guides(ax)
    ax.set_title("per-class accuracy by run (legend: overall top-1)")
    # Beside the axes, never over the lines.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 0.68, 1))
    _save(fig, path)
    plt.close(fig)
    return path
