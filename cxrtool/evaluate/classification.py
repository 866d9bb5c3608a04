"""Multi-label classification reports and the ``evaluate`` command.

Arrays follow one convention throughout: ``y_true`` is (N, F) with 1, 0 or NaN (NaN =
unknown, dropped per finding), ``y_score`` is (N, F) probabilities. 1-D inputs are one
finding. Undefined values (a finding with one class, a ratio with a zero denominator) are
NaN, never an exception.

The work is split along its seams; this module orchestrates:

- :mod:`cxrtool.evaluate.metrics`: the metric kernels (AUROC, AUPRC, threshold metrics,
  macro and micro averages, decision thresholds, bootstrap intervals), a leaf that training
  imports on its own;
- :mod:`cxrtool.evaluate.joins`: predictions tables read and matched to label rows;
- :mod:`cxrtool.evaluate.plots`: the ROC and PR curves;
- :mod:`cxrtool.cli.evaluate`: the table on the screen (``render_table``).

Here: the report records, per-finding/macro/micro rows with intervals from arrays
(``compute_metrics``), and ``evaluate``, which joins, scores, plots and writes. The names
that moved are still importable from here.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cxrtool.data.labels import LabelTable, read_labels
from cxrtool.evaluate.joins import _match, _read_predictions
from cxrtool.evaluate.joins import recorded_thresholds as recorded_thresholds  # re-exported
from cxrtool.evaluate.metrics import (
    _THRESHOLD_METRICS,
    METRICS,
    _as_2d,
    auprc,
    auroc,
    bootstrap_ci,
    choose_thresholds,
    macro_average,
    micro_metrics,
    threshold_metrics,
)
from cxrtool.evaluate.plots import _plot_curves
from cxrtool.io.outputs import EVALUATION_FILES, atomic_write, write_csv
from cxrtool.registry import resolve_finding

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
    "threshold_metrics",
]


# --------------------------------------------------------------------------- report


@dataclass
class FindingMetrics:
    """One row of the report: a finding, or the "macro" / "micro" summary.

    ``n`` is the number of labelled images (for macro/micro: matched images), ``positives``
    the positive labels. ``ci`` maps each metric to its (low, high) bootstrap interval.
    """

    finding: str
    n: int
    positives: int
    threshold: float | None
    auroc: float
    auprc: float
    f1: float
    sensitivity: float
    specificity: float
    ppv: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ci"] = {k: list(v) for k, v in self.ci.items()}
        return _json_safe(data)


@dataclass
class EvaluationReport:
    """What ``evaluate`` computed and wrote.

    Attributes:
        findings: per-finding rows, in prediction-column order.
        macro: mean over findings with defined values.
        micro: all labelled (image, finding) pairs pooled.
        matching: counts of how prediction rows met label rows.
        notes: one-line remarks (undefined metrics, skipped columns...).
        paths: written files by kind ("json", "csv", "roc", "pr").
        settings: n_boot, seed, inputs.
    """

    findings: list[FindingMetrics]
    macro: FindingMetrics
    micro: FindingMetrics
    matching: dict[str, int]
    notes: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def thresholds(self) -> dict[str, float]:
        return {row.finding: float(row.threshold) for row in self.findings if row.threshold is not None}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (NaN becomes null, paths become strings)."""
        return _json_safe(
            {
                "findings": [row.to_dict() for row in self.findings],
                "macro": self.macro.to_dict(),
                "micro": self.micro.to_dict(),
                "thresholds": self.thresholds,
                "matching": dict(self.matching),
                "notes": list(self.notes),
                "paths": {k: str(v) for k, v in self.paths.items()},
                "settings": self.settings,
            }
        )


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def compute_metrics(
    y_true: Any,
    y_score: Any,
    findings: Sequence[str],
    thresholds: Any = 0.5,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[list[FindingMetrics], FindingMetrics, FindingMetrics, list[str]]:
    """Per-finding, macro and micro metrics with bootstrap intervals, from arrays.

    Returns:
        (rows, macro, micro, notes).

    Example:
        >>> rows, macro, micro, notes = compute_metrics(y, p, ["Effusion", "Mass"], n_boot=200)
        >>> rows[0].auroc, macro.ci["auroc"]
    """
    t, s, _ = _as_2d(y_true, y_score)
    if t.shape[1] != len(findings):
        raise ValueError(f"{len(findings)} finding names for {t.shape[1]} score columns")
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (t.shape[1],)).copy()
    ci = bootstrap_ci(t, s, thr, n_boot=n_boot, seed=seed)
    counts = threshold_metrics(t, s, thr)
    values = {"auroc": auroc(t, s), "auprc": auprc(t, s)}
    values.update({m: counts[m] for m in _THRESHOLD_METRICS})
    labelled = ~np.isnan(t)

    notes: list[str] = []
    rows: list[FindingMetrics] = []
    for f, name in enumerate(findings):
        n_f = int(labelled[:, f].sum())
        pos = int(np.sum(t[labelled[:, f], f] == 1))
        if pos == 0 or pos == n_f:
            what = "no labelled images" if n_f == 0 else ("no positive" if pos == 0 else "no negative")
            notes.append(f"{name}: {what} labels among {n_f} images; AUROC/AUPRC undefined")
        rows.append(
            FindingMetrics(
                finding=name,
                n=n_f,
                positives=pos,
                threshold=float(thr[f]),
                **{m: float(values[m][f]) for m in METRICS},
                ci={m: _pair(ci["per_finding"][m][f]) for m in METRICS},
            )
        )
    n_images = int(labelled.any(axis=1).sum())
    total_pos = int(np.sum(t == 1))
    macro = FindingMetrics(
        "macro", n_images, total_pos, None,
        **{m: macro_average(values[m]) for m in METRICS},
        ci={m: _pair(ci["macro"][m]) for m in METRICS},
    )
    micro_values = micro_metrics(t, s, thr)
    micro = FindingMetrics(
        "micro", n_images, total_pos, None,
        **micro_values,
        ci={m: _pair(ci["micro"][m]) for m in METRICS},
    )
    defined = int(np.sum(~np.isnan(values["auroc"])))
    if defined < len(findings):
        notes.append(f"macro AUROC averages {defined} of {len(findings)} findings (others undefined)")
    return rows, macro, micro, notes


