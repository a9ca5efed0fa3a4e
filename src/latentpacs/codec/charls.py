"""CharLS's C API through ctypes: the copy the imagecodecs wheel ships, else the system's.

Why not only pyjpegls: its extension holds the GIL for the whole 200–400 ms of coding
a mammogram, so a background coder or a retrieval's decode ahead stops every other
Python thread of the node (the associations). A ctypes call releases the GIL, so coding
runs on the other core while the associations are served.

Only the calls a single-component image needs (CharLS 2.x ``charls.h``): an encoder with
frame info, NEAR and a destination buffer; a decoder that reads the header, then decodes
into a buffer. The stream is a plain JPEG-LS interchange format (ISO/IEC 14495-1), the
same codestream DICOM carries for the JPEG-LS transfer syntaxes (PS3.5 A.4.3).
:func:`available` says whether a library was found (imagecodecs, a dependency, ships
one; Debian's libcharls2 is the second choice); :mod:`latentpacs.codec.jpegls` falls back
to pyjpegls when none was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from latentpacs.errors import PixelDataError

logger = logging.getLogger(__name__)

#: The system library names tried after imagecodecs's copy, in order.
LIBRARY_NAMES = ("libcharls.so.2", "charls")


def _candidates() -> list[str]:
    """CharLS builds to try: the one the imagecodecs wheel ships (a dependency; an
    optimised 2.4 build, twice as fast as Debian's 2.4.1 here), then the system's."""
    found = []
    try:
        import imagecodecs

        libs = Path(imagecodecs.__file__).resolve().parents[1] / "imagecodecs.libs"
        found += [str(path) for path in sorted(libs.glob("libcharls*.so*"))]
    except ImportError:
        pass
    for name in LIBRARY_NAMES:
        path = name if name.endswith(".2") else ctypes.util.find_library(name)
        if path:
            found.append(path)
    return found


class _FrameInfo(ctypes.Structure):
    """``charls_frame_info``: width, height, bits per sample, component count."""

    _fields_ = [("width", ctypes.c_uint32), ("height", ctypes.c_uint32),
                ("bits_per_sample", ctypes.c_int32), ("component_count", ctypes.c_int32)]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            _declare(lib)
        except (OSError, AttributeError):
            continue
        logger.debug("JPEG-LS through %s", path)
        return lib
    logger.info("no CharLS library found: JPEG-LS coding holds the GIL (pyjpegls)")
    return None


def _declare(lib: ctypes.CDLL) -> None:
    pointer, size_t, i32, errc = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32, ctypes.c_int32
    signatures = {
        "charls_jpegls_encoder_create": ([], pointer),
        "charls_jpegls_encoder_destroy": ([pointer], None),
        "charls_jpegls_encoder_set_frame_info": ([pointer, ctypes.POINTER(_FrameInfo)], errc),
        "charls_jpegls_encoder_set_near_lossless": ([pointer, i32], errc),
        "charls_jpegls_encoder_get_estimated_destination_size": (
            [pointer, ctypes.POINTER(size_t)], errc),
        "charls_jpegls_encoder_set_destination_buffer": ([pointer, pointer, size_t], errc),
        "charls_jpegls_encoder_encode_from_buffer": ([pointer, pointer, size_t, ctypes.c_uint32], errc),
        "charls_jpegls_encoder_get_bytes_written": ([pointer, ctypes.POINTER(size_t)], errc),
        "charls_jpegls_decoder_create": ([], pointer),
        "charls_jpegls_decoder_destroy": ([pointer], None),
        "charls_jpegls_decoder_set_source_buffer": ([pointer, pointer, size_t], errc),
        "charls_jpegls_decoder_read_header": ([pointer], errc),
        "charls_jpegls_decoder_get_frame_info": ([pointer, ctypes.POINTER(_FrameInfo)], errc),
        "charls_jpegls_decoder_get_destination_size": ([pointer, ctypes.c_uint32,
                                                        ctypes.POINTER(size_t)], errc),
        "charls_jpegls_decoder_decode_to_buffer": ([pointer, pointer, size_t, ctypes.c_uint32], errc),
        "charls_get_error_message": ([errc], ctypes.c_char_p),
    }
    for name, (arguments, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = arguments
        function.restype = result


def available() -> bool:
    """Whether a CharLS library was found (coding then releases the GIL)."""
    return _library() is not None


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        message = lib.charls_get_error_message(code) or b"unknown error"
        raise PixelDataError(f"JPEG-LS {what} failed: {message.decode(errors='replace')}")


def encode(values: np.ndarray, bits_per_sample: int, near: int) -> bytes:
    """Code a 2-D uint8 / little-endian uint16 array at ``bits_per_sample`` with NEAR ``near``.

    The caller has checked the values fit (:func:`latentpacs.codec.jpegls.encode_stream`).

    Raises
    ------
    PixelDataError
        When CharLS refuses the parameters or the library is missing.
    """
    lib = _library()
    if lib is None:
        raise PixelDataError("no CharLS library (imagecodecs, or Debian package libcharls2)")
    source = np.ascontiguousarray(values)
    rows, cols = source.shape
    encoder = lib.charls_jpegls_encoder_create()
    if not encoder:
        raise PixelDataError("JPEG-LS encoder cannot be created")
    try:
        frame = _FrameInfo(cols, rows, bits_per_sample, 1)
        _check(lib, lib.charls_jpegls_encoder_set_frame_info(encoder, ctypes.byref(frame)), "frame")
        _check(lib, lib.charls_jpegls_encoder_set_near_lossless(encoder, near), "NEAR")
        size = ctypes.c_size_t()
        _check(lib, lib.charls_jpegls_encoder_get_estimated_destination_size(
            encoder, ctypes.byref(size)), "size estimate")
        # CharLS's estimate can be short for noise-like 16-bit data: allow twice the source.
        capacity = max(size.value, 2 * source.nbytes) + 4096
        destination = ctypes.create_string_buffer(capacity)
        _check(lib, lib.charls_jpegls_encoder_set_destination_buffer(
            encoder, destination, capacity), "buffer")
        _check(lib, lib.charls_jpegls_encoder_encode_from_buffer(
            encoder, source.ctypes.data, source.nbytes, 0), "encode")
        written = ctypes.c_size_t()
        _check(lib, lib.charls_jpegls_encoder_get_bytes_written(encoder, ctypes.byref(written)),
               "encode")
        return destination.raw[: written.value]
    finally:
        lib.charls_jpegls_encoder_destroy(encoder)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Decode a single-component JPEG-LS stream: (uint8 or uint16 array, bits per sample).

    Raises
    ------
    PixelDataError
        When the stream is corrupt or truncated, has more than one component, or the
        library is missing.
    """
    lib = _library()
    if lib is None:
        raise PixelDataError("no CharLS library (imagecodecs, or Debian package libcharls2)")
    source = bytes(data)
    decoder = lib.charls_jpegls_decoder_create()
    if not decoder:
        raise PixelDataError("JPEG-LS decoder cannot be created")
    try:
        _check(lib, lib.charls_jpegls_decoder_set_source_buffer(decoder, source, len(source)),
               "stream")
        _check(lib, lib.charls_jpegls_decoder_read_header(decoder), "header")
        frame = _FrameInfo()
        _check(lib, lib.charls_jpegls_decoder_get_frame_info(decoder, ctypes.byref(frame)),
               "header")
        if frame.component_count != 1:
            raise PixelDataError(f"stream has {frame.component_count} components, expected 1")
        size = ctypes.c_size_t()
        _check(lib, lib.charls_jpegls_decoder_get_destination_size(decoder, 0, ctypes.byref(size)),
               "header")
        dtype = np.uint8 if frame.bits_per_sample <= 8 else np.dtype("<u2")
        values = np.empty((frame.height, frame.width), dtype=dtype)
        if values.nbytes != size.value:
            raise PixelDataError("JPEG-LS stream has an unexpected decoded size")
        _check(lib, lib.charls_jpegls_decoder_decode_to_buffer(
            decoder, values.ctypes.data, values.nbytes, 0), "decode")
        return values, int(frame.bits_per_sample)
    finally:
        lib.charls_jpegls_decoder_destroy(decoder)
