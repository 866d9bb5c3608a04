"""Synthetic chest radiographs ("phantoms") with ground truth: cxrtool's embedded cohort.

No real pretrained chest X-ray weights or images can be shipped, so demos, tests and
benchmarks train on phantoms instead. A phantom is drawn the way a radiograph forms: an
attenuation map (soft tissue, bone and blood add, air in the lungs takes away) is built in
patient millimetres, projected onto the detector grid with the patient's size, rotation and
position, blurred, given quantum (Poisson-like) noise and windowed, so bone and dense tissue
are bright and air is dark.

Findings follow their radiological appearance and come with pixel masks and boxes:

* Cardiomegaly: cardiothoracic ratio (CTR) > 0.5 (normal 0.38-0.48; recorded per image).
* Effusion: homogeneous basal opacity that blunts the costophrenic angle, meniscus rising
  laterally (posteriorly on a lateral film), one or both sides.
* Nodule (< 3 cm) and Mass (> 3 cm, lobulated): round opacities inside a lung field.
* Pneumothorax: apical/lateral rim of pure air without lung markings, thin visceral
  pleural line at the retracted lung edge.
* Consolidation: dense patchy lobar opacity with air bronchograms.
* Edema: bilateral perihilar "bat-wing" haze, blurred vessels, Kerley-B lines.
* Atelectasis: plate-like band or lobar wedge with volume loss (raised hemidiaphragm,
  mediastinal shift).

:func:`generate_cohort` writes a folder that imitates the NIH ChestX-ray14 release
(``images/``, ``Data_Entry.csv``, ``BBox_List.csv``) as PNG or as real DICOM (DX/CR,
MONOCHROME1/2, four lossless transfer syntaxes), plus per-finding masks.

Everything is seeded and deterministic: the same seed gives the same pixels, labels and
DICOM UIDs, whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from cxrtool.registry import PHANTOM_FINDINGS

__all__ = [
    "PhantomCase",
    "PhantomPatient",
    "CohortInfo",
    "VIEWS",
    "TRANSFER_SYNTAXES",
    "NIH_DATA_ENTRY_HEADER",
    "NIH_BBOX_HEADER",
    "render_case",
    "sample_findings",
    "sample_patient",
    "generate_cohort",
    "write_study_folder",
    "contact_sheet",
]

# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------

VIEWS: tuple[str, ...] = ("PA", "AP", "LATERAL")
DEFAULT_VIEW_PROBABILITIES: dict[str, float] = {"PA": 0.6, "AP": 0.3, "LATERAL": 0.1}
# DICOM ViewPosition defined terms (PS3.3 C.8.11.5); laterals are written "LL" there and in
# the CSV, which cxrtool's label reader maps back to "LATERAL".
DICOM_VIEW_POSITION: dict[str, str] = {"PA": "PA", "AP": "AP", "LATERAL": "LL"}

# Short names accepted by ``transfer_syntaxes`` -> DICOM transfer syntax UIDs (all lossless).
TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless
    "jpeg-ls": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "jpeg2000": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only)
}

NIH_DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
NIH_BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
NO_FINDING = "No Finding"

# --------------------------------------------------------------------------------------
# Anatomy of an average adult, in millimetres (x: patient's left = image right, y: down;
# origin near the middle of the thorax). Per-patient scale factors multiply these.
# --------------------------------------------------------------------------------------

FIELD_OF_VIEW_MM = (350.0, 430.0)  # detector field covered by the whole image
THORAX_HALF_WIDTH_MM = 136.0  # midline to inner rib margin at the costophrenic angle
APEX_Y_MM = -150.0  # lung apex
CP_ANGLE_Y_MM = 100.0  # lateral costophrenic angle (right)
APEX_X_FRACTION = 0.42  # apex sits ~0.4 of the hemithorax width from the midline
LATERAL_WIDEST_FRACTION = 0.62  # the lateral lung border reaches full width this far down
MEDIAL_CURVE_FRACTION = 0.22  # the medial border meets the mediastinum this far down
LUNG_BASE_FLARE_MM = 8.0  # the lungs widen a little towards the bases
DOME_PEAK_X_FRACTION = 0.44  # hemidiaphragm dome peak, fraction of the hemithorax width
DOME_RISE_MM = 44.0  # dome peak above the costophrenic angle
DOME_LATERAL_EXPONENT = 2.3  # >2 steepens the dome laterally: sharp, acute CP angles
LEFT_DOME_DROP_MM = 16.0  # the left hemidiaphragm sits lower (the liver pushes the right up)
MEDIASTINUM_HALF_WIDTH_MM = 24.0
AORTIC_KNOB = (-86.0, 17.0, 15.0)  # (y, bulge into the left lung, vertical sd) in mm
CHEST_WALL_MM = 24.0  # ribs + muscle + fat lateral to the lungs
NECK_HALF_WIDTH_MM = 52.0
SHOULDER_BULGE_MM = 34.0
SPINE_HALF_WIDTH_MM = (19.0, 25.0)  # upper thoracic -> lumbar
VERTEBRA_HEIGHT_MM = 25.0
TRACHEA_HALF_WIDTH_MM = 8.0
CARINA_BELOW_APEX_MM = 88.0
HILUM_X_FRACTION = (0.30, 0.38)  # hilum distance from the midline / hemithorax width
HILUM_Y_FRACTION = (0.36, 0.44)  # hilum below the apex / lung height
CLAVICLE_HALF_THICKNESS_MM = 6.5
RIB_HALF_THICKNESS_MM = (3.6, 5.8)  # posterior rib 1 -> rib 10
RIB_FIRST_SPACING_MM = (15.0, 19.0)
RIB_SPACING_GROWTH_MM = (0.8, 1.4)  # spacing grows by this per rib going down
RIB_ARCH_MM = 11.0  # posterior ribs arch upwards from the spine ...
RIB_DROP_MM = (20.0, 42.0)  # ... and drop towards the lateral wall (upper -> lower ribs)
N_POSTERIOR_RIBS = 11
N_ANTERIOR_RIBS = 7
LATERAL_DEPTH_RATIO = 0.76  # sagittal (AP) depth / transverse width of the thorax

# Cardiothoracic ratio ranges (heart width / internal thoracic width) as drawn on the image.
NORMAL_CTR = (0.38, 0.48)
CARDIOMEGALY_CTR = (0.53, 0.66)
CTR_THRESHOLD = 0.5
AP_HEART_MAGNIFICATION = (1.10, 1.15)  # the heart is far from the detector on an AP film

NODULE_DIAMETER_MM = (9.0, 26.0)  # Fleischner: a nodule is < 3 cm
MASS_DIAMETER_MM = (34.0, 72.0)  # a mass is > 3 cm

# Attenuation units: 1.0 ~ the full soft-tissue thickness of the mid-chest.
LUNG_AIR = 0.60  # attenuation removed by a full-depth lung
HEART_DENSITY = 0.16
RIB_DENSITY = 0.085
CLAVICLE_DENSITY = 0.16
SPINE_DENSITY = 0.12
VESSEL_DENSITY = 0.12
ATTENUATION_KAPPA = 2.6  # detector counts fall as exp(-kappa * attenuation)
REFERENCE_COUNTS = 9000.0  # photons per 1.6 mm pixel behind air-free tissue of 0 thickness
REFERENCE_SPACING_MM = 1.6


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
# Co-occurrence model
# --------------------------------------------------------------------------------------

# Three hidden disease processes drive most findings: heart failure, infection and
# neoplasm. Each finding is a noisy-OR of its parents (latents and earlier findings) with a
# small leak, so Edema travels with Cardiomegaly and Effusion, Atelectasis with Effusion and
# Consolidation, and most images with a finding carry one or two while a few carry four.
_LATENT_PREVALENCE: dict[str, float] = {"heart_failure": 0.13, "infection": 0.11, "neoplasm": 0.11}
_NOISY_OR: dict[str, tuple[float, dict[str, float]]] = {
    "Cardiomegaly": (0.055, {"heart_failure": 0.72}),
    "Edema": (0.012, {"heart_failure": 0.55, "Cardiomegaly": 0.12}),
    "Effusion": (0.085, {"heart_failure": 0.55, "infection": 0.30, "neoplasm": 0.30, "Edema": 0.25}),
    "Consolidation": (0.025, {"infection": 0.72}),
    "Atelectasis": (0.075, {"Effusion": 0.32, "Consolidation": 0.30, "neoplasm": 0.15}),
    "Nodule": (0.055, {"neoplasm": 0.42}),
    "Mass": (0.018, {"neoplasm": 0.38}),
    "Pneumothorax": (0.047, {"Atelectasis": 0.03}),
}
# Sampling order: parents before children.
_SAMPLING_ORDER = (
    "Cardiomegaly", "Edema", "Effusion", "Consolidation", "Atelectasis", "Nodule", "Mass",
    "Pneumothorax",
)  # fmt: skip


def sample_findings(rng: np.random.Generator) -> tuple[str, ...]:
    """Draw one image's findings from the co-occurrence model.

    Marginal prevalences are about Effusion 0.25, Atelectasis 0.2, Cardiomegaly 0.15,
    Edema 0.1, Consolidation 0.1, Nodule 0.1, Mass 0.06, Pneumothorax 0.05, with ~40%
    "No Finding". Always consumes the same number of random draws.

    Args:
        rng: the random generator.

    Returns:
        The findings, in ``PHANTOM_FINDINGS`` order (empty for "No Finding").

    Example:
        >>> rng = np.random.default_rng(0)
        >>> sample_findings(rng)
        ()
    """
    draws = rng.random(len(_LATENT_PREVALENCE) + len(_SAMPLING_ORDER))
    state: dict[str, bool] = {}
    for i, (name, prevalence) in enumerate(_LATENT_PREVALENCE.items()):
        state[name] = bool(draws[i] < prevalence)
    offset = len(_LATENT_PREVALENCE)
    for i, name in enumerate(_SAMPLING_ORDER):
        leak, parents = _NOISY_OR[name]
        absent = 1.0 - leak
        for parent, weight in parents.items():
            if state.get(parent, False):
                absent *= 1.0 - weight
        state[name] = bool(draws[offset + i] < 1.0 - absent)
    return tuple(f for f in PHANTOM_FINDINGS if state.get(f, False))


def sample_patient(rng: np.random.Generator, *, number: int = 0) -> PhantomPatient:
    """Draw the traits of one phantom patient.

    Args:
        rng: the random generator.
        number: the patient's integer id.

    Example:
        >>> patient = sample_patient(np.random.default_rng(1), number=42)
        >>> patient.patient_id
        'PHANTOM-00042'
    """
    u = [float(v) for v in rng.random(9)]
    sex = "F" if u[0] < 0.45 else "M"
    male = sex == "M"
    return PhantomPatient(
        number=int(number),
        sex=sex,
        age=int(18 + round(72 * u[1] ** 0.8)),
        scale=float((0.95 if male else 0.90) + 0.14 * u[2]),
        width_ratio=float(0.94 + 0.12 * u[3]),
        height_ratio=float(0.93 + 0.14 * u[4]),
        habitus=float(0.88 + 0.26 * u[5]),
        breast=0.0 if male else float(0.3 + 0.7 * u[6]),
        heart_quantile=float(u[7]),
    )


# --------------------------------------------------------------------------------------
# Small vectorised helpers
# --------------------------------------------------------------------------------------


def _ramp(d: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased step: 0 for d < -edge/2, 1 for d > edge/2 (d and edge in mm)."""
    return np.clip(d * (1.0 / edge) + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``sigma_px``."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_px)
    std = float(field_.std())
    return field_ / (std if std > 0 else 1.0)


def _segment_distance(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
) -> np.ndarray:
    """Distance (mm) from every grid point to the segment p0-p1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    length2 = dx * dx + dy * dy + 1e-9
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / length2, 0.0, 1.0)
    return np.hypot(x - (p0[0] + t * dx), y - (p0[1] + t * dy))


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre offsets from the image centre, in pixels (cached per size)."""
    grid = _GRID_CACHE.get(size)
    if grid is None:
        c = np.arange(size, dtype=np.float32) + 0.5 - size / 2.0
        grid = (np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size)))
        _GRID_CACHE[size] = grid
    return grid


