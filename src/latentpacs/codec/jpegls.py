"""The exact and bounded streams of the fidelity tiers: JPEG-LS (ISO/IEC 14495-1) via CharLS.

CharLS is called through :mod:`latentpacs.codec.charls` (the system library, GIL released)
when it is installed, else through pyjpegls.

The ``lossless`` and ``near-lossless:K`` tiers store the image's stored pixel values
(PS3.3 C.7.6.3.1: Bits Stored, unsigned) coded with JPEG-LS at NEAR = 0 or K; they keep
no latent. The stream codes the stored values themselves, not a difference from the network
output: floating-point inference differs across devices and thread counts, so exactness
must not depend on it. Decoding uses integer arithmetic only and gives the same values on
every machine; with NEAR = K every value is within K of the original (ISO/IEC 14495-1 A.4).

The stream is a plain JPEG-LS interchange format, the same codestream DICOM carries for the
JPEG-LS transfer syntaxes (PS3.5 A.4.3), so any JPEG-LS decoder reads it.
"""

from __future__ import annotations

import logging

import _CharLS
import jpeg_ls
import numpy as np

from latentpacs.codec import charls
from latentpacs.errors import PixelDataError

logger = logging.getLogger(__name__)

#: Largest NEAR accepted (the ``near-lossless:K`` tier's limit).
MAX_NEAR = 255
#: pyjpegls sizes its output buffer at twice the raw size; for tiny images the JPEG-LS
#: header alone can exceed that, so those are coded with the source padded to this size.
_MIN_SOURCE_BYTES = 4096


def _check(stored: np.ndarray, bits_stored: int, near: int) -> np.ndarray:
    if stored.ndim != 2 or 0 in stored.shape:
        raise PixelDataError(f"stream needs a non-empty 2-D array, got shape {stored.shape}")
    if max(stored.shape) > 65535:
        raise PixelDataError(f"JPEG-LS codes at most 65535 x 65535 pixels, got {stored.shape}")
    if not np.issubdtype(stored.dtype, np.integer):
        raise PixelDataError(f"stream needs integer stored values, got {stored.dtype}")
    if not 1 <= bits_stored <= 16:
        raise PixelDataError(f"Bits Stored must be 1 to 16 for JPEG-LS, got {bits_stored}")
    if not 0 <= near <= min(MAX_NEAR, (1 << bits_stored) - 1):
        raise PixelDataError(f"NEAR {near} is out of range for {bits_stored}-bit values")
    low, high = int(stored.min()), int(stored.max())
    if low < 0 or high >= 1 << bits_stored:
        raise PixelDataError(
            f"stored values {low}..{high} do not fit Bits Stored {bits_stored} (unsigned)"
        )
    return stored.astype("<u2" if bits_stored > 8 else np.uint8, copy=False)


def encode_stream(stored: np.ndarray, bits_stored: int, near: int) -> bytes:
    """Code stored pixel values with JPEG-LS; ``near=0`` is lossless.

    Parameters
    ----------
    stored:
        Unsigned stored values, shape (rows, cols), each below ``2**bits_stored``.
    bits_stored:
        Bits Stored (0028,0101) of the image, 1 to 16 (PS3.3 C.7.6.3.1).
    near:
        JPEG-LS NEAR parameter: the largest absolute error allowed, 0 to 255.

    Returns
    -------
    bytes
        A JPEG-LS codestream.

    Raises
    ------
    PixelDataError
        When the array is not 2-D unsigned data that fits ``bits_stored``, or NEAR is
        out of range.
    """
    values = _check(np.asarray(stored), bits_stored, near)
    rows, cols = values.shape
    if charls.available():  # releases the GIL while it codes
        # JPEG-LS sample precision is 2 to 16 bits (ISO/IEC 14495-1 C.2.2): 1-bit data at 2.
        stream = charls.encode(values, max(bits_stored, 2), near)
        logger.debug("JPEG-LS %dx%d, %d bits, NEAR %d: %d bytes", rows, cols, bits_stored,
                     near, len(stream))
        return stream
    source = np.ascontiguousarray(values).tobytes()
    if len(source) >= _MIN_SOURCE_BYTES:
        stream = jpeg_ls.encode_buffer(source, rows, cols, 1, bits_stored, lossy_error=near)
    else:
        padded = source + bytes(_MIN_SOURCE_BYTES - len(source))
        stream = _CharLS._encode(padded, near, 0, rows, cols, 1, bits_stored)
    logger.debug(
        "JPEG-LS %dx%d, %d bits, NEAR %d: %d bytes", rows, cols, bits_stored, near, len(stream)
    )
    return bytes(stream)


def decode_stream(data: bytes) -> np.ndarray:
    """Decode a JPEG-LS codestream from :func:`encode_stream` to uint16 (rows, cols).

    Raises
    ------
    PixelDataError
        When the stream is corrupt, truncated or not single-component.
    """
    if charls.available():  # releases the GIL while it decodes
        decoded, _ = charls.decode(data)
        return decoded.astype(np.uint16)
    try:
        pixels, info = jpeg_ls.decode_buffer(bytes(data))
    except (RuntimeError, ValueError) as exc:
        raise PixelDataError(f"stream JPEG-LS stream is corrupt: {exc}") from exc
    if info["components"] != 1:
        raise PixelDataError(f"stream has {info['components']} components, expected 1")
    rows, cols = info["height"], info["width"]
    dtype = "<u2" if info["bits_per_sample"] > 8 else np.uint8
    values = np.frombuffer(pixels, dtype=dtype)
    if values.size != rows * cols:
        raise PixelDataError("stream JPEG-LS stream decoded to the wrong number of pixels")
    return values.reshape(rows, cols).astype(np.uint16)


#: JPEG-LS start-of-frame marker SOF55 (ISO/IEC 14495-1 C.2.2).
_SOF55 = b"\xff\xf7"


def stream_precision(data: bytes) -> int:
    """The sample precision P of a JPEG-LS codestream, read from its SOF55 frame header.

    The ``lossless`` tier codes pixel cells at Bits Stored, or at Bits Allocated when bits
    above High Bit are set; only a stream whose P equals Bits Stored may be sent as
    encapsulated JPEG-LS Pixel Data (PS3.5 8.2.3).

    Raises
    ------
    PixelDataError
        When the stream has no SOF55 frame header near its start.
    """
    head = bytes(data[:4096])
    at = head.find(_SOF55)
    if at < 0 or at + 5 > len(head):
        raise PixelDataError("JPEG-LS stream has no SOF55 frame header")
    return head[at + 4]
