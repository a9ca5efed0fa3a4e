"""Lossy coding at a target compression ratio, and how to compare rate-distortion curves.

The ratios that guidelines accept for lossy mammography (RCR 20:1, CAR 25:1, DRG 15:1)
are stated against the stored bytes: Rows x Columns x Bits Allocated / 8 (PS3.5 8.1.1,
16 bits allocated for every mammogram here). A codec is run at a ratio by searching its
own rate knob until the stream is at most the target size and no more than 10 % below it;
every figure then compares codecs at (nearly) the same bytes.

Measured per decoded image: PSNR over the breast (:func:`metrics.psnr_region`), MS-SSIM
over the breast's bounding box (:func:`metrics.ms_ssim`), and for phantoms with test
objects the share of each disc's contrast that survives (:func:`metrics.object_visibility`).
Contrast, not the decoded image's own CNR: a codec that smooths away the noise around a
disc raises that CNR without showing the disc any better, so the kept share of the
contrast, over the original's noise, is the CNR a reader is left with. :func:`bd_rate` is the Bjøntegaard delta rate of
two curves (VCEG-M33): the mean bitrate difference at equal PSNR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import imagecodecs
import numpy as np

from latentpacs.evaluate.baselines import jpeg2000_decode, jpeg2000_encode
from latentpacs.evaluate.metrics import breast_mask, ms_ssim, object_visibility, psnr_region

#: How far below the target size a stream may end (10 %: the issue's tolerance).
RATIO_TOLERANCE = 0.10
#: Bisection steps of the rate search; 2**-20 of the knob's log-range is far finer than needed.
SEARCH_STEPS = 20


class RatioNotReached(ValueError):
    """No setting of the codec's knob gives a stream within the tolerance of the target."""


@dataclass(frozen=True)
class RatioCodec:
    """A lossy codec driven by one monotonic knob.

    ``encode(stored, bits_stored, knob)`` returns a stream; ``decode(stream)`` the stored
    values. The stream grows with the knob when ``grows`` is true. ``low``/``high`` bound
    the knob, searched on a log scale.
    """

    name: str
    encode: Callable[[np.ndarray, int, float], bytes]
    decode: Callable[[bytes], np.ndarray]
    low: float
    high: float
    grows: bool


def _htj2k_encode(stored: np.ndarray, bits_stored: int, step: float) -> bytes:
    values = np.ascontiguousarray(stored, dtype=np.uint8 if bits_stored <= 8 else np.uint16)
    return bytes(imagecodecs.htj2k_encode(values, level=step, reversible=False))


def _decode_htj2k(stream: bytes) -> np.ndarray:
    return np.asarray(imagecodecs.htj2k_decode(stream)).astype(np.uint16)


#: OpenJPEG's JPEG 2000 (irreversible 9/7, one quality layer; knob: the target PSNR in dB)
#: and OpenJPH's HTJ2K (irreversible; knob: the quantisation step, larger is smaller).
JPEG2000 = RatioCodec("jpeg2000", jpeg2000_encode, jpeg2000_decode, 20.0, 120.0, grows=True)
HTJ2K = RatioCodec("htj2k", _htj2k_encode, _decode_htj2k, 1e-6, 1.0, grows=False)


def stored_bytes(shape: tuple[int, ...], bits_allocated: int = 16) -> int:
    """The uncompressed size a ratio is stated against: Rows x Columns x Bits Allocated / 8."""
    return int(np.prod(shape)) * bits_allocated // 8


