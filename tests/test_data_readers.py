import numpy as np
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless

from xrayforge.data.readers import SkipImage, find_images, read_radiograph

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
    ("not_dicom", "not a DICOM|unreadable"),
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
