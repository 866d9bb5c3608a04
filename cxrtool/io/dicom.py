"""Reading a DICOM radiograph into a :class:`~cxrtool.io.studies.Study`.

The display pipeline follows DICOM PS3.3 C.11: stored values -> Modality LUT (rescale or
LUT sequence) -> VOI LUT (LUT sequence or window) -> [0, 1], then MONOCHROME1 is inverted
so that bone is always bright. Decoding goes through pydicom's pixel-data decoders (GDCM,
pylibjpeg, pyjpegls, Pillow), whichever is installed and accepts the transfer syntax.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments, generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, convert_color_space, get_decoder

from cxrtool.io.seg import SEG_SOP_CLASSES
from cxrtool.io.study import Study, StudyReadError, open_capped, sniff_format
from cxrtool.io.study import one_line as _one_line

__all__ = ["read_dicom"]

_SUPPORTED_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR"}
_LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_REQUIRED_IMAGE_ATTRIBUTES = ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
# ITU-R BT.601 luma weights, the same ones Pillow uses for RGB -> "L".
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_MARKER_TERMINATED = frozenset(
    [*uid.JPEGTransferSyntaxes, *uid.JPEGLSTransferSyntaxes, *uid.JPEG2000TransferSyntaxes]
)
# pyjpegls first: twice as fast as pylibjpeg on JPEG-LS (WG04: 62 vs 247 ms).
_PLUGIN_ORDER = ("pyjpegls", "pylibjpeg", "pillow", "pydicom")
# What pydicom and the plugins raise for bad pixel data or image attributes.
_PIXEL_ERRORS = (
    RuntimeError, ValueError, NotImplementedError, AttributeError, KeyError, TypeError,
    IndexError, struct.error, OverflowError,
)
# BytesLengthException: a value whose length does not fit its VR (e.g. a US element whose
# VR code was corrupted into FD), found when the value is first read.
_HEADER_ERRORS = (
    ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError,
    struct.error, UnicodeDecodeError, OverflowError, BytesLengthException,
)
_LUT_ERRORS = (AttributeError, IndexError, KeyError, TypeError, ValueError, NotImplementedError)
_ALL_PLUGINS_FAILED = "Unable to decode as exceptions were raised by all available plugins:"


def read_dicom(path: Path, *, keep_rescaled: bool = False) -> Study:
    """Read a single-frame DICOM radiograph as a display-ready Study.

    Args:
        path: the DICOM file (with or without the 128-byte preamble).
        keep_rescaled: also keep the Modality-LUT output (float32, before windowing) on
            ``Study.rescaled``; it costs one extra image-sized array.

    Returns:
        A Study whose ``pixels`` are float32 in [0, 1] with bone bright: the VOI LUT or the
        first window when the file has one, else the image's own min-max range.

    Raises:
        StudyReadError: with a one-line reason for an unreadable header, a file without
            pixel data, a multi-frame object, truncated or corrupt pixel data, or a
            transfer syntax that no installed decoder handles.

    Example:
        >>> study = read_dicom(Path("RG2_J2KR.dcm"))
        >>> study.pixels.shape, study.pixel_spacing
        ((2140, 1760), (0.2, 0.2))
    """
    path = Path(path)
    ds = _read_dataset(path)
    try:
        return _study_from_dataset(path, ds, keep_rescaled)
    except _HEADER_ERRORS as error:
        # pydicom converts element values lazily, on first access: a corrupt value (an
        # unknown VR, a non-numeric IS...) surfaces here, wherever it is first read.
        raise StudyReadError(
            _one_line(f"invalid or corrupt DICOM header: {type(error).__name__}: {error}")
        ) from error


def _study_from_dataset(path: Path, ds: Dataset, keep_rescaled: bool) -> Study:
    _check_is_single_image(ds)
    tsyntax = _transfer_syntax(ds)
    _check_encapsulation(ds, tsyntax)
    try:
        photometric = str(ds.PhotometricInterpretation).strip().upper()
        bits_stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as error:
        raise StudyReadError(_one_line(f"invalid DICOM image attributes: {error}")) from error

    if photometric not in _SUPPORTED_PHOTOMETRIC and not photometric.startswith("YBR_"):
        reason = f"unsupported Photometric Interpretation {ascii(photometric)}"
        raise StudyReadError(_one_line(reason))

    raw, decoded_as = _decode(ds, tsyntax, photometric, bits_stored)

    identity = {
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "transfer_syntax": tsyntax.name,
        "modality": _text(ds, "Modality"),
        "photometric_interpretation": photometric,
    }
    rescaled: np.ndarray | None = None
    if raw.ndim == 3 or decoded_as == "PALETTE COLOR":
        pixels = _colour_to_grey(raw, ds, decoded_as, bits_stored)
        identity["converted_from"] = "PALETTE COLOR" if decoded_as == "PALETTE COLOR" else "RGB"
    elif decoded_as in ("MONOCHROME1", "MONOCHROME2"):
        values, lut_input = _modality_lut(raw, ds)
        if keep_rescaled:
            rescaled = values
            values = values.copy()  # the VOI step below works in place
        pixels = _voi(values, lut_input, ds)
        if decoded_as == "MONOCHROME1":
            # Inverted after windowing, as in the standard's pipeline: MONOCHROME1 means
            # the minimum value is displayed white.
            np.subtract(np.float32(1.0), pixels, out=pixels)
    else:
        reason = f"unsupported Photometric Interpretation {ascii(decoded_as)}"
        raise StudyReadError(_one_line(reason))

    return Study(
        path=path,
        pixels=pixels,
        pixel_spacing=_pixel_spacing(ds),
        view_position=_view_position(ds),
        source_format="dicom",
        identity=identity,
        rescaled=rescaled,
    )


# --------------------------------------------------------------------------- header


def _read_dataset(path: Path) -> Dataset:
    # Through a capped file: a corrupt element length of up to 4 GiB makes pydicom ask for
    # that many bytes, which a plain file would allocate before finding the end of the file.
    with open_capped(path) as handle:
        try:
            return pydicom.dcmread(handle)
        except InvalidDicomError as error:
            # No preamble/"DICM": only force the read when the content looks like DICOM,
            # otherwise pydicom would happily "parse" any binary file into garbage.
            if sniff_format(path) != "dicom":
                raise StudyReadError(_one_line(f"not a DICOM file: {error}")) from error
        except OSError as error:
            if error.errno is not None:  # the disk's or the system's error, not the content's
                raise StudyReadError(_one_line(f"cannot read: {error.strerror or error}")) from error
            raise _header_error(error) from error  # pydicom's "No tag to read at ..."
        except Exception as error:
            raise _header_error(error) from error
        try:
            handle.seek(0)
            ds = pydicom.dcmread(handle, force=True)
        except Exception as error:
            raise _header_error(error) from error
    if not isinstance(ds, Dataset) or len(ds) == 0:
        raise StudyReadError("invalid or corrupt DICOM header: no data elements")
    return ds


# pydicom parses each nested sequence one Python call deeper (a few frames per level): a
# few hundred levels reach the interpreter's recursion limit, which no real radiograph does.
_TOO_DEEP = "sequences nested too deeply to read (a few hundred levels: a corrupt or malicious file?)"


def _header_error(error: BaseException) -> StudyReadError:
    """The one-line reason for an exception of pydicom's while it parsed the header."""
    if isinstance(error, RecursionError):
        return StudyReadError(f"invalid or corrupt DICOM header: {_TOO_DEEP}")
    detail = str(error).strip() or type(error).__name__  # a MemoryError() says nothing itself
    return StudyReadError(_one_line(f"invalid or corrupt DICOM header: {detail}"))


