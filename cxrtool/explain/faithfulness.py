"""Does a map explain the model? Perturbation and randomisation measures of a saliency map.

A map can look plausible and still describe nothing the network uses. Three checks, each
computed with the model itself on the input grid:

- **deletion and insertion** (Petsiuk, Das and Saenko, RISE, BMVC 2018): remove the map's
  most salient pixels first, a fraction at a time, and follow the finding's probability;
  a faithful map makes it fall fast (a low area under the deletion curve). Insertion starts
  from an image with the evidence removed and puts back the most salient pixels first; a
  faithful map makes the probability rise fast (a high area under the insertion curve).
  "Removed" means replaced by a heavily blurred copy of the same image, which keeps the
  film's exposure and the body's outline but takes out lesions, edges and texture (the
  blurred canvas RISE starts its insertion from; used for deletion too, so that the two
  curves have the same end points and no black hole in the lung becomes evidence of its
  own). The score this module reports is **insertion AUC minus deletion AUC**: higher is
  more faithful, 0 is a map no better than no map at its end points.
- **occlusion of a region**: the change of the finding's logit when one region (the true
  box, or a box of the same size on the map's peak) is filled in from its surroundings
  (OpenCV's Telea inpainting): which region does the network use?
- **model randomisation** (Adebayo et al., "Sanity checks for saliency maps", NeurIPS
  2018): re-initialise every weight and compute the map again; a map that barely changes
  (a high rank correlation with the trained model's) shows the image, not the model.

Everything here takes a ``score`` function from fitted squares (N, S, S) in [0, 1] to one
finding's scores (N,), so any model and any preprocessing fit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

Score = Callable[[np.ndarray], np.ndarray]  # (N, S, S) squares in [0, 1] -> (N,) scores
DEFAULT_STEPS = 16
BORDER_FRACTION = 0.1  # the film's outer tenth on every side: the "border band"
# A map passes the randomisation check when its median rank correlation with the map of the
# randomised model stays below this.
RANDOMISATION_PASS = 0.5


def removed_canvas(square: np.ndarray) -> np.ndarray:
    """The image with its evidence taken out: a Gaussian blur of sigma 1/8 of its side."""
    return cv2.GaussianBlur(square.astype(np.float32), (0, 0), square.shape[0] / 8.0)


def salience_order(saliency: np.ndarray) -> np.ndarray:
    """Pixel indices (of the flattened map) from the most to the least salient; ties in
    scan order, so that a constant map removes pixels row by row."""
    return np.argsort(-saliency.ravel(), kind="stable")


@dataclass(frozen=True)
class Curve:
    """Scores after removing (or inserting) each fraction of the pixels."""

    fractions: np.ndarray
    scores: np.ndarray

    @property
    def auc(self) -> float:
        """Area under the curve over fractions 0..1 (trapezoids)."""
        y, x = self.scores, self.fractions
        return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def deletion_insertion(score: Score, square: np.ndarray, saliency: np.ndarray, *,
                       steps: int = DEFAULT_STEPS, canvas: np.ndarray | None = None) -> tuple[Curve, Curve]:
    """The deletion and insertion curves of one map (same grid as ``square``).

    Step k of ``steps`` replaces (deletion) or restores (insertion) the ``k / steps`` most
    salient share of the pixels; all ``2 * (steps + 1)`` images are scored in one call.
    """
    if saliency.shape != square.shape:
        raise ValueError(f"map {saliency.shape} and image {square.shape} differ in shape")
    canvas = removed_canvas(square) if canvas is None else canvas
    order = salience_order(saliency)
    n = order.size
    counts = np.round(np.linspace(0, n, steps + 1)).astype(int)
    flat, empty = square.ravel(), canvas.ravel()
    deleted = np.empty((steps + 1, n), dtype=np.float32)
    inserted = np.empty((steps + 1, n), dtype=np.float32)
    for k, count in enumerate(counts):
        chosen = order[:count]
        deleted[k] = flat
        deleted[k, chosen] = empty[chosen]
        inserted[k] = empty
        inserted[k, chosen] = flat[chosen]
    images = np.concatenate([deleted, inserted]).reshape(2 * (steps + 1), *square.shape)
    scores = np.asarray(score(images), dtype=np.float64)
    fractions = counts / n
    return Curve(fractions, scores[: steps + 1]), Curve(fractions, scores[steps + 1:])


def faithfulness(score: Score, square: np.ndarray, saliency: np.ndarray, *, steps: int = DEFAULT_STEPS) -> dict:
    """Deletion AUC, insertion AUC and their difference (the score; higher is better)."""
    deletion, insertion = deletion_insertion(score, square, saliency, steps=steps)
    return {"deletion_auc": round(deletion.auc, 4), "insertion_auc": round(insertion.auc, 4),
            "score": round(insertion.auc - deletion.auc, 4), "steps": steps}


def occlusion_drop(score: Score, square: np.ndarray, region: np.ndarray) -> float:
    """How much the score falls when ``region`` (a boolean mask) is inpainted from its
    surroundings: positive when the region held evidence for the finding."""
    as_bytes = np.round(np.clip(square, 0, 1) * 255).astype(np.uint8)
    painted = cv2.inpaint(as_bytes, region.astype(np.uint8), 5, cv2.INPAINT_TELEA).astype(np.float32) / 255.0
    filled = np.where(region, painted, square).astype(np.float32)  # the rest of the image exactly as it was
    before, after = np.asarray(score(np.stack([square.astype(np.float32), filled])), dtype=np.float64)
    return float(before - after)


def box_mask(shape: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """A boolean mask of an [x, y, w, h] box on a grid (at least one pixel)."""
    x, y, w, h = box
    mask = np.zeros(shape, dtype=bool)
    x0, y0 = int(np.floor(max(0.0, x))), int(np.floor(max(0.0, y)))
    x1, y1 = max(x0 + 1, int(np.ceil(min(shape[1], x + w)))), max(y0 + 1, int(np.ceil(min(shape[0], y + h))))
    mask[y0:y1, x0:x1] = True
    return mask


def in_border_band(point: tuple[float, float], shape: tuple[int, int], fraction: float = BORDER_FRACTION) -> bool:
    """Whether an (x, y) pixel lies in the film's outer ``fraction`` on any side."""
    x, y = point
    height, width = shape
    return x < fraction * width or x >= (1 - fraction) * width or y < fraction * height or y >= (1 - fraction) * height


