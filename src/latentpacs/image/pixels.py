"""DICOM Pixel Data <-> the canonical image every other layer works on.

The canonical image is ``numpy.float32`` of shape (rows, cols) with values in [0, 1],
where 0 is the darkest displayed value under MONOCHROME2: a linear map of the stored
values, ``stored / (2**BitsStored - 1)``, inverted for MONOCHROME1 (PS3.3 C.7.6.3.1.2).
No Modality LUT, VOI LUT or windowing is applied.

Only the images latentpacs archives are accepted: unsigned (Pixel Representation 0),
one sample per pixel, MONOCHROME1 or MONOCHROME2, Bits Allocated 8 or 16, one frame
(Image Pixel module, PS3.3 C.7.6.3). Native pixel data (PS3.5 8.1.1) is read directly;
encapsulated pixel data (PS3.5 8.2, A.4: JPEG lossless, JPEG-LS, JPEG 2000, RLE, ...) is
decoded once through pydicom's decoding plugins. Every failure is raised as one of
:class:`~latentpacs.errors.InvalidDicomError`,
:class:`~latentpacs.errors.UnsupportedImageError` or
:class:`~latentpacs.errors.PixelDataError`, with a message naming the attribute at fault.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from latentpacs.errors import InvalidDicomError, PixelDataError, UnsupportedImageError

logger = logging.getLogger(__name__)

#: Largest Rows or Columns accepted; larger values are treated as corrupt headers.
MAX_DIMENSION = 16384


class Photometric(StrEnum):
    """The Photometric Interpretations (0028,0004) latentpacs archives (PS3.3 C.7.6.3.1.2).

    A StrEnum: each member equals its plain string, so archived rows, ``.lpz`` geometry
    and DICOM JSON written with plain strings read the same.
    """

    #: The minimum stored value is displayed white.
    MONOCHROME1 = "MONOCHROME1"
    #: The minimum stored value is displayed black.
    MONOCHROME2 = "MONOCHROME2"


MONOCHROME1 = Photometric.MONOCHROME1
MONOCHROME2 = Photometric.MONOCHROME2
#: Item tag (FFFE,E000) as little endian bytes: the first bytes of encapsulated Pixel Data.
_ITEM_TAG = b"\xfe\xff\x00\xe0"
_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = ("FloatPixelData", "DoubleFloatPixelData")
_ENCAPSULATED_ONLY = ("ExtendedOffsetTable", "ExtendedOffsetTableLengths")
#: Codestreams that end with an EOI / EOC marker (ISO 10918-1 B.2.1, ISO 14495-1 C.1.1,
#: ISO 15444-1 A.4.4): a frame without it is truncated, which some decoders accept silently.
_ENDS_WITH_EOI = frozenset(
    JPEGTransferSyntaxes + JPEGLSTransferSyntaxes + JPEG2000TransferSyntaxes
)
_EOI = b"\xff\xd9"

#: Transfer syntaxes whose pixel data may have lost information (PS3.5 A.4), with the
#: Lossy Image Compression Method (0028,2114) term of each (PS3.3 C.7.6.1.1.5.1), in the
#: order the Storage SCP prefers them when a context offers nothing else (bounded error
#: first). JPEG 2000 (.91) may carry a reversible wavelet, but nothing in the transfer
#: syntax says so: it counts as lossy.
LOSSY_TRANSFER_SYNTAXES: dict[str, str] = {
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
}


@dataclass(frozen=True, init=False)
class PixelModule:
    """The Image Pixel module attributes latentpacs honours (PS3.3 C.7.6.3).

    Construction validates: an unsupported Bits Allocated or Photometric Interpretation
    raises :class:`UnsupportedImageError`; impossible geometry or bit depths raise
    :class:`PixelDataError`.

    Parameters
    ----------
    rows, columns:
        Rows (0028,0010) and Columns (0028,0011), 1 to ``MAX_DIMENSION``.
    bits_allocated:
        Bits Allocated (0028,0100): 8 or 16.
    bits_stored:
        Bits Stored (0028,0101): 1 to ``bits_allocated``.
    high_bit:
        High Bit (0028,0102): must equal ``bits_stored - 1``.
    photometric_interpretation:
        Photometric Interpretation (0028,0004): a :class:`Photometric`, or its text
        ``MONOCHROME1`` or ``MONOCHROME2``.
    """

    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    high_bit: int
    photometric_interpretation: Photometric

    def __init__(self, rows: int, columns: int, bits_allocated: int, bits_stored: int,
                 high_bit: int, photometric_interpretation: Photometric | str) -> None:
        try:
            photometric = Photometric(photometric_interpretation)
        except ValueError:
            raise UnsupportedImageError(
                f"Photometric Interpretation {photometric_interpretation} is not "
                "supported: latentpacs archives grayscale images (MONOCHROME1/2)"
            ) from None
        for name, value in (("rows", rows), ("columns", columns), ("bits_allocated", bits_allocated),
                            ("bits_stored", bits_stored), ("high_bit", high_bit),
                            ("photometric_interpretation", photometric)):
            object.__setattr__(self, name, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        if self.bits_allocated not in (8, 16):
            raise UnsupportedImageError(
                f"Bits Allocated {self.bits_allocated} is not supported: only 8 or 16"
            )
        for name, value in (("Rows", self.rows), ("Columns", self.columns)):
            if not 1 <= value <= MAX_DIMENSION:
                raise PixelDataError(f"{name} {value} is out of range 1..{MAX_DIMENSION}")
        if not 1 <= self.bits_stored <= self.bits_allocated:
            raise PixelDataError(
                f"Bits Stored {self.bits_stored} is out of range 1..Bits Allocated "
                f"{self.bits_allocated}"
            )
        if self.high_bit != self.bits_stored - 1:
            raise PixelDataError(
                f"High Bit {self.high_bit} must be Bits Stored - 1 = {self.bits_stored - 1}"
            )

    @property
    def max_value(self) -> int:
        """The largest stored value, ``2**bits_stored - 1``."""
        return (1 << self.bits_stored) - 1

    @property
    def shape(self) -> tuple[int, int]:
        """The image shape, (rows, columns)."""
        return (self.rows, self.columns)

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PixelModule:
        """Read and validate the Image Pixel module of ``ds`` (PS3.3 C.7.6.3).

        Pixel Data itself is not needed, so an archived header works too.

        Raises
        ------
        UnsupportedImageError
            Colour, signed, multi-frame or otherwise unsupported images.
        PixelDataError
            Missing or impossible module attributes.
        """
        samples = _required_int(ds, "SamplesPerPixel", "Samples per Pixel")
        if samples != 1:
            raise UnsupportedImageError(
                f"Samples per Pixel {samples} is not supported: latentpacs archives "
                "grayscale images (1 sample per pixel)"
            )
        photometric = _required_str(ds, "PhotometricInterpretation", "Photometric Interpretation")
        representation = _required_int(ds, "PixelRepresentation", "Pixel Representation")
        if representation != 0:
            raise UnsupportedImageError(
                f"Pixel Representation {representation} is not supported: only unsigned (0)"
            )
        if _value(ds, "NumberOfFrames", "Number of Frames") is not None:
            frames = _required_int(ds, "NumberOfFrames", "Number of Frames")
            if frames < 1:
                raise PixelDataError(f"Number of Frames {frames} must be at least 1")
            if frames > 1:
                raise UnsupportedImageError(
                    f"Number of Frames {frames} is not supported: only single-frame images"
                )
        return cls(
            rows=_required_int(ds, "Rows", "Rows"),
            columns=_required_int(ds, "Columns", "Columns"),
            bits_allocated=_required_int(ds, "BitsAllocated", "Bits Allocated"),
            bits_stored=_required_int(ds, "BitsStored", "Bits Stored"),
            high_bit=_required_int(ds, "HighBit", "High Bit"),
            photometric_interpretation=photometric,
        )

    def apply_to(self, ds: Dataset) -> None:
        """Write this module into ``ds`` (PS3.3 C.7.6.3), unsigned and one sample per pixel.

        Planar Configuration (0028,0006) is removed: it is only present for more than one
        sample per pixel (PS3.3 C.7.6.3.1.3).
        """
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = self.photometric_interpretation.value
        ds.Rows = self.rows
        ds.Columns = self.columns
        ds.BitsAllocated = self.bits_allocated
        ds.BitsStored = self.bits_stored
        ds.HighBit = self.high_bit
        ds.PixelRepresentation = 0
        if "PlanarConfiguration" in ds:
            del ds.PlanarConfiguration


def _value(ds: Dataset, keyword: str, name: str) -> object | None:
    """The value of ``keyword``, or None when absent or empty (a Type 2 style empty value)."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # a malformed raw element fails to convert on access
        raise PixelDataError(f"{name} cannot be read: {exc}") from exc
    return None if value is None or value == "" else value


