"""Classic-codec baselines the learned codecs are measured against.

* JPEG (ISO/IEC 10918-1, baseline, Pillow/libjpeg) at quality 85 of the canonical image
  scaled to 8 bits, ``round(255 * x)``, in two protocols. The paper's (section III.B-C):
  the image is first resized bilinearly to 1024 x 1024 (:func:`jpeg_paper_encode`), so
  its "bits" are the bytes of a 1024 x 1024 JPEG file. Native: the image is coded at its
  own matrix (:func:`jpeg_encode`), the file a viewer shows at full size.
* JPEG 2000 (ISO/IEC 15444-1, OpenJPEG via imagecodecs) at the native bit depth: lossy at
  a target PSNR (OpenJPEG's distortion-ratio mode, one quality layer) for the
  rate-distortion curve, and reversible (5/3 wavelet) for the lossless figure.
* JPEG-LS (ISO/IEC 14495-1, CharLS) lossless at the native bit depth: the same codestream
  the ``lossless`` tier archives (:mod:`latentpacs.codec.jpegls`).
* JPEG-XL (ISO/IEC 18181, libjxl via imagecodecs) lossless at the native bit depth.

Each encoder returns the real codestream; every "bits" figure is ``8 * len(stream)``.
The lossless coders are checked to decode to the exact input before their size counts.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import imagecodecs
import numpy as np
from PIL import Image

from latentpacs.codec.engine import resize_bilinear
from latentpacs.codec.jpegls import decode_stream, encode_stream
from latentpacs.errors import PixelDataError
from latentpacs.evaluate.metrics import PAPER_SIZE

logger = logging.getLogger(__name__)

#: The paper's JPEG baseline quality.
PAPER_JPEG_QUALITY = 85


def to_8bit(canonical: np.ndarray) -> np.ndarray:
    """The canonical image (float in [0, 1]) as 8-bit values, ``round(255 * x)``."""
    return np.rint(np.clip(canonical, 0.0, 1.0) * 255.0).astype(np.uint8)


def jpeg_encode(canonical: np.ndarray, quality: int = PAPER_JPEG_QUALITY) -> bytes:
    """Baseline JPEG (ISO/IEC 10918-1) of the canonical image scaled to 8 bits.

    Grayscale, one component, Huffman coded with Pillow's standard tables: a stream a
    DICOM JPEG Baseline (Process 1) transfer syntax carries as is (PS3.5 A.4.1).
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1 to 100, got {quality}")
    buffer = io.BytesIO()
    Image.fromarray(to_8bit(canonical), mode="L").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_paper_encode(canonical: np.ndarray, quality: int = PAPER_JPEG_QUALITY) -> bytes:
    """The paper's JPEG baseline: the canonical image resized, then coded as JPEG.

    The image is resized bilinearly to :data:`~latentpacs.evaluate.metrics.PAPER_SIZE`
    with the project's one resize (:func:`latentpacs.codec.engine.resize_bilinear`),
    scaled to 8 bits and coded by :func:`jpeg_encode`; the paper converts to PNG, resizes to 1024 x 1024 and
    compresses that at quality 85 (sections III.B-C). The stream decodes to a
    1024 x 1024 image, whatever the original's matrix.
    """
    return jpeg_encode(resize_bilinear(canonical.astype(np.float32), PAPER_SIZE), quality)


def jpeg_decode(stream: bytes) -> np.ndarray:
    """Decode a JPEG stream to a canonical float32 image (8-bit values / 255)."""
    with Image.open(io.BytesIO(stream)) as image:
        values = np.asarray(image.convert("L"), dtype=np.float32)
    return values / np.float32(255.0)


def _native(stored: np.ndarray, bits_stored: int) -> np.ndarray:
    if stored.ndim != 2 or not 1 <= bits_stored <= 16:
        raise PixelDataError(f"need 2-D stored values of 1 to 16 bits, got {stored.shape}, {bits_stored}")
    return np.ascontiguousarray(stored, dtype=np.uint8 if bits_stored <= 8 else np.uint16)


def jpeg2000_encode(stored: np.ndarray, bits_stored: int, psnr_db: float | None = None) -> bytes:
    """JPEG 2000 codestream of stored values at their native bit depth.

    Parameters
    ----------
    stored:
        Unsigned stored values (rows, cols) below ``2**bits_stored``.
    bits_stored:
        Bits Stored (PS3.3 C.7.6.3.1.1), the precision written in the SIZ marker.
    psnr_db:
        Target PSNR in dB relative to the native peak (irreversible 9/7 wavelet); None
        codes losslessly with the reversible 5/3 wavelet.
    """
    values = _native(stored, bits_stored)
    if psnr_db is None:
        return bytes(
            imagecodecs.jpeg2k_encode(values, level=0, reversible=True, bitspersample=bits_stored, codecformat="J2K")
        )
    return bytes(
        imagecodecs.jpeg2k_encode(
            values,
            level=float(psnr_db),  # type: ignore[arg-type]  # stub says int; OpenJPEG takes a float PSNR
            bitspersample=bits_stored,
            codecformat="J2K",
        )
    )


def jpeg2000_decode(stream: bytes) -> np.ndarray:
    """Decode a JPEG 2000 codestream to its stored values (uint16)."""
    return np.asarray(imagecodecs.jpeg2k_decode(stream)).astype(np.uint16)


def jpegls_lossless(stored: np.ndarray, bits_stored: int) -> bytes:
    """Lossless JPEG-LS (NEAR = 0) of the stored values, as the ``lossless`` tier codes them."""
    return encode_stream(stored, bits_stored, 0)


def jpegxl_lossless(stored: np.ndarray, bits_stored: int) -> bytes:
    """Lossless JPEG-XL (modular mode) of the stored values at their native bit depth."""
    values = _native(stored, bits_stored)
    return bytes(imagecodecs.jpegxl_encode(values, lossless=True, bitspersample=bits_stored))


def _jpeg2000_lossless(stored: np.ndarray, bits_stored: int) -> bytes:
    return jpeg2000_encode(stored, bits_stored, None)


#: Lossless coders: codec name -> (encode(stored, bits_stored), decode(stream)).
LOSSLESS_CODECS: dict[str, tuple[Callable[[np.ndarray, int], bytes], Callable[[bytes], np.ndarray]]] = {
    "jpeg-ls": (jpegls_lossless, decode_stream),
    "jpeg2000-lossless": (_jpeg2000_lossless, jpeg2000_decode),
    "jpeg-xl-lossless": (jpegxl_lossless, lambda stream: np.asarray(imagecodecs.jpegxl_decode(stream))),
}


def lossless_size(name: str, stored: np.ndarray, bits_stored: int) -> int:
    """Bytes of the ``name`` lossless codestream of ``stored``, checked to decode exactly.

    Raises
    ------
    PixelDataError
        When the decoded stream differs from the input (the codec is not lossless here).
    """
    encode, decode = LOSSLESS_CODECS[name]
    stream = encode(stored, bits_stored)
    decoded = decode(stream)
    if decoded.shape != stored.shape or not np.array_equal(decoded.astype(np.uint16), stored.astype(np.uint16)):
        raise PixelDataError(f"{name} did not decode to the exact stored values")
    return len(stream)