@dataclass
class _Frame:
    """Detector grid and the rigid patient placement (rotation, shift) on it."""

    size: int
    spacing: float  # mm per pixel
    x: np.ndarray  # patient-frame x (mm) of each pixel
    y: np.ndarray  # patient-frame y (mm) of each pixel
    cos: float
    sin: float
    tx: float
    ty: float

    @classmethod
    def make(cls, size: int, spacing: float, angle_deg: float, tx: float, ty: float) -> _Frame:
        ux, uy = _unit_grid(size)
        c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
        xd = ux * spacing - tx
        yd = uy * spacing - ty
        x = (c * xd + s * yd).astype(np.float32)
        y = (-s * xd + c * yd).astype(np.float32)
        return cls(size, spacing, x, y, c, s, tx, ty)

    def to_pixel(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patient mm -> (column, row) pixel coordinates (continuous, pixel centres at .0)."""
        xd = self.cos * px - self.sin * py + self.tx
        yd = self.sin * px + self.cos * py + self.ty
        return xd / self.spacing + self.size / 2.0 - 0.5, yd / self.spacing + self.size / 2.0 - 0.5

    def splat(self, px: np.ndarray, py: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Accumulate point weights onto the grid with bilinear splatting."""
        col, row = self.to_pixel(px, py)
        c0 = np.floor(col).astype(np.int64)
        r0 = np.floor(row).astype(np.int64)
        fc = (col - c0).astype(np.float32)
        fr = (row - r0).astype(np.float32)
        n = self.size
        out = np.zeros(n * n, dtype=np.float64)
        for dr, dc, w in (
            (0, 0, (1 - fr) * (1 - fc)),
            (0, 1, (1 - fr) * fc),
            (1, 0, fr * (1 - fc)),
            (1, 1, fr * fc),
        ):
            rr, cc = r0 + dr, c0 + dc
            ok = (rr >= 0) & (rr < n) & (cc >= 0) & (cc < n)
            out += np.bincount((rr[ok] * n + cc[ok]), weights=(weights * w)[ok], minlength=n * n)
        return out.reshape(n, n).astype(np.float32)

    def px(self, mm: float) -> float:
        """Millimetres -> pixels."""
        return mm / self.spacing


# --------------------------------------------------------------------------------------
# Geometry sampling
# --------------------------------------------------------------------------------------


@dataclass
class _FindingPlan:
    """Finding parameters that change the normal anatomy (drawn before it is built)."""

    raised_dome: dict[str, float] = field(default_factory=dict)  # side -> mm
    mediastinal_shift: float = 0.0  # mm, + towards the image right
    atelectasis_side: str = "right"
    atelectasis_kind: str = "plate"
    cardiomegaly: bool = False


@dataclass
class _Geometry:
    """Per-image anatomy and acquisition parameters (mm unless noted)."""

    view: str
    width: dict[str, float]  # lateral lung extent per side at the base
    apex_y: float
    cp_y: dict[str, float]
    dome_peak_y: dict[str, float]
    mediastinum: float
    shift: float
    ctr: float
    heart_ctr_drawn: float
    heart_right_fraction: float
    heart_tilt: float
    heart_aspect: float
    hilum: dict[str, tuple[float, float]]
    clavicle_y: float
    clavicle_rise: float
    scapula_x: float
    rib_first: float
    rib_spacing: float
    rib_growth: float
    tissue: float
    breast: float
    fov: float
    angle: float
    tx: float
    ty: float
    gamma: float
    window_lo: float
    window_hi: float
    counts: float
    blur_mm: float
    edge_enhance: float


def _sample_geometry(
    rng: np.random.Generator, patient: PhantomPatient, view: str, plan: _FindingPlan
) -> _Geometry:
    """Per-image anatomy/acquisition parameters; a fixed number of draws whatever the view."""
    u = [float(v) for v in rng.random(32)]  # Python floats keep the grids float32
    s = patient.scale
    ap = view == "AP"
    half_width = THORAX_HALF_WIDTH_MM * s * patient.width_ratio
    asym = 0.03 * (u[0] - 0.5)
    width = {"right": half_width * (1 + asym), "left": half_width * (1 - asym)}
    # Portable AP films are taken supine/semi-erect with poorer inspiration.
    inspiration = (0.90 + 0.08 * u[1]) if ap else (0.95 + 0.10 * u[1])
    apex = APEX_Y_MM * s * patient.height_ratio
    lung_height = (CP_ANGLE_Y_MM - APEX_Y_MM) * s * patient.height_ratio * inspiration
    cp_r = apex + lung_height
    cp_l = cp_r + 8.0 * u[2]
    peak_r = cp_r - DOME_RISE_MM * s * (0.8 + 0.4 * u[3])
    peak_l = min(peak_r + LEFT_DOME_DROP_MM * (0.6 + 0.7 * u[4]), cp_l - 20.0)
    cp_y = {"right": cp_r, "left": cp_l}
    peak = {"right": peak_r, "left": peak_l}
    for side, raise_mm in plan.raised_dome.items():
        cp_y[side] -= raise_mm * 0.6
        peak[side] -= raise_mm

    lo, hi = CARDIOMEGALY_CTR if plan.cardiomegaly else NORMAL_CTR
    # The patient's heart quantile and a per-image jitter place the ratio inside its range.
    q = float(np.clip(0.75 * patient.heart_quantile + 0.25 * u[5], 0.0, 1.0))
    ctr = lo + (hi - lo) * q
    magnification = 1.0
    if ap:
        magnification = AP_HEART_MAGNIFICATION[0] + (AP_HEART_MAGNIFICATION[1] - AP_HEART_MAGNIFICATION[0]) * u[6]
        if not plan.cardiomegaly:
            # A normal heart stays normal when magnified: its true ratio is the smaller.
            ctr = min(ctr, NORMAL_CTR[1] - 0.005)
    heart_drawn = ctr  # the ratio measured on this image (what is drawn)

    mediastinum = MEDIASTINUM_HALF_WIDTH_MM * s * ((1.08 + 0.12 * u[7]) if ap else (0.92 + 0.16 * u[7]))
    hx = HILUM_X_FRACTION[0] + (HILUM_X_FRACTION[1] - HILUM_X_FRACTION[0]) * u[8]
    hy = HILUM_Y_FRACTION[0] + (HILUM_Y_FRACTION[1] - HILUM_Y_FRACTION[0]) * u[9]
    hilum = {
        "right": (-hx * width["right"], apex + hy * lung_height),
        "left": (hx * width["left"], apex + hy * lung_height - 10.0),
    }
    if ap:  # AP: clavicles project higher and flatter, scapulae over the lungs
        clavicle_y = apex - 6.0 + 10.0 * u[10]
        clavicle_rise = 2.0 + 6.0 * u[11]
        scapula_x = (0.55 + 0.12 * u[12]) * half_width
    else:
        clavicle_y = apex + 16.0 + 12.0 * u[10]
        clavicle_rise = 12.0 + 10.0 * u[11]
        scapula_x = (0.98 + 0.08 * u[12]) * half_width
    fov = FIELD_OF_VIEW_MM[0] + (FIELD_OF_VIEW_MM[1] - FIELD_OF_VIEW_MM[0]) * u[13]
    fov = max(fov, 2.28 * half_width)  # keep the whole rib cage on the detector
    tissue = patient.habitus * (0.95 + 0.1 * u[14])
    # Window: lung fields should land around 0.2-0.4 on a normal film.
    return _Geometry(
        view=view,
        width=width,
        apex_y=apex,
        cp_y=cp_y,
        dome_peak_y=peak,
        mediastinum=mediastinum,
        shift=plan.mediastinal_shift,
        ctr=ctr,
        heart_ctr_drawn=heart_drawn,
        heart_right_fraction=(0.29 + 0.07 * u[15]) + (0.04 if plan.cardiomegaly else 0.0),
        heart_tilt=math.radians(26.0 + 14.0 * u[16]),
        heart_aspect=0.70 + 0.12 * u[17],
        hilum=hilum,
        clavicle_y=clavicle_y,
        clavicle_rise=clavicle_rise,
        scapula_x=scapula_x,
        rib_first=apex + 3.0 + 7.0 * u[18],
        rib_spacing=(RIB_FIRST_SPACING_MM[0] + (RIB_FIRST_SPACING_MM[1] - RIB_FIRST_SPACING_MM[0]) * u[19]) * s * patient.height_ratio * inspiration,
        rib_growth=RIB_SPACING_GROWTH_MM[0] + (RIB_SPACING_GROWTH_MM[1] - RIB_SPACING_GROWTH_MM[0]) * u[20],
        tissue=tissue,
        breast=patient.breast * (0.8 + 0.4 * u[21]),
        fov=fov,
        angle=(u[22] - 0.5) * 8.0,
        tx=(u[23] - 0.5) * 24.0,
        ty=(u[24] - 0.5) * 26.0 + (8.0 if view == "LATERAL" else 0.0),
        gamma=0.80 + 0.45 * u[25],
        window_lo=-0.04 + 0.08 * u[26],
        window_hi=(1.10 if view != "LATERAL" else 1.30) * (0.92 + 0.16 * u[27]) * tissue,
        counts=REFERENCE_COUNTS * ((0.35 + 0.9 * u[28]) if ap else (0.6 + 1.2 * u[28])),
        blur_mm=0.7 + 0.9 * u[29],
        edge_enhance=0.25 + 0.35 * u[30],
    )


# --------------------------------------------------------------------------------------
# Drawing: the canvas holds the attenuation layers that findings then modify
# --------------------------------------------------------------------------------------


@dataclass
class _LungField:
    """One lung field as seen on the image (a hemithorax, or both lungs on a lateral)."""

    name: str  # "right", "left" or "both"
    soft: np.ndarray  # anti-aliased mask in [0, 1], heart excluded
    mask: np.ndarray  # bool, heart excluded
    raw: np.ndarray  # bool, heart included (the pleural space outline)
    u: np.ndarray  # 0 medial -> 1 lateral (lateral film: 0 anterior -> 1 posterior)
    v: np.ndarray  # 0 apex -> 1 base
    hilum: tuple[float, float]
    cp: tuple[float, float]  # costophrenic angle (posterior sulcus on a lateral)
    wall: np.ndarray  # bool: outside the lung towards the chest wall/apex (pneumothorax)
    sign: float  # +1 if lateral is +x, -1 if lateral is -x (lateral film: +1 = posterior)


@dataclass
class _Canvas:
    frame: _Frame
    geometry: _Geometry
    tissue: np.ndarray  # body soft tissue, mediastinum, heart, abdomen
    bone: np.ndarray
    air: np.ndarray  # lung air removed from the tissue (>= 0)
    vessels: np.ndarray  # lung markings (added inside the lungs)
    bronchi: np.ndarray  # thin airway tree, used for air bronchograms
    texture: np.ndarray  # fine parenchymal texture
    extra: np.ndarray  # finding densities added on top
    fields: list[_LungField]
    heart: np.ndarray  # bool heart silhouette (above the diaphragm)
    lung_soft: np.ndarray  # union of the lung fields, heart excluded
    anatomy: dict[str, np.ndarray]
    vessel_blur: float = 0.0  # extra vessel blur (edema), mm

    def field(self, name: str) -> _LungField:
        for f in self.fields:
            if f.name == name:
                return f
        return self.fields[0]


def _vessel_tree(
    rng: np.random.Generator,
    hilum: tuple[float, float],
    angles: np.ndarray,
    trunk_mm: float,
    depth: int = 6,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Branching pulmonary vessels from a hilum, generated one generation at a time.

    Returns per generation the sampled points (N, 2) in mm; later generations are thinner.
    Every generation is one vectorised step, so a tree of hundreds of segments costs a few
    numpy calls.
    """
    n = angles.size
    start = np.tile(np.asarray(hilum, dtype=np.float64), (n, 1))
    ang = angles.astype(np.float64)
    length = trunk_mm * rng.uniform(0.8, 1.2, n)
    points: list[np.ndarray] = []
    for level in range(depth):
        k = 10 if level < 2 else 7
        t = np.linspace(0.0, 1.0, k, endpoint=False)
        d = np.stack([np.cos(ang), np.sin(ang)], axis=1)
        perp = np.stack([-d[:, 1], d[:, 0]], axis=1)
        bend = rng.normal(0.0, 0.08, n) * length
        along = t[None, :, None] * length[:, None, None] * d[:, None, :]
        wobble = (bend[:, None] * np.sin(np.pi * t)[None, :])[..., None] * perp[:, None, :]
        points.append((start[:, None, :] + along + wobble).reshape(-1, 2))
        end = start + length[:, None] * d
        spread = rng.uniform(0.22, 0.5, n)
        ang = np.concatenate([ang - spread, ang + spread]) + rng.normal(0.0, 0.08, 2 * n)
        start = np.concatenate([end, end])
        length = np.concatenate([length, length]) * rng.uniform(0.62, 0.82, 2 * n)
        n *= 2
    return points, [np.full(len(p), 1.0) for p in points]


def _draw_vessel_layers(
    frame: _Frame, rng: np.random.Generator, trees: list[list[np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Splat vessel trees into a lung-marking layer and a thin bronchial layer."""
    # Thick proximal vessels get a wide blur, distal ones a narrow one (tapering).
    groups = ((0, 2, 2.0, 1.0), (2, 4, 1.2, 0.55), (4, 9, 0.8, 0.28))
    vessels = np.zeros((frame.size, frame.size), dtype=np.float32)
    bronchi = np.zeros_like(vessels)
    step_mm = 1.0
    for lo, hi, sigma_mm, weight in groups:
        pts = [tree[level] for tree in trees for level in range(lo, min(hi, len(tree)))]
        if not pts:
            continue
        p = np.concatenate(pts)
        layer = frame.splat(p[:, 0], p[:, 1], np.full(len(p), weight * step_mm))
        sigma_px = max(sigma_mm / frame.spacing, 0.45)
        # Normalise so the peak of an isolated line ~ weight, whatever the pixel size.
        norm = frame.spacing / (2.5 * max(sigma_mm, 0.45 * frame.spacing))
        vessels += ndimage.gaussian_filter(layer, sigma_px) * norm
        if lo >= 1:
            bronchi += ndimage.gaussian_filter(layer, max(0.6 / frame.spacing, 0.4)) * norm
    return vessels, bronchi


def _frontal_lung(
    g: _Geometry, x: np.ndarray, y: np.ndarray, side: str, edge: float
) -> dict[str, np.ndarray | float]:
    """Analytic hemithorax: lateral/medial borders, diaphragm dome, normalised coordinates."""
    sign = -1.0 if side == "right" else 1.0
    xa = sign * (x - g.shift)  # distance from the midline towards this side's lateral wall
    width = g.width[side]
    w0 = width - LUNG_BASE_FLARE_MM
    apex = g.apex_y
    cp = g.cp_y[side]
    height = cp - apex
    x_apex = APEX_X_FRACTION * width
    y_wide = apex + LATERAL_WIDEST_FRACTION * height
    y_med = apex + MEDIAL_CURVE_FRACTION * height
    q = np.clip((y_wide - y) / (y_wide - apex), 0.0, None)
    lateral = x_apex + (w0 - x_apex) * np.sqrt(np.clip(1.0 - q * q, 0.0, 1.0))
    lateral = lateral + LUNG_BASE_FLARE_MM * np.clip((y - y_wide) / (cp - y_wide), 0.0, 1.0)
    m0 = g.mediastinum + np.zeros_like(y)
    if side == "left":
        knob_y, bulge, sd = AORTIC_KNOB
        m0 = m0 + bulge * np.exp(-(((y - (apex + (knob_y - APEX_Y_MM))) / sd) ** 2))
    qm = np.clip((y_med - y) / (y_med - apex), 0.0, None)
    medial = x_apex - (x_apex - m0) * np.sqrt(np.clip(1.0 - qm * qm, 0.0, 1.0))
    peak = g.dome_peak_y[side]
    x_peak = DOME_PEAK_X_FRACTION * width
    lat_t = np.clip((xa - x_peak) / (width - x_peak), 0.0, None)
    med_t = np.clip((x_peak - xa) / x_peak, 0.0, 1.0)
    dome = peak + (cp - peak) * lat_t**DOME_LATERAL_EXPONENT + 14.0 * med_t**2
    soft = (
        _ramp(lateral - xa, edge)
        * _ramp(xa - medial, edge)
        * _ramp(dome - y, edge)
        * _ramp(y - apex, edge)
    )
    span = np.maximum(lateral - medial, 1e-3)
    u = np.clip((xa - medial) / span, 0.0, 1.0)
    v = np.clip((y - apex) / np.maximum(dome - apex, 1e-3), 0.0, 1.0)
    return {
        "xa": xa, "lateral": lateral, "medial": medial, "dome": dome, "soft": soft,
        "u": u, "v": v, "span": span, "sign": sign, "x_apex": x_apex,
    }  # fmt: skip


def _heart_ellipse(
    g: _Geometry, dome_left_at: Callable[[float], float]
) -> tuple[float, float, float, float, float]:
    """Heart ellipse (cx, cy, a, b, tilt) whose width matches the drawn CTR exactly."""
    thorax = g.width["right"] + g.width["left"]
    heart_w = g.heart_ctr_drawn * thorax
    ex = heart_w / 2.0
    phi, k = g.heart_tilt, g.heart_aspect
    a = ex / math.sqrt(math.cos(phi) ** 2 + (k * math.sin(phi)) ** 2)
    b = k * a
    cx = g.shift + (0.5 - g.heart_right_fraction) * heart_w
    # The leftmost/rightmost points of a tilted ellipse sit off its centre vertically.
    dy_extreme = (a * a - b * b) * math.sin(phi) * math.cos(phi) / ex
    x_apex = cx + ex
    # The cardiac apex rests just above the left hemidiaphragm.
    cy = dome_left_at(x_apex) - 5.0 - dy_extreme
    return cx, cy, a, b, phi


def _ellipse_rho(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, phi: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    c, s = math.cos(phi), math.sin(phi)
    return np.sqrt(((dx * c + dy * s) / a) ** 2 + ((-dx * s + dy * c) / b) ** 2)


def _draw_frontal(frame: _Frame, g: _Geometry, rng: np.random.Generator) -> _Canvas:
    """Normal PA/AP anatomy as attenuation layers."""
    x, y = frame.x, frame.y
    edge = max(frame.spacing, 0.5)
    ap = g.view == "AP"
    shape = x.shape
    sides = {side: _frontal_lung(g, x, y, side, edge) for side in ("right", "left")}

    # Heart: a tilted ellipsoid, right border ~1/3 of its width right of the midline.
    lw = g.width["left"]
    lp = g.dome_peak_y["left"]
    lcp = g.cp_y["left"]

    def dome_left_at(xv: float) -> float:
        xa = xv - g.shift
        x_peak = DOME_PEAK_X_FRACTION * lw
        if xa >= x_peak:
            return lp + (lcp - lp) * ((xa - x_peak) / (lw - x_peak)) ** DOME_LATERAL_EXPONENT
        return lp + 14.0 * ((x_peak - xa) / x_peak) ** 2

    hcx, hcy, ha, hb, hphi = _heart_ellipse(g, dome_left_at)
    rho = _ellipse_rho(x, y, hcx, hcy, ha, hb, hphi)
    heart_soft = _ramp((1.0 - rho) * hb, edge)
    dome_any = np.where(x < g.shift, sides["right"]["dome"], sides["left"]["dome"])
    above_diaphragm = _ramp(dome_any - y, edge)
    heart_vis = heart_soft * above_diaphragm
    heart_mask = heart_vis > 0.5

    # Body outline: neck, shoulders, chest wall; thickness falls off towards the skin.
    wb = max(g.width.values()) + CHEST_WALL_MM * g.tissue
    y_sh = g.apex_y - 8.0
    shoulder = np.clip((y - (y_sh - 60.0)) / 60.0, 0.0, 1.0)
    shoulder = shoulder * shoulder * (3 - 2 * shoulder)
    body_hw = NECK_HALF_WIDTH_MM + (wb - NECK_HALF_WIDTH_MM) * shoulder
    body_hw = body_hw + SHOULDER_BULGE_MM * np.exp(-(((y - y_sh) / 45.0) ** 2)) * shoulder
    body_hw = body_hw + 8.0 * np.clip((y - g.apex_y) / 250.0, 0.0, 1.0)
    xc = x - g.shift * 0.5
    torso = np.clip(1.0 - (xc / body_hw) ** 2, 0.0, 1.0) ** 0.3
    torso *= _ramp(body_hw - np.abs(xc), edge)
    # Arms hang beside the chest (PA: rotated forward; AP: closer to the body).
    arm_c = wb + (34.0 if not ap else 26.0)
    arm = np.clip(1.0 - ((np.abs(xc) - arm_c) / 26.0) ** 2, 0.0, 1.0) ** 0.5
    arm *= np.clip((y - (y_sh - 10.0)) / 30.0, 0.0, 1.0) * 0.75
    tissue = g.tissue * (np.maximum(torso, arm) + 0.06 * np.clip((y - g.cp_y["right"]) / 60.0, 0.0, 1.0))
    # Breast shadows over the lower zones, with a sharp curved lower margin.
    if g.breast > 0.05:
        for sign in (-1.0, 1.0):
            bx, by = sign * 0.55 * lw + g.shift, g.cp_y["right"] - 22.0
            r = np.hypot((x - bx) / 78.0, (y - by) / 58.0)
            lower = np.clip((y - (by - 58.0)) / 116.0, 0.0, 1.0)
            tissue += 0.13 * g.breast * _ramp((1.0 - r) * 58.0, 3.0) * lower
    tissue += HEART_DENSITY * heart_soft * (0.55 + 0.45 * np.sqrt(np.clip(1.0 - rho * rho, 0.0, 1.0)))

    # Lung air: deepest in the mid zones, thinner at the apex, laterally and behind the heart.
    air = np.zeros(shape, dtype=np.float32)
    lung_soft = np.zeros(shape, dtype=np.float32)
    fields: list[_LungField] = []
    for side, s in sides.items():
        soft_raw = s["soft"]
        u, v = s["u"], s["v"]
        width_full = g.width[side] - g.mediastinum
        depth = np.clip((1.0 - u) / 0.35, 0.0, 1.0) ** 0.55 * (0.80 + 0.20 * np.clip(u / 0.15, 0.0, 1.0))
        depth *= np.clip(s["span"] / (0.55 * width_full), 0.0, 1.0) ** 0.6
        depth *= 0.86 + 0.14 * v
        air += LUNG_AIR * soft_raw * depth * (1.0 - 0.8 * heart_soft)
        soft = soft_raw * (1.0 - heart_soft)
        lung_soft += soft
        raw = soft_raw > 0.5
        mask = soft > 0.5
        xa, lateral = s["xa"], s["lateral"]
        wall = (~raw) & (xa > s["x_apex"] * 0.6) & (y < s["dome"] - 2.0) & (xa > s["medial"])
        wall |= (~raw) & (y < g.apex_y + 2.0) & (xa > g.mediastinum)
        hx, hy = g.hilum[side]
        fields.append(
            _LungField(
                name=side, soft=soft, mask=mask, raw=raw, u=u, v=v, hilum=(hx + g.shift, hy),
                cp=(s["sign"] * g.width[side] + g.shift, g.cp_y[side]), wall=wall, sign=s["sign"],
            )
        )  # fmt: skip
        del lateral

    # Trachea and main bronchi: the air column in the midline.
    carina = (g.shift, g.apex_y + CARINA_BELOW_APEX_MM)
    tr_x = g.shift - 3.0 * np.exp(-(((y - (g.apex_y + 62.0)) / 20.0) ** 2))
    trachea = np.clip(1.0 - ((x - tr_x) / TRACHEA_HALF_WIDTH_MM) ** 2, 0.0, 1.0) ** 0.5
    trachea *= _ramp(carina[1] - y, 4.0)
    for end in ((g.shift - 26.0, carina[1] + 22.0), (g.shift + 38.0, carina[1] + 30.0)):
        d = _segment_distance(x, y, carina, end)
        trachea = np.maximum(trachea, np.clip(1.0 - (d / 6.0) ** 2, 0.0, 1.0) ** 0.5 * 0.8)
    air += 0.16 * trachea

    # Stomach gas bubble under the left hemidiaphragm.
    gx = g.shift + 0.5 * lw
    gy = dome_left_at(gx) + 30.0
    bubble = _ramp((1.0 - np.hypot((x - gx) / 34.0, (y - gy) / 17.0)) * 17.0, 3.0)
    air += 0.22 * bubble * (rng.random() < 0.8)

    # Hila: pulmonary arteries as lobulated densities.
    for f in fields:
        hx, hy = f.hilum
        hil = np.exp(-(((x - hx - f.sign * 6.0) / 13.0) ** 2 + ((y - hy) / 26.0) ** 2))
        tissue += 0.09 * hil

    bone = _draw_frontal_bones(frame, g, sides, edge)

    # Lung markings: 7-9 trunks per lung fanning up, out and down (larger to the bases).
    trees = []
    for f in fields:
        n = 8
        base = np.linspace(-math.pi * 0.55, math.pi * 0.55, n) + rng.normal(0.0, 0.1, n)
        angles = np.where(f.sign > 0, base, math.pi - base)
        trees.append(_vessel_tree(rng, f.hilum, angles, 30.0 * (g.width["right"] / THORAX_HALF_WIDTH_MM))[0])
    vessels, bronchi = _draw_vessel_layers(frame, rng, trees)
    # Upright: the lower-zone vessels are the larger ones (gravity).
    vessels *= 0.75 + 0.45 * np.clip((y - g.apex_y) / (g.cp_y["right"] - g.apex_y), 0.0, 1.0)

    texture = 0.6 * _smooth_noise(rng, shape, max(1.2 / frame.spacing * 1.5, 0.6))
    texture += 0.4 * _smooth_noise(rng, shape, 5.0 / frame.spacing)

    anatomy = {
        "lung_right": fields[0].mask,
        "lung_left": fields[1].mask,
        "heart": heart_mask,
    }
    for f in fields:
        cx, cy = f.cp
        r = np.hypot(x - (cx - f.sign * 14.0), y - (cy - 14.0))
        anatomy[f"costophrenic_{f.name}"] = (r < 16.0) & f.raw
    return _Canvas(
        frame=frame, geometry=g, tissue=tissue.astype(np.float32), bone=bone, air=air,
        vessels=vessels, bronchi=bronchi, texture=texture.astype(np.float32),
        extra=np.zeros(shape, dtype=np.float32), fields=fields, heart=heart_mask,
        lung_soft=np.clip(lung_soft, 0.0, 1.0), anatomy=anatomy,
    )  # fmt: skip


def _draw_frontal_bones(frame: _Frame, g: _Geometry, sides: dict, edge: float) -> np.ndarray:
    """Ribs, clavicles, scapulae, humeral heads and spine for a frontal film."""
    x, y = frame.x, frame.y
    bone = np.zeros(x.shape, dtype=np.float32)
    half_span = max(g.width.values())
    for side, s in sides.items():
        xa = s["xa"]
        width = g.width[side]
        # Posterior ribs: one warped phase field draws all of them at once. Each rib arches
        # up from the spine and drops towards the lateral wall; spacing grows downwards.
        wall = np.maximum(s["lateral"], 0.6 * width) + 8.0
        t = np.clip((xa - 16.0) / (wall - 16.0), 0.0, 1.25)
        level = np.clip((y - g.apex_y) / (g.cp_y[side] - g.apex_y), 0.0, 1.2)
        drop = RIB_DROP_MM[0] + (RIB_DROP_MM[1] - RIB_DROP_MM[0]) * level
        warped = y + RIB_ARCH_MM * 4.0 * t * (1.0 - t) - drop * t**3
        d0, gr = g.rib_spacing, g.rib_growth
        z = np.maximum(warped - g.rib_first, -d0)
        r = (-d0 + np.sqrt(np.maximum(d0 * d0 + 2.0 * gr * z, 0.0))) / gr
        frac = r - np.round(r)
        dist = np.abs(frac) * (d0 + gr * np.round(r))
        half = RIB_HALF_THICKNESS_MM[0] + (RIB_HALF_THICKNESS_MM[1] - RIB_HALF_THICKNESS_MM[0]) * np.clip(r / N_POSTERIOR_RIBS, 0, 1)
        band = _ramp(half - dist, edge)
        cortex = 0.7 + 0.5 * np.clip(dist / half, 0.0, 1.0) ** 3  # tubular bone: bright margins
        valid = _ramp(r + 0.5, 0.2) * _ramp(N_POSTERIOR_RIBS - 0.5 - r, 0.2)
        valid *= _ramp(xa - 16.0, 4.0) * np.clip((1.22 - t) / 0.12, 0.0, 1.0)
        bone += RIB_DENSITY * band * cortex * valid
        # Anterior ribs: fainter, sloping down towards the midline, invisible medially
        # (costal cartilage).
        ta = np.clip(xa / wall, 0.0, 1.2)
        warped_a = y - 42.0 * (1.0 - ta) - 12.0 * ta * ta
        ra = (warped_a - (g.rib_first + 10.0)) / (g.rib_spacing * 1.55)
        fa = np.abs(ra - np.round(ra)) * g.rib_spacing * 1.55
        band_a = _ramp(5.0 - fa, edge) * _ramp(ra + 0.5, 0.2) * _ramp(N_ANTERIOR_RIBS - 0.5 - ra, 0.2)
        band_a *= np.clip((ta - 0.35) / 0.15, 0.0, 1.0) * np.clip((1.1 - ta) / 0.1, 0.0, 1.0)
        bone += 0.45 * RIB_DENSITY * band_a

        # Clavicle: an S-curved bar from the sternal notch to the acromion.
        length = width + 25.0
        tc = (xa - 14.0) / length
        yc = g.clavicle_y - g.clavicle_rise * tc + 5.0 * np.sin(2.0 * np.pi * np.clip(tc, 0, 1))
        half_c = CLAVICLE_HALF_THICKNESS_MM * (1.15 - 0.3 * np.clip(tc, 0, 1))
        dc = np.abs(y - yc)
        clav = _ramp(half_c - dc, edge) * _ramp(tc * length, 4.0) * _ramp((1.0 - tc) * length, 6.0)
        bone += CLAVICLE_DENSITY * clav * (0.75 + 0.45 * np.clip(dc / half_c, 0, 1) ** 3)

        # Scapula: triangle, medial border vertical-ish; over the lungs only on AP films.
        top = g.apex_y - 10.0
        xm = g.scapula_x + 0.06 * (y - top)
        gl = (half_span + 30.0, top + 12.0)
        ia = (g.scapula_x + 14.0, top + 150.0)
        lat_border = ia[1] + (xa - ia[0]) * (gl[1] - ia[1]) / (gl[0] - ia[0])
        scap = _ramp(xa - xm, edge) * _ramp(y - top, 4.0) * _ramp(lat_border - y, 3.0)
        bone += 0.075 * scap * (0.7 + 0.3 * np.clip((xa - xm) / 40.0, 0, 1))
        # Humeral head at the glenoid.
        hh = np.hypot(xa - (half_span + 46.0), y - (top + 4.0))
        bone += 0.20 * _ramp(26.0 - hh, 2.0) * (0.7 + 0.3 * np.clip(hh / 26.0, 0, 1) ** 4)
        shaft = _ramp(13.0 - np.abs(xa - (half_span + 52.0) - 0.12 * (y - top)), 2.0) * _ramp(y - top, 4.0)
        bone += 0.16 * shaft

    # Spine: vertebral bodies with discs and pedicle rings, behind the mediastinum.
    xs = x - g.shift * 0.3
    level = np.clip((y - g.apex_y) / 330.0, 0.0, 1.0)
    hw = SPINE_HALF_WIDTH_MM[0] + (SPINE_HALF_WIDTH_MM[1] - SPINE_HALF_WIDTH_MM[0]) * level
    column = np.clip(1.0 - (xs / hw) ** 2, 0.0, 1.0) ** 0.35
    pv = (y - (g.apex_y - 60.0)) / VERTEBRA_HEIGHT_MM
    fv = pv - np.floor(pv)  # 0..1 within a vertebra, disc near 0/1
    disc = np.clip(np.minimum(fv, 1.0 - fv) / 0.1, 0.0, 1.0)
    bone += SPINE_DENSITY * column * (0.45 + 0.55 * disc)
    cy_v = (np.floor(pv) + 0.5) * VERTEBRA_HEIGHT_MM + (g.apex_y - 60.0)
    ped = np.hypot((np.abs(xs) - 0.72 * hw) / 4.0, (y - cy_v + 3.0) / 6.0)
    bone += 0.06 * np.clip(1.0 - np.abs(ped - 0.85) / 0.35, 0.0, 1.0)
    spinous = np.hypot(xs / 3.5, (y - cy_v - 6.0) / 7.0)
    bone += 0.04 * _ramp(1.0 - spinous, 0.3)
    return bone


def _lateral_borders(g: _Geometry, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray | float]:
    """Analytic sagittal lung field: anterior/posterior walls, apex, two diaphragm domes."""
    depth = LATERAL_DEPTH_RATIO * (g.width["right"] + g.width["left"])
    apex = g.apex_y
    height = g.cp_y["right"] - apex
    ant = -0.46 * depth + 38.0 * np.clip((apex + 95.0 - y) / 95.0, 0.0, 1.0) ** 1.4
    post = 0.50 * depth - 14.0 * ((y - (apex + 0.45 * height)) / (0.9 * height)) ** 2
    x_top = 0.12 * depth
    top = apex + 70.0 * ((x - x_top) / (0.5 * depth)) ** 2
    x_peak = -0.10 * depth
    domes = {}
    for side in ("right", "left"):
        pk = g.dome_peak_y[side] + 6.0
        y_ant = pk + 24.0
        y_post = g.cp_y[side] + 30.0  # the posterior sulcus is the lowest point of the lung
        domes[side] = np.where(
            x < x_peak,
            pk + (y_ant - pk) * np.clip((x_peak - x) / (x_peak + 0.46 * depth), 0, None) ** 2,
            pk + (y_post - pk) * np.clip((x - x_peak) / (0.5 * depth - x_peak), 0, None) ** 2.4,
        )
    return {"depth": depth, "ant": ant, "post": post, "top": top, "domes": domes, "x_peak": x_peak}


def _draw_lateral(frame: _Frame, g: _Geometry, rng: np.random.Generator) -> _Canvas:
    """Normal left-lateral anatomy (anterior to the image left) as attenuation layers."""
    x, y = frame.x, frame.y
    edge = max(frame.spacing, 0.5)
    shape = x.shape
    b = _lateral_borders(g, x, y)
    depth_ap, ant, post, top = b["depth"], b["ant"], b["post"], b["top"]
    domes = b["domes"]
    apex = g.apex_y

    # Heart: anterior and inferior, resting on the diaphragm behind the lower sternum.
    scale = g.ctr / 0.43
    a = 0.29 * depth_ap * scale
    bb = 0.24 * depth_ap * (0.6 + 0.4 * scale)
    phi = math.radians(-32.0)
    cx = -0.46 * depth_ap + 8.0 + a * 0.92
    x_peak = b["x_peak"]
    cy = g.dome_peak_y["right"] + 6.0 - 0.55 * bb
    rho = _ellipse_rho(x, y, cx, cy, a, bb, phi)
    heart_soft = _ramp((1.0 - rho) * bb, edge)
    dome_lo = np.maximum(domes["right"], domes["left"])
    heart_vis = heart_soft * _ramp(domes["right"] - y + 4.0, edge)
    heart_mask = heart_vis > 0.5
    del x_peak

    # Body: chest wall in front, back muscles behind, shoulders and arms up top.
    skin_a = ant - 26.0 - 30.0 * g.breast * np.exp(-(((y - (apex + 190.0)) / 45.0) ** 2))
    skin_p = post + 58.0
    neck = np.clip((apex - 20.0 - y) / 60.0, 0.0, 1.0)
    skin_a = skin_a + neck * 55.0
    centre = 0.5 * (skin_a + skin_p)
    half = 0.5 * (skin_p - skin_a)
    body = np.clip(1.0 - ((x - centre) / half) ** 2, 0.0, 1.0) ** 0.25
    body *= _ramp(half - np.abs(x - centre), edge)
    shoulders = 0.30 * np.clip((apex + 60.0 - y) / 80.0, 0.0, 1.0) * body
    tissue = g.tissue * (1.15 * body + shoulders)
    tissue += HEART_DENSITY * 1.1 * heart_soft * (0.5 + 0.5 * np.sqrt(np.clip(1.0 - rho * rho, 0.0, 1.0)))

    # The two lungs overlap: each contributes half the air above its own hemidiaphragm.
    inside = _ramp(post - x, edge) * _ramp(x - ant, edge) * _ramp(y - top, edge)
    span = np.maximum(post - ant, 1.0)
    u = np.clip((x - ant) / span, 0.0, 1.0)
    depth = np.clip(np.sin(np.pi * np.clip(u * 0.92 + 0.06, 0, 1)), 0.0, 1.0) ** 0.45
    per_side = 0.5 * (_ramp(domes["right"] - y, edge) + _ramp(domes["left"] - y, edge))
    soft_raw = inside * _ramp(dome_lo - y, edge)
    air = 1.05 * LUNG_AIR * inside * per_side * depth * (1.0 - 0.75 * heart_soft)
    v = np.clip((y - top) / np.maximum(dome_lo - top, 1.0), 0.0, 1.0)
    soft = soft_raw * (1.0 - heart_soft)
    raw = soft_raw > 0.5
    mask = soft > 0.5
    wall = (~raw) & (y < domes["right"] - 4.0)

    # Trachea: from the neck down and slightly back to the carina.
    carina = (0.04 * depth_ap, apex + 100.0)
    d = _segment_distance(x, y, (-0.10 * depth_ap, apex - 120.0), carina)
    air += 0.14 * np.clip(1.0 - (d / 8.0) ** 2, 0.0, 1.0) ** 0.5
    hilum = (0.02 * depth_ap, apex + 118.0)
    tissue += 0.10 * np.exp(-(((x - hilum[0]) / 24.0) ** 2 + ((y - hilum[1]) / 22.0) ** 2))

    # Bones: sternum, thoracic spine (rectangular bodies), scapulae, posterior ribs.
    bone = np.zeros(shape, dtype=np.float32)
    st = _ramp(6.0 - np.abs(x - (ant - 7.0)), edge) * _ramp(y - (apex + 15.0), 4.0)
    st *= _ramp(g.dome_peak_y["right"] + 10.0 - y, 4.0)
    bone += 0.13 * st
    x_sp = post - 42.0
    pv = (y - (apex - 60.0)) / VERTEBRA_HEIGHT_MM
    fv = pv - np.floor(pv)
    body_v = _ramp(np.minimum(fv, 1.0 - fv) * VERTEBRA_HEIGHT_MM - 2.5, edge)
    xb = np.abs(x - x_sp)
    vert = _ramp(19.0 - xb, edge) * body_v
    rim = np.clip(1.0 - np.minimum(19.0 - xb, np.minimum(fv, 1 - fv) * VERTEBRA_HEIGHT_MM - 2.5) / 3.0, 0.0, 1.0)
    bone += (0.10 + 0.08 * rim) * vert
    post_el = _ramp(x - (x_sp + 22.0), edge) * _ramp(x_sp + 60.0 - x, 6.0)
    bone += 0.06 * post_el * (0.6 + 0.4 * np.cos(2 * np.pi * fv) ** 2)
    scap = _ramp(x - (post - 30.0), 4.0) * _ramp(post + 20.0 - x, 8.0)
    scap *= _ramp(y - (apex - 20.0), 4.0) * _ramp(apex + 140.0 - y, 10.0)
    bone += 0.07 * scap
    ribs_phase = (y + 0.55 * (post - x) - apex) / (g.rib_spacing * 1.2)
    rf = np.abs(ribs_phase - np.round(ribs_phase)) * g.rib_spacing * 1.2
    bone += 0.45 * RIB_DENSITY * _ramp(4.0 - rf, edge) * np.clip((x - 0.0) / 40.0, 0, 1) * inside
    hh = np.hypot(x - (-0.05 * depth_ap), y - (apex - 25.0))
    bone += 0.10 * _ramp(27.0 - hh, 2.0)

    # Lung markings from the hilum in every direction but the mediastinum/heart.
    n = 10
    angles = np.linspace(-math.pi * 0.95, math.pi * 0.55, n) + rng.normal(0.0, 0.12, n)
    tree = _vessel_tree(rng, hilum, angles, 30.0)[0]
    vessels, bronchi = _draw_vessel_layers(frame, rng, [tree])
    texture = 0.6 * _smooth_noise(rng, shape, max(1.8 / frame.spacing, 0.6))
    texture += 0.4 * _smooth_noise(rng, shape, 5.0 / frame.spacing)

    # Stomach bubble under the left dome, anteriorly.
    gx = -0.2 * depth_ap
    gy = float(np.interp(gx, [-1e9, 1e9], [0, 0])) + g.dome_peak_y["left"] + 40.0
    bubble = _ramp((1.0 - np.hypot((x - gx) / 30.0, (y - gy) / 15.0)) * 15.0, 3.0)
    air += 0.15 * bubble * (rng.random() < 0.6)

    cp = (0.5 * depth_ap - 14.0 * 0.0, g.cp_y["left"] + 30.0)
    fields = [
        _LungField(
            name="both", soft=soft, mask=mask, raw=raw, u=u, v=v, hilum=hilum, cp=cp,
            wall=wall, sign=1.0,
        )
    ]  # fmt: skip
    r = np.hypot(x - (cp[0] - 18.0), y - (cp[1] - 16.0))
    anatomy = {
        "lungs": mask,
        "heart": heart_mask,
        "costophrenic_posterior": (r < 18.0) & raw,
    }
    return _Canvas(
        frame=frame, geometry=g, tissue=tissue.astype(np.float32), bone=bone,
        air=air.astype(np.float32), vessels=vessels, bronchi=bronchi,
        texture=texture.astype(np.float32), extra=np.zeros(shape, dtype=np.float32),
        fields=fields, heart=heart_mask, lung_soft=np.clip(soft, 0.0, 1.0), anatomy=anatomy,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Findings
# --------------------------------------------------------------------------------------


def _plan_findings(rng_for: Callable[[str], np.random.Generator], findings: set[str], view: str) -> _FindingPlan:
    """Draw the finding parameters that alter normal anatomy (volume loss)."""
    plan = _FindingPlan(cardiomegaly="Cardiomegaly" in findings)
    if "Atelectasis" in findings:
        r = rng_for("Atelectasis")
        u = [float(v) for v in r.random(4)]
        plan.atelectasis_side = "right" if u[0] < 0.55 else "left"
        plan.atelectasis_kind = "plate" if u[1] < 0.5 else "wedge"
        # Volume loss: the hemidiaphragm rises and the mediastinum shifts towards the
        # collapsed side.
        raise_mm = (8.0 + 8.0 * u[2]) if plan.atelectasis_kind == "plate" else (14.0 + 14.0 * u[2])
        plan.raised_dome[plan.atelectasis_side] = raise_mm
        if view != "LATERAL":
            toward = -1.0 if plan.atelectasis_side == "right" else 1.0
            plan.mediastinal_shift = toward * (2.0 + 6.0 * u[3]) * (plan.atelectasis_kind == "wedge")
    return plan


def _pick_center(
    rng: np.random.Generator, canvas: _Canvas, lung: _LungField, clearance_mm: float, vmin: float = 0.05
) -> tuple[float, float, float]:
    """A random point inside the lung at least ``clearance_mm`` from its edge.

    Returns (x_mm, y_mm, clearance actually available in mm).
    """
    inside_px = ndimage.distance_transform_edt(lung.mask) * canvas.frame.spacing
    ok = (inside_px >= clearance_mm) & (lung.v > vmin)
    available = clearance_mm
    if not ok.any():
        available = float(inside_px.max())
        ok = inside_px >= 0.8 * available
    idx = np.flatnonzero(ok)
    k = int(idx[rng.integers(idx.size)])
    return float(canvas.frame.x.flat[k]), float(canvas.frame.y.flat[k]), available


def _finding_nodule(canvas: _Canvas, rng: np.random.Generator, *, mass: bool) -> np.ndarray:
    """Round (nodule) or lobulated (mass) solid opacity inside a lung."""
    lung = canvas.fields[int(rng.integers(len(canvas.fields)))]
    lo, hi = MASS_DIAMETER_MM if mass else NODULE_DIAMETER_MM
    diameter = lo + (hi - lo) * rng.random() ** (1.3 if mass else 1.0)
    radius = diameter / 2.0
    lobes = 0.12 if mass else 0.03
    cx, cy, available = _pick_center(rng, canvas, lung, radius * (1.0 + lobes) + 3.0)
    if available < radius * (1.0 + lobes) + 3.0:
        # Small lungs (tiny images): shrink to fit but stay on the right side of 3 cm.
        radius = max(min(radius, (available - 3.0) / (1.0 + lobes)), (lo / 2.0) * (1.02 if mass else 1.0))
    x, y = canvas.frame.x, canvas.frame.y
    r = np.hypot(x - cx, y - cy)
    theta = np.arctan2(y - cy, x - cx)
    wobble = np.ones_like(r)
    for k in (2, 3, 5):
        # Mass: lobulated outline; each lobe adds area, so 2*radius stays a lower bound.
        wobble += lobes * rng.uniform(0.3, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rr = radius * wobble
    rn = r / rr
    edge = max(canvas.frame.spacing * 0.6, 0.5)
    solid = _ramp((1.0 - rn) * rr, edge)
    profile = np.sqrt(np.clip(1.0 - rn * rn, 0.0, 1.0)) * 0.7 + 0.3 * solid
    # A sphere replaces air: density grows with size but is visible even when small.
    contrast = (0.10 + 0.10 * rng.random()) * (1.0 + (0.6 if mass else 0.25) * min(diameter / 40.0, 1.5))
    canvas.extra += contrast * profile * solid
    canvas.vessels *= 1.0 - 0.5 * solid
    return rn <= 1.0


def _finding_effusion(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Basal fluid with a meniscus rising laterally; it blunts the costophrenic angle."""
    u = [float(v) for v in rng.random(8)]
    names = [f.name for f in canvas.fields]
    if len(names) == 2:
        chosen = names if u[0] < 0.35 else [names[0] if u[1] < 0.5 else names[1]]
    else:
        chosen = names
    x, y = canvas.frame.x, canvas.frame.y
    total = np.zeros(x.shape, dtype=bool)
    for i, name in enumerate(chosen):
        lung = canvas.field(name)
        cp_y = lung.cp[1]
        # Lateral height 18-110 mm above the costophrenic angle; medial height smaller.
        h_lat = 18.0 + 90.0 * u[2 + i] ** 1.5
        h_med = h_lat * (0.0 + 0.55 * u[4 + i]) - 12.0
        level = cp_y - h_med - (h_lat - h_med) * lung.u**2.2  # concave-up meniscus
        ramp_mm = 4.0 + 6.0 * u[6]
        frac = np.clip((y - level) / ramp_mm, 0.0, 1.0)
        region = frac * _ramp(lung.raw.astype(np.float32) - 0.5, 1.0)  # inside the pleura
        # Fluid replaces air (homogeneous), hides the vessels and the diaphragm outline.
        canvas.air *= 1.0 - 0.95 * region
        canvas.vessels *= 1.0 - region
        canvas.texture *= 1.0 - region
        canvas.extra += 0.05 * region  # fluid also covers the dome: silhouette sign
        total |= (region > 0.5) & lung.raw
    return total


def _finding_pneumothorax(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Apical/lateral rim of air with no lung markings and a thin visceral pleural line."""
    lung = canvas.fields[int(rng.integers(len(canvas.fields)))]
    u = [float(v) for v in rng.random(3)]
    sp = canvas.frame.spacing
    wall_dist = ndimage.distance_transform_edt(~lung.wall) * sp
    g = canvas.geometry
    gap = 10.0 + 24.0 * u[0]  # apical gap, mm
    extent = 70.0 + 160.0 * u[1]  # how far down the lateral wall it reaches
    y = canvas.frame.y
    gap_y = gap * np.clip(1.0 - (y - g.apex_y) / extent, 0.0, 1.0) ** 0.5
    gap_y = np.maximum(gap_y, 0.0)
    rim = lung.raw & (wall_dist < gap_y)
    rim_soft = np.clip((gap_y - wall_dist) / max(sp, 0.5) + 0.5, 0.0, 1.0) * lung.raw
    # Pure air in the rim: darker than aerated lung and without vessels or texture.
    full_air = LUNG_AIR * 1.05
    canvas.air = canvas.air * (1.0 - rim_soft) + full_air * rim_soft
    canvas.vessels *= 1.0 - rim_soft
    canvas.texture *= 1.0 - rim_soft
    # The retracted lung edge: a thin bright visceral pleural line.
    line_w = max(0.55 * sp, 0.5)
    line = np.exp(-(((wall_dist - gap_y) / line_w) ** 2)) * (gap_y > 1.0) * lung.raw
    canvas.extra += (0.07 + 0.05 * u[2]) * line
    # The collapsed lung is a little denser.
    collapsed = lung.raw & ~rim
    canvas.air *= 1.0 - 0.06 * collapsed
    return rim


def _lobe_region(canvas: _Canvas, lung: _LungField, zone: str) -> np.ndarray:
    """Soft region of a lobe-like zone, sharp along the fissure side."""
    u, v = lung.u, lung.v
    if lung.name == "both":  # lateral film: u anterior -> posterior
        if zone == "upper":
            r = _ramp(0.42 - v, 0.04)
        elif zone == "middle":
            r = _ramp(0.55 - u, 0.06) * _ramp(v - 0.40, 0.03) * _ramp(0.92 - v, 0.1)
        else:
            r = _ramp(u - 0.40, 0.03) * _ramp(v - 0.45, 0.1)
    else:
        if zone == "upper":
            r = _ramp(0.42 - v, 0.02)  # horizontal/oblique fissure: a sharp lower margin
        elif zone == "middle":
            r = _ramp(v - 0.40, 0.02) * _ramp(0.78 - v, 0.12) * _ramp(0.75 - u, 0.2)
        else:
            r = _ramp(v - 0.55, 0.12)
    return r * lung.soft


def _finding_consolidation(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Dense patchy lobar opacity with air bronchograms."""
    lung = canvas.fields[int(rng.integers(len(canvas.fields)))]
    zone = ("upper", "middle", "lower")[int(rng.choice(3, p=[0.3, 0.25, 0.45]))]
    region = _lobe_region(canvas, lung, zone)
    sigma_px = 7.0 / canvas.frame.spacing
    patch = _smooth_noise(rng, region.shape, sigma_px)
    coverage = 0.4 + 0.5 * rng.random()
    bias = float(np.quantile(patch[region > 0.5], 1.0 - coverage)) if (region > 0.5).any() else 0.0
    f = np.clip((patch - bias) / 0.5 + 0.5, 0.0, 1.0) * region
    f = ndimage.gaussian_filter(f, 1.0 / canvas.frame.spacing * 2.0)
    density = 0.75 + 0.2 * rng.random()
    canvas.air *= 1.0 - density * f
    canvas.vessels *= 1.0 - f
    canvas.texture *= 1.0 - 0.7 * f
    # Air bronchograms: aerated bronchi become visible against the dense lung.
    if rng.random() < 0.7:
        canvas.extra -= 0.10 * np.clip(canvas.bronchi, 0.0, 1.5) * np.clip((f - 0.4) / 0.4, 0.0, 1.0)
    mask = (f > 0.45) & lung.mask
    return mask


def _finding_edema(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Bilateral perihilar bat-wing haze, blurred vessels and Kerley-B lines."""
    u = [float(v) for v in rng.random(5)]
    x, y = canvas.frame.x, canvas.frame.y
    sp = canvas.frame.spacing
    patch = _smooth_noise(rng, x.shape, 8.0 / sp)
    severity = 0.55 + 0.45 * u[0]
    total = np.zeros(x.shape, dtype=bool)
    haze_all = np.zeros(x.shape, dtype=np.float32)
    for lung in canvas.fields:
        hx, hy = lung.hilum
        reach_x = 70.0 + 30.0 * u[1]
        reach_y = 85.0 + 35.0 * u[2]
        d = np.hypot((x - hx) / reach_x, (y - hy) / reach_y)
        haze = np.exp(-(d**2) * 1.6) * (1.0 + 0.25 * patch)
        haze = np.clip(haze, 0.0, 1.0) * lung.soft * severity
        haze_all += haze
        total |= (haze > 0.30) & lung.mask
    canvas.air *= 1.0 - 0.55 * haze_all
    # Vascular blurring: interstitial fluid smears the vessel outlines; cephalisation.
    blurred = ndimage.gaussian_filter(canvas.vessels, 2.5 / sp)
    canvas.vessels = (1.0 - 0.7 * severity) * canvas.vessels + 0.9 * severity * blurred
    canvas.texture *= 1.0 + 0.6 * severity
    # Kerley B: short horizontal lines reaching the lateral pleura at the bases.
    if u[3] < 0.7:
        spacing = 7.0 + 4.0 * u[4]
        phase = y / spacing
        lines = np.exp(-(((phase - np.round(phase)) * spacing / 0.9) ** 2))
        for lung in canvas.fields:
            zone = np.clip((lung.u - 0.80) / 0.08, 0.0, 1.0) * np.clip((lung.v - 0.55) / 0.1, 0.0, 1.0)
            canvas.extra += 0.05 * lines * zone * lung.soft
    return total


def _finding_atelectasis(canvas: _Canvas, rng: np.random.Generator, plan: _FindingPlan) -> np.ndarray:
    """Plate-like band or lobar wedge of collapsed lung (volume loss drawn in the anatomy)."""
    lung = canvas.field(plan.atelectasis_side) if len(canvas.fields) > 1 else canvas.fields[0]
    x, y = canvas.frame.x, canvas.frame.y
    sp = canvas.frame.spacing
    edge = max(sp * 0.6, 0.5)
    if plan.atelectasis_kind == "plate":
        # Subsegmental (plate) atelectasis: a 4-10 mm band in the lower zone, near horizontal.
        cand = lung.mask & (lung.v > 0.55) & (lung.v < 0.88) & (lung.u > 0.15) & (lung.u < 0.8)
        if not cand.any():
            cand = lung.mask
        idx = np.flatnonzero(cand)
        k = int(idx[rng.integers(idx.size)])
        cx, cy = float(x.flat[k]), float(y.flat[k])
        length = 40.0 + 45.0 * rng.random()
        thick = 2.5 + 3.5 * rng.random()
        ang = math.radians(rng.uniform(-18.0, 18.0))
        p0 = (cx - 0.5 * length * math.cos(ang), cy - 0.5 * length * math.sin(ang))
        p1 = (cx + 0.5 * length * math.cos(ang), cy + 0.5 * length * math.sin(ang))
        d = _segment_distance(x, y, p0, p1)
        f = _ramp(thick - d, edge) * lung.soft
        canvas.air *= 1.0 - 0.9 * f
        canvas.extra += 0.03 * f
        canvas.vessels *= 1.0 - f
        return (f > 0.5) & lung.mask
    # Lobar collapse: a dense wedge from the hilum to the pleura.
    hx, hy = lung.hilum
    if lung.name == "both":
        centre, spread = math.radians(rng.uniform(125.0, 150.0)), math.radians(rng.uniform(14.0, 22.0))
    else:
        upper = rng.random() < 0.4
        base = -70.0 if upper else 70.0  # up or down from the hilum (image coordinates)
        base += rng.uniform(-12.0, 12.0)
        lat = base if lung.sign > 0 else 180.0 - base
        centre, spread = math.radians(lat), math.radians(rng.uniform(14.0, 24.0))
    theta = np.arctan2(y - hy, x - hx)
    dtheta = np.angle(np.exp(1j * (theta - centre)))
    r = np.hypot(x - hx, y - hy)
    reach = 60.0 + 70.0 * rng.random()
    wedge = _ramp(np.radians(1.0) * 0 + (spread - np.abs(dtheta)) * r, edge * 2.0) * _ramp(reach - r, 8.0)
    wedge *= _ramp(r - 6.0, 4.0) * lung.soft
    canvas.air *= 1.0 - 0.85 * wedge
    canvas.vessels *= 1.0 - wedge
    canvas.extra += 0.03 * wedge
    return (wedge > 0.5) & lung.mask


def _clean_mask(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Drop connected components too small to box (anti-aliasing crumbs)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def _mask_boxes(mask: np.ndarray) -> list[tuple[float, float, float, float]]:
    """One [x, y, w, h] box (pixels) per 8-connected component, largest first."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        rows, cols = sl
        boxes.append((float(cols.start), float(rows.start), float(cols.stop - cols.start), float(rows.stop - rows.start)))
    boxes.sort(key=lambda b: -b[2] * b[3])
    return boxes


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _expose(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Attenuation -> blur -> quantum noise -> processing -> windowed display in [0, 1]."""
    g = canvas.geometry
    sp = canvas.frame.spacing
    lungs = canvas.lung_soft
    vessels = canvas.vessels
    if canvas.vessel_blur > 0:
        vessels = ndimage.gaussian_filter(vessels, canvas.vessel_blur / sp)
    attenuation = (
        canvas.tissue
        + canvas.bone
        - canvas.air
        + VESSEL_DENSITY * vessels * np.clip(lungs * 1.6, 0.0, 1.0)
        + 0.012 * canvas.texture * lungs
        + canvas.extra
    )
    attenuation = ndimage.gaussian_filter(attenuation, g.blur_mm / sp * 0.6)
    # Poisson statistics: counts ~ N0 exp(-kappa A); the log-signal noise grows where
    # fewer photons arrive (bone, abdomen), as on a real detector.
    counts = g.counts * (sp / REFERENCE_SPACING_MM) ** 2
    sigma = np.exp(0.5 * ATTENUATION_KAPPA * np.clip(attenuation, 0.0, None)) / (
        ATTENUATION_KAPPA * math.sqrt(counts)
    )
    noisy = attenuation + sigma * rng.standard_normal(attenuation.shape, dtype=np.float32)
    noisy = ndimage.gaussian_filter(noisy, 0.35)
    # Digital radiography processing: mild unsharp masking at a coarse scale (equalises the
    # lung fields against the mediastinum) computed on a 4x smaller grid for speed.
    small = ndimage.zoom(noisy, 0.25, order=1)
    small = ndimage.gaussian_filter(small, 16.0 / (sp * 4.0))
    coarse = ndimage.zoom(small, (noisy.shape[0] / small.shape[0], noisy.shape[1] / small.shape[1]), order=1)
    processed = noisy + g.edge_enhance * (noisy - coarse)
    display = (processed - g.window_lo) / (g.window_hi - g.window_lo)
    display = np.clip(display, 0.0, 1.0) ** g.gamma
    return display.astype(np.float32)


def render_case(
    rng: np.random.Generator,
    *,
    size: int = 256,
    view: str = "PA",
    findings: Sequence[str] = (),
    patient: PhantomPatient | None = None,
) -> PhantomCase:
    """Draw one phantom radiograph with exactly the requested findings.

    The random stream is split up front (anatomy, each finding, noise), so the same
    generator state with and without a finding gives the same patient, pose and noise:
    the difference between the two images is the finding itself.

    Args:
        rng: the random generator (consumed).
        size: image side in pixels (square).
        view: "PA", "AP" or "LATERAL".
        findings: names from ``PHANTOM_FINDINGS``; any order, no duplicates needed.
        patient: shared traits for follow-up images; drawn from ``rng`` when None.

    Returns:
        The image with its masks, boxes, spacing and cardiothoracic ratio.

    Raises:
        ValueError: unknown view or finding, or a size below 32.

    Example:
        >>> case = render_case(np.random.default_rng(7), size=256, view="PA",
        ...                    findings=("Cardiomegaly", "Effusion"))
        >>> case.image.shape, case.ctr > 0.5, sorted(case.masks)
        ((256, 256), True, ['Cardiomegaly', 'Effusion'])
    """
    view = view.upper()
    if view in ("LL", "RL", "LAT"):
        view = "LATERAL"
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
    unknown = [f for f in findings if f not in PHANTOM_FINDINGS]
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown}; phantoms draw {', '.join(PHANTOM_FINDINGS)}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    wanted = set(findings)
    seeds = rng.integers(0, 2**63 - 1, size=6)
    if patient is None:
        patient = sample_patient(np.random.default_rng(seeds[0]))
    finding_rngs: dict[str, np.random.Generator] = {}

    def rng_for(name: str) -> np.random.Generator:
        if name not in finding_rngs:
            finding_rngs[name] = np.random.default_rng([int(seeds[2]), PHANTOM_FINDINGS.index(name)])
        return finding_rngs[name]

    plan = _plan_findings(rng_for, wanted, view)
    geometry = _sample_geometry(np.random.default_rng(seeds[1]), patient, view, plan)
    spacing = geometry.fov / size
    frame = _Frame.make(size, spacing, geometry.angle, geometry.tx, geometry.ty)
    anatomy_rng = np.random.default_rng(seeds[3])
    canvas = _draw_lateral(frame, geometry, anatomy_rng) if view == "LATERAL" else _draw_frontal(frame, geometry, anatomy_rng)

    masks: dict[str, np.ndarray] = {}
    for name in PHANTOM_FINDINGS:  # fixed order: later findings see earlier ones' changes
        if name not in wanted:
            continue
        r = rng_for(name)
        if name == "Cardiomegaly":
            mask = canvas.heart.copy()
        elif name == "Effusion":
            mask = _finding_effusion(canvas, r)
        elif name == "Nodule":
            mask = _finding_nodule(canvas, r, mass=False)
        elif name == "Mass":
            mask = _finding_nodule(canvas, r, mass=True)
        elif name == "Pneumothorax":
            mask = _finding_pneumothorax(canvas, r)
        elif name == "Consolidation":
            mask = _finding_consolidation(canvas, r)
        elif name == "Edema":
            mask = _finding_edema(canvas, r)
        else:
            mask = _finding_atelectasis(canvas, r, plan)
        min_px = max(3, int(round(4.0 / (spacing * spacing))))  # ~4 mm^2
        masks[name] = _clean_mask(mask, min_px)

    image = _expose(canvas, np.random.default_rng(seeds[4]))
    present = tuple(f for f in PHANTOM_FINDINGS if f in wanted)
    return PhantomCase(
        image=image,
        findings=present,
        masks=masks,
        boxes={name: _mask_boxes(m) for name, m in masks.items()},
        view_position=view,
        pixel_spacing=(float(spacing), float(spacing)),
        ctr=float(geometry.ctr),
        patient_id=patient.patient_id,
        age=patient.age,
        sex=patient.sex,
        anatomy=canvas.anatomy,
    )