def _required_value(ds: Dataset, keyword: str, name: str) -> object:
    value = _value(ds, keyword, name)
    if value is None:
        raise PixelDataError(f"{name} is missing (Image Pixel module, PS3.3 C.7.6.3)")
    return value


def _required_int(ds: Dataset, keyword: str, name: str) -> int:
    value = _required_value(ds, keyword, name)
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise PixelDataError(f"{name} {value!r} is not a single integer") from exc


def _required_str(ds: Dataset, keyword: str, name: str) -> str:
    value = _required_value(ds, keyword, name)
    if not isinstance(value, str):
        raise PixelDataError(f"{name} {value!r} is not a single code string")
    return value.strip()


def read_file(path: str | os.PathLike[str]) -> Dataset:
    """Read a DICOM file (PS3.10: preamble, ``DICM`` prefix, File Meta Information).

    Raises
    ------
    InvalidDicomError
        The file cannot be opened, is not a PS3.10 file, cannot be parsed or holds
        nothing but File Meta Information.
    """
    try:
        ds = dcmread(path)
    except Exception as exc:
        raise InvalidDicomError(f"{os.fspath(path)} is not a readable DICOM file: {exc}") from exc
    if len(ds) == 0:
        raise InvalidDicomError(f"{os.fspath(path)} holds no data set after its File Meta")
    return ds


