"""Patient-level train/validation splits of a label table: :func:`patient_split`."""

from __future__ import annotations

import numpy as np

from cxrtool.data.labels.table import LabelTable


def patient_split(
    table: LabelTable, *, val_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into train and validation by patient (no patient on both sides).

    Patients are shuffled with ``seed``; about ``val_fraction`` of them (at least one, and
    at least one left for training) go to validation. Before filling up in shuffled order,
    each finding with at least two positive patients gets one positive patient in
    validation (rarest findings first, while room remains and one positive patient stays
    in training), so every such finding can be scored on validation.

    Args:
        table: the labels.
        val_fraction: share of patients for validation, in (0, 1).
        seed: shuffling seed; the same seed gives the same split.

    Returns:
        (train_idx, val_idx): sorted int64 row indices into ``table``.

    Raises:
        ValueError: fewer than 2 patients, or val_fraction outside (0, 1).

    Example:
        >>> train_idx, val_idx = patient_split(table, val_fraction=0.2, seed=1)
        >>> train, val = table.subset(train_idx), table.subset(val_idx)
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    unique, inverse = np.unique(np.asarray(table.patients, dtype=object).astype(str),
                                return_inverse=True)
    n_patients = len(unique)
    if n_patients < 2:
        raise ValueError(f"a patient-level split needs at least 2 patients, got {n_patients}")
    n_val = min(max(1, int(round(val_fraction * n_patients))), n_patients - 1)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_patients)  # shuffled patient ids; np.unique made them sorted
    rank = np.empty(n_patients, dtype=np.int64)
    rank[order] = np.arange(n_patients)

    # positive[p, f]: patient p has at least one row positive for finding f.
    positive = np.zeros((n_patients, len(table.findings)), dtype=bool)
    if len(table):
        np.logical_or.at(positive, inverse, table.targets == 1)
    n_pos = positive.sum(axis=0)

    in_val = np.zeros(n_patients, dtype=bool)
    for f in np.argsort(n_pos, kind="stable"):  # rarest first: they have the fewest options
        if in_val.sum() >= n_val:
            break
        if n_pos[f] < 2 or (positive[:, f] & in_val).any():
            continue
        # None of f's >= 2 positive patients is in validation yet, so taking one still
        # leaves training at least one.
        candidates = np.flatnonzero(positive[:, f])
        in_val[candidates[np.argmin(rank[candidates])]] = True
    for p in order:
        if in_val.sum() >= n_val:
            break
        in_val[p] = True

    val_rows = in_val[inverse]
    return np.flatnonzero(~val_rows).astype(np.int64), np.flatnonzero(val_rows).astype(np.int64)
