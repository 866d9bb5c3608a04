"""Radiomic features of one region of a radiograph, through PyRadiomics itself.

The radiograph and its mask go to PyRadiomics as true 2D SimpleITK images carrying the
pixel spacing (a one-slice 3D volume is about 20x slower and gives meaningless 3D shape
features). Parameters are PyRadiomics' own (its YAML format, validated by its own schema);
:func:`default_params` is a 2D default. What cannot be measured (a mask of another size, an
empty mask, a label the mask does not hold, an RGB image) raises :class:`RegionError` with
the reason, so a batch can record it for that row and go on.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import numpy as np

# Features of 2D radiographs: the original image and two filters that bring out texture
# at two scales (Laplacian of Gaussian) and by orientation (wavelet).
DEFAULT_FEATURE_CLASSES = ("shape2D", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
BINS = 64  # intensity bins across the nominal range of the image's encoding


class RegionError(ValueError):
    """A region that cannot be measured; the message is the one-line reason."""


class ParamsError(ValueError):
    """An invalid PyRadiomics parameter file; the message names the offending key."""


def default_bin_width(pixels: np.ndarray) -> float:
    """A bin width for the nominal intensity range of the image's encoding, so that images
    from the same source share bins: [0, 1] floats, 8-bit, 12-bit or 16-bit values (after
    DICOM rescaling), else the image's own range."""
    low, high = float(np.min(pixels)), float(np.max(pixels))
    if low >= 0.0:
        for top in (1.0, 255.0, 4095.0, 65535.0):
            if high <= top:
                return (top + (0.0 if top == 1.0 else 1.0)) / BINS
    return max(high - low, 1e-6) / BINS


def default_params(bin_width: float) -> dict[str, Any]:
    """cxrtool's 2D default, in PyRadiomics' parameter format."""
    return {
        "imageType": {"Original": {}, "LoG": {"sigma": [1.0, 3.0]}, "Wavelet": {}},
        "featureClass": {name: None for name in DEFAULT_FEATURE_CLASSES},
        "setting": {"binWidth": float(bin_width), "label": 1, "force2D": True, "force2Ddimension": 0},
    }


def check_classes(names: list[str]) -> tuple[str, ...]:
    """Feature class names as PyRadiomics spells them (any case accepted).

    Raises:
        ParamsError: a name PyRadiomics does not have (the valid ones are listed).
    """
    _quiet_radiomics()
    import radiomics

    known = {name.lower(): name for name in radiomics.getFeatureClasses()}
    unknown = [name for name in names if name.lower() not in known]
    if unknown:
        raise ParamsError(f"unknown feature class {', '.join(unknown)}; choose from {', '.join(sorted(known.values()))}")
    return tuple(known[name.lower()] for name in names)


def _quiet_radiomics() -> None:
    # PyRadiomics logs extraction details and schema failures on stderr (and sets its own
    # levels when imported, hence after the import); the reasons reach the user through
    # our own messages instead.
    import radiomics

    radiomics.setVerbosity(logging.CRITICAL)
    logging.getLogger("radiomics").setLevel(logging.CRITICAL)
    logging.getLogger("pykwalify").setLevel(logging.CRITICAL)


