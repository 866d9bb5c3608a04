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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from cxrtool.io.outputs import is_own_output
from cxrtool.registry import VIEW_POSITIONS  # noqa: F401  (the name this module exported)

# Smaller than this on either side is not a radiograph (an icon, a 1x1 tracking pixel, a
# thumbnail): it is refused rather than scored. MedMNIST-style 28 px thumbnails are too.
MIN_SIDE = 32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ""}
# Files that are never studies, even without an extension (our own outputs among them).
_IGNORED_SUFFIXES = {".json", ".csv", ".txt", ".md", ".yaml", ".yml", ".html", ".npy", ".gz"}


class StudyReadError(Exception):
    """A file that cannot be read as a study; the message is the one-line reason."""


def one_line(message: str, limit: int | None = 200) -> str:
    """A failure reason fit for one CSV cell and one stderr line.

    Collapses whitespace, blanks out control bytes (corrupt header values carry them) and,
    when ``limit`` is given, caps the length.
    """
    text = " ".join(message.split())
    text = "".join(char if char.isprintable() else "?" for char in text)
    if limit is None or len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


@dataclass
class Study:
    """One radiograph, decoded and ready for preprocessing.

    Attributes:
        path: the file it was read from.
        pixels: float32 array (H, W) in [0, 1]; bone bright (MONOCHROME1 inverted), after
            the Modality LUT and the VOI LUT or window when the file has them.
        pixel_spacing: (row, column) spacing in millimetres, or None when unknown.
        view_position: "PA", "AP", "LATERAL" or "UNKNOWN".
        source_format: "dicom", "png" or "jpeg".
        identity: non-identifying file identity (e.g. SOP Instance UID, transfer syntax);
            never patient names or IDs.
        rescaled: for DICOM, the Modality-LUT output (e.g. Hounsfield-like or raw detector
            values) as float32 before windowing, when the reader was asked to keep it.
        warnings: what the decoders warned about while reading (one line each).
    """

    path: Path
    pixels: np.ndarray
    pixel_spacing: tuple[float, float] | None = None
    view_position: str = "UNKNOWN"
    source_format: str = "png"
    identity: dict[str, str] = field(default_factory=dict)
    rescaled: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape[:2])  # type: ignore[return-value]


def sniff_format(path: Path) -> str:
    """Tell DICOM, PNG and JPEG apart by their first bytes.

    Raises:
        StudyReadError: for an empty, unreadable or unrecognised file.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except FileNotFoundError as error:
        raise StudyReadError("no such file") from error
    except IsADirectoryError as error:
        raise StudyReadError("is a directory, not a file") from error
    except OSError as error:
        raise StudyReadError(f"cannot open: {error.strerror or error}") from error
    if not head:
        raise StudyReadError("empty file")
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    # DICOM without the 128-byte preamble: starts with a group 0002 or 0008 element.
    if head[:2] in (b"\x02\x00", b"\x08\x00") and path.suffix.lower() in (".dcm", ".dicom", ""):
        return "dicom"
    raise StudyReadError("not a DICOM, PNG or JPEG file")


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


def find_studies(inputs: Iterable[str | os.PathLike], *, stdin: TextIO | None = None) -> Iterator[Path]:
    """Expand files, folders (recursively), shell globs and ``-`` (paths on stdin).

    Paths are yielded lazily, in a stable order within each input, and each at most once.
    A name that matches nothing is yielded as is, so that the caller reports it as missing
    rather than silently dropping it.
    """
    seen: set[Path] = set()
    for raw in inputs:
        raw = str(raw)
        if raw == "-":
            stream = stdin if stdin is not None else sys.stdin
            candidates: Iterable[Path] = (Path(line.strip()) for line in stream if line.strip())
        else:
            candidates = _expand_one(raw)
        for candidate in candidates:
            if candidate.is_dir():
                children: Iterable[Path] = _walk(candidate)
            else:
                children = (candidate,)
            for child in children:
                key = child.absolute()
                if key not in seen:
                    seen.add(key)
                    yield child


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


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if is_own_output(name):
                continue  # hidden files and cxrtool's own outputs
            candidate = Path(root) / name
            if _looks_like_study(candidate):
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