def _transfer_syntax(ds: Dataset, element: DataElement) -> tuple[UID, bool]:
    """The transfer syntax of ``ds`` and whether its Pixel Data is encapsulated (PS3.5 A.4).

    The transfer syntax decides; the element's encoding must agree with it.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        if element.is_undefined_length:
            raise PixelDataError(
                "Transfer Syntax UID is missing: cannot decode encapsulated Pixel Data"
            )
        # A data set without file meta (built in memory) holds native data in its own encoding.
        big = ds.original_encoding[1] is False
        return (ExplicitVRBigEndian if big else ExplicitVRLittleEndian), False
    syntax = UID(syntax)
    starts_with_item = bytes(element.value[:4]) == _ITEM_TAG
    if not syntax.is_transfer_syntax:  # private: trust the encoding as read
        return syntax, element.is_undefined_length or starts_with_item
    if syntax.is_compressed and not starts_with_item:
        raise PixelDataError(
            f"Pixel Data is native (not encapsulated) but Transfer Syntax is {syntax.name}"
        )
    if not syntax.is_compressed and element.is_undefined_length:
        raise PixelDataError(f"Pixel Data is encapsulated but Transfer Syntax is {syntax.name}")
    return syntax, syntax.is_compressed


def _pixel_data(ds: Dataset) -> DataElement:
    for keyword in _FLOAT_PIXEL_DATA:
        if keyword in ds:
            raise UnsupportedImageError(f"{keyword} is not supported: only integer Pixel Data")
    if _PIXEL_DATA not in ds:
        raise PixelDataError("Pixel Data (7FE0,0010) is missing")
    try:
        element = ds[_PIXEL_DATA]
    except Exception as exc:
        raise PixelDataError(f"Pixel Data (7FE0,0010) cannot be read: {exc}") from exc
    if not element.value:
        raise PixelDataError("Pixel Data (7FE0,0010) is empty")
    if not isinstance(element.value, bytes | bytearray):
        raise PixelDataError(f"Pixel Data (7FE0,0010) is not a byte string: {type(element.value)}")
    return element


def _native_values(element: DataElement, module: PixelModule, syntax: UID) -> np.ndarray:
    """Read native (uncompressed) pixel cells (PS3.5 8.1.1, 7.3).

    Big endian OW holds 16-bit words with their most significant byte first, so 8-bit
    pixels packed two to a word come in swapped pairs (PS3.5 7.3, D.2).
    """
    data = element.value
    count = module.rows * module.columns
    expected = count * module.bits_allocated // 8
    if len(data) not in (expected, expected + expected % 2):
        raise PixelDataError(
            f"Pixel Data has {len(data)} bytes but Rows x Columns x Bits Allocated "
            f"({module.rows} x {module.columns} x {module.bits_allocated} bits) needs {expected}"
        )
    big_endian = syntax == ExplicitVRBigEndian
    if module.bits_allocated == 16:
        words = np.frombuffer(data, dtype=">u2" if big_endian else "<u2", count=count)
        return words.reshape(module.shape)
    if big_endian and element.VR == "OW":
        data = np.frombuffer(data, dtype=">u2").astype("<u2").tobytes()
    return np.frombuffer(data, dtype=np.uint8, count=count).reshape(module.shape)


def _decoded_values(ds: Dataset, module: PixelModule, syntax: UID) -> np.ndarray:
    """Decode encapsulated pixel data once through pydicom's plugins (PS3.5 8.2)."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise UnsupportedImageError(
            f"Transfer Syntax {syntax} ({syntax.name}) is not supported: no decoder exists"
        ) from exc
    if not decoder.is_available:
        raise UnsupportedImageError(
            f"Transfer Syntax {syntax} ({syntax.name}) is not supported: no decoding plugin "
            f"is installed ({'; '.join(decoder.missing_dependencies)})"
        )
    if syntax in _ENDS_WITH_EOI:
        tail = bytes(ds[_PIXEL_DATA].value[-64:]).rstrip(b"\x00")  # fragments pad with 00
        if not tail.endswith(_EOI):
            raise PixelDataError(
                f"Pixel Data is truncated or corrupt: the {syntax.name} codestream does not "
                "end with an EOI/EOC marker (FFD9)"
            )
    try:
        values = pixel_array(ds, raw=True)
    except Exception as exc:
        raise PixelDataError(f"Pixel Data cannot be decoded as {syntax.name}: {exc}") from exc
    if values.shape != module.shape:
        raise PixelDataError(
            f"decoded Pixel Data has shape {values.shape}, Rows x Columns is {module.shape}"
        )
    if values.dtype.kind == "i" and values.min() < 0:
        raise PixelDataError("decoded Pixel Data holds negative values, Pixel Representation is 0")
    if values.dtype.kind not in "ui":
        raise PixelDataError(f"decoded Pixel Data has non-integer type {values.dtype}")
    return values