def border_band_share(fraction: float = BORDER_FRACTION) -> float:
    """The share of the film's area in its border band: 1 - (1 - 2 * fraction) ** 2."""
    return 1.0 - (1.0 - 2.0 * fraction) ** 2


def rank_correlation(a: np.ndarray, b: np.ndarray, side: int = 32) -> float:
    """Spearman's rank correlation of two maps, compared on a ``side`` x ``side`` grid
    (an upsampled map's neighbouring pixels would count one cell many times)."""
    from scipy.stats import spearmanr

    small = [cv2.resize(m.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA).ravel() for m in (a, b)]
    if np.ptp(small[0]) == 0 or np.ptp(small[1]) == 0:
        return 0.0  # a constant map ranks nothing: no evidence of agreement
    return float(spearmanr(small[0], small[1]).statistic)


def randomised_copy(network, seed: int = 0):
    """A copy of ``network`` with every weight re-initialised (each module's own
    ``reset_parameters``, batch-norm statistics included), seeded; the original is untouched."""
    import torch

    clone = copy.deepcopy(network)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            reset_stats = getattr(module, "reset_running_stats", None)
            if callable(reset_stats):
                reset_stats()
    finally:
        torch.random.set_rng_state(generator_state)
    return clone.eval()


@dataclass(frozen=True)
class RandomisationCheck:
    """Rank correlations between each map and its randomised model's; the check passes
    when their median magnitude is below :data:`RANDOMISATION_PASS`."""

    correlations: np.ndarray

    @property
    def median(self) -> float:
        return float(np.median(np.abs(self.correlations))) if self.correlations.size else float("nan")

    @property
    def passed(self) -> bool:
        return bool(self.median < RANDOMISATION_PASS)


def randomisation_check(trained: list[np.ndarray], randomised: list[np.ndarray]) -> RandomisationCheck:
    """Compare maps of the same (image, finding) pairs from the trained and the randomised model."""
    if len(trained) != len(randomised):
        raise ValueError(f"{len(trained)} trained maps against {len(randomised)} randomised ones")
    return RandomisationCheck(np.array([rank_correlation(a, b) for a, b in zip(trained, randomised, strict=True)]))
