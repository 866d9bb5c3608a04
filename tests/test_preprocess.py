"""TorchXRayVision's resize, made fast: equal to skimage's own on real radiographs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from cxrtool import preprocess
from cxrtool.io.studies import read_study


def skimage_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from skimage.transform import resize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resize(image[None], (1, height, width), mode="constant", preserve_range=True)[0]  # as XRayResizer calls it


@pytest.fixture(scope="module")
def radiographs(nih_dir: Path, dicom_dir: Path) -> dict[str, np.ndarray]:
    """Real images in XRV's units ([-1024, 1024]), as the skimage resample sees them."""
    paths = {"nih": sorted((nih_dir / "images").glob("*.png"))[0], "rg2": dicom_dir / "wg04" / "RG2_UNC.dcm"}
    return {name: ((read_study(path).pixels - 0.5) * 2048).astype(np.float32) for name, path in paths.items()}


@pytest.mark.parametrize(("name", "window", "size"), [
    ("nih", (slice(None), slice(None)), (224, 224)),      # 1024 -> 224: the DenseNets' case
    ("rg2", (slice(190, 1950), slice(None)), (512, 512)),  # a centre-cropped 2140 x 1760 DICOM -> 512: the ResNet-50's
    ("rg2", (slice(0, 200), slice(0, 180)), (224, 224)),  # enlarging a dark corner: the clip to the input's range matters
    ("nih", (slice(0, 300), slice(0, 900)), (224, 224)),  # one axis shrinks, the other grows
])
def test_the_fast_resize_is_skimages(radiographs, name, window, size, monkeypatch):
    monkeypatch.setattr(preprocess, "_OPERATORS", {})  # as a fresh process: no length seen yet
    monkeypatch.setattr(preprocess, "_LENGTHS_SEEN", set())
    image = np.ascontiguousarray(radiographs[name][window])
    expected = skimage_reference(image, *size)
    first = preprocess.skimage_resize(image, *size)  # a new size: skimage itself
    again = preprocess.skimage_resize(image, *size)  # seen before: the sparse operators
    assert (image.shape[0], size[0]) in preprocess._OPERATORS and (image.shape[1], size[1]) in preprocess._OPERATORS
    assert first.dtype == again.dtype == np.float32 and again.shape == size
    np.testing.assert_allclose(first, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(again, expected, rtol=0, atol=2e-3)  # float32 rounding of values up to 1024
