"""DICOM files written by the tests (pydicom), with known stored pixels; and the 16-bit colour PNG
and TIFF files that Pillow cannot write (a small encoder of each)."""
import itertools
import struct
import zlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"


def base_dataset(sop_class=DX_STORAGE, ts=ExplicitVRLittleEndian, patient="P001"):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.StudyInstanceUID, ds.Modality = patient, generate_uid(), "DX"
    return ds


def write_image(path, stored, photometric="MONOCHROME2", bits_stored=12, signed=False, frames=1, **attrs):
    ds = image_dataset(stored, photometric, bits_stored, signed, frames, **attrs)
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_bare_image(path, stored, implicit=True, keep_file_meta=False, **kwargs):
    """The data set of ``write_image`` written without the PS3.10 header (no preamble, no "DICM"),
    as older equipment and some PACS exports write DICOM: the file starts at its first element,
    of group 0008, or of group 0002 where the File Meta Information is kept."""
    ds = image_dataset(stored, **kwargs)
    if keep_file_meta:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    else:
        del ds.file_meta
    ds.save_as(path, enforce_file_format=False, implicit_vr=implicit, little_endian=True)
    return ds


def image_dataset(stored, photometric="MONOCHROME2", bits_stored=12, signed=False, frames=1, **attrs):
    stored = np.asarray(stored)
    ds = base_dataset()
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def write_rt_plan(path):
    ds = base_dataset(RT_PLAN_STORAGE)
    ds.Modality = "RTPLAN"
    ds.RTPlanLabel = "PLAN"
    ds.save_as(path, enforce_file_format=True)


def voi_lut_sequence(first_mapped, lut, bits):
    item = Dataset()
    item.LUTDescriptor = [len(lut), first_mapped, bits]
    item.LUTData = np.asarray(lut, dtype=np.uint16).tobytes()
    item["LUTData"].VR = "OW"
    return pydicom.Sequence([item])


def _png_filter(rows, bpp, kind):
    """PNG filter type ``kind`` (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth; PNG 9.2) applied to the rows
    (uint8, one per scanline, the line before the first being zeros)."""
    x = rows.astype(np.int32)
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]  # the byte bpp to the left
    b = np.zeros_like(x)
    b[1:] = x[:-1]  # the byte above
    c = np.zeros_like(x)
    c[1:, bpp:] = x[:-1, :-bpp]  # above and to the left
    if kind == 0:
        pred = np.zeros_like(x)
    elif kind == 1:
        pred = a
    elif kind == 2:
        pred = b
    elif kind == 3:
        pred = (a + b) // 2
    else:
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    return ((x - pred) % 256).astype(np.uint8)


def _png_scanlines(samples, bit_depth, filters):
    """The filtered scanlines of one (sub)image, the row filters taken in turn from ``filters``."""
    h, w, n = samples.shape
    rows = samples.astype(">u2" if bit_depth == 16 else "u1").reshape(h, -1).view(np.uint8)
    filtered = {kind: _png_filter(rows, n * bit_depth // 8, kind) for kind in set(filters)}
    return b"".join(bytes([kind]) + filtered[kind][y].tobytes()
                    for y, kind in zip(range(h), itertools.cycle(filters)))


# Adam7: the first column and row of each pass, and its steps across and down (PNG 8.2)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def write_png(path, samples, bit_depth=16, filters=(0, 1, 2, 3, 4), interlace=False):
    """A PNG of ``samples`` ((H, W) grey, (H, W, 2) grey + alpha, (H, W, 3) colour, (H, W, 4)
    colour + alpha) at ``bit_depth`` 8 or 16, each scanline filtered with the next of ``filters``,
    Adam7-interlaced if asked: what Pillow cannot write at 16 bits."""
    samples = np.asarray(samples)
    if samples.ndim == 2:
        samples = samples[..., None]
    h, w, n = samples.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[n]
    if interlace:
        raw = b"".join(_png_scanlines(samples[y0::dy, x0::dx], bit_depth, filters)
                       for x0, y0, dx, dy in _ADAM7 if samples[y0::dy, x0::dx].size)
    else:
        raw = _png_scanlines(samples, bit_depth, filters)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, int(interlace))
    data = zlib.compress(raw)
    with open(path, "wb") as fh:  # the image data in two IDAT chunks, as encoders split it
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data[:len(data) // 2]) +
                 chunk(b"IDAT", data[len(data) // 2:]) + chunk(b"IEND", b""))


def write_tiff(path, samples, byte_order="<", deflate=False, alpha=2, photometric=None, orientation=None):
    """A TIFF of 16-bit RGB or RGBA ``samples`` ((H, W, 3 or 4)), or grey ones ((H, W); 8-bit where
    ``samples`` are uint8, signed 16-bit, Sample Format 2, where they are int16), in one strip,
    in either byte order, uncompressed (Pillow's own decoder) or deflated (libtiff's), the alpha
    unassociated (``alpha`` 2) or premultiplied (1), ``photometric`` the Photometric Interpretation
    (default 2, RGB, or 1, BlackIsZero, for grey; 0 is WhiteIsZero), ``orientation`` the Orientation
    tag (274; none by default): what Pillow cannot write."""
    samples = np.asarray(samples)
    if samples.ndim == 2:
        samples = samples[..., None]
    h, w, n = samples.shape
    photometric = (2 if n >= 3 else 1) if photometric is None else photometric
    bits = 8 if n == 1 and samples.dtype == np.uint8 else 16
    signed = n == 1 and samples.dtype == np.int16
    data = samples.astype(byte_order + ("u1" if bits == 8 else "i2" if signed else "u2")).tobytes()
    if deflate:
        data = zlib.compress(data)
    # (tag, type: 3 SHORT / 4 LONG, count, value); None: an offset filled in below
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, n, bits if n == 1 else None), (259, 3, 1, 8 if deflate else 1),
               (262, 3, 1, photometric), (273, 4, 1, None), (277, 3, 1, n), (278, 3, 1, h), (279, 4, 1, len(data))]
    if orientation is not None:
        entries.insert(5, (274, 3, 1, orientation))  # the tags in ascending order
    if n == 4:
        entries.append((338, 3, 1, alpha))  # Extra Samples
    if signed:
        entries.append((339, 3, 1, 2))  # Sample Format: two's complement signed integer
    bits_at = 8 + 2 + 12 * len(entries) + 4
    data_at = bits_at + (2 * n if n > 1 else 0)
    out = (b"II" if byte_order == "<" else b"MM") + struct.pack(byte_order + "HIH", 42, 8, len(entries))
    for tag, kind, count, value in entries:
        if value is None:
            field = struct.pack(byte_order + "I", bits_at if tag == 258 else data_at)
        else:
            field = struct.pack(byte_order + ("HH" if kind == 3 else "I"), *((value, 0) if kind == 3 else (value,)))
        out += struct.pack(byte_order + "HHI", tag, kind, count) + field
    out += struct.pack(byte_order + "I", 0) + (struct.pack(byte_order + f"{n}H", *[16] * n) if n > 1 else b"") + data
    with open(path, "wb") as fh:
        fh.write(out)