def _transfer_syntax(ds: Dataset) -> uid.UID:
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax:
        tsyntax = uid.UID(str(tsyntax).strip("\x00 "))
        if not tsyntax.is_valid:
            reason = f"Transfer Syntax UID {ascii(str(tsyntax))} is not a UID"
            raise StudyReadError(_one_line(f"invalid or corrupt DICOM header: {reason}"))
        return tsyntax
    # A raw dataset without file meta (force-read): the encoding pydicom detected while
    # parsing tells the transfer syntax, and the decoders need it set.
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        raise StudyReadError("invalid DICOM header: no Transfer Syntax UID")
    if implicit:
        tsyntax = uid.ImplicitVRLittleEndian
    else:
        tsyntax = uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        raise StudyReadError("invalid DICOM header: the Pixel Data is compressed (encapsulated) but the file meta "
                             "has no Transfer Syntax UID, so its codec is unknown")
    ds.file_meta.TransferSyntaxUID = tsyntax
    return tsyntax


def _check_encapsulation(ds: Dataset, tsyntax: uid.UID) -> None:
    """Refuse compressed (encapsulated) Pixel Data under an uncompressed transfer syntax:
    decoded as native, the fragments would only be "too few bytes of pixel data", which
    misleads (see also :func:`_transfer_syntax`, for a file meta without one)."""
    if tsyntax not in uid.UncompressedTransferSyntaxes or "PixelData" not in ds:
        return
    if ds["PixelData"].is_undefined_length:
        raise StudyReadError(f"invalid DICOM header: the Pixel Data is compressed (encapsulated) but the Transfer "
                             f"Syntax is {tsyntax.name}, an uncompressed one")


