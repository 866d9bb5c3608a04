"""Finding studies on disk and reading them into :class:`Study` records.

A Study is what every command works on: display-ready pixels (float32 in [0, 1], bone
bright), the pixel spacing, the projection and the file's identity. DICOM, PNG and JPEG are
told apart by content, not by extension.
"""

from __future__ import annotations

import glob
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from cxrtool.io.dicomweb import RemoteStudies, is_dicomweb
from cxrtool.io.outputs import is_own_output
from cxrtool.io.study import Study, StudyReadError, one_line, sniff_format
from cxrtool.registry import VIEW_POSITIONS  # noqa: F401  (the name this module exported)

# Smaller than this on either side is not a radiograph (an icon, a 1x1 tracking pixel, a
# thumbnail): it is refused rather than scored. MedMNIST-style 28 px thumbnails are too.
MIN_SIDE = 32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ""}
# Files that are never studies, even without an extension (our own outputs among them).
_IGNORED_SUFFIXES = {".json", ".csv", ".txt", ".md", ".yaml", ".yml", ".html", ".npy", ".gz"}


def read_study(path: str | os.PathLike, *, keep_rescaled: bool = False, min_side: int = MIN_SIDE) -> Study:
    """Read one file as a Study, whatever its format.

    What the decoders warn about (pydicom's "End of file reached ...", Pillow's ...) never
    reaches stderr raw: it becomes part of the reason when the file cannot be used, and
    ``Study.warnings`` when it can.

    Args:
        path: a DICOM, PNG or JPEG file (told apart by content).
        keep_rescaled: for DICOM, also keep the Modality-LUT output (``Study.rescaled``).
        min_side: an image smaller than this on either side is refused (not a radiograph).

    Example:
        >>> study = read_study("study/img001.dcm")
        >>> study.pixels.shape, study.view_position

    Raises:
        StudyReadError: with a one-line reason when the file cannot be used.
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            study = _read(path, keep_rescaled)
        except StudyReadError as error:
            noticed = _warning_lines(caught)
            if noticed:
                raise StudyReadError(one_line(f"{error} (the decoder warned: {'; '.join(noticed)})", limit=400)) from error
            raise
    study.warnings = _warning_lines(caught)
    height, width = study.shape
    if min(height, width) < min_side:
        raise StudyReadError(f"image too small to be a radiograph: {width} x {height} pixels "
                             f"(the minimum is {min_side} x {min_side})")
    return study


def _read(path: Path, keep_rescaled: bool) -> Study:
    kind = sniff_format(path)
    if kind == "dicom":
        from cxrtool.io.dicom import read_dicom

        return read_dicom(path, keep_rescaled=keep_rescaled)
    from cxrtool.io.images import read_image

    return read_image(path)


def _warning_lines(caught: list[warnings.WarningMessage]) -> list[str]:
    lines = (one_line(f"{_origin(w)}{w.message}", limit=160) for w in caught
             if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)))
    return list(dict.fromkeys(lines))[:5]


def _origin(warning: warnings.WarningMessage) -> str:
    module = Path(warning.filename).parts
    for name in ("pydicom", "PIL", "pylibjpeg", "openjpeg", "libjpeg", "jpeg_ls", "gdcm"):
        if name in module:
            return f"{'Pillow' if name == 'PIL' else name}: "
    return ""


def find_studies(inputs: Iterable[str | os.PathLike], *, stdin: TextIO | None = None,
                 passed: dict[str, int] | None = None, remote: RemoteStudies | None = None) -> Iterator[Path]:
    """Expand files, folders (recursively), shell globs, ``-`` (paths on stdin) and, given
    ``remote``, DICOMweb sources (``dicomweb://HOST:PORT/PATH/studies/UID``, also as lines
    on stdin: :mod:`cxrtool.io.dicomweb`): the paths their cached copies have in
    ``remote``'s cache, present or not yet (the run fetches those it does).

    Paths are yielded lazily, in a stable order within each input, and each at most once.
    A name that matches nothing is yielded as is, so that the caller reports it as missing
    rather than silently dropping it. In folders, what is not a study is passed over, and
    counted in ``passed`` by why: "cxrtool's own outputs" (:func:`is_own_output`), "hidden"
    (names starting with a dot), "not an image" (a table, a text...).

    Raises:
        UsageError: a DICOMweb source without ``remote`` (a command that does not read from
            a server), or one that is malformed.
    """
    seen: set[Path] = set()
    for raw in inputs:
        raw = str(raw)
        if raw == "-":
            stream = stdin if stdin is not None else sys.stdin
            candidates: Iterable[Path] = (path for line in stream if line.strip()
                                          for path in _from_stdin(line.strip(), remote, passed))
        elif is_dicomweb(raw):
            candidates = _remote(raw, remote, passed)
        else:
            candidates = _expand_one(raw)
        for candidate in candidates:
            if candidate.is_dir():
                children: Iterable[Path] = _walk(candidate, passed if passed is not None else {})
            else:
                children = (candidate,)
            for child in children:
                key = child.absolute()
                if key not in seen:
                    seen.add(key)
                    yield child


def _remote(raw: str, remote: RemoteStudies | None, passed: dict[str, int] | None) -> Iterator[Path]:
    if remote is None:
        from cxrtool.errors import UsageError

        raise UsageError(f"{raw}: this command reads local files only (cxrtool predict and explain read from DICOMweb)")
    return remote.expand(raw, passed)


def _from_stdin(line: str, remote: RemoteStudies | None, passed: dict[str, int] | None) -> Iterator[Path]:
    return _remote(line, remote, passed) if is_dicomweb(line) else iter((Path(line),))


def _expand_one(raw: str) -> Iterator[Path]:
    path = Path(raw)
    if path.exists() or not glob.has_magic(raw):
        yield path
        return
    matches = sorted(glob.glob(raw, recursive=True))
    if not matches:
        yield path  # reported later as "no such file"
    for match in matches:
        yield Path(match)


def _walk(folder: Path, passed: dict[str, int]) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = set(files)
        for name in sorted(files):
            why = "hidden" if name.startswith(".") else "cxrtool's own outputs" if is_own_output(name, names) else None
            candidate = Path(root) / name
            if why is None and not _looks_like_study(candidate):
                why = "not an image"
            if why is not None:
                passed[why] = passed.get(why, 0) + 1
                continue
            yield candidate


def _looks_like_study(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in _IGNORED_SUFFIXES:
        return False
    if suffix and suffix in IMAGE_SUFFIXES:
        return True
    # No extension or an unknown one (e.g. "1.2.840.113619.2.55.3.1"): DICOM files often
    # carry UIDs as names; sniff the content (so README, LICENSE, ... are not studies).
    try:
        sniff_format(path)
    except StudyReadError:
        return False
    return True
