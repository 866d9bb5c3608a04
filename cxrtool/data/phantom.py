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
    "CTR_THRESHOLD",
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

FIELD_OF_VIEW_MM = (345.0, 420.0)  # detector field covered by the whole image
THORAX_HALF_WIDTH_MM = 136.0  # midline to inner rib margin at the costophrenic angle
APEX_Y_MM = -150.0  # lung apex
CP_ANGLE_Y_MM = 100.0  # lateral costophrenic angle (right)
APEX_X_FRACTION = 0.37  # the apex dome tops out ~1/3 of the hemithorax width from the midline
LATERAL_WIDEST_FRACTION = 0.40  # the apical curve of the lateral border ends this far down
MEDIAL_CURVE_FRACTION = 0.12  # the medial border meets the mediastinum this far down
LUNG_BASE_FLARE_MM = 20.0  # the lungs widen towards the bases (a rounded triangle)
DOME_PEAK_X_FRACTION = 0.44  # hemidiaphragm dome peak, fraction of the hemithorax width
DOME_RISE_MM = 44.0  # dome peak above the costophrenic angle
DOME_LATERAL_EXPONENT = 2.25  # >2 steepens the dome laterally: sharp, acute CP angles
LEFT_DOME_DROP_MM = 16.0  # the left hemidiaphragm sits lower (the liver pushes the right up)
MEDIASTINUM_HALF_WIDTH_MM = 28.0
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
CLAVICLE_HALF_THICKNESS_MM = 7.5
RIB_HALF_THICKNESS_MM = (3.6, 5.8)  # posterior rib 1 -> rib 10
RIB_FIRST_SPACING_MM = (15.0, 19.0)
RIB_SPACING_GROWTH_MM = (0.8, 1.4)  # spacing grows by this per rib going down
RIB_ARCH_MM = 15.0  # posterior ribs arch upwards from the spine ...
RIB_DROP_MM = (28.0, 52.0)  # ... and drop towards the lateral wall (upper -> lower ribs)
N_POSTERIOR_RIBS = 10
N_ANTERIOR_RIBS = 7
LATERAL_DEPTH_RATIO = 0.76  # sagittal (AP) depth / transverse width of the thorax

# Cardiothoracic ratio ranges (heart width / internal thoracic width) as drawn on the image.
NORMAL_CTR = (0.38, 0.48)
CARDIOMEGALY_CTR = (0.53, 0.66)
CTR_THRESHOLD = 0.5
AP_HEART_MAGNIFICATION = (1.10, 1.15)  # the heart is far from the detector on an AP film
# True (PA-equivalent) ratios drawn on AP films before magnification; the projected ratio is
# then clipped into NORMAL_CTR / CARDIOMEGALY_CTR so the label rule (CTR > 0.5) still holds.
AP_TRUE_NORMAL_CTR = (0.35, 0.425)
AP_TRUE_CARDIOMEGALY_CTR = (0.49, 0.60)

NODULE_DIAMETER_MM = (10.0, 26.0)  # Fleischner: a nodule is < 3 cm
MASS_DIAMETER_MM = (34.0, 72.0)  # a mass is > 3 cm

