"""Reading studies: DICOM (every WG04 transfer syntax), PNG/JPEG, errors and discovery.

Real data comes from ../shared/data (see its README). Where it is absent, the real-DICOM
tests run on pydicom's and pydicom-data's real files of the same transfer syntaxes (see
conftest.real_dicom_files), and the NIH and SIIM tests skip with a reason. Everything else
builds tiny synthetic files in tmp_path.
"""

from __future__ import annotations

import io
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import NO_REAL_DICOM, REAL_DICOM, SHARED_DATA, RealDicom, RealDicomFiles
from PIL import Image, ImageFile
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_windowing, convert_color_space, get_decoder

from cxrtool.io.dicom import _patch_sequential_scan_end, _plugins, read_dicom
from cxrtool.io.images import _to_unit_grey, read_image
from cxrtool.io.studies import Study, StudyReadError, find_studies, sniff_format
from cxrtool.io.studies import read_study as _read_study


def read_study(path, **kwargs) -> Study:
    """The readers' arithmetic is checked on tiny synthetic images: no radiograph minimum."""
    return _read_study(path, **{"min_side": 1, **kwargs})

DATA = SHARED_DATA
SIIM = DATA / "dicom" / "siim" / "cxr_pa_jpeg_baseline.dcm"
NIH = DATA / "nih" / "images"

needs_dicom_data = pytest.mark.skipif(
    not ((DATA / "dicom" / "wg04").is_dir() and SIIM.is_file()),
    reason=f"shared DICOM test data not found under {DATA / 'dicom'} (see shared/data/README.md in the project's shared folder)",
)
needs_nih_data = pytest.mark.skipif(
    not NIH.is_dir(),
    reason=f"shared NIH ChestX-ray14 images not found at {NIH} (see shared/data/README.md in the project's shared folder)",
)

LOSSLESS = ("RLE", "JPLL", "JLSL", "J2KR")
LOSSY = ("JPLY", "JLSN", "J2KI")
TRANSFER_SYNTAXES = {
    "UNC": uid.ExplicitVRLittleEndian,
    "RLE": uid.RLELossless,
    "JPLL": uid.JPEGLosslessSV1,
    "JPLY": uid.JPEGExtended12Bit,
    "JLSL": uid.JPEGLSLossless,
    "JLSN": uid.JPEGLSNearLossless,
    "J2KR": uid.JPEG2000Lossless,
    "J2KI": uid.JPEG2000,
}
IDENTITY_KEYS = {"sop_instance_uid", "transfer_syntax", "modality", "photometric_interpretation"}


def _real(files: list[RealDicom]) -> list:
    """Parameters: the real DICOM files (the WG04 ones from ../shared, else pydicom's and
    pydicom-data's), or one that skips saying why there are none."""
    if files:
        return files
    reason = NO_REAL_DICOM if not REAL_DICOM.files else f"none of these in {REAL_DICOM.source}"
    return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]


EVERY_FILE = _real(list(REAL_DICOM.files))
UNCOMPRESSED = _real(REAL_DICOM.of("UNC"))
WITH_REFERENCE = {kind: _real([f for f in REAL_DICOM.of(*encodings) if f.reference])
                  for kind, encodings in (("lossless", LOSSLESS), ("lossy", LOSSY))}


# --------------------------------------------------------------------------- fixtures


class _DicomCache:
    """Each real file decoded at most once: JPEG 2000 at 2140x1760 takes a few 100 ms."""

    def __init__(self) -> None:
        self._studies: dict[Path, Study] = {}

    def __call__(self, path: Path) -> Study:
        if path not in self._studies:
            self._studies[path] = read_dicom(path, keep_rescaled=True)
        return self._studies[path]


@pytest.fixture(scope="module")
def decoded(real_dicom: RealDicomFiles) -> _DicomCache:
    return _DicomCache()


