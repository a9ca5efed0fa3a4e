"""The exact and bounded JPEG-LS streams of the lossless and near-lossless tiers."""

from __future__ import annotations

import numpy as np
import pytest

from latentpacs.codec.jpegls import decode_stream, encode_stream
from latentpacs.errors import PixelDataError
from latentpacs.phantom import PhantomSpec, render_image


def _mammogram_like(bits: int, shape: tuple[int, int] = (96, 80), seed: int = 0) -> np.ndarray:
    """Stored values of a phantom mammogram, with both ends of the ``bits`` range present."""
    spec = PhantomSpec(*shape, "MLO", "L", 12, "MONOCHROME2", "FOR PRESENTATION")
    canonical = render_image(spec, np.random.default_rng(seed))
    top = (1 << bits) - 1
    values = np.rint(canonical * top).astype(np.uint16)
    values[0, 0], values[-1, -1] = 0, top
    return values


@pytest.mark.parametrize("bits", [12, 14, 16])
def test_lossless_round_trip_is_bit_exact(bits: int) -> None:
    stored = _mammogram_like(bits)
    stream = encode_stream(stored, bits, 0)
    decoded = decode_stream(stream)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, stored)
    assert len(stream) < stored.nbytes  # it compresses


@pytest.mark.parametrize("near", [1, 2, 5])
def test_near_lossless_error_is_bounded_by_near(near: int) -> None:
    stored = _mammogram_like(12, seed=near)
    decoded = decode_stream(encode_stream(stored, 12, near))
    error = np.abs(decoded.astype(np.int64) - stored.astype(np.int64))
    assert error.max() <= near
    assert len(encode_stream(stored, 12, near)) < len(encode_stream(stored, 12, 0))


def test_eight_bit_and_tiny_images_round_trip() -> None:
    rng = np.random.default_rng(3)
    eight = rng.integers(0, 256, (40, 33), dtype=np.uint16)
    np.testing.assert_array_equal(decode_stream(encode_stream(eight, 8, 0)), eight)
    for shape in [(1, 1), (5, 7), (2, 300)]:
        noise = rng.integers(0, 1 << 16, shape, dtype=np.uint16)
        np.testing.assert_array_equal(decode_stream(encode_stream(noise, 16, 0)), noise)


def test_values_that_do_not_fit_bits_stored_are_refused() -> None:
    stored = np.full((16, 16), 4096, dtype=np.uint16)
    with pytest.raises(PixelDataError, match="Bits Stored 12"):
        encode_stream(stored, 12, 0)
    with pytest.raises(PixelDataError, match="2-D"):
        encode_stream(np.zeros((2, 4, 4), np.uint16), 12, 0)
    with pytest.raises(PixelDataError, match="NEAR"):
        encode_stream(np.zeros((8, 8), np.uint16), 12, 256)


def test_corrupt_stream_raises_pixel_data_error() -> None:
    stream = encode_stream(_mammogram_like(12), 12, 0)
    with pytest.raises(PixelDataError):
        decode_stream(stream[:20])
    with pytest.raises(PixelDataError):
        decode_stream(b"not a jpeg-ls stream")


def test_the_system_charls_is_used_and_writes_what_pyjpegls_writes() -> None:
    """Coding goes through the CharLS that imagecodecs ships (ctypes, GIL released), byte
    for byte the codestream pyjpegls's bundled CharLS writes; either decodes the other's."""
    import jpeg_ls

    from latentpacs.codec import charls

    assert charls.available()
    stored = _mammogram_like(12, shape=(301, 257), seed=4)
    for near in (0, 3):
        ours = encode_stream(stored, 12, near)
        theirs = bytes(jpeg_ls.encode_buffer(stored.tobytes(), 301, 257, 1, 12, lossy_error=near))
        assert ours == theirs
        pixels, info = jpeg_ls.decode_buffer(ours)
        assert info["bits_per_sample"] == 12
        np.testing.assert_array_equal(decode_stream(theirs),
                                      np.frombuffer(pixels, "<u2").reshape(301, 257))


def test_coding_lets_other_python_threads_run() -> None:
    """While one thread decodes a 2294x1914 stream, another thread keeps running Python:
    a background coder or a decode ahead never stops the associations' threads."""
    import threading
    import time

    stored = _mammogram_like(12, shape=(2294, 1914), seed=5)
    stream = encode_stream(stored, 12, 0)
    inside: list[float] = []
    ticks: list[float] = []
    started = threading.Event()

    def decode() -> None:
        started.set()
        inside.append(time.monotonic())
        decode_stream(stream)
        inside.append(time.monotonic())

    worker = threading.Thread(target=decode)
    worker.start()
    started.wait()
    while worker.is_alive():
        ticks.append(time.monotonic())
    worker.join()
    begin, end = inside
    during = [begin, *(tick for tick in ticks if begin < tick < end), end]
    longest_pause = max(later - earlier for earlier, later in zip(during, during[1:]))
    # Holding the GIL, the decode would stop this thread for nearly all of its duration.
    assert longest_pause < 0.5 * (end - begin)
