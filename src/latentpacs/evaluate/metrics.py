"""Image-quality and rate metrics, as the paper defines them and beyond.

The paper's measures work on images scaled to [0, 1] and resized bilinearly to
1024 x 1024, as the models see them: MSE (Eq. 1) and the efficiency figure
Eff = (1 - MSE) / ln(bits) (Eq. 3), bits being the size of the stored encoding.
"""

from __future__ import annotations

import math

import numpy as np

from latentpacs.codec.engine import resize_bilinear

#: The resolution of the paper's measures.
PAPER_SIZE = (1024, 1024)


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error of two equally shaped images."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(diff * diff))


def paper_mse(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """The paper's MSE (Eq. 1): canonical [0, 1] images, both resized to 1024 x 1024."""
    return mse(
        resize_bilinear(original.astype(np.float32), PAPER_SIZE),
        resize_bilinear(reconstruction.astype(np.float32), PAPER_SIZE),
    )


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    error = mse(a, b)
    return math.inf if error == 0 else 10.0 * math.log10(peak * peak / error)


def efficiency(mse_value: float, bits: int) -> float:
    """The paper's Eq. 3: (1 - MSE) / ln(bits)."""
    if bits <= 1:
        raise ValueError(f"efficiency needs more than 1 bit, got {bits}")
    return (1.0 - mse_value) / math.log(bits)
