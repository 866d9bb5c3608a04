"""Writing a phantom as a real DICOM DX/CR object (deterministic UIDs, four lossless transfer
syntaxes) and reading it back to check the pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrtool.data.phantom.constants import DICOM_VIEW_POSITION, TRANSFER_SYNTAXES
from cxrtool.data.phantom.records import PhantomCase, _Job, _Settings

# SOP classes written (both with an X-ray modality, unlike Secondary Capture).
_DX_PRESENTATION_SOP = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image - For Presentation
_CR_SOP = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image
_DICOM_MAX_VALUE = 4095  # BitsStored 12
# Detector pixel spacing = patient-plane spacing * radiographic magnification.
_MAGNIFICATION = {"PA": 1.08, "AP": 1.15, "LATERAL": 1.12}
_PATIENT_ORIENTATION = {"PA": ["L", "F"], "AP": ["L", "F"], "LATERAL": ["P", "F"]}


def _write_dicom(path: Path, case: PhantomCase, job: _Job, settings: _Settings) -> None:
    """Write a real DICOM DX/CR object with deterministic UIDs and verify it reads back."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    values = np.round(case.image * _DICOM_MAX_VALUE).astype(np.uint16)
    # MONOCHROME1: minimum value is white, so the stored values are inverted; a reader
    # that honours the photometric interpretation shows the same picture.
    stored = (_DICOM_MAX_VALUE - values).astype(np.uint16) if job.monochrome1 else values

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=["cxrtool-phantom", str(settings.seed), *map(str, parts)])

    number = f"{job.patient:05d}"
    sop_class = _DX_PRESENTATION_SOP if job.modality == "DX" else _CR_SOP
    sop_instance = uid("sop", job.patient, job.followup)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = uid("study", job.patient, job.followup)
    ds.SeriesInstanceUID = uid("series", job.patient, job.followup)
    date = f"2020{1 + job.followup % 12:02d}{1 + job.patient % 28:02d}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{8 + job.index % 10:02d}{job.index % 60:02d}00"
    ds.AccessionNumber = f"PHA{job.patient:05d}{job.followup:02d}"
    ds.Modality = job.modality
    ds.Manufacturer = "cxrtool phantom"
    ds.InstitutionName = "Phantom General Hospital"
    ds.ReferringPhysicianName = "Referrer^Phantom"
    ds.StudyDescription = "CHEST"
    ds.SeriesDescription = f"CHEST {DICOM_VIEW_POSITION[job.view]}"
    # Fake identifiers on purpose: tests check that cxrtool never echoes them.
    ds.PatientName = f"Phantom^{number}"
    ds.PatientID = f"PHANTOM-{number}"
    ds.PatientBirthDate = f"{2020 - case.age}0101"
    ds.PatientSex = case.sex
    ds.PatientAge = f"{case.age:03d}Y"
    ds.StudyID = f"{job.followup + 1}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = DICOM_VIEW_POSITION[job.view]
    ds.PatientOrientation = _PATIENT_ORIENTATION[job.view]
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    if job.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    spacing = case.pixel_spacing
    magnification = _MAGNIFICATION[job.view]
    ds.PixelSpacing = [f"{spacing[0]:.6f}", f"{spacing[1]:.6f}"]
    ds.ImagerPixelSpacing = [f"{spacing[0] * magnification:.6f}", f"{spacing[1] * magnification:.6f}"]
    ds.EstimatedRadiographicMagnificationFactor = f"{magnification:.2f}"
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.set_pixel_data(
        stored, "MONOCHROME1" if job.monochrome1 else "MONOCHROME2", 12, generate_instance_uid=False
    )
    ds.RescaleIntercept = str(job.intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    if job.windowed:
        lo, hi = int(stored.min()), int(stored.max())
        ds.WindowCenter = f"{(lo + hi) / 2.0 + job.intercept:.1f}"
        ds.WindowWidth = f"{max(hi - lo + 1, 2)}"
        ds.VOILUTFunction = "LINEAR"
    ts = TRANSFER_SYNTAXES[job.transfer_syntax]
    if ts != ExplicitVRLittleEndian:
        ds.compress(ts, stored, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    if settings.verify:
        back = _decode(path, job.transfer_syntax)
        if back.shape != stored.shape or not np.array_equal(back, stored):
            raise RuntimeError(f"{path.name}: {job.transfer_syntax} round trip is not lossless")


# Fastest installed decoder per syntax for the read-back check (pydicom's default order
# prefers GDCM, ~1.6x slower for JPEG-LS); any other installed plugin works too.
_VERIFY_DECODER = {"jpeg-ls": "pyjpegls"}


def _decode(path: Path, transfer_syntax: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    plugin = _VERIFY_DECODER.get(transfer_syntax, "")
    try:
        return pixel_array(path, decoding_plugin=plugin)
    except (RuntimeError, ValueError):
        if not plugin:
            raise
        return pixel_array(path)
