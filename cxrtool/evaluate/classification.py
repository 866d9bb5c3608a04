"""Multi-label classification metrics, bootstrap intervals and the ``evaluate`` command.

Arrays follow one convention throughout: ``y_true`` is (N, F) with 1, 0 or NaN (NaN =
unknown, dropped per finding), ``y_score`` is (N, F) probabilities. 1-D inputs are one
finding. Undefined values (a finding with one class, a ratio with a zero denominator) are
NaN, never an exception.

Every metric is computed from per-image *weights*: all ones for the point estimate, bootstrap
resample counts for the intervals. One code path for both keeps intervals and point
estimates consistent, and lets a whole batch of resamples run as a few array operations.
"""

from __future__ import annotations

import csv
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
from cxrtool.io.outputs import EVALUATION_FILES, atomic_write
from cxrtool.io.records import IndexedModel, read_prediction_tables
from cxrtool.registry import THRESHOLD_METHODS, resolve_finding

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
    "render_table",
    "threshold_metrics",
]

# Metric names, in report order. The last four depend on the decision threshold.
METRICS: tuple[str, ...] = ("auroc", "auprc", "f1", "sensitivity", "specificity", "ppv")
_THRESHOLD_METRICS = ("f1", "sensitivity", "specificity", "ppv")
# Elements per bootstrap batch (resamples x rows): bounds memory near 100 MB at float64.
_BATCH_ELEMENTS = 2_000_000


# --------------------------------------------------------------------------- core kernels


def _as_2d(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    t = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(y_score, dtype=np.float64)
    one_d = t.ndim == 1
    if one_d:
        t, s = t[:, None], s[:, None]
    if t.ndim != 2 or t.shape != s.shape:
        raise ValueError(
            f"y_true and y_score must have the same (N, F) or (N,) shape, got "
            f"{np.shape(y_true)} and {np.shape(y_score)}"
        )
    bad = ~np.isnan(t) & (t != 0) & (t != 1)
    if bad.any():
        raise ValueError(f"y_true must hold 0, 1 or NaN, found {np.unique(t[bad])[:5].tolist()}")
    if np.isnan(s[~np.isnan(t)]).any():
        raise ValueError("y_score has NaN where y_true is labelled; drop those rows first")
    return t, s, one_d


class _Ranked:
    """One finding's labelled rows sorted by score, with tie groups, ready for weights."""

    def __init__(self, y: np.ndarray, s: np.ndarray, rows: np.ndarray) -> None:
        order = np.argsort(s, kind="mergesort")
        self.rows = rows[order]  # indices into the weight matrix's columns, ascending score
        self.y = y[order].astype(bool)
        self.s = s[order]
        new_group = np.empty(len(self.s), dtype=bool)
        if len(self.s):
            new_group[0] = True
            new_group[1:] = self.s[1:] != self.s[:-1]
        self.starts = np.flatnonzero(new_group)  # first index of each distinct score

    def stats(self, weights: np.ndarray, thresholds: np.ndarray | float) -> dict[str, np.ndarray]:
        """Metrics for each row of ``weights`` (B, n_images): arrays of shape (B,).

        ``thresholds`` is one float, or one per ranked row (micro-averaging pools findings
        with their own thresholds).
        """
        b = weights.shape[0]
        if len(self.rows) == 0:
            nan = np.full(b, np.nan)
            return {m: nan for m in METRICS} | {"n_pos": np.zeros(b), "n_neg": np.zeros(b)}
        w = weights[:, self.rows]
        pos_w = np.where(self.y, w, 0.0)
        # Per tie group: weighted positives P and negatives Nn, ascending score.
        p = np.add.reduceat(pos_w, self.starts, axis=1)
        nn = np.add.reduceat(w, self.starts, axis=1) - p
        total_p, total_n = p.sum(axis=1), nn.sum(axis=1)
        both = (total_p > 0) & (total_n > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            # AUROC = P(score_pos > score_neg) + 0.5 P(tie): Mann-Whitney with midranks.
            below = np.cumsum(nn, axis=1) - nn
            auc = np.sum(p * (below + 0.5 * nn), axis=1) / (total_p * total_n)
            # AP = sum over thresholds (descending) of recall step x precision there.
            tp_desc = np.cumsum(p[:, ::-1], axis=1)
            all_desc = np.cumsum((p + nn)[:, ::-1], axis=1)
            precision = np.divide(tp_desc, all_desc, out=np.zeros_like(tp_desc),
                                  where=all_desc > 0)
            ap = np.sum(p[:, ::-1] * precision, axis=1) / total_p
        auc = np.where(both, auc, np.nan)
        ap = np.where(both, ap, np.nan)

        predicted = self.s >= thresholds
        tp = w[:, predicted & self.y].sum(axis=1)
        fp = w[:, predicted & ~self.y].sum(axis=1)
        fn = total_p - tp
        tn = total_n - fp
        out = {"auroc": auc, "auprc": ap, "n_pos": total_p, "n_neg": total_n}
        out.update(_ratios(tp, fp, fn, tn))
        return out


def _ratios(tp: Any, fp: Any, fn: Any, tn: Any) -> dict[str, np.ndarray]:
    tp, fp, fn, tn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, tn))

    def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.full(np.broadcast(a, b).shape, np.nan), where=b > 0)

    return {
        "f1": div(2 * tp, 2 * tp + fp + fn),
        "sensitivity": div(tp, tp + fn),
        "specificity": div(tn, tn + fp),
        "ppv": div(tp, tp + fp),
    }


