"""The radiomics loop over (image, region) pairs: parallel, resumable, one table at the end.

Each finished row (features, or the reason the region could not be measured) is appended
to a journal beside the output (``OUT.journal.jsonl``) as one JSON line and flushed. An
interrupted run starts again from the journal: rows already there are not measured again,
a last line torn by the interruption is dropped (and measured again), and the table
``OUT`` is rebuilt from the journal, each row once, in the order of the jobs. The journal's
first line records the settings (parameters, feature classes, cxrtool's version): a run
with other settings does not reuse its rows but starts afresh.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.io.outputs import atomic_write
from cxrtool.radiomics.sources import RegionJob, read_mask

ID_COLUMNS = ("image", "mask", "label", "finding", "region", "status", "error")
JOURNAL_KIND = "cxrtool radiomics"


@dataclass
class RadiomicsSummary:
    total: int = 0
    measured: int = 0
    resumed: int = 0  # rows taken from the journal of an earlier, interrupted run
    restarted: bool = False  # an earlier run's journal had other settings: measured afresh
    failed: list[tuple[str, str]] = field(default_factory=list)
    table: Path | None = None
    json: Path | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def measure(job: RegionJob, params: dict[str, Any] | None, classes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """One row: the job's identity, ``status`` ok/failed, the reason, and the features."""
    return measure_image([job], params, classes)[0]


def measure_image(
    jobs: Sequence[RegionJob], params: dict[str, Any] | None, classes: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """The rows of regions of one image (read once): each row the job's identity,
    ``status`` ok/failed, the reason, and the features."""
    from cxrtool.io.studies import StudyReadError, read_study
    from cxrtool.radiomics.features import RegionError, extract

    expected = (StudyReadError, RegionError, ValueError, FileNotFoundError, OSError)
    rows: list[dict[str, Any]] = [{**asdict(job), "status": "ok", "error": ""} for job in jobs]
    try:
        study = read_study(jobs[0].image, keep_rescaled=True)
        if study.identity.get("converted_from"):
            raise RegionError(f"image is colour ({study.identity['converted_from']}), not a grey radiograph "
                              "(an overlay?); radiomics measures grey values only")
    except Exception as error:  # noqa: BLE001 - every region of this image fails with the reason
        reason = _reason(error, expected)
        for row in rows:
            row.update(status="failed", error=reason)
        return rows
    pixels = study.rescaled if study.rescaled is not None else study.pixels
    for job, row in zip(jobs, rows):
        try:
            if job.mask:
                mask = read_mask(job.mask, label=job.label, image_uid=study.identity.get("sop_instance_uid"),
                                 image_spacing=study.pixel_spacing)
            else:
                mask = np.ones(pixels.shape, dtype=np.uint8)
            row.update(extract(pixels, mask, spacing=study.pixel_spacing, label=job.label, params=params, classes=classes))
        except Exception as error:  # noqa: BLE001 - a row boundary: one region's surprise must not end the batch
            row.update(status="failed", error=_reason(error, expected))
    return rows


def _reason(error: Exception, expected: tuple[type[Exception], ...]) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, expected):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]  # a surprise: name its kind


def _row_key(row: dict[str, Any]) -> str:
    """The key of the job a journal row answers."""
    return RegionJob(row["image"], row["mask"], row["label"]).key


