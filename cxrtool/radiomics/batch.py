"""The radiomics loop over (image, region) pairs: parallel, resumable, one shared table.

Each finished row (features, or the reason the region could not be measured) is appended
to a journal beside the table (``OUT.journal.jsonl``) as one JSON line, with its
provenance: the fingerprints of the image and the mask it was measured on. An interrupted
run starts again from the journal: rows already there whose files are unchanged are not
measured again (:func:`cxrtool.io.records.is_done`), a last line torn by the interruption
is dropped (and measured again). The table ``OUT`` is rebuilt from the journal at the end,
each region once (its latest row), leaving out rows whose image or mask has changed since.

The journal's first line records the settings (parameters, feature classes, versions): a
table measured with other settings is not mixed with new rows; the run is refused unless
``overwrite`` (which starts the table afresh). Runs into the same table at the same time
append under the folder's lock, and each rebuild takes every run's rows.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool._workers import cores, process_pool
from cxrtool.engines import Engine, EngineReport, engine
from cxrtool.errors import UsageError
from cxrtool.io.outputs import SharedTable, atomic_write, folder_lock, open_append, refuse_link
from cxrtool.io.records import RADIOMICS_FIRST, RADIOMICS_KEY, Fingerprint, Provenance, is_done, settings_digest
from cxrtool.radiomics.sources import RegionJob, read_mask

ID_COLUMNS = RADIOMICS_FIRST
JOURNAL_KIND = "cxrtool radiomics"


@dataclass
class RadiomicsSummary:
    total: int = 0
    measured: int = 0
    resumed: int = 0  # rows taken from the journal (an earlier or interrupted run)
    restarted: bool = False  # the table held other settings and was started afresh (overwrite)
    changed: int = 0  # journal rows whose image or mask had changed: measured again
    stale: int = 0  # rows of other regions left out of the table: their files changed since
    failed: list[tuple[str, str]] = field(default_factory=list)
    table: Path | None = None
    json: Path | None = None
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)  # the table's rows, as journaled
    reports: Any = None  # with --dicom sr: what the SRs came to (cxrtool.reports.radiomics_sr.ReportSummary)
    dicom_problems: list[tuple[str, str]] = field(default_factory=list)  # SRs not made or not sent: (file, why)
    engine: EngineReport = field(default_factory=EngineReport)  # where the regions were measured

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.dicom_problems else 0


def measure(job: RegionJob, params: dict[str, Any] | None, classes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """One row: the job's identity, ``status`` ok/failed, the reason, and the features."""
    return measure_image([job], params, classes)[0]


def measure_image(
    jobs: Sequence[RegionJob], params: dict[str, Any] | None, classes: tuple[str, ...] | None = None,
    settings: str = "",
) -> list[dict[str, Any]]:
    """The rows of regions of one image (read once): each row the job's identity,
    ``status`` ok/failed, the reason, the features, and (under ``_provenance``) what it
    was measured on."""
    from cxrtool.io.studies import StudyReadError, read_study
    from cxrtool.radiomics.features import RegionError, extract

    expected = (StudyReadError, RegionError, ValueError, FileNotFoundError, OSError)
    measured = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")  # (a DICOM SR's content time)
    rows: list[dict[str, Any]] = [{**asdict(job), "status": "ok", "error": "", "_measured": measured} for job in jobs]
    image_print = _fingerprint(jobs[0].image)
    mask_prints = {job.mask: _fingerprint(job.mask) for job in jobs if job.mask}
    for job, row in zip(jobs, rows, strict=True):
        inputs = {"image": image_print, **({"mask": mask_prints[job.mask]} if job.mask else {})}
        if all(inputs.values()):
            row["_provenance"] = Provenance(inputs, PRODUCER, {"radiomics": settings}).to_dict()  # type: ignore[arg-type]
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
    for job, row in zip(jobs, rows, strict=True):
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


PRODUCER = "cxrtool radiomics"


def _fingerprint(path: str | None) -> Fingerprint | None:
    try:
        return Fingerprint.of(path) if path else None
    except OSError:
        return None  # missing: the row fails with its reason, and is measured again next time


def _reason(error: Exception, expected: tuple[type[Exception], ...]) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, expected):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]  # a surprise: name its kind


