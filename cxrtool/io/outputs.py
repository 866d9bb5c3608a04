"""Writing results atomically: JSON sidecars, per-folder CSV tables, PNGs.

Every write goes to a temporary file in the destination folder and is then renamed over the
target (``os.replace`` is atomic on POSIX and Windows), so a crash never leaves a
half-written file behind.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SIDECAR_SUFFIX = ".cxrtool.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
FOLDER_CSV = "cxrtool_predictions.csv"
FOLDER_JSON = "cxrtool_predictions.json"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (safetensors,
    savefig); on success it is synced and renamed over ``path``, on failure removed.

    Example:
        >>> with atomic_path("run/model.safetensors") as tmp:
        ...     save_file(tensors, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    # mkstemp creates 0600 files; results are meant to be shared like any other file.
    os.chmod(tmp_name, 0o666 & ~_UMASK)
    try:
        yield Path(tmp_name)
        with open(tmp_name, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    Example:
        >>> with atomic_write("out/result.json") as handle:
        ...     handle.write("{}")
    """
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, allow_nan=False)
        handle.write("\n")
    return Path(path)


def sidecar_path(output_dir: Path, study_name: str) -> Path:
    """The JSON sidecar of a study: ``img001.dcm`` -> ``img001.dcm.cxrtool.json``."""
    return output_dir / f"{study_name}{SIDECAR_SUFFIX}"


class FolderTable:
    """The per-folder predictions CSV, updated in place.

    Rows are keyed by file name: existing rows for other files are kept, rows for files
    processed again are replaced. Columns: ``file``, one per finding, then ``extra``.
    """

    def __init__(self, path: Path, findings: Sequence[str], extra: Sequence[str] = ("view_position", "error")):
        self.path = path
        self.columns = ["file", *findings, *extra]
        self.rows: dict[str, dict[str, str]] = {}
        self.dirty = False
        if path.exists():
            with open(path, newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    if row.get("file"):
                        self.rows[row["file"]] = row

    def update(self, file_name: str, values: dict[str, Any]) -> None:
        row = {column: "" for column in self.columns}
        row["file"] = file_name
        for key, value in values.items():
            if key in row:
                row[key] = _format_cell(value)
        self.rows[file_name] = row
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for name in sorted(self.rows):
            writer.writerow({c: self.rows[name].get(c, "") for c in self.columns})
        with atomic_write(self.path, "w", encoding="utf-8", newline="") as handle:
            handle.write(buffer.getvalue())
        self.dirty = False


class FolderTables:
    """All folder CSVs touched by one run, flushed every few seconds and at the end."""

    def __init__(self, findings: Sequence[str], *, flush_every: float = 10.0):
        self.findings = list(findings)
        self.tables: dict[Path, FolderTable] = {}
        self.flush_every = flush_every
        self._last_flush = time.monotonic()

    def table(self, folder: Path) -> FolderTable:
        if folder not in self.tables:
            self.tables[folder] = FolderTable(folder / FOLDER_CSV, self.findings)
        return self.tables[folder]

    def update(self, folder: Path, file_name: str, values: dict[str, Any]) -> None:
        self.table(folder).update(file_name, values)
        if time.monotonic() - self._last_flush > self.flush_every:
            self.flush()

    def flush(self) -> None:
        for table in self.tables.values():
            table.flush()
        self._last_flush = time.monotonic()


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)
