"""Pictures of the evidence: overlays per finding and a contact sheet per folder."""

from __future__ import annotations

import html
import os
import urllib.parse
from pathlib import Path

import cv2
import numpy as np

from cxrtool.io.outputs import atomic_write
from cxrtool.io.records import iter_sidecars
from cxrtool.io.records.explanations import Explanation
from cxrtool.registry import CAM_METHOD_LABELS

CONTACT_SHEET = "cxrtool_explain.html"


def overlay(display: np.ndarray, cam: np.ndarray, caption: str, boxes: list[list[int]], scale: float, *,
            warning: str | None = None) -> np.ndarray:
    """The heatmap on the radiograph (RGB uint8), the regions' boxes and a caption on top;
    a ``warning`` (a map that cannot be trusted) on a red band at the bottom.

    Args:
        display: the radiograph as uint8 (h, w), already at picture size.
        cam: the map at the same size, in [0, 1] (a fraction of its peak).
        caption: e.g. "Effusion  p=0.87  positive  Grad-CAM".
        boxes: region boxes [x, y, w, h] in original pixels; ``scale`` maps them to ``display``.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    grey = np.repeat((display.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    picture = show_cam_on_image(grey, np.clip(cam, 0.0, 1.0), use_rgb=True, image_weight=0.6)
    thickness = max(1, round(max(picture.shape) / 400))
    for x, y, w, h in boxes:
        top_left = (round(x * scale), round(y * scale))
        bottom_right = (round((x + w) * scale) - 1, round((y + h) * scale) - 1)
        cv2.rectangle(picture, top_left, bottom_right, (255, 255, 255), thickness, cv2.LINE_AA)
    font_scale = max(0.4, max(picture.shape) / 1400)
    (_, text_h), baseline = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    band = text_h + baseline + 2 * thickness + 4
    picture[:band] = (picture[:band] * 0.35).astype(np.uint8)
    cv2.putText(picture, caption, (4, band - baseline - 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), 1, cv2.LINE_AA)
    if warning:
        (width, _), _ = cv2.getTextSize(warning, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        small = font_scale * min(1.0, (picture.shape[1] - 8) / max(width, 1))  # the whole reason fits the width
        picture[-band:] = (picture[-band:] * 0.3 + np.array([140, 0, 0]) * 0.7).astype(np.uint8)
        cv2.putText(picture, warning, (4, picture.shape[0] - baseline - 2), cv2.FONT_HERSHEY_SIMPLEX, small,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return picture


def write_png(path: Path, image: np.ndarray) -> Path:
    """Write a grey (uint8/uint16) or RGB image as PNG, atomically."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    # OpenCV's default PNG settings (fast deflate with run-length strategy) are the quickest
    # for smooth maps, sparse masks and overlays alike, and compress them well.
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path.name} as PNG")
    with atomic_write(path, "wb") as handle:
        handle.write(encoded.tobytes())
    return path


def relative_url(name: str) -> str:
    """A file name in the page's folder as a URL that can only be that file: relative
    (``./``) and percent-encoded, so a name like ``javascript:...`` or ``a#b?c`` is a name."""
    return "./" + urllib.parse.quote(name, safe="")


def contact_sheet(folder: Path) -> Path | None:
    """One static HTML page for a folder: every explained study's overlays and probabilities,
    a section per study and model.

    Built from the sidecars in the folder, so it always shows the folder's whole state,
    whichever runs explained which studies. Returns None when nothing there is explained.
    """
    studies = [(sidecar, result) for _, sidecar in iter_sidecars(folder) for result in sidecar.results
               if result.explanations is not None]
    if not studies:
        return None
    rows = []
    for sidecar, result in studies:
        explanations: Explanation = result.explanations  # type: ignore[assignment]  # (only explained results)
        probabilities = "".join(
            f"<li class='{'pos' if call.positive else 'neg'}'>{html.escape(name)} {call.probability:.3f}</li>"
            for name, call in sorted(result.findings.items(), key=lambda item: -item[1].probability)
        )
        pictures = []
        for name, entry in explanations.findings.items():
            overlay_file = entry.files.get("overlay")
            if overlay_file:
                link = html.escape(relative_url(overlay_file), quote=True)
                doubt = (f" <span class='doubt' title='{html.escape(entry.trust.get('reason', ''), quote=True)}'>"
                         "not on the chest</span>") if entry.outside_chest else ""
                pictures.append(f"<figure><a href='{link}'><img src='{link}' loading='lazy' alt='{html.escape(name)}'></a>"
                                f"<figcaption>{html.escape(name)}{doubt}</figcaption></figure>")
            else:
                pictures.append(f"<figure class='empty'><div>{html.escape(entry.note or 'no map')}</div>"
                                f"<figcaption>{html.escape(name)}</figcaption></figure>")
        if not pictures:
            pictures.append(f"<p class='none'>{html.escape(explanations.note or 'no finding to explain')}</p>")
        method = CAM_METHOD_LABELS.get(explanations.method, explanations.method)
        rows.append(
            f"<section><h2>{html.escape(sidecar.file)} <small>{html.escape(sidecar.view_position)} · "
            f"{html.escape(result.model.name)} ({html.escape(result.model.id)}) · {html.escape(method)} on "
            f"{html.escape(str(explanations.layer or ''))}</small></h2>"
            f"<ul class='p'>{probabilities}</ul><div class='maps'>{''.join(pictures)}</div></section>"
        )
    models = sorted({f"{result.model.name} ({result.model.id})" for _, result in studies})
    title = f"cxrtool explain: {folder.name}"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #111; color: #ddd; margin: 1.5em; }}
section {{ border-top: 1px solid #333; padding: .6em 0; }}
h2 {{ font-size: 1em; margin: .2em 0; }} small {{ color: #888; }}
ul.p {{ list-style: none; padding: 0; margin: .2em 0; display: flex; flex-wrap: wrap; gap: .2em 1em; font-size: .85em; }}
li.pos {{ color: #ffb347; font-weight: bold; }} li.neg {{ color: #888; }}
.maps {{ display: flex; flex-wrap: wrap; gap: .6em; }}
figure {{ margin: 0; }} img {{ width: 256px; display: block; }}
figure.empty div {{ width: 256px; height: 64px; display: flex; align-items: center; justify-content: center;
                   background: #222; color: #888; font-size: .8em; }}
figcaption {{ font-size: .8em; text-align: center; }} .doubt {{ color: #ff6b6b; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len({sidecar.file for sidecar, _ in studies})} studies explained by {html.escape(', '.join(models))}.
Positive calls in orange.</p>
{os.linesep.join(rows)}
</body></html>
"""
    path = folder / CONTACT_SHEET
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return path