def _rank_findings(t: np.ndarray, s: np.ndarray) -> list[_Ranked]:
    ranked = []
    for f in range(t.shape[1]):
        rows = np.flatnonzero(~np.isnan(t[:, f]))
        ranked.append(_Ranked(t[rows, f], s[rows, f], rows))
    return ranked


def _rank_pooled(t: np.ndarray, s: np.ndarray, thresholds: np.ndarray) -> tuple[_Ranked, np.ndarray]:
    """All labelled (image, finding) pairs as one problem, for micro-averaging."""
    rows, cols = np.nonzero(~np.isnan(t))
    ranked = _Ranked(t[rows, cols], s[rows, cols], rows)
    # Each pair keeps its own finding's threshold; _Ranked sorted the pairs, so sort these.
    order = np.argsort(s[rows, cols], kind="mergesort")
    return ranked, thresholds[cols][order]


def _per_finding(func: Callable[[_Ranked], float], y_true: Any, y_score: Any) -> np.ndarray | float:
    t, s, one_d = _as_2d(y_true, y_score)
    values = np.array([func(r) for r in _rank_findings(t, s)], dtype=np.float64)
    return float(values[0]) if one_d else values


def _point(ranked: _Ranked, n_images: int, thresholds: np.ndarray | float = 0.5) -> dict[str, float]:
    stats = ranked.stats(np.ones((1, n_images)), thresholds)
    return {k: float(v[0]) for k, v in stats.items()}


# --------------------------------------------------------------------------- public metrics


