"""Shared fixtures: the real data in ../shared/data, offline hub, a fixed console width."""

from __future__ import annotations

import csv
import os
import tempfile
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

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real NIH and DICOM data; tests using it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
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
