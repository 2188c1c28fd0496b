"""Read radiographs into float32 arrays in [0, 1] (0 = black, as displayed).

DICOM (pydicom): the Modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence),
then the VOI LUT Sequence or the first Window Center / Width (DICOM PS3.3 C.11.2.1.2, with the
VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID), then MONOCHROME1, or a Presentation LUT Shape
INVERSE, is inverted (``_inverted``). Without a VOI transform, values are scaled over the range that
Bits Stored (or the Modality LUT's output) allows (no per-image contrast stretch). Float and Double
Float Pixel Data (which has no Bits Stored) is read through its window, the image's own or its
Frame VOI LUT functional group's, and skipped with the reason where it has none. RGB and YCbCr
images (which pydicom returns as RGB) are converted to luminance. Multi-frame images and objects
without pixel data (RT plans, structured reports, ...) are skipped with a reason.
A DICOM file without the PS3.10 header (the 128-byte preamble, "DICM" and the File Meta
Information), as older equipment and some PACS exports write it, is read as the bare data set it
is (implicit or explicit VR little endian) when its first bytes are a plausible element of group
0002 or 0008 and the data set has pixel data and the image attributes; anything else without
"DICM" is skipped.
PNG / JPEG / TIFF (Pillow): 8-bit and 1-bit scaled to [0, 1] by 255, 16-bit by 65535 (never
clipped to 8 bits; the largest value is kept in ``meta["max"]``, since 12-bit data in a 16-bit
file uses only a sixteenth of the range); colour images are converted to luminance; an EXIF
orientation (or a TIFF's Orientation tag) is applied; a TIFF whose Photometric Interpretation is
WhiteIsZero is inverted (Pillow does so below 16 bits, not at 16). Pillow opens 16-bit colour and
grey + alpha images at 8 bits (each sample's high byte): their low bytes are decoded as well, so
that they too keep 16 bits (``_sixteen_bit_samples``); where that cannot be done the image is read
at 8 bits, said once and marked in ``meta["read_at_8_bits"]``. A signed 16-bit TIFF (Sample Format
2) is scaled over -32768..32767, as DICOM's signed 16 bits are. A TIFF of more than one page (other
than reduced-resolution copies and masks of the first) is skipped, as a multi-frame DICOM is: its
pages may be different views.

A file's suffix says how to read it when it is a known one (no file is opened to find out);
otherwise its content does (DICOM's "DICM" or a bare data set's first element, PNG / JPEG / TIFF /
BMP signatures), so that DICOM files named by their UID (``1.2.840.113619.2.55.3.604688``) or with
a vendor's suffix (``scan.IMA``) are read.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
PILLOW_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")
# "BM" alone starts many a text file; a BMP's DIB header size (bytes 14-17) is one of these
_BMP_DIB_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}
# plainly not radiographs: find_images leaves them out without a word (a file with any other
# suffix, or none, is a candidate that its content accepts or skipped.csv lists with the reason)
NOT_IMAGE_SUFFIXES = {
    ".csv", ".tsv", ".txt", ".json", ".jsonl", ".xml", ".yaml", ".yml", ".ini", ".cfg", ".toml", ".md", ".rst",
    ".html", ".htm", ".css", ".js", ".pdf", ".doc", ".docx", ".xls", ".xlsx", ".ppt", ".pptx", ".odt", ".ods",
    ".rtf", ".log", ".py", ".ipynb", ".sh", ".bat", ".zip", ".gz", ".tgz", ".tar", ".bz2", ".xz", ".7z", ".rar",
    ".npy", ".npz", ".pt", ".pth", ".ckpt", ".h5", ".hdf5", ".pkl", ".pickle", ".parquet", ".db", ".sqlite",
    ".tmp", ".partial", ".lock", ".md5", ".sha1", ".sha256", ".svg", ".mp4", ".avi", ".mov", ".mp3", ".wav"}


# colour Photometric Interpretations whose pixels pydicom gives as RGB
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")


# the Value Representations of PS3.5 table 6.2-1, and those whose explicit-VR element header has 2
# reserved bytes and a 4-byte length (PS3.5 7.1.2)
_VRS = {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV",
        "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"}
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_UNDEFINED_LENGTH = 0xFFFFFFFF
# what a data set read without the PS3.10 header must have to be taken for an image
_IMAGE_ATTRIBUTES = {"Rows": "Rows", "Columns": "Columns", "BitsAllocated": "Bits Allocated",
                     "PhotometricInterpretation": "Photometric Interpretation"}

# Pillow opens 16-bit RGB(A) and grey + alpha images (PNG, TIFF) as 8-bit RGB(A), its decoder's
# last step (the "unpacker" the tile's raw mode names) keeping each sample's high byte
_SIXTEEN_BIT_COLOUR = re.compile(r"(RGB|RGBX|RGBA|LA);16([BLN])")
_NATIVE = "L" if sys.byteorder == "little" else "B"
# a signed 16-bit TIFF's raw modes; libtiff (a compressed one) gives the samples in this machine's
# byte order, which Pillow (13 at least) does not say for the signed ones as it does for "I;16B"
_SIGNED_16 = ("I;16S", "I;16BS")
_NATIVE_SIGNED_16 = "I;16S" if sys.byteorder == "little" else "I;16BS"
# NewSubfileType (254) bits of a TIFF page that is no image of its own: a reduced-resolution copy (1)
# or a transparency mask (4) of another page (TIFF 6.0, section 8)
_NOT_A_PAGE_OF_ITS_OWN = 0b101
_said_8_bits = False  # the first 16-bit image read at 8 bits is said; prepare counts them all


class SkipImage(Exception):
    """A file that is not (or not only) a single radiograph; the message is the reason, on one line
    (any run of white space, line breaks included, becomes a space): reasons are listed one line per
    file (prepare's skipped.csv and console, fid's skipped files, the reader study), and some come
    from libraries in several lines (pydicom's "no decoder" lists each plugin on a line of its own)."""

    def __init__(self, reason: object = ""):
        super().__init__(" ".join(str(reason).split()))


@dataclass
class Radiograph:
    pixels: np.ndarray               # float32, (H, W), [0, 1]
    source: str
    patient_id: str = ""
    study_id: str = ""
    meta: dict = field(default_factory=dict)


# the elements a data set can start with: in group 0002, its length, the version, the SOP class or
# instance, or the transfer syntax (writers leave the optional ones out); in group 0008, its length
# (retired) or the first of its elements an image's data set holds (PS3.6)
_FIRST_ELEMENTS = {0x0002: (0x0000, 0x0001, 0x0002, 0x0003, 0x0010),
                   0x0008: tuple(range(0x0019))}  # up to (0008,0018), the SOP instance: its class may be gone


def bare_dataset_encoding(head: bytes, size: int) -> bool | None:
    """Whether a file that starts with ``head`` (its first 12 bytes or more) and is ``size`` bytes
    long is a DICOM data set written without the PS3.10 header: True for implicit VR little endian,
    False for explicit VR little endian, None when it is not one. Such a data set starts with its
    first element: a tag of group 0002 (File Meta Information written without the preamble) or 0008
    (the first group of an image's data set), one of the elements such a data set starts with
    (``_FIRST_ELEMENTS``), then, explicit, a VR of PS3.5 (as pydicom tells the two apart) and a
    length, or, implicit, a 4-byte length; the length must be even (PS3.5 7.1.1) and fit in the
    file. No text file passes (its first two bytes are printable); of random files, about one in
    several billion (the group and element alone: 30 of 2³² tags); and the data set read from one
    that passes must still have pixel data and the image attributes (``read_dicom``)."""
    if len(head) < 12:
        return None
    group, element = int.from_bytes(head[0:2], "little"), int.from_bytes(head[2:4], "little")
    if element not in _FIRST_ELEMENTS.get(group, ()):
        return None
    vr = head[4:6].decode("latin-1")
    if vr in _VRS:
        if vr in _LONG_VRS:
            length, start = int.from_bytes(head[8:12], "little"), 12
            if head[6:8] != b"\0\0":
                return None
        else:
            length, start = int.from_bytes(head[6:8], "little"), 8
        implicit = False
    else:
        length, start, implicit = int.from_bytes(head[4:8], "little"), 8, True
    if length == _UNDEFINED_LENGTH:  # a sequence of undefined length
        return implicit if implicit or vr in ("SQ", "UN") else None
    return implicit if length % 2 == 0 and start + length <= size else None


def file_kind(path: str | os.PathLike) -> str:
    """'dicom' (the "DICM" prefix after the preamble, or a data set written without the PS3.10
    header: ``bare_dataset_encoding``), 'image' (a PNG, JPEG, TIFF or BMP signature) or '' by the
    first bytes of the file."""
    with open(path, "rb") as fh:
        head = fh.read(132)
        size = os.fstat(fh.fileno()).st_size
    if head[128:132] == b"DICM":
        return "dicom"
    bmp = head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_DIB_HEADER_SIZES
    if bmp or head.startswith(_IMAGE_SIGNATURES):
        return "image"
    return "dicom" if bare_dataset_encoding(head, size) is not None else ""


def reader_kind(path: str | os.PathLike) -> str:
    """'dicom' or 'image' by the suffix when it is a known one, else by the content (``file_kind``);
    raises SkipImage when neither says so, or when the file cannot be opened."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in PILLOW_SUFFIXES:
        return "image"
    try:
        kind = file_kind(path)
    except OSError as exc:
        raise SkipImage(f"cannot read file ({exc})") from exc
    if not kind:
        raise SkipImage(f"unsupported file type {suffix or '(no suffix)'}: neither DICOM nor a PNG, JPEG, TIFF or "
                        f"BMP image")
    return kind


def is_dicom(path: str | os.PathLike) -> bool:
    return file_kind(path) == "dicom"


def _window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """A VOI LUT Function onto [0, 1]: LINEAR (PS3.3 C.11.2.1.2.1; also any value the standard
    does not define, LINEAR being the default), LINEAR_EXACT (C.11.2.1.3.2) or SIGMOID
    (C.11.2.1.3.1)."""
    if function in ("LINEAR_EXACT", "SIGMOID"):
        if width <= 0:
            raise SkipImage(f"Window Width {width} is not above 0 (VOI LUT Function {function})")
        if function == "SIGMOID":
            with np.errstate(over="ignore"):  # far below the centre: exp overflows, y is 0
                return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)  # 0 at or below c - w/2, 1 above c + w/2
    if width < 1:
        raise SkipImage(f"Window Width {width} is below 1")
    if width == 1:  # a threshold: 0 at or below c - 0.5, 1 above
        return (x > center - 0.5).astype(np.float64)
    # 0 at or below c - 0.5 - (w - 1) / 2, 1 above c - 0.5 + (w - 1) / 2, linear between
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _lut(item, what: str, little: bool = True) -> tuple[int, int, int, np.ndarray]:
    """(entries, first value mapped, bits per entry, the entries) of a Modality or VOI LUT Sequence
    item; SkipImage, naming ``what``, where its LUT Descriptor or LUT Data is missing or cannot be
    read. Entries of 9 to 16 bits (which PS3.3 allowed before 2004, and older CR equipment writes; 8
    or 16 since) are read as 16-bit words, as pydicom's apply_modality_lut does not ("uint12"), in the
    data set's byte order (``little``: False for Explicit VR Big Endian)."""
    try:
        n, first, bits = (int(v) for v in item.LUTDescriptor)
    except (AttributeError, TypeError, ValueError) as exc:  # absent, or not the three values
        raise SkipImage(f"{what} has no readable LUT Descriptor (entries, first value mapped, bits: "
                        f"{item.get('LUTDescriptor')!r})") from exc
    n = n or 65536  # 0 means 2^16 entries
    raw = item.get("LUTData")
    if raw is None or isinstance(raw, str):
        raise SkipImage(f"{what} has no LUT Data")
    words = bits > 8 or len(raw) == 2 * n
    if isinstance(raw, (bytes, bytearray)) and words and len(raw) % 2:
        raise SkipImage(f"{what} has LUT Data of an odd number of bytes ({len(raw)}) for 16-bit entries")
    lut = np.frombuffer(raw, dtype=("<u2" if little else ">u2") if words else np.uint8)[:n] \
        if isinstance(raw, (bytes, bytearray)) else np.atleast_1d(np.asarray(raw))
    if len(lut) < n:
        raise SkipImage(f"{what} has {len(lut)} entries, its descriptor says {n}")
    return n, first, bits, lut


def _apply_lut(values: np.ndarray, item, input_range: tuple[float, float], little: bool = True) -> np.ndarray:
    """A VOI LUT Sequence item onto [0, 1] (PS3.3 C.11.2.1.1): values below the first mapped
    value take the first entry, above the last the last entry. The first mapped value is US or SS,
    and pydicom reads an implicit VR one (or an explicit one written as US) by the Pixel
    Representation alone: for unsigned stored pixels with a negative Rescale Intercept, -1024 read as
    64512 put every pixel below the LUT, a blank image. Where the value as read lies outside
    ``input_range`` (the Modality LUT's output) and its other 16-bit reading inside, the other is
    meant; a value inside (e.g. 40000 for 16-bit pixels) is kept as read. Where neither lies inside
    (a LUT wider than the data, from below its range: -2048 read as 63488 for -1024 .. 3071), the one
    whose entries cover more of the range is meant."""
    n, first, bits, lut = _lut(item, "VOI LUT", little)
    other = first - 2 ** 16 if first >= 2 ** 15 else first + 2 ** 16 if first < 0 else first
    lo, hi = input_range
    covered = lambda start: min(start + n - 1, hi) - max(start, lo)  # noqa: E731 - below 0: none, by how far
    if not lo <= first <= hi and (lo <= other <= hi or covered(other) > covered(first)):
        first = other
    idx = np.clip(np.rint(values).astype(np.int64) - first, 0, n - 1)
    return lut[idx].astype(np.float64) / (2 ** bits - 1)


def _modality_lut(stored: np.ndarray, ds) -> np.ndarray:
    """The Modality LUT (PS3.3 C.11.1), float64: the Modality LUT Sequence's first item (values below
    its first mapped value take its first entry, above its last its last), else Rescale Slope /
    Intercept (``_rescale``)."""
    if ds.get("ModalityLUTSequence"):
        n, first, _, lut = _lut(ds.ModalityLUTSequence[0], "Modality LUT", _little_endian(ds))
        return lut[np.clip(stored.astype(np.int64) - first, 0, n - 1)].astype(np.float64)
    slope, intercept = _rescale(ds)
    return stored.astype(np.float64) * slope + intercept


def _little_endian(ds) -> bool:
    """Whether the data set was read little-endian (its OW LUT Data bytes are in that order); a data set
    built in memory, of no encoding, is taken as little-endian."""
    return getattr(ds, "original_encoding", (None, None))[1] is not False


def _rescale(ds) -> tuple[float, float]:
    """(Rescale Slope, Rescale Intercept), 1 and 0 where absent or empty (an anonymiser's blank), each
    applied where the other is absent (pydicom then applies neither, while the range Bits Stored is
    scaled over took the one given: at a slope of 0.5 alone, 2048 and 4095 were both white). A slope
    of 0, which maps every pixel onto the intercept (a blank image), is refused."""
    slope = _first_number(ds, "RescaleSlope", "Rescale Slope")
    intercept = _first_number(ds, "RescaleIntercept", "Rescale Intercept")
    if slope == 0:
        raise SkipImage("Rescale Slope is 0: every pixel would have the value of the Rescale Intercept")
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _modality_range(ds) -> tuple[float, float]:
    """The range of Rescale Slope / Intercept's output over the values Bits Stored allows."""
    bits = int(ds.BitsStored)
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    smin, smax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    slope, intercept = _rescale(ds)
    lo, hi = sorted((smin * slope + intercept, smax * slope + intercept))
    return lo, hi


def _first_number(ds, keyword: str, name: str) -> float | None:
    """The first value of a numeric attribute (DS or IS) of ``ds``, a data set or a sequence item
    (Window Center / Width may be multi-valued: the first pair is the default view); None where it
    is absent or empty. SkipImage naming the attribute where the value is no number ("abc", which
    pydicom raises ValueError for when it is read, or keeps as text)."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        if not isinstance(value, (int, float, str)):
            if not len(value):
                return None
            value = value[0]
        return float(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raw = ds.get_item(keyword)
        shown = raw.value if raw is not None else None
        shown = shown.decode("latin-1", "replace").strip() if isinstance(shown, bytes) else shown
        raise SkipImage(f"{name} is not a number ({shown!r})") from exc


_NO_PREFIX = "no 'DICM' prefix after the 128-byte preamble, which a DICOM file (PS3.10) starts with"


def _read_bare_dataset(path: str | os.PathLike):
    """A DICOM file without the "DICM" prefix, read as a data set written without the PS3.10 header
    when its first bytes are one (``bare_dataset_encoding``) and what pydicom reads from it (with
    ``force=True``, which reads anything) has pixel data and the image attributes; SkipImage
    otherwise. Without File Meta Information there is no Transfer Syntax UID, which pydicom needs to
    decode the pixels: it is set to the encoding found (implicit or explicit VR little endian)."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        with open(path, "rb") as fh:
            head, size = fh.read(12), os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise SkipImage(f"cannot read file ({exc})") from exc
    implicit = bare_dataset_encoding(head, size)
    if implicit is None:
        raise SkipImage(f"not a DICOM file ({_NO_PREFIX}, and its first bytes are no data element of group 0002 "
                        f"or 0008, which a DICOM data set written without the preamble starts with)")
    how = "read as a DICOM data set written without the preamble"
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise SkipImage(f"not a DICOM file ({_NO_PREFIX}; {how}: {type(exc).__name__}: {exc})") from exc
    pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    missing = [name for k, name in _IMAGE_ATTRIBUTES.items() if ds.get(k) in (None, "")]
    if not pixels or missing:
        what = ", ".join((["Pixel Data"] if not pixels else []) + missing)
        kind = str(ds.get("Modality", "") or "").strip()
        raise SkipImage(f"not a DICOM image ({_NO_PREFIX}; {how}, it has no {what}" +
                        (f": a {kind} object" if kind else "") + ")")
    if "TransferSyntaxUID" not in ds.file_meta:  # a data set with File Meta Information keeps its own
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _inverted(ds, photometric: str) -> bool:
    """Whether a grey image is displayed inverted (its lowest value white). PS3.3 C.7.6.1 (General
    Image Module): Presentation LUT Shape (2050,0020) IDENTITY "shall be used if Photometric
    Interpretation is MONOCHROME2", INVERSE "shall be used if Photometric Interpretation is
    MONOCHROME1" (the DX Image Module, C.8.11.1, says the same): with MONOCHROME1, INVERSE names
    the one inversion MONOCHROME1 already means, not a second that would undo it. INVERSE on
    MONOCHROME2 (against that rule, but the only way the image can say so) asks for the image to be
    shown inverted (as it does in a presentation state, which overrides the Photometric
    Interpretation: PS3.4 N.2.1.4), and is followed; IDENTITY on MONOCHROME1 (against the rule too)
    leaves MONOCHROME1's inversion, which the pixels are stored for."""
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def _float_window(ds) -> tuple[float | None, float | None, str]:
    """The window (centre, width, VOI LUT Function) of Float or Double Float Pixel Data: the image's
    own Window Center / Width, else that of the Frame VOI LUT Sequence in its shared functional
    groups, else in its (single) frame's, where an enhanced object such as a Parametric Map (the IOD
    that has float pixels) puts it (PS3.3 C.7.6.16.2.10)."""
    places = [ds]
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if ds.get(groups):
            places += list(ds.get(groups)[0].get("FrameVOILUTSequence") or [])[:1]
    for place in places:
        center = _first_number(place, "WindowCenter", "Window Center")
        width = _first_number(place, "WindowWidth", "Window Width")
        if center is not None and width is not None:
            return center, width, str(place.get("VOILUTFunction") or "LINEAR").strip().upper()
    return None, None, "LINEAR"


def read_dicom(path: str | os.PathLike) -> Radiograph:
    """A DICOM file (with or without the PS3.10 header); see the module docstring."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:  # pydicom's message ends in advice for its callers ("Use force=True ...")
        if "DICM" not in str(exc):
            raise SkipImage(f"not a DICOM file ({exc})") from exc
        ds = None
    except Exception as exc:  # truncated or corrupt header
        raise SkipImage(f"unreadable DICOM ({type(exc).__name__}: {exc})") from exc
    bare = ds is None
    if bare:
        ds = _read_bare_dataset(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop_class = getattr(ds, "SOPClassUID", None) or getattr(getattr(ds, "file_meta", None),
                                                                 "MediaStorageSOPClassUID", None)
        kind = getattr(ds, "Modality", "") or getattr(sop_class, "name", None) or sop_class or "unknown"
        raise SkipImage(f"no pixel data (a {kind} object, not an image)")
    frames = int(_first_number(ds, "NumberOfFrames", "Number of Frames") or 1)
    if frames > 1:
        raise SkipImage(f"multi-frame image ({frames} frames)")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip()
    try:
        stored = ds.pixel_array
    except Exception as exc:  # unsupported transfer syntax, missing handler, truncated data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        name = getattr(ts, "name", str(ts))
        raise SkipImage(f"pixel data could not be decoded (transfer syntax {name}: {exc})") from exc
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # pydicom (3.x) returns YCbCr pixel data already converted to RGB (its as_rgb default), and a
        # JPEG 2000 decoder undoes the ICT / RCT itself: converting again would give wrong greys
        if stored.ndim == 3 and stored.shape[-1] == 3 and photometric in _COLOUR:
            bits = int(ds.BitsStored)
            gray = stored.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
            return Radiograph(np.clip(gray / (2 ** bits - 1), 0, 1).astype(np.float32), str(path),
                              str(getattr(ds, "PatientID", "")), str(getattr(ds, "StudyInstanceUID", "")),
                              {"photometric": photometric})
        raise SkipImage(f"unsupported Photometric Interpretation {photometric}")
    if stored.ndim != 2:
        raise SkipImage(f"expected a 2-D image, pixel data has shape {stored.shape}")
    values = _modality_lut(stored, ds)
    center = _first_number(ds, "WindowCenter", "Window Center")
    width = _first_number(ds, "WindowWidth", "Window Width")
    floating = next((name for k, name in (("FloatPixelData", "Float Pixel Data"),
                                          ("DoubleFloatPixelData", "Double Float Pixel Data"))
                     if k in ds and "PixelData" not in ds), None)
    # a NaN / infinite Rescale or Window gives NaN pixels, or (clipped in the window) a blank image
    if floating and not np.isfinite(stored).all():  # not the Rescale's doing
        raise SkipImage(f"{floating} holds values that are not finite (NaN or infinite)")
    if not np.isfinite(values).all():
        raise SkipImage(f"pixel values are not finite after the Modality LUT (Rescale Slope "
                        f"{ds.get('RescaleSlope', 1)}, Intercept {ds.get('RescaleIntercept', 0)})")
    if floating:  # no Bits Stored, hence no range but the window's (and no per-image stretch)
        center, width, function = _float_window(ds)
        if center is None or width is None:
            raise SkipImage(f"{floating} without a Window Center / Width: floating-point pixels have no "
                            f"Bits Stored to scale them over")
        if not (np.isfinite(center) and np.isfinite(width)):
            raise SkipImage(f"Window Center / Width {center} / {width} is not finite")
        x = _window(values, center, width, function)
        how = "window" if function not in ("LINEAR_EXACT", "SIGMOID") else f"window {function}"
    elif ds.get("VOILUTSequence"):
        modality_lut = ds.get("ModalityLUTSequence")
        x = _apply_lut(values, ds.VOILUTSequence[0], _modality_range(ds) if not modality_lut
                       else (0, 2 ** int(modality_lut[0].LUTDescriptor[2]) - 1),  # that LUT's output: its entries
                       _little_endian(ds))
        how = "VOI LUT"
    elif center is not None and width is not None:
        if not (np.isfinite(center) and np.isfinite(width)):
            raise SkipImage(f"Window Center / Width {center} / {width} is not finite")
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        x = _window(values, center, width, function)
        how = "window" if function not in ("LINEAR_EXACT", "SIGMOID") else f"window {function}"
    elif ds.get("ModalityLUTSequence"):  # the LUT's output is unsigned, of the bits its descriptor says
        x = values / (2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
        how = "modality LUT range"
    else:
        lo, hi = _modality_range(ds)
        x = (values - lo) / (hi - lo)
        how = "bits stored"
    if not np.isfinite(x).all():  # quantised, a NaN would be a black pixel
        raise SkipImage(f"pixel values are not finite after the {how} transform")
    x = np.clip(x, 0.0, 1.0)
    if _inverted(ds, photometric):
        x = 1.0 - x
    meta = {"photometric": photometric, "voi": how}
    if floating:
        meta["float_bits"] = int(ds.get("BitsAllocated") or (32 if floating == "Float Pixel Data" else 64))
    else:
        meta["bits_stored"] = int(ds.BitsStored)
    if photometric == "MONOCHROME2" and _inverted(ds, photometric):
        meta["presentation_lut_shape"] = "INVERSE"  # shown inverted: the image says so
    if bare:
        meta["no_preamble"] = True  # no preamble and "DICM": read as a bare data set
    if str(ds.get("PresentationIntentType", "")).strip().upper() == "FOR PROCESSING":
        meta["for_processing"] = True  # raw detector data, meant for a vendor's processing, not for display
    return Radiograph(x.astype(np.float32), str(path), str(getattr(ds, "PatientID", "")),
                      str(getattr(ds, "StudyInstanceUID", "")), meta)


def _tile_rawmode(tile) -> str | None:
    """The raw mode a Pillow tile is unpacked with: its args (PNG's "zip" decoder) or their first
    item (TIFF's "raw" and "libtiff")."""
    args = tile[3]
    first = args[0] if isinstance(args, tuple) and args else args
    return first if isinstance(first, str) else None


def _with_rawmode(tile, rawmode: str):
    """The tile, unpacked with ``rawmode`` instead (a named tuple since Pillow 11, a tuple before)."""
    args = tile[3]
    args = (rawmode, *args[1:]) if isinstance(args, tuple) else rawmode
    return tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args)


def _png_sixteen_bit_colour(path: str | os.PathLike) -> bool:
    """Whether a PNG's IHDR says 16 bits per sample of colour (colour type 2), grey + alpha (4) or
    colour + alpha (6): what Pillow reads at 8 bits."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    return head.startswith(_IMAGE_SIGNATURES[0]) and head[12:16] == b"IHDR" and head[24] == 16 and \
        head[25] in (2, 4, 6)


def _sixteen_bit_samples(path: str | os.PathLike, high, tiles: list, rawmode: str) -> np.ndarray | None:
    """The 16-bit samples, (H, W, 3) for colour, (H, W, 1) for grey (alpha left out), of an image
    that Pillow opened at 8 bits: ``high`` (loaded and EXIF-transposed) holds each sample's high
    byte, as the unpacker of ``rawmode`` ("RGB;16B", ...; N is the machine's byte order, libtiff's)
    takes it. The file is decoded a second time, its ``tiles`` unpacked with the raw mode of the
    other byte order, which takes the low bytes (the decoding before the unpacker, PNG's filters
    or TIFF's predictor, is on whole bytes or samples, and the same); grey + alpha, for which
    Pillow has no such raw mode, with "RGBA", which keeps the 4 bytes of a pixel as they are. None
    where Pillow does not go along (a raw mode it lacks, other tiles, high bytes that differ)."""
    from PIL import Image, ImageOps

    kind, order = _SIXTEEN_BIT_COLOUR.fullmatch(rawmode).groups()
    order = _NATIVE if order == "N" else order
    other = "RGBA" if kind == "LA" else f"{kind};16{'L' if order == 'B' else 'B'}"
    try:
        with Image.open(path) as im:
            if im.mode != high.mode or [tuple(t[:3]) for t in im.tile] != [tuple(t[:3]) for t in tiles]:
                return None
            im.tile = [_with_rawmode(t, other) for t in im.tile]
            im.load()
            low = np.asarray(ImageOps.exif_transpose(im))
    except (OSError, SyntaxError, ValueError):
        return None
    hi = np.asarray(high)
    if low.shape != hi.shape:
        return None
    if kind == "LA":  # the 4 bytes: grey's two, then alpha's two, in the file's order
        big, little = (low[..., 0], low[..., 1]) if order == "B" else (low[..., 1], low[..., 0])
        if not np.array_equal(big, hi[..., 0]):
            return None
        return ((big.astype(np.uint16) << 8) | little)[..., None]
    return (hi[..., :3].astype(np.uint16) << 8) | low[..., :3]


def _png_bytes(width: int, height: int, colour_type: int, samples: np.ndarray) -> bytes:
    """A 16-bit PNG of ``samples`` (H, W, channels; unfiltered rows), for ``_low_bytes_work``."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)
    return (_IMAGE_SIGNATURES[0] + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@functools.lru_cache(maxsize=1)
def _low_bytes_work() -> bool:
    """Whether this Pillow gives the low bytes as ``_sixteen_bit_samples`` asks (it relies on the
    tiles Pillow decodes by, not a public API): two tiny 16-bit PNGs of known samples, colour and
    grey + alpha, read that way, once per process. Where not, 16-bit colour is read at 8 bits, and
    said, rather than read wrong."""
    import io

    from PIL import Image
    colour = np.array([[[0x1234, 0xABCD, 0x00FF], [0xFF00, 0x0001, 0x8081]]], dtype=np.uint16)
    grey_alpha = np.array([[[0x1234, 0xFFFF], [0xFE01, 0x8000]]], dtype=np.uint16)
    try:
        for data, want in ((_png_bytes(2, 1, 2, colour), colour), (_png_bytes(2, 1, 4, grey_alpha),
                                                                    grey_alpha[..., :1])):
            with Image.open(io.BytesIO(data)) as im:
                tiles = list(im.tile)
                im.load()
                rawmode = _tile_rawmode(tiles[0]) if len(tiles) == 1 else None
                if not rawmode or not _SIXTEEN_BIT_COLOUR.fullmatch(rawmode):
                    return False
                got = _sixteen_bit_samples(io.BytesIO(data), im.copy(), tiles, rawmode)
            if got is None or not np.array_equal(got, want):
                return False
    except Exception:  # noqa: BLE001 - any way this Pillow differs: the 8-bit path, said
        return False
    return True


def _tiff_pages(im) -> int:
    """How many pages of a TIFF are images of their own: all but the reduced-resolution copies and
    transparency masks (NewSubfileType, or the old SubfileType 2) after the first. Leaves ``im`` at
    its first page. A chain of pages that is damaged after the first (the next page's offset past the
    end of the file or into other data, which Pillow 13 raises as TypeError "Missing dimensions") is
    one page, as it was read before pages were counted: the first page is whole."""
    try:
        n = getattr(im, "n_frames", 1)
    except (EOFError, OSError, SyntaxError, ValueError, TypeError):
        im.seek(0)  # the walk stopped at the damaged page
        return 1
    if n == 1:
        return 1
    pages = 1
    for i in range(1, n):
        im.seek(i)
        tags = im.tag_v2
        if not (int(tags.get(254, 0) or 0) & _NOT_A_PAGE_OF_ITS_OWN or tags.get(255) == 2):
            pages += 1
    im.seek(0)
    return pages


def read_pillow(path: str | os.PathLike) -> Radiograph:
    """A PNG, JPEG, TIFF or BMP file; see the module docstring."""
    global _said_8_bits
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        # from a file object, not its name: from a name Pillow memory-maps an uncompressed TIFF at the size
        # it will have once its Orientation is applied, which for 5-8 (rows and columns swapped) scrambles it
        with open(path, "rb") as fh, Image.open(fh) as im:
            tiles, fmt = list(im.tile), im.format  # load() empties the tiles
            # a TIFF's Photometric Interpretation WhiteIsZero (0; DICOM's MONOCHROME1): Pillow inverts
            # 1- to 8-bit samples as it unpacks them, but gives 16-bit ones as stored
            white_is_zero = fmt == "TIFF" and getattr(im, "tag_v2", {}).get(262) == 0
            if fmt == "TIFF":  # Pillow reads the first page of a TIFF; others would be left out unsaid
                pages = _tiff_pages(im)
                if pages > 1:
                    raise SkipImage(f"multi-page TIFF ({pages} pages; only a single image is read)")
                tiles = list(im.tile)
            signed = {_tile_rawmode(t) for t in tiles} <= set(_SIGNED_16) and bool(tiles)
            if signed and all(t[0] == "libtiff" for t in tiles):
                im.tile = tiles = [_with_rawmode(t, _NATIVE_SIGNED_16) for t in tiles]
            im.load()
            mode = im.mode
            meta = {"mode": mode}
            im = ImageOps.exif_transpose(im)  # a photographed film: the camera's rotation is in EXIF
            rawmodes = {_tile_rawmode(t) for t in tiles}
            sixteen = next(iter(rawmodes)) if len(rawmodes) == 1 and mode in ("RGB", "RGBA") else None
            sixteen = sixteen if sixteen and _SIXTEEN_BIT_COLOUR.fullmatch(sixteen) else None
            samples = _sixteen_bit_samples(path, im, tiles, sixteen) if sixteen and _low_bytes_work() else None
            if signed:  # Sample Format 2 (Pillow opens it BlackIsZero only): over the range 16 signed bits
                # allow, as a DICOM's Bits Stored 16; no "max" (prepare's 12-bit check is for unsigned data)
                meta["signed"] = True
                x = (np.asarray(im).astype(np.float64) + 32768.0) / 65535.0
            elif mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im).astype(np.float64)
                if arr.min() < 0 or arr.max() > 65535:
                    raise SkipImage(f"32-bit integer image with values outside 0..65535 ({mode})")
                meta["max"] = int(arr.max())
                x = arr / 65535.0
                if white_is_zero and mode.startswith("I;16"):
                    x, meta["white_is_zero"] = 1.0 - x, True
            elif mode == "F":
                raise SkipImage("floating-point image files are not supported")
            elif samples is not None:  # 16-bit colour or grey + alpha, read whole
                meta["bits"], meta["max"] = 16, int(samples.max())
                gray = samples[..., 0] if samples.shape[-1] == 1 else samples @ np.array([0.299, 0.587, 0.114])
                x = gray / 65535.0
            else:
                # 16-bit samples that Pillow unpacks to 8 bits and that were not read whole (premultiplied
                # alpha, CMYK, ...), or a PNG whose IHDR says 16 bits where Pillow's raw mode does not
                if any(r and ";16" in r for r in rawmodes) or \
                        (fmt == "PNG" and mode in ("RGB", "RGBA") and _png_sixteen_bit_colour(path)):
                    meta["read_at_8_bits"] = True  # prepare counts them
                    if not _said_8_bits:
                        _said_8_bits = True
                        log.warning(f"{path}: 16 bits per sample ({fmt} {mode}), read at 8 bits: Pillow keeps "
                                    f"only each sample's high byte, and the low bytes could not be decoded; "
                                    f"further such files are not said one by one")
                if mode != "L":
                    im = im.convert("L")  # colour, palette, and 1-bit (0/1 -> 0/255)
                x = np.asarray(im, dtype=np.float64) / 255.0
    except Image.DecompressionBombError as exc:  # not an OSError: it stopped fid over a folder
        raise SkipImage(f"too many pixels for Pillow to decode ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SkipImage(f"unreadable image ({type(exc).__name__}: {exc})") from exc
    return Radiograph(x.astype(np.float32), str(path), meta=meta)


def read_radiograph(path: str | os.PathLike) -> Radiograph:
    """Read one file; raises SkipImage with the reason when it is not a usable radiograph."""
    return read_dicom(path) if reader_kind(path) == "dicom" else read_pillow(path)


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every candidate file below ``root`` (recursively, into linked folders too: a data set is
    often gathered by linking its parts, such as ChestX-ray14's ``images_001`` ... ``images_012``,
    into one folder; a folder reached twice is walked once), sorted; hidden files and files whose
    suffix says they are no image (``NOT_IMAGE_SUFFIXES``) left out. No file is opened: one
    with an unknown suffix is a candidate that ``read_radiograph`` reads by its content."""
    return list(iter_images(root))


def one_per_file(files: list[Path], listed=frozenset(), listed_in: str = "") -> tuple[list[Path], list[dict]]:
    """``files`` with each file reached more than once (by a link to it, or a link beside another
    to the same file) kept once: under a name in ``listed`` (the label file's) where it has one,
    else where first found; and a row (``source``, ``reason``) for each of the others. One image
    twice would be two rows of an archive (under another name than the label file's it is in no
    split, and a GAN would train on a test image), or weigh double in FID. ``listed_in``: where
    the caller lists the others, said in the log."""
    real_dirs: dict[Path, str] = {}

    def real(f: Path) -> str:
        if os.path.islink(f):
            return os.path.realpath(f)
        if f.parent not in real_dirs:
            real_dirs[f.parent] = os.path.realpath(f.parent)
        return os.path.join(real_dirs[f.parent], f.name)
    keys = [real(f) for f in files]
    groups: dict[str, list[Path]] = {}
    for f, key in zip(files, keys):
        groups.setdefault(key, []).append(f)
    chosen = {key: next((f for f in group if f.name in listed), group[0]) for key, group in groups.items()}
    kept = [f for f, key in zip(files, keys) if chosen[key] is f]
    others = [{"source": str(f), "reason": f"the same file as {chosen[key]} (a link), which is read instead"}
              for f, key in zip(files, keys) if chosen[key] is not f]
    if others:
        log.info(f"{len(others)} image files are links to files found already, and are left out"
                 f"{f' ({listed_in})' if listed_in else ''}: "
                 + ", ".join(o["source"] for o in others[:3]) + (", ..." if len(others) > 3 else ""))
    return kept, others


def iter_images(root: str | os.PathLike):
    """``find_images``'s files one by one, in its order, as the walk finds them: whether a folder
    holds any needs only the first (a folder of 100k images on a network file system takes a while
    to list)."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or directory")
    walked = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in walked:  # a link back up the tree, or a second link to one folder
            dirnames[:] = []
            continue
        walked.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() not in NOT_IMAGE_SUFFIXES:
                yield Path(dirpath) / name
