"""Rendering: the exposure (projection, blur, quantum noise, DR processing, windowing) and
:func:`render_case`, which draws one phantom radiograph with its ground truth."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cxrtool.data.phantom.anatomy import _Canvas, _draw_frontal, _draw_lateral
from cxrtool.data.phantom.constants import ATTENUATION_KAPPA, REFERENCE_SPACING_MM, VESSEL_DENSITY, VIEWS
from cxrtool.data.phantom.findings import (
    _detector_mask,
    _finding_atelectasis,
    _finding_consolidation,
    _finding_edema,
    _finding_effusion,
    _finding_nodule,
    _finding_pneumothorax,
    _mask_boxes,
    _plan_findings,
)
from cxrtool.data.phantom.frame import _blur, _Frame, _smooth_noise, _unit
from cxrtool.data.phantom.records import PhantomCase, PhantomPatient
from cxrtool.data.phantom.sampling import _sample_geometry, sample_patient
from cxrtool.registry import PHANTOM_FINDINGS

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
