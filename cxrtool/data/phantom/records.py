"""The phantoms' records: a patient's traits, a rendered case with its ground truth, what a
cohort wrote, and the picklable work items :func:`generate_cohort` hands to its workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrtool.data.phantom.constants import NO_FINDING

# --------------------------------------------------------------------------------------
# Public records
# --------------------------------------------------------------------------------------


@dataclass
class PhantomPatient:
    """Patient-level traits shared by all images (follow-ups) of one phantom patient.

    Attributes:
        number: the NIH-style integer patient id.
        sex: "M" or "F".
        age: years.
        scale: overall body size factor (1.0 = average adult).
        width_ratio: extra factor on the thoracic width (habitus).
        height_ratio: extra factor on the lung height.
        habitus: soft-tissue thickness factor (thin < 1 < obese).
        breast: breast-shadow strength (0 for men).
        heart_quantile: where in the CTR range this patient's heart sits (0-1).
    """

    number: int
    sex: str
    age: int
    scale: float
    width_ratio: float
    height_ratio: float
    habitus: float
    breast: float
    heart_quantile: float

    @property
    def patient_id(self) -> str:
        """The fake DICOM Patient ID, e.g. ``PHANTOM-00042``."""
        return f"PHANTOM-{self.number:05d}"

    @property
    def patient_name(self) -> str:
        """The fake DICOM Patient's Name, e.g. ``Phantom^00042``."""
        return f"Phantom^{self.number:05d}"


@dataclass
class PhantomCase:
    """One rendered phantom radiograph with its ground truth.

    Attributes:
        image: float32 (H, W) in [0, 1], bone bright (like a windowed MONOCHROME2 film).
        findings: the findings drawn, in ``PHANTOM_FINDINGS`` order (empty: "No Finding").
        masks: bool (H, W) per present finding.
        boxes: per present finding, one ``[x, y, w, h]`` pixel box per connected component
            of its mask (NIH BBox_List convention: x, y = top-left corner).
        view_position: "PA", "AP" or "LATERAL".
        pixel_spacing: (row, column) spacing in millimetres.
        ctr: cardiothoracic ratio as drawn (AP magnification included); on a lateral film
            the patient's frontal-equivalent ratio that sized the heart. > 0.5 exactly when
            Cardiomegaly is present.
        patient_id: fake DICOM Patient ID (``PHANTOM-00042``).
        age: patient age in years.
        sex: "M" or "F".
        anatomy: bool masks of normal structures ("lung_right", "lung_left" or "lungs" on a
            lateral, "heart", "costophrenic_right"/"costophrenic_left" or
            "costophrenic_posterior"), for tests and segmentation demos.
    """

    image: np.ndarray
    findings: tuple[str, ...]
    masks: dict[str, np.ndarray]
    boxes: dict[str, list[tuple[float, float, float, float]]]
    view_position: str
    pixel_spacing: tuple[float, float]
    ctr: float
    patient_id: str
    age: int = 50
    sex: str = "M"
    anatomy: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def labels(self) -> str:
        """NIH ``Finding Labels`` string: ``|``-joined, or ``No Finding``."""
        return "|".join(self.findings) if self.findings else NO_FINDING


@dataclass
class CohortInfo:
    """What :func:`generate_cohort` wrote.

    Attributes:
        out_dir: the cohort folder.
        images_dir: folder holding the images.
        data_entry_csv: NIH-format labels (``Data_Entry.csv``).
        bbox_csv: NIH-format boxes (``BBox_List.csv``).
        masks_dir: per-image mask folders, or None when masks were not written.
        n_images: images written.
        n_patients: distinct patients.
        finding_counts: images per finding (``No Finding`` included).
        image_format: "png" or "dicom".
        seconds: wall time of the generation.
    """

    out_dir: Path
    images_dir: Path
    data_entry_csv: Path
    bbox_csv: Path
    masks_dir: Path | None
    n_images: int
    n_patients: int
    finding_counts: dict[str, int]
    image_format: str
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("inf")


# --------------------------------------------------------------------------------------
# Cohort work items: generate_cohort plans them, its workers (or itself) render them
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One image to render and write (picklable, for worker processes)."""

    index: int
    patient: int
    followup: int
    view: str
    findings: tuple[str, ...]
    transfer_syntax: str
    monochrome1: bool
    intercept: int
    windowed: bool
    modality: str


@dataclass(frozen=True)
class _Settings:
    images_dir: str
    masks_dir: str | None
    size: int
    seed: int
    image_format: str
    verify: bool
