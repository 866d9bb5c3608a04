"""One definition of how a Study becomes a model input, shared by train, predict and explain.

The radiograph is resized so its longer side fits the model's input size (aspect ratio
kept) and padded to a square; :class:`Geometry` records the resize and padding so that
anything found on the input grid (a CAM peak, a box) maps back to the original pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    """How a checkpoint expects its input; stored in the checkpoint's card.

    Attributes:
        input_size: side of the square input, in pixels.
        mean, std: normalisation applied to pixels in [0, 1].
        resize: "letterbox" (keep aspect, pad) or "squash" (stretch to the square).
    """

    input_size: int = 224
    mean: float = 0.5
    std: float = 0.25
    resize: str = "letterbox"

    def __post_init__(self) -> None:
        if self.input_size < 16:
            raise ValueError(f"input_size must be at least 16, got {self.input_size}")
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.resize not in ("letterbox", "squash"):
            raise ValueError(f"resize must be 'letterbox' or 'squash', got {self.resize!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class Geometry:
    """Where the original image sits inside the square input.

    ``input = original * (scale_y, scale_x) + (pad_y, pad_x)``, in pixel units.
    """

    original_height: int
    original_width: int
    scale_y: float
    scale_x: float
    pad_y: int
    pad_x: int

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """Map a point on the input grid back to original pixel coordinates."""
        return (x - self.pad_x) / self.scale_x, (y - self.pad_y) / self.scale_y

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """Map a point in original pixel coordinates onto the input grid."""
        return x * self.scale_x + self.pad_x, y * self.scale_y + self.pad_y

    def as_tuple(self) -> tuple:
        return (self.original_height, self.original_width, self.scale_y, self.scale_x, self.pad_y, self.pad_x)


def fit_to_square(pixels: np.ndarray, prep: Preprocessing) -> tuple[np.ndarray, Geometry]:
    """Resize and pad an (H, W) image in [0, 1] to the input square, before normalisation."""
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2D grey image, got shape {pixels.shape}")
    height, width = pixels.shape
    size = prep.input_size
    image = pixels.astype(np.float32, copy=False)
    if prep.resize == "squash":
        new_h, new_w = size, size
    else:
        ratio = size / max(height, width)
        new_h, new_w = max(1, round(height * ratio)), max(1, round(width * ratio))
    # INTER_AREA averages when shrinking (no aliasing of fine lines such as the pleura);
    # linear when enlarging.
    shrinking = new_h < height or new_w < width
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    pad_y, pad_x = (size - new_h) // 2, (size - new_w) // 2
    square = np.zeros((size, size), dtype=np.float32)
    square[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
    geometry = Geometry(height, width, new_h / height, new_w / width, pad_y, pad_x)
    return square, geometry


def normalise(square: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Normalise a fitted square to the model's input statistics, as (1, S, S) float32."""
    return ((square - prep.mean) / prep.std)[None].astype(np.float32, copy=False)


def prepare(pixels: np.ndarray, prep: Preprocessing) -> tuple[np.ndarray, Geometry]:
    """Turn a Study's pixels into a (1, S, S) float32 model input and its geometry.

    Example:
        >>> tensor, geometry = prepare(study.pixels, Preprocessing(input_size=224))
        >>> tensor.shape
        (1, 224, 224)
    """
    square, geometry = fit_to_square(pixels, prep)
    return normalise(square, prep), geometry
