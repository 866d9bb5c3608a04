"""Cohort writing: the NIH-style folder (PNG or DICOM images, ``Data_Entry.csv``,
``BBox_List.csv``, masks), held-out study folders and contact sheets."""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from cxrtool.data.phantom.constants import (
    DEFAULT_VIEW_PROBABILITIES,
    DICOM_VIEW_POSITION,
    NIH_BBOX_HEADER,
    NIH_DATA_ENTRY_HEADER,
    NO_FINDING,
    TRANSFER_SYNTAXES,
    VIEWS,
)
from cxrtool.data.phantom.dicom import _write_dicom
from cxrtool.data.phantom.records import CohortInfo, PhantomCase, PhantomPatient, _Job, _Settings
from cxrtool.data.phantom.rendering import render_case
from cxrtool.data.phantom.sampling import sample_findings, sample_patient
from cxrtool.registry import PHANTOM_FINDINGS

# --------------------------------------------------------------------------------------
# Cohort writing: NIH-style folder, PNG or DICOM
# --------------------------------------------------------------------------------------


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