def _row_key(row: dict[str, Any]) -> str:
    """The key of the job a journal row answers."""
    return RegionJob(row["image"], row["mask"], row["label"]).key


def pyradiomics_version() -> str:
    """The version of the PyRadiomics that measures (whichever distribution installed it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyradiomics-bhklab")
    except PackageNotFoundError:  # another distribution of the same package
        import radiomics

        return str(getattr(radiomics, "__version__", "?"))


def _settings(params: dict[str, Any] | None, classes: tuple[str, ...] | None) -> dict[str, Any]:
    from cxrtool import __version__

    return {"params": params, "classes": list(classes) if classes else None, "cxrtool": __version__,
            "pyradiomics": pyradiomics_version()}


def _read_journal(path: Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The journal's header and its rows, each region's latest (a torn line is skipped)."""
    done: dict[str, dict[str, Any]] = {}
    refuse_link(path)  # a journal that is a link is never read, nor written through
    if not path.is_file():
        return None, done
    with open(path, encoding="utf-8") as handle:
        try:
            header = json.loads(handle.readline())
        except json.JSONDecodeError:
            header = {}
        if not isinstance(header, dict) or header.get("journal") != JOURNAL_KIND:
            header = {"journal": "unknown"}
        for line in handle:
            try:
                row = json.loads(line)
                done[_row_key(row)] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # the line an interruption tore: measured again
    return header, done


def _still_valid(row: dict[str, Any], digest: str) -> bool:
    """Whether a journal row still describes its files: made from their present content,
    or (a row that failed on a missing file) the file is still missing."""
    inputs = {"image": row["image"], **({"mask": row["mask"]} if row.get("mask") else {})}
    if not row.get("_provenance"):
        return row.get("status") != "ok" and not all(Path(path).is_file() for path in inputs.values())
    return is_done(Provenance.from_dict(row.get("_provenance")), inputs=inputs, producer=PRODUCER,
                   settings={"radiomics": digest})


def run_regions(
    jobs: Sequence[RegionJob],
    out_csv: str | os.PathLike,
    *,
    params: dict[str, Any] | None = None,
    classes: tuple[str, ...] | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    json_out: str | os.PathLike | None = None,
    overwrite: bool = False,
    engine_name: str | Engine = "local",
    ray_address: str | None = None,
) -> RadiomicsSummary:
    """Measure every job not done before (in ``workers`` processes: default a worker per
    core, 0 in this process; with ``engine_name="ray"``, in Ray tasks on the cluster at
    ``ray_address``: :mod:`cxrtool.ray_engine`), journaling each row; then
    write the table (and, with ``json_out``, the same rows as JSON). ``classes`` limits
    the feature classes of ``params`` (or of the default).

    The table has the identifying columns first (image, mask, label, finding, region,
    model, status, error), then the features, then PyRadiomics' diagnostics (versions,
    settings, mask statistics). Re-running after an interruption resumes from the journal;
    a region whose image or mask changed since is measured again.

    Raises:
        UsageError: the table holds rows measured with other settings (and not ``overwrite``).
    """
    where = engine(engine_name, ray_address)  # refused before any work (Ray not installed...)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    journal = out_csv.with_name(out_csv.name + ".journal.jsonl")
    settings = _settings(params, classes)
    digest = settings_digest(settings)
    summary = RadiomicsSummary()
    with folder_lock(out_csv.parent):
        header, done = _read_journal(journal)
        if header is not None and header.get("settings") != digest:
            if not overwrite:
                raise UsageError(
                    f"{out_csv} holds features measured with other settings ({_difference(header, settings)}); "
                    "give another --out, or --overwrite to replace that table")
            summary.restarted, done = True, {}
            for old in (journal, out_csv):
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
        if header is None or summary.restarted:
            with atomic_write(journal, "w", encoding="utf-8") as handle:
                handle.write(json.dumps({"journal": JOURNAL_KIND, "settings": digest, "recorded": settings}) + "\n")
    unique = list({job.key: job for job in jobs}.values())
    summary.total = len(unique)
    todo = []
    for job in unique:
        row = done.get(job.key)
        if row is not None and not overwrite and row.get("_provenance"):
            if _still_valid(row, digest):
                continue
            summary.changed += 1  # (a row without provenance failed on a missing file: tried again)
        todo.append(job)
    summary.resumed = len(unique) - len(todo)
    finished = summary.resumed
    if progress:
        progress(finished, summary.total)
    n_workers = cores() if workers is None else max(0, workers)

    def record(rows: list[dict[str, Any]]) -> None:
        nonlocal finished
        lines = "".join(json.dumps(row, default=_json_default) + "\n" for row in rows)
        with folder_lock(out_csv.parent), open_append(journal) as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell():
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    lines = "\n" + lines  # a line torn by an interruption stays apart
            handle.write(lines.encode("utf-8"))
        finished += len(rows)
        if progress:
            progress(finished, summary.total)

    groups = _by_image(todo, max(1, n_workers))
    if not where.is_local:
        from cxrtool.ray_engine import measure_regions, ray_session

        summary.engine.engine, summary.engine.address = where.name, where.address
        if groups:
            with ray_session(where):
                for rows in measure_regions(groups, params, classes, digest, report=summary.engine):
                    record(rows)
    else:
        with process_pool(n_workers if len(groups) > 1 else 0) as pool:
            for rows in pool.map(measure_image, groups, [params] * len(groups), [classes] * len(groups),
                                 [digest] * len(groups), chunksize=1):
                record(rows)
    summary.measured = len(todo)
    with folder_lock(out_csv.parent):
        _, everything = _read_journal(journal)  # every run's rows, this one's included
        # This run's regions in the order they were asked for, then the other runs' (those
        # whose files are unchanged) in the order they were measured.
        mine = {job.key for job in unique}
        rows = [everything[job.key] for job in unique if job.key in everything]
        others = [row for key, row in everything.items() if key not in mine]
        valid = [row for row in others if _still_valid(row, digest)]
        rows.extend(valid)
        summary.stale = len(others) - len(valid)
        summary.failed = [(row["image"], row["error"]) for row in rows if _row_key(row) in mine and row["status"] != "ok"]
        summary.table = _write_table(out_csv, rows)
        summary.rows = rows
        if json_out is not None:
            summary.json = _write_json(Path(json_out), rows)
    return summary


