"""Training datasets over a label table: read -> fit to the input square -> augment.

The same :mod:`cxrtool.preprocess` functions as ``predict`` make the inputs, so training
and inference cannot drift apart. Augmentation is seeded per (seed, epoch, image): a run
resumed after an interruption sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from cxrtool._workers import process_pool
from cxrtool.data.labels import VIEW_POSITIONS
from cxrtool.preprocess import Preprocessing, normalise
from cxrtool.train.cache import DiskImageCache, read_square


@dataclass(frozen=True)
class Augmentation:
    """Radiograph-safe augmentation: small rotations, zoom, shifts, exposure changes.

    No horizontal flips: the heart's side is anatomy (a flipped film shows dextrocardia).
    """

    rotate_degrees: float = 7.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    brightness: float = 0.08
    contrast: float = 0.15
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.01

    def __call__(self, square: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = square.shape[0]
        angle = rng.uniform(-self.rotate_degrees, self.rotate_degrees)
        zoom = rng.uniform(*self.scale)
        shift = rng.uniform(-self.translate, self.translate, size=2) * size
        matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, zoom)
        matrix[:, 2] += shift
        out = cv2.warpAffine(square, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
        out = np.clip(out, 0.0, 1.0) ** rng.uniform(*self.gamma)
        out = (out - 0.5) * (1 + rng.uniform(-self.contrast, self.contrast)) + 0.5
        out = out + rng.uniform(-self.brightness, self.brightness)
        if self.noise_std > 0:
            out = out + rng.normal(0.0, self.noise_std, size=out.shape).astype(np.float32)
        return np.clip(out, 0.0, 1.0).astype(np.float32)


def _load_square(args: tuple[str, Preprocessing]) -> tuple[np.ndarray | None, str | None]:
    """:func:`~cxrtool.train.cache.read_square` as a one-argument job for a pool's ``map``."""
    return read_square(*args)


class ImageCache:
    """Fitted input squares of every image, read once in parallel and kept as uint8 in this
    process's memory (``image_cache: memory``; the persistent cache is
    :class:`~cxrtool.train.cache.DiskImageCache`)."""

    def __init__(self, paths: Sequence[str], prep: Preprocessing, *, workers: int = 2, progress=None):
        size = prep.input_size
        self.squares = np.zeros((len(paths), size, size), dtype=np.uint8)
        self.failed: dict[int, str] = {}
        jobs = [(str(p), prep) for p in paths]
        with process_pool(workers if len(jobs) > 16 else 0) as pool:  # (a few images: not worth starting processes)
            self._fill(pool.map(_load_square, jobs, chunksize=16), len(jobs), progress)

    def _fill(self, results, total, progress) -> None:
        for index, (square, error) in enumerate(results):
            if square is None:
                self.failed[index] = error or "unreadable"
            else:
                self.squares[index] = square
            if progress is not None and ((index + 1) % 64 == 0 or index + 1 == total):
                progress(index + 1, total)

    def square(self, index: int) -> np.ndarray | None:
        """The image's uint8 square, or None when it cannot be read."""
        return None if index in self.failed else self.squares[index]

    @staticmethod
    def bytes_needed(n_images: int, prep: Preprocessing) -> int:
        return n_images * prep.input_size**2


class LabelledStudies(torch.utils.data.Dataset):
    """One dict per labelled study: ``image`` (the model input), ``targets`` (NaN where
    unknown), ``index`` (its row in the label table) and ``view`` (its projection, an index
    into :data:`~cxrtool.data.labels.VIEW_POSITIONS`; "UNKNOWN" where the table has no
    view); with ``copies=2`` also ``image_2``, a second, independently augmented copy (for
    contrastive loss terms).

    ``view_positions`` are the label table's (``LabelTable.views``, already normalised to
    those names); any other string counts as "UNKNOWN".

    An image that cannot be read gives a blank input with all targets NaN (ignored by the
    masked losses) rather than stopping the run.
    """

    def __init__(
        self,
        paths: Sequence[str],
        targets: np.ndarray,
        prep: Preprocessing,
        *,
        augment: Augmentation | None = None,
        cache: ImageCache | DiskImageCache | None = None,
        seed: int = 0,
        copies: int = 1,
        view_positions: Sequence[str] | None = None,
    ):
        if copies not in (1, 2):
            raise ValueError(f"copies must be 1 or 2, got {copies}")
        if view_positions is not None and len(view_positions) != len(paths):
            raise ValueError(f"{len(view_positions)} view positions for {len(paths)} images")
        self.paths = list(paths)
        unknown = VIEW_POSITIONS.index("UNKNOWN")
        self.view_codes = [unknown] * len(self.paths) if view_positions is None else [
            VIEW_POSITIONS.index(v) if v in VIEW_POSITIONS else unknown for v in view_positions]
        self.targets = np.asarray(targets, dtype=np.float32)
        self.prep = prep
        self.augment = augment
        self.cache = cache
        self.seed = seed
        self.copies = copies  # augmented copies of each image (2: for a contrastive term)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def input_square(self, index: int) -> np.ndarray | None:
        """The image's fitted input square in [0, 1], unaugmented; None when unreadable."""
        if self.cache is not None:
            square = self.cache.square(index)
        else:
            square, _ = read_square(self.paths[index], self.prep)
        return None if square is None else square.astype(np.float32) / 255.0

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        square = self.input_square(index)
        targets = torch.from_numpy(self.targets[index])
        if square is None:
            size = self.prep.input_size
            blank = torch.zeros(1, size, size)
            item = {"image": blank, "targets": torch.full_like(targets, math.nan), "index": index, "view": self.view_codes[index]}
            return item | ({"image_2": blank} if self.copies == 2 else {})
        item = {"image": self._view(square, index, 0), "targets": targets, "index": index, "view": self.view_codes[index]}
        if self.copies == 2:
            item["image_2"] = self._view(square, index, 1)
        return item

    def _view(self, square: np.ndarray, index: int, view: int) -> torch.Tensor:
        if self.augment is not None:
            # The first view's stream is the one single-view runs always used.
            rng = np.random.default_rng((self.seed, self.epoch, index) if view == 0 else (self.seed, self.epoch, index, view))
            square = self.augment(square, rng)
        return torch.from_numpy(normalise(square, self.prep))