def _pair(v: np.ndarray) -> tuple[float, float]:
    return (float(v[0]), float(v[1]))


# --------------------------------------------------------------------------- evaluate


def _atomic_write(path: Path, write: Callable[[io.IOBase], None], binary: bool = False) -> None:
    """Write through :func:`cxrtool.io.outputs.atomic_write` (temp file, then rename)."""
    kwargs: dict[str, Any] = {} if binary else {"encoding": "utf-8", "newline": ""}
    with atomic_write(path, "wb" if binary else "w", **kwargs) as fh:
        write(fh)


def _write_csv(path: Path, report: EvaluationReport) -> None:
    columns = ["finding", "n", "positives", "threshold"]
    for m in METRICS:
        columns += [m, f"{m}_ci_low", f"{m}_ci_high"]

    def fmt(v: float | None) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"

    def cells(row: Any) -> list[Any]:
        out = [row.finding, row.n, row.positives, fmt(row.threshold)]
        for m in METRICS:
            low, high = row.ci.get(m, (math.nan, math.nan))
            out += [fmt(getattr(row, m)), fmt(low), fmt(high)]
        return out

    write_csv(path, columns, (cells(row) for row in [*report.findings, report.macro, report.micro]))


def evaluate(
    predictions_csv: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    labels: str | os.PathLike[str] | LabelTable,
    *,
    model: str | os.PathLike[str] | None = None,
    labels_format: str = "auto",
    thresholds: Mapping[str, float] | float | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    uncertain: str = "ignore",
) -> EvaluationReport:
    """Score one model's predictions against a label file and write the report.

    Each prediction row stands for its study's path (the table's folder joined with its
    ``file``), and joins the label row whose path ends the same way: the file name, with
    parent folders breaking ties (``patient1/study1/view1_frontal.jpg`` in a CheXpert or
    MIMIC tree). Rows with a non-empty ``error`` or an empty probability are excluded and
    counted; prediction columns that are not label findings are ignored. Findings
    evaluated are those of the model that are also labelled, in the predictions' order.

    Decision thresholds, first found: ``thresholds``; the card of ``model`` when it is a
    checkpoint; those recorded beside the predictions for that model
    (``cxrtool_predictions.json``); else 0.5. ``report.settings["thresholds_from"]`` says
    which.

    Writes, atomically, to ``out_dir`` (default: the (first) predictions' folder):
    ``evaluation.json``, ``evaluation.csv``, ``roc_curves.png``, ``pr_curves.png``.

    Args:
        predictions_csv: cxrtool's predictions tables (``file`` + one probability column per
            finding): a CSV, a folder (every ``cxrtool_predictions.csv`` in it or below),
            or a list of them.
        labels: a label CSV (NIH, CheXpert/MIMIC-CXR-JPG or generic) or a LabelTable.
        model: whose rows to score when the tables hold several models' (required then):
            a checkpoint file, or a model's name or id as the tables list them.
        labels_format: "auto", "nih", "chexpert" or "generic".
        thresholds: one decision threshold, or one per finding; findings not in it use
            0.5.
        out_dir: where to write; created if needed.
        n_boot: bootstrap resamples for the 95% intervals (0 = none).
        seed: bootstrap seed.
        uncertain: CheXpert ``-1`` policy ("ignore", "positive", "negative").

    Returns:
        The EvaluationReport (``report.paths`` holds the written files).

    Raises:
        ValueError: no matching finding columns, no prediction matched a label row, several
            models and none chosen, or recorded thresholds that cannot be read.

    Example:
        >>> report = evaluate("preds/cxrtool_predictions.csv", "labels.csv", n_boot=1000)
        >>> report.macro.auroc, report.paths["json"], report.settings["thresholds_from"]
        (0.83, PosixPath('preds/evaluation.json'), 'recorded beside the predictions ...')
    """
    if isinstance(predictions_csv, (str, os.PathLike)):
        sources = [Path(predictions_csv)]
    else:
        sources = [Path(p) for p in predictions_csv]
    for source in sources:
        if not source.exists():
            raise FileNotFoundError(f"predictions file not found: {source}")
    pred_path = sources[0]
    card_thresholds, wanted = None, None
    if model is not None:
        wanted = str(model)
        if Path(model).is_file():  # a checkpoint or bundle: its rows, by its digest, and its thresholds
            from cxrtool.models.sources import identify

            wanted, card_thresholds = identify(model)
    if isinstance(labels, LabelTable):
        table = labels
        labels_name = f"<LabelTable {table.source}, {len(table)} rows>"
    else:
        # Evaluation needs labels, not pixels: keep rows whose images are elsewhere.
        table = read_labels(labels, fmt=labels_format, uncertain=uncertain, require_images=False)
        labels_name = str(labels)

    files, names, scores, counts, notes, chosen = _read_predictions(sources, table.findings, wanted)
    pred_rows, label_rows, match_counts = _match(files, table)
    counts.update(match_counts)
    if len(pred_rows) == 0:
        example_pred = PurePosixPath(files[0].replace("\\", "/")).name if files else "(none)"
        example_label = table.key_for(0) if len(table) else "(none)"
        raise ValueError(
            f"no prediction row matched a label row by file name (e.g. prediction "
            f"{example_pred!r}, label {example_label!r}; {counts['prediction_rows']} prediction "
            f"rows, {counts['error_rows']} with errors)"
        )
    for key, what in (
        ("unmatched_predictions", "prediction rows had no label row"),
        ("ambiguous_predictions", "prediction rows matched several label rows"),
        ("duplicate_predictions", "prediction rows repeated an already matched image"),
        ("repeated_label_rows", "label rows repeated an image listed before (its first row is its label)"),
        ("error_rows", "prediction rows had an error"),
        ("incomplete_rows", "prediction rows had no probabilities"),
    ):
        if counts.get(key):
            notes.append(f"{counts[key]} {what} and were excluded")

    label_column = {resolve_finding(f): i for i, f in enumerate(table.findings)}
    columns = [label_column[name] for name in names]
    y_true = table.targets[np.ix_(label_rows, columns)].astype(np.float64)
    y_score = scores[pred_rows]
    unscored = np.isnan(y_score) & ~np.isnan(y_true)
    if unscored.any():
        y_true[np.isnan(y_score)] = np.nan
        per = ", ".join(f"{names[j]} {int(n)}" for j, n in enumerate(unscored.sum(axis=0)) if n)
        notes.append(f"{int(unscored.sum())} labelled (study, finding) pairs had no probability (the model did not "
                     f"score that finding on that study, e.g. a bundle route without it) and were left out of that "
                     f"finding's metrics: {per}")
    if isinstance(thresholds, (int, float)):
        thresholds = {name: float(thresholds) for name in names}
    if thresholds is not None:
        source_of_thresholds = "given"
    elif card_thresholds is not None:
        thresholds, source_of_thresholds = card_thresholds, f"the checkpoint {model}"
    elif chosen is not None and chosen.thresholds:
        thresholds = chosen.thresholds
        source_of_thresholds = f"recorded beside the predictions for {chosen.model.name or 'the model'} (cxrtool_predictions.json)"
    else:
        source_of_thresholds = "0.5 (none given or recorded)"
    given = {resolve_finding(k): float(v) for k, v in (thresholds or {}).items()}
    thr = np.array([given.get(name, 0.5) for name in names], dtype=np.float64)
    missing_thr = [name for name in names if name not in given]
    if thresholds is not None and missing_thr:
        notes.append(f"threshold 0.5 used for {', '.join(missing_thr)} (not in the thresholds {source_of_thresholds})")

    rows, macro, micro, metric_notes = compute_metrics(
        y_true, y_score, names, thr, n_boot=n_boot, seed=seed
    )
    notes.extend(metric_notes)

    out = Path(out_dir) if out_dir is not None else (pred_path if pred_path.is_dir() else pred_path.parent)
    report = EvaluationReport(
        findings=rows,
        macro=macro,
        micro=micro,
        matching=counts,
        notes=notes,
        paths={key: out / name for key, name in EVALUATION_FILES.items()},
        settings={
            "predictions": ", ".join(str(p) for p in sources),
            "model": chosen.model.to_dict() if chosen is not None and chosen.model.sha256 else None,
            "thresholds_from": source_of_thresholds,
            "labels": labels_name,
            "labels_source": table.source,
            "n_boot": n_boot,
            "seed": seed,
            "uncertain": uncertain,
            "ci_level": 0.95,
            "threshold_rule": "positive when score >= threshold",
        },
    )
    _plot_curves(report.paths["roc"], "roc", y_true, y_score, rows)
    _plot_curves(report.paths["pr"], "pr", y_true, y_score, rows)
    _write_csv(report.paths["csv"], report)
    payload = json.dumps(report.to_dict(), indent=2, allow_nan=False)
    _atomic_write(report.paths["json"], lambda fh: fh.write(payload + "\n"))
    return report