def auroc(y_true: Any, y_score: Any) -> np.ndarray | float:
    """Area under the ROC curve per finding (rank-based, ties count one half).

    Rows whose label is NaN are dropped per finding; a finding with only one class gives
    NaN. Equals ``sklearn.metrics.roc_auc_score`` on each finding's labelled rows.

    Args:
        y_true: (N, F) or (N,) of 1, 0, NaN.
        y_score: same shape, scores.

    Returns:
        (F,) float64 array, or a float for 1-D input.

    Example:
        >>> auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    return _per_finding(lambda r: _point(r, _n_cols(r))["auroc"], y_true, y_score)


def auprc(y_true: Any, y_score: Any) -> np.ndarray | float:
    """Average precision per finding (area under the step PR curve, no interpolation).

    Same definition as ``sklearn.metrics.average_precision_score``; NaN rows are dropped
    per finding, and a finding with one class gives NaN.

    Example:
        >>> round(auprc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), 4)
        0.8333
    """
    return _per_finding(lambda r: _point(r, _n_cols(r))["auprc"], y_true, y_score)


def _n_cols(r: _Ranked) -> int:
    return int(r.rows.max()) + 1 if len(r.rows) else 0


def threshold_metrics(
    y_true: Any, y_score: Any, thresholds: Any = 0.5
) -> dict[str, np.ndarray]:
    """F1, sensitivity, specificity, PPV and the confusion counts at thresholds.

    A score counts as positive when ``score >= threshold``. Undefined ratios are NaN.

    Args:
        y_true: (N, F) of 1, 0, NaN (or (N,)).
        y_score: same shape.
        thresholds: one float for all findings, or (F,).

    Returns:
        dict of (F,) arrays: f1, sensitivity, specificity, ppv, tp, fp, fn, tn.

    Example:
        >>> threshold_metrics([[1], [0], [1]], [[0.9], [0.6], [0.2]], 0.5)["sensitivity"]
        array([0.5])
    """
    t, s, _ = _as_2d(y_true, y_score)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (t.shape[1],))
    labelled = ~np.isnan(t)
    predicted = s >= thr
    positive = labelled & (t == 1)
    negative = labelled & (t == 0)
    counts = {
        "tp": np.sum(positive & predicted, axis=0).astype(np.float64),
        "fp": np.sum(negative & predicted, axis=0).astype(np.float64),
        "fn": np.sum(positive & ~predicted, axis=0).astype(np.float64),
        "tn": np.sum(negative & ~predicted, axis=0).astype(np.float64),
    }
    return _ratios(counts["tp"], counts["fp"], counts["fn"], counts["tn"]) | counts


def macro_average(values: Any) -> float:
    """Mean over findings whose value is defined (NaN skipped); NaN when none is.

    Example:
        >>> macro_average([0.8, float("nan"), 0.6])
        0.7
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


def micro_metrics(y_true: Any, y_score: Any, thresholds: Any = 0.5) -> dict[str, float]:
    """Metrics over all labelled (image, finding) pairs pooled as one binary problem.

    Each pair is thresholded with its own finding's threshold.

    Example:
        >>> micro_metrics(y_true, y_score, thresholds)["auroc"]
        0.81...
    """
    t, s, _ = _as_2d(y_true, y_score)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (t.shape[1],)).copy()
    pooled, pair_thr = _rank_pooled(t, s, thr)
    stats = _point(pooled, t.shape[0], pair_thr)
    return {m: stats[m] for m in METRICS}


