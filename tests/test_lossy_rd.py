"""Lossy coding at a target ratio (JPEG 2000, HTJ2K), its scores, and the BD-rate."""

from __future__ import annotations

import numpy as np
import pytest

from latentpacs import phantom
from latentpacs.evaluate import lossy


@pytest.fixture(scope="module")
def physical() -> tuple[np.ndarray, np.ndarray, int, list[phantom.TestObject]]:
    """A 640x520 physical phantom with test objects: canonical, stored values, bits, objects."""
    spec = phantom.PhantomSpec(640, 520, "CC", "L", 12, "MONOCHROME2", "FOR PRESENTATION",
                               masses=1, calcification_clusters=0, dose=1500.0, test_objects=True)
    canonical, objects = phantom.render_with_test_objects(spec, np.random.default_rng(9300))
    return canonical, phantom._quantise(canonical, spec), 12, objects


@pytest.mark.parametrize("codec", [lossy.JPEG2000, lossy.HTJ2K], ids=lambda c: c.name)
@pytest.mark.parametrize("ratio", [10.0, 20.0, 30.0])
def test_the_ratio_is_met_within_ten_percent(physical, codec: lossy.RatioCodec, ratio: float) -> None:
    canonical, stored, bits, objects = physical
    stream, _ = lossy.encode_at_ratio(codec, stored, bits, ratio)
    achieved = lossy.stored_bytes(stored.shape) / len(stream)
    assert ratio <= achieved <= ratio / (1 - lossy.RATIO_TOLERANCE)
    decoded = codec.decode(stream)
    assert decoded.shape == stored.shape and not np.array_equal(decoded, stored)
    result = lossy.score(codec.name, ratio, len(stream), canonical, decoded.astype(np.float32) / 4095, objects)
    assert result.ratio == pytest.approx(achieved)
    assert 30.0 < result.psnr_breast < 80.0 and 0.5 < result.ms_ssim_breast < 1.0
    assert len(result.contrast_kept) == len(objects) == 9


def test_more_compression_keeps_less(physical) -> None:
    canonical, stored, bits, objects = physical
    scores = []
    for ratio in (10.0, 30.0):
        stream, _ = lossy.encode_at_ratio(lossy.JPEG2000, stored, bits, ratio)
        decoded = lossy.JPEG2000.decode(stream).astype(np.float32) / 4095
        scores.append(lossy.score("jpeg2000", ratio, len(stream), canonical, decoded, objects))
    gentle, harsh = scores
    assert gentle.psnr_breast > harsh.psnr_breast and gentle.ms_ssim_breast > harsh.ms_ssim_breast
    assert np.mean([k for _, k in gentle.contrast_kept]) > np.mean([k for _, k in harsh.contrast_kept])
    # the original scored against itself keeps every object whole
    same = lossy.score("none", 1.0, lossy.stored_bytes(stored.shape), canonical, canonical, objects)
    assert all(k == pytest.approx(1.0) for _, k in same.contrast_kept)


def test_an_unreachable_ratio_is_named() -> None:
    flat = np.full((256, 256), 100, np.uint16)
    with pytest.raises(lossy.RatioNotReached, match="jpeg2000: no setting gives 2:1"):
        lossy.encode_at_ratio(lossy.JPEG2000, flat, 12, 2.0)


def test_bd_rate_of_a_curve_shifted_in_rate_is_that_shift() -> None:
    psnr = [38.0, 41.0, 44.0, 47.0, 50.0]
    rates = [0.2, 0.35, 0.6, 1.0, 1.6]
    anchor = list(zip(rates, psnr))
    assert lossy.bd_rate(anchor, anchor) == pytest.approx(0.0, abs=1e-9)
    cheaper = [(r * 0.9, p) for r, p in anchor]
    assert lossy.bd_rate(anchor, cheaper) == pytest.approx(-10.0, abs=1e-6)
    assert lossy.bd_rate(cheaper, anchor) == pytest.approx(100 / 0.9 - 100, abs=1e-6)
    with pytest.raises(ValueError, match="at least 4"):
        lossy.bd_rate(anchor[:3], anchor)
    with pytest.raises(ValueError, match="no PSNR range"):
        lossy.bd_rate(anchor, [(r, p + 20) for r, p in anchor])