def _difference(header: dict[str, Any], settings: dict[str, Any]) -> str:
    recorded = header.get("recorded")
    if not isinstance(recorded, dict):
        return "an earlier cxrtool's settings"
    changed = [key for key in settings if recorded.get(key) != settings[key]]
    return "other " + ", ".join(changed) if changed else "other settings"


def _by_image(jobs: Sequence[RegionJob], workers: int) -> list[list[RegionJob]]:
    """Jobs in groups that share an image, so each image is read once for its regions; a
    group holds at most 8 regions, fewer when there are few jobs for the workers (so that
    one image with many regions still spreads over them, and an interruption loses little)."""
    cap = max(1, min(8, len(jobs) // (4 * workers)))
    by_image: dict[str, list[RegionJob]] = {}
    for job in jobs:
        by_image.setdefault(job.image, []).append(job)
    return [group[start : start + cap] for group in by_image.values() for start in range(0, len(group), cap)]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _write_table(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """The table through the one shared-table writer: the identifying columns, the
    features, then the diagnostics. The rows are all of them (the journal holds every
    run's), so what was on disk is replaced."""
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    diagnostics = [key for key in dict.fromkeys(k for row in rows for k in row) if key.startswith("diagnostics_")]
    table = SharedTable(path, RADIOMICS_KEY, first=ID_COLUMNS, last=diagnostics, sort=False, cell=_cell)
    table.drop(lambda row: True)
    for row in rows:
        table.put(row)
    table.flush()
    return path


def _write_json(path: Path, rows: list[dict[str, Any]]) -> Path:
    """The rows as JSON: the identifying fields, then ``features`` and ``diagnostics``."""
    from cxrtool import __version__

    records = []
    for row in rows:
        record: dict[str, Any] = {key: row.get(key) for key in ID_COLUMNS}
        record["features"] = {
            k: _finite(v) for k, v in row.items()
            if k not in ID_COLUMNS and not k.startswith("diagnostics_") and not k.startswith("_")
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
