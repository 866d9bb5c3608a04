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
import errno
import hashlib
import io
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cxrtool.errors import OutputError, UsageError
from cxrtool.io.study import open_regular

SIDECAR_SUFFIX = ".cxrtool.json"
FOLDER_CSV = "cxrtool_predictions.csv"
FOLDER_JSON = "cxrtool_predictions.json"
LOCK_NAME = ".cxrtool.lock"  # hidden: never taken for a study
LOCK_TIMEOUT_S = 600.0
# What evaluate writes into a folder of studies (its pictures are PNGs: never studies).
EVALUATION_FILES = {"json": "evaluation.json", "csv": "evaluation.csv", "roc": "roc_curves.png", "pr": "pr_curves.png"}


# A study's own outputs: its sidecar, and the files of a model's result (the model's 12-digit
# id after ".cxrtool."). A study that merely has ".cxrtool." in its name is still a study.
_PER_MODEL = re.compile(r"\.cxrtool\.[0-9a-f]{12}\.")
_FOLDER_FILE = re.compile(r"cxrtool_[a-z_]+\.(?:csv|json|jsonl|html)")  # a folder's tables and sheets
# radiomics' DICOM SR of regions no model made (a SEG's, a mask's): NAME.cxrtool.radiomics.sr.dcm
RADIOMICS_SR_KIND = "radiomics.sr.dcm"


def is_own_output(name: str, siblings: Container[str] = ()) -> bool:
    """Whether a file name is one of cxrtool's outputs (or hidden), never a study: a study's
    sidecar (``*.cxrtool.json``) and the files of a model's result (``*.cxrtool.<model
    id>.*``), and evaluate's curves where its report (``evaluation.json``) is among the
    ``siblings`` (the other names in the folder), radiomics' SRs (``*.cxrtool.radiomics.sr.dcm``),
    and a folder's tables and sheets (``cxrtool_*.csv|json|jsonl|html``)."""
    if (name.startswith(".") or name.endswith((SIDECAR_SUFFIX, f".cxrtool.{RADIOMICS_SR_KIND}")) or _PER_MODEL.search(name)
            or _FOLDER_FILE.fullmatch(name)):
        return True
    return name in EVALUATION_FILES.values() and EVALUATION_FILES["json"] in siblings


# What a write that fails says about the place, not the data: the run cannot go on there.
_PLACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG,
                 errno.ELOOP, errno.ENAMETOOLONG, errno.ENOTDIR}


