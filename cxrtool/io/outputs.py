"""Writing results safely: atomic files, a per-folder lock, and the one writer of shared tables.

Every write goes to a temporary file in the destination folder and is then renamed over the
target (``os.replace`` is atomic on POSIX and Windows), so a crash never leaves a
half-written file behind. Files get the permissions the user's umask gives (the umask is
never changed, not even for a moment).

Files that several runs may update at once (a folder's predictions table and index, a
study's sidecar) are read, changed and written under the folder's lock
(:func:`folder_lock`), so concurrent runs (``parallel``, a batch scheduler) never lose each
other's updates. :class:`SharedTable` is the one writer of such tables.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

SIDECAR_SUFFIX = ".cxrtool.json"
FOLDER_CSV = "cxrtool_predictions.csv"
FOLDER_JSON = "cxrtool_predictions.json"
LOCK_NAME = ".cxrtool.lock"  # hidden: never taken for a study
LOCK_TIMEOUT_S = 600.0
# What evaluate writes into a folder of studies (its pictures are PNGs: never studies).
EVALUATION_FILES = {"json": "evaluation.json", "csv": "evaluation.csv", "roc": "roc_curves.png", "pr": "pr_curves.png"}


def is_own_output(name: str) -> bool:
    """Whether a file name is one of cxrtool's outputs (or hidden), never a study: a
    study's sidecar and pictures (``NAME.cxrtool.*``), evaluate's report and curves. (A
    folder's tables and sheets, ``cxrtool_*.csv|json|html``, are not pictures anyway.)"""
    return name.startswith(".") or ".cxrtool." in name or name in EVALUATION_FILES.values()


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
    tmp = _create_temporary(path)
    # The kernel applied the umask to this new file: that mode is the one the result gets,
    # even when the writer replaces the file with one of its own (safetensors does, 0600).
    mode = os.stat(tmp).st_mode & 0o777
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        if os.stat(tmp).st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _create_temporary(path: Path) -> Path:
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            descriptor = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(descriptor)
        return candidate
    raise FileExistsError(f"no free temporary name beside {path}")


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
    """Write JSON atomically. NaN and infinities are refused (ValueError): they are not JSON."""
    text = json.dumps(payload, indent=2, allow_nan=False)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    return Path(path)


def sidecar_path(output_dir: Path, study_name: str) -> Path:
    """The JSON sidecar of a study: ``img001.dcm`` -> ``img001.dcm.cxrtool.json``."""
    return output_dir / f"{study_name}{SIDECAR_SUFFIX}"


_held = threading.local()  # the folder locks this thread holds: folder -> depth


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the folder's lock (a hidden ``.cxrtool.lock`` file) while a shared file there
    is read, changed and written. Works between processes, hosts sharing the folder over
    a file system with locks, and threads of one process; a thread may take it again
    while it holds it (the inner block just runs).
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    held: dict[str, int] = _held.__dict__.setdefault("depth", {})
    key = os.path.abspath(folder)
    if held.get(key):
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME), timeout=LOCK_TIMEOUT_S, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise TimeoutError(f"{folder}: another cxrtool run has held {LOCK_NAME} for {LOCK_TIMEOUT_S:.0f} s") from None
    held[key] = 1
    try:
        yield
    finally:
        held[key] = 0
        lock.release()


class SharedTable:
    """A CSV table several runs may update at once, keyed by some of its columns.

    A run queues its changes (:meth:`put` a row, :meth:`drop` rows) and :meth:`flush`
    applies them to what is on disk *now*, under the folder's lock, then writes the table
    atomically: rows this run did not touch stay as they are on disk, whoever wrote them.
    Columns are ``first`` columns, then every other column in order of first appearance
    (on disk, then in this run's rows), then ``last`` columns.

    ``read_rows(path)`` may be given to read (and upgrade) what is on disk; by default the
    file is read with :class:`csv.DictReader`. ``cell`` turns a value into its text (by
    default floats get 6 decimals).
    """

    def __init__(
        self,
        path: Path,
        key: Sequence[str],
        *,
        first: Sequence[str] = (),
        last: Sequence[str] = (),
        read_rows: Callable[[Path], Iterable[Mapping[str, str]]] | None = None,
        sort: bool = True,
        cell: Callable[[Any], str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.key = tuple(key)
        self.first = list(dict.fromkeys([*first, *self.key]))
        self.last = list(last)
        self.read_rows = read_rows or read_csv_rows
        self.sort = sort
        self.cell = cell or format_cell
        self._puts: dict[tuple[str, ...], dict[str, str]] = {}
        self._drops: list[Callable[[Mapping[str, str]], bool]] = []

    def row_key(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(str(row.get(column, "") or "") for column in self.key)

    @property
    def dirty(self) -> bool:
        return bool(self._puts or self._drops)

    def put(self, row: Mapping[str, Any]) -> None:
        """Insert or replace the row with this row's key (values formatted as CSV cells)."""
        cells = {str(k): self.cell(v) for k, v in row.items()}
        self._puts[self.row_key(cells)] = cells

    def drop(self, where: Callable[[Mapping[str, str]], bool]) -> None:
        """Remove the rows on disk (and not put by this run afterwards) for which ``where`` holds."""
        self._drops.append(where)
        for key in [key for key, row in self._puts.items() if where(row)]:
            del self._puts[key]

    def flush(self) -> None:
        if not self.dirty:
            return
        with folder_lock(self.path.parent):
            rows = {self.row_key(row): dict(row) for row in self.read_rows(self.path)} if self.path.is_file() else {}
            for where in self._drops:
                rows = {key: row for key, row in rows.items() if not where(row)}
            rows.update(self._puts)
            seen: dict[str, None] = dict.fromkeys(self.first)
            for row in rows.values():
                seen.update(dict.fromkeys(c for c in row if c not in seen))
            middle = [c for c in seen if c not in self.first and c not in self.last]
            columns = [*self.first, *middle, *self.last]
            ordered = [rows[key] for key in (sorted(rows) if self.sort else rows)]
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            for row in ordered:
                writer.writerow({c: row.get(c, "") for c in columns})
            with atomic_write(self.path, "w", encoding="utf-8", newline="") as handle:
                handle.write(buffer.getvalue())
        self._puts.clear()
        self._drops.clear()


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return [dict(row) for row in csv.DictReader(handle)]


def update_json(path: Path, change: Callable[[Any], Any]) -> Any:
    """Read a JSON file (None when absent or unreadable), apply ``change``, write the
    result atomically, all under the folder's lock. Returns what was written (a None
    result removes the file)."""
    with folder_lock(path.parent):
        current = None
        if path.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                current = json.loads(path.read_text(encoding="utf-8"))
        updated = change(current)
        if updated is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            write_json(path, updated)
    return updated


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)
