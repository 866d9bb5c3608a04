"""Where the regions to measure come from: a mask CSV, explain's CAM masks, masks beside
the studies (including DICOM SEG objects among them), or whole images.

A mask is a label image (PNG, NIfTI or anything SimpleITK reads) or a DICOM SEG; a region
is ``mask == label`` (for a SEG, the label is the segment number).
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cxrtool.io.seg import DicomSeg, SegError, is_seg, read_seg, sop_instance_uid

# Masks beside a study, by name: "chest.png" -> "chest.mask.png", "chest_mask.nii.gz", ...
MASK_MARKERS = (".mask", "_mask")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png", ".nii.gz", ".nii", ".nrrd", ".mha")  # a SEG pairs by its references


@dataclass(frozen=True)
class RegionJob:
    """One region to measure: ``mask == label`` in ``mask`` (None: the whole image)."""

    image: str
    mask: str | None = None
    label: int = 1
    finding: str = ""
    region: int | None = None
    model: str = ""  # for a CAM region: the id of the model whose map it is

    @property
    def key(self) -> str:
        return json.dumps([self.image, self.mask or "", self.label])


def jobs_from_csv(csv_path: str | os.PathLike) -> list[RegionJob]:
    """Jobs from a CSV with ``image`` and ``mask`` columns and an optional ``label``
    (PyRadiomics' batch CSV spells them Image, Mask, Label). Relative paths are taken
    from the CSV's folder. A DICOM SEG row without a label gives one job per segment.

    Raises:
        ValueError: no image or mask column, or a label that is not an integer.
    """
    path = Path(csv_path)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "image" not in columns or "mask" not in columns:
            raise ValueError(f"{path.name}: expected columns image,mask[,label], got {', '.join(reader.fieldnames or [])}")
        jobs = []
        for line, row in enumerate(reader, start=2):
            image = str(_resolve(path.parent, row[columns["image"]].strip()))
            mask = str(_resolve(path.parent, row[columns["mask"]].strip()))
            label_text = (row.get(columns.get("label", ""), "") or "").strip()
            if not label_text:
                jobs.extend(_default_jobs(image, mask))
                continue
            try:
                label = int(float(label_text))
            except ValueError:
                raise ValueError(f"{path.name} line {line}: label {label_text!r} is not an integer") from None
            jobs.append(RegionJob(image, mask, label, _segment_label(mask, label)))
    return jobs


def _resolve(folder: Path, name: str) -> Path:
    candidate = Path(name)
    return candidate if candidate.is_absolute() else folder / candidate


def _default_jobs(image: str, mask: str) -> list[RegionJob]:
    """Label 1 of an ordinary mask; every segment of a SEG (named by its label)."""
    seg = _seg_or_none(mask)
    if seg is None:
        return [RegionJob(image, mask)]  # not a SEG, or an unreadable one: its row says why
    return [RegionJob(image, mask, number, label) for number, label in sorted(seg.segments.items())]


def _segment_label(mask: str, label: int) -> str:
    seg = _seg_or_none(mask)
    return seg.segments.get(label, "") if seg is not None else ""


def _is_seg_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() not in PICTURE_SUFFIXES and is_seg(path)


def _seg_or_none(path: str | os.PathLike, *, pixels: bool = False) -> DicomSeg | None:
    """The SEG at ``path`` (see :func:`_cached_seg`); None for other files and unreadable SEGs."""
    if not _is_seg_file(path):
        return None
    try:
        return _cached_seg(str(path), os.stat(path).st_mtime_ns, pixels)
    except SegError:
        return None


@functools.lru_cache(maxsize=4)
def _cached_seg(path: str, mtime_ns: int, pixels: bool) -> DicomSeg:
    """A SEG read once per process (and again only when the file changes): a CSV names the
    same SEG on many rows, and each of its segments is measured on the same image."""
    return read_seg(path, pixels=pixels)


def jobs_from_studies(studies: Iterable[Path]) -> tuple[list[RegionJob], dict[str, int]]:
    """Jobs for studies given as inputs, with no mask CSV.

    * DICOM SEG objects among the inputs are masks, not studies: each segment is measured
      on each image it references that is among the inputs;
    * a mask beside a study, named like it (``chest.png`` -> ``chest.mask.png``,
      ``chest_mask.nii.gz``), is that study's mask (label 1), and not a study itself;
    * any other study is measured whole.

    Returns the jobs and counts by source ("seg", "beside", "whole", "unmatched_seg").
    """
    studies = list(studies)
    segs = [path for path in studies if _is_seg_file(path)]
    seg_set = set(segs)
    images = [path for path in studies if path not in seg_set]
    beside = _masks_beside(images)
    mask_files = set(beside.values())
    images = [path for path in images if path not in mask_files]
    by_uid: dict[str, Path] = {}
    for path in images if segs else []:
        if path.suffix.lower() not in PICTURE_SUFFIXES:
            uid = sop_instance_uid(path)
            if uid:
                by_uid[uid] = path
    jobs: list[RegionJob] = []
    counts = {"seg": 0, "beside": 0, "whole": 0, "unmatched_seg": 0}
    segmented: set[Path] = set()
    for seg_path in segs:
        try:
            seg = read_seg(seg_path, pixels=False)
        except SegError:
            counts["unmatched_seg"] += 1
            continue
        targets = [by_uid[uid] for uid in seg.sources if uid in by_uid]
        if not targets:
            counts["unmatched_seg"] += 1
        for image in targets:
            segmented.add(image)
            for number, label in sorted(seg.segments.items()):
                jobs.append(RegionJob(str(image), str(seg_path), number, label))
                counts["seg"] += 1
    for image in images:
        if image in beside:
            jobs.append(RegionJob(str(image), str(beside[image])))
            counts["beside"] += 1
        elif image not in segmented:
            jobs.append(RegionJob(str(image)))
            counts["whole"] += 1
    return jobs, counts


def _masks_beside(studies: list[Path]) -> dict[Path, Path]:
    """study -> its mask, for the masks (also listed as studies, or only on disk) named
    after a study in the same folder."""
    found: dict[Path, Path] = {}
    for study in studies:
        stem = study.name[: -len(study.suffix)] if study.suffix else study.name
        for marker in MASK_MARKERS:
            for suffix in MASK_SUFFIXES:
                candidate = study.with_name(stem + marker + suffix)
                if candidate != study and candidate.is_file():
                    found.setdefault(study, candidate)
    return found


class CamJobs(NamedTuple):
    """What :func:`jobs_from_cam` found: the jobs, the studies without (valid)
    explanations, and the count of regions left out for each reason."""

    jobs: list[RegionJob]
    unexplained: list[str]
    skipped: dict[str, int]


def jobs_from_cam(
    studies: Iterable[Path] = (),
    *,
    positive_only: bool = False,
    explanations: str | os.PathLike | None = None,
    model: str | None = None,
    include_off_chest: bool = False,
) -> CamJobs:
    """One job per region of every finding ``cxrtool explain`` mapped (its mask
    ``NAME.cxrtool.<model id>.<Finding>.mask.png`` holds region k as pixel value k); with
    ``positive_only``, only of the findings the model called positive; with ``model`` (a
    name or id), only that model's maps.

    The sidecars are beside the studies, or under ``explanations`` (explain's ``--out``
    tree): each sidecar there says where its study is. With both, only those studies.
    A study whose file changed since it was explained has no valid explanations.

    Regions that lie mostly off the chest, and those of a map whose peak or weight lies
    outside it (explain's ``trust``), describe film edges, not findings: they are left out,
    and counted by reason, unless ``include_off_chest``.

    Returns the jobs, the studies that had no (valid) explanations, and the regions left out.
    """
    from cxrtool.explain.chest import region_doubt
    from cxrtool.io.outputs import sidecar_path
    from cxrtool.io.records import iter_sidecars, read_sidecar

    studies = list(studies)  # (a generator, such as find_studies, is read twice below)
    wanted = {Path(study).absolute() for study in studies}
    found: list[tuple[Path, Path, object]] = []  # (study, sidecar folder, sidecar)
    if explanations is not None:
        for path, sidecar in iter_sidecars(Path(explanations), recursive=True):
            study = Path(os.path.normpath(sidecar.source_path(path.parent).absolute()))
            if not wanted or study in wanted:
                found.append((_as_given(study), path.parent, sidecar))
        seen = {study.absolute() for study, _, _ in found}
        unexplained = [str(study) for study in sorted(wanted - seen)]
    else:
        unexplained = []
        for study in studies:
            sidecar = read_sidecar(sidecar_path(study.parent, study.name))
            if sidecar is None:
                unexplained.append(str(study))
            else:
                found.append((study, study.parent, sidecar))
    jobs: list[RegionJob] = []
    skipped: dict[str, int] = {}
    for study, folder, sidecar in found:
        results = [r for r in sidecar.results if r.explanations and (model is None or model in (r.model.name, r.model.id))]
        if not results or not sidecar.fingerprint.same_content(study):
            unexplained.append(str(study))
            continue
        for result in results:
            for finding, entry in result.explanations.findings.items():  # type: ignore[union-attr]  # (explained only)
                if positive_only and not entry.positive:
                    continue
                mask = entry.files.get("mask")
                for region in entry.regions if mask else []:
                    doubt = None if include_off_chest else region_doubt(region, entry.trust)
                    if doubt is not None:
                        skipped[doubt] = skipped.get(doubt, 0) + 1
                        continue
                    jobs.append(RegionJob(str(study), str(folder / mask), region.label, finding, region.label,
                                          result.model.id))
    return CamJobs(jobs, unexplained, skipped)


def _as_given(path: Path) -> Path:
    """An absolute path relative to the working folder when it lies inside it (as users type it)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def read_mask(
    path: str | os.PathLike, *, label: int = 1, image_uid: str | None = None, image_spacing: tuple[float, float] | None = None
) -> np.ndarray:
    """A 2D label image: PNG (8/16-bit), NIfTI or anything SimpleITK reads, or the segment
    ``label`` of a DICOM SEG on the image ``image_uid``.

    A mask file that records its own pixel spacing (NIfTI, NRRD, ...) must agree with the
    image's ``image_spacing`` when both are known (a unit spacing counts as unrecorded).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, a SEG without that segment or that image, or a mask whose
            spacing is not the image's.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such mask {path}")
    suffix = path.suffix.lower()
    if suffix == ".png":
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if mask is None:
            raise ValueError(f"mask {path.name} is not a readable PNG")
        return mask
    if _is_seg_file(path):
        return _cached_seg(str(path), os.stat(path).st_mtime_ns, True).mask(label, image_uid)
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(f"mask {path.name} cannot be read ({' '.join(str(error).split())[:120]})") from None
    array = sitk.GetArrayFromImage(image)
    spacing = tuple(float(v) for v in image.GetSpacing()[:2])[::-1]  # (row, column), as the image's
    if image_spacing and not np.allclose(spacing, 1.0) and not np.allclose(spacing, image_spacing, rtol=0.01):
        raise ValueError(f"mask {path.name} has pixel spacing {spacing[0]:g} x {spacing[1]:g} mm but the image "
                         f"{image_spacing[0]:g} x {image_spacing[1]:g} mm: not drawn on this image's grid")
    return np.squeeze(array) if array.ndim == 3 and 1 in array.shape else array