def refuse_link(path: Path) -> None:
    """Refuse to write (or read back for merging) a file of ours that is a symbolic link:
    cxrtool writes its own files, never through a link to somewhere else.

    Raises:
        OutputError: naming the path and where the link points.
    """
    if os.path.islink(path):
        raise OutputError(f"{path} is a symbolic link (to {os.readlink(path)}); cxrtool does not write through "
                          "links: remove it")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failure of the place (full, read-only, no permission...) while writing ``path``
    into an :class:`OutputError` naming it, in one line."""
    try:
        yield
    except OutputError:
        raise
    except OSError as error:
        if error.errno not in _PLACE_ERRNOS:
            raise
        raise OutputError(f"{path}: {error.strerror or error}") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (safetensors,
    savefig); on success it is synced and renamed over ``path``, on failure removed.

    Raises:
        OutputError: ``path`` is a link, or the place cannot take the file (full, read-only...).

    Example:
        >>> with atomic_path("run/model.safetensors") as tmp:
        ...     save_file(tensors, str(tmp))
    """
    path = Path(path)
    refuse_link(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary(path)
    # The kernel applied the umask to this new file: that mode is the one the result gets,
    # even when the writer replaces the file with one of its own (safetensors does, 0600).
    mode = os.stat(tmp).st_mode & 0o777
    try:
        with writing(path):
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
    base = path.name
    if len(base.encode("utf-8", "surrogateescape")) > NAME_MAX - 14:  # "." + ".<8 hex>.tmp": keep it a legal name
        base = base.encode("utf-8", "surrogateescape")[: NAME_MAX - 14].decode("utf-8", "ignore")
    for _ in range(100):
        candidate = path.with_name(f".{base}.{secrets.token_hex(4)}.tmp")
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


NAME_MAX = 255  # bytes in a file name (ext4, XFS, APFS, NTFS)
# Room kept after a study's name for the longest name cxrtool derives from it:
# ".cxrtool." + a 12-digit model id + "." + a finding (at most 32) + ".overlay.png".
SUFFIX_ROOM = 72


def output_stem(study_name: str) -> str:
    """What the names of the files cxrtool writes for a study start with (then
    ``.cxrtool.``): the study's own name, or, when that and the longest suffix would pass
    the 255 bytes a file name may have, its first bytes, ``~`` and a digest of the whole
    name (so two long names that start alike stay apart)."""
    raw = study_name.encode("utf-8", "surrogateescape")
    if len(raw) + SUFFIX_ROOM <= NAME_MAX:
        return study_name
    keep = raw[: NAME_MAX - SUFFIX_ROOM - 11].decode("utf-8", "ignore")  # (a cut character dropped whole)
    return f"{keep}~{hashlib.sha256(raw).hexdigest()[:10]}"


def owned_by(name: str, study_name: str) -> bool:
    """Whether a file name is one of the files cxrtool writes for that study, in its folder."""
    return Path(name).name == name and name.startswith(f"{output_stem(study_name)}.cxrtool.")


def sidecar_path(output_dir: Path, study_name: str) -> Path:
    """The JSON sidecar of a study: ``img001.dcm`` -> ``img001.dcm.cxrtool.json`` (a name too
    long for that is shortened: :func:`output_stem`)."""
    return output_dir / f"{output_stem(study_name)}{SIDECAR_SUFFIX}"


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
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    refuse_link(folder / LOCK_NAME)
    lock = FileLock(str(folder / LOCK_NAME), timeout=LOCK_TIMEOUT_S, thread_local=False)
    try:
        with writing(folder / LOCK_NAME):
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
            refuse_link(self.path)  # never merge what a link points to into our table
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
            write_csv(self.path, columns, ([row.get(c, "") for c in columns] for row in ordered))
        self._puts.clear()
        self._drops.clear()


# A cell a spreadsheet would take for a formula (OWASP's "CSV injection"): its text starts
# with one of these. Written with a ' in front, which spreadsheets show as text.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """A cell's text as written: one more leading ``'`` when it would start a formula (or
    already starts with ``'``s and then would): the inverse is :func:`spreadsheet_text`."""
    bare = text.lstrip("'")
    if bare.startswith(_FORMULA_STARTS) and not _is_number(bare):
        return "'" + text
    return text


def spreadsheet_text(cell: str) -> str:
    """A cell as read back: what :func:`spreadsheet_safe` was given."""
    bare = cell.lstrip("'")
    if cell.startswith("'") and bare.startswith(_FORMULA_STARTS) and not _is_number(bare):
        return cell[1:]
    return cell


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """The one writer of cxrtool's CSV tables: atomic, UTF-8, ``\\n`` line ends, and every
    cell that a spreadsheet would run as a formula written as text (:func:`spreadsheet_safe`;
    :func:`read_csv_rows` reads it back as it was). Numbers (``-0.5``) are left alone."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([spreadsheet_safe(str(c)) for c in header])
    for row in rows:
        writer.writerow(["" if value is None else spreadsheet_safe(str(value)) for value in row])
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())
    return Path(path)


@contextlib.contextmanager
def open_append(path: Path) -> Iterator[Any]:
    """A journal of ours opened to read and append (created when absent), never through a
    link: a link there is refused, not followed (it could point anywhere).

    Raises:
        OutputError: the path is a link, or the place cannot take the file.
    """
    refuse_link(path)
    with writing(path):
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as error:
            if error.errno == errno.ELOOP:  # made a link since the check above
                raise OutputError(f"{path} is a symbolic link; cxrtool does not write through links: remove it") from None
            raise
        with os.fdopen(descriptor, "a+b") as handle:
            yield handle


def check_writable(folder: Path) -> None:
    """Make sure results can be written in ``folder`` (creating it), before any work.

    Raises:
        OutputError: it cannot be created, or a file cannot be created in it.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _create_temporary(folder / ".cxrtool.probe")
        os.unlink(probe)
    except OSError as error:  # whatever it is, nothing can be written there
        raise OutputError(f"{folder}: {error.strerror or error}") from None


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """A table cxrtool wrote, row by row, each cell as it was before :func:`write_csv`.

    Raises:
        UsageError: the table is no longer UTF-8 text (a spreadsheet saved it in another
            encoding), naming the file, the byte and what to do.
    """
    try:
        with open_regular(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = [spreadsheet_text(c) for c in next(reader, [])]
            twice = sorted({name for name in header if header.count(name) > 1})
            if twice:  # which of the two would be meant? never the last one silently
                raise UsageError(f"{path}: the column {twice[0][:40]!r} appears twice in the header; keep one")
            return [dict(zip(header, (spreadsheet_text(c) for c in row), strict=False)) for row in reader]
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at {error.start}; re-saved by "
                         "a spreadsheet in another encoding, such as cp1252?): save it as UTF-8 CSV, or move it "
                         "away and run again to rebuild it from the sidecars") from None


def update_json(path: Path, change: Callable[[Any], Any]) -> Any:
    """Read a JSON file (None when absent or unreadable), apply ``change``, write the
    result atomically, all under the folder's lock. Returns what was written (a None
    result removes the file)."""
    with folder_lock(path.parent):
        refuse_link(path)
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