def _check_is_single_image(ds: Dataset) -> None:
    if str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES or _text(ds, "Modality") == "SEG":
        raise StudyReadError("a DICOM Segmentation (SEG), not a radiograph: a mask for cxrtool radiomics")
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        sop_class = _sop_class_name(ds)
        modality = _text(ds, "Modality").upper()
        if sop_class == "unknown" and not modality:
            # Nothing recognisable was parsed: garbage after the "DICM" magic.
            raise StudyReadError("invalid or corrupt DICOM header: no SOP Class, no Pixel Data")
        kind = _non_image_kind(ds, modality)
        if kind is None and ("Rows" in ds or "Columns" in ds or "Image" in sop_class):
            # pydicom drops an encapsulated Pixel Data element whose end was cut off (with
            # a warning only), so an image object without pixel data is a truncated file.
            raise StudyReadError(
                "truncated or corrupt pixel data: Pixel Data element missing or cut off"
            )
        what = f"a {kind}" if kind else "an object without an image"
        raise StudyReadError(
            _one_line(f"DICOM without pixel data: {what} (SOP Class: {sop_class}"
                      f"{f', Modality {modality}' if modality else ''}), not a radiograph")
        )
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError):
        rows = columns = samples = 0  # reported below as missing or invalid attributes
    if rows * columns * max(1, samples) > MAX_PIXELS:
        # Before anything is decoded: a header can promise any size, and a decoder would
        # try to allocate it (a "header size bomb").
        raise StudyReadError(f"image too large: {columns} x {rows} pixels x {samples} samples "
                             f"(limit {MAX_PIXELS:,}): a corrupt or malicious header?")
    missing = [name for name in _REQUIRED_IMAGE_ATTRIBUTES if name not in ds]
    if missing:
        raise StudyReadError(f"invalid DICOM image: missing {', '.join(missing)}")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as error:
        raise StudyReadError(_one_line(f"invalid Number of Frames: {error}")) from error
    if frames > 1:
        raise StudyReadError(f"multi-frame DICOM ({frames} frames) is not a single radiograph")


# SOP Class UID prefixes and modalities of objects that hold no image by design.
_NON_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.": "structured report",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document",
    "1.2.840.10008.5.1.4.1.1.9.": "waveform",
    "1.2.840.10008.5.1.4.1.1.481.": "radiotherapy object",
    "1.2.840.10008.5.1.4.1.1.66": "raw data or registration object",
}
_NON_IMAGE_MODALITIES = {"SR": "structured report", "KO": "key object selection", "PR": "presentation state",
                         "DOC": "encapsulated document", "REG": "registration", "RTSTRUCT": "RT structure set",
                         "RTPLAN": "RT plan", "ECG": "waveform", "AU": "audio waveform"}
