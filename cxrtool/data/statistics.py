"""Statistics of a label table that models use as priors."""

from __future__ import annotations

import numpy as np


def cooccurrence(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Conditional co-occurrence of findings, as in ML-GCN's adjacency: ``P[i, j]`` is
    P(finding j | finding i) = count(i and j) / count(i), over the images where both labels
    are known (NaN targets are left out pair by pair). The diagonal is 1.

    A finding that never occurs has a row of zeros (but its 1 on the diagonal): nothing is
    known of what comes with it. Returns ``(P, positives)``, positives the count per finding.

    Example:
        >>> P, n = cooccurrence(np.array([[1, 1], [1, 0], [0, 0]], dtype=float))
        >>> P[0, 1], P[1, 0]
        (0.5, 1.0)
    """
    t = np.asarray(targets, dtype=np.float64)
    if t.ndim != 2:
        raise ValueError(f"targets must be (images, findings), got shape {t.shape}")
    known = ~np.isnan(t)
    positive = np.where(known, t, 0.0) > 0.5
    both = positive.T.astype(np.float64) @ positive.astype(np.float64)  # count(i and j)
    # count(i) among the images where j is known too, so that P is a frequency on one set.
    base = positive.T.astype(np.float64) @ known.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conditional = np.where(base > 0, both / base, 0.0)
    np.fill_diagonal(conditional, 1.0)
    return conditional.astype(np.float32), positive.sum(0)
