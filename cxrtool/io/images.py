"""Reading PNG and JPEG radiographs (e.g. NIH ChestX-ray14, CheXpert) into a Study.

These files are already display-ready: pixels are scaled by the range of their sample type
(255 or 65535), never stretched, and colour is reduced to luminance. They carry no spacing
and no projection.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxrtool.io.study import CappedReader, Study, StudyReadError, open_capped
from cxrtool.io.study import one_line as _one_line

__all__ = ["read_image"]

_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg"}  # MPO: multi-picture JPEG
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
# ITU-R BT.601 luma weights, the same ones Pillow uses for RGB -> "L".
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# What Pillow raises on broken files: SyntaxError for bad PNG chunks/CRCs, OSError for
# truncated data, the others from decoders reading past malformed headers.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


def read_image(path: Path) -> Study:
    """Read a PNG or JPEG file as a Study with float32 pixels in [0, 1].

    Grey images are divided by their type's maximum (255 for 8-bit, 65535 for 16-bit; a
    32-bit "I" image by 255, 4095 or 65535, the smallest that holds its maximum). RGB and
    palette images become luminance; alpha is dropped. JPEG EXIF orientation is applied.

    Args:
        path: a PNG or JPEG file.

    Returns:
        A Study with ``source_format`` "png" or "jpeg", ``identity`` {"format": ...}, no
        pixel spacing and view "UNKNOWN".

    Raises:
        StudyReadError: for a missing, truncated, corrupt, unsupported or excessively
            large (decompression bomb) image.

    Example:
        >>> study = read_image(Path("00000001_000.png"))
        >>> study.pixels.shape
        (1024, 1024)
    """
    path = Path(path)
    handle = open_capped(path)
    with handle:
        return _read_image(path, handle)


def _read_image(path: Path, handle: CappedReader) -> Study:
    try:
        image = Image.open(handle, formats=("PNG", "JPEG"))  # JPEG covers MPO files too
    except Image.DecompressionBombError as error:
        reason = f"image too large (decompression bomb?): {error}"
        raise StudyReadError(_one_line(reason)) from error
    except UnidentifiedImageError as error:
        raise StudyReadError("not a PNG or JPEG image Pillow can read") from error
    except _DECODE_ERRORS as error:
        raise StudyReadError(_one_line(f"truncated or corrupt image: {error}")) from error

    with image:
        source_format = _FORMATS.get(image.format or "", "png")
        width, height = image.size
        limit = Image.MAX_IMAGE_PIXELS
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse there too, before
        # anything is decoded.
        if limit is not None and width * height > limit:
            raise StudyReadError(
                f"image too large ({width}x{height} pixels, limit {limit}): decompression bomb?"
            )
        try:
            # Image.open only reads the header; load() decodes, which is where truncation
            # shows (ImageFile.LOAD_TRUNCATED_IMAGES is deliberately left False).
            image.load()
            if source_format == "jpeg":
                image = ImageOps.exif_transpose(image)
            pixels, coloured = _to_unit_grey(image)
        except _DECODE_ERRORS as error:
            raise StudyReadError(_one_line(f"truncated or corrupt image: {error}")) from error

    identity = {"format": source_format}
    if coloured:
        # Real colour (e.g. an overlay saved by mistake), not grey stored as RGB: the
        # luminance is fine for display and the model, but not for quantitative work.
        identity["converted_from"] = "RGB"
    return Study(
        path=path,
        pixels=pixels,
        source_format=source_format,
        identity=identity,
    )


def _to_unit_grey(image: Image.Image) -> tuple[np.ndarray, bool]:
    """Float32 (H, W) in [0, 1] from any Pillow mode, converting to float32 once; and
    whether the image had real colour (channels that differ somewhere)."""
    mode = image.mode
    if mode == "L":
        return _scaled(np.asarray(image), 255.0), False
    if mode in _SIXTEEN_BIT_MODES:
        # np.asarray honours the mode's byte order (e.g. ">u2" for I;16B).
        return _scaled(np.asarray(image), 65535.0), False
    if mode == "I":
        array = np.asarray(image)
        top = int(array.max()) if array.size else 0
        # A 32-bit container: guess the stored depth from the data (8, 12 or 16 bits).
        scale = 255.0 if top <= 255 else 4095.0 if top <= 4095 else 65535.0
        return _scaled(array, scale), False
    if mode == "LA":
        return _scaled(np.asarray(image)[..., 0], 255.0), False
    if mode == "1":
        return np.asarray(image, dtype=np.float32), False
    if mode not in ("RGB", "RGBA", "RGBX"):
        # P, PA, CMYK, YCbCr, LAB, ...: let Pillow map them to RGB first.
        image = image.convert("RGB")
    rgb = np.asarray(image)[..., :3]  # drops alpha (RGBA, RGBX) without a copy
    coloured = bool(np.any(rgb[..., 0] != rgb[..., 1]) or np.any(rgb[..., 1] != rgb[..., 2]))
    grey = rgb.astype(np.float32) @ _LUMA
    grey *= np.float32(1.0 / 255.0)
    np.clip(grey, 0.0, 1.0, out=grey)
    return grey, coloured


def _scaled(array: np.ndarray, top: float) -> np.ndarray:
    out = array.astype(np.float32)
    out /= np.float32(top)
    np.clip(out, 0.0, 1.0, out=out)  # only matters for out-of-range (e.g. negative) "I" data
    return out