def encode_at_ratio(codec: RatioCodec, stored: np.ndarray, bits_stored: int, ratio: float) -> tuple[bytes, float]:
    """The stream of ``codec`` closest to ``ratio``:1 from above, and the knob that made it.

    The stream is at most ``stored_bytes / ratio`` bytes and at least (1 - 10 %) of that.

    Raises
    ------
    RatioNotReached
        When no knob in the codec's range lands within the tolerance (e.g. a flat image
        that is smaller than the target even at the highest quality).
    """
    if ratio <= 1.0:
        raise ValueError(f"a lossy ratio must exceed 1, got {ratio}")
    target = stored_bytes(stored.shape) / ratio
    lo, hi = math.log(codec.low), math.log(codec.high)
    best: tuple[bytes, float] | None = None
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2
        stream = codec.encode(stored, bits_stored, math.exp(mid))
        fits = len(stream) <= target
        if fits and (best is None or len(stream) > len(best[0])):
            best = (stream, math.exp(mid))
        if best is not None and len(best[0]) >= (1 - RATIO_TOLERANCE) * target:
            return best
        # move towards larger streams when this one fits, towards smaller ones otherwise
        if fits == codec.grows:
            lo = mid
        else:
            hi = mid
    raise RatioNotReached(f"{codec.name}: no setting gives {ratio:g}:1 within "
                          f"{RATIO_TOLERANCE:.0%} (target {target:.0f} bytes)")


@dataclass(frozen=True)
class LossyScore:
    """What one decoded image keeps: achieved ratio, breast PSNR, MS-SSIM, test objects."""

    codec: str
    ratio_target: float
    ratio: float
    psnr_breast: float
    ms_ssim_breast: float
    #: Per test object: its diameter in pixels and contrast decoded / contrast original
    #: (the CNR kept, both measured against the original's noise).
    contrast_kept: tuple[tuple[float, float], ...]


def score(codec: str, ratio_target: float, stream_bytes: int, original: np.ndarray, decoded: np.ndarray,
          objects: Sequence[object] = ()) -> LossyScore:
    """Score a decoded canonical image (float in [0, 1]) against its original.

    ``objects`` are :class:`latentpacs.phantom.TestObject` (row, column, radius); the CNR
    contrast of each is measured on both images with :func:`metrics.object_visibility`.
    """
    mask = breast_mask(original)
    rows, cols = np.nonzero(mask)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    kept = []
    for obj in objects:
        row, column, radius = obj.row, obj.column, obj.radius  # type: ignore[attr-defined]
        before, _ = object_visibility(original, row, column, radius)
        after, _ = object_visibility(decoded, row, column, radius)
        kept.append((2.0 * radius, after / before if before else math.nan))
    return LossyScore(codec, ratio_target, stored_bytes(original.shape) / stream_bytes,
                      psnr_region(original, decoded, mask), ms_ssim(original[box], decoded[box]),
                      tuple(kept))


def bd_rate(anchor: Sequence[tuple[float, float]], test: Sequence[tuple[float, float]]) -> float:
    """Bjøntegaard delta rate of ``test`` against ``anchor``, in percent (VCEG-M33).

    Each curve is (rate, PSNR dB) points, at least 4. log(rate) is fitted as a cubic in
    PSNR for each curve; the mean difference of the fits over the PSNR range both
    curves cover gives the rate ratio at equal quality. Negative: ``test`` needs fewer
    bits for the same PSNR.

    Raises
    ------
    ValueError
        With fewer than 4 points on a curve or no common PSNR range.
    """
    if len(anchor) < 4 or len(test) < 4:
        raise ValueError("BD-rate needs at least 4 rate-PSNR points per curve")
    a = np.asarray(anchor, dtype=np.float64)
    t = np.asarray(test, dtype=np.float64)
    low = max(a[:, 1].min(), t[:, 1].min())
    high = min(a[:, 1].max(), t[:, 1].max())
    if not high > low:
        raise ValueError("the two curves share no PSNR range")
    fit_a = np.polyint(np.polyfit(a[:, 1], np.log(a[:, 0]), 3))
    fit_t = np.polyint(np.polyfit(t[:, 1], np.log(t[:, 0]), 3))
    mean_a = (np.polyval(fit_a, high) - np.polyval(fit_a, low)) / (high - low)
    mean_t = (np.polyval(fit_t, high) - np.polyval(fit_t, low)) / (high - low)
    return float((math.exp(mean_t - mean_a) - 1.0) * 100.0)
