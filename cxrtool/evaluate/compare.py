"""Is one model better than another on the same test items? A paired bootstrap.

Two models (or two training recipes, each trained with several seeds) scored on the same
test images give paired results: resampling the images once and recomputing both models'
metric on that resample keeps the pairing, so the interval is of the *difference*, which is
far narrower than the two models' own intervals side by side. With several seeds, each
resample's difference is the mean over the seeds of the variant's metric minus the
baseline's of the same seed, so the interval covers the test images' noise of the
seed-averaged difference. (Averaging each run's own interval endpoints, as the first
ablation did, is an interval of nothing.)

Example:
    >>> from cxrtool.evaluate.compare import paired_bootstrap, seed_averaged
    >>> difference = seed_averaged(mean_auroc, targets, baseline_scores, variant_scores)
    >>> found = paired_bootstrap(difference, len(targets), n_boot=1000, seed=0)
    >>> found.low > 0  # the variant helps only where the interval excludes 0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedDifference", "paired_bootstrap", "seed_averaged"]


@dataclass(frozen=True)
class PairedDifference:
    """A difference (variant minus baseline) with its percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    resamples: int  # resamples where the difference was defined

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def verdict(self) -> str:
        """"better" or "worse" where the interval excludes 0, else "no difference shown"."""
        if not self.excludes_zero:
            return "no difference shown"
        return "better" if self.low > 0 else "worse"

    def to_dict(self) -> dict[str, float | int | str]:
        return {"difference": self.estimate, "low": self.low, "high": self.high, "resamples": self.resamples,
                "verdict": self.verdict()}


def paired_bootstrap(difference: Callable[[np.ndarray], float], n_items: int, *, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> PairedDifference:
    """The point estimate ``difference(arange(n_items))`` and a percentile interval over
    ``n_boot`` resamples of the items with replacement.

    ``difference(index)`` computes the paired difference on the items at ``index`` (with
    repeats), the same items for both sides. The resamples are drawn as
    ``numpy.random.default_rng(seed).integers(0, n_items, n_items)``, one call per resample
    in order; a resample whose difference is NaN (a finding with one class in it, say) is
    left out and counted.
    """
    if n_items < 1:
        raise ValueError("a paired bootstrap needs at least one item")
    estimate = float(difference(np.arange(n_items)))
    rng = np.random.default_rng(seed)
    values = np.array([difference(rng.integers(0, n_items, n_items)) for _ in range(n_boot)], dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return PairedDifference(estimate, float("nan"), float("nan"), 0)
    low, high = np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return PairedDifference(estimate, float(low), float(high), int(values.size))


def seed_averaged(metric: Callable[[np.ndarray, np.ndarray], float], targets: np.ndarray,
                  baseline: Sequence[np.ndarray], variant: Sequence[np.ndarray]) -> Callable[[np.ndarray], float]:
    """The difference function for :func:`paired_bootstrap`: on the items at ``index``, the
    mean over seeds of ``metric(targets, variant_s) - metric(targets, baseline_s)``.

    ``baseline`` and ``variant`` hold one score array per seed, items first, in the same
    order as ``targets``; seed s of the variant is paired with seed s of the baseline.
    """
    if len(baseline) != len(variant) or not baseline:
        raise ValueError(f"pair each seed: {len(baseline)} baseline runs against {len(variant)} of the variant")

    def difference(index: np.ndarray) -> float:
        t = targets[index]
        return float(np.mean([metric(t, v[index]) - metric(t, b[index]) for b, v in zip(baseline, variant, strict=True)]))

    return difference