def choose_thresholds(y_true: Any, y_score: Any, method: str = "f1") -> np.ndarray:
    """Per-finding decision thresholds: F1-maximising ("f1") or Youden's J ("youden").

    Candidates are the distinct scores (predict positive when ``score >= t``); the returned
    value is halfway to the next lower distinct score, which scores the same on these data
    and sits away from any one image. Findings without both classes get 0.5.

    Args:
        y_true: (N, F) of 1, 0, NaN (or (N,)).
        y_score: same shape.
        method: "f1" or "youden".

    Returns:
        (F,) float64 thresholds (a 1-element array for 1-D input).

    Example:
        >>> choose_thresholds([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        array([0.225])
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {method!r}; choose one of {', '.join(THRESHOLD_METHODS)}")
    t, s, _ = _as_2d(y_true, y_score)
    out = np.full(t.shape[1], 0.5)
    for f, r in enumerate(_rank_findings(t, s)):
        n_pos = int(r.y.sum())
        n_neg = len(r.y) - n_pos
        if n_pos == 0 or n_neg == 0:  # nothing to tell apart: no choice to make
            continue
        # Cumulative counts at each distinct score, descending: predicting groups 0..k.
        p = np.add.reduceat(r.y.astype(np.float64), r.starts)[::-1]
        tot = np.diff(np.append(r.starts, len(r.y)))[::-1].astype(np.float64)
        tp = np.cumsum(p)
        fp = np.cumsum(tot) - tp
        if method == "f1":
            score = 2 * tp / (n_pos + tp + fp)  # 2tp / (2tp + fp + fn), fn = n_pos - tp
        else:
            score = tp / n_pos - fp / n_neg
        k = int(np.argmax(score))  # first maximum = highest threshold among equals
        distinct = r.s[r.starts][::-1]  # descending distinct scores
        out[f] = (distinct[k] + distinct[k + 1]) / 2 if k + 1 < len(distinct) else distinct[k]
    return out


def bootstrap_ci(
    y_true: Any,
    y_score: Any,
    thresholds: Any = 0.5,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, np.ndarray]]:
    """Percentile bootstrap intervals, resampling images (all findings resampled together).

    Resamples where a finding has a single class are skipped for that finding's AUROC and
    AUPRC (and for the macro averages); ratios undefined in a resample are skipped likewise.
    Work is batched over resamples as count-weight matrices, so 1000 resamples of 14
    findings x a few thousand images take about a second.

    Args:
        y_true: (N, F) of 1, 0, NaN.
        y_score: (N, F).
        thresholds: float or (F,), for the threshold metrics.
        n_boot: number of resamples.
        seed: RNG seed; the same seed gives the same intervals.
        level: coverage of the interval.

    Returns:
        ``{"per_finding": {metric: (F, 2)}, "macro": {metric: (2,)}, "micro": {metric: (2,)},
        "valid": {metric: (F,) count of resamples used}}``; NaN bounds where no resample
        (or n_boot=0) was usable.

    Example:
        >>> ci = bootstrap_ci(y_true, y_score, n_boot=1000, seed=0)
        >>> ci["per_finding"]["auroc"][0]
        array([0.71, 0.88])
    """
    t, s, _ = _as_2d(y_true, y_score)
    n, n_f = t.shape
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (n_f,)).copy()
    ranked = _rank_findings(t, s)
    pooled, pair_thr = _rank_pooled(t, s, thr)

    samples = {m: np.full((n_boot, n_f), np.nan) for m in METRICS}
    micro = {m: np.full(n_boot, np.nan) for m in METRICS}
    if n_boot > 0 and n > 0:
        rng = np.random.default_rng(seed)
        batch = max(1, min(n_boot, _BATCH_ELEMENTS // max(1, len(pooled.rows), n)))
        for start in range(0, n_boot, batch):
            b = min(batch, n_boot - start)
            # Resample counts per image: bincount of flattened (resample, image) draws.
            draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
            weights = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
            for f, r in enumerate(ranked):
                stats = r.stats(weights, thr[f])
                for m in METRICS:
                    samples[m][start : start + b, f] = stats[m]
            stats = pooled.stats(weights, pair_thr)
            for m in METRICS:
                micro[m][start : start + b] = stats[m]

    # Macro per resample over the findings defined in the point estimate; a resample where
    # one of them is undefined is skipped rather than averaged over fewer findings.
    point = {m: np.array([_point(r, n, thr[f])[m] for f, r in enumerate(ranked)]) for m in METRICS}
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out: dict[str, dict[str, np.ndarray]] = {"per_finding": {}, "macro": {}, "micro": {}, "valid": {}}
    for m in METRICS:
        out["per_finding"][m] = np.stack([_percentile(samples[m][:, f], q) for f in range(n_f)]) \
            if n_f else np.zeros((0, 2))
        out["valid"][m] = np.sum(~np.isnan(samples[m]), axis=0)
        defined = ~np.isnan(point[m])
        if defined.any():
            sub = samples[m][:, defined]
            ok = ~np.isnan(sub).any(axis=1)
            macro = np.full(n_boot, np.nan)
            macro[ok] = sub[ok].mean(axis=1)
        else:
            macro = np.full(n_boot, np.nan)
        out["macro"][m] = _percentile(macro, q)
        out["micro"][m] = _percentile(micro[m], q)
    return out


def _percentile(values: np.ndarray, q: Sequence[float]) -> np.ndarray:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return np.array([np.nan, np.nan])
    return np.percentile(v, q)


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


_NOT_FINDINGS = {"file", "model", "model_id", "view_position", "error", "path"}


def _read_predictions(
    sources: Sequence[Path], label_findings: Sequence[str], model: str | None
) -> tuple[list[str], list[str], np.ndarray, dict[str, int], list[str], IndexedModel | None]:
    """Read cxrtool's predictions tables: each row's study path, the evaluated findings,
    the scores, counts, notes, and the model whose rows they are."""
    for path in sources:
        if path.is_file():
            with open(path, encoding="utf-8-sig", newline="") as fh:
                header = next(csv.reader(fh), None)
            if header is None:
                raise ValueError(f"{path}: empty predictions file, expected a header")
            if "file" not in [h.strip().lower() for h in header]:
                raise ValueError(f"{path.name}: predictions need a 'file' column; header has {header[:8]}")
    tables = read_prediction_tables(sources)
    chosen = tables.choose(model)
    rows = tables.rows_of(chosen)
    where = ", ".join(p.name for p in tables.sources[:3]) + (" ..." if len(tables.sources) > 3 else "")
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(c.strip() for c in row if c and c.strip().lower() not in _NOT_FINDINGS))
    if chosen is not None and chosen.findings:
        columns = {c: None for c in columns if resolve_finding(c) in {resolve_finding(f) for f in chosen.findings}}
    known = {resolve_finding(f) for f in label_findings}  # one name per finding, whichever data set spelled it
    cols = [c for c in columns if resolve_finding(c) in known]
    names = [resolve_finding(c) for c in cols]
    if not cols:
        raise ValueError(
            f"{where}: no prediction column matches a label finding (prediction columns: {list(columns)[:10]}; "
            f"label findings: {list(label_findings)[:10]})"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: duplicate finding columns {names}")
    files: list[str] = []
    scores: list[list[float]] = []
    counts = {"prediction_rows": 0, "error_rows": 0, "incomplete_rows": 0}
    for row in rows:
        if not any((value or "").strip() for key, value in row.items() if key != "path"):
            continue
        counts["prediction_rows"] += 1
        if (row.get("error") or "").strip():
            counts["error_rows"] += 1
            continue
        cells = [(row.get(c) or "").strip() for c in cols]
        try:
            values = [float(c) if c else math.nan for c in cells]
        except ValueError:
            raise ValueError(f"{where}: probabilities must be numbers, got {cells} for {row.get('file')}") from None
        if all(math.isnan(v) for v in values):
            counts["incomplete_rows"] += 1
            continue
        # Some empty: findings this study was not scored for (a bundle's route without
        # them); they are left out of those findings' metrics only.
        files.append(row["path"])
        scores.append(values)
    notes = []
    ignored = [c for c in columns if c not in cols]
    if ignored:
        notes.append(f"prediction columns not evaluated: {', '.join(ignored)}")
    if len(tables.models) > 1 and chosen is not None:
        notes.append(f"rows of model {chosen.model.name or '?'} (id {chosen.model.id}) of the "
                     f"{len(tables.models)} models in the predictions")
    array = np.asarray(scores, dtype=np.float64).reshape(len(files), len(names))
    return files, names, array, counts, notes, chosen


def _path_parts(path: str) -> list[str]:
    # Plain string splitting: PurePosixPath per row costs seconds over 112,120 NIH rows.
    return [p for p in path.replace("\\", "/").split("/") if p]


def _match(files: Sequence[str], table: LabelTable) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Join prediction files to label rows on the file name.

    File names are unique in NIH-style data, but not in CheXpert (``view1_frontal.jpg``
    in every study), so an ambiguous name is retried with its parent folders until one
    label row matches.
    """
    by_name: dict[str, list[int]] = {}
    for i, image in enumerate(table.images):
        by_name.setdefault(image.replace("\\", "/").rpartition("/")[2], []).append(i)
    label_parts: dict[int, tuple[str, ...]] = {}  # only for rows whose name repeats

    def suffix(i: int, depth: int) -> tuple[str, ...]:
        if i not in label_parts:
            label_parts[i] = tuple(_path_parts(table.images[i]))
        return label_parts[i][-depth:]

    pred_rows: list[int] = []
    label_rows: list[int] = []
    seen: set[int] = set()
    counts = {"unmatched_predictions": 0, "ambiguous_predictions": 0, "duplicate_predictions": 0}
    for p, file in enumerate(files):
        parts = _path_parts(file)
        candidates = by_name.get(parts[-1], []) if parts else []
        several = len(candidates) > 1
        depth = 1
        while len(candidates) > 1 and depth < len(parts):
            depth += 1
            want = tuple(parts[-depth:])
            candidates = [i for i in candidates if suffix(i, depth) == want]
        if len(candidates) != 1:
            counts["ambiguous_predictions" if candidates or several else "unmatched_predictions"] += 1
            continue
        hit = candidates[0]
        if hit in seen:
            counts["duplicate_predictions"] += 1
            continue
        seen.add(hit)
        pred_rows.append(p)
        label_rows.append(hit)
    counts["matched"] = len(pred_rows)
    counts["labels_without_prediction"] = len(table) - len(seen)
    return np.asarray(pred_rows, dtype=np.int64), np.asarray(label_rows, dtype=np.int64), counts


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

    def write(fh: Any) -> None:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in [*report.findings, report.macro, report.micro]:
            out = [row.finding, row.n, row.positives, fmt(row.threshold)]
            for m in METRICS:
                low, high = row.ci.get(m, (math.nan, math.nan))
                out += [fmt(getattr(row, m)), fmt(low), fmt(high)]
            writer.writerow(out)

    _atomic_write(path, write)


