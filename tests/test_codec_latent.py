"""The stored latent format: quantisation error, clipping, byte counts, calibration."""

from __future__ import annotations

import numpy as np
import pytest

from latentpacs.codec.latent import LatentFormat, calibrate
from latentpacs.codec.models import build_model
from latentpacs.errors import LatentFormatError, ModelError


def _format(bits: int = 8, dim: int = 16) -> LatentFormat:
    low = tuple(float(-1 - d) for d in range(dim))
    high = tuple(float(2 + d) for d in range(dim))
    return LatentFormat(dim, bits, low, high)


def test_sixteen_dims_at_eight_bits_are_sixteen_bytes() -> None:
    fmt = _format()
    assert fmt.nbytes == 16
    assert len(fmt.to_bytes(np.zeros(16))) == 16
    assert _format(bits=5).nbytes == 10  # the paper's ~80 bits
    assert _format(bits=3, dim=3).nbytes == 2


@pytest.mark.parametrize("bits", [1, 5, 8, 12, 16])
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(bits: int) -> None:
    fmt = _format(bits)
    rng = np.random.default_rng(bits)
    low, high = np.array(fmt.low), np.array(fmt.high)
    for _ in range(50):
        z = low + rng.random(16) * (high - low)
        back = fmt.from_bytes(fmt.to_bytes(z))
        assert back.dtype == np.float32 and back.shape == (16,)
        assert np.all(np.abs(back - z) <= fmt.step / 2 + 1e-5 * (high - low))


def test_values_outside_the_range_are_clipped_to_the_end_bins() -> None:
    fmt = _format(8)
    z = np.array(fmt.high) + 100.0
    z[::2] = np.array(fmt.low)[::2] - 100.0
    back = fmt.from_bytes(fmt.to_bytes(z))
    expected = np.where(np.arange(16) % 2 == 0, np.array(fmt.low), np.array(fmt.high))
    np.testing.assert_allclose(back, expected, atol=fmt.step.max() / 2 + 1e-6)


def test_bits_are_packed_msb_first_dimension_zero_first() -> None:
    fmt = LatentFormat(3, 4, (0.0, 0.0, 0.0), (16.0, 16.0, 16.0))
    # indices 1, 15, 10 -> bits 0001 1111 1010 (+ 4 zero pad bits)
    assert fmt.to_bytes(np.array([1.2, 15.9, 10.5])) == bytes([0x1F, 0xA0])
    np.testing.assert_allclose(fmt.from_bytes(bytes([0x1F, 0xA0])), [1.5, 15.5, 10.5])


def test_wrong_length_and_bad_latents_raise_latent_format_error() -> None:
    fmt = _format()
    with pytest.raises(LatentFormatError, match="needs 16"):
        fmt.from_bytes(b"\x00" * 15)
    with pytest.raises(LatentFormatError, match="shape"):
        fmt.to_bytes(np.zeros(15))
    with pytest.raises(LatentFormatError, match="non-finite"):
        fmt.to_bytes(np.full(16, np.nan))
    with pytest.raises(LatentFormatError, match="high > low"):
        LatentFormat(2, 8, (0.0, 1.0), (1.0, 1.0))


def test_calibration_sets_the_models_range_and_format() -> None:
    model = build_model("ae", image_size=64, latent_dim=4, latent_bits=6)
    latents = np.array([[0.0, -2.0, 5.0, 1.0], [1.0, 2.0, 5.0, 3.0], [0.5, 0.0, 5.0, 2.0]])
    calibrate(model, latents)
    fmt = LatentFormat.from_model(model)
    assert fmt.bits == 6 and fmt.nbytes == 3
    np.testing.assert_allclose(fmt.low[:2], [-0.05, -2.2], rtol=1e-6)
    np.testing.assert_allclose(fmt.high[:2], [1.05, 2.2], rtol=1e-6)
    assert fmt.low[2] < 5.0 < fmt.high[2]  # a constant dimension still gets a range
    for row in latents:
        assert np.all(np.abs(fmt.from_bytes(fmt.to_bytes(row)) - row) <= fmt.step / 2 + 1e-6)
    with pytest.raises(ModelError, match="shape"):
        calibrate(model, np.zeros((3, 5)))