def pixel_cells(ds: Dataset) -> tuple[np.ndarray, PixelModule]:
    """Return the pixel cells of ``ds`` exactly as sent, and its Image Pixel module.

    Native data is read directly; encapsulated data is decoded exactly once. Nothing is
    masked: bits above High Bit (PS3.5 8.1.1) are kept, so the ``lossless`` tier can
    return the Pixel Data byte for byte.

    Returns
    -------
    tuple[numpy.ndarray, PixelModule]
        ``uint16`` array of shape (rows, cols), and the validated module.

    Raises
    ------
    UnsupportedImageError, PixelDataError
        See the module documentation.
    """
    module, element, syntax, encapsulated = _pixel_parts(ds)
    if encapsulated:
        values = _decoded_values(ds, module, syntax)
    else:
        values = _native_values(element, module, syntax)
    cells = values.astype(np.uint16)  # always a copy: never a view of the data set
    if cells.size and int(cells.max()) >> module.bits_allocated:
        raise PixelDataError(
            f"decoded Pixel Data exceeds Bits Allocated {module.bits_allocated}"
        )
    logger.debug("read %s pixels %s (%s)", module.photometric_interpretation, module.shape, syntax)
    return cells, module


def checked_native(ds: Dataset) -> PixelModule | None:
    """The validated module of native Pixel Data, checked as :func:`pixel_cells` would,
    without copying the pixels; None when the Pixel Data is encapsulated (decode it).

    Native cells fit Bits Allocated by construction, so the module, the transfer syntax
    and the value length are everything :func:`pixel_cells` can refuse (PS3.5 8.1.1).

    Raises
    ------
    UnsupportedImageError, PixelDataError
        See the module documentation.
    """
    module, element, syntax, encapsulated = _pixel_parts(ds)
    if encapsulated:
        return None
    _native_values(element, module, syntax)  # a view: checks the length only
    return module


