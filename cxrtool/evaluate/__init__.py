"""Scoring predictions against labels: metrics, bootstrap intervals, reports and plots.

The metric kernels live in :mod:`cxrtool.evaluate.metrics` (training imports them alone),
the report and ``evaluate`` in :mod:`cxrtool.evaluate.classification`; the names below are
imported from them on first use, so importing one submodule does not import the others.

Example:
    >>> from cxrtool.evaluate import evaluate
    >>> report = evaluate("out/predictions.csv", "labels.csv")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cxrtool.evaluate.classification import (
        EvaluationReport,
        FindingMetrics,
        compute_metrics,
        evaluate,
        recorded_thresholds,
    )
    from cxrtool.evaluate.metrics import (
        METRICS,
        auprc,
        auroc,
        bootstrap_ci,
        choose_thresholds,
        macro_average,
        micro_metrics,
        threshold_metrics,
    )

__all__ = [
    "METRICS",
    "EvaluationReport",
    "FindingMetrics",
    "auprc",
    "auroc",
    "bootstrap_ci",
    "choose_thresholds",
    "compute_metrics",
    "evaluate",
    "macro_average",
    "micro_metrics",
    "recorded_thresholds",
    "threshold_metrics",
]

# Where each name lives (the screen's table is the CLI's: cxrtool.cli.evaluate.render_table).
_METRICS_NAMES = {"METRICS", "auprc", "auroc", "bootstrap_ci", "choose_thresholds", "macro_average", "micro_metrics",
                  "threshold_metrics"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = "metrics" if name in _METRICS_NAMES else "classification"
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value  # found once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