# Attenuation units: 1.0 ~ the full soft-tissue thickness of the mid-chest.
LUNG_AIR = 0.60  # attenuation removed by a full-depth lung
HEART_DENSITY = 0.015  # tiny: the cardiac outline is where heart meets aerated lung
RIB_DENSITY = 0.085
VESSEL_SAMPLE_MM = 1.0  # spacing of the points that draw a vessel
CLAVICLE_DENSITY = 0.13
SPINE_DENSITY = 0.07
VESSEL_DENSITY = 0.11
ATTENUATION_KAPPA = 2.6  # detector counts fall as exp(-kappa * attenuation)
REFERENCE_COUNTS = 30000.0  # photons per 1.6 mm pixel behind air-free tissue of 0 thickness
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
_LATENT_PREVALENCE: dict[str, float] = {"heart_failure": 0.12, "infection": 0.10, "neoplasm": 0.10}
# (leak, {parent: weight}); leaks were fitted by simulation to the target marginals with
# ~40% "No Finding" (see tests/test_phantom.py for the check).
_NOISY_OR: dict[str, tuple[float, dict[str, float]]] = {
    "Cardiomegaly": (0.089, {"heart_failure": 0.56}),
    "Edema": (0.045, {"heart_failure": 0.40, "Cardiomegaly": 0.08}),
    "Effusion": (0.17, {"heart_failure": 0.40, "infection": 0.20, "neoplasm": 0.20, "Edema": 0.16}),
    "Consolidation": (0.051, {"infection": 0.52}),
    "Atelectasis": (0.132, {"Effusion": 0.20, "Consolidation": 0.20, "neoplasm": 0.096}),
    "Nodule": (0.073, {"neoplasm": 0.28}),
    "Mass": (0.037, {"neoplasm": 0.24}),
    "Pneumothorax": (0.046, {"Atelectasis": 0.024}),
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
        >>> sample_findings(np.random.default_rng(0))
        ('Cardiomegaly',)
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
# Small vectorised helpers. Speed notes: on 256x256 float32 grids np.hypot, np.where and
# fractional powers cost 5-20x a multiply, so the drawing code uses sqrt/products instead,
# and small structures are drawn only inside their bounding box (``_Frame.crop``).
# --------------------------------------------------------------------------------------


def _ramp(d: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased step: 0 for d < -edge/2, 1 for d > edge/2 (d and edge in mm)."""
    return np.clip(d * (1.0 / edge) + 0.5, 0.0, 1.0)


def _unit(d: np.ndarray) -> np.ndarray:
    """Clip to [0, 1]."""
    return np.clip(d, 0.0, 1.0)


def _length(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return np.sqrt(dx * dx + dy * dy)


def _blur(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur; narrow kernels as shifted-slice sums (scipy's per-call cost dominates
    at these sizes), wide ones via scipy. Edges replicate the border."""
    if sigma_px <= 0.05:
        return a
    radius = int(math.ceil(2.5 * sigma_px))
    if radius > 4:
        return ndimage.gaussian_filter(a, sigma_px, truncate=2.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    rows, cols = a.shape
    p = np.pad(a, radius, mode="edge")
    mid = p[:, radius : radius + cols]
    out = mid[0:rows] * taps[0]
    for k in range(1, 2 * radius + 1):
        out += mid[k : k + rows] * taps[k]
    p = np.pad(out, ((0, 0), (radius, radius)), mode="edge")
    res = p[:, 0:cols] * taps[0]
    for k in range(1, 2 * radius + 1):
        res += p[:, k : k + cols] * taps[k]
    return res


_NOISE_BANK: dict[tuple[int, float], np.ndarray] = {}


def _noise_bank(size: int, sigma_px: float) -> np.ndarray:
    """A fixed (2*size)^2 unit-variance smooth random field, built once per process."""
    key = (size, sigma_px)
    bank = _NOISE_BANK.get(key)
    if bank is None:
        seed = [size, int(round(sigma_px * 100)), 0x50A7]  # fixed: same bank in every worker
        bank = np.random.default_rng(seed).standard_normal((2 * size, 2 * size), dtype=np.float32)
        if sigma_px > 0:
            bank = ndimage.gaussian_filter(bank, sigma_px, mode="wrap")
            bank *= 1.0 / float(bank.std())
        _NOISE_BANK[key] = bank
    return bank


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``sigma_px`` (0: white).

    Filtering fresh white noise for every image costs more than drawing the rest of it,
    so a random window (offset, flips) of a per-process bank is used instead; the
    correlation length is rounded to 0.25 px to keep the banks few.
    """
    size = max(shape)
    sigma = 0.0 if sigma_px == 0 else max(round(sigma_px * 4.0) / 4.0, 0.5)
    # Canvas sizes vary a little with the patient's rotation: share banks per 64 pixels.
    bank = _noise_bank(64 * math.ceil(size / 64), sigma)
    span = bank.shape[0] - size
    r0, c0, flips = (int(v) for v in rng.integers(0, (span, span, 4)))
    window = bank[r0 : r0 + shape[0], c0 : c0 + shape[1]]
    if flips & 1:
        window = window[::-1]
    if flips & 2:
        window = window[:, ::-1]
    return window


def _segment_distance(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
) -> np.ndarray:
    """Distance (mm) from every grid point to the segment p0-p1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    inv = 1.0 / (dx * dx + dy * dy + 1e-9)
    t = _unit(((x - p0[0]) * dx + (y - p0[1]) * dy) * inv)
    return _length(x - (p0[0] + t * dx), y - (p0[1] + t * dy))


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre offsets from the image centre, in pixels (cached per size)."""
    grid = _GRID_CACHE.get(size)
    if grid is None:
        c = np.arange(size, dtype=np.float32) + np.float32(0.5 - size / 2.0)
        grid = (np.ascontiguousarray(np.broadcast_to(c[None, :], (size, size))),
                np.ascontiguousarray(np.broadcast_to(c[:, None], (size, size))))  # fmt: skip
        _GRID_CACHE[size] = grid
    return grid


Crop = tuple[slice, slice]


@dataclass
class _Frame:
    """Where the patient is drawn, and how that maps onto the detector.

    Anatomy is drawn on an axis-aligned "canvas" in patient millimetres, so every
    coordinate grid is separable: ``x`` is a (1, n) row and ``y`` an (n, 1) column, and
    anything that depends on one coordinate only (lung borders against height, the
    diaphragm against width...) costs n operations, not n^2. The patient's rotation and
    shift on the detector are applied once at the end by :meth:`warp` (bilinear) and
    :meth:`warp_mask` (nearest). The canvas has a margin so rotated corners stay inside.
    """

    size: int  # detector (output) side in pixels
    spacing: float  # mm per pixel, canvas and detector alike
    n: int  # canvas side in pixels
    x: np.ndarray  # (1, n) patient x (mm) of canvas columns
    y: np.ndarray  # (n, 1) patient y (mm) of canvas rows
    x0: float
    y0: float
    cos: float
    sin: float
    tx: float
    ty: float

    @classmethod
    def make(cls, size: int, spacing: float, angle_deg: float, tx: float, ty: float) -> _Frame:
        c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
        margin = int(math.ceil(0.5 * size * (abs(c) + abs(s) - 1.0))) + 2
        n = size + 2 * margin
        # The detector centre in patient coordinates becomes the canvas centre.
        cx, cy = -(c * tx + s * ty), -(c * ty - s * tx)
        x0 = cx - 0.5 * (n - 1) * spacing
        y0 = cy - 0.5 * (n - 1) * spacing
        axis = np.arange(n, dtype=np.float32) * np.float32(spacing)
        x = (axis + np.float32(x0))[None, :]
        y = (axis + np.float32(y0))[:, None]
        return cls(size, spacing, n, x, y, x0, y0, c, s, tx, ty)

    @property
    def shape(self) -> tuple[int, int]:
        """Canvas shape."""
        return (self.n, self.n)

    def to_pixel(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patient mm -> canvas (column, row) coordinates (pixel centres at integers)."""
        return (px - self.x0) / self.spacing, (py - self.y0) / self.spacing

    def crop(self, x0: float, x1: float, y0: float, y1: float) -> Crop | None:
        """Canvas slices covering the patient rectangle [x0, x1] x [y0, y1] (mm)."""
        c0 = max(int(math.floor((x0 - self.x0) / self.spacing)), 0)
        c1 = min(int(math.ceil((x1 - self.x0) / self.spacing)) + 1, self.n)
        r0 = max(int(math.floor((y0 - self.y0) / self.spacing)), 0)
        r1 = min(int(math.ceil((y1 - self.y0) / self.spacing)) + 1, self.n)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def grid(self, crop: Crop | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The (1, w) x and (h, 1) y coordinates of a crop (or of the whole canvas)."""
        if crop is None:
            return self.x, self.y
        rows, cols = crop
        return self.x[:, cols], self.y[rows, :]

    def point(self, flat_index: int) -> tuple[float, float]:
        """Patient (x, y) in mm of a flat canvas index."""
        r, c = divmod(int(flat_index), self.n)
        return float(self.x[0, c]), float(self.y[r, 0])

    def splat(self, px: np.ndarray, py: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Accumulate point weights onto the canvas with bilinear splatting."""
        col, row = self.to_pixel(px, py)
        c0 = np.floor(col).astype(np.int64)
        r0 = np.floor(row).astype(np.int64)
        fc, fr = col - c0, row - r0
        n = self.n
        rr = np.concatenate([r0, r0, r0 + 1, r0 + 1])
        cc = np.concatenate([c0, c0 + 1, c0, c0 + 1])
        ww = np.concatenate([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc])
        ww *= np.tile(weights, 4)
        ok = (rr >= 0) & (rr < n) & (cc >= 0) & (cc < n)
        out = np.bincount(rr[ok] * n + cc[ok], weights=ww[ok], minlength=n * n)
        return out.reshape(n, n).astype(np.float32)

    def _maps(self) -> tuple[np.ndarray, ...]:
        maps = getattr(self, "_cached_maps", None)
        if maps is None:
            ux, uy = _unit_grid(self.size)
            xd = ux * self.spacing - self.tx
            yd = uy * self.spacing - self.ty
            col = ((self.cos * xd + self.sin * yd) - self.x0) / self.spacing
            row = ((self.cos * yd - self.sin * xd) - self.y0) / self.spacing
            n = self.n
            c0 = np.clip(np.floor(col), 0, n - 2)
            r0 = np.clip(np.floor(row), 0, n - 2)
            fc = np.clip(col - c0, 0.0, 1.0).astype(np.float32)
            fr = np.clip(row - r0, 0.0, 1.0).astype(np.float32)
            base = (r0 * n + c0).astype(np.intp)
            nearest = (np.clip(np.rint(row), 0, n - 1) * n + np.clip(np.rint(col), 0, n - 1)).astype(np.intp)
            maps = (base, fc, fr, nearest)
            object.__setattr__(self, "_cached_maps", maps)
        return maps

    def warp(self, canvas: np.ndarray) -> np.ndarray:
        """Canvas -> detector image (bilinear), applying the patient's rotation and shift."""
        base, fc, fr, _ = self._maps()
        flat = canvas.ravel()
        n = self.n
        top = flat[base] + fc * (flat[base + 1] - flat[base])
        bottom = flat[base + n] + fc * (flat[base + n + 1] - flat[base + n])
        return top + fr * (bottom - top)

    def warp_mask(self, mask: np.ndarray) -> np.ndarray:
        """Canvas mask -> detector mask (nearest neighbour)."""
        return mask.ravel()[self._maps()[3]]


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
    bubble: float


def _sample_geometry(
    rng: np.random.Generator, patient: PhantomPatient, view: str, plan: _FindingPlan
) -> _Geometry:
    """Per-image anatomy/acquisition parameters; a fixed number of draws whatever the view."""
    u = [float(v) for v in rng.random(32)]  # Python floats keep the float32 grids float32
    s = patient.scale
    ap = view == "AP"
    lateral_view = view == "LATERAL"
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
    peak_l = min(peak_r + LEFT_DOME_DROP_MM * (0.6 + 0.7 * u[4]), cp_l - 22.0)
    cp_y = {"right": cp_r, "left": cp_l}
    peak = {"right": peak_r, "left": peak_l}
    for side, raise_mm in plan.raised_dome.items():
        cp_y[side] -= raise_mm * 0.6
        peak[side] -= raise_mm

    lo, hi = CARDIOMEGALY_CTR if plan.cardiomegaly else NORMAL_CTR
    # The patient's heart quantile and a per-image jitter place the ratio inside its range.
    q = min(max(0.75 * patient.heart_quantile + 0.25 * u[5], 0.0), 1.0)
    ctr = lo + (hi - lo) * q
    if ap:
        # The heart lies far from the detector on an AP film and projects 10-15% larger:
        # draw the true (PA-equivalent) ratio magnified, kept inside its class's range.
        mag_lo, mag_hi = AP_HEART_MAGNIFICATION
        magnification = mag_lo + (mag_hi - mag_lo) * u[6]
        t_lo, t_hi = AP_TRUE_CARDIOMEGALY_CTR if plan.cardiomegaly else AP_TRUE_NORMAL_CTR
        true_ratio = t_lo + (t_hi - t_lo) * q
        ctr = min(max(true_ratio * magnification, lo), hi)

    mediastinum = MEDIASTINUM_HALF_WIDTH_MM * s * ((1.08 + 0.12 * u[7]) if ap else (0.92 + 0.16 * u[7]))
    hx = HILUM_X_FRACTION[0] + (HILUM_X_FRACTION[1] - HILUM_X_FRACTION[0]) * u[8]
    hy = HILUM_Y_FRACTION[0] + (HILUM_Y_FRACTION[1] - HILUM_Y_FRACTION[0]) * u[9]
    shift = plan.mediastinal_shift
    hilum = {
        "right": (-hx * width["right"] + shift, apex + hy * lung_height),
        "left": (hx * width["left"] + shift, apex + hy * lung_height - 10.0),
    }
    if ap:  # AP: clavicles project higher and flatter, scapulae over the lungs
        clavicle_y = apex + 4.0 + 10.0 * u[10]
        clavicle_rise = 2.0 + 8.0 * u[11]
        scapula_x = (0.55 + 0.12 * u[12]) * half_width
    else:
        clavicle_y = apex + 34.0 + 12.0 * u[10]
        clavicle_rise = 38.0 + 16.0 * u[11]
        scapula_x = (1.0 + 0.08 * u[12]) * half_width
    fov = FIELD_OF_VIEW_MM[0] + (FIELD_OF_VIEW_MM[1] - FIELD_OF_VIEW_MM[0]) * u[13]
    fov = max(fov, 2.35 * half_width)  # keep the whole rib cage on the detector
    tissue = patient.habitus * (0.95 + 0.1 * u[14])
    rib_spacing = RIB_FIRST_SPACING_MM[0] + (RIB_FIRST_SPACING_MM[1] - RIB_FIRST_SPACING_MM[0]) * u[19]
    density = 1.28 if lateral_view else 1.0  # a lateral ray crosses the wider body axis
    return _Geometry(
        view=view,
        width=width,
        apex_y=apex,
        cp_y=cp_y,
        dome_peak_y=peak,
        mediastinum=mediastinum,
        shift=shift,
        ctr=ctr,
        heart_right_fraction=(0.33 + 0.07 * u[15]) + (0.04 if plan.cardiomegaly else 0.0),
        heart_tilt=math.radians(30.0 + 14.0 * u[16]),
        heart_aspect=0.62 + 0.10 * u[17],
        hilum=hilum,
        clavicle_y=clavicle_y,
        clavicle_rise=clavicle_rise,
        scapula_x=scapula_x,
        rib_first=apex + 3.0 + 7.0 * u[18],
        rib_spacing=rib_spacing * s * patient.height_ratio * inspiration,
        rib_growth=RIB_SPACING_GROWTH_MM[0] + (RIB_SPACING_GROWTH_MM[1] - RIB_SPACING_GROWTH_MM[0]) * u[20],
        tissue=tissue * density,
        breast=patient.breast * (0.8 + 0.4 * u[21]),
        fov=fov,
        angle=(u[22] - 0.5) * 8.0,
        tx=(u[23] - 0.5) * 24.0,
        ty=(u[24] - 0.5) * 26.0 + (10.0 if lateral_view else 4.0),
        gamma=0.85 + 0.35 * u[25],
        window_lo=(0.10 + 0.10 * u[26]) * density,
        window_hi=(1.24 * density) * (0.93 + 0.14 * u[27]) * tissue,
        counts=REFERENCE_COUNTS * ((0.35 + 0.9 * u[28]) if ap else (0.6 + 1.2 * u[28])),
        blur_mm=0.6 + 0.8 * u[29],
        edge_enhance=0.2 + 0.3 * u[30],
        bubble=u[31],
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
    apex_y: float


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

    def field(self, name: str) -> _LungField:
        for lung in self.fields:
            if lung.name == name:
                return lung
        return self.fields[0]


def _vessel_tree(
    rng: np.random.Generator,
    hilum: tuple[float, float],
    angles: np.ndarray,
    trunk_mm: float,
    depth: int = 5,
) -> list[np.ndarray]:
    """Branching pulmonary vessels from a hilum, generated one generation at a time.

    Returns the sampled points (N, 2) in mm of each generation (later = thinner). Each
    generation is one vectorised step, so hundreds of segments cost a few numpy calls.
    """
    n = angles.size
    ang = angles.astype(np.float64)
    # The hilum is a column of branching arteries, not a point: upper-lobe trunks leave
    # higher, lower-lobe trunks lower, all a little apart.
    start = np.empty((n, 2))
    start[:, 0] = hilum[0] + rng.normal(0.0, 3.0, n)
    start[:, 1] = hilum[1] + 18.0 * np.sin(ang) + rng.normal(0.0, 4.0, n)
    length = trunk_mm * rng.uniform(0.8, 1.2, n)
    points: list[np.ndarray] = []
    for _ in range(depth):
        # ~1 mm between samples so the blurred points read as continuous lines.
        k = max(4, int(math.ceil(float(length.max()) / VESSEL_SAMPLE_MM)))
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
        length = np.concatenate([length, length]) * rng.uniform(0.66, 0.84, 2 * n)
        n *= 2
    return points


def _draw_vessel_layers(frame: _Frame, trees: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Splat vessel trees into a lung-marking layer and a thin bronchial layer."""
    # Thick proximal vessels get a wide blur, distal ones a narrow one (tapering).
    groups = ((0, 2, 2.4, 1.0), (2, 9, 1.1, 0.45))
    vessels = np.zeros(frame.shape, dtype=np.float32)
    bronchi = vessels
    for lo, hi, sigma_mm, weight in groups:
        pts = [tree[level] for tree in trees for level in range(lo, min(hi, len(tree)))]
        if not pts:
            continue
        p = np.concatenate(pts)
        # Points are ~1-4 mm apart; the weight per point sets the line's contrast.
        layer = frame.splat(p[:, 0], p[:, 1], np.full(len(p), weight * VESSEL_SAMPLE_MM))
        sigma_px = max(sigma_mm / frame.spacing, 0.5)
        # Peak of a blurred line = weight when the vessel is wider than a pixel, less
        # (partial volume) when it is not.
        norm = math.sqrt(2.0 * math.pi) * sigma_mm / frame.spacing**2
        blurred = _blur(layer, sigma_px)
        blurred *= norm / weight
        vessels = vessels + blurred * weight
        # Bronchi run with the (smaller) arteries: reuse the distal tree, unit contrast.
        bronchi = blurred
    return vessels, bronchi


def _frontal_lung(g: _Geometry, x: np.ndarray, y: np.ndarray, side: str, edge: float) -> dict:
    """Analytic hemithorax: lateral/medial borders, diaphragm dome, normalised coordinates."""
    sign = -1.0 if side == "right" else 1.0
    xa = (x - g.shift) * sign  # distance from the midline towards this side's lateral wall
    width = g.width[side]
    w0 = width - LUNG_BASE_FLARE_MM
    apex = g.apex_y
    cp = g.cp_y[side]
    height = cp - apex
    x_apex = APEX_X_FRACTION * width
    y_wide = apex + LATERAL_WIDEST_FRACTION * height
    y_med = apex + MEDIAL_CURVE_FRACTION * height
    q = _unit((y_wide - y) * (1.0 / (y_wide - apex)))
    lateral = x_apex + (w0 - x_apex) * np.sqrt(1.0 - q * q)
    lateral += LUNG_BASE_FLARE_MM * _unit((y - y_wide) * (1.0 / (cp - y_wide)))
    # The mediastinum widens below the carina towards the heart (the vascular pedicle).
    m0 = g.mediastinum + 5.0 * _unit((y - (apex + CARINA_BELOW_APEX_MM)) * (1.0 / 60.0))
    qm = _unit((y_med - y) * (1.0 / (y_med - apex)))
    medial = x_apex - (x_apex - m0) * np.sqrt(1.0 - qm * qm)
    if side == "left":  # the aortic knob indents the left upper lung medially
        knob_y, bulge, sd = AORTIC_KNOB
        ky = (y - (apex + (knob_y - APEX_Y_MM))) * (1.0 / sd)
        medial += bulge * np.exp(-ky * ky)
    dome = _dome_grid(g, side, x)
    soft = _ramp(lateral - xa, edge) * _ramp(xa - medial, edge)
    soft = soft * (_ramp(dome - y, edge) * _ramp(y - apex, edge))
    span = np.maximum(lateral - medial, 1e-3)
    u = _unit((xa - medial) / span)
    v = _unit((y - apex) / np.maximum(dome - apex, 1e-3))
    return {"xa": xa, "lateral": lateral, "medial": medial, "dome": dome, "soft": soft,
            "u": u, "v": v, "span": span, "sign": sign, "x_apex": x_apex}  # fmt: skip


def _dome_grid(g: _Geometry, side: str, x: np.ndarray) -> np.ndarray:
    """Hemidiaphragm height (mm) over image x: peak mid-hemithorax, steep lateral fall."""
    sign = -1.0 if side == "right" else 1.0
    xa = (x - g.shift) * sign
    width, peak, cp = g.width[side], g.dome_peak_y[side], g.cp_y[side]
    x_peak = DOME_PEAK_X_FRACTION * width
    lat_t = np.maximum((xa - x_peak) * (1.0 / (width - x_peak)), 0.0)
    med_t = _unit((x_peak - xa) * (1.0 / x_peak))
    # t^2.25 (= t*t*t^0.25): steeper than a parabola laterally, so the CP angle is acute.
    return peak + (cp - peak) * (lat_t * lat_t * np.sqrt(np.sqrt(lat_t))) + 14.0 * med_t * med_t


def _dome_at(g: _Geometry, side: str, xv: float) -> float:
    """The hemidiaphragm height (mm) at image x ``xv`` (scalar version of _frontal_lung)."""
    sign = -1.0 if side == "right" else 1.0
    xa = (xv - g.shift) * sign
    width, peak, cp = g.width[side], g.dome_peak_y[side], g.cp_y[side]
    x_peak = DOME_PEAK_X_FRACTION * width
    if xa >= x_peak:
        t = (xa - x_peak) / (width - x_peak)
        return peak + (cp - peak) * t**DOME_LATERAL_EXPONENT
    return peak + 14.0 * ((x_peak - xa) / x_peak) ** 2


def _heart_ellipse(g: _Geometry) -> tuple[float, float, float, float, float]:
    """Frontal heart ellipse (cx, cy, a, b, tilt) whose width matches the drawn CTR exactly."""
    thorax = g.width["right"] + g.width["left"]
    heart_w = g.ctr * thorax
    ex = heart_w / 2.0
    phi, k = g.heart_tilt, g.heart_aspect
    a = ex / math.sqrt(math.cos(phi) ** 2 + (k * math.sin(phi)) ** 2)
    b = k * a
    cx = g.shift + (0.5 - g.heart_right_fraction) * heart_w
    # The leftmost/rightmost points of a tilted ellipse sit off its centre vertically.
    dy_extreme = (a * a - b * b) * math.sin(phi) * math.cos(phi) / ex
    # The cardiac apex (rightmost point on the image) rests just above the left dome.
    cy = _dome_at(g, "left", cx + ex) - 5.0 - dy_extreme
    return cx, cy, a, b, phi


def _ellipse_rho(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, phi: float
) -> np.ndarray:
    """Normalised elliptical radius (1 on the outline) of a tilted ellipse."""
    dx, dy = x - cx, y - cy
    c, s = math.cos(phi), math.sin(phi)
    p = (dx * c + dy * s) * (1.0 / a)
    q = (dy * c - dx * s) * (1.0 / b)
    return np.sqrt(p * p + q * q)


def _draw_frontal(frame: _Frame, g: _Geometry, rng: np.random.Generator) -> _Canvas:
    """Normal PA/AP anatomy as attenuation layers."""
    x, y = frame.x, frame.y
    edge = max(frame.spacing, 0.5)
    ap = g.view == "AP"
    shape = frame.shape
    tissue = np.zeros(shape, dtype=np.float32)
    bone = np.zeros(shape, dtype=np.float32)
    air = np.zeros(shape, dtype=np.float32)
    wmax = max(g.width.values())

    # Body outline: neck, sloping shoulders, chest wall; the ray path through the torso
    # shortens towards the skin (elliptical cross-section).
    wb = wmax + CHEST_WALL_MM * g.tissue
    y_sh = g.apex_y - 5.0
    xc = x - 0.5 * g.shift
    ax = np.abs(xc)
    c = _unit((ax - NECK_HALF_WIDTH_MM) * (1.0 / (wb + 30.0 - NECK_HALF_WIDTH_MM)))
    shoulder_top = (y_sh - 62.0) + 62.0 * c * np.sqrt(c)  # trapezius slope down to the shoulder
    below = (y - y_sh) * (1.0 / 45.0)
    half_w = wb + SHOULDER_BULGE_MM * np.exp(-below * below) + 8.0 * _unit((y - g.apex_y) * (1.0 / 250.0))
    rel = xc / half_w
    torso = np.sqrt(np.sqrt(_unit(1.0 - rel * rel)))
    torso *= _ramp(half_w - ax, edge) * _ramp(y - shoulder_top, 3.0)
    rn = xc * (1.0 / NECK_HALF_WIDTH_MM)
    neck = 0.7 * np.sqrt(_unit(1.0 - rn * rn))
    body = np.maximum(torso, neck)
    # Arms beside the chest (PA: rotated forward; AP: closer to the body).
    arm_c = wb + (36.0 if not ap else 28.0)
    ra = (ax - arm_c) * (1.0 / 27.0)
    arm = 0.72 * np.sqrt(_unit(1.0 - ra * ra)) * _unit((y - shoulder_top - 10.0) * (1.0 / 30.0))
    body = np.maximum(body, arm)
    tissue += g.tissue * body
    tissue += (0.07 * g.tissue) * _unit((y - g.cp_y["right"]) * (1.0 / 60.0))  # abdomen is thicker

    sides: dict[str, dict] = {}
    fields: list[_LungField] = []
    anatomy: dict[str, np.ndarray] = {}
    lung_soft = np.zeros(shape, dtype=np.float32)

    hcx, hcy, ha, hb, hphi = _heart_ellipse(g)
    heart_soft = np.zeros(shape, dtype=np.float32)
    heart_vis = np.zeros(shape, dtype=np.float32)
    hc = frame.crop(hcx - ha - 4, hcx + ha + 4, hcy - ha - 4, hcy + ha + 4)
    if hc is not None:
        hx_, hy_ = frame.grid(hc)
        rho = _ellipse_rho(hx_, hy_, hcx, hcy, ha, hb, hphi)
        heart_soft[hc] = _ramp((1.0 - rho) * hb, edge)
        left = (hx_ >= g.shift).astype(np.float32)
        dome_local = _dome_grid(g, "right", hx_) * (1.0 - left) + _dome_grid(g, "left", hx_) * left
        heart_vis[hc] = heart_soft[hc] * _ramp(dome_local - hy_, edge)
        tissue[hc] += HEART_DENSITY * heart_vis[hc] * (0.5 + 0.5 * np.sqrt(_unit(1.0 - rho * rho)))
    heart_mask = heart_vis > 0.5

    for side in ("right", "left"):
        sign = -1.0 if side == "right" else 1.0
        width = g.width[side]
        xs = sorted((g.shift - sign * 4.0, g.shift + sign * (width + 75.0)))
        crop = frame.crop(xs[0], xs[1], g.apex_y - 45.0, g.cp_y[side] + 45.0)
        soft_full = np.zeros(shape, dtype=np.float32)
        raw_soft = np.zeros(shape, dtype=np.float32)
        u_full = np.zeros(shape, dtype=np.float32)
        v_full = np.zeros(shape, dtype=np.float32)
        wall = np.zeros(shape, dtype=bool)
        if crop is not None:
            cx_, cy_ = frame.grid(crop)
            s = _frontal_lung(g, cx_, cy_, side, edge)
            sides[side] = s
            hs = heart_soft[crop]
            u, v = s["u"], s["v"]
            # Air column depth: deepest in the mid zones; thinner laterally (chest wall
            # obliquity), at the narrow apex, and behind the heart.
            lat_fade = np.sqrt(_unit((1.0 - u) * (1.0 / 0.35)))
            depth = lat_fade * (0.80 + 0.20 * _unit(u * (1.0 / 0.15)))
            depth *= np.sqrt(_unit(s["span"] * (1.0 / (0.55 * (width - g.mediastinum)))))
            depth *= 0.86 + 0.14 * v
            air[crop] += LUNG_AIR * s["soft"] * depth * (1.0 - 0.88 * hs)
            raw_soft[crop] = s["soft"]
            soft_full[crop] = s["soft"] * (1.0 - hs)
            u_full[crop], v_full[crop] = u, v
            outside = s["soft"] < 0.5
            xa = s["xa"]
            # Chest wall and apex: outside the lung but lateral to its medial border (the
            # mediastinum is not a wall a pneumothorax peels the lung from).
            wall[crop] = outside & (cy_ < s["dome"] - 2.0) & (
                (xa > s["medial"] + 2.0) | ((cy_ < g.apex_y + 3.0) & (xa > g.mediastinum))
            )
            bone[crop] += _draw_ribs(g, side, s, cy_, edge)
        lung_soft += soft_full
        raw = raw_soft > 0.5
        hx, hy = g.hilum[side]
        fields.append(
            _LungField(name=side, soft=soft_full, mask=soft_full > 0.5, raw=raw, u=u_full, v=v_full,
                       hilum=(hx, hy), cp=(g.shift + sign * width, g.cp_y[side]), wall=wall,
                       sign=sign, apex_y=g.apex_y)
        )  # fmt: skip
        anatomy[f"lung_{side}"] = fields[-1].mask

    # Breast shadows over the lower zones, with a sharp curved lower margin.
    if g.breast > 0.05:
        for sign in (-1.0, 1.0):
            bx, by = sign * 0.58 * wmax + g.shift, g.cp_y["right"] - 18.0
            bc = frame.crop(bx - 85, bx + 85, by - 65, by + 65)
            if bc is None:
                continue
            bx_, by_ = frame.grid(bc)
            r = _length((bx_ - bx) * (1.0 / 80.0), (by_ - by) * (1.0 / 60.0))
            lower = _unit((by_ - (by - 60.0)) * (1.0 / 120.0))
            tissue[bc] += (0.14 * g.breast) * _ramp((1.0 - r) * 60.0, 3.0) * lower

    _draw_mediastinum(frame, g, tissue, air, edge)
    _draw_frontal_bones(frame, g, bone, edge)

    # Lung markings: trunks fanning up, out and down from each hilum.
    trees = []
    for lung in fields:
        n = 9
        base = np.linspace(-math.pi * 0.58, math.pi * 0.58, n) + rng.normal(0.0, 0.1, n)
        angles = base if lung.sign > 0 else math.pi - base
        trees.append(_vessel_tree(rng, lung.hilum, angles, 28.0 * (wmax / THORAX_HALF_WIDTH_MM)))
    vessels, bronchi = _draw_vessel_layers(frame, trees)
    # Upright: the lower-zone vessels are the larger ones (gravity).
    vessels *= 0.7 + 0.5 * _unit((y - g.apex_y) * (1.0 / (g.cp_y["right"] - g.apex_y)))

    texture = 0.6 * _smooth_noise(rng, shape, max(1.6 / frame.spacing, 0.6))
    texture += 0.4 * _smooth_noise(rng, shape, 5.0 / frame.spacing)

    anatomy["heart"] = heart_mask
    for lung in fields:
        # A 16 mm disc just inside the costophrenic angle (for tests and demos).
        cpx, cpy = lung.cp[0] - lung.sign * 14.0, lung.cp[1] - 14.0
        cp_mask = np.zeros(shape, dtype=bool)
        cc = frame.crop(cpx - 18.0, cpx + 18.0, cpy - 18.0, cpy + 18.0)
        if cc is not None:
            gx_, gy_ = frame.grid(cc)
            cp_mask[cc] = (_length(gx_ - cpx, gy_ - cpy) < 16.0) & lung.raw[cc]
        anatomy[f"costophrenic_{lung.name}"] = cp_mask
    # Stomach gas bubble under the left hemidiaphragm.
    if g.bubble < 0.8:
        gx = g.shift + 0.52 * g.width["left"]
        gy = _dome_at(g, "left", gx) + 26.0
        bc = frame.crop(gx - 40, gx + 40, gy - 22, gy + 22)
        if bc is not None:
            bx_, by_ = frame.grid(bc)
            r = _length((bx_ - gx) * (1.0 / 26.0), (by_ - gy) * (1.0 / 11.0))
            air[bc] += 0.09 * _ramp((1.0 - r) * 11.0, 3.0)
    return _Canvas(
        frame=frame, geometry=g, tissue=tissue, bone=bone, air=air, vessels=vessels,
        bronchi=bronchi, texture=texture, extra=np.zeros(shape, dtype=np.float32),
        fields=fields, heart=heart_mask, lung_soft=_unit(lung_soft), anatomy=anatomy,
    )  # fmt: skip


def _draw_mediastinum(frame: _Frame, g: _Geometry, tissue: np.ndarray, air: np.ndarray, edge: float) -> None:
    """Trachea, main bronchi and hila (in place)."""
    carina = (g.shift, g.apex_y + CARINA_BELOW_APEX_MM)
    tc = frame.crop(g.shift - 60, g.shift + 60, -1e3, carina[1] + 45)
    if tc is not None:
        cx_, cy_ = frame.grid(tc)
        kd = (cy_ - (g.apex_y + 62.0)) * (1.0 / 20.0)
        tr_x = g.shift - 3.0 * np.exp(-kd * kd)  # the aortic arch nudges the trachea right
        rt = (cx_ - tr_x) * (1.0 / TRACHEA_HALF_WIDTH_MM)
        trachea = np.sqrt(_unit(1.0 - rt * rt)) * _ramp(carina[1] - cy_, 4.0)
        for end in ((g.shift - 26.0, carina[1] + 22.0), (g.shift + 38.0, carina[1] + 30.0)):
            d = _segment_distance(cx_, cy_, carina, end) * (1.0 / 6.0)
            trachea = np.maximum(trachea, 0.8 * np.sqrt(_unit(1.0 - d * d)))
        air[tc] += 0.15 * trachea
    for side in ("right", "left"):
        hx, hy = g.hilum[side]
        sign = -1.0 if side == "right" else 1.0
        hc = frame.crop(hx - 45, hx + 45, hy - 70, hy + 70)
        if hc is None:
            continue
        hx_, hy_ = frame.grid(hc)
        dx = (hx_ - hx - sign * 4.0) * (1.0 / 12.0)
        dy = (hy_ - hy) * (1.0 / 26.0)
        tissue[hc] += 0.10 * np.exp(-(dx * dx + dy * dy))


def _draw_ribs(g: _Geometry, side: str, s: dict, y: np.ndarray, edge: float) -> np.ndarray:
    """Posterior and anterior ribs of one hemithorax (inside the side's crop)."""
    xa = s["xa"]
    width = g.width[side]
    # Posterior ribs: one warped phase field draws all of them at once. Each arches up from
    # the spine and drops towards the lateral wall; the spacing grows downwards.
    wall = np.maximum(s["lateral"], 0.62 * width) + 8.0
    t = np.clip((xa - 16.0) / (wall - 16.0), 0.0, 1.25)
    level = np.clip((y - g.apex_y) * (1.0 / (g.cp_y[side] - g.apex_y)), 0.0, 1.2)
    drop = RIB_DROP_MM[0] + (RIB_DROP_MM[1] - RIB_DROP_MM[0]) * level
    warped = y + (RIB_ARCH_MM * 4.0) * t * (1.0 - t) - drop * (t * t * t)
    d0, gr = g.rib_spacing, g.rib_growth
    z = np.maximum(warped - g.rib_first, -d0)
    r = (np.sqrt(np.maximum(d0 * d0 + 2.0 * gr * z, 0.0)) - d0) * (1.0 / gr)
    nearest = np.round(r)
    dist = np.abs(r - nearest) * (d0 + gr * nearest)
    thin, thick = RIB_HALF_THICKNESS_MM
    half = thin + (thick - thin) * _unit(r * (1.0 / N_POSTERIOR_RIBS))
    rel = _unit(dist / half)
    band = _ramp(half - dist, edge) * (0.7 + 0.5 * rel * rel * rel)  # tubular bone: bright margins
    valid = _ramp(r + 0.5, 0.2) * _ramp((N_POSTERIOR_RIBS - 0.5) - r, 0.2)
    valid *= _ramp(xa - 16.0, 4.0) * _unit((1.08 - t) * (1.0 / 0.14))
    out = RIB_DENSITY * band * valid
    # Anterior ribs: fainter, sloping down towards the midline, invisible medially where
    # they turn into costal cartilage.
    ta = np.clip(xa / wall, 0.0, 1.2)
    warped_a = y - 40.0 * (1.0 - ta) - 14.0 * ta * ta
    pitch = g.rib_spacing * 1.6
    ra = (warped_a - (g.rib_first + 6.0)) * (1.0 / pitch)
    fa = np.abs(ra - np.round(ra)) * pitch
    band_a = _ramp(5.0 - fa, edge) * _ramp(ra + 0.5, 0.2) * _ramp((N_ANTERIOR_RIBS - 0.5) - ra, 0.2)
    band_a *= _unit((ta - 0.35) * (1.0 / 0.15)) * _unit((1.1 - ta) * (1.0 / 0.1))
    out += (0.5 * RIB_DENSITY) * band_a
    # Below the diaphragm the ribs overlie 20+ cm of liver/abdomen: far less conspicuous.
    return out * (0.25 + 0.75 * _unit((s["dome"] + 10.0 - y) * (1.0 / 25.0)))


def _draw_frontal_bones(frame: _Frame, g: _Geometry, bone: np.ndarray, edge: float) -> None:
    """Clavicles, scapulae, humeri and spine for a frontal film (in place)."""
    wmax = max(g.width.values())
    for side in ("right", "left"):
        sign = -1.0 if side == "right" else 1.0
        width = g.width[side]
        xs = sorted((g.shift + sign * 8.0, g.shift + sign * (width + 60.0)))
        # Clavicle: an S-curved bar rising from the sternal notch to the acromion.
        cc = frame.crop(xs[0], xs[1], g.clavicle_y - g.clavicle_rise - 30.0, g.clavicle_y + 25.0)
        if cc is not None:
            gx_, gy_ = frame.grid(cc)
            xa = (gx_ - g.shift) * sign
            length = width + 28.0
            tc = (xa - 12.0) * (1.0 / length)
            tcc = _unit(tc)
            yc = g.clavicle_y - g.clavicle_rise * tc - 5.0 * np.sin(np.pi * tcc)
            half_c = CLAVICLE_HALF_THICKNESS_MM * (1.2 - 0.35 * tcc)
            dc = np.abs(gy_ - yc)
            rel = _unit(dc / half_c)
            clav = _ramp(half_c - dc, edge) * _ramp(tc * length, 4.0) * _ramp((1.0 - tc) * length, 6.0)
            bone[cc] += CLAVICLE_DENSITY * clav * (0.75 + 0.45 * rel * rel * rel)
        # Scapula: a triangle whose medial border overlies the lungs only on AP films.
        top = g.apex_y - 10.0
        xs2 = sorted((g.shift + sign * (g.scapula_x - 10.0), g.shift + sign * (wmax + 80.0)))
        sc = frame.crop(xs2[0], xs2[1], top - 5.0, top + 160.0)
        if sc is not None:
            gx_, ys = frame.grid(sc)
            xa = (gx_ - g.shift) * sign
            xm = g.scapula_x + 0.06 * (ys - top)
            gl = (wmax + 30.0, top + 12.0)
            ia = (g.scapula_x + 14.0, top + 150.0)
            lat_border = ia[1] + (xa - ia[0]) * ((gl[1] - ia[1]) / (gl[0] - ia[0]))
            scap = _ramp(xa - xm, edge) * _ramp(ys - top, 4.0) * _ramp(lat_border - ys, 3.0)
            bone[sc] += 0.05 * scap * (0.6 + 0.4 * _unit((xa - xm) * (1.0 / 40.0)))
        # Humeral head at the glenoid, shaft going down the arm.
        hxc = wmax + 48.0
        hc = frame.crop(g.shift + sign * (hxc - 40.0), g.shift + sign * (hxc + 40.0), top - 35.0, top + 200.0)
        if hc is not None:
            gx_, ys = frame.grid(hc)
            xa = (gx_ - g.shift) * sign
            hh = _length(xa - hxc, ys - (top + 6.0))
            rel = _unit(hh * (1.0 / 26.0))
            bone[hc] += 0.18 * _ramp(26.0 - hh, 2.0) * (0.7 + 0.3 * rel * rel * rel * rel)
            shaft = _ramp(12.0 - np.abs(xa - (hxc + 4.0) - 0.1 * (ys - top)), 2.0)
            shaft = shaft * _ramp(ys - top - 10.0, 4.0)
            bone[hc] += 0.15 * shaft

    # Spine: vertebral bodies with discs, pedicle rings and spinous processes, seen
    # through the mediastinum.
    spc = frame.crop(g.shift - 45, g.shift + 45, -1e3, 1e3)
    if spc is None:
        return
    gx_, ys = frame.grid(spc)
    xs = gx_ - 0.3 * g.shift
    level = _unit((ys - g.apex_y) * (1.0 / 330.0))
    hw = SPINE_HALF_WIDTH_MM[0] + (SPINE_HALF_WIDTH_MM[1] - SPINE_HALF_WIDTH_MM[0]) * level
    rel = xs / hw
    column = np.sqrt(np.sqrt(_unit(1.0 - rel * rel)))
    origin = g.apex_y - 60.0
    pv = (ys - origin) * (1.0 / VERTEBRA_HEIGHT_MM)
    whole = np.floor(pv)
    fv = pv - whole
    disc = _unit(np.minimum(fv, 1.0 - fv) * (1.0 / 0.1))
    out = SPINE_DENSITY * column * (0.45 + 0.55 * disc)
    cy_v = (whole + 0.5) * VERTEBRA_HEIGHT_MM + origin
    px = (np.abs(xs) - 0.72 * hw) * (1.0 / 4.0)
    py = (ys - cy_v + 3.0) * (1.0 / 6.0)
    ped = np.sqrt(px * px + py * py)
    out += 0.025 * _unit(1.0 - np.abs(ped - 0.85) * (1.0 / 0.35))
    sx, sy = xs * (1.0 / 3.5), (ys - cy_v - 6.0) * (1.0 / 7.0)
    out += 0.02 * _ramp(1.0 - np.sqrt(sx * sx + sy * sy), 0.3)
    bone[spc] += out


def _lateral_borders(g: _Geometry, x: np.ndarray, y: np.ndarray) -> dict:
    """Analytic sagittal lung field: anterior/posterior walls, apex, two diaphragm domes."""
    depth = LATERAL_DEPTH_RATIO * (g.width["right"] + g.width["left"])
    apex = g.apex_y
    height = g.cp_y["right"] - apex
    c = _unit((apex + 100.0 - y) * (1.0 / 100.0))
    ant = -0.46 * depth + 48.0 * c * np.sqrt(c)  # the thoracic inlet slopes: anterior is lower
    pm = (y - (apex + 0.45 * height)) * (1.0 / (0.9 * height))
    post = 0.50 * depth - 16.0 * pm * pm  # convex back (kyphosis)
    tq = (x - 0.10 * depth) * (1.0 / (0.5 * depth))
    top = apex + 75.0 * tq * tq
    x_peak = -0.12 * depth
    domes = {}
    for side in ("right", "left"):
        pk = g.dome_peak_y[side] + 4.0
        y_ant = pk + 22.0
        y_post = g.cp_y[side] + 32.0  # the posterior sulcus is the lowest point of the lung
        ta = _unit((x_peak - x) * (1.0 / (x_peak + 0.46 * depth)))
        tp = np.maximum((x - x_peak) * (1.0 / (0.5 * depth - x_peak)), 0.0)
        domes[side] = pk + (y_ant - pk) * ta * ta + (y_post - pk) * tp * tp * np.sqrt(tp)
    return {"depth": depth, "ant": ant, "post": post, "top": top, "domes": domes, "x_peak": x_peak,
            "pk": {side: g.dome_peak_y[side] + 4.0 for side in ("right", "left")}}  # fmt: skip


def _lateral_dome_at(g: _Geometry, side: str, xv: float) -> float:
    """Scalar hemidiaphragm height (mm) on a lateral film at AP position ``xv``."""
    b = _lateral_borders(g, np.array([xv], dtype=np.float32), np.array([0.0], dtype=np.float32))
    return float(b["domes"][side][0])


def _draw_lateral(frame: _Frame, g: _Geometry, rng: np.random.Generator) -> _Canvas:
    """Normal left-lateral anatomy (anterior to the image left) as attenuation layers."""
    x, y = frame.x, frame.y
    edge = max(frame.spacing, 0.5)
    shape = frame.shape
    b = _lateral_borders(g, x, y)
    depth_ap, ant, post, top = b["depth"], b["ant"], b["post"], b["top"]
    domes = b["domes"]
    apex = g.apex_y
    dome_lo = np.maximum(domes["right"], domes["left"])

    # Heart: anterior and inferior, its lower third sunk into the left hemidiaphragm and
    # its front against the lower sternum, so only the upper/posterior outline shows
    # against lung. Its antero-posterior size follows the patient's cardiothoracic ratio.
    scale = g.ctr / 0.43
    ha = 0.29 * depth_ap * scale
    hb = 0.20 * depth_ap * (0.6 + 0.4 * scale)
    phi = math.radians(-38.0)
    hcx = -0.46 * depth_ap + 0.72 * ha + 4.0
    hcy = _lateral_dome_at(g, "left", hcx) - 0.35 * hb
    rho = _ellipse_rho(x, y, hcx, hcy, ha, hb, phi)
    heart_soft = _ramp((1.0 - rho) * hb, edge)
    heart_mask = (heart_soft * _ramp(domes["right"] - y, edge)) > 0.5

    # Body: chest wall in front, back muscles behind, neck above; shoulders and upper arms
    # overlap the upper chest, which is why the apices are so bright on a lateral film.
    bz = (y - (apex + 200.0)) * (1.0 / 45.0)
    skin_a = ant - 24.0 - (30.0 * g.breast) * np.exp(-bz * bz)
    skin_p = post + 62.0
    neck = _unit((apex - 20.0 - y) * (1.0 / 70.0))
    skin_a = skin_a + 55.0 * neck
    skin_p = skin_p - 30.0 * neck
    centre = 0.5 * (skin_a + skin_p)
    half = 0.5 * (skin_p - skin_a)
    rel = (x - centre) / half
    body = np.sqrt(np.sqrt(_unit(1.0 - rel * rel))) * _ramp(half - np.abs(x - centre), edge)
    sh = _unit((apex + 80.0 - y) * (1.0 / 110.0))
    tissue = g.tissue * body * (1.0 + 0.35 * sh * sh)
    tissue += HEART_DENSITY * heart_soft

    # The two lungs overlap: each contributes half the air above its own hemidiaphragm.
    # Walls are curved surfaces seen edge-on: soft, not knife-sharp, except the domes.
    inside = _ramp(post - x, 6.0) * _ramp(x - ant, 3.0) * _ramp(y - top, 14.0)
    span = np.maximum(post - ant, 1.0)
    u = _unit((x - ant) / span)
    depth = np.sqrt(np.sqrt(_unit(np.sin(np.pi * _unit(u * 0.9 + 0.05)))))
    per_side = 0.5 * (_ramp(domes["right"] - y, edge) + _ramp(domes["left"] - y, edge))
    soft_raw = inside * _ramp(dome_lo - y, edge)
    air = (1.15 * LUNG_AIR) * inside * per_side * depth * (1.0 - 0.92 * heart_soft)
    air *= 0.8 + 0.2 * _unit((y - apex) * (1.0 / 120.0))
    v = _unit((y - top) / np.maximum(dome_lo - top, 1.0))
    soft = soft_raw * (1.0 - heart_soft)
    raw = soft_raw > 0.5
    wall = (~raw) & (y < domes["right"] - 4.0)

    # Trachea: from the neck down and slightly back to the carina; hilum below it.
    carina = (0.02 * depth_ap, apex + 100.0)
    d = _segment_distance(x, y, (-0.12 * depth_ap, apex - 150.0), carina) * (1.0 / 9.0)
    air += 0.13 * np.sqrt(_unit(1.0 - d * d))
    hilum = (0.0, apex + 122.0)
    hx, hy = (x - hilum[0]) * (1.0 / 22.0), (y - hilum[1]) * (1.0 / 28.0)
    tissue += 0.10 * np.exp(-(hx * hx + hy * hy))

    # Bones: sternum, thoracic spine (block-like bodies), scapulae, posterior ribs.
    bone = np.zeros(shape, dtype=np.float32)
    st = _ramp(6.0 - np.abs(x - (ant - 9.0)), edge) * _ramp(y - (apex + 20.0), 4.0)
    st *= _ramp(b["pk"]["right"] + 15.0 - y, 4.0)
    bone += 0.10 * st
    x_sp = post - 44.0 + 0.05 * (y - apex)
    vh = VERTEBRA_HEIGHT_MM * 0.95
    pv = (y - (apex - 60.0)) * (1.0 / vh)
    fv = pv - np.floor(pv)
    gap = np.minimum(fv, 1.0 - fv) * vh - 2.5
    xb = np.abs(x - x_sp)
    vert = _ramp(17.0 - xb, 2.0) * _ramp(gap, 2.0)
    rim = _unit(1.0 - np.minimum(17.0 - xb, gap) * (1.0 / 3.0))
    bone += (0.05 + 0.05 * rim) * vert
    post_el = _ramp(x - (x_sp + 20.0), 3.0) * _ramp(x_sp + 62.0 - x, 8.0)
    cf = np.cos((2.0 * np.pi) * fv)
    bone += 0.04 * post_el * (0.6 + 0.4 * cf * cf)
    scap = _ramp(x - (post - 36.0), 6.0) * _ramp(post + 18.0 - x, 10.0)
    scap *= _ramp(y - (apex - 20.0), 6.0) * _ramp(apex + 140.0 - y, 16.0)
    bone += 0.05 * scap
    pitch = g.rib_spacing * 1.2
    ribs_phase = (y + 0.5 * (post - x) - apex) * (1.0 / pitch)
    rf = np.abs(ribs_phase - np.round(ribs_phase)) * pitch
    bone += (0.3 * RIB_DENSITY) * _ramp(4.0 - rf, edge) * _unit(x * (1.0 / 60.0)) * inside
    hh = _length(x + 0.10 * depth_ap, y - (apex - 35.0))
    bone += 0.08 * _ramp(28.0 - hh, 3.0)

    # Lung markings from the hilum in every direction but into the heart.
    n = 11
    angles = np.linspace(-math.pi * 0.95, math.pi * 0.55, n) + rng.normal(0.0, 0.12, n)
    tree = _vessel_tree(rng, hilum, angles, 28.0)
    vessels, bronchi = _draw_vessel_layers(frame, [tree])
    texture = 0.6 * _smooth_noise(rng, shape, max(1.6 / frame.spacing, 0.6))
    texture += 0.4 * _smooth_noise(rng, shape, 5.0 / frame.spacing)

    if g.bubble < 0.6:  # stomach bubble under the left dome, anteriorly
        gx = -0.22 * depth_ap
        gy = _lateral_dome_at(g, "left", gx) + 22.0
        r = _length((x - gx) * (1.0 / 26.0), (y - gy) * (1.0 / 11.0))
        air += 0.08 * _ramp((1.0 - r) * 11.0, 3.0)

    cp = (0.5 * depth_ap - 4.0, g.cp_y["left"] + 32.0)  # the posterior costophrenic sulcus
    fields = [_LungField(name="both", soft=soft, mask=soft > 0.5, raw=raw, u=u, v=v, hilum=hilum,
                         cp=cp, wall=wall, sign=1.0, apex_y=apex)]  # fmt: skip
    r = _length(x - (cp[0] - 20.0), y - (cp[1] - 18.0))
    anatomy = {"lungs": fields[0].mask, "heart": heart_mask, "costophrenic_posterior": (r < 18.0) & raw}
    return _Canvas(
        frame=frame, geometry=g, tissue=tissue, bone=bone, air=air, vessels=vessels,
        bronchi=bronchi, texture=texture, extra=np.zeros(shape, dtype=np.float32),
        fields=fields, heart=heart_mask, lung_soft=_unit(soft), anatomy=anatomy,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Findings: each modifies the canvas layers and returns its ground-truth mask
# --------------------------------------------------------------------------------------


def _plan_findings(
    rng_for: Callable[[str], np.random.Generator], findings: set[str], view: str
) -> _FindingPlan:
    """Draw the finding parameters that alter normal anatomy (volume loss)."""
    plan = _FindingPlan(cardiomegaly="Cardiomegaly" in findings)
    if "Atelectasis" in findings:
        u = [float(v) for v in rng_for("Atelectasis").random(4)]
        plan.atelectasis_side = "right" if u[0] < 0.55 else "left"
        plan.atelectasis_kind = "plate" if u[1] < 0.5 else "wedge"
        # Volume loss: the hemidiaphragm rises, and with lobar collapse the mediastinum
        # shifts towards the collapsed side.
        wedge = plan.atelectasis_kind == "wedge"
        plan.raised_dome[plan.atelectasis_side] = (14.0 + 14.0 * u[2]) if wedge else (8.0 + 8.0 * u[2])
        if view != "LATERAL" and wedge:
            toward = -1.0 if plan.atelectasis_side == "right" else 1.0
            plan.mediastinal_shift = toward * (3.0 + 6.0 * u[3])
    return plan


def _pick_center(
    rng: np.random.Generator, canvas: _Canvas, lung: _LungField, clearance_mm: float
) -> tuple[float, float, float]:
    """A random point inside the lung at least ``clearance_mm`` from its edge.

    Returns (x_mm, y_mm, clearance available there in mm).
    """
    inside_mm = ndimage.distance_transform_edt(lung.mask) * canvas.frame.spacing
    ok = (inside_mm >= clearance_mm) & (lung.v > 0.05)
    if not ok.any():
        ok = inside_mm >= 0.9 * float(inside_mm.max())
    idx = np.flatnonzero(ok)
    k = int(idx[rng.integers(idx.size)])
    px, py = canvas.frame.point(k)
    return px, py, float(inside_mm.flat[k])


def _finding_nodule(canvas: _Canvas, rng: np.random.Generator, *, mass: bool) -> np.ndarray:
    """Round (nodule) or lobulated (mass) solid opacity inside a lung."""
    lung = canvas.fields[int(rng.integers(len(canvas.fields)))]
    lo, hi = MASS_DIAMETER_MM if mass else NODULE_DIAMETER_MM
    u = [float(v) for v in rng.random(9)]
    diameter = lo + (hi - lo) * (u[0] ** 1.4 if mass else u[0])
    radius = diameter / 2.0
    lobes = 0.10 if mass else 0.03
    cx, cy, available = _pick_center(rng, canvas, lung, radius * (1.0 + 2 * lobes) + 2.0)
    if available < radius * (1.0 + 2 * lobes) + 2.0:
        # Small lungs: shrink to fit, but stay on the correct side of 3 cm.
        floor = lo / 2.0 * 1.02 if mass else lo / 2.0
        radius = max(min(radius, (available - 2.0) / (1.0 + 2 * lobes)), floor)
    frame = canvas.frame
    reach = radius * (1.0 + 3 * lobes) + 4.0
    crop = frame.crop(cx - reach, cx + reach, cy - reach, cy + reach)
    mask = np.zeros(frame.shape, dtype=bool)
    if crop is None:
        return mask
    gx_, gy_ = frame.grid(crop)
    dx, dy = gx_ - cx, gy_ - cy
    r = _length(dx, dy)
    theta = np.arctan2(dy, dx)
    wobble = 1.0
    for i, k in enumerate((2, 3, 5)):
        # Lobulation only adds area on average, so the equivalent diameter stays >= 2r.
        wobble = wobble + (lobes * (0.3 + 0.7 * u[1 + i])) * np.cos(k * theta + 2.0 * np.pi * u[4 + i])
    rr = radius * wobble
    rn = r / rr
    edge = max(frame.spacing * 0.6, 0.5)
    solid = _ramp((1.0 - rn) * rr, edge)
    profile = np.sqrt(_unit(1.0 - rn * rn)) * 0.6 + 0.4 * solid
    # A sphere replaces lung air: denser when larger, but visible even when small.
    contrast = (0.16 if mass else 0.19) + 0.10 * u[7]
    contrast *= 1.0 + (0.3 if mass else 0.2) * min(diameter / 40.0, 1.5)
    canvas.extra[crop] += contrast * profile * solid
    canvas.vessels[crop] *= 1.0 - 0.5 * solid
    mask[crop] = rn <= 1.0
    return mask


def _finding_effusion(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Basal fluid with a meniscus rising laterally; it blunts the costophrenic angle."""
    u = [float(v) for v in rng.random(8)]
    names = [lung.name for lung in canvas.fields]
    if len(names) == 2:
        chosen = names if u[0] < 0.35 else [names[0] if u[1] < 0.55 else names[1]]
    else:
        chosen = names
    y = canvas.frame.y
    total = np.zeros(canvas.frame.shape, dtype=bool)
    for i, name in enumerate(chosen):
        lung = canvas.field(name)
        # Height of the fluid at the lateral chest wall above the costophrenic angle: 18 mm
        # (just a blunted angle) to ~12 cm (a large effusion). Medially it stands at about
        # half that, so small effusions stay below the dome and large ones cover it; the
        # surface is concave upwards (the meniscus).
        h_lat = 18.0 + 100.0 * u[2 + i]
        medial_fraction = 0.40 + 0.15 * u[4 + i]
        uu = lung.u * lung.u
        level = lung.cp[1] - h_lat * (medial_fraction + (1.0 - medial_fraction) * uu)
        ramp_mm = 3.0 + 6.0 * u[6]
        region = _unit((y - level) * (1.0 / ramp_mm)) * lung.raw
        # Fluid replaces air (homogeneous), hides vessels and the diaphragm outline.
        canvas.air *= 1.0 - 0.95 * region
        canvas.vessels *= 1.0 - region
        canvas.texture *= 1.0 - region
        canvas.extra += 0.04 * region
        total |= (region > 0.5) & lung.raw
    return total


def _finding_pneumothorax(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Apical/lateral rim of air without lung markings, bounded by a thin pleural line."""
    lung = canvas.fields[int(rng.integers(len(canvas.fields)))]
    u = [float(v) for v in rng.random(4)]
    sp = canvas.frame.spacing
    wall_dist = (ndimage.distance_transform_edt(~lung.wall) * sp).astype(np.float32)
    gap = 7.0 + 25.0 * u[0] ** 1.3  # apical gap, mm (small ones are the common, subtle kind)
    extent = 60.0 + 190.0 * u[1]  # how far down the lateral wall the rim reaches
    y = canvas.frame.y
    gap_y = gap * np.sqrt(_unit(1.0 - (y - lung.apex_y) * (1.0 / extent)))
    raw = lung.raw
    rim = raw & (wall_dist < gap_y)
    if not rim.any():  # coarse pixels: the gap is narrower than a pixel, keep the outer row
        rim = raw & (wall_dist <= 1.01 * sp) & (gap_y > 0.0)
    rim_soft = _unit((gap_y - wall_dist) * (1.0 / max(sp, 0.5)) + 0.5) * raw
    # Pure air in the rim: a little darker than aerated lung, with no vessels or texture
    # (ribs stay). Aim at the typical lung attenuation minus a margin.
    base = canvas.tissue - canvas.air
    lung_level = float(np.median(base[lung.mask])) if lung.mask.any() else 0.4
    target_air = canvas.tissue - (lung_level - 0.025 * u[2])
    canvas.air += rim_soft * np.maximum(target_air - canvas.air, 0.02)
    canvas.vessels *= 1.0 - rim_soft
    canvas.texture *= 1.0 - rim_soft
    # The retracted lung edge: a thin bright visceral pleural line.
    line_w = max(0.5 * sp, 0.5)
    dl = (wall_dist - gap_y) * (1.0 / line_w)
    line = np.exp(-dl * dl) * (gap_y > 1.0) * raw
    canvas.extra += (0.06 + 0.04 * u[3]) * line
    canvas.air *= 1.0 - 0.06 * (raw & ~rim)  # the collapsed lung is a little denser
    return rim


def _lobe_region(lung: _LungField, zone: str) -> np.ndarray:
    """Soft region of a lobe-like zone, sharp on its fissure side."""
    u, v = lung.u, lung.v
    if lung.name == "both":  # lateral film: u runs anterior -> posterior
        if zone == "upper":
            r = _ramp(0.42 - v, 0.04)
        elif zone == "middle":
            r = _ramp(0.55 - u, 0.06) * _ramp(v - 0.40, 0.03) * _ramp(0.92 - v, 0.1)
        else:
            r = _ramp(u - 0.40, 0.03) * _ramp(v - 0.45, 0.1)
    elif zone == "upper":
        r = _ramp(0.42 - v, 0.02)  # the fissure gives a sharp lower margin
    elif zone == "middle":
        r = _ramp(v - 0.40, 0.02) * _ramp(0.80 - v, 0.12) * _ramp(0.75 - u, 0.2)
    else:
        r = _ramp(v - 0.52, 0.12)
    return r * lung.soft


def _finding_consolidation(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Dense patchy lobar opacity with air bronchograms."""
    lung = canvas.fields[int(rng.integers(len(canvas.fields)))]
    zone = ("upper", "middle", "lower")[int(rng.choice(3, p=[0.3, 0.25, 0.45]))]
    u = [float(v) for v in rng.random(3)]
    region = _lobe_region(lung, zone)
    sp = canvas.frame.spacing
    patch = 0.7 * _smooth_noise(rng, region.shape, 9.0 / sp)
    patch = patch + 0.3 * _smooth_noise(rng, region.shape, 3.0 / sp)
    inside = region > 0.5
    coverage = 0.6 + 0.35 * u[0]
    bias = float(np.quantile(patch[inside], 1.0 - coverage)) if inside.any() else 0.0
    f = _unit((patch - bias) * 2.0 + 0.5) * region
    f = ndimage.gaussian_filter(f, 2.5 / sp, truncate=2.5)
    density = 0.6 + 0.35 * u[1]
    canvas.air *= 1.0 - density * f
    canvas.vessels *= 1.0 - f
    canvas.texture *= 1.0 - 0.6 * f
    if u[2] < 0.75:  # air bronchograms: aerated bronchi outlined by the dense alveoli
        canvas.extra -= 0.06 * np.minimum(canvas.bronchi, 1.0) * _unit((f - 0.5) * 2.5)
    return (f > 0.45) & lung.mask


def _finding_edema(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Bilateral perihilar bat-wing haze, blurred vessels and Kerley-B lines."""
    u = [float(v) for v in rng.random(5)]
    x, y = canvas.frame.x, canvas.frame.y
    sp = canvas.frame.spacing
    shape = canvas.frame.shape
    patch = _smooth_noise(rng, shape, 8.0 / sp)
    severity = 0.4 + 0.6 * u[0]
    total = np.zeros(shape, dtype=bool)
    haze_all = np.zeros(shape, dtype=np.float32)
    reach_x, reach_y = 70.0 + 30.0 * u[1], 85.0 + 35.0 * u[2]
    for lung in canvas.fields:
        hx, hy = lung.hilum
        dx, dy = (x - hx) * (1.0 / reach_x), (y - hy) * (1.0 / reach_y)
        haze = _unit(np.exp(-1.6 * (dx * dx + dy * dy)) * (1.0 + 0.25 * patch)) * lung.soft * severity
        haze_all += haze
        total |= (haze > 0.30) & lung.mask
    canvas.air *= 1.0 - 0.55 * haze_all
    # Interstitial fluid blurs the vessel outlines.
    blurred = ndimage.gaussian_filter(canvas.vessels, 2.5 / sp)
    canvas.vessels = (1.0 - 0.7 * severity) * canvas.vessels + (0.9 * severity) * blurred
    canvas.texture *= 1.0 + 0.6 * severity
    if u[3] < 0.7:  # Kerley B: short horizontal lines reaching the lateral pleura at the bases
        pitch = 7.0 + 4.0 * u[4]
        phase = y * (1.0 / pitch)
        dl = (phase - np.round(phase)) * (pitch / 0.9)
        lines = np.exp(-dl * dl)
        for lung in canvas.fields:
            zone = _unit((lung.u - 0.80) * (1.0 / 0.08)) * _unit((lung.v - 0.55) * 10.0)
            canvas.extra += 0.05 * lines * zone * lung.soft
    return total


def _finding_atelectasis(canvas: _Canvas, rng: np.random.Generator, plan: _FindingPlan) -> np.ndarray:
    """Plate-like band or lobar wedge of collapsed lung (volume loss is in the anatomy)."""
    lung = canvas.field(plan.atelectasis_side) if len(canvas.fields) > 1 else canvas.fields[0]
    x, y = canvas.frame.x, canvas.frame.y
    sp = canvas.frame.spacing
    edge = max(sp * 0.6, 0.5)
    u = [float(v) for v in rng.random(6)]
    if plan.atelectasis_kind == "plate":
        # Plate (discoid) atelectasis: a 4-10 mm band in the lower zone, near horizontal.
        cand = lung.mask & (lung.v > 0.55) & (lung.v < 0.88) & (lung.u > 0.2) & (lung.u < 0.8)
        if not cand.any():
            cand = lung.mask
        idx = np.flatnonzero(cand)
        k = int(idx[rng.integers(idx.size)])
        cx, cy = canvas.frame.point(k)
        length = 40.0 + 45.0 * u[0]
        thick = 2.0 + 3.0 * u[1]
        ang = math.radians(-18.0 + 36.0 * u[2])
        half = (0.5 * length * math.cos(ang), 0.5 * length * math.sin(ang))
        d = _segment_distance(x, y, (cx - half[0], cy - half[1]), (cx + half[0], cy + half[1]))
        f = _ramp(thick - d, edge) * lung.soft
        canvas.air *= 1.0 - (0.55 + 0.3 * u[3]) * f
        canvas.extra += 0.02 * f
        canvas.vessels *= 1.0 - f
        return (f > 0.5) & lung.mask
    # Lobar collapse: a dense wedge from the hilum towards the pleura.
    hx, hy = lung.hilum
    if lung.name == "both":  # middle lobe on a lateral: a wedge pointing antero-inferiorly
        centre, spread = math.radians(125.0 + 25.0 * u[0]), math.radians(14.0 + 8.0 * u[1])
    else:
        base = (-70.0 if u[3] < 0.4 else 72.0) + (-12.0 + 24.0 * u[0])  # upper or lower lobe
        centre = math.radians(base if lung.sign > 0 else 180.0 - base)
        spread = math.radians(14.0 + 10.0 * u[1])
    dx, dy = x - hx, y - hy
    r = _length(dx, dy)
    dtheta = np.abs(np.angle(np.exp(1j * (np.arctan2(dy, dx) - centre))))
    reach = 60.0 + 70.0 * u[2]
    wedge = _ramp((spread - dtheta) * r, edge * 2.0) * _ramp(reach - r, 10.0) * _ramp(r - 6.0, 4.0)
    # On a lateral film the collapsed middle lobe projects over the heart: keep that part.
    inside = lung.raw if lung.name == "both" else lung.soft
    wedge = _blur(wedge.astype(np.float32), 1.2 / sp) * inside
    canvas.air *= 1.0 - 0.85 * wedge
    canvas.vessels *= 1.0 - wedge
    canvas.extra += 0.05 * wedge
    return (wedge > 0.5) & (lung.raw if lung.name == "both" else lung.mask)


def _detector_mask(frame: _Frame, canvas_mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Canvas finding mask -> detector mask without crumbs, never empty when drawn.

    On tiny images a small finding can shrink below the crumb size or fall between the
    sampled pixels; it then keeps at least the pixel nearest its centre, so every finding
    present has a mask and a box.
    """
    warped = frame.warp_mask(canvas_mask)
    cleaned = _clean_mask(warped, min_pixels)
    if cleaned.any() or not canvas_mask.any():
        return cleaned
    if warped.any():
        return warped
    rows, cols = np.nonzero(canvas_mask)
    px, py = frame.point(int(rows.mean().round()) * frame.n + int(cols.mean().round()))
    # Patient mm -> detector pixel (inverse of the placement used by the warp).
    col = (frame.cos * px - frame.sin * py + frame.tx) / frame.spacing + frame.size / 2.0 - 0.5
    row = (frame.sin * px + frame.cos * py + frame.ty) / frame.spacing + frame.size / 2.0 - 0.5
    out = np.zeros_like(warped)
    out[min(max(int(round(row)), 0), frame.size - 1), min(max(int(round(col)), 0), frame.size - 1)] = True
    return out


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
    """One [x, y, w, h] pixel box per 8-connected component, largest first."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        rows, cols = sl
        x, y = float(cols.start), float(rows.start)
        boxes.append((x, y, float(cols.stop) - x, float(rows.stop) - y))
    boxes.sort(key=lambda box: -box[2] * box[3])
    return boxes


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


_COARSE_CACHE: dict[tuple[int, float], tuple[np.ndarray, np.ndarray]] = {}


def _coarse_operators(size: int, sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Matrices for a large Gaussian blur done as downsample-blur-upsample (separable).

    ``up @ (down @ img @ down.T) @ up.T`` approximates a ``sigma_px`` Gaussian blur of
    ``img`` with a few small BLAS calls instead of a wide convolution.
    """
    key = (size, round(sigma_px, 1))
    ops = _COARSE_CACHE.get(key)
    if ops is None:
        m = max(size // 8, 2)
        centres = (np.arange(m) + 0.5) * (size / m) - 0.5
        pix = np.arange(size)
        blur = np.exp(-0.5 * ((pix[None, :] - centres[:, None]) / max(key[1], 1.0)) ** 2)
        down = (blur / blur.sum(axis=1, keepdims=True)).astype(np.float32)  # (m, size)
        # Linear interpolation back to full size, clamped at the borders.
        pos = np.clip((pix + 0.5) * (m / size) - 0.5, 0, m - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, m - 1)
        frac = pos - lo
        up = np.zeros((size, m), dtype=np.float32)
        np.add.at(up, (pix, lo), 1.0 - frac)
        np.add.at(up, (pix, hi), frac)
        ops = (down, up)
        _COARSE_CACHE[key] = ops
    return ops


def _expose(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Attenuation -> blur -> quantum noise -> DR processing -> windowed display in [0, 1]."""
    g = canvas.geometry
    sp = canvas.frame.spacing
    lungs = canvas.lung_soft
    attenuation = canvas.tissue + canvas.bone - canvas.air + canvas.extra
    attenuation += (VESSEL_DENSITY * canvas.vessels + 0.012 * canvas.texture) * lungs
    # Project the patient onto the detector (rotation, shift), then detector blur.
    attenuation = canvas.frame.warp(attenuation)
    attenuation = _blur(attenuation, max(g.blur_mm / sp * 0.5, 0.25))
    # Poisson statistics: counts ~ N0 exp(-kappa A), so the log-signal noise grows where
    # fewer photons arrive (bone, abdomen), as on a real detector. Coarser pixels collect
    # more photons each.
    counts = g.counts * (sp / REFERENCE_SPACING_MM) ** 2
    sigma = np.exp((0.5 * ATTENUATION_KAPPA) * np.maximum(attenuation, 0.0)) * (
        1.0 / (ATTENUATION_KAPPA * math.sqrt(counts))
    )
    # White noise from a per-process bank (random window and flips): drawing 65k normals
    # per image costs more than the rest of the exposure.
    noisy = attenuation + sigma * _smooth_noise(rng, attenuation.shape, 0.0)
    noisy = _blur(noisy, 0.4)
    # Digital radiography processing: unsharp masking at a coarse scale equalises the lung
    # fields against the mediastinum (as small matrix products, for speed).
    down, up = _coarse_operators(noisy.shape[0], 18.0 / sp)
    coarse = up @ (down @ noisy @ down.T) @ up.T
    processed = noisy + g.edge_enhance * (noisy - coarse)
    display = _unit((processed - g.window_lo) * (1.0 / (g.window_hi - g.window_lo)))
    return (display**g.gamma).astype(np.float32)


def render_case(
    rng: np.random.Generator,
    *,
    size: int = 256,
    view: str = "PA",
    findings: Sequence[str] = (),
    patient: PhantomPatient | None = None,
) -> PhantomCase:
    """Draw one phantom radiograph with exactly the requested findings.

    The random stream is split up front (patient, pose, each finding, noise), so the same
    generator state with and without a finding gives the same patient, pose and noise:
    the difference between the two images is the finding (and its volume loss) itself.

    Args:
        rng: the random generator (consumed).
        size: image side in pixels (square).
        view: "PA", "AP" or "LATERAL" ("LL"/"RL" accepted).
        findings: names from ``PHANTOM_FINDINGS``, any order.
        patient: shared traits for follow-up images; drawn from ``rng`` when None.

    Returns:
        The image with its masks, boxes, pixel spacing and cardiothoracic ratio.

    Raises:
        ValueError: unknown view or finding, or a size below 32.

    Example:
        >>> case = render_case(np.random.default_rng(7), size=256, view="PA",
        ...                    findings=("Effusion", "Cardiomegaly"))
        >>> case.image.shape, case.findings, case.ctr > 0.5
        ((256, 256), ('Cardiomegaly', 'Effusion'), True)
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
    seeds = [int(s) for s in rng.integers(0, 2**63 - 1, size=5)]
    if patient is None:
        patient = sample_patient(np.random.default_rng(seeds[0]))
    finding_rngs: dict[str, np.random.Generator] = {}

    def rng_for(name: str) -> np.random.Generator:
        # One independent stream per finding: adding a finding never changes another's.
        if name not in finding_rngs:
            finding_rngs[name] = np.random.default_rng([seeds[2], PHANTOM_FINDINGS.index(name)])
        return finding_rngs[name]

    plan = _plan_findings(rng_for, wanted, view)
    geometry = _sample_geometry(np.random.default_rng(seeds[1]), patient, view, plan)
    spacing = geometry.fov / size
    frame = _Frame.make(size, spacing, geometry.angle, geometry.tx, geometry.ty)
    anatomy_rng = np.random.default_rng(seeds[3])
    draw = _draw_lateral if view == "LATERAL" else _draw_frontal
    canvas = draw(frame, geometry, anatomy_rng)

    masks: dict[str, np.ndarray] = {}
    min_px = max(3, int(round(6.0 / (spacing * spacing))))  # ~6 mm^2: smaller is a crumb
    for name in PHANTOM_FINDINGS:  # fixed order: later findings see earlier ones' changes
        if name not in wanted:
            continue
        r = rng_for(name)
        before = canvas.extra - canvas.air  # to locate the change if the mask comes out empty
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
        if not mask.any():
            # Drawn thinner than a pixel (tiny images): the mask is where it changed most.
            change = np.abs((canvas.extra - canvas.air) - before)
            mask = change >= 0.5 * float(change.max()) if change.max() > 0 else mask
        masks[name] = _detector_mask(frame, mask, min_px)

    image = _expose(canvas, np.random.default_rng(seeds[4]))
    return PhantomCase(
        image=image,
        findings=tuple(f for f in PHANTOM_FINDINGS if f in wanted),
        masks=masks,
        boxes={name: _mask_boxes(m) for name, m in masks.items()},
        view_position=view,
        pixel_spacing=(float(spacing), float(spacing)),
        ctr=float(geometry.ctr),
        patient_id=patient.patient_id,
        age=patient.age,
        sex=patient.sex,
        anatomy={name: frame.warp_mask(m) for name, m in canvas.anatomy.items()},
    )


# --------------------------------------------------------------------------------------
# Cohort writing: NIH-style folder, PNG or DICOM
# --------------------------------------------------------------------------------------

# SOP classes written (both with an X-ray modality, unlike Secondary Capture).
_DX_PRESENTATION_SOP = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image - For Presentation
_CR_SOP = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image
_DICOM_MAX_VALUE = 4095  # BitsStored 12
# Detector pixel spacing = patient-plane spacing * radiographic magnification.
_MAGNIFICATION = {"PA": 1.08, "AP": 1.15, "LATERAL": 1.12}
_PATIENT_ORIENTATION = {"PA": ["L", "F"], "AP": ["L", "F"], "LATERAL": ["P", "F"]}


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


def _image_name(patient: int, followup: int, image_format: str) -> str:
    return f"{patient:08d}_{followup:03d}.{'dcm' if image_format == 'dicom' else 'png'}"


def _patient_traits(seed: int, number: int) -> PhantomPatient:
    return sample_patient(np.random.default_rng([seed, number, 0x9A7]), number=number)


def _render_job(job: _Job, settings: _Settings) -> dict:
    """Render one image, write it (and its masks); return its label-file rows."""
    patient = _patient_traits(settings.seed, job.patient)
    rng = np.random.default_rng([settings.seed, job.patient, job.followup, 0x1A6E])
    case = render_case(rng, size=settings.size, view=job.view, findings=job.findings, patient=patient)
    name = _image_name(job.patient, job.followup, settings.image_format)
    path = Path(settings.images_dir) / name
    if settings.image_format == "dicom":
        _write_dicom(path, case, job, settings)
    else:
        _write_png(path, np.round(case.image * 255.0).astype(np.uint8))
    if settings.masks_dir is not None and case.masks:
        folder = Path(settings.masks_dir) / Path(name).stem
        folder.mkdir(parents=True, exist_ok=True)
        for finding, mask in case.masks.items():
            _write_png(folder / f"{finding}.png", mask.astype(np.uint8) * 255)
    return {
        "name": name,
        "labels": case.labels,
        "findings": case.findings,
        "followup": job.followup,
        "patient": job.patient,
        "age": min(patient.age + job.followup // 2, 99),
        "sex": patient.sex,
        "view": DICOM_VIEW_POSITION[job.view],
        "size": settings.size,
        "spacing": case.pixel_spacing[1],
        "boxes": [(f, box) for f in case.findings for box in case.boxes.get(f, [])],
    }


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    # Low zlib effort: PNG stays lossless, writing is ~3x faster than the default.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


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


def _plan_cohort(
    *,
    n_images: int,
    seed: int,
    views: Sequence[str],
    view_probabilities: dict[str, float] | None,
    transfer_syntaxes: Sequence[str],
    images_per_patient: int | range,
    first_patient_id: int,
) -> list[_Job]:
    """Decide every image up front (patients, follow-ups, views, findings, encodings)."""
    probs = view_probabilities or DEFAULT_VIEW_PROBABILITIES
    weights = np.array([float(probs.get(v, 0.0)) for v in views])
    if weights.sum() <= 0:
        weights = np.ones(len(views))
    weights = weights / weights.sum()
    followups = images_per_patient
    if isinstance(images_per_patient, int):
        followups = range(1, images_per_patient + 1)
    choices = [int(n) for n in followups if int(n) >= 1]
    if not choices:
        raise ValueError(f"images_per_patient gives no count >= 1: {images_per_patient!r}")
    rng = np.random.default_rng([seed, 0xC0407])
    jobs: list[_Job] = []
    patient = first_patient_id
    n_ts = len(transfer_syntaxes)
    while len(jobs) < n_images:
        count = choices[int(rng.integers(len(choices)))]
        for followup in range(count):
            if len(jobs) >= n_images:
                break
            i = len(jobs)
            view = views[int(rng.choice(len(views), p=weights))]
            findings = sample_findings(rng)
            jobs.append(
                _Job(
                    index=i,
                    patient=patient,
                    followup=followup,
                    view=view,
                    findings=findings,
                    # Encodings cycle fastest; each block of one pass through them flips
                    # photometric, window and rescale choices, so every syntax sees both
                    # photometric interpretations within 2 * len(transfer_syntaxes) images.
                    transfer_syntax=transfer_syntaxes[i % n_ts],
                    monochrome1=bool((i // n_ts) % 2),
                    intercept=-1024 if (i // n_ts) % 3 == 2 else 0,
                    windowed=(i // n_ts) % 4 in (1, 2),
                    modality="CR" if (i // n_ts) % 5 in (1, 3) else "DX",
                )
            )
        patient += 1
    return jobs


def _default_workers(n_images: int) -> int:
    if n_images < 64:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def _limit_blas_threads() -> None:
    """Worker initialiser: one BLAS thread per process (they would only fight)."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass


def generate_cohort(
    out_dir: str | os.PathLike,
    *,
    n_images: int,
    size: int = 256,
    seed: int = 0,
    image_format: str = "png",
    views: Sequence[str] = VIEWS,
    view_probabilities: dict[str, float] | None = None,
    transfer_syntaxes: Sequence[str] = ("explicit", "rle", "jpeg-ls", "jpeg2000"),
    images_per_patient: int | range = range(1, 4),
    first_patient_id: int = 1,
    progress: Callable[[int, int], None] | None = None,
    write_masks: bool = True,
    workers: int | None = None,
    verify_dicom: bool = True,
    image_subdir: str = "images",
) -> CohortInfo:
    """Write a phantom cohort laid out like NIH ChestX-ray14.

    Files: ``<image_subdir>/{patient:08d}_{followup:03d}.png|.dcm``, ``Data_Entry.csv`` and
    ``BBox_List.csv`` in the exact NIH layouts, and (``write_masks``)
    ``masks/<image stem>/<Finding>.png`` (uint8 0/255). The output depends only on the
    arguments (not on ``workers``): the same seed gives byte-identical files.

    DICOM files are DX (For Presentation) or CR objects, 16-bit with BitsStored 12,
    alternating MONOCHROME2/MONOCHROME1 (inverted values), RescaleIntercept 0 or -1024,
    sometimes a window, cycling through ``transfer_syntaxes`` (``explicit``, ``rle``,
    ``jpeg-ls``, ``jpeg2000``, all lossless); every file is read back and compared when
    ``verify_dicom``. ViewPosition is PA, AP or LL (lateral).

    Args:
        out_dir: folder to create/fill.
        n_images: number of images.
        size: image side in pixels.
        seed: random seed; everything (pixels, labels, UIDs) follows from it.
        image_format: "png" or "dicom".
        views: views to draw from.
        view_probabilities: relative frequency per view (default PA 0.6, AP 0.3, LATERAL 0.1).
        transfer_syntaxes: DICOM encodings to cycle through (keys of ``TRANSFER_SYNTAXES``).
        images_per_patient: follow-up count per patient: an int n means 1..n, or a range.
        first_patient_id: the first NIH-style patient number (use distinct ranges for
            cohorts that must not share patients).
        progress: called as ``progress(done, total)`` after each image.
        write_masks: also write per-finding masks.
        workers: processes (default: all CPUs up to 8 for 64+ images; 1 = in-process).
        verify_dicom: read each DICOM back and check the pixels are unchanged.
        image_subdir: folder for the images inside ``out_dir`` ("" for ``out_dir`` itself).

    Returns:
        What was written, with per-finding counts and the wall time.

    Raises:
        ValueError: bad format, view, transfer syntax or count.

    Example:
        >>> info = generate_cohort("phantoms", n_images=2000, size=256, seed=0)
        >>> info.data_entry_csv.name, info.finding_counts["No Finding"] > 0
        ('Data_Entry.csv', True)
    """
    started = time.perf_counter()
    if image_format not in ("png", "dicom"):
        raise ValueError(f"image_format must be 'png' or 'dicom', got {image_format!r}")
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    views = tuple("LATERAL" if v.upper() in ("LL", "RL", "LAT") else v.upper() for v in views)
    bad_views = [v for v in views if v not in VIEWS]
    if bad_views or not views:
        raise ValueError(f"unknown view(s) {bad_views}; expected some of {', '.join(VIEWS)}")
    bad_ts = [t for t in transfer_syntaxes if t not in TRANSFER_SYNTAXES]
    if bad_ts or not transfer_syntaxes:
        known = ", ".join(TRANSFER_SYNTAXES)
        raise ValueError(f"unknown transfer syntax(es) {bad_ts}; expected some of {known}")
    out = Path(out_dir)
    images_dir = out / image_subdir if image_subdir else out
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir = out / "masks" if write_masks else None
    if masks_dir is not None:
        masks_dir.mkdir(parents=True, exist_ok=True)
    jobs = _plan_cohort(
        n_images=n_images,
        seed=seed,
        views=views,
        view_probabilities=view_probabilities,
        transfer_syntaxes=tuple(transfer_syntaxes),
        images_per_patient=images_per_patient,
        first_patient_id=first_patient_id,
    )
    settings = _Settings(
        images_dir=str(images_dir),
        masks_dir=str(masks_dir) if masks_dir is not None else None,
        size=size,
        seed=seed,
        image_format=image_format,
        verify=verify_dicom,
    )
    n_workers = _default_workers(n_images) if workers is None else max(1, int(workers))
    rows: list[dict] = []
    if n_workers == 1 or len(jobs) <= 1:
        for job in jobs:
            rows.append(_render_job(job, settings))
            if progress is not None:
                progress(len(rows), len(jobs))
    else:
        # fork starts workers instantly and needs no __main__ guard; the workers only run
        # numpy/scipy/PIL/pydicom code.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(n_workers, mp_context=context, initializer=_limit_blas_threads) as pool:
            chunk = max(1, min(32, len(jobs) // (4 * n_workers)))
            for row in pool.map(_render_job, jobs, [settings] * len(jobs), chunksize=chunk):
                rows.append(row)
                if progress is not None:
                    progress(len(rows), len(jobs))

    data_entry = out / "Data_Entry.csv"
    bbox_list = out / "BBox_List.csv"
    _write_label_files(rows, data_entry, bbox_list)
    counts = {name: 0 for name in (*PHANTOM_FINDINGS, NO_FINDING)}
    for row in rows:
        for finding in row["findings"] or (NO_FINDING,):
            counts[finding] += 1
    return CohortInfo(
        out_dir=out,
        images_dir=images_dir,
        data_entry_csv=data_entry,
        bbox_csv=bbox_list,
        masks_dir=masks_dir,
        n_images=len(rows),
        n_patients=len({row["patient"] for row in rows}),
        finding_counts=counts,
        image_format=image_format,
        seconds=time.perf_counter() - started,
    )


def _write_label_files(rows: list[dict], data_entry: Path, bbox_list: Path) -> None:
    """NIH ``Data_Entry_2017`` and ``BBox_List_2017`` layouts, byte for byte."""
    with open(data_entry, "w", newline="", encoding="utf-8") as fh:
        # The header's bracketed pairs hold unquoted commas, exactly as NIH ships it: the
        # header has 11 comma-separated fields and so has every data row.
        fh.write(NIH_DATA_ENTRY_HEADER + "\n")
        writer = csv.writer(fh, lineterminator="\n")
        for r in rows:
            spacing = repr(round(r["spacing"], 6))
            writer.writerow([r["name"], r["labels"], r["followup"], r["patient"], r["age"], r["sex"],
                             r["view"], r["size"], r["size"], spacing, spacing])  # fmt: skip
    with open(bbox_list, "w", newline="", encoding="utf-8") as fh:
        fh.write(NIH_BBOX_HEADER + "\n")
        writer = csv.writer(fh, lineterminator="\n")
        for r in rows:
            for finding, (bx, by, bw, bh) in r["boxes"]:
                writer.writerow([r["name"], finding, repr(bx), repr(by), repr(bw), repr(bh)])


def write_study_folder(
    out_dir: str | os.PathLike,
    *,
    n_images: int,
    seed: int = 1,
    size: int = 256,
    views: Sequence[str] = VIEWS,
    transfer_syntaxes: Sequence[str] = ("explicit", "rle", "jpeg-ls", "jpeg2000"),
    first_patient_id: int = 90001,
    write_masks: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> CohortInfo:
    """Write a flat folder of DICOM studies (a held-out test set) with NIH label files.

    The ``.dcm`` files go straight into ``out_dir`` next to ``Data_Entry.csv`` and
    ``BBox_List.csv`` (which study discovery ignores), so ``cxrtool predict out_dir`` and
    ``cxrtool evaluate`` work on it directly. Patient numbers start at ``first_patient_id``
    (default 90001) so they never collide with a default training cohort. Masks, when
    asked for, go to ``out_dir/masks`` (PNG: keep them out of folders you predict on).

    Args:
        out_dir: folder to create/fill.
        n_images: number of studies.
        seed: random seed (use one different from the training cohort's).
        size: image side in pixels.
        views: views to draw from.
        transfer_syntaxes: DICOM encodings to cycle through.
        first_patient_id: first patient number.
        write_masks: also write masks.
        progress: called as ``progress(done, total)``.
        workers: processes (see :func:`generate_cohort`).

    Example:
        >>> info = write_study_folder("heldout", n_images=200, seed=1)
        >>> sorted(p.suffix for p in info.images_dir.iterdir())[0]
        '.csv'
    """
    return generate_cohort(
        out_dir,
        n_images=n_images,
        size=size,
        seed=seed,
        image_format="dicom",
        views=views,
        transfer_syntaxes=transfer_syntaxes,
        first_patient_id=first_patient_id,
        write_masks=write_masks,
        progress=progress,
        workers=workers,
        image_subdir="",
    )


def contact_sheet(
    cases: Sequence[PhantomCase],
    path: str | os.PathLike,
    *,
    columns: int = 4,
    outline_masks: bool = True,
) -> Path:
    """Save a grid of phantoms as one RGB PNG, finding masks outlined in colour.

    Args:
        cases: the phantoms (any sizes; each tile takes the largest).
        path: output PNG.
        columns: tiles per row.
        outline_masks: draw each finding's mask outline.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> cases = [render_case(rng, view=v) for v in ("PA", "AP", "LATERAL")]
        >>> contact_sheet(cases, "/tmp/sheet.png", columns=3).name
        'sheet.png'
    """
    from PIL import Image

    palette = {
        "Atelectasis": (255, 190, 0), "Cardiomegaly": (255, 80, 80), "Effusion": (70, 170, 255),
        "Mass": (255, 0, 255), "Nodule": (0, 255, 120), "Pneumothorax": (255, 255, 0),
        "Consolidation": (255, 120, 0), "Edema": (0, 230, 230),
    }  # fmt: skip
    tile = max(c.image.shape[0] for c in cases)
    rows = math.ceil(len(cases) / columns)
    sheet = np.zeros((rows * tile, columns * tile, 3), dtype=np.uint8)
    for i, case in enumerate(cases):
        grey = np.round(case.image * 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        if outline_masks:
            for finding, mask in case.masks.items():
                edge = mask & ~ndimage.binary_erosion(mask)
                rgb[edge] = palette.get(finding, (255, 0, 0))
        r, c = divmod(i, columns)
        h, w = grey.shape
        sheet[r * tile : r * tile + h, c * tile : c * tile + w] = rgb
    out = Path(path)
    Image.fromarray(sheet).save(out)
    return out
