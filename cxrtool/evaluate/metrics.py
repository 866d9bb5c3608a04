"""Metric kernels for multi-label classification: AUROC, AUPRC, threshold metrics, macro and
micro averages, decision thresholds and bootstrap intervals, from arrays.

Arrays follow one convention throughout: ``y_true`` is (N, F) with 1, 0 or NaN (NaN =
unknown, dropped per finding), ``y_score`` is (N, F) probabilities. 1-D inputs are one
finding. Undefined values (a finding with one class, a ratio with a zero denominator) are
NaN, never an exception.

Every metric is computed from per-image *weights*: all ones for the point estimate, bootstrap
resample counts for the intervals. One code path for both keeps intervals and point
estimates consistent, and lets a whole batch of resamples run as a few array operations.

A leaf: numpy and the registry only, so training imports it without the report, the label
readers, matplotlib or rich (:mod:`cxrtool.evaluate.classification` builds the report on it).

Example:
    >>> from cxrtool.evaluate.metrics import auroc, choose_thresholds
    >>> auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cxrtool.registry import THRESHOLD_METHODS

__all__ = [
    "METRICS",
    "auprc",
    "auroc",
    "bootstrap_ci",
    "choose_thresholds",
    "macro_average",
    "micro_metrics",
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


# --------------------------------------------------------------------------- curves


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
