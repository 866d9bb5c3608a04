"""Findings: each modifies the canvas layers and returns its ground-truth mask; masks become
detector masks and boxes."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from cxrtool.data.phantom.anatomy import _Canvas, _LungField
from cxrtool.data.phantom.constants import MASS_DIAMETER_MM, NODULE_DIAMETER_MM
from cxrtool.data.phantom.frame import _blur, _Frame, _length, _ramp, _segment_distance, _smooth_noise, _unit
from cxrtool.data.phantom.sampling import _FindingPlan

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