def _plot_curves(
    path: Path, kind: str, t: np.ndarray, s: np.ndarray, rows: Sequence[FindingMetrics]
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
    _atomic_write(path, lambda fh: fig.savefig(fh, format="png"), binary=True)


def _curve_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC and PR points at each distinct score, from (0, 0): fpr, tpr (= recall), precision.

    Computed here rather than with sklearn's curve functions: importing sklearn costs
    seconds, which the CLI would pay on every evaluate.
    """
    r = _Ranked(y, p, np.arange(len(y)))
    pos = np.add.reduceat(r.y.astype(np.float64), r.starts)[::-1]
    tot = np.diff(np.append(r.starts, len(r.y)))[::-1].astype(np.float64)
    tps, alls = np.cumsum(pos), np.cumsum(tot)
    fps = alls - tps
    precision = np.r_[1.0, tps / alls]
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]], precision


def _palette(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


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
            from cxrtool.models.scoring import identify

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


def render_table(report: EvaluationReport) -> Any:
    """A rich Table of the report for the terminal.

    Columns: finding, n, pos, AUROC [95% CI], AUPRC, F1, Sens, Spec, threshold; macro and
    micro rows at the bottom.

    Example:
        >>> from rich.console import Console
        >>> Console().print(render_table(report))
    """
    from rich.table import Table

    def num(v: float | None, digits: int = 3) -> str:
        return "—" if v is None or math.isnan(v) else f"{v:.{digits}f}"

    table = Table(title="Classification metrics", title_justify="left")
    table.add_column("Finding", style="bold")
    for name in ("n", "pos"):
        table.add_column(name, justify="right")
    table.add_column("AUROC [95% CI]", justify="right")
    for name in ("AUPRC", "F1", "Sens", "Spec", "Thr"):
        table.add_column(name, justify="right")
    rows = [*report.findings, report.macro, report.micro]
    for k, row in enumerate(rows):
        low, high = row.ci.get("auroc", (math.nan, math.nan))
        ci = "" if math.isnan(low) else f" [{low:.3f}–{high:.3f}]"
        table.add_row(
            row.finding,
            str(row.n),
            str(row.positives),
            num(row.auroc) + ci,
            num(row.auprc),
            num(row.f1),
            num(row.sensitivity),
            num(row.specificity),
            num(row.threshold, 2),
            end_section=k == len(report.findings) - 1,
            style="italic" if row.finding in ("macro", "micro") else None,
        )
    return table


def recorded_thresholds(predictions_csv: str | os.PathLike[str], model: str | None = None) -> dict[str, float] | None:
    """The decision thresholds ``predict`` recorded beside a predictions table for a model
    (a name or id; may be left out when one model is recorded), or None when none are.

    Raises:
        ValueError: a recorded index that cannot be read, or several models and none chosen.
    """
    from cxrtool.io.records import PredictionTable, read_index

    entries = read_index(Path(predictions_csv))
    if not entries:
        return None
    chosen = PredictionTable([], {entry.model.id: entry for entry in entries}, []).choose(model)
    return dict(chosen.thresholds) if chosen is not None else None
