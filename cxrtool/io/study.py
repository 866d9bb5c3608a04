"""What a study is once read: the :class:`Study` record, the one-line failure reason, and
telling DICOM, PNG and JPEG apart by content. A leaf: the readers (:mod:`cxrtool.io.dicom`,
:mod:`cxrtool.io.images`) and :mod:`cxrtool.io.studies`, which finds and dispatches studies
to them, all import it; it imports none of them."""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np


class StudyReadError(Exception):
    """A file that cannot be read as a study; the message is the one-line reason."""


class NotRegularFile(OSError):
    """A path that is a FIFO, a device, a socket or a folder: never read (reading one can
    block for ever, or never end); the message says which."""


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a file for reading only if it is a regular file (links followed).

    The check is made on the opened descriptor (opened without blocking, so a FIFO with no
    writer cannot hold the call), not on the name: what is read is what was checked.

    Raises:
        NotRegularFile: a FIFO, device, socket or folder, saying which.
        OSError: the file cannot be opened (missing, no permission...).
    """
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise NotRegularFile(f"not a regular file but {kind}: never read")
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


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


class CappedReader(io.BufferedReader):
    """A file whose ``read(n)`` never asks for more than what is left of it.

    A corrupt length field (a PNG chunk's, a DICOM element's) can claim up to 4 GiB, and
    Pillow and pydicom hand it to ``read``, which allocates that much before it finds the
    end of the file: a MemoryError wherever memory is limited, instead of the file's
    reason. Capped, the read comes back short and the reader says the file is truncated.
    """

    def __init__(self, raw: io.RawIOBase, path: str | os.PathLike) -> None:
        super().__init__(raw)
        self._size = os.fstat(raw.fileno()).st_size
        self._path = os.fspath(path)

    @property
    def name(self) -> str:
        """The path, not the descriptor number (pydicom puts it in its messages)."""
        return self._path

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self._size - self.tell()))
        return super().read(size)


def open_capped(path: Path) -> CappedReader:
    """Open a regular file (see :func:`open_regular`) for a reader.

    Raises:
        StudyReadError: a missing, unreadable or not regular file, saying which.
    """
    try:
        handle = open_regular(path)
    except FileNotFoundError as error:
        raise StudyReadError("no such file") from error
    except NotRegularFile as error:
        if Path(path).is_dir():
            raise StudyReadError("is a directory, not a file") from error
        raise StudyReadError(str(error)) from error
    except OSError as error:
        raise StudyReadError(one_line(f"cannot open: {error.strerror or error}")) from error
    return CappedReader(handle.detach(), path)


def sniff_format(path: Path) -> str:
    """Tell DICOM, PNG and JPEG apart by their first bytes.

    Raises:
        StudyReadError: for an empty, unreadable or unrecognised file.
    """
    with open_capped(path) as handle:
        try:
            head = handle.read(132)
        except OSError as error:
            raise StudyReadError(one_line(f"cannot read: {error.strerror or error}")) from error
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
