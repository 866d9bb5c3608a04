"""A fuzz corpus (issue 23): mutated copies of real radiographs are read, or refused with a
one-line reason, within a time bound each, and a batch over them never crashes.

The corpus is built with a fixed seed, into tmp_path, from the real files in ../shared/data
(the smaller DICOM files of several transfer syntaxes, a few NIH PNGs, and the JPEG inside
the SIIM DICOM file); without that folder, from pydicom's and pydicom-data's real DICOM files.
Mutations (each file's name says its source and its mutation):

- DICOM: random bit flips in the header and in the pixel data; truncation at random lengths;
  deletion of data elements (read, delete, save with pydicom: Rows, Columns, BitsAllocated,
  PhotometricInterpretation, TransferSyntaxUID, PixelData...); out-of-range or malformed
  values (Rows 0, Bits Stored 17, a NaN slope, a broken VOI LUT...); corrupt element length
  fields and VR codes in the header bytes; 300 (and 3,000) levels of nested SQ items added to
  a real dataset; damage to the encapsulated pixel data's Basic Offset Table, item tags,
  fragment lengths and sequence delimiter after (7FE0,0010).
- PNG: bit flips in the first bytes and in the image data, truncation, wrong chunk lengths,
  wrong CRCs, out-of-range IHDR fields (with a correct CRC).
- JPEG: bit flips in the markers and in the entropy-coded data, truncation, wrong segment
  lengths, out-of-range SOF fields.

Every file is read in a worker process (a few at a time) with a time limit: a hang fails
the test naming the file and its mutation, and a decoder that kills its process (a segfault,
an abort) is a crash naming the file, not the end of pytest. Then ``cxrtool predict`` runs
over the same folder: exit 0 or 1, a record for every file, no traceback.

A slice (about 80 files, under 2 minutes on 2 busy cores) runs by default; the whole corpus
(over 1,000 files) only with ``pytest -m fuzz`` (see the marker in pyproject.toml). Each run
prints the count of each outcome and reason (``-s`` shows it).
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SHARED_DATA
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.tag import Tag

SEED = 23
SECONDS_PER_FILE = 20  # a file that takes longer is a hang
READERS = 2  # worker processes reading the corpus
WORKER_MEMORY = 4 << 30  # each reader's address space: a runaway allocation fails, not the machine
FULL_VARIANTS = {  # the whole corpus: this many variants of each mutation of each source
    "bitflip-header": 24, "bitflip-pixels": 40, "truncate": 12, "delete": 14, "value": 16, "length": 14,
    "vr": 10, "nested": 3, "fragments": 32,
    "png-bitflip-header": 18, "png-bitflip-data": 10, "png-truncate": 10, "png-chunk-length": 12, "png-crc": 8,
    "png-ihdr": 10,
    "jpeg-bitflip-header": 18, "jpeg-bitflip-data": 10, "jpeg-truncate": 10, "jpeg-segment-length": 12,
    "jpeg-sof": 10,
}

# The real files mutated (the smaller ones, so that the corpus reads fast).
SHARED_DICOM = ("dicom/siim/cxr_pa_jpeg_baseline.dcm", "dicom/wg04/RG3_JPLY.dcm", "dicom/wg04/RG3_J2KI.dcm",
                "dicom/wg04/RG2_JPLY.dcm", "dicom/wg04/RG3_JLSN.dcm", "dicom/wg04/RG3_RLE.dcm")
SHARED_PNG_COUNT = 3  # the smallest NIH PNGs
# Without ../shared: pydicom's and pydicom-data's real files (JPEG 2000, JPEG lossy and
# lossless, RLE, JPEG-LS), the PNG and JPEG made from one of them.
PYDICOM_DICOM = ("RG3_J2KI.dcm", "JPEG-lossy.dcm", "JPEG-LL.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm")


@dataclass(frozen=True)
class Source:
    name: str  # short, for the corpus file names
    kind: str  # "dicom", "png" or "jpeg"
    data: bytes


@dataclass(frozen=True)
class Case:
    file: str  # its name in the corpus folder
    source: str
    mutation: str  # the kind of mutation (e.g. "fragments")
    detail: str  # exactly what was done

    def __str__(self) -> str:
        return f"{self.file} ({self.source}: {self.mutation}: {self.detail})"


# --------------------------------------------------------------------------- sources


def _sources() -> list[Source]:
    if SHARED_DATA.is_dir() and all((SHARED_DATA / name).is_file() for name in SHARED_DICOM):
        return _shared_sources()
    return _pydicom_sources()


def _shared_sources() -> list[Source]:
    sources = [Source("siim" if "siim" in name else Path(name).stem, "dicom", (SHARED_DATA / name).read_bytes())
               for name in SHARED_DICOM]
    pngs = sorted((SHARED_DATA / "nih" / "images").glob("*.png"), key=lambda p: (p.stat().st_size, p.name))
    sources += [Source(f"nih{png.stem}", "png", png.read_bytes()) for png in pngs[:SHARED_PNG_COUNT]]
    # Real JPEGs: the SIIM radiograph's own JPEG baseline codestream, and an NIH radiograph
    # saved as JPEG by Pillow.
    siim = pydicom.dcmread(io.BytesIO(sources[0].data))
    sources.append(Source("siimframe", "jpeg", next(generate_frames(siim.PixelData, number_of_frames=1))))
    if pngs:
        with Image.open(pngs[0]) as png:
            sources.append(Source("nihjpeg", "jpeg", _as_jpeg(png.convert("L"))))
    return sources


def _pydicom_sources() -> list[Source]:
    from pydicom.data import get_testdata_file

    paths = [get_testdata_file(name, download=False) for name in PYDICOM_DICOM]
    found = [Path(path) for path in paths if path]
    if not found:
        pytest.skip(f"no real files to fuzz: neither {SHARED_DATA} (see shared/data/README.md) nor pydicom's test files")
    sources = [Source(path.stem.replace("_", "").replace("-", ""), "dicom", path.read_bytes()) for path in found]
    from cxrtool.io.studies import read_study

    picture = Image.fromarray((read_study(found[0]).pixels[::4, ::4] * 255).astype(np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    sources += [Source("png", "png", buffer.getvalue()), Source("jpeg", "jpeg", _as_jpeg(picture))]
    return sources


def _as_jpeg(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --------------------------------------------------------------------------- DICOM bytes

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM, _ITEM_END, _SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0"
_PIXEL_DATA = (0x7FE0, 0x0010)


@dataclass(frozen=True)
class Element:
    tag: tuple[int, int]
    offset: int  # of the tag
    vr: bytes
    length_offset: int
    length_size: int  # 2 or 4
    length: int
    value_offset: int


def _elements(data: bytes) -> list[Element]:
    """The top-level explicit-VR little-endian elements, file meta included, up to Pixel Data."""
    position = 132 if data[128:132] == b"DICM" else 0
    found = []
    while position + 8 <= len(data):
        group, number = struct.unpack_from("<HH", data, position)
        vr = data[position + 4 : position + 6]
        if vr in _LONG_VRS:
            length_offset, size = position + 8, 4
        elif len(vr) == 2 and vr.isalpha() and vr.isupper():
            length_offset, size = position + 6, 2
        else:
            break  # implicit VR from here on: only what came before is listed
        length = int.from_bytes(data[length_offset : length_offset + size], "little")
        element = Element((group, number), position, vr, length_offset, size, length, length_offset + size)
        found.append(element)
        if (group, number) == _PIXEL_DATA:
            break
        if length == 0xFFFFFFFF:  # an undefined-length sequence: skip past its delimiter
            end = _skip_undefined(data, element.value_offset)
            if end is None:
                break
            position = end
        else:
            position = element.value_offset + length
    return found


def _skip_undefined(data: bytes, position: int) -> int | None:
    """Where the undefined-length sequence whose items start at ``position`` ends."""
    depth = 1  # open sequences and undefined-length items
    while position + 8 <= len(data):
        tag = data[position : position + 4]
        if tag in (_SEQUENCE_END, _ITEM_END):
            depth, position = depth - 1, position + 8
            if depth == 0:
                return position
            continue
        if tag == _ITEM:
            length = struct.unpack_from("<I", data, position + 4)[0]
            position += 8
            if length == 0xFFFFFFFF:
                depth += 1
            else:
                position += length
            continue
        vr = data[position + 4 : position + 6]  # an element inside an undefined-length item
        if vr in _LONG_VRS:
            length, position = struct.unpack_from("<I", data, position + 8)[0], position + 12
        else:
            length, position = struct.unpack_from("<H", data, position + 6)[0], position + 8
        if length == 0xFFFFFFFF:
            depth += 1
        else:
            position += length
    return None


def _pixel_element(data: bytes) -> Element | None:
    elements = _elements(data)
    return elements[-1] if elements and elements[-1].tag == _PIXEL_DATA else None


def _fragment_items(data: bytes, start: int) -> list[tuple[int, bytes, int]]:
    """(offset, tag, length) of each item of encapsulated Pixel Data, the delimiter last."""
    items, position = [], start
    while position + 8 <= len(data):
        tag, length = data[position : position + 4], struct.unpack_from("<I", data, position + 4)[0]
        items.append((position, tag, length))
        if tag != _ITEM:
            break
        position += 8 + length
    return items


def _header_end(data: bytes) -> int:
    pixel = _pixel_element(data)
    return pixel.offset + 12 if pixel else min(len(data), 4096)


def _flip_bits(data: bytes, rng: np.random.Generator, low: int, high: int, most: int = 8) -> tuple[bytes, str]:
    out = bytearray(data)
    flips = []
    for _ in range(int(rng.integers(1, most + 1))):
        position, bit = int(rng.integers(low, max(low + 1, high))), int(rng.integers(0, 8))
        out[position] ^= 1 << bit
        flips.append(f"0x{position:x}.{bit}")
    return bytes(out), "bits flipped at " + ", ".join(flips)


def _truncate(data: bytes, rng: np.random.Generator, header_end: int) -> tuple[bytes, str]:
    # Half of the cuts in the header (it is small next to the pixel data), half anywhere.
    end = header_end if rng.random() < 0.5 else len(data)
    cut = int(rng.integers(0, end))
    return data[:cut], f"cut at byte {cut} of {len(data)}"


def _with_validation_off(change: Callable[[], bytes]) -> bytes:
    settings = pydicom.config.settings
    reading, writing = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Unknown encoding 'ISO_IR 999'": on purpose
            return change()
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = reading, writing


def _saved(ds: Dataset) -> bytes:
    """The dataset written in the encoding it was read in, whatever its file meta now says."""
    buffer = io.BytesIO()
    implicit, little = ds.original_encoding
    pydicom.dcmwrite(buffer, ds, implicit_vr=implicit, little_endian=little, force_encoding=True)
    return buffer.getvalue()


_DELETED = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PhotometricInterpretation", "TransferSyntaxUID",
            "PixelData", "SamplesPerPixel", "PixelRepresentation", "HighBit", "SOPClassUID", "WindowWidth")


def _delete(data: bytes, rng: np.random.Generator, index: int) -> tuple[bytes, str]:
    names: list[str] = []

    def change() -> bytes:
        ds = pydicom.dcmread(io.BytesIO(data))
        if index < len(_DELETED):
            names.append(_DELETED[index])
        else:  # two random elements of the dataset
            keywords = [element.keyword or str(element.tag) for element in ds]
            names.extend(keywords[int(i)] for i in rng.choice(len(keywords), size=min(2, len(keywords)), replace=False))
        for name in names:
            owner = ds.file_meta if name == "TransferSyntaxUID" else ds
            tag = Tag(name) if not name.startswith("(") else Tag(int(name[1:5], 16), int(name[6:10], 16))
            if tag in owner:
                del owner[tag]
        return _saved(ds)

    return _with_validation_off(change), "deleted " + ", ".join(names)


def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    if len(value) % 2:
        value += b"\x00" if vr in ("OB", "UI", "US", "SS") else b" "
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _lut_item(descriptor: tuple[int, int, int], lut: bytes) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = list(descriptor)
    item.LUTData = lut
    return item


# (what, [(tag, VR, value bytes) or (keyword, python value)]): each replaces or adds those elements.
_US = lambda value: struct.pack("<H", value)  # noqa: E731
_VALUES: list[tuple[str, list[tuple]]] = [
    ("Rows 0", [(0x00280010, "US", _US(0))]),
    ("Columns 1", [(0x00280011, "US", _US(1))]),
    ("Rows 65535", [(0x00280010, "US", _US(65535))]),
    ("Rows and Columns 9000", [(0x00280010, "US", _US(9000)), (0x00280011, "US", _US(9000))]),
    ("Rows and Columns 65535", [(0x00280010, "US", _US(65535)), (0x00280011, "US", _US(65535))]),
    ("Bits Allocated 0", [(0x00280100, "US", _US(0))]),
    ("Bits Allocated 7", [(0x00280100, "US", _US(7))]),
    ("Bits Allocated 12", [(0x00280100, "US", _US(12))]),
    ("Bits Allocated 64", [(0x00280100, "US", _US(64))]),
    ("Bits Allocated 1", [(0x00280100, "US", _US(1))]),
    ("Bits Stored 0", [(0x00280101, "US", _US(0))]),
    ("Bits Stored 17", [(0x00280101, "US", _US(17))]),
    ("Bits Stored 255", [(0x00280101, "US", _US(255))]),
    ("High Bit 99", [(0x00280102, "US", _US(99))]),
    ("Pixel Representation 1", [(0x00280103, "US", _US(1))]),
    ("Pixel Representation 7", [(0x00280103, "US", _US(7))]),
    ("Samples per Pixel 0", [(0x00280002, "US", _US(0))]),
    ("Samples per Pixel 3", [(0x00280002, "US", _US(3))]),
    ("Samples per Pixel 3, planar", [(0x00280002, "US", _US(3)), (0x00280006, "US", _US(1))]),
    ("Samples per Pixel 4", [(0x00280002, "US", _US(4))]),
    ("Photometric MONOCHROME3", [(0x00280004, "CS", b"MONOCHROME3")]),
    ("Photometric empty", [(0x00280004, "CS", b"")]),
    ("Photometric RGB", [(0x00280004, "CS", b"RGB")]),
    ("Photometric YBR_FULL_422", [(0x00280004, "CS", b"YBR_FULL_422")]),
    ("Photometric PALETTE COLOR without LUT", [(0x00280004, "CS", b"PALETTE COLOR")]),
    ("Photometric control bytes", [(0x00280004, "CS", b"\x00\x01\x1b[2J\n")]),
    ("Number of Frames 2", [(0x00280008, "IS", b"2")]),
    ("Number of Frames 0", [(0x00280008, "IS", b"0")]),
    ("Number of Frames -1", [(0x00280008, "IS", b"-1")]),
    ("Number of Frames 10^9", [(0x00280008, "IS", b"1000000000")]),
    ("Number of Frames x", [(0x00280008, "IS", b"x")]),
    ("Rescale Slope NaN", [(0x00281053, "DS", b"NaN")]),
    ("Rescale Slope 1e400", [(0x00281053, "DS", b"1e400")]),
    ("Rescale Slope 0", [(0x00281053, "DS", b"0")]),
    ("Rescale Slope abc", [(0x00281053, "DS", b"abc")]),
    ("Rescale Intercept -inf", [(0x00281052, "DS", b"-inf")]),
    ("Window Width 0", [(0x00281051, "DS", b"0")]),
    ("Window Width -5", [(0x00281051, "DS", b"-5")]),
    ("Window Width 1e308", [(0x00281051, "DS", b"1e308")]),
    ("Window Center NaN", [(0x00281050, "DS", b"NaN")]),
    ("Window Center abc", [(0x00281050, "DS", b"abc")]),
    ("Window Center empty", [(0x00281050, "DS", b"")]),
    ("SIGMOID with Window Width 1e-30", [(0x00281056, "CS", b"SIGMOID"), (0x00281051, "DS", b"1e-30")]),
    ("Pixel Spacing abc\\-1", [(0x00280030, "DS", b"abc\\-1")]),
    ("Pixel Spacing 0\\0", [(0x00280030, "DS", b"0\\0")]),
    ("View Position bytes", [(0x00185101, "CS", b"\xff\xfe\x00")]),
    ("Specific Character Set ISO_IR 999", [(0x00080005, "CS", b"ISO_IR 999"), (0x00100010, "PN", b"\xe9\xff\xfe")]),
    ("Pixel Padding Value 65535", [(0x00280120, "US", _US(65535))]),
    ("VOI LUT with 99 bits and short data", [("VOILUTSequence", [_lut_item((4096, 0, 99), b"\x01\x00" * 10)])]),
    ("VOI LUT without entries", [("VOILUTSequence", [_lut_item((0, 0, 16), b"")])]),
    ("Modality LUT with short data", [("ModalityLUTSequence", [_lut_item((4096, 0, 16), b"\x01\x00" * 3)])]),
    ("empty VOI LUT item", [("VOILUTSequence", [Dataset()])]),
    ("Transfer Syntax UID not a UID", [("TransferSyntaxUID", "1.2.840.10008.1.2.4.9x")]),
    ("Transfer Syntax UID unknown", [("TransferSyntaxUID", "1.2.3.4")]),
    ("Transfer Syntax UID explicit VR big endian", [("TransferSyntaxUID", "1.2.840.10008.1.2.2")]),
    ("Transfer Syntax UID deflated", [("TransferSyntaxUID", "1.2.840.10008.1.2.1.99")]),
    ("Transfer Syntax UID JPEG 2000 for JPEG", [("TransferSyntaxUID", "1.2.840.10008.1.2.4.90")]),
    ("Transfer Syntax UID RLE", [("TransferSyntaxUID", "1.2.840.10008.1.2.5")]),
    ("Transfer Syntax UID uncompressed", [("TransferSyntaxUID", "1.2.840.10008.1.2.1")]),
]


def _value(data: bytes, rng: np.random.Generator, index: int) -> tuple[bytes, str]:
    what, changes = _VALUES[index % len(_VALUES)] if index < len(_VALUES) else _VALUES[int(rng.integers(len(_VALUES)))]

    def change() -> bytes:
        ds = pydicom.dcmread(io.BytesIO(data))
        for item in changes:
            if len(item) == 3:
                tag, vr, value = item
                ds._dict[Tag(tag)] = _raw(tag, vr, value)
            elif item[0] == "TransferSyntaxUID":
                ds.file_meta.TransferSyntaxUID = item[1]
            else:
                setattr(ds, item[0], item[1])
        return _saved(ds)

    return _with_validation_off(change), what


def _length(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    elements = _elements(data)
    element = elements[int(rng.integers(len(elements)))]
    top = (1 << (8 * element.length_size)) - 1
    choices = [0, 1, element.length + 1, max(0, element.length - 1), top, top - 1, top // 2,
               len(data) - element.value_offset + 2, int(rng.integers(0, top + 1))]
    new = min(top, int(choices[int(rng.integers(len(choices)))]))
    out = bytearray(data)
    out[element.length_offset : element.length_offset + element.length_size] = new.to_bytes(element.length_size, "little")
    tag = "({:04X},{:04X})".format(*element.tag)
    return bytes(out), f"length of {tag} {element.vr.decode()} at 0x{element.length_offset:x}: {element.length} -> {new}"


_OTHER_VRS = (b"SQ", b"OB", b"UN", b"UT", b"US", b"DS", b"FD", b"AT", b"\x00\x00", b"  ", b"\xff\xff", b"xx", b"ZZ")


def _vr(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    elements = _elements(data)
    element = elements[int(rng.integers(len(elements)))]
    new = _OTHER_VRS[int(rng.integers(len(_OTHER_VRS)))]
    if rng.random() < 0.3:
        new = bytes(rng.integers(65, 91, 2, dtype=np.uint8))  # a random pair of capitals
    out = bytearray(data)
    out[element.offset + 4 : element.offset + 6] = new
    tag = "({:04X},{:04X})".format(*element.tag)
    return bytes(out), f"VR of {tag} at 0x{element.offset + 4:x}: {element.vr!r} -> {new!r}"


_NESTED = ((300, False), (300, True), (3000, False))  # (levels, defined lengths)


def _nested(data: bytes, index: int) -> tuple[bytes, str]:
    """``levels`` of Referenced Image Sequence items inside each other, before the first
    top-level element that sorts after (0008,1140)."""
    levels, defined = _NESTED[index % len(_NESTED)]
    tag = struct.pack("<HH", 0x0008, 0x1140)
    inner = b""
    for _ in range(levels):
        if defined:
            item = _ITEM + struct.pack("<I", len(inner)) + inner
            inner = tag + b"SQ\x00\x00" + struct.pack("<I", len(item)) + item
        else:
            item = _ITEM + b"\xff\xff\xff\xff" + inner + _ITEM_END + b"\x00" * 4
            inner = tag + b"SQ\x00\x00\xff\xff\xff\xff" + item + _SEQUENCE_END + b"\x00" * 4
    after = next(e for e in _elements(data) if e.tag > (0x0008, 0x1140))
    lengths = "defined" if defined else "undefined"
    return data[: after.offset] + inner + data[after.offset :], f"{levels} levels of SQ items ({lengths} lengths) added"


_FRAGMENT_DAMAGE = ("bot-length-huge", "bot-length-odd", "bot-bogus-offsets", "item-tag-random", "item-tag-delimiter",
                    "item-tag-item-end", "fragment-length-long", "fragment-length-huge", "fragment-length-short",
                    "fragment-length-odd", "fragment-length-zero", "split-fragment", "extra-garbage-fragment",
                    "no-delimiter", "delimiter-first", "defined-pixel-length")


def _fragments(data: bytes, rng: np.random.Generator, index: int) -> tuple[bytes, str] | None:
    pixel = _pixel_element(data)
    if pixel is None or pixel.length != 0xFFFFFFFF:
        return None  # not encapsulated
    items = _fragment_items(data, pixel.value_offset)
    if len(items) < 3:
        return None
    damage = _FRAGMENT_DAMAGE[index % len(_FRAGMENT_DAMAGE)]
    out = bytearray(data)
    (bot, _, bot_length), (first, _, first_length) = items[0], items[1]
    last = items[-1][0] if items[-1][1] == _SEQUENCE_END else len(data)

    def set_length(offset: int, value: int) -> None:
        out[offset + 4 : offset + 8] = struct.pack("<I", value & 0xFFFFFFFF)

    if damage == "bot-length-huge":
        set_length(bot, 0xFFFFFFF0)
    elif damage == "bot-length-odd":
        set_length(bot, 3)
    elif damage == "bot-bogus-offsets":
        table = struct.pack("<II", 0, 0xFFFFFF00) if rng.random() < 0.5 else struct.pack("<I", int(rng.integers(1, 1 << 31)))
        out[bot : bot + 8 + bot_length] = _ITEM + struct.pack("<I", len(table)) + table
    elif damage == "item-tag-random":
        out[first : first + 4] = bytes(rng.integers(0, 256, 4, dtype=np.uint8))
    elif damage == "item-tag-delimiter":
        out[first : first + 4] = _SEQUENCE_END
    elif damage == "item-tag-item-end":
        out[first : first + 4] = _ITEM_END
    elif damage == "fragment-length-long":
        set_length(first, first_length + int(rng.integers(2, 1 << 20)) * 2)
    elif damage == "fragment-length-huge":
        set_length(first, 0xFFFFFFFE)
    elif damage == "fragment-length-short":
        set_length(first, (first_length // 2) & ~1)
    elif damage == "fragment-length-odd":
        set_length(first, first_length - 1)
    elif damage == "fragment-length-zero":
        set_length(first, 0)
    elif damage == "split-fragment":  # valid DICOM: one frame in two fragments
        cut = first + 8 + (int(rng.integers(1, max(2, first_length // 2))) & ~1)
        end = first + 8 + first_length
        out[first:end] = (_ITEM + struct.pack("<I", cut - first - 8) + data[first + 8 : cut]
                          + _ITEM + struct.pack("<I", end - cut) + data[cut:end])
    elif damage == "extra-garbage-fragment":
        garbage = bytes(rng.integers(0, 256, int(rng.integers(1, 200)) * 2, dtype=np.uint8))
        out[last:last] = _ITEM + struct.pack("<I", len(garbage)) + garbage
    elif damage == "no-delimiter":
        del out[last:]
    elif damage == "delimiter-first":
        out[first:first] = _SEQUENCE_END + b"\x00" * 4
    elif damage == "defined-pixel-length":
        out[pixel.length_offset : pixel.length_offset + 4] = struct.pack("<I", (len(data) - pixel.value_offset) & ~1)
    return bytes(out), damage


def _mutate_dicom(data: bytes, mutation: str, rng: np.random.Generator, index: int) -> tuple[bytes, str] | None:
    header_end = _header_end(data)
    if mutation == "bitflip-header":
        return _flip_bits(data, rng, 132, header_end)
    if mutation == "bitflip-pixels":
        return _flip_bits(data, rng, header_end, len(data))
    if mutation == "truncate":
        return _truncate(data, rng, header_end)
    if mutation == "delete":
        return _delete(data, rng, index)
    if mutation == "value":
        return _value(data, rng, index * 4 + int(rng.integers(4)))  # spread the variants over the list
    if mutation == "length":
        return _length(data, rng)
    if mutation == "vr":
        return _vr(data, rng)
    if mutation == "nested":
        return _nested(data, index)
    if mutation == "fragments":
        return _fragments(data, rng, index)
    raise AssertionError(mutation)


# --------------------------------------------------------------------------- PNG and JPEG bytes


def _png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, length) of each chunk."""
    chunks, position = [], 8
    while position + 12 <= len(data):
        length = struct.unpack_from(">I", data, position)[0]
        chunks.append((position, data[position + 4 : position + 8], length))
        position += 12 + length
    return chunks


