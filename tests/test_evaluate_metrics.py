"""The evaluator's measures and baselines, checked against values computed by hand."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from latentpacs.codec.engine import resize_bilinear
from latentpacs.evaluate import baselines
from latentpacs.evaluate.metrics import (
    breast_mask,
    efficiency,
    mse,
    paper_mse,
    psnr,
    psnr_from_mse,
    psnr_region,
    ms_ssim,
    ssim,
)


def test_mse_and_psnr_of_tiny_arrays_match_hand_values() -> None:
    a = np.array([[0.0, 0.5], [1.0, 0.25]])
    b = np.array([[0.1, 0.5], [0.8, 0.25]])
    # (0.1^2 + 0 + 0.2^2 + 0) / 4 = 0.0125
    assert mse(a, b) == pytest.approx(0.0125)
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.0125))
    assert psnr_from_mse(0.0125) == pytest.approx(psnr(a, b))
    assert psnr(a, a) == math.inf


def test_paper_mse_is_measured_at_1024_so_constant_images_keep_their_difference() -> None:
    a = np.full((40, 30), 0.2, np.float32)
    b = np.full((40, 30), 0.5, np.float32)
    assert paper_mse(a, b) == pytest.approx(0.09, rel=1e-5)


def test_efficiency_is_eq3_with_natural_log() -> None:
    assert efficiency(0.01, 1000) == pytest.approx(0.99 / math.log(1000))
    assert efficiency(0.0, 128) == pytest.approx(1 / (7 * math.log(2)))
    with pytest.raises(ValueError):
        efficiency(0.1, 1)


def test_ssim_of_identical_images_is_one_and_of_constants_is_the_luminance_term() -> None:
    rng = np.random.default_rng(3)
    image = rng.random((32, 32))
    assert ssim(image, image) == pytest.approx(1.0)
    # Constant images: variances and covariance vanish, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert ssim(np.full((24, 24), 0.2), np.full((24, 24), 0.6)) == pytest.approx(expected)


def test_ssim_falls_as_noise_grows_and_is_symmetric() -> None:
    rng = np.random.default_rng(4)
    image = rng.random((48, 48))
    light = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
    heavy = np.clip(image + rng.normal(0, 0.2, image.shape), 0, 1)
    assert 1.0 > ssim(image, light) > ssim(image, heavy) > 0.0
    assert ssim(image, heavy) == pytest.approx(ssim(heavy, image))


def test_ms_ssim_is_one_for_identical_images_and_weighs_the_scales() -> None:
    rng = np.random.default_rng(5)
    image = rng.random((192, 176))
    assert ms_ssim(image, image) == pytest.approx(1.0)
    noisy = np.clip(image + rng.normal(0, 0.1, image.shape), 0, 1)
    # one scale: SSIM itself, raised to the weight
    assert ms_ssim(image, noisy, weights=(1.0,)) == pytest.approx(ssim(image, noisy))
    assert ms_ssim(image, noisy, weights=(0.5,)) == pytest.approx(ssim(image, noisy) ** 0.5)
    # constant images: every contrast-structure term is 1, only the coarsest luminance counts
    c1 = (0.01 * 1.0) ** 2
    luminance = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert ms_ssim(np.full((176, 176), 0.2), np.full((176, 176), 0.6)) == pytest.approx(luminance**0.1333)
    # white noise lives at the finest scale, which MS-SSIM weighs least
    assert ms_ssim(image, noisy) > ssim(image, noisy)
    with pytest.raises(ValueError, match="at least 176"):
        ms_ssim(image[:100], noisy[:100])


def test_breast_mask_keeps_the_largest_bright_region_not_labels() -> None:
    image = np.zeros((100, 80), np.float32)
    yy, xx = np.mgrid[:100, :80]
    image[(yy - 50) ** 2 + xx**2 < 40**2] = 0.6  # breast at the chest wall (left edge)
    image[5:9, 70:76] = 1.0  # a burned-in label in a corner
    mask = breast_mask(image)
    assert mask[50, 10] and not mask[7, 72] and not mask[95, 75]
    recon = image.copy()
    recon[7, 72] = 0.0  # an error outside the breast does not count
    assert psnr_region(image, recon, mask) == math.inf
    recon[50, 10] = 0.5
    assert psnr_region(image, recon, mask) == pytest.approx(10 * math.log10(mask.sum() / 0.01))


def test_jpeg_baseline_is_8_bit_pillow_jpeg_and_decodes_to_its_own_scale() -> None:
    rng = np.random.default_rng(5)
    canonical = rng.random((64, 48)).astype(np.float32)
    stream = baselines.jpeg_encode(canonical, 85)
    reference = io.BytesIO()
    Image.fromarray(np.rint(canonical * 255).astype(np.uint8), mode="L").save(reference, "JPEG", quality=85)
    assert stream == reference.getvalue()
    decoded = baselines.jpeg_decode(stream)
    assert decoded.shape == canonical.shape and decoded.dtype == np.float32
    assert 0.0 <= decoded.min() and decoded.max() <= 1.0


def test_paper_jpeg_codes_the_1024_resize_whatever_the_matrix() -> None:
    rng = np.random.default_rng(7)
    canonical = rng.random((300, 200)).astype(np.float32)
    stream = baselines.jpeg_paper_encode(canonical, 85)
    resized = resize_bilinear(canonical, (1024, 1024))
    reference = io.BytesIO()
    Image.fromarray(np.rint(np.clip(resized, 0, 1) * 255).astype(np.uint8), mode="L").save(
        reference, "JPEG", quality=85)
    assert stream == reference.getvalue()
    assert baselines.jpeg_decode(stream).shape == (1024, 1024)
    assert len(stream) != len(baselines.jpeg_encode(canonical, 85))


def test_lossless_coders_reproduce_12_bit_values_and_jpeg2000_trades_rate_for_error() -> None:
    rng = np.random.default_rng(6)
    smooth = np.cumsum(np.cumsum(rng.integers(-2, 3, (96, 80)), 0), 1)
    stored = np.clip(smooth - smooth.min(), 0, 4095).astype(np.uint16)
    for codec in baselines.LOSSLESS_CODECS:
        assert 0 < baselines.lossless_size(codec, stored, 12) < stored.size * 2
    low = baselines.jpeg2000_encode(stored, 12, 35.0)
    high = baselines.jpeg2000_encode(stored, 12, 55.0)
    err = [np.abs(baselines.jpeg2000_decode(s).astype(int) - stored).mean() for s in (low, high)]
    assert len(low) < len(high) and err[0] > err[1]