def _pixel_parts(ds: Dataset) -> tuple[PixelModule, DataElement, UID, bool]:
    """The validated module, the Pixel Data element, its transfer syntax, encapsulated or not."""
    module = PixelModule.from_dataset(ds)
    element = _pixel_data(ds)
    syntax, encapsulated = _transfer_syntax(ds, element)
    return module, element, syntax, encapsulated


def mask_to_stored(cells: np.ndarray, module: PixelModule) -> np.ndarray:
    """The stored values of pixel cells: bits above High Bit cleared (PS3.5 8.1.1).

    Returns ``cells`` itself when no unused bit is set, else a masked copy.
    """
    if not cells.size or int(cells.max()) <= module.max_value:
        return cells
    logger.warning(
        "%d pixel cells have bits above High Bit %d; the model sees them masked",
        int(np.count_nonzero(cells > module.max_value)),
        module.high_bit,
    )
    return np.bitwise_and(cells, np.uint16(module.max_value))


def stored_values(ds: Dataset) -> tuple[np.ndarray, PixelModule]:
    """:func:`pixel_cells` masked to Bits Stored: the values the image shows (PS3.5 8.1.1).

    Raises
    ------
    UnsupportedImageError, PixelDataError
        See the module documentation.
    """
    cells, module = pixel_cells(ds)
    return mask_to_stored(cells, module), module


def cells_sha256(cells: np.ndarray, module: PixelModule) -> str:
    """SHA-256 (hex) of pixel cells as native little-endian Pixel Data, unpadded (PS3.5 8.1.1).

    Every bit of every cell counts, unused high bits included: this is the checksum the
    archive keeps of the original pixels and checks on every exact retrieval.
    """
    _check_shape(cells, module, "pixel cell array")
    dtype = np.uint8 if module.bits_allocated == 8 else np.dtype("<u2")
    return hashlib.sha256(np.ascontiguousarray(cells, dtype=dtype).tobytes()).hexdigest()


def arrival_lossy_method(ds: Dataset) -> str | None:
    """The Lossy Image Compression Method of the transfer syntax ``ds`` arrived in, if lossy.

    None for native and lossless transfer syntaxes (PS3.5 A.4, PS3.3 C.7.6.1.1.5.1).
    """
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return LOSSY_TRANSFER_SYNTAXES.get(syntax)


def lossy_on_arrival(ds: Dataset) -> bool:
    """Whether the pixels of ``ds`` already lost information before they reached latentpacs.

    True when they arrived in a lossy transfer syntax or the header says Lossy Image
    Compression (0028,2110) is ``01`` (PS3.3 C.7.6.1.1.5: once lossy, always lossy).
    """
    try:
        flag = str(ds.get("LossyImageCompression", "") or "").strip()
    except Exception:  # a malformed raw element: judge by the transfer syntax alone
        flag = ""
    return flag == "01" or arrival_lossy_method(ds) is not None


def _check_shape(array: np.ndarray, module: PixelModule, what: str) -> None:
    if array.shape != module.shape:
        raise PixelDataError(f"{what} has shape {array.shape}, Rows x Columns is {module.shape}")


