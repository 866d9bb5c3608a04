"""Training inputs read once: each image decoded and fitted to the model's input square a
single time, kept on disk and memory-mapped by every epoch, run and torchrun rank after it.

The folder (``$CXRTOOL_CACHE/train-images`` by default, ``~/.cache/cxrtool/train-images``
without it; or the folder the ``image_cache`` setting names)::

    train-images/
      files.json                        path -> Fingerprint: the quick check before a hash
      .cxrtool.lock                     held while a run merges what it learnt into files.json
      224px-letterbox-opencv-<digest>/  one folder per preprocessing
        preprocessing.json              what its squares were made with
        3f/3fa4...e1.npy                the uint8 square of the file whose SHA-256 is 3fa4...e1
        9c/9c07...2b.failed             or why a file of that content cannot be read

**Keyed by content and preprocessing.** An entry is named by the SHA-256 of the file's
bytes, inside the folder of the exact :class:`~cxrtool.preprocess.Preprocessing` (every
field: a field that does not change the square today costs a miss, never a stale square),
:data:`SQUARE_VERSION` and cxrtool's version. A copy or a moved dataset finds its squares;
a changed file or preprocessing never does. ``files.json`` spares the hash of an untouched
file: it holds each path's :class:`~cxrtool.io.records.provenance.Fingerprint`, whose
stat (size, modification and change times, inode) is trusted when unchanged, as
``predict``'s "already done" trusts it; anything else is hashed again. A file rewritten
with its size and modification time put back still has a new change time (no program can
set it back), so it is hashed and misses. (A file system that keeps no change time, or a
clock set back, would defeat the quick check: ``--clear-image-cache`` then.)

**Concurrency.** Every entry is written whole to a temporary file and renamed into place
(:func:`~cxrtool.io.outputs.atomic_write`): a reader sees the whole entry or none, and two
runs writing one entry write the same bytes. ``files.json`` is read, merged and rewritten
under the folder's lock (:func:`~cxrtool.io.outputs.folder_lock`). torchrun's ranks each
decode their share of what is missing, wait for each other (``wait``: a barrier), then
open the whole from the cache.

**Failures** (files that cannot be read as radiographs) are remembered with their reason,
keyed by content like the squares: a fixed file has another SHA-256 and is read again. A
file that cannot be opened or hashed, or that changes while it is read, is unreadable for
this run only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import cxrtool
from cxrtool._workers import process_pool
from cxrtool.errors import OutputError
from cxrtool.io.records.provenance import Fingerprint, settings_digest, sha256_file
from cxrtool.io.studies import StudyReadError, read_study
from cxrtool.preprocess import Preprocessing, fit_to_square

# Bump when read_study or fit_to_square change the squares they give for the same file and
# settings: every square made before is then left behind (cxrtool's version is in the key
# too, but an editable install keeps its version while its code changes).
SQUARE_VERSION = 1
INDEX_NAME = "files.json"
MARKER_NAME = "preprocessing.json"
IMAGE_CACHE_MODES = ("auto", "memory", "off")  # the image_cache setting's words; anything else is a folder
_SHELF_NAME = re.compile(r"\d+px-[a-z_]+-[a-z]+-[0-9a-f]{16}")


def default_folder() -> Path:
    """The persistent cache's default folder: ``train-images`` in cxrtool's cache folder
    (``$CXRTOOL_CACHE``, else ``$XDG_CACHE_HOME/cxrtool``, else ``~/.cache/cxrtool``)."""
    from cxrtool.models.runtime import cache_folder

    return cache_folder() / "train-images"


def persistent_folder(image_cache: str) -> Path | None:
    """The folder an ``image_cache`` setting keeps its squares in: the default for ``auto``,
    none for ``memory`` and ``off``, else the folder it names."""
    if image_cache == "auto":
        return default_folder()
    if image_cache in IMAGE_CACHE_MODES:
        return None
    return Path(image_cache).expanduser()


def read_square(path: str | os.PathLike, prep: Preprocessing) -> tuple[np.ndarray | None, str | None]:
    """The image's fitted input square as uint8, or None and why it cannot be read.

    uint8 keeps the cache four times smaller than float32; the model sees 8-bit display data
    anyway for PNG sources, and 1/255 steps are below the augmentation's noise.
    """
    try:
        square, _ = fit_to_square(read_study(path).pixels, prep)
    except StudyReadError as error:
        return None, str(error)
    return np.round(square * 255).astype(np.uint8), None


def shelf_name(prep: Preprocessing) -> str:
    """The folder of one preprocessing's squares: readable, and a digest of everything that
    makes the square (all of the preprocessing, :data:`SQUARE_VERSION`, cxrtool's version)."""
    digest = settings_digest(_shelf_key(prep))
    return f"{prep.input_size}px-{prep.resize}-{prep.resample}-{digest}"


def _shelf_key(prep: Preprocessing) -> dict[str, Any]:
    return {"preprocessing": prep.to_dict(), "square_version": SQUARE_VERSION, "cxrtool": cxrtool.__version__}


class _Shelf:
    """One preprocessing's entries: ``XX/<sha256>.npy`` squares and ``XX/<sha256>.failed`` reasons."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def square_path(self, sha256: str) -> Path:
        return self.folder / sha256[:2] / f"{sha256}.npy"

    def failure_path(self, sha256: str) -> Path:
        return self.folder / sha256[:2] / f"{sha256}.failed"

    def find(self, sha256: str) -> tuple[str, str] | None:
        """``("square", "")``, ``("failed", reason)``, or None when this content has no entry."""
        if self.square_path(sha256).is_file():
            return "square", ""
        try:
            return "failed", self.failure_path(sha256).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def put_square(self, sha256: str, square: np.ndarray) -> None:
        from cxrtool.io.outputs import atomic_write

        with atomic_write(self.square_path(sha256), "wb") as handle:
            np.save(handle, square, allow_pickle=False)

    def put_failure(self, sha256: str, reason: str) -> None:
        from cxrtool.io.outputs import atomic_write

        with atomic_write(self.failure_path(sha256), "w", encoding="utf-8") as handle:
            handle.write(reason)

    def mark(self, prep: Preprocessing) -> None:
        """Write ``preprocessing.json`` (what the squares are, for the size report) once."""
        from cxrtool.io.outputs import write_json

        if not (self.folder / MARKER_NAME).is_file():
            write_json(self.folder / MARKER_NAME, _shelf_key(prep))


def _unchanged(fingerprint: Fingerprint, path: str) -> bool:
    """Whether the file still holds the content ``fingerprint`` was taken of: its stat where
    that is trusted, else a second hash (a file too fresh to trust its stat)."""
    if fingerprint.size is not None:
        return fingerprint.unchanged_stat(path)
    try:
        return sha256_file(path) == fingerprint.sha256
    except OSError:
        return False


def _fill_one(job: tuple[str, Preprocessing, str, Fingerprint | None]) -> tuple[dict | None, str, str, bool]:
    """Worker: one image's entry, found or made. Returns its fingerprint (None when it has
    none), ``"square"``, ``"failed"`` (remembered) or ``"unreadable"`` (this run only), the
    reason, and whether it was decoded here."""
    path, prep, folder, known = job
    shelf = _Shelf(Path(folder))
    try:
        fingerprint = known or Fingerprint.of(path)
    except OSError as error:
        return None, "unreadable", f"cannot read: {error.strerror or error}", False
    found = shelf.find(fingerprint.sha256)
    if found is not None:
        return fingerprint.to_dict(), *found, False
    square, error = read_square(path, prep)
    if not _unchanged(fingerprint, path):  # the square may be of other bytes than those hashed
        return None, "unreadable", "the file changed while it was being read", True
    if square is None:
        reason = error or "unreadable"
        shelf.put_failure(fingerprint.sha256, reason)
        return fingerprint.to_dict(), "failed", reason, True
    shelf.put_square(fingerprint.sha256, square)
    return fingerprint.to_dict(), "square", "", True


class DiskImageCache:
    """Fitted input squares of every image, from the persistent cache (one memory-mapped
    file each), decoding in parallel only what the cache lacks and adding it there.

    The same interface as the in-memory :class:`~cxrtool.train.datasets.ImageCache`:
    :meth:`square` and ``failed`` (index -> reason). ``decoded`` and ``reused`` count the
    images decoded by this process and those found in the cache.

    Args:
        paths: the images, in the dataset's order.
        prep: the preprocessing that makes the squares.
        folder: the cache's folder (default :func:`default_folder`).
        workers: decoding processes (0: in this process).
        progress: called with (images done, images) as they are found or made.
        share: (rank, ranks): this process decodes the missing images at positions ``rank``,
            ``rank + ranks``, ...; after ``wait``, what the others made is read from the cache
            (and anything still missing made here).
        wait: returns once every rank has made its share (a barrier).

    Raises:
        OutputError: the cache lacks squares and its folder cannot be written, or its disk
            has no room for them.

    Example:
        >>> cache = DiskImageCache(paths, Preprocessing(input_size=224), workers=4)
        >>> cache.square(0).shape, cache.reused, cache.decoded
        ((224, 224), 388, 0)
    """

    def __init__(self, paths: Sequence[str | os.PathLike], prep: Preprocessing, folder: str | os.PathLike | None = None, *,
                 workers: int = 2, progress: Callable[[int, int], None] | None = None, share: tuple[int, int] = (0, 1),
                 wait: Callable[[], None] | None = None):
        self.root = Path(folder) if folder is not None else default_folder()
        self.prep = prep
        self.paths = [str(p) for p in paths]
        self.folder = self.root / shelf_name(prep)
        self._shelf = _Shelf(self.folder)
        self.files: list[Path | None] = [None] * len(self.paths)
        self.failed: dict[int, str] = {}
        self.decoded = self.reused = 0
        self._known: dict[int, Fingerprint] = {}  # images whose content the index knew but the cache lacked
        self._done, self._progress = 0, progress

        rank, ranks = share
        missing = self._look_up(range(len(self.paths)))
        # By position in the dataset, not in this rank's list of what is missing: the ranks'
        # lists differ as soon as one has written its first squares, their shares never do.
        mine = [index for index in missing if index % ranks == rank]
        self._make(mine, workers)
        if ranks > 1:
            if wait is not None:
                wait()
            taken = set(mine)
            self._make(self._look_up([i for i in missing if i not in taken]), workers)
        if progress is not None and self._done < len(self.paths):
            progress(len(self.paths), len(self.paths))

    def square(self, index: int) -> np.ndarray | None:
        """The image's uint8 square (memory-mapped), or None when it cannot be read."""
        if index in self.failed:
            return None
        size = self.prep.input_size
        path = self.files[index]
        try:
            square = np.load(path, mmap_mode="r", allow_pickle=False) if path is not None else None
        except (OSError, ValueError):
            square = None  # removed since (the cache cleared meanwhile) or damaged: read the image itself
        if square is not None and square.shape == (size, size) and square.dtype == np.uint8:
            return square
        return read_square(self.paths[index], self.prep)[0]

    @property
    def nbytes(self) -> int:
        """The squares' bytes (without the files' headers and blocks)."""
        return sum(path is not None for path in self.files) * self.prep.input_size**2

    def _look_up(self, indices: Sequence[int] | range) -> list[int]:
        """Settle the images the index and the cache know (untouched file, entry present);
        return the others."""
        known = self._read_index()
        missing = []
        for index in indices:
            path = self.paths[index]
            fingerprint = known.get(os.path.abspath(path))
            if fingerprint is None or not fingerprint.unchanged_stat(path):
                missing.append(index)
                continue
            found = self._shelf.find(fingerprint.sha256)
            if found is None:
                self._known[index] = fingerprint
                missing.append(index)
                continue
            self._settle(index, fingerprint.sha256, *found)
            self.reused += 1
            self._advance()
        return missing

    def _make(self, indices: list[int], workers: int) -> None:
        """Hash, find or decode each image in worker processes (they write the entries), then
        merge what was learnt into the index."""
        from cxrtool.io.outputs import check_writable

        if not indices:
            return
        check_writable(self.folder)  # (only now: a cache that lacks nothing may be read-only)
        self._shelf.mark(self.prep)
        self._check_room(len(indices))
        jobs = [(self.paths[i], self.prep, str(self.folder), self._known.get(i)) for i in indices]
        learnt: dict[str, dict] = {}
        pool_size = workers if len(jobs) > 16 else 0  # (a few images: not worth starting processes)
        chunk = max(1, min(16, len(jobs) // max(1, 4 * pool_size)))
        with process_pool(pool_size) as pool:
            for index, (fingerprint, kind, reason, decoded) in zip(indices, pool.map(_fill_one, jobs, chunksize=chunk),
                                                                   strict=True):
                if fingerprint is None:
                    self.failed[index] = reason
                else:
                    self._settle(index, fingerprint["sha256"], kind, reason)
                    if fingerprint.get("stat"):  # (a fingerprint without a trusted stat spares no hash later)
                        learnt[os.path.abspath(self.paths[index])] = fingerprint
                self.decoded += decoded
                self.reused += fingerprint is not None and not decoded
                self._advance()
        self._remember(learnt)

    def _settle(self, index: int, sha256: str, kind: str, reason: str) -> None:
        if kind == "square":
            self.files[index] = self._shelf.square_path(sha256)
        else:
            self.failed[index] = reason

    def _advance(self) -> None:
        self._done += 1
        if self._progress is not None and (self._done % 64 == 0 or self._done == len(self.paths)):
            self._progress(self._done, len(self.paths))

    def _check_room(self, count: int) -> None:
        # Before decoding, not at the disk's last byte minutes later.
        needed = count * (self.prep.input_size**2 + 4096)  # a square, its header, its last block
        free = shutil.disk_usage(self.folder).free
        if free < needed:
            raise OutputError(f"{self.root}: {free / 2**20:.0f} MiB free, the image cache needs about "
                              f"{needed / 2**20:.0f} MiB more: cxrtool train --clear-image-cache, another "
                              "folder (--image-cache PATH), or --image-cache memory")

    def _read_index(self) -> dict[str, Fingerprint]:
        try:
            loaded = json.loads((self.root / INDEX_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # damaged or unreadable: every file is hashed again, and the index rewritten
        files = loaded.get("files") if isinstance(loaded, dict) else None
        if not isinstance(files, dict):
            return {}
        known = {}
        for path, values in files.items():
            fingerprint = Fingerprint.from_dict(values)
            if fingerprint is not None:
                known[path] = fingerprint
        return known

    def _remember(self, learnt: dict[str, dict]) -> None:
        """Merge this run's fingerprints into the index as it is on disk now (other runs and
        ranks merge theirs under the same lock)."""
        from cxrtool.io.outputs import update_json

        if not learnt:
            return

        def merge(current: Any) -> dict[str, Any]:
            files = current.get("files") if isinstance(current, dict) else None
            return {"format": 1, "files": {**(files if isinstance(files, dict) else {}), **learnt}}

        update_json(self.root / INDEX_NAME, merge)


@dataclass(frozen=True)
class CachedPreprocessing:
    """What the cache holds for one preprocessing."""

    folder: Path
    made_with: dict[str, Any]  # preprocessing.json: the preprocessing, square version, cxrtool version
    squares: int
    failures: int
    bytes: int  # on disk


def cache_contents(folder: str | os.PathLike | None = None) -> list[CachedPreprocessing]:
    """The cache's size, by preprocessing (cxrtool's folders only: named as
    :func:`shelf_name` names them).

    Example:
        >>> sum(part.bytes for part in cache_contents()) / 2**20  # MiB
    """
    root = Path(folder) if folder is not None else default_folder()
    if not root.is_dir():
        return []
    parts = []
    for shelf in sorted(root.iterdir()):
        if not (_SHELF_NAME.fullmatch(shelf.name) and shelf.is_dir() and not shelf.is_symlink()):
            continue
        try:
            made_with = json.loads((shelf / MARKER_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            made_with = {}  # (a folder cleared while a run filled it has its squares, not this)
        squares = failures = size = 0
        for bucket in shelf.iterdir():
            if not bucket.is_dir() or bucket.is_symlink():
                continue
            for entry in os.scandir(bucket):
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # a running fill's temporary, renamed meanwhile
                    continue
                squares += entry.name.endswith(".npy")
                failures += entry.name.endswith(".failed")
                size += getattr(stat, "st_blocks", 0) * 512 or stat.st_size
        parts.append(CachedPreprocessing(shelf, made_with if isinstance(made_with, dict) else {}, squares, failures, size))
    return parts


def clear_cache(folder: str | os.PathLike | None = None) -> list[CachedPreprocessing]:
    """Empty the persistent cache; returns what it held. Only cxrtool's own folders and
    index go: a folder named by mistake loses nothing else. Runs using the cache meanwhile
    read their images from the files themselves.

    Example:
        >>> freed = sum(part.bytes for part in clear_cache())
    """
    from cxrtool.io.outputs import folder_lock

    root = Path(folder) if folder is not None else default_folder()
    if not root.is_dir():
        return []
    with folder_lock(root):  # not while a run merges its index, nor with another clear
        parts = cache_contents(root)
        for part in parts:
            shutil.rmtree(part.folder)
        (root / INDEX_NAME).unlink(missing_ok=True)
    return parts