# The most pixels (times samples) a header may declare: as Pillow's decompression-bomb
# limit for PNG and JPEG. Chest radiographs are at most about 4,300 x 4,300 (18.5 M).
MAX_PIXELS = 89_478_485


def _non_image_kind(ds: Dataset, modality: str) -> str | None:
    """What a DICOM object without pixel data is by design (a structured report ...), or None."""
    value = str(ds.get("SOPClassUID") or ds.get("file_meta", Dataset()).get("MediaStorageSOPClassUID") or "").strip("\x00 ")
    if "Image" in _sop_class_name(ds):
        return None  # an image class (RT Image among the RT objects): it should have pixels
    for prefix, kind in _NON_IMAGE_CLASSES.items():
        if value.startswith(prefix):
            return kind
    return _NON_IMAGE_MODALITIES.get(modality)


def _sop_class_name(ds: Dataset) -> str:
    value = ds.get("SOPClassUID") or ds.get("file_meta", Dataset()).get("MediaStorageSOPClassUID")
    if not value:
        return "unknown"
    sop_class = uid.UID(str(value).strip("\x00 "))
    return sop_class.name if sop_class.is_valid else "unknown"


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


# --------------------------------------------------------------------------- decoding


def _decode(
    ds: Dataset, tsyntax: uid.UID, photometric: str, bits_stored: int
) -> tuple[np.ndarray, str]:
    """Decode the (single) frame; return it and its photometric interpretation."""
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as error:
        raise StudyReadError(f"no decoder installed for transfer syntax {tsyntax.name}") from error
    if not decoder.is_available:
        # missing_dependencies reads e.g. "pylibjpeg - requires numpy, pylibjpeg-libjpeg".
        needs = "; ".join(decoder.missing_dependencies)
        detail = f" ({needs})" if needs else ""
        raise StudyReadError(
            _one_line(f"no decoder installed for transfer syntax {tsyntax.name}{detail}")
        )

    if decoder.is_encapsulated:
        _ignore_bad_offset_table(ds)
    _check_frame_complete(ds, tsyntax)
    options: dict[str, Any] = {"index": 0}
    # Lossy JPEG can overshoot the Bits Stored range by a little (e.g. 1024 for 10-bit
    # data); pydicom's default masking would wrap that to 0, a black dot in white bone,
    # so decode unmasked and clip instead.
    clip_overshoot = (
        tsyntax in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit)
        and int(ds.get("PixelRepresentation", 0)) == 0
        and bits_stored < int(ds.BitsAllocated)
    )
    if clip_overshoot:
        options["correct_unused_bits"] = False
    plugins = _plugins(decoder)
    try:
        arr, meta = _decode_with(decoder, ds, plugins, options)
    except _DecodeFailed as failure:
        arr, meta = _retry_sequential_jpeg(ds, tsyntax, decoder, plugins, options, failure)
    if clip_overshoot:
        np.minimum(arr, arr.dtype.type(2**bits_stored - 1), out=arr)

    photometric = str(meta.get("photometric_interpretation", photometric)).upper()
    if arr.ndim == 3 and photometric.startswith("YBR_FULL"):
        # pydicom converts YBR_FULL(_422) to RGB itself (as_rgb); this covers decoders
        # that report the codestream's colour space instead.
        arr = convert_color_space(arr, photometric, "RGB")
        photometric = "RGB"
    return arr, photometric


def _ignore_bad_offset_table(ds: Dataset) -> None:
    """Empty a Basic Offset Table other than [0]: a single frame is all the fragments.

    pydicom cuts the frame where the table says; a corrupt table (a first offset other than
    0, a second frame's offset in a single-frame image) would cut the codestream and make
    it undecodable, though every fragment is there.
    """
    data = ds.PixelData
    if len(data) < 8 or data[:4] != b"\xfe\xff\x00\xe0":
        return  # not an item: _check_frame_complete says the encapsulation is bad
    length = int.from_bytes(data[4:8], "little")
    if length == 0 or (length == 4 and data[8:12] == b"\x00" * 4) or 8 + length > len(data):
        return  # empty, [0], or a length past the end (reported as bad encapsulation)
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + data[8 + length :]


