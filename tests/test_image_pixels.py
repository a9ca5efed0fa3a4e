"""Tests of latentpacs.image.pixels: DICOM Pixel Data <-> canonical image (PS3.3 C.7.6.3)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from latentpacs.errors import InvalidDicomError, PixelDataError, UnsupportedImageError
from latentpacs.image.pixels import (
    PixelModule,
    canonical_to_stored,
    cells_sha256,
    original_stored_bytes,
    pixel_cells,
    read_file,
    set_pixels,
    stored_to_canonical,
    stored_values,
    to_canonical,
)

ROWS, COLS = 64, 48
#: JPEG Lossless, Non-Hierarchical (Process 14), any selection value.
JPEG_LOSSLESS_P14 = UID("1.2.840.10008.1.2.4.57")


def random_stored(
    bits_stored: int, rows: int = ROWS, cols: int = COLS, seed: int = 0
) -> np.ndarray:
    """Random uint16 values masked to Bits Stored."""
    rng = np.random.default_rng(seed + bits_stored)
    return rng.integers(0, 1 << 16, (rows, cols), dtype=np.uint16) & ((1 << bits_stored) - 1)


def smooth_stored(bits_stored: int) -> np.ndarray:
    """A gradient with a little noise: an image that lossless codecs can shrink."""
    rng = np.random.default_rng(bits_stored)
    top = (1 << bits_stored) - 1
    ramp = np.add.outer(np.arange(ROWS), np.arange(COLS)) * top / (ROWS + COLS)
    noise = rng.integers(0, 3, (ROWS, COLS))
    return np.clip(ramp + noise, 0, top).astype(np.uint16)


def make_dataset(
    stored: np.ndarray,
    bits_stored: int,
    photometric: str = "MONOCHROME2",
    bits_allocated: int | None = None,
) -> Dataset:
    """An Explicit VR Little Endian secondary capture image built directly with pydicom."""
    bits_allocated = bits_allocated or (8 if bits_stored <= 8 else 16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "MG"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    dtype = np.uint8 if bits_allocated == 8 else np.dtype("<u2")
    data = stored.astype(dtype).tobytes()
    ds.PixelData = data + b"\x00" * (len(data) % 2)
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dcmtk(tool: str, *args: str) -> None:
    """Run a DCMTK tool; DCMTK is a required test tool, so its absence fails the test."""
    if shutil.which(tool) is None:
        pytest.fail(f"DCMTK tool {tool} is not installed: DCMTK is required to run these tests")
    subprocess.run([tool, *args], check=True, capture_output=True, timeout=60)


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("bits_stored", [8, 12, 14, 16])
def test_stored_canonical_stored_is_exact(
    tmp_path: Path, bits_stored: int, photometric: str
) -> None:
    original = random_stored(bits_stored)
    ds = read_file(save(make_dataset(original, bits_stored, photometric), tmp_path / "in.dcm"))
    image, module = to_canonical(ds)
    assert image.dtype == np.float32 and image.shape == (ROWS, COLS)
    assert 0.0 <= image.min() and image.max() <= 1.0
    expected = PixelModule(ROWS, COLS, ds.BitsAllocated, bits_stored, bits_stored - 1, photometric)
    assert module == expected
    back = canonical_to_stored(image, module)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, original)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_every_16_bit_value_survives_the_round_trip(photometric: str) -> None:
    every = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    module = PixelModule(256, 256, 16, 16, 15, photometric)
    image = stored_to_canonical(every, module)
    np.testing.assert_array_equal(canonical_to_stored(image, module), every)


def test_monochrome1_is_inverted_and_monochrome2_is_not() -> None:
    stored = np.array([[0, 2047, 4095]], dtype=np.uint16)
    mono1 = stored_to_canonical(stored, PixelModule(1, 3, 16, 12, 11, "MONOCHROME1"))
    mono2 = stored_to_canonical(stored, PixelModule(1, 3, 16, 12, 11, "MONOCHROME2"))
    assert mono1[0, 0] == 1.0 and mono1[0, 2] == 0.0  # minimum stored value is white
    assert mono2[0, 0] == 0.0 and mono2[0, 2] == 1.0
    assert mono2[0, 1] == pytest.approx(2047 / 4095)
    np.testing.assert_allclose(mono1 + mono2, 1.0, atol=1e-6)


def test_canonical_to_stored_rounds_and_clips() -> None:
    module = PixelModule(1, 5, 8, 8, 7, "MONOCHROME2")
    image = np.array([[-0.5, 0.0, 10.4 / 255, 10.6 / 255, 1.5]])
    np.testing.assert_array_equal(canonical_to_stored(image, module), [[0, 0, 10, 11, 255]])


def test_bits_above_high_bit_are_masked() -> None:
    original = random_stored(12)
    overlay = np.uint16(0xA000)  # garbage in bits 13 and 15, above High Bit 11
    ds = make_dataset(original | overlay, 12)
    stored, module = stored_values(ds)
    np.testing.assert_array_equal(stored, original)
    assert stored.max() <= module.max_value == 4095
    np.testing.assert_array_equal(pixel_cells(ds)[0], original | overlay)


def test_native_pixels_that_look_like_an_item_tag_are_read_as_pixels() -> None:
    original = random_stored(16)
    original[0, :2] = [0xFFFE, 0xE000]  # the bytes FE FF 00 E0 open Pixel Data
    np.testing.assert_array_equal(stored_values(make_dataset(original, 16))[0], original)


def test_dataset_without_file_meta_is_read_as_native_little_endian() -> None:
    original = random_stored(14)
    ds = make_dataset(original, 14)
    del ds.file_meta
    np.testing.assert_array_equal(stored_values(ds)[0], original)


# --- writing --------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits_stored", "photometric"), [(8, "MONOCHROME1"), (12, "MONOCHROME2")])
def test_set_pixels_writes_a_readable_explicit_little_endian_file(
    tmp_path: Path, bits_stored: int, photometric: str
) -> None:
    stored = random_stored(bits_stored, rows=5, cols=7)  # odd byte count for 8 bits
    allocated = 8 if bits_stored == 8 else 16
    module = PixelModule(5, 7, allocated, bits_stored, bits_stored - 1, photometric)
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PlanarConfiguration = 0
    set_pixels(ds, stored, module)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds["PixelData"].VR == "OW" and len(ds.PixelData) % 2 == 0
    assert "PlanarConfiguration" not in ds
    back = read_file(save(ds, tmp_path / "out.dcm"))
    assert (back.SamplesPerPixel, back.PixelRepresentation) == (1, 0)
    values, read_module = stored_values(back)
    assert read_module == module
    np.testing.assert_array_equal(values, stored)


def test_set_pixels_replaces_compressed_pixel_data(tmp_path: Path) -> None:
    original = random_stored(12)
    ds = make_dataset(original, 12)
    ds.compress(RLELossless)
    set_pixels(ds, original, PixelModule.from_dataset(ds))
    back = read_file(save(ds, tmp_path / "native.dcm"))
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert original_stored_bytes(back) == ROWS * COLS * 2
    np.testing.assert_array_equal(stored_values(back)[0], original)


def test_set_pixels_refuses_values_beyond_bits_allocated() -> None:
    module = PixelModule(2, 2, 8, 8, 7, "MONOCHROME2")
    with pytest.raises(PixelDataError, match="Bits Allocated 8"):
        set_pixels(Dataset(), np.full((2, 2), 256, dtype=np.uint16), module)


def test_cells_with_unused_bits_round_trip_byte_for_byte(tmp_path: Path) -> None:
    original = random_stored(12) | np.uint16(0xA000)  # garbage in bits 13 and 15
    ds = make_dataset(original, 12)
    sent = bytes(ds.PixelData)
    cells, module = pixel_cells(ds)
    assert cells_sha256(cells, module) == hashlib.sha256(sent).hexdigest()
    out = Dataset()
    out.SOPClassUID = ds.SOPClassUID
    out.SOPInstanceUID = ds.SOPInstanceUID
    set_pixels(out, cells, module)
    back = read_file(save(out, tmp_path / "cells.dcm"))
    assert bytes(back.PixelData) == sent


def test_pixel_module_apply_to_writes_the_image_pixel_module() -> None:
    ds = Dataset()
    PixelModule(10, 20, 16, 14, 13, "MONOCHROME1").apply_to(ds)
    assert PixelModule.from_dataset(ds) == PixelModule(10, 20, 16, 14, 13, "MONOCHROME1")
    assert (ds.SamplesPerPixel, ds.PixelRepresentation) == (1, 0)


# --- compressed transfer syntaxes -------------------------------------------------------------

DCMTK_CODECS = {
    "jpeg-ls": ("dcmcjpls", [], JPEGLSLossless),
    "jpeg-lossless-sv1": ("dcmcjpeg", ["+e1"], JPEGLosslessSV1),
    "jpeg-lossless-p14": ("dcmcjpeg", ["+el"], JPEG_LOSSLESS_P14),
    "rle": ("dcmcrle", [], RLELossless),
    "big-endian": ("dcmconv", ["+tb"], ExplicitVRBigEndian),
}


@pytest.mark.parametrize("bits_stored", [8, 12, 16])
@pytest.mark.parametrize("codec", sorted(DCMTK_CODECS))
def test_dcmtk_encoded_pixels_decode_bit_exact(
    tmp_path: Path, codec: str, bits_stored: int
) -> None:
    tool, args, syntax = DCMTK_CODECS[codec]
    original = random_stored(bits_stored)
    source = save(make_dataset(original, bits_stored), tmp_path / "native.dcm")
    dcmtk(tool, *args, str(source), str(tmp_path / "coded.dcm"))
    ds = read_file(tmp_path / "coded.dcm")
    assert ds.file_meta.TransferSyntaxUID == syntax
    stored, module = stored_values(ds)
    assert stored.dtype == np.uint16 and module.bits_stored == bits_stored
    np.testing.assert_array_equal(stored, original)


def test_monochrome1_jpeg_ls_decodes_to_inverted_canonical(tmp_path: Path) -> None:
    original = random_stored(12)
    source = save(make_dataset(original, 12, "MONOCHROME1"), tmp_path / "native.dcm")
    dcmtk("dcmcjpls", str(source), str(tmp_path / "jls.dcm"))
    image, module = to_canonical(read_file(tmp_path / "jls.dcm"))
    np.testing.assert_allclose(image, (4095 - original.astype(np.float64)) / 4095, atol=1e-7)
    np.testing.assert_array_equal(canonical_to_stored(image, module), original)


@pytest.mark.parametrize("bits_stored", [8, 12, 16])
def test_pydicom_jpeg2000_lossless_decodes_bit_exact(bits_stored: int) -> None:
    original = random_stored(bits_stored)
    ds = make_dataset(original, bits_stored)
    ds.compress(JPEG2000Lossless)
    assert ds["PixelData"].is_undefined_length
    np.testing.assert_array_equal(stored_values(ds)[0], original)


def test_original_stored_bytes_counts_compressed_fragments(tmp_path: Path) -> None:
    native = make_dataset(smooth_stored(12), 12)
    assert original_stored_bytes(native) == ROWS * COLS * 2
    dcmtk("dcmcjpls", str(save(native, tmp_path / "native.dcm")), str(tmp_path / "jls.dcm"))
    compressed = read_file(tmp_path / "jls.dcm")
    size = original_stored_bytes(compressed)
    assert 0 < size < ROWS * COLS * 2 / 2  # a smooth image compresses more than 2:1
    assert size < len(compressed.PixelData)  # item headers and offset table not counted


def _jpeg_ls_codestream(tmp_path: Path) -> tuple[Dataset, bytes]:
    source = save(make_dataset(random_stored(12), 12), tmp_path / "native.dcm")
    dcmtk("dcmcjpls", str(source), str(tmp_path / "jls.dcm"))
    ds = read_file(tmp_path / "jls.dcm")
    fragments = list(generate_fragments(ds.PixelData))
    return ds, b"".join(fragments[1:])


def test_corrupt_jpeg_ls_header_raises_pixel_data_error(tmp_path: Path) -> None:
    ds, codestream = _jpeg_ls_codestream(tmp_path)
    ds.PixelData = encapsulate([codestream[:2] + b"\x00" * 40 + codestream[42:]])
    with pytest.raises(PixelDataError, match="cannot be decoded as JPEG-LS") as caught:
        stored_values(ds)
    assert "pyjpegls" in str(caught.value)  # the plugin's own message is kept


def test_truncated_jpeg_ls_raises_pixel_data_error(tmp_path: Path) -> None:
    ds, codestream = _jpeg_ls_codestream(tmp_path)
    ds.PixelData = encapsulate([codestream[: len(codestream) // 2 // 2 * 2]])
    with pytest.raises(PixelDataError, match="truncated"):
        stored_values(ds)


def test_truncated_rle_raises_pixel_data_error() -> None:
    ds = make_dataset(random_stored(12), 12)
    ds.compress(RLELossless)
    fragment = list(generate_fragments(ds.PixelData))[1]
    ds.PixelData = encapsulate([fragment[:200]])
    with pytest.raises(PixelDataError, match="RLE Lossless"):
        stored_values(ds)


def test_transfer_syntax_and_encapsulation_must_agree() -> None:
    ds = make_dataset(random_stored(12), 12)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    with pytest.raises(PixelDataError, match="native .* but Transfer Syntax is JPEG-LS"):
        stored_values(ds)
    ds = make_dataset(random_stored(12), 12)
    ds.compress(RLELossless)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with pytest.raises(PixelDataError, match="encapsulated but Transfer Syntax"):
        stored_values(ds)


def test_undecodable_transfer_syntax_is_unsupported() -> None:
    ds = make_dataset(random_stored(8), 8)
    ds.compress(RLELossless)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 Main Profile
    with pytest.raises(UnsupportedImageError, match="Transfer Syntax 1.2.840.10008.1.2.4.100"):
        stored_values(ds)


# --- refused images and broken data ----------------------------------------------------------


def _changed(**attributes: object) -> Dataset:
    ds = make_dataset(random_stored(12), 12)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, "Samples per Pixel 3"),
        ({"PhotometricInterpretation": "RGB"}, "Photometric Interpretation RGB is not supported"),
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "Photometric Interpretation PALETTE"),
        ({"NumberOfFrames": 2}, "Number of Frames 2"),
        ({"PixelRepresentation": 1}, "Pixel Representation 1"),
        ({"BitsAllocated": 32}, "Bits Allocated 32"),
    ],
)
def test_unsupported_images_are_refused(attributes: dict[str, object], message: str) -> None:
    with pytest.raises(UnsupportedImageError, match=message) as caught:
        stored_values(_changed(**attributes))
    assert caught.value.error_comment.startswith(message.split(" is ")[0])
    assert len(caught.value.error_comment) <= 64


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"PixelData": None}, "Pixel Data .* is missing"),
        ({"Rows": 0}, "Rows 0"),
        ({"Columns": 20000}, "Columns 20000"),
        ({"BitsStored": 17, "HighBit": 16}, "Bits Stored 17"),
        ({"BitsStored": 0}, "Bits Stored 0"),
        ({"HighBit": 15}, "High Bit 15"),
        ({"Rows": None}, "Rows is missing"),
        ({"PhotometricInterpretation": None}, "Photometric Interpretation is missing"),
        ({"NumberOfFrames": 0}, "Number of Frames 0"),
        ({"Rows": 65}, "Pixel Data has 6144 bytes but Rows x Columns"),
        ({"Rows": 63}, "Pixel Data has 6144 bytes but Rows x Columns"),
    ],
)
def test_inconsistent_pixel_data_raises_pixel_data_error(
    attributes: dict[str, object], message: str
) -> None:
    with pytest.raises(PixelDataError, match=message):
        stored_values(_changed(**attributes))


def test_truncated_native_pixel_data_raises(tmp_path: Path) -> None:
    path = save(make_dataset(random_stored(16), 16), tmp_path / "full.dcm")
    (tmp_path / "cut.dcm").write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(PixelDataError, match="has 5144 bytes .* needs 6144"):
        stored_values(read_file(tmp_path / "cut.dcm"))


def test_single_frame_number_of_frames_is_accepted() -> None:
    original = random_stored(12)
    ds = make_dataset(original, 12)
    ds.NumberOfFrames = 1
    np.testing.assert_array_equal(stored_values(ds)[0], original)


def test_float_pixel_data_is_unsupported() -> None:
    ds = _changed(PixelData=None)
    ds.FloatPixelData = np.zeros((ROWS, COLS), dtype=np.float32).tobytes()
    with pytest.raises(UnsupportedImageError, match="FloatPixelData"):
        stored_values(ds)


def test_canonical_images_of_the_wrong_shape_or_with_nan_are_refused() -> None:
    module = PixelModule(4, 4, 16, 12, 11, "MONOCHROME2")
    with pytest.raises(PixelDataError, match="shape"):
        canonical_to_stored(np.zeros((4, 5), dtype=np.float32), module)
    with pytest.raises(PixelDataError, match="NaN"):
        canonical_to_stored(np.full((4, 4), np.nan, dtype=np.float32), module)
    with pytest.raises(PixelDataError, match="Bits Stored 12"):
        stored_to_canonical(np.full((4, 4), 4096, dtype=np.uint16), module)


def test_read_file_refuses_what_is_not_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_bytes(b"not a DICOM file\n" * 20)
    with pytest.raises(InvalidDicomError, match="notes.txt is not a readable DICOM file"):
        read_file(tmp_path / "notes.txt")
    with pytest.raises(InvalidDicomError, match="No such file"):
        read_file(tmp_path / "absent.dcm")
    path = save(make_dataset(random_stored(8), 8), tmp_path / "full.dcm")
    (tmp_path / "meta-only.dcm").write_bytes(path.read_bytes()[:200])
    with pytest.raises(InvalidDicomError):
        read_file(tmp_path / "meta-only.dcm")
