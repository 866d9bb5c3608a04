"""Normal anatomy: the PA/AP and lateral canvases of attenuation layers (soft tissue, bone,
lung air, vessels, texture) that the findings then modify."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cxrtool.data.phantom.constants import (
    AORTIC_KNOB,
    APEX_X_FRACTION,
    APEX_Y_MM,
    CARINA_BELOW_APEX_MM,
    CHEST_WALL_MM,
    CLAVICLE_DENSITY,
    CLAVICLE_HALF_THICKNESS_MM,
    DOME_LATERAL_EXPONENT,
    DOME_PEAK_X_FRACTION,
    HEART_DENSITY,
    LATERAL_DEPTH_RATIO,
    LATERAL_WIDEST_FRACTION,
    LUNG_AIR,
    LUNG_BASE_FLARE_MM,
    MEDIAL_CURVE_FRACTION,
    N_ANTERIOR_RIBS,
    N_POSTERIOR_RIBS,
    NECK_HALF_WIDTH_MM,
    RIB_ARCH_MM,
    RIB_DENSITY,
    RIB_DROP_MM,
    RIB_HALF_THICKNESS_MM,
    SHOULDER_BULGE_MM,
    SPINE_DENSITY,
    SPINE_HALF_WIDTH_MM,
    THORAX_HALF_WIDTH_MM,
    TRACHEA_HALF_WIDTH_MM,
    VERTEBRA_HEIGHT_MM,
    VESSEL_SAMPLE_MM,
)
from cxrtool.data.phantom.frame import _blur, _Frame, _length, _ramp, _segment_distance, _smooth_noise, _unit
from cxrtool.data.phantom.sampling import _Geometry

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
