"""The stored latent format: uniform scalar quantisation and MSB-first bit packing.

Each of the D latent dimensions is clipped to its range [low_d, high_d] and quantised
uniformly to ``bits`` bits: with L = 2**bits levels and step_d = (high_d - low_d) / L,
index q_d = floor((z_d - low_d) / step_d) clipped to [0, L - 1], decoded as the bin
centre low_d + (q_d + 0.5) * step_d, so the error inside the range is at most step_d / 2.
The D indices are written as one big-endian bit string (dimension 0 first, most
significant bit first), zero-padded to whole bytes: ceil(D * bits / 8) bytes. Those bytes
are what every "bits" figure of latentpacs counts; 16 dimensions at 8 bits are 16 bytes
(128 bits), at 5 bits 10 bytes (80 bits, the paper's reference figure).

The ranges live in the model's ``latent_low`` / ``latent_high`` buffers, so they are part
of the weights file and covered by its SHA-256.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from latentpacs.codec.models import MAX_LATENT_BITS, LatentAutoencoder
from latentpacs.errors import LatentFormatError, ModelError

logger = logging.getLogger(__name__)

#: Fraction of the observed span added on each side of the calibrated range.
CALIBRATION_MARGIN = 0.05


@dataclass(frozen=True)
class LatentFormat:
    """How a model's latents become bytes.

    Parameters
    ----------
    latent_dim:
        Number of dimensions D.
    bits:
        Bits per dimension (1 to 16).
    low, high:
        Quantisation range of each dimension; ``high[d] > low[d]``.

    Raises
    ------
    LatentFormatError
        When the parameters are inconsistent.
    """

    latent_dim: int
    bits: int
    low: tuple[float, ...]
    high: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise LatentFormatError(f"latent_dim must be at least 1, got {self.latent_dim}")
        if not 1 <= self.bits <= MAX_LATENT_BITS:
            raise LatentFormatError(f"bits must be 1 to {MAX_LATENT_BITS}, got {self.bits}")
        if len(self.low) != self.latent_dim or len(self.high) != self.latent_dim:
            raise LatentFormatError(f"low and high must each hold {self.latent_dim} values")
        low, high = np.asarray(self.low), np.asarray(self.high)
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(high > low)):
            raise LatentFormatError("every latent range must be finite with high > low")

    @classmethod
    def from_model(cls, model: LatentAutoencoder) -> LatentFormat:
        """The format of ``model``: its latent size, bits and calibrated ranges."""
        low = model.latent_low.detach().cpu().double().tolist()
        high = model.latent_high.detach().cpu().double().tolist()
        return cls(model.latent_dim, model.latent_bits, tuple(low), tuple(high))

    @property
    def nbytes(self) -> int:
        """Stored size of one latent: ceil(latent_dim * bits / 8)."""
        return math.ceil(self.latent_dim * self.bits / 8)

    @property
    def step(self) -> np.ndarray:
        """Quantisation step of each dimension (float64, shape (D,))."""
        return (np.asarray(self.high) - np.asarray(self.low)) / (1 << self.bits)

    def quantise(self, z: np.ndarray) -> np.ndarray:
        """Bin indices (uint32, shape (D,)) of a latent ``z`` of shape (D,), clipped to range.

        Raises
        ------
        LatentFormatError
            When ``z`` has the wrong shape or a non-finite value.
        """
        values = np.asarray(z, dtype=np.float64)
        if values.shape != (self.latent_dim,):
            raise LatentFormatError(
                f"latent must have shape ({self.latent_dim},), got {values.shape}"
            )
        if not np.all(np.isfinite(values)):
            raise LatentFormatError("latent holds a non-finite value (NaN or infinity)")
        index = np.floor((values - np.asarray(self.low)) / self.step)
        return np.clip(index, 0, (1 << self.bits) - 1).astype(np.uint32)

    def to_bytes(self, z: np.ndarray) -> bytes:
        """Quantise ``z`` (shape (D,)) and pack the indices MSB-first into :attr:`nbytes` bytes."""
        index = self.quantise(z)
        shifts = np.arange(self.bits - 1, -1, -1, dtype=np.uint32)
        bitstring = ((index[:, None] >> shifts) & 1).astype(np.uint8).ravel()
        return np.packbits(bitstring).tobytes()

    def indices_from_bytes(self, data: bytes) -> np.ndarray:
        """Unpack stored bytes to the bin indices (int64, shape (D,), 0 to 2**bits - 1).

        Raises
        ------
        LatentFormatError
            When ``data`` is not exactly :attr:`nbytes` long.
        """
        if len(data) != self.nbytes:
            raise LatentFormatError(
                f"latent is {len(data)} bytes; this model's format needs {self.nbytes}"
            )
        bitstring = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        per_dim = bitstring[: self.latent_dim * self.bits].reshape(self.latent_dim, self.bits)
        shifts = np.arange(self.bits - 1, -1, -1, dtype=np.int64)
        return np.sum(per_dim.astype(np.int64) << shifts, axis=1)

    def from_bytes(self, data: bytes) -> np.ndarray:
        """Unpack stored bytes to the bin centres (float32, shape (D,)).

        Raises
        ------
        LatentFormatError
            When ``data`` is not exactly :attr:`nbytes` long.
        """
        index = self.indices_from_bytes(data)
        centres = np.asarray(self.low) + (index + 0.5) * self.step
        return centres.astype(np.float32)


def calibrate(model: LatentAutoencoder, latents: np.ndarray) -> None:
    """Set the model's quantisation ranges from the latents of its training set.

    Each dimension's range becomes [min, max] of ``latents`` widened on each side by
    :data:`CALIBRATION_MARGIN` of its span (by at least 1e-3 of its magnitude, so a
    constant dimension still gets a valid float32 range). Run it after training, before
    :func:`~latentpacs.codec.modelfile.save_model`.

    Parameters
    ----------
    model:
        The model whose ``latent_low`` / ``latent_high`` buffers are set in place.
    latents:
        Array (N, D) of float latents from :meth:`LatentAutoencoder.encode`.

    Raises
    ------
    ModelError
        When ``latents`` is empty, of the wrong width or not finite.
    """
    values = np.asarray(latents, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] != model.latent_dim:
        raise ModelError(
            f"calibration needs latents of shape (N, {model.latent_dim}) with N >= 1, "
            f"got {values.shape}"
        )
    if not np.all(np.isfinite(values)):
        raise ModelError("calibration latents hold a non-finite value")
    lo, hi = values.min(axis=0), values.max(axis=0)
    scale = np.maximum(1.0, np.maximum(np.abs(lo), np.abs(hi)))
    margin = np.maximum(CALIBRATION_MARGIN * (hi - lo), 1e-3 * scale)
    with torch.no_grad():
        model.latent_low.copy_(torch.from_numpy(lo - margin))
        model.latent_high.copy_(torch.from_numpy(hi + margin))
    logger.info(
        "calibrated %s latent ranges from %d latents (widest span %.4g)",
        model.arch,
        values.shape[0],
        float((hi - lo).max()),
    )