def _dataset(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **attributes: object,
) -> Dataset:
    """A minimal DX image with a file meta, the given pixels and extra attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID = uid.DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    # Identifying data that must never reach Study.identity.
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-4711"
    ds.PatientBirthDate = "19700101"
    bits = bits_stored if bits_stored is not None else pixels.dtype.itemsize * 8
    ds.set_pixel_data(pixels, photometric, bits)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- real DICOM (WG04, or pydicom-data)


@pytest.mark.parametrize("dicom", EVERY_FILE, ids=str)
def test_real_dicom_every_transfer_syntax_decodes(decoded: _DicomCache, dicom: RealDicom) -> None:
    study = decoded(dicom.path)
    assert study.shape == dicom.shape
    assert study.pixels.dtype == np.float32 and study.pixels.flags.c_contiguous
    assert 0.0 <= study.pixels.min() and study.pixels.max() <= 1.0
    assert np.isfinite(study.pixels).all()
    assert study.source_format == "dicom"
    assert set(study.identity) == IDENTITY_KEYS
    assert study.identity["transfer_syntax"] == TRANSFER_SYNTAXES[dicom.encoding].name
    assert study.identity["photometric_interpretation"] == dicom.photometric
    assert study.rescaled is not None and study.rescaled.dtype == np.float32
    # Never the patient: no name, ID or birth date in the identity.
    header = pydicom.dcmread(dicom.path, stop_before_pixels=True)
    for secret in filter(None, (str(header.get(k) or "") for k in ("PatientName", "PatientID", "PatientBirthDate"))):
        assert all(secret not in value for value in study.identity.values())


@pytest.mark.parametrize("dicom", UNCOMPRESSED, ids=str)
def test_real_dicom_rescaled_is_the_modality_lut_output(decoded: _DicomCache, dicom: RealDicom) -> None:
    # WG04 has no Modality LUT, so Study.rescaled is the raw stored values: that makes it
    # the array on which to compare decoders before any LUT.
    header = pydicom.dcmread(dicom.path)
    expected = apply_modality_lut(header.pixel_array, header).astype(np.float32)
    np.testing.assert_array_equal(decoded(dicom.path).rescaled, expected)


@pytest.mark.parametrize("dicom", WITH_REFERENCE["lossless"], ids=str)
def test_real_dicom_lossless_equals_uncompressed(decoded: _DicomCache, dicom: RealDicom) -> None:
    reference, study = decoded(dicom.reference), decoded(dicom.path)
    np.testing.assert_array_equal(study.rescaled, reference.rescaled)  # raw stored values
    np.testing.assert_array_equal(study.pixels, reference.pixels)  # after the LUTs


@pytest.mark.parametrize("dicom", WITH_REFERENCE["lossy"], ids=str)
def test_real_dicom_lossy_close_to_uncompressed(decoded: _DicomCache, dicom: RealDicom) -> None:
    reference, study = decoded(dicom.reference), decoded(dicom.path)
    value_range = float(reference.rescaled.max() - reference.rescaled.min())
    error = np.abs(study.rescaled - reference.rescaled)
    assert error.mean() < 0.01 * value_range
    # No wrapped values: lossy JPEG overshoots 10-bit data to 1024, which masking would
    # turn into 0 (an error of the whole range).
    assert error.max() < 0.25 * value_range
    if dicom.encoding == "JLSN":
        assert error.max() <= 8  # near-lossless: every pixel within a few levels
    assert np.abs(study.pixels - reference.pixels).mean() < 0.01


def test_real_dicom_monochrome1_is_inverted(decoded: _DicomCache, real_dicom: RealDicomFiles) -> None:
    def correlation(study: Study) -> float:
        return float(np.corrcoef(study.pixels.ravel(), study.rescaled.ravel())[0, 1])

    uncompressed = real_dicom.of("UNC")
    inverted = [f for f in uncompressed if f.photometric == "MONOCHROME1"]
    plain = [f for f in uncompressed if f.photometric == "MONOCHROME2"]
    if not (inverted and plain):
        pytest.skip(f"no uncompressed MONOCHROME1 and MONOCHROME2 files in {real_dicom.source}")
    assert correlation(decoded(inverted[0].path)) < -0.99  # MONOCHROME1: bone bright after inversion
    assert correlation(decoded(plain[0].path)) > 0.99


@pytest.mark.parametrize("dicom", UNCOMPRESSED, ids=str)
def test_real_dicom_window_applied(decoded: _DicomCache, dicom: RealDicom) -> None:
    # E.g. RG2 carries Window Center 511 / Width 1024 (LINEAR): PS3.3 C.11.2.1.2.1 by hand.
    header = pydicom.dcmread(dicom.path, stop_before_pixels=True)
    if "WindowCenter" not in header or str(header.get("VOILUTFunction") or "LINEAR") != "LINEAR":
        pytest.skip(f"{dicom} has no LINEAR window")
    center, width = float(header.WindowCenter), float(header.WindowWidth)
    study = decoded(dicom.path)
    expected = np.clip((study.rescaled.astype(np.float64) - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    if dicom.photometric == "MONOCHROME1":
        expected = 1 - expected
    np.testing.assert_allclose(study.pixels, expected, atol=1e-6)


@needs_dicom_data
def test_spacing_and_view_position() -> None:
    wg04 = DATA / "dicom" / "wg04"
    rg2, rg3 = read_dicom(wg04 / "RG2_UNC.dcm"), read_dicom(wg04 / "RG3_UNC.dcm")
    assert rg2.pixel_spacing == pytest.approx((0.2, 0.2))
    assert rg3.view_position == "AP"
    assert rg3.pixel_spacing is None

    siim = read_study(SIIM)
    assert siim.view_position == "PA"
    assert siim.pixel_spacing == pytest.approx((0.168, 0.168))
    assert siim.shape == (1024, 1024)
    assert siim.identity["transfer_syntax"] == uid.JPEGBaseline8Bit.name
    assert siim.rescaled is None  # only kept on request


@needs_dicom_data
def test_identity_never_carries_patient_data() -> None:
    header = pydicom.dcmread(SIIM, stop_before_pixels=True)
    study = read_study(SIIM)
    assert set(study.identity) == IDENTITY_KEYS
    assert all(isinstance(value, str) for value in study.identity.values())
    secrets = [str(header.get(k) or "") for k in ("PatientName", "PatientID", "PatientBirthDate")]
    for secret in filter(None, secrets):
        assert all(secret not in value for value in study.identity.values())


def test_truncated_uncompressed_dicom(tmp_path: Path, real_dicom: RealDicomFiles) -> None:
    big = [f for f in real_dicom.of("UNC") if f.shape[0] * f.shape[1] >= 1_000_000]
    if not big:
        pytest.skip(f"no uncompressed radiograph in {real_dicom.source}")
    data = big[-1].path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(StudyReadError, match="truncated or corrupt pixel data"):
        read_study(cut)


def test_truncated_compressed_dicom(tmp_path: Path, real_dicom: RealDicomFiles) -> None:
    # Cut inside the encapsulated Pixel Data: pydicom drops the element (with a warning).
    compressed = real_dicom.of("JLSL")
    if not compressed:
        pytest.skip(f"no JPEG-LS lossless file in {real_dicom.source}")
    data = compressed[-1].path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    # pydicom's warning ("End of file reached ...") is part of the reason, not raw stderr.
    with pytest.raises(StudyReadError, match="truncated") as raised:
        read_study(cut)
    assert "the decoder warned: pydicom: End of file reached" in str(raised.value)


# --------------------------------------------------------------------------- NIH PNG


@needs_nih_data
def test_nih_pngs_all_decode() -> None:
    paths = sorted(NIH.glob("*.png"))
    assert len(paths) == 388

    def check(path: Path) -> tuple[str, float]:
        study = read_study(path)
        assert study.shape == (1024, 1024), path.name
        assert study.pixels.dtype == np.float32
        assert study.source_format == "png" and study.identity == {"format": "png"}
        assert study.view_position == "UNKNOWN" and study.pixel_spacing is None
        return path.name, float(study.pixels.max())

    # PNG inflate releases the GIL: threads keep 388 full decodes to a few seconds.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        maxima = dict(pool.map(check, paths))
    assert all(0.0 < top <= 1.0 for top in maxima.values())


@needs_nih_data
def test_nih_rgba_pngs_become_grey() -> None:
    rgba = []
    for path in sorted(NIH.glob("*.png")):
        with Image.open(path) as image:  # header only: cheap
            if image.mode == "RGBA":
                rgba.append(path)
    assert rgba, "the NIH set is documented to hold a few RGBA images"
    for path in rgba:
        study = read_study(path)
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"), dtype=np.float32) / 255
        assert study.shape == (1024, 1024)
        assert "converted_from" not in study.identity  # grey in RGBA is not colour
        # Pillow's "L" rounds the same BT.601 luminance to 8 bits.
        assert np.abs(study.pixels - grey).max() <= 1 / 255 + 1e-6


# --------------------------------------------------------------------------- synthetic images


def test_png_8_bit_grey(tmp_path: Path) -> None:
    values = np.array([[0, 1, 128], [200, 254, 255]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "grey.png")
    study = read_image(tmp_path / "grey.png")
    np.testing.assert_allclose(study.pixels, values / 255, atol=1e-7)
    assert study.pixels.dtype == np.float32


def test_png_16_bit_grey(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 4095], [30000, 65534, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode.startswith("I")
    study = read_study(tmp_path / "grey16.png")
    np.testing.assert_allclose(study.pixels, values / 65535, atol=1e-7)
    assert study.identity == {"format": "png"}


def test_mode_i_scale_inferred_from_data() -> None:
    twelve_bit = np.array([[0, 2048, 4095]], dtype=np.int32)
    np.testing.assert_allclose(_to_unit_grey(Image.fromarray(twelve_bit))[0], twelve_bit / 4095)
    eight_bit = np.array([[0, 255]], dtype=np.int32)
    np.testing.assert_allclose(_to_unit_grey(Image.fromarray(eight_bit))[0], [[0, 1]])
    sixteen_bit = np.array([[0, 65535]], dtype=np.int32)
    np.testing.assert_allclose(_to_unit_grey(Image.fromarray(sixteen_bit))[0], [[0, 1]])


def test_rgb_jpeg_becomes_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[...] = (200, 100, 50)  # flat colour: JPEG keeps it almost exactly
    Image.fromarray(rgb).save(tmp_path / "colour.jpg", quality=95)
    study = read_study(tmp_path / "colour.jpg")
    assert study.source_format == "jpeg" and study.identity == {"format": "jpeg", "converted_from": "RGB"}
    luminance = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255
    assert study.pixels.shape == (16, 16)
    assert np.abs(study.pixels - luminance).max() < 3 / 255


def test_rgba_png_drops_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 100
    rgba[..., 3] = np.arange(16, dtype=np.uint8).reshape(4, 4) * 17  # alpha must not matter
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    study = read_image(tmp_path / "alpha.png")
    np.testing.assert_allclose(study.pixels, np.full((4, 4), 100 / 255), atol=1e-6)


def test_la_and_palette_png(tmp_path: Path) -> None:
    la = np.stack([np.full((3, 3), 51, np.uint8), np.full((3, 3), 7, np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(read_image(tmp_path / "la.png").pixels, 0.2, atol=1e-6)

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    pixels = read_image(tmp_path / "palette.png").pixels
    np.testing.assert_allclose(pixels, [[0, 1], [1, 0]], atol=1e-6)


def _noise_png(path: Path) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    return path.read_bytes()


def test_truncated_png_and_jpeg(tmp_path: Path) -> None:
    data = _noise_png(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(StudyReadError, match="truncated or corrupt image"):
        read_study(tmp_path / "cut.png")

    Image.open(tmp_path / "full.png").convert("RGB").save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(StudyReadError, match="truncated or corrupt image"):
        read_study(tmp_path / "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _noise_png(tmp_path / "big.png")  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit: Pillow refuses
    with pytest.raises(StudyReadError, match="too large"):
        read_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(StudyReadError, match="too large"):
            read_image(tmp_path / "big.png")


# --------------------------------------------------------------------------- synthetic DICOM


def test_dicom_monochrome1_rescale_and_window_by_hand(tmp_path: Path) -> None:
    stored = np.array(
        [
            [0, 100, 200, 300],
            [400, 500, 600, 700],
            [800, 900, 1000, 1100],
            [1200, 1300, 1400, 4095],
        ],
        dtype=np.uint16,
    )
    ds = _dataset(
        stored,
        "MONOCHROME1",
        12,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=[500, 40],  # two windows: the first one is used
        WindowWidth=[1001, 400],
    )
    study = read_study(_save(ds, tmp_path / "mono1.dcm"), keep_rescaled=True)

    rescaled = 2.0 * stored - 1000  # Modality LUT
    np.testing.assert_array_equal(study.rescaled, rescaled.astype(np.float32))
    # LINEAR window, C=500, W=1001: y = ((x - 499.5) / 1000 + 0.5) clipped to [0, 1];
    # MONOCHROME1 then shows 1 - y.
    expected = 1 - np.clip((rescaled - 499.5) / 1000 + 0.5, 0, 1)
    np.testing.assert_allclose(study.pixels, expected, atol=1e-6)
    # Spot checks worked out by hand: stored 0 -> -1000, below the window -> white (1.0);
    # stored 500 -> 0 -> y = 0.0005 -> 0.9995; stored 700 -> 400 -> y = 0.4005 -> 0.5995;
    # stored 800 -> 600 -> y = 0.6005 -> 0.3995; stored 1100 and above -> black.
    assert study.pixels[0, 0] == 1.0
    assert study.pixels[1, 1] == pytest.approx(0.9995, abs=1e-6)
    assert study.pixels[1, 3] == pytest.approx(0.5995, abs=1e-6)
    assert study.pixels[2, 0] == pytest.approx(0.3995, abs=1e-6)
    assert (study.pixels[2:, 2:] == 0).all() and study.pixels[3, 3] == 0
    assert study.identity["photometric_interpretation"] == "MONOCHROME1"
    assert not {"PatientName", "PatientID"} & set(study.identity)
    assert "Doe" not in repr(study.identity) and "SECRET" not in repr(study.identity)

    assert read_study(tmp_path / "mono1.dcm").rescaled is None


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_dicom_voi_lut_function_matches_pydicom(tmp_path: Path, function: str) -> None:
    stored = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    ds = _dataset(stored, WindowCenter=30000, WindowWidth=20000, VOILUTFunction=function)
    study = read_study(_save(ds, tmp_path / "voi.dcm"))
    # pydicom's output range is that of the stored values here: [0, 65535].
    expected = apply_windowing(stored.astype(np.float64), ds) / 65535
    np.testing.assert_allclose(study.pixels, expected, atol=1e-5)


def test_dicom_without_window_uses_min_max_and_constant_is_zero(tmp_path: Path) -> None:
    stored = np.array([[100, 150], [200, 300]], dtype=np.uint16)
    study = read_study(_save(_dataset(stored, bits_stored=12), tmp_path / "minmax.dcm"))
    np.testing.assert_allclose(study.pixels, (stored - 100) / 200, atol=1e-7)

    flat = np.full((3, 3), 42, dtype=np.uint16)
    study = read_study(_save(_dataset(flat, bits_stored=12), tmp_path / "flat.dcm"))
    assert not np.isnan(study.pixels).any() and (study.pixels == 0).all()


def test_dicom_invalid_window_falls_back_to_min_max(tmp_path: Path) -> None:
    stored = np.array([[0, 10], [20, 40]], dtype=np.uint16)
    ds = _dataset(stored, bits_stored=12, WindowCenter=10, WindowWidth=0)
    study = read_study(_save(ds, tmp_path / "bad_window.dcm"))
    np.testing.assert_allclose(study.pixels, stored / 40, atol=1e-7)


def test_dicom_signed_16_bit(tmp_path: Path) -> None:
    stored = np.array([[-1000, -1], [0, 3000]], dtype=np.int16)
    study = read_study(_save(_dataset(stored), tmp_path / "signed.dcm"), keep_rescaled=True)
    np.testing.assert_array_equal(study.rescaled, stored.astype(np.float32))
    np.testing.assert_allclose(study.pixels, (stored + 1000) / 4000, atol=1e-7)


def test_dicom_bits_stored_respected(tmp_path: Path) -> None:
    # Signed 12-bit in 16 with the unused high bits zero (not sign-extended): 0x0FFF is -1.
    ds = _dataset(np.array([[-2048, -1], [0, 2047]], dtype=np.int16), bits_stored=12)
    ds.PixelData = np.array([[0x0800, 0x0FFF], [0x0000, 0x07FF]], dtype="<u2").tobytes()
    study = read_study(_save(ds, tmp_path / "signed12.dcm"), keep_rescaled=True)
    np.testing.assert_array_equal(study.rescaled, [[-2048, -1], [0, 2047]])

    # Unsigned 12-bit with junk (e.g. an overlay bit) in bit 15: it must be ignored.
    ds = _dataset(np.zeros((2, 2), dtype=np.uint16), bits_stored=12)
    ds.PixelData = np.array([[0x8000 | 100, 200], [300, 0x8000 | 4095]], dtype="<u2").tobytes()
    study = read_study(_save(ds, tmp_path / "junk.dcm"), keep_rescaled=True)
    np.testing.assert_array_equal(study.rescaled, [[100, 200], [300, 4095]])


def test_dicom_modality_lut_sequence_and_voi_lut_sequence(tmp_path: Path) -> None:
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    ds = _dataset(stored, bits_stored=12)
    # LUT Descriptor and LUT Data have ambiguous VRs (US/SS, US/OW): state them.
    modality = Dataset()
    modality.add_new("LUTDescriptor", "US", [4, 0, 16])
    modality.add_new("LUTData", "US", [10, 20, 40, 80])
    modality.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [modality]
    voi = Dataset()
    voi.add_new("LUTDescriptor", "US", [256, 0, 8])  # maps inputs 0..255 to 8 bits
    voi.add_new("LUTData", "US", [min(255, 4 * value) for value in range(256)])
    ds.VOILUTSequence = [voi]
    study = read_study(_save(ds, tmp_path / "luts.dcm"), keep_rescaled=True)
    np.testing.assert_array_equal(study.rescaled, [[10, 20], [40, 80]])
    # 10 -> 40, 20 -> 80, 40 -> 160, 80 -> 320 capped at 255; output bits 8 -> / 255.
    np.testing.assert_allclose(study.pixels, [[40 / 255, 80 / 255], [160 / 255, 1.0]], atol=1e-6)


def test_dicom_rgb_and_ybr_become_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[1, 0], rgb[1, 1] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (90, 90, 90)
    expected = np.array([[0.299, 0.587], [0.114, 90 / 255]])
    study = read_study(_save(_dataset(rgb, "RGB", 8), tmp_path / "rgb.dcm"))
    assert study.identity["converted_from"] == "RGB"
    np.testing.assert_allclose(study.pixels, expected, atol=1e-6)

    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    study = read_study(_save(_dataset(ybr, "YBR_FULL", 8), tmp_path / "ybr.dcm"))
    assert study.identity["converted_from"] == "RGB"
    np.testing.assert_allclose(study.pixels, expected, atol=3 / 255)  # 8-bit YCbCr rounding


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_dicom_spacing_view_parsing(tmp_path: Path) -> None:
    pixels = np.zeros((2, 2), dtype=np.uint16)
    cases = [
        ({"PixelSpacing": [0.15, 0.16], "ViewPosition": "PA "}, (0.15, 0.16), "PA"),
        ({"ImagerPixelSpacing": [0.1, 0.1], "ViewPosition": "LL"}, (0.1, 0.1), "LATERAL"),
        ({"PixelSpacing": [0.0, 0.1], "ViewPosition": "RL"}, None, "LATERAL"),
        ({"PixelSpacing": [0.2], "ViewPosition": "LATERAL"}, None, "LATERAL"),
        ({"ViewPosition": "LAT"}, None, "LATERAL"),
        ({"ViewPosition": "ap"}, None, "AP"),  # invalid CS (lower case) but unambiguous
        ({"ViewPosition": "OBLIQUE"}, None, "UNKNOWN"),
        ({}, None, "UNKNOWN"),
    ]
    for index, (attributes, spacing, view) in enumerate(cases):
        ds = _dataset(pixels, bits_stored=12, **attributes)
        study = read_study(_save(ds, tmp_path / f"{index}.dcm"))
        assert study.pixel_spacing == (pytest.approx(spacing) if spacing else None), attributes
        assert study.view_position == view, attributes


def test_dicom_multi_frame_refused(tmp_path: Path) -> None:
    frames = np.zeros((2, 4, 4), dtype=np.uint16)
    ds = _dataset(frames, bits_stored=12)
    assert ds.NumberOfFrames == 2
    reason = r"multi-frame DICOM \(2 frames\) is not a single radiograph"
    with pytest.raises(StudyReadError, match=reason):
        read_study(_save(ds, tmp_path / "multi.dcm"))


def test_dicom_without_pixel_data_refused(tmp_path: Path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = uid.BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid.generate_uid()
    ds.SOPClassUID = uid.BasicTextSRStorage
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    with pytest.raises(StudyReadError, match="without pixel data: a structured report") as raised:
        read_study(_save(ds, tmp_path / "report.dcm"))
    assert "Basic Text SR Storage" in str(raised.value) and "truncated" not in str(raised.value)
    # an SR that references its images (and so names Rows-like attributes in its content)
    # is still a report, and so are pydicom's own SR, RT and waveform objects
    ds.Rows, ds.Columns = 2048, 2048
    with pytest.raises(StudyReadError, match="a structured report"):
        read_study(_save(ds, tmp_path / "report_with_sizes.dcm"))
    from pydicom.data import get_testdata_file

    for name, kind in (("test-SR.dcm", "a structured report"), ("rtplan.dcm", "a radiotherapy object"),
                       ("waveform_ecg.dcm", "a waveform")):
        with pytest.raises(StudyReadError, match=f"without pixel data: {kind}"):
            read_study(get_testdata_file(name))
    # an image object whose Pixel Data is missing is a truncated image, not a report
    del ds.Modality
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
    with pytest.raises(StudyReadError, match="truncated or corrupt pixel data"):
        read_study(_save(ds, tmp_path / "cut_image.dcm"))


def test_synthetic_truncated_dicom(tmp_path: Path) -> None:
    stored = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    data = _save(_dataset(stored, bits_stored=12), tmp_path / "full.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(StudyReadError, match="truncated or corrupt pixel data") as raised:
        read_study(tmp_path / "cut.dcm")
    assert "\n" not in str(raised.value)


def test_cut_compressed_frame_refused(tmp_path: Path) -> None:
    # pylibjpeg's JPEG-LS decoder returns a partly black image for a cut codestream.
    stored = np.random.default_rng(1).integers(0, 4096, (32, 32), dtype=np.uint16)
    ds = _dataset(stored, bits_stored=12)
    ds.compress(uid.JPEGLSLossless)
    np.testing.assert_array_equal(
        read_study(_save(ds, tmp_path / "jls.dcm"), keep_rescaled=True).rescaled, stored
    )
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) // 2]])
    with pytest.raises(StudyReadError, match="truncated or corrupt pixel data"):
        read_study(_save(ds, tmp_path / "jls_cut.dcm"))


def test_rust_decoder_panic_falls_through_to_the_next_plugin(tmp_path: Path) -> None:
    # Replicate runs that overflow a segment make pylibjpeg-rle panic (pyo3's
    # PanicException is a BaseException, not an Exception); the reader must go on to
    # pydicom's own RLE decoder, which reads the excess as padding, instead of crashing.
    ds = _dataset(np.zeros((32, 32), dtype=np.uint16), bits_stored=12)
    ds.file_meta.TransferSyntaxUID = uid.RLELossless
    segment = bytes([129, 5]) * 9  # 9 runs of 128 x 0x05: 1152 bytes for a 1024-byte segment
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13))
    ds.PixelData = pydicom.encaps.encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    study = read_study(_save(ds, tmp_path / "rle.dcm"), keep_rescaled=True)
    assert any("padding" in warning for warning in study.warnings)  # pydicom's warning, kept for the record
    assert (study.rescaled == 0x0505).all()  # both bytes 0x05, within the 12 bits stored


def test_gdcm_is_the_last_resort_plugin() -> None:
    # GDCM can abort the process (uncaught C++ exception) on corrupt input.
    for syntax in (uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.JPEGLosslessSV1, uid.RLELossless):
        decoder = get_decoder(syntax)
        plugins = _plugins(decoder)
        others = set(decoder.available_plugins) - {"gdcm"}
        assert plugins == ["gdcm"] if not others else "gdcm" not in plugins
    assert _plugins(get_decoder(uid.ExplicitVRLittleEndian)) == [""]


def test_sequential_jpeg_scan_end_patch(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.jpg")
    good = (tmp_path / "x.jpg").read_bytes()
    assert _patch_sequential_scan_end(good) is None  # Se is already 63
    sos = good.index(b"\xff\xda")
    se = sos + 5 + 2 * good[sos + 4] + 1
    assert good[se] == 63
    bad = good[:se] + b"\x00" + good[se + 1 :]
    assert _patch_sequential_scan_end(bad) == good


def test_dicom_without_preamble_or_file_meta(tmp_path: Path) -> None:
    stored = np.array([[1, 2], [3, 4]], dtype=np.uint16)
    ds = _dataset(stored, bits_stored=12)
    del ds.file_meta
    path = tmp_path / "1.2.826.0.1.3680043.8.498.1"  # UID-named: no usable extension
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    bare = tmp_path / "bare"
    bare.write_bytes(path.read_bytes())
    study = read_study(bare)
    np.testing.assert_allclose(study.pixels, (stored - 1) / 3, atol=1e-7)
    assert study.identity["transfer_syntax"] == uid.ImplicitVRLittleEndian.name


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_dicom_reader_refuses_other_formats(tmp_path: Path) -> None:
    _noise_png(tmp_path / "image.png")
    with pytest.raises(StudyReadError, match="not a DICOM"):
        read_dicom(tmp_path / "image.png")
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"\x01" * 40)
    with pytest.raises(StudyReadError, match="invalid or corrupt DICOM header") as raised:
        read_study(garbage)
    assert "\n" not in str(raised.value)


def test_unreadable_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "notes.png").write_text("not an image either\n")
    cases = {
        "empty.dcm": "empty file",
        "notes.txt": "not a DICOM, PNG or JPEG",
        "notes.png": "not a DICOM, PNG or JPEG",
        "missing.png": "(?i)no such file",
    }
    for name, reason in cases.items():
        with pytest.raises(StudyReadError, match=reason):
            read_study(tmp_path / name)


# --------------------------------------------------------------------------- dispatch and discovery


def test_read_study_dispatches_on_content(tmp_path: Path) -> None:
    stored = np.array([[0, 4095]], dtype=np.uint16)
    disguised = _save(_dataset(stored, bits_stored=12), tmp_path / "really_dicom.png")
    assert sniff_format(disguised) == "dicom"
    assert read_study(disguised).source_format == "dicom"

    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "really_jpeg.dcm", format="JPEG")
    assert read_study(tmp_path / "really_jpeg.dcm").source_format == "jpeg"


def test_find_studies(tmp_path: Path) -> None:
    nested = tmp_path / "study" / "series"
    nested.mkdir(parents=True)
    grey = np.zeros((2, 2), np.uint8)
    Image.fromarray(grey).save(tmp_path / "study" / "a.png")
    Image.fromarray(grey).save(nested / "b.jpg")
    _save(_dataset(np.zeros((2, 2), np.uint16), bits_stored=12), nested / "1.2.840.113619.2.55.3")
    _save(_dataset(np.zeros((2, 2), np.uint16), bits_stored=12), nested / "IM0001")  # no extension
    (nested / "README").write_text("not a study\n")
    (nested / "labels.csv").write_text("a,b\n")
    (nested / ".hidden.png").write_bytes((tmp_path / "study" / "a.png").read_bytes())
    overlay = "b.jpg.cxrtool.0123456789ab.Effusion.overlay.png"  # a model's picture of b.jpg
    (nested / overlay).write_bytes((tmp_path / "study" / "a.png").read_bytes())
    (nested / "patient.cxrtool.png").write_bytes((tmp_path / "study" / "a.png").read_bytes())  # a study all the same
    for curves in ("roc_curves.png", "pr_curves.png"):  # what evaluate leaves in an evaluated folder
        (tmp_path / "study" / curves).write_bytes((tmp_path / "study" / "a.png").read_bytes())
        (nested / curves).write_bytes((tmp_path / "study" / "a.png").read_bytes())  # no report here: studies
    (tmp_path / "study" / "evaluation.json").write_text("{}")
    (tmp_path / "study" / "cxrtool_predictions.csv").write_text("path\n")  # a folder's table: ours, said so

    passed: dict[str, int] = {}
    found = list(find_studies([tmp_path / "study"], passed=passed))
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "study/a.png",
        "study/series/1.2.840.113619.2.55.3",
        "study/series/IM0001",
        "study/series/b.jpg",
        "study/series/patient.cxrtool.png",
        "study/series/pr_curves.png",
        "study/series/roc_curves.png",
    ]
    assert passed == {"cxrtool's own outputs": 5, "hidden": 1, "not an image": 2}  # (evaluation.json among the own)
    for path in found:
        read_study(path)  # all of them really are studies

    # Globs, duplicates (same file by folder, glob and explicit path) and a missing name.
    # An explicit glob takes what it matches (cxrtool outputs included; hidden files not).
    pattern = str(tmp_path / "**" / "*.png")
    inputs = [pattern, tmp_path / "study", tmp_path / "study" / "a.png", "nope.png"]
    result = list(find_studies(inputs))
    assert [p.name for p in result] == [
        "a.png",
        "pr_curves.png",
        "roc_curves.png",
        overlay,
        "patient.cxrtool.png",
        "pr_curves.png",
        "roc_curves.png",
        "1.2.840.113619.2.55.3",
        "IM0001",
        "b.jpg",
        "nope.png",
    ]
    assert len(set(p.absolute() for p in result)) == len(result)
    assert result[-1] == Path("nope.png")

    # "-": paths on stdin, blank lines ignored, folders expanded, duplicates dropped.
    stdin = io.StringIO(f"{nested / 'b.jpg'}\n\n{nested}\n{nested / 'b.jpg'}\n")
    from_stdin = list(find_studies(["-"], stdin=stdin))
    assert [p.name for p in from_stdin] == ["b.jpg", "1.2.840.113619.2.55.3", "IM0001", "patient.cxrtool.png",
                                            "pr_curves.png", "roc_curves.png"]
