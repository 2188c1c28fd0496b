import pickle
import re
import struct
import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps, features
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import JPEG2000Lossless, RLELossless

from xrayforge.data import readers
from xrayforge.data.readers import SkipImage, file_kind, find_images, read_radiograph

from dicom_factory import (RT_PLAN_STORAGE, base_dataset, image_dataset, voi_lut_sequence, write_bare_image,
                           write_image, write_png, write_rt_plan, write_tiff)

STORED = np.array([[0, 100, 2000], [4095, 1024, 3000]], dtype=np.uint16)


def test_monochrome2_scaled_by_bits_stored(tmp_path):
    write_image(tmp_path / "a.dcm", STORED, bits_stored=12)
    rad = read_radiograph(tmp_path / "a.dcm")
    np.testing.assert_allclose(rad.pixels, STORED / 4095, rtol=0, atol=1e-7)
    assert rad.patient_id == "P001" and rad.study_id


def test_monochrome1_is_inverted(tmp_path):
    write_image(tmp_path / "a.dcm", STORED, photometric="MONOCHROME1")
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.dcm").pixels, 1 - STORED / 4095, atol=1e-7)


def test_rescale_then_window(tmp_path):
    # modality values 2 * stored - 1000; window centre 1000, width 2001 (DICOM's linear function)
    write_image(tmp_path / "a.dcm", STORED, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000,
                WindowWidth=2001)
    values = 2.0 * STORED - 1000
    expected = np.clip((values - 999.5) / 2000 + 0.5, 0, 1)
    expected[values <= 999.5 - 1000] = 0
    expected[values > 999.5 + 1000] = 1
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.dcm").pixels, expected, atol=1e-6)


def test_first_of_several_windows_is_used(tmp_path):
    write_image(tmp_path / "a.dcm", STORED, WindowCenter=[2048, 100], WindowWidth=[4096, 50])
    expected = np.clip((STORED - 2047.5) / 4095 + 0.5, 0, 1)
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.dcm").pixels, expected, atol=1e-6)


def test_voi_lut_sequence(tmp_path):
    lut = np.linspace(0, 255, 4096).round().astype(int)[::-1]  # an inverting 8-bit LUT
    write_image(tmp_path / "a.dcm", STORED, VOILUTSequence=voi_lut_sequence(0, lut, 8))
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.dcm").pixels, lut[STORED] / 255, atol=1e-6)


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_voi_lut_of_a_negative_rescale_reads_its_first_mapped_value_as_signed(tmp_path, implicit):
    """Unsigned stored pixels, Rescale Intercept -1024, a VOI LUT from -1024: the first mapped value
    (US or SS) read as US, 64512, put every pixel below the LUT, a blank image. Read as the LUT's
    input, signed here, it is -1024; stored pixels that are signed keep their own reading."""
    lut = np.linspace(0, 4095, 4096).round().astype(int)[::-1]
    seq = voi_lut_sequence(0, lut, 12)
    seq[0].LUTDescriptor = [4096, 64512, 12]  # -1024 as US, as pydicom writes and reads it for unsigned pixels
    write_bare_image(tmp_path / "a.dcm", STORED, implicit=implicit, keep_file_meta=True, RescaleSlope=1,
                     RescaleIntercept=-1024, VOILUTSequence=seq)
    assert pydicom.dcmread(tmp_path / "a.dcm", force=True).VOILUTSequence[0].LUTDescriptor[1] == 64512
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.dcm").pixels, lut[STORED] / 4095, rtol=0, atol=1e-7)
    signed = np.array([[-1024, -1000, 0], [2047, 100, -1]])
    seq = voi_lut_sequence(0, lut, 12)
    seq[0].LUTDescriptor = [4096, -1024, 12]
    write_image(tmp_path / "s.dcm", signed, signed=True, VOILUTSequence=seq)
    np.testing.assert_allclose(read_radiograph(tmp_path / "s.dcm").pixels, lut[signed + 1024] / 4095, rtol=0,
                               atol=1e-7)
    # 16-bit unsigned pixels and the same intercept: a LUT from 40000 lies inside what the pixels reach
    # (-1024 .. 64511), so 40000 is meant as read, not as -25536 (which gave a blank image too)
    wide = np.array([[41024, 42000, 45000], [43000, 44000, 41500]])
    write_bare_image(tmp_path / "u16.dcm", wide, implicit=implicit, keep_file_meta=True, bits_stored=16,
                     RescaleSlope=1, RescaleIntercept=-1024, VOILUTSequence=voi_lut_sequence(40000, lut, 12))
    np.testing.assert_allclose(read_radiograph(tmp_path / "u16.dcm").pixels,
                               lut[np.clip(wide - 1024 - 40000, 0, 4095)] / 4095, rtol=0, atol=1e-7)


def test_16_bit_full_range(tmp_path):
    stored = np.array([[0, 65535], [32768, 1]], dtype=np.uint16)
    write_image(tmp_path / "a.dcm", stored, bits_stored=16)
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.dcm").pixels, stored / 65535, atol=1e-7)


def test_signed_pixels_with_rescale(tmp_path):
    stored = np.array([[-2048, 0], [2047, 100]], dtype=np.int16)
    write_image(tmp_path / "a.dcm", stored, bits_stored=12, signed=True, RescaleSlope=1, RescaleIntercept=0)
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.dcm").pixels, (stored + 2048) / 4095, atol=1e-7)


def test_rle_compressed_equals_uncompressed(tmp_path):
    ds = write_image(tmp_path / "plain.dcm", STORED)
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(read_radiograph(tmp_path / "rle.dcm").pixels,
                                  read_radiograph(tmp_path / "plain.dcm").pixels)


def test_dicom_without_suffix_is_recognised(tmp_path):
    write_image(tmp_path / "IM0001", STORED)
    assert read_radiograph(tmp_path / "IM0001").pixels.shape == (2, 3)


