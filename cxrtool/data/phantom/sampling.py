"""Random draws before any pixel: an image's findings (the co-occurrence model), a patient's
traits, and an image's anatomy and acquisition parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cxrtool.data.phantom.constants import (
    AP_HEART_MAGNIFICATION,
    AP_TRUE_CARDIOMEGALY_CTR,
    AP_TRUE_NORMAL_CTR,
    APEX_Y_MM,
    CARDIOMEGALY_CTR,
    CP_ANGLE_Y_MM,
    DOME_RISE_MM,
    FIELD_OF_VIEW_MM,
    HILUM_X_FRACTION,
    HILUM_Y_FRACTION,
    LEFT_DOME_DROP_MM,
    MEDIASTINUM_HALF_WIDTH_MM,
    NORMAL_CTR,
    REFERENCE_COUNTS,
    RIB_FIRST_SPACING_MM,
    RIB_SPACING_GROWTH_MM,
    THORAX_HALF_WIDTH_MM,
)
from cxrtool.data.phantom.records import PhantomPatient
from cxrtool.registry import PHANTOM_FINDINGS

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
