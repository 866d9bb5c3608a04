"""The radiomics loop over (image, region) pairs: parallel, resumable, one table at the end.

Each finished row (features, or the reason the region could not be measured) is appended
to a journal beside the output (``OUT.journal.jsonl``) as one JSON line and flushed. An
interrupted run starts again from the journal: rows already there are not measured again,
a last line torn by the interruption is dropped (and measured again), and the table
``OUT`` is rebuilt from the journal, each row once, in the order of the jobs.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.io.outputs import atomic_write

ID_COLUMNS = ("image", "mask", "label", "finding", "region", "status", "error")


@dataclass(frozen=True)
class RegionJob:
    """One region to measure: ``mask == label`` in ``mask`` (None: the whole image)."""

    image: str
    mask: str | None = None
    label: int = 1
    finding: str = ""
    region: int | None = None

    @property
    def key(self) -> str:
        return json.dumps([self.image, self.mask or "", self.label])


@dataclass
class RadiomicsSummary:
    total: int = 0
    measured: int = 0
    resumed: int = 0  # rows taken from the journal of an earlier, interrupted run
    failed: list[tuple[str, str]] = field(default_factory=list)
    table: Path | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def jobs_from_csv(csv_path: str | os.PathLike) -> list[RegionJob]:
    """Jobs from a CSV with ``image`` and ``mask`` columns and an optional ``label``
    (PyRadiomics' batch CSV spells them Image, Mask, Label). Relative paths are taken
    from the CSV's folder.

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
            image, mask = row[columns["image"]].strip(), row[columns["mask"]].strip()
            label_text = (row.get(columns.get("label", ""), "") or "1").strip()
            try:
                label = int(float(label_text))
            except ValueError:
                raise ValueError(f"{path.name} line {line}: label {label_text!r} is not an integer") from None
            jobs.append(RegionJob(str(_resolve(path.parent, image)), str(_resolve(path.parent, mask)), label))
    return jobs


def _resolve(folder: Path, name: str) -> Path:
    candidate = Path(name)
    return candidate if candidate.is_absolute() else folder / candidate


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A label image: PNG (8/16-bit), NIfTI, or anything SimpleITK reads; 2D."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such mask {path}")
    if path.suffix.lower() == ".png":
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if mask is None:
            raise ValueError(f"mask {path.name} is not a readable PNG")
        return mask
    import SimpleITK as sitk

    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as error:
        raise ValueError(f"mask {path.name} cannot be read ({' '.join(str(error).split())[:120]})") from None
    return np.squeeze(array) if array.ndim == 3 and 1 in array.shape else array


def measure(job: RegionJob, params: dict[str, Any] | None) -> dict[str, Any]:
    """One row: the job's identity, ``status`` ok/failed, the reason, and the features."""
    from cxrtool.io.studies import StudyReadError, read_study
    from cxrtool.radiomics.features import RegionError, extract

    row: dict[str, Any] = {**asdict(job), "status": "ok", "error": ""}
    try:
        study = read_study(job.image, keep_rescaled=True)
        pixels = study.rescaled if study.rescaled is not None else study.pixels
        mask = read_mask(job.mask) if job.mask else np.ones(pixels.shape, dtype=np.uint8)
        row.update(extract(pixels, mask, spacing=study.pixel_spacing, label=job.label, params=params))
    except (StudyReadError, RegionError, ValueError, FileNotFoundError, OSError) as error:
        row.update(status="failed", error=" ".join(str(error).split()) or type(error).__name__)
    except Exception as error:  # noqa: BLE001 - a row boundary: one region's surprise must not end the batch
        row.update(status="failed", error=f"{type(error).__name__}: {' '.join(str(error).split())}"[:300])
    return row


def _read_journal(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line an interruption tore: measured again
            done[RegionJob(row["image"], row["mask"], row["label"]).key] = row
    return done


def run_regions(
    jobs: Sequence[RegionJob],
    out_csv: str | os.PathLike,
    *,
    params: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RadiomicsSummary:
    """Measure every job (in worker processes), journaling each row; then write the table.

    The table has the identifying columns first (image, mask, label, finding, region,
    status, error), then the features, then PyRadiomics' diagnostics (versions, settings,
    mask statistics). Re-running after an interruption resumes from the journal.
    """
    from cxrtool._workers import fork_safe_opencv

    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    journal = out_csv.with_name(out_csv.name + ".journal.jsonl")
    done = _read_journal(journal)
    unique = list({job.key: job for job in jobs}.values())
    summary = RadiomicsSummary(total=len(unique))
    todo = [job for job in unique if job.key not in done]
    summary.resumed = len(unique) - len(todo)
    finished = summary.resumed
    if progress:
        progress(finished, summary.total)
    n_workers = max(1, os.cpu_count() or 1) if workers is None else max(1, workers)
    with open(journal, "a", encoding="utf-8") as handle:
        if done:  # a torn last line would otherwise run into the next row
            handle.write("\n")

        def record(row: dict[str, Any]) -> None:
            nonlocal finished
            handle.write(json.dumps(row, default=_json_default) + "\n")
            handle.flush()
            done[RegionJob(row["image"], row["mask"], row["label"]).key] = row
            finished += 1
            if progress:
                progress(finished, summary.total)

        if n_workers == 1 or len(todo) < 2:
            for job in todo:
                record(measure(job, params))
        else:
            with fork_safe_opencv(), ProcessPoolExecutor(max_workers=n_workers) as pool:
                for row in pool.map(measure, todo, [params] * len(todo), chunksize=1):
                    record(row)
    rows = [done[job.key] for job in unique]
    summary.measured = len(todo)
    summary.failed = [(row["image"], row["error"]) for row in rows if row["status"] != "ok"]
    summary.table = _write_table(out_csv, rows)
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _write_table(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    rows = list(rows)
    features: dict[str, None] = {}
    diagnostics: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key in ID_COLUMNS:
                continue
            (diagnostics if key.startswith("diagnostics_") else features).setdefault(key, None)
    header = [*ID_COLUMNS, *features, *diagnostics]
    with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(row.get(key)) for key in header])
    return path


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=_json_default)
    return str(value)


def jobs_from_cam(studies: Iterable[Path]) -> tuple[list[RegionJob], list[str]]:
    """One job per region of every finding ``cxrtool explain`` mapped for these studies
    (its mask ``NAME.cxrtool.<Finding>.mask.png`` holds region k as pixel value k).

    Returns the jobs, and the studies that had no explanations (for a note).
    """
    from cxrtool.io.outputs import sidecar_path

    jobs: list[RegionJob] = []
    unexplained: list[str] = []
    for study in studies:
        sidecar = sidecar_path(study.parent, study.name)
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
            explained = record["explanations"]["findings"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            unexplained.append(str(study))
            continue
        for finding, entry in explained.items():
            mask = entry.get("files", {}).get("mask")
            for region in entry.get("regions", []) if mask else []:
                jobs.append(RegionJob(str(study), str(study.parent / mask), int(region["label"]), finding, int(region["label"])))
    return jobs, unexplained