def test_png_16_bit_is_not_clipped(tmp_path):
    arr = np.array([[0, 300, 65535], [1000, 40000, 255]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")  # uint16 -> a 16-bit PNG
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.png").pixels, arr / 65535, atol=1e-7)
    Image.fromarray((arr // 257).astype(np.uint8)).save(tmp_path / "b.png")
    np.testing.assert_allclose(read_radiograph(tmp_path / "b.png").pixels, (arr // 257) / 255, atol=1e-7)


def test_rgb_jpeg_becomes_gray(tmp_path):
    Image.fromarray(np.full((4, 4, 3), 128, dtype=np.uint8)).save(tmp_path / "c.jpg")
    px = read_radiograph(tmp_path / "c.jpg").pixels
    assert px.shape == (4, 4) and abs(px.mean() - 128 / 255) < 0.02


@pytest.mark.parametrize("kind,reason", [
    ("truncated", "could not be decoded|unreadable"),
    ("not_dicom", r"^not a DICOM file \(no 'DICM' prefix after the 128-byte preamble[^=]*$"),
    ("rt_plan", "no pixel data"),
    ("multiframe", "multi-frame"),
    ("jpeg2000_garbage", "could not be decoded"),
    ("text", "unsupported file type"),
    ("broken_png", "unreadable image"),
])
def test_bad_files_are_skipped_with_a_reason(tmp_path, kind, reason):
    path = tmp_path / f"{kind}.dcm"
    if kind == "truncated":
        write_image(path, np.zeros((64, 64), dtype=np.uint16))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 4000])
    elif kind == "not_dicom":
        path.write_bytes(b"\x00" * 50 + b"hello" * 40)
    elif kind == "rt_plan":
        write_rt_plan(path)
    elif kind == "multiframe":
        write_image(path, np.zeros((2, 4, 4), dtype=np.uint16), frames=2)
    elif kind == "jpeg2000_garbage":
        ds = base_dataset(ts=JPEG2000Lossless)
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"garbage" * 10])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    elif kind == "text":
        path = tmp_path / "notes.txt"
        path.write_text("not an image")
    elif kind == "broken_png":
        path = tmp_path / "broken.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(SkipImage, match=reason) as caught:
        read_radiograph(path)
    assert "\n" not in str(caught.value)  # one line, as skipped.csv and the console list reasons


def test_a_skip_reason_is_one_line_wherever_it_is_printed():
    """pydicom's "no decoder" message lists each plugin on a line of its own; prepare's skipped.csv
    flattened it, but its console summary, fid's skipped files and the reader study printed the
    lines as they were. SkipImage itself makes its reason one line, so every caller gets that."""
    exc = SkipImage("pixel data could not be decoded (Unable to decode:\n  gdcm: not installed\n\tpylibjpeg:  no)\n")
    assert str(exc) == "pixel data could not be decoded (Unable to decode: gdcm: not installed pylibjpeg: no)"
    assert str(pickle.loads(pickle.dumps(exc))) == str(exc)  # as it comes back from a worker process
    assert str(SkipImage()) == ""


def test_find_images_walks_recursively(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.png").write_bytes(b"")
    (tmp_path / "a" / "y.dcm").write_bytes(b"")
    (tmp_path / ".hidden.png").write_bytes(b"")
    assert [p.name for p in find_images(tmp_path)] == ["y.dcm", "x.png"] or \
        sorted(p.name for p in find_images(tmp_path)) == ["x.png", "y.dcm"]
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "missing")


def test_dicom_named_by_uid_or_with_a_vendor_suffix_is_read(tmp_path):
    write_image(tmp_path / "1.2.840.113619.2.55.3.604688", STORED)  # suffix '.604688'
    write_image(tmp_path / "scan.IMA", STORED)
    Image.fromarray(np.full((3, 5), 255, dtype=np.uint8)).save(tmp_path / "film.img", format="PNG")
    (tmp_path / "garbage.xyz").write_bytes(b"\x00" * 300)
    for name in ("notes.txt", "Data_Entry_2017.csv", "summary.json", "feats.npz"):
        (tmp_path / name).write_text("not an image")
    assert [p.name for p in find_images(tmp_path)] == ["1.2.840.113619.2.55.3.604688", "film.img", "garbage.xyz",
                                                       "scan.IMA"]
    for name in ("1.2.840.113619.2.55.3.604688", "scan.IMA"):
        np.testing.assert_allclose(read_radiograph(tmp_path / name).pixels, STORED / 4095, atol=1e-7)
    assert read_radiograph(tmp_path / "film.img").pixels.min() == 1
    with pytest.raises(SkipImage, match="unsupported file type .xyz: neither DICOM nor"):
        read_radiograph(tmp_path / "garbage.xyz")


def test_find_images_opens_no_file(tmp_path, monkeypatch):
    for i in range(3):
        Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.2.3.4").write_bytes(b"")

    def no_open(*args, **kwargs):
        raise AssertionError("find_images opened a file")
    monkeypatch.setattr("builtins.open", no_open)
    monkeypatch.setattr("io.open", no_open)
    assert len(find_images(tmp_path)) == 4


def test_one_bit_png_is_black_and_white(tmp_path):
    bw = np.zeros((4, 6), dtype=bool)
    bw[:, 3:] = True
    Image.fromarray(bw).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "1"
    np.testing.assert_array_equal(read_radiograph(tmp_path / "a.png").pixels, bw.astype(np.float32))


def test_jpeg_exif_orientation_is_applied(tmp_path):
    img = np.zeros((20, 40), dtype=np.uint8)
    img[:5] = 255  # bright top rows: on the right once turned 90° clockwise (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "a.jpg", exif=exif, quality=95)
    px = read_radiograph(tmp_path / "a.jpg").pixels
    assert px.shape == (40, 20)
    assert px[:, -5:].mean() > 0.9 and px[:, :10].mean() < 0.1
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "a.jpg")), dtype=np.float32) / 255
    np.testing.assert_allclose(px, expected, atol=1e-6)