def _settings_key(params: dict[str, Any] | None, classes: tuple[str, ...] | None) -> str:
    from cxrtool import __version__

    text = json.dumps({"params": params, "classes": classes, "cxrtool": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_journal(path: Path, settings: str) -> dict[str, dict[str, Any]] | None:
    """The rows of an earlier run with the same settings; None when the journal is of other
    settings (its rows would not be comparable: the run starts afresh)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as handle:
        try:
            header = json.loads(handle.readline())
        except json.JSONDecodeError:
            return None
        if not isinstance(header, dict) or header.get("journal") != JOURNAL_KIND or header.get("settings") != settings:
            return None
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line an interruption tore: measured again
            done[_row_key(row)] = row
    return done


def run_regions(
    jobs: Sequence[RegionJob],
    out_csv: str | os.PathLike,
    *,
    params: dict[str, Any] | None = None,
    classes: tuple[str, ...] | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    json_out: str | os.PathLike | None = None,
) -> RadiomicsSummary:
    """Measure every job (in worker processes), journaling each row; then write the table
    (and, with ``json_out``, the same rows as JSON). ``classes`` limits the feature classes
    of ``params`` (or of the default).

    The table has the identifying columns first (image, mask, label, finding, region,
    status, error), then the features, then PyRadiomics' diagnostics (versions, settings,
    mask statistics). Re-running after an interruption resumes from the journal.
    """
    from cxrtool._workers import fork_safe_opencv

    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    journal = out_csv.with_name(out_csv.name + ".journal.jsonl")
    settings = _settings_key(params, classes)
    earlier = _read_journal(journal, settings)
    stale = earlier is None
    done = earlier or {}
    unique = list({job.key: job for job in jobs}.values())
    summary = RadiomicsSummary(total=len(unique), restarted=stale)
    todo = [job for job in unique if job.key not in done]
    summary.resumed = len(unique) - len(todo)
    finished = summary.resumed
    if progress:
        progress(finished, summary.total)
    n_workers = max(1, os.cpu_count() or 1) if workers is None else max(1, workers)
    fresh = stale or not journal.is_file()
    with open(journal, "w" if fresh else "a", encoding="utf-8") as handle:
        if fresh:
            handle.write(json.dumps({"journal": JOURNAL_KIND, "settings": settings}) + "\n")
        else:  # a torn last line would otherwise run into the next row
            handle.write("\n")

        def record(row: dict[str, Any]) -> None:
            nonlocal finished
            handle.write(json.dumps(row, default=_json_default) + "\n")
            handle.flush()
            done[_row_key(row)] = row
            finished += 1
            if progress:
                progress(finished, summary.total)

        groups = _by_image(todo, n_workers)
        if n_workers == 1 or len(groups) < 2:
            for group in groups:
                for row in measure_image(group, params, classes):
                    record(row)
        else:
            threads = max(1, (os.cpu_count() or 1) // n_workers)
            with fork_safe_opencv(), ProcessPoolExecutor(max_workers=n_workers, initializer=_worker_init,
                                                         initargs=(threads,)) as pool:
                for rows in pool.map(measure_image, groups, [params] * len(groups), [classes] * len(groups), chunksize=1):
                    for row in rows:
                        record(row)
    rows = [done[job.key] for job in unique]
    summary.measured = len(todo)
    summary.failed = [(row["image"], row["error"]) for row in rows if row["status"] != "ok"]
    summary.table = _write_table(out_csv, rows)
    if json_out is not None:
        summary.json = _write_json(Path(json_out), rows)
    return summary


def _by_image(jobs: Sequence[RegionJob], workers: int) -> list[list[RegionJob]]:
    """Jobs in groups that share an image, so each image is read once for its regions; a
    group holds at most 8 regions, fewer when there are few jobs for the workers (so that
    one image with many regions still spreads over them, and an interruption loses little)."""
    cap = max(1, min(8, len(jobs) // (4 * workers)))
    by_image: dict[str, list[RegionJob]] = {}
    for job in jobs:
        by_image.setdefault(job.image, []).append(job)
    return [group[start : start + cap] for group in by_image.values() for start in range(0, len(group), cap)]


def _worker_init(threads: int) -> None:
    """A worker's share of the cores: SimpleITK's filters (LoG, wavelet, resampling) would
    otherwise each start a thread per core in every worker."""
    import SimpleITK as sitk
    from threadpoolctl import threadpool_limits

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    threadpool_limits(threads)


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


def _write_json(path: Path, rows: list[dict[str, Any]]) -> Path:
    """The rows as JSON: the identifying fields, then ``features`` and ``diagnostics``."""
    from cxrtool import __version__

    records = []
    for row in rows:
        record: dict[str, Any] = {key: row.get(key) for key in ID_COLUMNS}
        record["features"] = {
            k: _finite(v) for k, v in row.items() if k not in ID_COLUMNS and not k.startswith("diagnostics_")
        }
        record["diagnostics"] = {k[len("diagnostics_"):]: _finite(v) for k, v in row.items() if k.startswith("diagnostics_")}
        records.append(record)
    document = {"cxrtool_version": __version__, "regions": records}
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1, default=_json_default, allow_nan=False)
        handle.write("\n")
    return path


def _finite(value: Any) -> Any:
    """NaN and infinities (PyRadiomics gives them for degenerate regions) as JSON null."""
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return None if isinstance(value, float) and not np.isfinite(value) else value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=_json_default)
    return str(value)