def _mutate_png(data: bytes, mutation: str, rng: np.random.Generator, index: int) -> tuple[bytes, str]:
    chunks = _png_chunks(data)
    out = bytearray(data)
    if mutation == "png-bitflip-header":
        return _flip_bits(data, rng, 0, 64, most=3)
    if mutation == "png-bitflip-data":
        idat = [c for c in chunks if c[1] == b"IDAT"]
        offset, _, length = idat[int(rng.integers(len(idat)))]
        return _flip_bits(data, rng, offset + 8, offset + 8 + length, most=4)
    if mutation == "png-truncate":
        return _truncate(data, rng, 200)
    offset, kind, length = chunks[int(rng.integers(len(chunks)))] if index else chunks[0]
    if mutation == "png-chunk-length":
        new = int([0, 1, length + 1, max(0, length - 1), 0x7FFFFFFF, 0xFFFFFFFF, int(rng.integers(0, 1 << 32))][
            int(rng.integers(7))])
        out[offset : offset + 4] = struct.pack(">I", new)
        return bytes(out), f"length of {kind.decode('latin-1')} at 0x{offset:x}: {length} -> {new}"
    if mutation == "png-crc":
        crc = offset + 8 + length
        out[crc : crc + 4] = bytes(rng.integers(0, 256, 4, dtype=np.uint8))
        return bytes(out), f"CRC of {kind.decode('latin-1')} at 0x{crc:x} replaced"
    if mutation == "png-ihdr":  # out-of-range fields, with a correct CRC: only the values are wrong
        fields = [("width", 16, ">I", [0, 1, 0x7FFFFFFF, 100000]), ("height", 20, ">I", [0, 1, 0x7FFFFFFF, 100000]),
                  ("bit depth", 24, ">B", [0, 3, 7, 16, 17, 255]), ("colour type", 25, ">B", [1, 5, 7, 255]),
                  ("compression", 26, ">B", [1, 255]), ("filter", 27, ">B", [1]), ("interlace", 28, ">B", [1, 2])]
        name, at, fmt, values = fields[index % len(fields)]
        value = values[int(rng.integers(len(values)))]
        struct.pack_into(fmt, out, at, value)
        struct.pack_into(">I", out, 29, zlib.crc32(bytes(out[12:29])))
        return bytes(out), f"IHDR {name} {value} (CRC recomputed)"
    raise AssertionError(mutation)


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, marker, length) of each marker segment up to and including the first SOS."""
    segments, position = [], 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        length = struct.unpack_from(">H", data, position + 2)[0]
        segments.append((position, marker, length))
        if marker == 0xDA:
            break
        position += 2 + length
    return segments


def _mutate_jpeg(data: bytes, mutation: str, rng: np.random.Generator, index: int) -> tuple[bytes, str]:
    segments = _jpeg_segments(data)
    scan = segments[-1][0] + 2 + segments[-1][2]
    out = bytearray(data)
    if mutation == "jpeg-bitflip-header":
        return _flip_bits(data, rng, 0, scan, most=3)
    if mutation == "jpeg-bitflip-data":
        return _flip_bits(data, rng, scan, len(data), most=4)
    if mutation == "jpeg-truncate":
        return _truncate(data, rng, scan)
    if mutation == "jpeg-segment-length":
        offset, marker, length = segments[int(rng.integers(len(segments)))]
        new = int([0, 1, 2, length + 1, max(0, length - 1), 0xFFFF, int(rng.integers(0, 1 << 16))][int(rng.integers(7))])
        struct.pack_into(">H", out, offset + 2, new)
        return bytes(out), f"length of marker FF{marker:02X} at 0x{offset:x}: {length} -> {new}"
    if mutation == "jpeg-sof":
        sof = next(s for s in segments if s[1] in (0xC0, 0xC1, 0xC2))
        fields = [("precision", 4, ">B", [0, 1, 12, 16, 255]), ("height", 5, ">H", [0, 1, 65535]),
                  ("width", 7, ">H", [0, 1, 65535]), ("components", 9, ">B", [0, 2, 4, 255])]
        name, at, fmt, values = fields[index % len(fields)]
        value = values[int(rng.integers(len(values)))]
        struct.pack_into(fmt, out, sof[0] + at, value)
        return bytes(out), f"SOF {name} {value}"
    raise AssertionError(mutation)


# --------------------------------------------------------------------------- the corpus

_MUTATIONS = {
    "dicom": ("bitflip-header", "bitflip-pixels", "truncate", "delete", "value", "length", "vr", "nested", "fragments"),
    "png": ("png-bitflip-header", "png-bitflip-data", "png-truncate", "png-chunk-length", "png-crc", "png-ihdr"),
    "jpeg": ("jpeg-bitflip-header", "jpeg-bitflip-data", "jpeg-truncate", "jpeg-segment-length", "jpeg-sof"),
}
_SUFFIX = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg"}


def full_corpus(source_number: int, mutation: str) -> range:
    return range(FULL_VARIANTS[mutation])


def corpus_slice(source_number: int, mutation: str) -> list[int]:
    """One variant of each mutation of each source, a different one from source to source:
    a part of the full corpus."""
    return [source_number % FULL_VARIANTS[mutation]]


def build_corpus(folder: Path, sources: list[Source], variants: Callable[[int, str], Iterable[int]]) -> list[Case]:
    """Write the mutated files into ``folder``; the same seed gives the same files, and a
    variant is the same file whether it is built in the slice or in the full corpus."""
    folder.mkdir(parents=True, exist_ok=True)
    mutate = {"dicom": _mutate_dicom, "png": _mutate_png, "jpeg": _mutate_jpeg}
    cases = []
    for source_number, source in enumerate(sources):
        for mutation_number, mutation in enumerate(_MUTATIONS[source.kind]):
            for index in variants(source_number, mutation):
                rng = np.random.default_rng([SEED, source_number, mutation_number, index])
                made = mutate[source.kind](source.data, mutation, rng, index)
                if made is None:
                    continue  # e.g. fragment damage for native pixel data
                data, detail = made
                name = f"{source.name}__{mutation}__{index:03d}{_SUFFIX[source.kind]}"
                (folder / name).write_bytes(data)
                cases.append(Case(name, source.name, mutation, detail))
    return cases


# --------------------------------------------------------------------------- reading in workers

# A reader: one path per line in, one JSON answer per line out (on a copy of stdout: what a
# decoder prints goes to stderr, never into the answers).
_READER = r"""
import json, os, resource, sys, traceback
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
answers = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
import numpy as np
from cxrtool.io.studies import StudyReadError, read_study
for line in sys.stdin:
    try:
        pixels = read_study(line.rstrip("\n")).pixels
        fine = (pixels.dtype == np.float32 and pixels.ndim == 2 and bool(np.isfinite(pixels).all())
                and float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0)
        answer = {"status": "read"} if fine else {
            "status": "error", "detail": f"pixels not float32 (H, W) in [0, 1]: {pixels.dtype} {pixels.shape}"}
    except StudyReadError as error:
        answer = {"status": "refused", "reason": str(error)}
    except BaseException as error:  # what the fuzzing looks for: anything but a reason
        answer = {"status": "error", "detail": "".join(traceback.format_exception(error))[-3000:]}
    answers.write(json.dumps(answer) + "\n")
