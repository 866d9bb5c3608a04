"""Scoring predictions against labels: metrics, bootstrap intervals, reports and plots.

Example:
    >>> from cxrtool.evaluate import evaluate
    >>> report = evaluate("out/predictions.csv", "labels.csv")
"""

from __future__ import annotations

from cxrtool.evaluate.classification import (
    METRICS,
    EvaluationReport,
    FindingMetrics,
    auprc,
    auroc,
    bootstrap_ci,
    choose_thresholds,
    compute_metrics,
    evaluate,
    macro_average,
    micro_metrics,
    recorded_thresholds,
    render_table,
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
    "render_table",
    "threshold_metrics",
]