def _check_frame_complete(ds: Dataset, tsyntax: uid.UID) -> None:
    """Refuse a JPEG-family frame that does not end with its end marker (FF D9).

    pylibjpeg's JPEG lossless and JPEG-LS decoders return a half-black image for a cut
    codestream instead of failing. JPEG, JPEG-LS and JPEG 2000 (EOC) all end with FF D9.
    """
    if tsyntax not in _MARKER_TERMINATED:
        return
    last = b""
    try:
        for fragment in generate_fragments(ds.PixelData):
            last = fragment or last
    except (ValueError, TypeError, struct.error) as error:
        raise StudyReadError(
            _one_line(f"truncated or corrupt pixel data: bad encapsulation: {error}")
        ) from error
    # Trailing 00 (DICOM even-length padding) and FF (JPEG fill bytes) are allowed.
    if not last.rstrip(b"\x00\xff").endswith(b"\xff\xd9"):
        raise StudyReadError(
            "truncated or corrupt pixel data: compressed frame does not end with an "
            "end-of-image marker"
        )


class _DecodeFailed(Exception):
    """Every plugin failed; carries the original errors for the one-line reason."""

    def __init__(self, errors: list[tuple[str, BaseException]]) -> None:
        super().__init__(errors)
        self.errors = errors


def _plugins(decoder: Any) -> list[str]:
    """The decoding plugins to try, in order; [""] for native data (no plugins)."""
    available = set(decoder.available_plugins)
    if not available:
        return [""]
    # GDCM only when nothing else handles the syntax: on some corrupt input it throws a
    # C++ exception that aborts the whole process (seen while fuzzing), which would end a
    # batch run. pylibjpeg, pyjpegls and Pillow decode WG04 identically to it.
    preferred = [name for name in _PLUGIN_ORDER if name in available]
    others = sorted(available - set(_PLUGIN_ORDER) - {"gdcm"})
    return preferred + others or ["gdcm"]