"""


class _Reader:
    def __init__(self, logs: Path) -> None:
        self.log = tempfile.NamedTemporaryFile(dir=logs, prefix="reader-", suffix=".log", delete=False)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        self.process = subprocess.Popen([sys.executable, "-c", _READER, str(WORKER_MEMORY)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, env=env)
        self.buffer = b""
        self.case: Case | None = None
        self.deadline = 0.0

    def send(self, case: Case, folder: Path) -> None:
        self.case, self.deadline, self.buffer = case, time.monotonic() + SECONDS_PER_FILE, b""
        self.process.stdin.write(f"{folder / case.file}\n".encode())
        self.process.stdin.flush()

    def stderr_tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-1500:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()


def read_corpus(folder: Path, cases: list[Case], logs: Path) -> dict[str, dict]:
    """Each case's answer: read, refused (with its reason), error, crash or hang."""
    results: dict[str, dict] = {}
    waiting = list(reversed(cases))
    readers = [_Reader(logs) for _ in range(min(READERS, len(cases)))]
    busy: dict[int, _Reader] = {}
    try:
        while waiting or busy:
            for reader in readers:
                if reader.case is None and waiting:
                    reader.send(waiting.pop(), folder)
                    busy[reader.process.stdout.fileno()] = reader
            timeout = max(0.0, min(r.deadline for r in busy.values()) - time.monotonic())
            ready, _, _ = select.select(list(busy), [], [], timeout)
            for descriptor in ready:
                reader = busy[descriptor]
                chunk = os.read(descriptor, 65536)
                if chunk:
                    reader.buffer += chunk
                    if reader.buffer.endswith(b"\n"):
                        results[reader.case.file] = json.loads(reader.buffer)
                        reader.case = None
                        del busy[descriptor]
                    continue
                # The reader died on this file: a decoder crashed the process.
                code = reader.process.wait()
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
                results[reader.case.file] = {"status": "crash", "detail": f"the reading process died ({how}): "
                                                                          f"{reader.stderr_tail()}"}
                readers[readers.index(reader)] = _restart(reader, busy, descriptor, logs)
            now = time.monotonic()
            for descriptor, reader in list(busy.items()):
                if reader.deadline <= now:
                    results[reader.case.file] = {"status": "hang", "detail": f"no answer in {SECONDS_PER_FILE} s"}
                    readers[readers.index(reader)] = _restart(reader, busy, descriptor, logs)
    finally:
        for reader in readers:
            reader.stop()
    return results


