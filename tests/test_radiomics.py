"""Radiomic features of one region: equal to PyRadiomics called directly, true 2D images with
their spacing, bad regions and parameter files refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest

from cxrtool.radiomics.features import (
    ParamsError,
    RegionError,
    as_sitk,
    default_bin_width,
    default_params,
    extract,
    load_params,
)


@pytest.fixture(scope="module")
def region():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:80]
    image = (1000 + 800 * np.exp(-((yy - 40) ** 2 + (xx - 44) ** 2) / 300) + rng.normal(0, 40, (96, 80))).astype(np.float32)
    mask = np.zeros((96, 80), np.uint8)
    mask[((yy - 40) ** 2 + (xx - 44) ** 2) < 18**2] = 1
    return image, mask


def test_features_equal_pyradiomics_called_directly(region):
    import SimpleITK as sitk
    from radiomics import featureextractor

    image, mask = region
    params = {"imageType": {"Original": {}, "LoG": {"sigma": [2.0]}},
              "featureClass": {"firstorder": None, "glcm": None, "shape2D": None},
              "setting": {"binWidth": 25.0, "label": 1}}
    ours = extract(image, mask, spacing=(0.5, 0.25), params=params)
    direct_image = sitk.GetImageFromArray(image)
    direct_image.SetSpacing((0.25, 0.5))
    direct_mask = sitk.GetImageFromArray(mask.astype(np.int32))
    direct_mask.CopyInformation(direct_image)
    direct = featureextractor.RadiomicsFeatureExtractor(params).execute(direct_image, direct_mask)
    features = [key for key in direct if not key.startswith("diagnostics_")]
    assert len(features) > 40 and any(key.startswith("log-sigma-2-0-mm") for key in features)
    for key in features:
        assert ours[key] == pytest.approx(float(direct[key]), rel=1e-9, abs=1e-12), key


def test_true_2d_images_with_spacing_give_2d_shape_in_square_millimetres(region):
    image, mask = region
    sitk_image = as_sitk(image, (0.5, 0.25))
    assert sitk_image.GetDimension() == 2 and sitk_image.GetSpacing() == (0.25, 0.5)
    features = extract(image, mask, spacing=(0.5, 0.25))  # the cxrtool 2D default
    assert features["original_shape2D_PixelSurface"] == pytest.approx(mask.sum() * 0.125)
    assert not any("shape_" in key and "shape2D" not in key for key in features)  # no 3D shape features
    assert any(key.startswith("wavelet-") for key in features) and any(key.startswith("log-sigma-1-0-mm") for key in features)
    assert features["diagnostics_Configuration_Settings"]["binWidth"] == 64.0  # 12-bit range / 64


def test_bad_regions_are_refused_with_a_reason(region):
    image, mask = region
    cases = [
        (np.dstack([image] * 3), mask, 1, "not grey"),
        (image, mask[:90], 1, "mask is 80x90 but the image is 80x96"),
        (image, np.zeros_like(mask), 1, "mask is empty"),
        (image, mask * 255, 1, "pass label 255"),
        (image, mask * 2, 1, "no pixel labelled 1; its labels are [2]"),
    ]
    for pixels, labels, label, reason in cases:
        with pytest.raises(RegionError, match=reason.replace("[", r"\[").replace("]", r"\]")):
            extract(pixels, labels, label=label)
    assert extract(image, mask * 255, label=255)["original_shape2D_PixelSurface"] == mask.sum()


def test_parameter_files_are_validated_by_pyradiomics_schema(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("imageType:\n  Original: {}\nfeatureClass:\n  firstorder:\nsetting:\n  binWidth: 10\n")
    assert load_params(good)["setting"]["binWidth"] == 10
    bad = tmp_path / "bad.yaml"
    bad.write_text("setting:\n  binWidth: 10\n  binWidht: 5\n")
    with pytest.raises(ParamsError, match="binWidht"):
        load_params(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("setting: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)
    with pytest.raises(ParamsError, match="No such file"):
        load_params(tmp_path / "missing.yaml")


def test_default_bin_width_follows_the_encoding_range():
    assert default_bin_width(np.array([0.0, 0.7])) == pytest.approx(1 / 64)
    assert default_bin_width(np.array([0, 200])) == 4.0
    assert default_bin_width(np.array([0, 3000])) == 64.0
    assert default_bin_width(np.array([0, 40000])) == 1024.0
    assert default_bin_width(np.array([-1000.0, 2200.0])) == 50.0
    assert default_params(4.0)["setting"]["binWidth"] == 4.0