def load_params(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a PyRadiomics parameter file (YAML or JSON) with PyRadiomics' schema.

    Raises:
        ParamsError: the file is missing, unreadable, or fails the schema (the key is named).
    """
    from cxrtool.errors import brief
    from cxrtool.io.yamlfile import YamlFileError, read_yaml

    _quiet_radiomics()
    from radiomics import featureextractor

    try:
        params = read_yaml(path, what="radiomics parameters")
    except YamlFileError as error:
        raise ParamsError(str(error)) from None
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of imageType / featureClass / setting, not {brief(params)}")
    try:
        featureextractor.RadiomicsFeatureExtractor(dict(params))
    except Exception as error:  # noqa: BLE001 - pykwalify's SchemaError, or PyRadiomics' own ValueError
        messages = getattr(error, "msg", None) or str(error)
        raise ParamsError(f"{path}: {brief(messages, 300, quote=False)}") from None
    return params


def extractor_for(params: dict[str, Any]):
    """A PyRadiomics feature extractor for ``params`` (already validated), made once per
    process for each parameter set: building one validates the parameters against the
    schema, about a tenth of the time of measuring a region. (``execute`` works on a copy of
    the extractor's settings, so one extractor serves any number of regions.)"""
    return _extractor(json.dumps(params, sort_keys=True, default=str))


@functools.lru_cache(maxsize=16)
def _extractor(params_json: str):
    _quiet_radiomics()
    from radiomics import featureextractor

    return featureextractor.RadiomicsFeatureExtractor(json.loads(params_json))


def as_sitk(pixels: np.ndarray, spacing: tuple[float, float] | None):
    """A 2D SimpleITK image of an (H, W) array; ``spacing`` is (row, column) in mm."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(pixels))
    if spacing:
        image.SetSpacing((float(spacing[1]), float(spacing[0])))  # SimpleITK: (x, y)
    return image


def check_region(image: np.ndarray, mask: np.ndarray, label: int) -> None:
    """Refuse what PyRadiomics cannot measure, with the reason.

    Raises:
        RegionError: RGB image, size mismatch, empty mask, a label the mask does not hold,
            or a region one pixel thin.
    """
    if image.ndim != 2:
        raise RegionError(f"image is not grey ({'x'.join(map(str, image.shape))}); radiomics needs one channel")
    if mask.ndim != 2:
        raise RegionError(f"mask is not a single-channel image ({'x'.join(map(str, mask.shape))})")
    if mask.shape != image.shape:
        raise RegionError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image.shape[1]}x{image.shape[0]}")
    if not np.any(mask):
        raise RegionError("mask is empty")
    inside = mask == label
    if not np.any(inside):
        present = sorted(int(v) for v in np.unique(mask) if v)[:6]
        hint = " (a 0/255 mask: pass label 255)" if present == [255] else ""
        raise RegionError(f"mask has no pixel labelled {label}; its labels are {present}{hint}")
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    if height < 2 or width < 2:
        raise RegionError(f"region {label} is {width}x{height} pixels, a line: 2D features need at least 2 pixels each way")


def extract(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    spacing: tuple[float, float] | None = None,
    label: int = 1,
    params: dict[str, Any] | None = None,
    classes: tuple[str, ...] | None = None,
    extractor=None,
) -> dict[str, Any]:
    """PyRadiomics features (and its diagnostics) of the region ``mask == label``.

    Args:
        image: (H, W) intensities (e.g. the DICOM Modality-LUT output).
        mask: (H, W) integer labels.
        spacing: (row, column) pixel spacing in mm, when known.
        params: PyRadiomics parameters; default :func:`default_params` for this image.
        classes: only these feature classes (replacing the parameters' ``featureClass``).
        extractor: a prepared extractor (from :func:`extractor_for`), to reuse across regions.

    Raises:
        RegionError: the region cannot be measured (the reason is the message).
    """
    check_region(image, mask, label)
    if extractor is None:
        params = params or default_params(default_bin_width(image))
        if classes:
            params = {**params, "featureClass": {name: None for name in classes}}
        extractor = extractor_for(params)
    sitk_image = as_sitk(image.astype(np.float32, copy=False), spacing)
    sitk_mask = as_sitk(mask.astype(np.int32, copy=False), spacing)
    try:
        result = extractor.execute(sitk_image, sitk_mask, label=int(label))
    except ValueError as error:
        raise RegionError(" ".join(str(error).split())) from None
    return {key: _plain(value) for key, value in result.items()}


def _plain(value: Any) -> Any:
    """PyRadiomics returns numpy scalars and 0-d arrays; make them plain for CSV/JSON."""
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