def _restart(reader: _Reader, busy: dict[int, _Reader], descriptor: int, logs: Path) -> _Reader:
    del busy[descriptor]
    reader.stop()
    return _Reader(logs)


# --------------------------------------------------------------------------- checks


def _category(reason: str) -> str:
    """A reason without its details: what the summary counts."""
    head = re.split(r"[:(]", reason, maxsplit=1)[0]
    return re.sub(r"\s*'.*", "", head).strip() or reason[:60]


def _problems(cases: list[Case], results: dict[str, dict]) -> list[str]:
    problems = []
    for case in cases:
        result = results.get(case.file, {"status": "error", "detail": "no answer"})
        status = result["status"]
        if status in ("error", "crash", "hang"):
            problems.append(f"{case}: {status}: {result.get('detail', '')}")
        elif status == "refused":
            reason = result["reason"]
            if not reason.strip() or "\n" in reason or "\r" in reason or "Traceback" in reason or len(reason) > 500:
                problems.append(f"{case}: a reason that is not one line: {reason!r}")
    return problems


def _summary(title: str, cases: list[Case], results: dict[str, dict], seconds: float) -> str:
    outcomes = Counter(results.get(case.file, {}).get("status", "none") for case in cases)
    reasons = Counter(_category(results[case.file]["reason"]) for case in cases
                      if results.get(case.file, {}).get("status") == "refused")
    by_mutation = Counter((case.mutation, results.get(case.file, {}).get("status", "none")) for case in cases)
    lines = [f"{title}: {len(cases)} files from {len({c.source for c in cases})} sources read in {seconds:.1f} s "
             f"({READERS} readers, {SECONDS_PER_FILE} s limit each): "
             + ", ".join(f"{count} {status}" for status, count in outcomes.most_common())]
    lines += [f"  {count:5d}  {reason}" for reason, count in reasons.most_common()]
    lines.append("  by mutation: " + "; ".join(
        f"{mutation} " + "/".join(f"{by_mutation[(mutation, s)]} {s}" for s in ("read", "refused", "error", "crash", "hang")
                                  if by_mutation[(mutation, s)])
        for mutation in dict.fromkeys(case.mutation for case in cases)))
    return "\n".join(lines)