def _check_stored(stored: np.ndarray, module: PixelModule, *, cells: bool = False) -> None:
    """Shape and range of stored values (``cells``: up to Bits Allocated, unused bits allowed)."""
    _check_shape(stored, module, "stored pixel array")
    if stored.dtype.kind not in "ui":
        raise PixelDataError(f"stored pixel array has non-integer type {stored.dtype}")
    top = (1 << module.bits_allocated) - 1 if cells else module.max_value
    if stored.size and (stored.min() < 0 or stored.max() > top):
        limit = f"Bits Allocated {module.bits_allocated}" if cells else f"Bits Stored {module.bits_stored}"
        raise PixelDataError(f"stored values exceed 0..{top} ({limit})")


def stored_to_canonical(stored: np.ndarray, module: PixelModule) -> np.ndarray:
    """Map stored values to the canonical image (float32 in [0, 1], MONOCHROME2 sense).

    ``stored / max_value``, or ``(max_value - stored) / max_value`` for MONOCHROME1
    (PS3.3 C.7.6.3.1.2: minimum value is white), computed exactly before one division.
    """
    _check_stored(stored, module)
    image = stored.astype(np.float32)
    if module.photometric_interpretation == MONOCHROME1:
        np.subtract(np.float32(module.max_value), image, out=image)
    np.divide(image, np.float32(module.max_value), out=image)
    return image


def canonical_to_stored(image: np.ndarray, module: PixelModule) -> np.ndarray:
    """Quantise a canonical image back to stored values (uint16), rounding and clipping.

    The inverse of :func:`stored_to_canonical`: exact for any image it produced.
    """
    _check_shape(image, module, "canonical image")
    scaled = np.multiply(image, np.float32(module.max_value), dtype=np.float32)
    if np.isnan(scaled).any():
        raise PixelDataError("canonical image contains NaN values")
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, module.max_value, out=scaled)
    stored = scaled.astype(np.uint16)
    if module.photometric_interpretation == MONOCHROME1:
        np.subtract(np.uint16(module.max_value), stored, out=stored)
    return stored


def to_canonical(ds: Dataset) -> tuple[np.ndarray, PixelModule]:
    """:func:`stored_values` then :func:`stored_to_canonical`."""
    stored, module = stored_values(ds)
    return stored_to_canonical(stored, module), module


def set_pixels(ds: Dataset, stored: np.ndarray, module: PixelModule) -> None:
    """Write native Pixel Data (OW, little endian) and the Image Pixel module into ``ds``.

    Sets the File Meta Transfer Syntax UID (0002,0010) to Explicit VR Little Endian
    (PS3.5 A.2), creating File Meta Information if missing, and removes the Extended
    Offset Table, which only describes encapsulated data (PS3.3 C.7.6.3.1.8). ``stored``
    may be pixel cells with bits above High Bit set (the ``lossless`` tier returns them
    as they arrived).
    """
    _check_stored(stored, module, cells=True)
    dtype = np.uint8 if module.bits_allocated == 8 else np.dtype("<u2")
    data = np.ascontiguousarray(stored, dtype=dtype).tobytes()
    if len(data) % 2:
        data += b"\x00"  # PS3.5 7.1.1: values have an even length
    module.apply_to(ds)
    for keyword in _ENCAPSULATED_ONLY:
        if keyword in ds:
            delattr(ds, keyword)
    ds[_PIXEL_DATA] = DataElement(_PIXEL_DATA, "OW", data)
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def original_stored_bytes(ds: Dataset) -> int:
    """Size in bytes of Pixel Data as received.

    For encapsulated data (PS3.5 A.4) the sum of the fragments' compressed bytes, without
    item headers or the Basic Offset Table; for native data the value length.
    """
    element = _pixel_data(ds)
    value = element.value
    if not _transfer_syntax(ds, element)[1]:
        return len(value)
    try:
        fragments = generate_fragments(value)
        next(fragments)  # the Basic Offset Table item
        return sum(len(fragment) for fragment in fragments)
    except Exception as exc:
        raise PixelDataError(f"encapsulated Pixel Data is malformed: {exc}") from exc