def test_sixteen_bit_png_reports_its_largest_value(tmp_path):
    arr = np.array([[0, 300], [4095, 17]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    rad = read_radiograph(tmp_path / "a.png")
    assert rad.meta["max"] == 4095
    np.testing.assert_allclose(rad.pixels, arr / 65535, atol=1e-7)


def test_bmp_is_known_by_its_header_not_by_bm_alone(tmp_path):
    Image.fromarray(np.full((3, 5), 200, dtype=np.uint8)).save(tmp_path / "film.scan", format="BMP")
    assert file_kind(tmp_path / "film.scan") == "image"
    np.testing.assert_allclose(read_radiograph(tmp_path / "film.scan").pixels, 200 / 255, atol=1e-7)
    (tmp_path / "BMW.service").write_text("BMW 320d service history\n2019-04-02  oil, filters\n" * 4)
    assert file_kind(tmp_path / "BMW.service") == ""
    with pytest.raises(SkipImage, match="unsupported file type .service: neither DICOM nor"):
        read_radiograph(tmp_path / "BMW.service")


def test_a_known_suffix_is_read_without_looking_at_the_content(tmp_path, monkeypatch):
    write_image(tmp_path / "a.dcm", STORED)
    Image.fromarray(np.full((3, 5), 255, dtype=np.uint8)).save(tmp_path / "b.png")
    write_image(tmp_path / "IM0001", STORED)

    def sniffed(path):
        raise AssertionError(f"{path}: opened to look at its content")
    monkeypatch.setattr(readers, "file_kind", sniffed)
    assert read_radiograph(tmp_path / "a.dcm").pixels.shape == (2, 3)
    assert read_radiograph(tmp_path / "b.png").pixels.shape == (3, 5)
    with pytest.raises(AssertionError, match="IM0001: opened"):  # no suffix: only the content can say
        read_radiograph(tmp_path / "IM0001")


@pytest.mark.parametrize("function,expected", [
    # PS3.3 C.11.2.1.3.2: 0 at or below c - w/2, 1 above c + w/2, (x - c) / w + 0.5 between
    ("LINEAR_EXACT", np.clip((STORED - 2048.0) / 4096 + 0.5, 0, 1)),
    # PS3.3 C.11.2.1.3.1: 1 / (1 + exp(-4 (x - c) / w))
    ("SIGMOID", 1 / (1 + np.exp(-4 * (STORED - 2048.0) / 4096))),
    ("LINEAR", np.clip((STORED - 2047.5) / 4095 + 0.5, 0, 1)),
])
def test_voi_lut_function_is_applied(tmp_path, function, expected):
    write_image(tmp_path / "a.dcm", STORED, WindowCenter=2048, WindowWidth=4096, VOILUTFunction=function)
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.dcm").pixels, expected, atol=1e-6)


def test_window_of_width_one_is_a_threshold(tmp_path):
    write_image(tmp_path / "a.dcm", STORED, WindowCenter=1024.5, WindowWidth=1)
    with np.errstate(all="raise"):  # no division by zero on the way
        px = read_radiograph(tmp_path / "a.dcm").pixels
    np.testing.assert_array_equal(px, (STORED > 1024).astype(np.float32))


def test_empty_window_and_voi_lut_sequence_count_as_absent(tmp_path):
    ds = write_image(tmp_path / "a.dcm", STORED, VOILUTSequence=pydicom.Sequence([]))
    ds.add_new(0x00281050, "DS", None)  # Window Center, present and empty
    ds.add_new(0x00281051, "DS", None)  # Window Width
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    rad = read_radiograph(tmp_path / "a.dcm")
    np.testing.assert_allclose(rad.pixels, STORED / 4095, atol=1e-7)
    assert rad.meta["voi"] == "bits stored"


def test_modality_lut_sequence_output_is_scaled_by_its_own_range(tmp_path):
    item = pydicom.Dataset()
    item.LUTDescriptor, item.ModalityLUTType = [4096, 0, 16], "US"
    item.LUTData = (np.arange(4096, dtype=np.uint16) * 16).tobytes()  # 12 bits in, 16 bits out
    item["LUTData"].VR = "OW"
    write_image(tmp_path / "a.dcm", STORED, ModalityLUTSequence=pydicom.Sequence([item]))
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.dcm").pixels, STORED * 16 / 65535, atol=1e-7)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_colour_dicom_becomes_its_luminance(tmp_path, photometric):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0], rgb[0, :, 1], rgb[1, :, 2] = 200, 50, 120
    ds = base_dataset()
    ds.Rows, ds.Columns = 2, 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    stored = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", photometric)
    ds.PixelData = stored.tobytes()
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    expected = rgb.astype(np.float64) @ [0.299, 0.587, 0.114] / 255
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.dcm").pixels, expected, atol=2 / 255)


def test_a_dicomdir_is_skipped_naming_what_it_is(tmp_path):
    ds = base_dataset(sop_class="1.2.840.10008.1.3.10")  # Media Storage Directory Storage
    del ds.SOPClassUID, ds.Modality
    ds.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    with pytest.raises(SkipImage, match=r"no pixel data \(a Media Storage Directory Storage object"):
        read_radiograph(tmp_path / "DICOMDIR")


def test_find_images_follows_linked_folders_once(tmp_path):
    (tmp_path / "elsewhere" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / "elsewhere" / "images" / "a.png")
    (tmp_path / "cxr14").mkdir()
    (tmp_path / "cxr14" / "images_001").symlink_to(tmp_path / "elsewhere")  # a data set gathered by links
    (tmp_path / "cxr14" / "images_002").symlink_to(tmp_path / "elsewhere")  # the same folder twice
    (tmp_path / "cxr14" / "loop").symlink_to(tmp_path / "cxr14")  # a link back up the tree
    found = find_images(tmp_path / "cxr14")
    assert [p.relative_to(tmp_path / "cxr14").as_posix() for p in found] == ["images_001/images/a.png"]


@pytest.mark.parametrize("attrs", [dict(WindowCenter="NaN", WindowWidth="400"), dict(RescaleSlope="NaN"),
                                   dict(RescaleSlope="inf"), dict(WindowCenter="inf", WindowWidth="400"),
                                   dict(WindowCenter="-inf", WindowWidth="400"),
                                   dict(WindowCenter="100", WindowWidth="inf"),
                                   dict(WindowCenter="NaN", WindowWidth="1"),
                                   dict(WindowCenter="inf", WindowWidth="400", VOILUTFunction="SIGMOID")])
def test_pixels_that_are_not_finite_are_skipped_not_made_black(tmp_path, attrs):
    """A NaN or infinite Rescale Slope or Window gives NaN pixels, which quantise to a black image
    in the archive, or (clipped by the window) a blank one: the file is skipped with the reason."""
    path = tmp_path / "nan.dcm"
    with warnings.catch_warnings():  # pydicom warns about the value when it writes it
        warnings.simplefilter("ignore")
        write_image(path, np.arange(16).reshape(4, 4) * 100, **attrs)
    with pytest.raises(SkipImage, match="not finite"):
        read_radiograph(path)


# DICOM without the PS3.10 header ------------------------------------------------------------------
@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
@pytest.mark.parametrize("name", ["IM0001", "a.dcm"])
def test_dicom_without_preamble_reads_as_with_it(tmp_path, implicit, name):
    """Older equipment and some PACS exports write DICOM without the PS3.10 header: no preamble, no
    "DICM", no File Meta Information (so no Transfer Syntax UID), the data set from its first
    element on. Such a file, with a suffix or without one, reads as the same data set with the header."""
    attrs = dict(RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=2001)
    write_image(tmp_path / "with_header.dcm", STORED, **attrs)
    write_bare_image(tmp_path / name, STORED, implicit=implicit, **attrs)
    data = (tmp_path / name).read_bytes()
    assert data[:4] == b"\x08\x00\x16\x00" and data[128:132] != b"DICM"  # starts at SOP Class UID
    assert (data[4:6] == b"UI") is not implicit
    assert file_kind(tmp_path / name) == "dicom"
    rad, ref = read_radiograph(tmp_path / name), read_radiograph(tmp_path / "with_header.dcm")
    np.testing.assert_array_equal(rad.pixels, ref.pixels)
    assert rad.pixels.std() > 0 and rad.patient_id == "P001" and rad.study_id
    assert rad.meta["no_preamble"] and "no_preamble" not in ref.meta


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_file_meta_without_preamble_is_read(tmp_path, implicit):
    """The File Meta Information written without the preamble: the file starts at group 0002, and
    its Transfer Syntax UID says how the data set is encoded."""
    write_bare_image(tmp_path / "IM0002", STORED, implicit=implicit, keep_file_meta=True)
    assert (tmp_path / "IM0002").read_bytes()[:2] == b"\x02\x00"
    rad = read_radiograph(tmp_path / "IM0002")
    np.testing.assert_allclose(rad.pixels, STORED / 4095, atol=1e-7)


NOT_DICOM = (r"^not a DICOM file \(no 'DICM' prefix after the 128-byte preamble, which a DICOM file \(PS3.10\) "
             r"starts with, and its first bytes are no data element of group 0002 or 0008, which a DICOM data set "
             r"written without the preamble starts with\)$")
NOT_AN_IMAGE = (r"^not a DICOM image \(no 'DICM' prefix after the 128-byte preamble, which a DICOM file \(PS3.10\) "
                r"starts with; read as a DICOM data set written without the preamble, it has no ")


@pytest.mark.parametrize("name,reason", [
    ("random.dcm", NOT_DICOM),
    ("random", r"^unsupported file type \(no suffix\): neither DICOM nor a PNG"),
    ("notes.dcm", NOT_DICOM),
    ("element_then_noise.dcm", NOT_AN_IMAGE + r"Pixel Data, Rows, Columns, Bits Allocated, Photometric "
                                              r"Interpretation\)$"),
    ("element_then_noise", NOT_AN_IMAGE + "Pixel Data, Rows"),
    ("rt_plan.dcm", NOT_AN_IMAGE + r"Pixel Data, Rows, Columns, Bits Allocated, Photometric Interpretation: a "
                                   r"RTPLAN object\)$"),
])
def test_a_file_without_preamble_that_is_no_dicom_image_is_still_skipped(tmp_path, name, reason):
    """pydicom reads anything with force=True: a file without "DICM" is read only when its first
    bytes are a plausible first element of a data set, and kept only when what is read from it has
    pixel data and the image attributes; otherwise it is skipped with a reason that says so (and
    without pydicom's advice to use force=True)."""
    rng = np.random.default_rng(0)
    path = tmp_path / name
    if name.startswith("random"):
        path.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    elif name == "notes.dcm":
        path.write_text("Patient notes, not an image\nsecond line\n")
    elif name.startswith("element_then_noise"):  # SOP Class UID (0008,0016), explicit VR, then noise
        path.write_bytes(b"\x08\x00\x16\x00UI\x04\x001.2\x00" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    else:
        ds = base_dataset(RT_PLAN_STORAGE)
        ds.Modality, ds.RTPlanLabel = "RTPLAN", "PLAN"
        del ds.file_meta
        ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    with pytest.raises(SkipImage, match=reason) as caught:
        read_radiograph(path)
    assert "force" not in str(caught.value)
    assert file_kind(path) == ("dicom" if name.startswith(("element", "rt_plan")) else "")


@pytest.mark.parametrize("head,expected", [
    (b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", False),            # Specific Character Set, explicit
    (b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100", True),        # implicit
    (b"\x08\x00\x06\x00SQ\x00\x00\xff\xff\xff\xff\xfe\xff", False),  # a sequence of undefined length
    (b"\x08\x00\x10\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff", None),   # (0008,1110): not a first element
    (b"\x08\x00\x08\x00\x00\x00\x00\x00" + b"\x00" * 4, True),   # a raw 16-bit dump's dark corner: (0008,0008)
    (b"\x08\x00\x0a\x00\x00\x00\x00\x00" + b"\x00" * 4, True),   # ... (0008,000A): group 0008 up to 0018
    (b"\x08\x00\x18\x00UI\x04\x001.2\x00", False),             # SOP Instance UID first (its class stripped)
    (b"\x08\x00\x20\x00DA\x08\x0020240101", None),              # (0008,0020): never the first element
    (b"\x08\x00\x05\x00CS\x0b\x00ISO_IR 100", None),             # odd length
    (b"\x08\x00\x05\x00\x00\x10\x00\x00ISO_IR 100", None),        # longer than the file
    (b"\x08\x00\x00\x70OB\x01\x00\x00\x00ISO_IR 100", None),      # OB without its reserved zero bytes
    (b"\x10\x00\x10\x00PN\x04\x00Doe^", None),                   # group 0010 first: not how a data set starts
    (b"\x08\x00", None),                                           # too short
])
def test_bare_dataset_encoding(head, expected):
    assert readers.bare_dataset_encoding(head, len(head) + 20) is expected


# 16-bit colour and grey + alpha: Pillow opens them at 8 bits ---------------------------------------
def _luminance(samples):
    samples = np.asarray(samples, dtype=np.float64)
    return samples[..., 0] if samples.shape[-1] == 2 else samples[..., :3] @ [0.299, 0.587, 0.114]


def _sixteen_bit_samples(channels, seed=0):
    """Random 16-bit samples, and in the first row grey pixels alike in their high bytes (0x12)
    and differing in their low bytes: at 8 bits they would be one grey."""
    samples = np.random.default_rng(seed).integers(0, 65536, (9, 10, channels), dtype=np.uint16)
    samples[0, :, :] = (0x1200 + np.arange(0, 250, 25, dtype=np.uint16))[:, None]
    return samples


def test_the_png_writer_of_the_tests_writes_what_pillow_reads(tmp_path):
    """write_png (all five row filters, Adam7 interlace) checked against Pillow at 8 bits and at 16
    bits grey, which Pillow reads whole."""
    rng = np.random.default_rng(3)
    for interlace in (False, True):
        for channels, mode in ((1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")):
            samples = rng.integers(0, 256, (13, 11, channels), dtype=np.uint8)
            path = tmp_path / f"w{channels}{interlace}.png"
            write_png(path, samples[..., 0] if channels == 1 else samples, bit_depth=8, interlace=interlace)
            with Image.open(path) as im:
                assert im.mode == mode
                np.testing.assert_array_equal(np.asarray(im).reshape(samples.shape), samples)
        grey = rng.integers(0, 65536, (13, 11), dtype=np.uint16)
        write_png(tmp_path / "g.png", grey, interlace=interlace)
        with Image.open(tmp_path / "g.png") as im:
            np.testing.assert_array_equal(np.asarray(im), grey)


@pytest.mark.parametrize("interlace", [False, True], ids=["", "interlaced"])
@pytest.mark.parametrize("channels", [3, 4, 2], ids=["RGB", "RGBA", "LA"])
def test_sixteen_bit_colour_png_keeps_its_low_bytes(tmp_path, channels, interlace):
    """Pillow opens a 16-bit RGB, RGBA or grey + alpha PNG as 8-bit RGB(A), each sample's high byte:
    the low bytes are decoded too, and the luminance has the whole 16 bits."""
    samples = _sixteen_bit_samples(channels)
    write_png(tmp_path / "a.png", samples, interlace=interlace)
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode in ("RGB", "RGBA")  # what Pillow makes of it
    rad = read_radiograph(tmp_path / "a.png")
    np.testing.assert_allclose(rad.pixels, _luminance(samples) / 65535, rtol=0, atol=1e-7)
    assert len(np.unique(rad.pixels[0])) == 10  # alike in their high bytes, apart in their low ones
    grey = samples[..., :1] if channels == 2 else samples[..., :3]
    assert rad.meta["max"] == grey.max() and "read_at_8_bits" not in rad.meta


@pytest.mark.parametrize("byte_order", ["<", ">"], ids=["II", "MM"])
@pytest.mark.parametrize("deflate", [False, True], ids=["raw", "deflate"])
@pytest.mark.parametrize("channels", [3, 4], ids=["RGB", "RGBA"])
def test_sixteen_bit_colour_tiff_keeps_its_low_bytes(tmp_path, byte_order, deflate, channels):
    """The same for TIFF: Pillow's own decoder (uncompressed) and libtiff's (deflated), either byte order."""
    if deflate and not features.check("libtiff"):
        pytest.skip("Pillow without libtiff")
    samples = _sixteen_bit_samples(channels)
    write_tiff(tmp_path / "a.tif", samples, byte_order, deflate)
    rad = read_radiograph(tmp_path / "a.tif")
    np.testing.assert_allclose(rad.pixels, _luminance(samples) / 65535, rtol=0, atol=1e-7)
    assert "read_at_8_bits" not in rad.meta


@pytest.mark.parametrize("deflate", [False, True], ids=["raw", "deflate"])
def test_sixteen_bit_white_is_zero_tiff_is_inverted_as_eight_bit_is(tmp_path, deflate):
    """A grey TIFF whose Photometric Interpretation is WhiteIsZero (DICOM's MONOCHROME1) shows 0 as
    white: Pillow inverts 8-bit samples as it unpacks them but gives 16-bit ones as stored, which made
    a 16-bit one a negative in the archive. BlackIsZero is read as stored."""
    if deflate and not features.check("libtiff"):
        pytest.skip("Pillow without libtiff")
    stored = np.array([[0, 1000, 30000], [65535, 4095, 12]], dtype=np.uint16)
    write_tiff(tmp_path / "white.tif", stored, deflate=deflate, photometric=0)
    write_tiff(tmp_path / "black.tif", stored, deflate=deflate, photometric=1)
    np.testing.assert_allclose(read_radiograph(tmp_path / "white.tif").pixels, 1 - stored / 65535, rtol=0, atol=1e-7)
    np.testing.assert_allclose(read_radiograph(tmp_path / "black.tif").pixels, stored / 65535, rtol=0, atol=1e-7)
    eight = np.array([[0, 100, 255]], dtype=np.uint8)  # as Pillow reads 8-bit WhiteIsZero
    write_tiff(tmp_path / "white8.tif", eight, deflate=deflate, photometric=0)
    np.testing.assert_allclose(read_radiograph(tmp_path / "white8.tif").pixels, 1 - eight / 255, rtol=0, atol=1e-7)


# a TIFF's Orientation tag (274): how the stored rows and columns are displayed (TIFF 6.0, section 8)
_DISPLAYED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
              5: lambda a: a.T, 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].T, 8: lambda a: np.rot90(a)}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("deflate", [False, True], ids=["raw", "deflate"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_orientation_is_applied_once_and_whole(tmp_path, orientation, deflate, dtype):
    """Pillow applies a TIFF's Orientation as it loads the file; from a file name it memory-maps an
    uncompressed one at its displayed size, which for the orientations that swap rows and columns
    (5-8) gave a scrambled image of the wrong shape, without a word."""
    if deflate and not features.check("libtiff"):
        pytest.skip("Pillow without libtiff")
    stored = (np.arange(4 * 6).reshape(4, 6) * 7 + 3).astype(dtype)
    write_tiff(tmp_path / "a.tif", stored, deflate=deflate, orientation=orientation)
    expected = _DISPLAYED[orientation](stored) / np.iinfo(dtype).max
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.tif").pixels, expected, rtol=0, atol=1e-7)


def test_eight_bit_colour_png_is_read_as_before(tmp_path):
    samples = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", samples, bit_depth=8)
    expected = np.asarray(Image.fromarray(samples).convert("L"), dtype=np.float64) / 255
    rad = read_radiograph(tmp_path / "a.png")
    np.testing.assert_allclose(rad.pixels, expected, atol=1e-7)
    assert "bits" not in rad.meta and "read_at_8_bits" not in rad.meta


@pytest.fixture(autouse=True)
def _fresh_low_bytes_check():
    """readers._low_bytes_work is decided once per process: each test decides it under its own patches."""
    readers._low_bytes_work.cache_clear()
    yield
    readers._low_bytes_work.cache_clear()


def test_a_pillow_that_ignores_the_raw_mode_is_caught_by_the_self_check(tmp_path, monkeypatch, caplog):
    """A Pillow that decodes the second time with its own raw mode again (the high bytes twice): read
    as 16 bits, every sample was off by up to its high byte's worth, unsaid. The self-check on known
    samples catches it: read at 8 bits, and said."""
    monkeypatch.setattr(readers, "_said_8_bits", False, raising=False)
    monkeypatch.setattr(readers, "_with_rawmode", lambda tile, rawmode: tile)
    write_png(tmp_path / "a.png", _sixteen_bit_samples(3, 0))
    with caplog.at_level("WARNING", logger="xrayforge.data.readers"):
        rad = read_radiograph(tmp_path / "a.png")
    assert rad.meta["read_at_8_bits"] and "read at 8 bits" in caplog.text
    with Image.open(tmp_path / "a.png") as im:
        np.testing.assert_allclose(rad.pixels, np.asarray(im.convert("L"), dtype=np.float64) / 255, atol=1e-7)


@pytest.mark.parametrize("pillow", ["other raw modes", "no such raw mode"])
def test_sixteen_bit_colour_that_cannot_be_read_whole_is_read_at_8_bits_and_said_once(tmp_path, monkeypatch,
                                                                                     caplog, pillow):
    """Where Pillow does not go along (a version whose raw modes are others: the PNG's IHDR still says
    16 bits; or one that lacks the other byte's raw mode), the image is read at 8 bits as Pillow
    gives it, which is said once (with the file) and marked in its meta for prepare to count."""
    monkeypatch.setattr(readers, "_said_8_bits", False, raising=False)
    if pillow == "other raw modes":
        monkeypatch.setattr(readers, "_SIXTEEN_BIT_COLOUR", re.compile("(?!)"), raising=False)
    else:
        real = readers._with_rawmode
        monkeypatch.setattr(readers, "_with_rawmode", lambda tile, rawmode: real(tile, "RGB;17Q"))
    for name, seed in (("a.png", 0), ("b.png", 1)):
        write_png(tmp_path / name, _sixteen_bit_samples(3, seed))
    with caplog.at_level("WARNING", logger="xrayforge.data.readers"):
        rads = [read_radiograph(tmp_path / name) for name in ("a.png", "b.png")]
    for name, rad in zip(("a.png", "b.png"), rads):
        with Image.open(tmp_path / name) as im:
            np.testing.assert_allclose(rad.pixels, np.asarray(im.convert("L"), dtype=np.float64) / 255, atol=1e-7)
        assert rad.meta["read_at_8_bits"] and "max" not in rad.meta
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(f"{tmp_path / 'a.png'}: 16 bits per sample (PNG RGB), read at 8 "
                                                 f"bits"), said


def test_sixteen_bit_tiff_with_premultiplied_alpha_is_said_to_be_read_at_8_bits(tmp_path, monkeypatch, caplog):
    """Pillow unpacks premultiplied 16-bit RGBA to 8 bits in a way that the other byte order cannot
    undo: the image is read at 8 bits, and that is said."""
    monkeypatch.setattr(readers, "_said_8_bits", False, raising=False)
    write_tiff(tmp_path / "a.tif", _sixteen_bit_samples(4), alpha=1)
    with caplog.at_level("WARNING", logger="xrayforge.data.readers"):
        rad = read_radiograph(tmp_path / "a.tif")
    assert rad.meta["read_at_8_bits"] and "a.tif: 16 bits per sample (TIFF RGBA), read at 8 bits" in caplog.text


@pytest.mark.parametrize("photometric,shape,inverted", [
    ("MONOCHROME2", None, False), ("MONOCHROME2", "IDENTITY", False), ("MONOCHROME2", "INVERSE", True),
    ("MONOCHROME1", None, True), ("MONOCHROME1", "INVERSE", True), ("MONOCHROME1", "IDENTITY", True)])
def test_presentation_lut_shape_inverse_is_shown_inverted(tmp_path, photometric, shape, inverted):
    """Presentation LUT Shape (2050,0020) INVERSE was ignored: a MONOCHROME2 image that asks to be shown
    inverted came out as a negative of what it shows. With MONOCHROME1, INVERSE is what PS3.3 C.7.6.1
    requires, the one inversion MONOCHROME1 means, not a second one that undoes it."""
    attrs = {} if shape is None else {"PresentationLUTShape": shape}
    write_image(tmp_path / "a.dcm", STORED, photometric=photometric, **attrs)
    write_image(tmp_path / "w.dcm", STORED, photometric=photometric, WindowCenter=2048, WindowWidth=4096, **attrs)
    plain, windowed = STORED / 4095, np.clip((STORED - 2047.5) / 4095 + 0.5, 0, 1)
    for name, expected in (("a.dcm", plain), ("w.dcm", windowed)):  # after the VOI transform, as MONOCHROME1
        rad = read_radiograph(tmp_path / name)
        np.testing.assert_allclose(rad.pixels, 1 - expected if inverted else expected, rtol=0, atol=1e-6)


def _float_image(path, values, tag="FloatPixelData", **attrs):
    """A DICOM image whose pixels are in Float (32-bit) or Double Float (64-bit) Pixel Data, which has
    no Bits Stored, High Bit or Pixel Representation."""
    ds = image_dataset(np.zeros(np.shape(values), dtype=np.uint16), **attrs)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32 if tag == "FloatPixelData" else 64
    setattr(ds, tag, np.asarray(values, dtype=np.float32 if tag == "FloatPixelData" else np.float64).tobytes())
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.mark.parametrize("tag", ["FloatPixelData", "DoubleFloatPixelData"])
def test_float_pixel_data_is_read_through_its_window(tmp_path, tag):
    """Float and Double Float Pixel Data failed with an AttributeError (no Bits Stored), which prepare
    reported as an unexpected error. It is read through its window, the image's own or, as a Parametric
    Map has it, its Frame VOI LUT functional group's; without one it is skipped, saying why."""
    values = np.array([[-1000.25, 0.5, 999.75], [3000.0, 1500.5, 10.0]])
    _float_image(tmp_path / "own.dcm", values, tag, WindowCenter=1000, WindowWidth=2001)
    rad = read_radiograph(tmp_path / "own.dcm")
    np.testing.assert_allclose(rad.pixels, np.clip((values - 999.5) / 2000 + 0.5, 0, 1), rtol=0, atol=1e-6)
    assert rad.meta["float_bits"] == (32 if tag == "FloatPixelData" else 64) and rad.meta["voi"] == "window"
    unit = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 0.6]])
    voi = pydicom.Dataset()
    voi.WindowCenter, voi.WindowWidth, voi.VOILUTFunction = 0.5, 0.5, "LINEAR_EXACT"
    group = pydicom.Dataset()
    group.FrameVOILUTSequence = pydicom.Sequence([voi])
    _float_image(tmp_path / "shared.dcm", unit, tag, SharedFunctionalGroupsSequence=pydicom.Sequence([group]))
    np.testing.assert_allclose(read_radiograph(tmp_path / "shared.dcm").pixels,
                               np.clip((unit - 0.5) / 0.5 + 0.5, 0, 1), rtol=0, atol=1e-6)
    _float_image(tmp_path / "bare.dcm", unit, tag)
    name = "Float Pixel Data" if tag == "FloatPixelData" else "Double Float Pixel Data"
    with pytest.raises(SkipImage, match=f"^{name} without a Window Center / Width: floating-point pixels have no "
                                        f"Bits Stored"):
        read_radiograph(tmp_path / "bare.dcm")


@pytest.mark.parametrize("byte_order", ["<", ">"], ids=["II", "MM"])
@pytest.mark.parametrize("deflate", [False, True], ids=["raw", "deflate"])
def test_signed_sixteen_bit_tiff_is_scaled_over_its_signed_range(tmp_path, byte_order, deflate):
    """A TIFF of signed 16-bit samples (Sample Format 2; Pillow's "I;16S") with a negative value was
    skipped as a "32-bit integer image with values outside 0..65535", and one without was scaled as
    unsigned. It is scaled over -32768..32767, as a DICOM's signed 16 bits are; libtiff (deflated) in
    big-endian order gave byte-swapped samples, Pillow taking its native output for big-endian."""
    if deflate and not features.check("libtiff"):
        pytest.skip("Pillow without libtiff")
    for stored in (np.array([[-1000, 0, 2000], [32767, -32768, 5]], dtype=np.int16),
                   np.array([[0, 10, 2000], [32767, 1, 4095]], dtype=np.int16)):
        write_tiff(tmp_path / "a.tif", stored, byte_order, deflate)
        rad = read_radiograph(tmp_path / "a.tif")
        np.testing.assert_allclose(rad.pixels, (stored + 32768.0) / 65535, rtol=0, atol=1e-7)
        assert rad.meta["signed"] and "max" not in rad.meta


def test_multi_page_tiff_is_skipped_but_not_for_its_thumbnail(tmp_path):
    """A TIFF of several pages was read as its first page without a word (a PA and a lateral view in one
    file gave only the PA). It is skipped, as a multi-frame DICOM is; a reduced-resolution copy of the
    first page (NewSubfileType 1) is no page of its own."""
    from PIL import TiffImagePlugin
    pages = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200, 30)]
    pages[0].save(tmp_path / "multi.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(SkipImage, match=r"^multi-page TIFF \(3 pages; only a single image is read\)$"):
        read_radiograph(tmp_path / "multi.tif")
    with TiffImagePlugin.AppendingTiffWriter(str(tmp_path / "thumb.tif"), new=True) as tf:
        for page, info in ((pages[0], {}), (pages[1].resize((2, 2)), {254: 1})):
            page.save(tf, format="TIFF", tiffinfo=info)
            tf.newFrame()
    with Image.open(tmp_path / "thumb.tif") as im:
        assert im.n_frames == 2
    np.testing.assert_allclose(read_radiograph(tmp_path / "thumb.tif").pixels, np.full((8, 8), 10 / 255), atol=1e-7)


def test_voi_lut_from_below_the_modality_range_takes_the_reading_that_covers_it(tmp_path):
    """12-bit unsigned pixels, Rescale Intercept -1024 (-1024 .. 3071), a VOI LUT from -2048 (wider than the
    data) written as US 63488: neither reading lies inside the range, and the one as read put every pixel below
    the LUT, a blank image. The reading whose entries cover the range, -2048, is meant."""
    lut = np.linspace(0, 4095, 4096).round().astype(int)[::-1]
    seq = voi_lut_sequence(0, lut, 12)
    seq[0].LUTDescriptor = [4096, 2 ** 16 - 2048, 12]
    write_bare_image(tmp_path / "a.dcm", STORED, implicit=True, keep_file_meta=True, RescaleSlope=1,
                     RescaleIntercept=-1024, VOILUTSequence=seq)
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.dcm").pixels,
                               lut[np.clip(STORED.astype(int) - 1024 + 2048, 0, 4095)] / 4095, rtol=0, atol=1e-7)


@pytest.mark.parametrize("pointer", ["past_end", "into_data"])
def test_tiff_whose_next_page_offset_is_damaged_is_read_as_its_one_page(tmp_path, pointer):
    """A one-page TIFF whose next-page offset (after its first IFD) points past the end of the file or into its
    data was read as that page; counting the pages (Pillow's n_frames) raised TypeError "Missing dimensions",
    which prepare reported as an unexpected error."""
    stored = (np.arange(12).reshape(3, 4) * 1000).astype(np.uint16)
    write_tiff(tmp_path / "a.tif", stored)
    raw = bytearray((tmp_path / "a.tif").read_bytes())
    entries = struct.unpack_from("<H", raw, 8)[0]
    struct.pack_into("<I", raw, 8 + 2 + 12 * entries, len(raw) + 1000 if pointer == "past_end" else 0x10)
    (tmp_path / "a.tif").write_bytes(bytes(raw))
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.tif").pixels, stored / 65535, rtol=0, atol=1e-7)


def test_float_pixel_data_that_is_not_finite_is_said_so(tmp_path):
    """A NaN in Float Pixel Data was said to be the Modality LUT's doing ("not finite after the Modality LUT
    (Rescale Slope 1, Intercept 0)"), which it is not."""
    values = np.array([[0.0, np.nan, 1.0], [2.0, 3.0, 4.0]])
    _float_image(tmp_path / "a.dcm", values, WindowCenter=2, WindowWidth=5)
    with pytest.raises(SkipImage, match=r"^Float Pixel Data holds values that are not finite \(NaN or infinite\)$"):
        read_radiograph(tmp_path / "a.dcm")


def _with_value(path, keyword, value, **attrs):
    """``write_image`` of STORED, then the value of ``keyword`` (written as "9999") replaced in the file
    by ``value`` (4 characters, of an even length as DICOM pads): pydicom writes no value it cannot read."""
    write_image(path, STORED, **{keyword: "9999"}, **attrs)
    data = path.read_bytes()
    assert data.count(b"9999") == 1
    path.write_bytes(data.replace(b"9999", value.encode()))


@pytest.mark.parametrize("keyword,name,value", [("WindowCenter", "Window Center", "abc "),
                                                ("WindowWidth", "Window Width", "n/a "),
                                                ("RescaleSlope", "Rescale Slope", "x.y "),
                                                ("RescaleIntercept", "Rescale Intercept", "-1,5"),
                                                ("NumberOfFrames", "Number of Frames", "ab  ")])
def test_a_numeric_attribute_that_is_no_number_is_skipped_naming_it(tmp_path, keyword, name, value):
    """A Window, Rescale or Number of Frames value that is no number raised ValueError or TypeError (pydicom
    raises on reading some, keeps others as text that the rescale then multiplied by), which stopped `fid`
    over a folder (it skips on SkipImage alone) and left prepare's skipped.csv without the attribute."""
    other = {"WindowCenter": dict(WindowWidth=400), "WindowWidth": dict(WindowCenter=400),
             "RescaleSlope": dict(RescaleIntercept=0), "RescaleIntercept": dict(RescaleSlope=1)}.get(keyword, {})
    _with_value(tmp_path / "a.dcm", keyword, value, **other)
    with warnings.catch_warnings():  # pydicom warns about the value as it reads it
        warnings.simplefilter("ignore")
        with pytest.raises(SkipImage, match=rf"^{name} is not a number \('{value.strip()}'\)$"):
            read_radiograph(tmp_path / "a.dcm")


@pytest.mark.parametrize("given", ["slope", "blank intercept", "blank slope"])
def test_a_rescale_slope_or_intercept_alone_is_applied_where_its_range_is(tmp_path, given):
    """Rescale Slope without Rescale Intercept (or with it present and empty, as an anonymiser leaves it):
    pydicom's Modality LUT applied neither (or raised TypeError on the blank) while the range Bits Stored is
    scaled over took the slope: at 0.5, 2048 and 4095 came out both white. The one given is applied, the
    other taken as its default (1, 0)."""
    path = tmp_path / "a.dcm"
    write_image(path, STORED, RescaleSlope=0.5 if given != "blank slope" else None,
                RescaleIntercept=None if given == "blank intercept" else -100 if given == "blank slope" else None)
    ds = pydicom.dcmread(path)
    if given == "slope":
        del ds.RescaleIntercept
        ds.save_as(path)
    np.testing.assert_allclose(read_radiograph(path).pixels, STORED / 4095, rtol=0, atol=1e-7)
    # through a window the rescale shows: values 0.5 * stored (or stored - 100), window 0 .. 2048
    write_image(path, STORED, WindowCenter=1024.5, WindowWidth=2049, RescaleSlope=0.5 if given != "blank slope"
                else None, RescaleIntercept=None if given == "blank intercept" else -100 if given == "blank slope"
                else None)
    if given == "slope":
        ds = pydicom.dcmread(path)
        del ds.RescaleIntercept
        ds.save_as(path)
    values = STORED * 0.5 if given != "blank slope" else STORED - 100.0
    np.testing.assert_allclose(read_radiograph(path).pixels, np.clip(values / 2048, 0, 1), rtol=0, atol=1e-6)


def test_a_rescale_slope_of_zero_is_skipped_not_a_blank_image(tmp_path):
    write_image(tmp_path / "a.dcm", STORED, RescaleSlope=0, RescaleIntercept=0, WindowCenter=100, WindowWidth=200)
    with pytest.raises(SkipImage, match="^Rescale Slope is 0"):
        read_radiograph(tmp_path / "a.dcm")


def test_a_modality_lut_of_twelve_bit_entries_is_read(tmp_path):
    """PS3.3 allowed Modality LUT entries of 10 to 16 bits before 2004, and older CR equipment writes 12:
    pydicom's apply_modality_lut raised TypeError ("data type 'uint12' not understood")."""
    item = pydicom.Dataset()
    item.LUTDescriptor, item.ModalityLUTType = [4096, 0, 12], "US"
    item.LUTData = (4095 - np.arange(4096, dtype=np.uint16)).tobytes()  # an inverting 12-bit LUT
    item["LUTData"].VR = "OW"
    write_image(tmp_path / "a.dcm", STORED, ModalityLUTSequence=pydicom.Sequence([item]))
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.dcm").pixels, 1 - STORED / 4095, atol=1e-7)


@pytest.mark.parametrize("sequence", ["VOILUTSequence", "ModalityLUTSequence"])
def test_a_lut_without_its_descriptor_or_data_is_skipped_naming_it(tmp_path, sequence):
    what = "VOI LUT" if sequence == "VOILUTSequence" else "Modality LUT"
    item = pydicom.Dataset()
    item.LUTData = np.arange(4096, dtype=np.uint16).tobytes()
    item["LUTData"].VR = "OW"
    write_image(tmp_path / "a.dcm", STORED, **{sequence: pydicom.Sequence([item])})
    with pytest.raises(SkipImage, match=f"^{what} has no readable LUT Descriptor"):
        read_radiograph(tmp_path / "a.dcm")
    item.LUTDescriptor = [4096, 0, 16]
    del item.LUTData
    write_image(tmp_path / "a.dcm", STORED, **{sequence: pydicom.Sequence([item])})
    with pytest.raises(SkipImage, match=f"^{what} has no LUT Data$"):
        read_radiograph(tmp_path / "a.dcm")


def test_an_image_past_pillows_decompression_bomb_limit_is_skipped_saying_so(tmp_path, monkeypatch):
    """Pillow's DecompressionBombError is no OSError: it passed the reader's handler, stopped `fid` over a
    folder (which skips on SkipImage alone) and was "unexpected error" in prepare's skipped.csv."""
    from PIL import Image
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1200 pixels: over twice the limit
    with pytest.raises(SkipImage, match=r"^too many pixels for Pillow to decode \(Image size \(1200 pixels\)"):
        read_radiograph(tmp_path / "big.png")


def test_a_modality_lut_of_a_big_endian_file_is_read_in_its_byte_order(tmp_path):
    """OW LUT Data of an Explicit VR Big Endian file was read as little-endian words (pydicom's
    apply_modality_lut, which the reader used before, unpacks them in the data set's order); LUT Data
    of an odd number of bytes for 16-bit entries was a bare ValueError."""
    item = pydicom.Dataset()
    item.LUTDescriptor, item.ModalityLUTType = [4096, 0, 12], "US"
    item.LUTData = (4095 - np.arange(4096, dtype=np.uint16)).astype(">u2").tobytes()  # an inverting LUT
    item["LUTData"].VR = "OW"
    ds = image_dataset(STORED, ModalityLUTSequence=pydicom.Sequence([item]))
    ds.PixelData = STORED.astype(">u2").tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    np.testing.assert_allclose(read_radiograph(tmp_path / "a.dcm").pixels, 1 - STORED / 4095, atol=1e-7)
    item.LUTData = item.LUTData[:-1]  # (pydicom pads an odd value as it writes it: in memory alone)
    with pytest.raises(SkipImage, match=r"^Modality LUT has LUT Data of an odd number of bytes \(8191\)"):
        readers._lut(item, "Modality LUT")