def _predict(folder: Path, out: Path, checkpoint: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CXRTOOL_NO_PROGRESS": "1"}
    command = [sys.executable, "-m", "cxrtool", "predict", str(folder), "-m", str(checkpoint), "-j", "2", "--jsonl",
               "--out", str(out)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _check_corpus(tmp_path: Path, checkpoint: Path, variants: Callable[[int, str], Iterable[int]], title: str,
                  predict_timeout: float) -> None:
    folder, logs = tmp_path / "corpus", tmp_path / "logs"
    logs.mkdir()
    cases = build_corpus(folder, _sources(), variants)
    assert len({case.file for case in cases}) == len(cases)

    start = time.perf_counter()
    results = read_corpus(folder, cases, logs)
    seconds = time.perf_counter() - start
    print("\n" + _summary(title, cases, results, seconds))
    problems = _problems(cases, results)
    assert not problems, f"{len(problems)} of {len(cases)} files not read nor refused with a one-line reason:\n" + \
        "\n".join(problems)

    # The whole batch: predict over the corpus scores or fails each file, and never crashes.
    start = time.perf_counter()
    result = _predict(folder, tmp_path / "out", checkpoint, predict_timeout)
    print(f"{title}: cxrtool predict -j 2 over the corpus: exit {result.returncode} in {time.perf_counter() - start:.1f} s")
    assert result.returncode in (0, 1), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    by_name = {Path(record["path"]).name: record for record in records}
    assert set(by_name) == {case.file for case in cases}, (
        f"records missing for {sorted({c.file for c in cases} - set(by_name))[:10]}, "
        f"unexpected {sorted(set(by_name) - {c.file for c in cases})[:10]}")
    for case in cases:
        record = by_name[case.file]
        assert record["status"] in ("predicted", "failed"), (case, record)
        if record["status"] == "failed":
            assert record["error"] and "\n" not in record["error"] and "Traceback" not in record["error"], (case, record)
    # What the reader refused, predict fails with the same reason (and what it read, it scores).
    for case in cases:
        if results[case.file]["status"] == "refused":
            assert by_name[case.file]["status"] == "failed", (case, by_name[case.file])


def test_fuzz_slice_is_read_or_refused_and_never_crashes_the_batch(tmp_path, make_checkpoint):
    """The default slice: one variant of each mutation of each source (about 80 files)."""
    _check_corpus(tmp_path, make_checkpoint(), corpus_slice, "fuzz slice", predict_timeout=240)


@pytest.mark.fuzz
@pytest.mark.timeout(3600)
def test_fuzz_full_corpus_is_read_or_refused_and_never_crashes_the_batch(tmp_path, make_checkpoint):
    """The whole corpus (over 1,000 files): only with ``pytest -m fuzz``."""
    _check_corpus(tmp_path, make_checkpoint(), full_corpus, "fuzz corpus", predict_timeout=1800)


def test_the_corpus_is_the_same_for_the_same_seed(tmp_path):
    sources = _sources()
    first = build_corpus(tmp_path / "a", sources, corpus_slice)
    second = build_corpus(tmp_path / "b", sources, corpus_slice)
    assert first == second
    assert all((tmp_path / "a" / c.file).read_bytes() == (tmp_path / "b" / c.file).read_bytes() for c in first)
    # Every mutation made files, and each changed its source.
    kinds = {source.kind for source in sources}
    assert {c.mutation for c in first} == {m for kind in kinds for m in _MUTATIONS[kind]}
    originals = {source.name: source.data for source in sources}
    assert all((tmp_path / "a" / c.file).read_bytes() != originals[c.source] for c in first)


# --------------------------------------------------------------------------- what the fuzzing found


def test_what_the_fuzzing_found_is_refused_with_its_reason(tmp_path):
    """Each defect the full corpus showed once, on pydicom's own JPEG 2000 file (always
    installed) and a PNG, read in a worker with the corpus's memory limit."""
    from pydicom.data import get_testdata_file

    j2k = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    version = next(e for e in _elements(j2k) if e.tag == (0x0002, 0x0001))  # File Meta Information Version, OB
    samples = next(e for e in _elements(j2k) if e.tag == (0x0028, 0x0002))
    picture = io.BytesIO()
    # Noise does not compress: several 64 KiB IDAT chunks, of which the second lies.
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8)).save(picture, format="PNG")
    png = bytearray(picture.getvalue())
    idat = [offset for offset, kind, _ in _png_chunks(bytes(png)) if kind == b"IDAT"][1]
    struct.pack_into(">I", png, idat, 0xFFFFFFFF)
    big_length, wrong_vr = bytearray(j2k), bytearray(j2k)
    struct.pack_into("<I", big_length, version.length_offset, 0xFFFFFFF0)
    wrong_vr[samples.offset + 4 : samples.offset + 6] = b"FD"
    expected = {
        # A chunk or element length of 4 GiB: Pillow and pydicom asked read() for all of it (a
        # MemoryError under a memory limit); now the read is capped at the end of the file.
        "idat-length-4gib.png": (bytes(png), r"^truncated or corrupt image"),
        "element-length-4gib.dcm": (bytes(big_length), r"^(invalid or corrupt DICOM header|truncated)"),
        # 300 levels of nested sequences: pydicom's RecursionError, now a reason that says so.
        "nested-300.dcm": (_nested(j2k, 0)[0], r"sequences nested too deeply to read"),
        # Samples per Pixel's VR corrupted into FD: pydicom's BytesLengthException went up raw.
        "samples-vr-fd.dcm": (bytes(wrong_vr), r"^invalid or corrupt DICOM header: BytesLengthException"),
        # No Transfer Syntax UID for compressed pixel data: was "only N of M bytes of native
        # pixel data present", which misleads.
        "no-transfer-syntax.dcm": (_delete(j2k, np.random.default_rng(0), _DELETED.index("TransferSyntaxUID"))[0],
                                   r"compressed \(encapsulated\) but the file meta has no Transfer Syntax UID"),
    }
    folder, logs = tmp_path / "found", tmp_path / "logs"
    folder.mkdir()
    logs.mkdir()
    for name, (data, _) in expected.items():
        (folder / name).write_bytes(data)
    cases = [Case(name, "regression", "found", name) for name in expected]
    results = read_corpus(folder, cases, logs)
    for name, (_, reason) in expected.items():
        assert results[name]["status"] == "refused", (name, results[name])
        assert re.search(reason, results[name]["reason"]), (name, results[name]["reason"])


def test_a_corrupt_offset_table_of_a_single_frame_is_ignored(tmp_path):
    """All the fragments of a single-frame image are its frame, whatever the Basic Offset
    Table says: a table with a bogus offset made the frame undecodable."""
    from pydicom.data import get_testdata_file

    from cxrtool.io.studies import read_study

    original = Path(get_testdata_file("JPEG2000.dcm"))
    data = original.read_bytes()
    pixel = _pixel_element(data)
    bot, _, length = _fragment_items(data, pixel.value_offset)[0]
    table = struct.pack("<I", 12345)
    (tmp_path / "bogus.dcm").write_bytes(data[:bot] + _ITEM + struct.pack("<I", len(table)) + table + data[bot + 8 + length :])
    np.testing.assert_array_equal(read_study(tmp_path / "bogus.dcm").pixels, read_study(original).pixels)
