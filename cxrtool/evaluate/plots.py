"""ROC and precision-recall curves of an evaluation, one line per finding, as PNG.

matplotlib is imported when a figure is drawn, not with this module.

Example:
    >>> _plot_curves(report.paths["roc"], "roc", y_true, y_score, report.findings)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cxrtool.evaluate.metrics import _curve_points
from cxrtool.io.outputs import atomic_write

__all__: list[str] = []


class _CurveRow(Protocol):
    """What a curve's legend reads of a report row (a :class:`FindingMetrics`)."""

    finding: str
    auroc: float
    auprc: float


def _plot_curves(
    path: Path, kind: str, t: np.ndarray, s: np.ndarray, rows: Sequence[_CurveRow]
) -> None:
    # Figure + Agg canvas directly: no pyplot, so no global backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = _palette(len(rows))
    for f, (row, color) in enumerate(zip(rows, colors, strict=True)):
        keep = ~np.isnan(t[:, f])
        y, p = t[keep, f], s[keep, f]
        if y.size == 0 or y.min() == y.max():
            continue  # one class: no curve to draw
        fpr, tpr, precision = _curve_points(y, p)
        if kind == "roc":
            label = f"{row.finding} (AUROC {row.auroc:.3f})"
            ax.plot(fpr, tpr, color=color, lw=1.4, label=label)
        else:
            # Step height between consecutive recalls is the precision reached at the
            # right end: the same rectangles that average precision sums.
            label = f"{row.finding} (AUPRC {row.auprc:.3f})"
            recall = tpr
            ax.step(recall, np.r_[precision[1], precision[1:]], where="pre", color=color,
                    lw=1.4, label=label)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
        ax.set_xlabel("1 - specificity (false positive rate)")
        ax.set_ylabel("Sensitivity (true positive rate)")
        ax.set_title("ROC curves")
    else:
        ax.set_xlabel("Recall (sensitivity)")
        ax.set_ylabel("Precision (PPV)")
        ax.set_title("Precision-recall curves")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > (1 if kind == "roc" else 0):
        ax.legend(loc="lower right" if kind == "roc" else "upper right", fontsize=7, framealpha=0.9)
    else:  # still write the file, so the report's set of outputs never varies
        ax.text(0.5, 0.5, "no finding has both classes", ha="center", va="center", color="0.4")
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:  # temp file, then rename
        fig.savefig(fh, format="png")


def _palette(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]
