"""Vectorised drawing helpers (ramps, blurs, smooth noise, distances) and :class:`_Frame`,
which places the patient's canvas on the detector."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# --------------------------------------------------------------------------------------
# Small vectorised helpers. Speed notes: on 256x256 float32 grids np.hypot, np.where and
# fractional powers cost 5-20x a multiply, so the drawing code uses sqrt/products instead,
# and small structures are drawn only inside their bounding box (``_Frame.crop``).
# --------------------------------------------------------------------------------------


def _ramp(d: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased step: 0 for d < -edge/2, 1 for d > edge/2 (d and edge in mm)."""
    return np.clip(d * (1.0 / edge) + 0.5, 0.0, 1.0)


def _unit(d: np.ndarray) -> np.ndarray:
    """Clip to [0, 1]."""
    return np.clip(d, 0.0, 1.0)


def _length(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return np.sqrt(dx * dx + dy * dy)


def _blur(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur; narrow kernels as shifted-slice sums (scipy's per-call cost dominates
    at these sizes), wide ones via scipy. Edges replicate the border."""
    if sigma_px <= 0.05:
        return a
    radius = int(math.ceil(2.5 * sigma_px))
    if radius > 4:
        return ndimage.gaussian_filter(a, sigma_px, truncate=2.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    rows, cols = a.shape
    p = np.pad(a, radius, mode="edge")
    mid = p[:, radius : radius + cols]
    out = mid[0:rows] * taps[0]
    for k in range(1, 2 * radius + 1):
        out += mid[k : k + rows] * taps[k]
    p = np.pad(out, ((0, 0), (radius, radius)), mode="edge")
    res = p[:, 0:cols] * taps[0]
    for k in range(1, 2 * radius + 1):
        res += p[:, k : k + cols] * taps[k]
    return res


_NOISE_BANK: dict[tuple[int, float], np.ndarray] = {}


def _noise_bank(size: int, sigma_px: float) -> np.ndarray:
    """A fixed (2*size)^2 unit-variance smooth random field, built once per process."""
    key = (size, sigma_px)
    bank = _NOISE_BANK.get(key)
    if bank is None:
        seed = [size, int(round(sigma_px * 100)), 0x50A7]  # fixed: same bank in every worker
        bank = np.random.default_rng(seed).standard_normal((2 * size, 2 * size), dtype=np.float32)
        if sigma_px > 0:
            bank = ndimage.gaussian_filter(bank, sigma_px, mode="wrap")
            bank *= 1.0 / float(bank.std())
        _NOISE_BANK[key] = bank
    return bank


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``sigma_px`` (0: white).

    Filtering fresh white noise for every image costs more than drawing the rest of it,
    so a random window (offset, flips) of a per-process bank is used instead; the
    correlation length is rounded to 0.25 px to keep the banks few.
    """
    size = max(shape)
    sigma = 0.0 if sigma_px == 0 else max(round(sigma_px * 4.0) / 4.0, 0.5)
    # Canvas sizes vary a little with the patient's rotation: share banks per 64 pixels.
    bank = _noise_bank(64 * math.ceil(size / 64), sigma)
    span = bank.shape[0] - size
    r0, c0, flips = (int(v) for v in rng.integers(0, (span, span, 4)))
    window = bank[r0 : r0 + shape[0], c0 : c0 + shape[1]]
    if flips & 1:
        window = window[::-1]
    if flips & 2:
        window = window[:, ::-1]
    return window


def _segment_distance(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
) -> np.ndarray:
    """Distance (mm) from every grid point to the segment p0-p1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    inv = 1.0 / (dx * dx + dy * dy + 1e-9)
    t = _unit(((x - p0[0]) * dx + (y - p0[1]) * dy) * inv)
    return _length(x - (p0[0] + t * dx), y - (p0[1] + t * dy))


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre offsets from the image centre, in pixels (cached per size)."""
    grid = _GRID_CACHE.get(size)
    if grid is None:
        c = np.arange(size, dtype=np.float32) + np.float32(0.5 - size / 2.0)
        grid = (np.ascontiguousarray(np.broadcast_to(c[None, :], (size, size))),
                np.ascontiguousarray(np.broadcast_to(c[:, None], (size, size))))  # fmt: skip
        _GRID_CACHE[size] = grid
    return grid


Crop = tuple[slice, slice]


@dataclass
class _Frame:
    """Where the patient is drawn, and how that maps onto the detector.

    Anatomy is drawn on an axis-aligned "canvas" in patient millimetres, so every
    coordinate grid is separable: ``x`` is a (1, n) row and ``y`` an (n, 1) column, and
    anything that depends on one coordinate only (lung borders against height, the
    diaphragm against width...) costs n operations, not n^2. The patient's rotation and
    shift on the detector are applied once at the end by :meth:`warp` (bilinear) and
    :meth:`warp_mask` (nearest). The canvas has a margin so rotated corners stay inside.
    """

    size: int  # detector (output) side in pixels
    spacing: float  # mm per pixel, canvas and detector alike
    n: int  # canvas side in pixels
    x: np.ndarray  # (1, n) patient x (mm) of canvas columns
    y: np.ndarray  # (n, 1) patient y (mm) of canvas rows
    x0: float
    y0: float
    cos: float
    sin: float
    tx: float
    ty: float

    @classmethod
    def make(cls, size: int, spacing: float, angle_deg: float, tx: float, ty: float) -> _Frame:
        c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
        margin = int(math.ceil(0.5 * size * (abs(c) + abs(s) - 1.0))) + 2
        n = size + 2 * margin
        # The detector centre in patient coordinates becomes the canvas centre.
        cx, cy = -(c * tx + s * ty), -(c * ty - s * tx)
        x0 = cx - 0.5 * (n - 1) * spacing
        y0 = cy - 0.5 * (n - 1) * spacing
        axis = np.arange(n, dtype=np.float32) * np.float32(spacing)
        x = (axis + np.float32(x0))[None, :]
        y = (axis + np.float32(y0))[:, None]
        return cls(size, spacing, n, x, y, x0, y0, c, s, tx, ty)

    @property
    def shape(self) -> tuple[int, int]:
        """Canvas shape."""
        return (self.n, self.n)

    def to_pixel(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patient mm -> canvas (column, row) coordinates (pixel centres at integers)."""
        return (px - self.x0) / self.spacing, (py - self.y0) / self.spacing

    def crop(self, x0: float, x1: float, y0: float, y1: float) -> Crop | None:
        """Canvas slices covering the patient rectangle [x0, x1] x [y0, y1] (mm)."""
        c0 = max(int(math.floor((x0 - self.x0) / self.spacing)), 0)
        c1 = min(int(math.ceil((x1 - self.x0) / self.spacing)) + 1, self.n)
        r0 = max(int(math.floor((y0 - self.y0) / self.spacing)), 0)
        r1 = min(int(math.ceil((y1 - self.y0) / self.spacing)) + 1, self.n)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def grid(self, crop: Crop | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The (1, w) x and (h, 1) y coordinates of a crop (or of the whole canvas)."""
        if crop is None:
            return self.x, self.y
        rows, cols = crop
        return self.x[:, cols], self.y[rows, :]

    def point(self, flat_index: int) -> tuple[float, float]:
        """Patient (x, y) in mm of a flat canvas index."""
        r, c = divmod(int(flat_index), self.n)
        return float(self.x[0, c]), float(self.y[r, 0])

    def splat(self, px: np.ndarray, py: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Accumulate point weights onto the canvas with bilinear splatting."""
        col, row = self.to_pixel(px, py)
        c0 = np.floor(col).astype(np.int64)
        r0 = np.floor(row).astype(np.int64)
        fc, fr = col - c0, row - r0
        n = self.n
        rr = np.concatenate([r0, r0, r0 + 1, r0 + 1])
        cc = np.concatenate([c0, c0 + 1, c0, c0 + 1])
        ww = np.concatenate([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc])
        ww *= np.tile(weights, 4)
        ok = (rr >= 0) & (rr < n) & (cc >= 0) & (cc < n)
        out = np.bincount(rr[ok] * n + cc[ok], weights=ww[ok], minlength=n * n)
        return out.reshape(n, n).astype(np.float32)

    def _maps(self) -> tuple[np.ndarray, ...]:
        maps = getattr(self, "_cached_maps", None)
        if maps is None:
            ux, uy = _unit_grid(self.size)
            xd = ux * self.spacing - self.tx
            yd = uy * self.spacing - self.ty
            col = ((self.cos * xd + self.sin * yd) - self.x0) / self.spacing
            row = ((self.cos * yd - self.sin * xd) - self.y0) / self.spacing
            n = self.n
            c0 = np.clip(np.floor(col), 0, n - 2)
            r0 = np.clip(np.floor(row), 0, n - 2)
            fc = np.clip(col - c0, 0.0, 1.0).astype(np.float32)
            fr = np.clip(row - r0, 0.0, 1.0).astype(np.float32)
            base = (r0 * n + c0).astype(np.intp)
            nearest = (np.clip(np.rint(row), 0, n - 1) * n + np.clip(np.rint(col), 0, n - 1)).astype(np.intp)
            maps = (base, fc, fr, nearest)
            object.__setattr__(self, "_cached_maps", maps)
        return maps

    def warp(self, canvas: np.ndarray) -> np.ndarray:
        """Canvas -> detector image (bilinear), applying the patient's rotation and shift."""
        base, fc, fr, _ = self._maps()
        flat = canvas.ravel()
        n = self.n
        top = flat[base] + fc * (flat[base + 1] - flat[base])
        bottom = flat[base + n] + fc * (flat[base + n + 1] - flat[base + n])
        return top + fr * (bottom - top)

    def warp_mask(self, mask: np.ndarray) -> np.ndarray:
        """Canvas mask -> detector mask (nearest neighbour)."""
        return mask.ravel()[self._maps()[3]]