def _decode_with(
    decoder: Any, ds: Dataset, plugins: list[str], options: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    errors: list[tuple[str, BaseException]] = []
    for plugin in plugins:
        try:
            return decoder.as_array(ds, decoding_plugin=plugin, **options)
        except _PIXEL_ERRORS as error:
            errors.append((plugin, error))
        except BaseException as error:
            # Rust decoders (pylibjpeg-rle) panic on some corrupt data; pyo3's
            # PanicException derives from BaseException, so pydicom's plugin loop does not
            # stop it. Anything else (KeyboardInterrupt, ...) goes on up.
            if type(error).__name__ != "PanicException":
                raise
            errors.append((plugin, RuntimeError(f"decoder panicked: {error}")))
    raise _DecodeFailed(errors)


def _retry_sequential_jpeg(
    ds: Dataset,
    tsyntax: uid.UID,
    decoder: Any,
    plugins: list[str],
    options: dict[str, Any],
    failure: _DecodeFailed,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Work around sequential JPEG scans whose header says Se=0 instead of 63.

    Some encoders (the DICOM WG04 12-bit JPEG Extended files among them) write a start of
    scan with spectral selection end 0. Sequential DCT scans always cover all 64
    coefficients, so the field is meaningless there and lenient decoders ignore it; the
    strict ones installed here refuse it. Patching the byte is lossless and exact.
    """
    if tsyntax not in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit):
        raise _decode_error(failure, tsyntax) from failure
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except (StopIteration, ValueError, TypeError, struct.error) as frame_error:
        raise _decode_error(failure, tsyntax) from frame_error
    patched = _patch_sequential_scan_end(frame)
    if patched is None:
        raise _decode_error(failure, tsyntax) from failure
    fixed = ds.copy()  # shallow: only Pixel Data is replaced
    fixed.PixelData = encapsulate([patched])
    try:
        return _decode_with(decoder, fixed, plugins, options)
    except _DecodeFailed as retry_failure:
        raise _decode_error(failure, tsyntax) from retry_failure


def _patch_sequential_scan_end(frame: bytes) -> bytes | None:
    """Return `frame` with every SOS's Se set to 63, or None when it is not that case."""
    data = bytearray(frame)
    # Walk the marker segments up to the first SOS to check the frame is sequential DCT
    # (SOF0 baseline or SOF1 extended, Huffman).
    position, sequential = 2, False
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xDA:
            break
        if marker in (0xC0, 0xC1):
            sequential = True
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    if not sequential:
        return None
    changed = False
    # Inside entropy-coded data 0xFF is always followed by 0x00 (byte stuffing), so a
    # literal FF DA is a real SOS marker.
    while (position := data.find(b"\xff\xda", position)) != -1:
        components = data[position + 4] if position + 4 < len(data) else 0
        spectral = position + 5 + 2 * components  # Ss, then Se
        if spectral + 1 < len(data) and data[spectral] == 0 and data[spectral + 1] != 63:
            data[spectral + 1] = 63
            changed = True
        position += 2
    return bytes(data) if changed else None


def _decode_error(failure: _DecodeFailed, tsyntax: uid.UID) -> StudyReadError:
    """One line saying why decoding failed, from each plugin's error."""
    reasons = []
    for plugin, error in failure.errors:
        reason = _plugin_reason(error)
        # pydicom validates the image attributes (group 0028) before decoding anything.
        if isinstance(error, (AttributeError, KeyError, TypeError)) or (
            isinstance(error, ValueError) and "(0028," in reason
        ):
            return StudyReadError(_one_line(f"invalid DICOM image attributes: {reason}"))
        named = plugin and not reason.startswith(f"{plugin}:")
        reasons.append(f"{plugin}: {reason}" if named else reason)
    message = "; ".join(dict.fromkeys(reasons))  # de-duplicated, in order
    return StudyReadError(
        _one_line(f"truncated or corrupt pixel data ({tsyntax.name}): {message}")
    )


def _plugin_reason(error: BaseException) -> str:
    message = " ".join(str(error).split())
    short = re.search(r"less than expected \((\d+) vs (\d+) bytes\)", message)
    if short:
        return f"only {short[1]} of {short[2]} bytes of native pixel data present"
    # pydicom prefixes "Unable to decode ...:" and then "<plugin>: <reason>".
    message = message.replace(_ALL_PLUGINS_FAILED, "").strip()
    # What pydicom's GDCM plugin says when GDCM returned no image.
    return message.replace("'NoneType' object has no attribute 'encode'", "decoding failed")


# --------------------------------------------------------------------------- LUTs


def _modality_lut(raw: np.ndarray, ds: Dataset) -> tuple[np.ndarray, np.ndarray | None]:
    """Return the Modality-LUT output as float32 and, when at hand, as integers.

    The integer form is what a VOI LUT Sequence indexes; it is None after a rescale (the
    VOI step then rounds the float values, exact for integers up to 2**24).
    """
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        try:
            mapped = apply_modality_lut(raw, ds)
        except _LUT_ERRORS as error:
            raise StudyReadError(_one_line(f"invalid Modality LUT Sequence: {error}")) from error
        return mapped.astype(np.float32), mapped
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as error:
        raise StudyReadError(_one_line(f"invalid Rescale Slope/Intercept: {error}")) from error
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise StudyReadError("invalid Rescale Slope/Intercept: not finite")
    # pydicom's apply_modality_lut would go through float64; this is the single float32
    # conversion of the pipeline, then in-place arithmetic.
    values = raw.astype(np.float32)
    if slope == 1.0 and intercept == 0.0:
        return values, raw
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    # The VOI LUT Sequence step rounds the float values when it needs integers.
    return values, None


def _voi(values: np.ndarray, lut_input: np.ndarray | None, ds: Dataset) -> np.ndarray:
    """Map Modality-LUT output to [0, 1] (in place where possible)."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        return _voi_lut_sequence(values, lut_input, ds)
    window = _first_window(ds)
    if window is not None:
        center, width, function = window
        return _apply_window(values, center, width, function)
    return _min_max(values)


def _voi_lut_sequence(values: np.ndarray, lut_input: np.ndarray | None, ds: Dataset) -> np.ndarray:
    item = ds.VOILUTSequence[0]
    try:
        descriptor = [int(v) for v in item.LUTDescriptor]
        first_map, entries, bits = descriptor[1], descriptor[0] or 2**16, descriptor[2]
        if lut_input is None:
            lut_input = np.rint(values).astype(np.int32)
        # Clip before pydicom's lookup, whose intermediate array has the LUT's unsigned
        # dtype and would wrap out-of-range inputs.
        lut_input = np.clip(lut_input, first_map, first_map + entries - 1)
        mapped = apply_voi(lut_input, ds, index=0)
    except _LUT_ERRORS as error:
        raise StudyReadError(_one_line(f"invalid VOI LUT Sequence: {error}")) from error
    out = mapped.astype(np.float32)
    top = float(2**bits - 1)
    actual = float(out.max()) if out.size else 0.0
    if actual > top:
        # Some writers state too few bits in the descriptor; trust the data then.
        top = actual
    if top <= 0:
        return np.zeros_like(out)
    out /= np.float32(top)
    return out


def _first_window(ds: Dataset) -> tuple[float, float, str] | None:
    """First (center, width, function) of the VOI LUT module, or None when unusable."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center = _first_value(ds.WindowCenter)
        width = _first_value(ds.WindowWidth)
    except (IndexError, TypeError, ValueError):
        return None  # an unreadable window is not worth refusing the image for
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"  # the standard's default; the window itself is still valid
    if not (math.isfinite(center) and math.isfinite(width)):
        return None
    if width < 1 if function == "LINEAR" else width <= 0:
        return None  # invalid per PS3.3 C.11.2.1.2; fall back to the data range
    return center, width, function


def _first_value(value: Any) -> float:
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0]
    return float(value)


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The window of PS3.3 C.11.2.1.2/3 with output range [0, 1], in place in float32.

    Same results as ``pydicom.pixels.apply_windowing`` (a test checks all three
    functions) but about 20x faster on a radiograph: that one works in float64 with
    boolean masks.
    """
    if function == "SIGMOID":
        values -= np.float32(center)
        values *= np.float32(-4.0 / width)
        np.exp(values, out=values)
        values += np.float32(1.0)
        np.reciprocal(values, out=values)
        return values
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
    values -= np.float32(center)
    values *= np.float32(1.0 / width)
    values += np.float32(0.5)
    np.clip(values, 0.0, 1.0, out=values)
    return values


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return np.zeros_like(values)  # a constant image: no contrast, and no NaN
    values -= np.float32(low)
    values *= np.float32(1.0 / (high - low))
    # float32 rounding can leave 1.0000001; keep the documented range exact.
    np.clip(values, 0.0, 1.0, out=values)
    return values


def _colour_to_grey(raw: np.ndarray, ds: Dataset, photometric: str, bits_stored: int) -> np.ndarray:
    """Luminance in [0, 1] of an RGB (or palette) image; colour has no VOI windowing."""
    top = float(2**bits_stored - 1)
    if photometric == "PALETTE COLOR":
        try:
            raw = apply_color_lut(raw, ds)
            top = float(2 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
            raise StudyReadError(_one_line(f"invalid palette colour LUT: {error}")) from error
    if raw.ndim != 3 or raw.shape[-1] != 3:
        raise StudyReadError(f"unsupported colour layout {raw.shape} ({photometric})")
    grey = raw.astype(np.float32) @ _LUMA
    grey *= np.float32(1.0 / top)
    np.clip(grey, 0.0, 1.0, out=grey)
    return grey


# --------------------------------------------------------------------------- metadata


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword not in ds:
            continue
        try:
            value = ds[keyword].value
            values = [float(v) for v in value] if not isinstance(value, (str, bytes)) else []
        except (TypeError, ValueError):
            continue
        if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
            return values[0], values[1]
    return None


def _view_position(ds: Dataset) -> str:
    try:
        view = str(ds.get("ViewPosition") or "").strip().upper()
    except (TypeError, ValueError):
        return "UNKNOWN"
    if view in ("PA", "AP"):
        return view
    if view in _LATERAL_VIEWS:
        return "LATERAL"
    return "UNKNOWN"

