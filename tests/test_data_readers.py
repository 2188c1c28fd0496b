import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import JPEG2000Lossless, RLELossless

from xrayforge.data import readers
from xrayforge.data.readers import SkipImage, file_kind, find_images, read_radiograph

from dicom_factory import base_dataset, voi_lut_sequence, write_image, write_rt_plan

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
    with pytest.raises(SkipImage, match=reason):
        read_radiograph(path)


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
