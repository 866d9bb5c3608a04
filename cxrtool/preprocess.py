"""One definition of how a Study becomes a model input, shared by train, predict and explain.

Two ways to make the square a model sees, recorded in each checkpoint's card:

* ``letterbox`` (cxrtool's own): the radiograph is resized so its longer side fits the input
  size (aspect ratio kept) and padded to a square; ``squash`` stretches it instead.
* ``center_crop`` (TorchXRayVision's): the longer side is cropped to the shorter one around
  the centre, then the square is resized. With ``resample="skimage"`` the resize is XRV's own
  (``skimage.transform.resize``, constant mode, anti-aliasing), done, as XRV does it, on the
  normalised intensities: so an imported XRV model sees exactly what XRV's pipeline gives it
  (for a size seen before, as skimage's own operator in sparse-matrix form: ten times faster).

:class:`Geometry` records the crop, resize and padding so that anything found on the input
grid (a CAM peak, a box) maps back to the original pixels.

:class:`TestTimeAugmentation` makes the copies of a prepared batch that ``predict --tta``
scores (zooms, shifts, mirrors on the model's device), and merges their probabilities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np

RESIZE_MODES = ("letterbox", "squash", "center_crop")
RESAMPLERS = ("opencv", "skimage")


@dataclass(frozen=True)
class Preprocessing:
    """How a checkpoint expects its input; stored in the checkpoint's card.

    Attributes:
        input_size: side of the square input, in pixels.
        mean, std: normalisation applied to pixels in [0, 1]: ``(p - mean) / std``. XRV's
            [-1024, 1024] scaling is mean 0.5, std 1/2048.
        resize: "letterbox" (keep aspect, pad), "squash" (stretch to the square) or
            "center_crop" (crop the longer side around the centre, then resize).
        resample: "opencv" (area averaging when shrinking, bilinear when enlarging) or
            "skimage" (XRV's resize, on the normalised intensities).
    """

    input_size: int = 224
    mean: float = 0.5
    std: float = 0.25
    resize: str = "letterbox"
    resample: str = "opencv"

    def __post_init__(self) -> None:
        if self.input_size < 16:
            raise ValueError(f"input_size must be at least 16, got {self.input_size}")
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.resample not in RESAMPLERS:
            raise ValueError(f"resample must be one of {', '.join(RESAMPLERS)}, got {self.resample!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# TorchXRayVision's pipeline: intensities to [-1024, 1024], centre crop, its skimage resize.
def xrv_preprocessing(input_size: int) -> Preprocessing:
    return Preprocessing(input_size=input_size, mean=0.5, std=1.0 / 2048.0, resize="center_crop", resample="skimage")


@dataclass(frozen=True)
class Geometry:
    """Where the original image sits inside the square input.

    ``input = (original - crop) * scale + pad``, in pixel units, per axis; the input grid
    shows the original's rows ``crop_y .. crop_y + crop_height`` (all of them unless
    centre-cropped) and likewise its columns.
    """

    original_height: int
    original_width: int
    scale_y: float
    scale_x: float
    pad_y: int
    pad_x: int
    crop_y: int = 0
    crop_x: int = 0
    crop_height: int | None = None
    crop_width: int | None = None

    @property
    def shown(self) -> tuple[int, int, int, int]:
        """The part of the original the input shows: (y, x, height, width)."""
        return (self.crop_y, self.crop_x, self.crop_height or self.original_height, self.crop_width or self.original_width)

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """Map a point on the input grid back to original pixel coordinates."""
        return (x - self.pad_x) / self.scale_x + self.crop_x, (y - self.pad_y) / self.scale_y + self.crop_y

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """Map a point in original pixel coordinates onto the input grid."""
        return (x - self.crop_x) * self.scale_x + self.pad_x, (y - self.crop_y) * self.scale_y + self.pad_y

    def as_tuple(self) -> tuple:
        return (self.original_height, self.original_width, self.scale_y, self.scale_x, self.pad_y, self.pad_x,
                *self.shown)


def fit_to_square(pixels: np.ndarray, prep: Preprocessing) -> tuple[np.ndarray, Geometry]:
    """Crop or pad and resize an (H, W) image in [0, 1] to the input square, before
    normalisation (so augmentation and caching work in [0, 1] units)."""
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2D grey image, got shape {pixels.shape}")
    height, width = pixels.shape
    size = prep.input_size
    image = pixels.astype(np.float32, copy=False)
    crop_y = crop_x = 0
    if prep.resize == "center_crop":
        side = min(height, width)
        crop_y, crop_x = height // 2 - side // 2, width // 2 - side // 2  # as XRayCenterCrop
        image = image[crop_y : crop_y + side, crop_x : crop_x + side]
        new_h = new_w = size
    elif prep.resize == "squash":
        new_h, new_w = size, size
    else:
        ratio = size / max(height, width)
        new_h, new_w = max(1, round(height * ratio)), max(1, round(width * ratio))
    resized = _resize(image, new_h, new_w, prep)
    pad_y, pad_x = (size - new_h) // 2, (size - new_w) // 2
    square = np.zeros((size, size), dtype=np.float32)
    square[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
    shown_h, shown_w = image.shape
    geometry = Geometry(height, width, new_h / shown_h, new_w / shown_w, pad_y, pad_x, crop_y, crop_x, shown_h, shown_w)
    return square, geometry


def _resize(image: np.ndarray, new_h: int, new_w: int, prep: Preprocessing) -> np.ndarray:
    if prep.resample == "skimage":
        # XRV resizes the normalised image (its zero, which the constant mode pads with, is
        # mid-grey): do the same, then come back to [0, 1] units.
        normalised = (image - np.float32(prep.mean)) / np.float32(prep.std)
        out = skimage_resize(normalised, new_h, new_w)
        return (out * np.float32(prep.std) + np.float32(prep.mean)).astype(np.float32)
    # INTER_AREA averages when shrinking (no aliasing of fine lines such as the pleura);
    # linear when enlarging.
    shrinking = new_h < image.shape[0] or new_w < image.shape[1]
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def skimage_resize(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """``skimage.transform.resize(image, (new_h, new_w), mode="constant", preserve_range=True)``
    (TorchXRayVision's resize), as float32, about ten times faster for sizes seen before.

    That resize is linear and separable up to its final clip (an anti-aliasing Gaussian
    along each shrinking axis, then linear interpolation, zero beyond the edges): a sparse
    matrix per axis, ``A_y @ image @ A_x.T``. Each matrix is skimage's own operator, taken
    by resizing the identity with skimage itself, once per (input, output) length and
    process, from the second image of that length on (a folder of one size pays once; a
    folder of sizes that never repeat pays nothing extra). Then skimage's clip to the
    input's range (widened to include the padding value 0 when the output reaches it).
    Equal to skimage's own result to float32 rounding (``tests/test_preprocess``).
    """
    rows, cols = _axis_operator(image.shape[0], new_h), _axis_operator(image.shape[1], new_w)
    if rows is None or cols is None:
        import warnings

        from skimage.transform import resize

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return resize(image, (new_h, new_w), mode="constant", preserve_range=True).astype(np.float32, copy=False)
    out = np.ascontiguousarray((cols @ (rows @ image).T).T, dtype=np.float32)
    low, high = float(image.min()), float(image.max())
    if not low <= 0.0 <= high and float(out.min()) <= 0.0 <= float(out.max()):
        low, high = min(low, 0.0), max(high, 0.0)
    return np.clip(out, low, high, out=out)


_LENGTHS_SEEN: set[tuple[int, int]] = set()
_OPERATORS: dict[tuple[int, int], object] = {}


def _axis_operator(length: int, new_length: int):
    """skimage's resize along one axis as a sparse (new_length, length) matrix, or None the
    first time this pair of lengths is asked for (a one-off size is cheaper resized directly)."""
    key = (length, new_length)
    if key in _OPERATORS:
        return _OPERATORS[key]
    if key not in _LENGTHS_SEEN:
        _LENGTHS_SEEN.add(key)
        return None
    import warnings

    import scipy.sparse
    from skimage.transform import resize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Only the first axis changes length, so only it is filtered and interpolated: row i
        # of the result is how output pixel i weighs the inputs; no clip (the identity spans
        # [0, 1] and the weights stay within it).
        dense = resize(np.eye(length, dtype=np.float32), (new_length, length), mode="constant", preserve_range=True,
                       clip=False)
    if len(_OPERATORS) >= 32:
        _OPERATORS.pop(next(iter(_OPERATORS)))
    _OPERATORS[key] = operator = scipy.sparse.csr_matrix(dense)
    return operator


def normalise(square: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Normalise a fitted square to the model's input statistics, as (1, S, S) float32."""
    return ((square - np.float32(prep.mean)) / np.float32(prep.std))[None].astype(np.float32, copy=False)


def prepare(pixels: np.ndarray, prep: Preprocessing) -> tuple[np.ndarray, Geometry]:
    """Turn a Study's pixels into a (1, S, S) float32 model input and its geometry.

    Example:
        >>> tensor, geometry = prepare(study.pixels, Preprocessing(input_size=224))
        >>> tensor.shape
        (1, 224, 224)
    """
    square, geometry = fit_to_square(pixels, prep)
    return normalise(square, prep), geometry


@dataclass(frozen=True)
class TestTimeAugmentation:
    """Copies of each study scored with it, in the same forward passes, and averaged.

    ``mode`` is a key of ``registry.TTA_MODES``; ``flip`` adds the horizontal mirror of
    every copy. The copies are made on the model's device from the preprocessed tensor: a
    zoom or shift about the centre, the area it uncovers filled with the letterbox's
    background (black), so nothing of the study is invented.
    """

    mode: str = "none"
    flip: bool = False

    __test__ = False  # not a pytest test class, whatever its name says

    def __post_init__(self) -> None:
        from cxrtool.errors import UsageError
        from cxrtool.registry import TTA_MODES

        if self.mode not in TTA_MODES:
            raise UsageError(f"unknown --tta {self.mode!r}; choose one of {', '.join(TTA_MODES)}")

    @property
    def active(self) -> bool:
        return self.mode != "none" or self.flip

    def transforms(self) -> list[tuple[float, float, float, bool]]:
        """(zoom, shift x, shift y, mirrored) of each copy; shifts in fractions of the side."""
        base = [(1.0, 0.0, 0.0)]
        if self.mode in ("light", "strong"):
            base += [(1.1, 0.0, 0.0), (1 / 1.1, 0.0, 0.0)]
        if self.mode == "strong":
            base += [(1.0, 0.05, 0.0), (1.0, -0.05, 0.0), (1.0, 0.0, 0.05), (1.0, 0.0, -0.05)]
        copies = [(zoom, dx, dy, False) for zoom, dx, dy in base]
        return copies + [(zoom, dx, dy, True) for zoom, dx, dy, _ in copies] if self.flip else copies

    def settings(self) -> dict[str, Any]:
        """What is recorded with each result (nothing without augmentation)."""
        if not self.active:
            return {}
        return {"tta": self.mode, "flip": self.flip, "copies": len(self.transforms()),
                "merge": "mean of the copies' probabilities"}

    def merge(self, probabilities, n: int):
        """(n * copies, findings) -> (n, findings): the mean over each study's copies (as they are, without TTA)."""
        if not self.active:
            return probabilities
        return probabilities.reshape(n, -1, probabilities.shape[-1]).mean(dim=1)

    def expand(self, batch, background: float):
        """(n, C, S, S) -> (n * copies, C, S, S), each study's copies together."""
        import torch
        import torch.nn.functional as F

        copies = self.transforms()
        n = batch.shape[0]
        theta = torch.zeros(len(copies), 2, 3, dtype=batch.dtype, device=batch.device)
        for k, (zoom, dx, dy, mirrored) in enumerate(copies):
            # The sampling grid maps output to input coordinates in [-1, 1]: a zoom z reads
            # a window 1/z as wide; a shift moves the content by dx of the side (2 dx units).
            theta[k, 0, 0] = (-1.0 if mirrored else 1.0) / zoom
            theta[k, 1, 1] = 1.0 / zoom
            theta[k, 0, 2] = -2.0 * dx / zoom
            theta[k, 1, 2] = -2.0 * dy / zoom
        theta = theta.repeat(n, 1, 1)
        source = batch.repeat_interleave(len(copies), dim=0) - background
        grid = F.affine_grid(theta, list(source.shape), align_corners=False)
        return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + background


NO_TTA = TestTimeAugmentation()
