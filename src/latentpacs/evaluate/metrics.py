"""Image-quality and rate metrics, as the paper defines them and beyond.

The paper's measures work on images scaled to [0, 1] and resized bilinearly to
1024 x 1024, as the models see them: MSE (Eq. 1) and the efficiency figure
Eff = (1 - MSE) / ln(bits) (Eq. 3), bits being the size of the stored encoding.
Beyond the paper: SSIM (Wang et al. 2004, Gaussian window), MS-SSIM (Wang et al. 2003)
and PSNR over the breast
region only (:func:`breast_mask`), so background pixels do not flatter a codec.
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


#: SSIM constants of Wang et al. (2004): K1, K2, Gaussian sigma, window radius (11 x 11).
SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_RADIUS = 0.01, 0.03, 1.5, 5
#: Breast mask: canonical value above this after the blur below (the phantom's background is 0).
BREAST_THRESHOLD = 0.05
#: Breast mask blur (Gaussian sigma in pixels), enough to bridge film-grain noise.
BREAST_BLUR_SIGMA = 2.0


def _ssim_parts(x: np.ndarray, y: np.ndarray, data_range: float) -> tuple[float, float]:
    """Mean SSIM and mean contrast-structure term (Wang et al. 2004, Eq. 13 without luminance)."""
    from scipy.ndimage import gaussian_filter

    def blur(v: np.ndarray) -> np.ndarray:
        return gaussian_filter(v, SSIM_SIGMA, mode="reflect", truncate=SSIM_RADIUS / SSIM_SIGMA)

    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    cs_map = (2 * cxy + c2) / (vx + vy + c2)
    ssim_map = ((2 * mx * my + c1) / (mx * mx + my * my + c1)) * cs_map
    r = SSIM_RADIUS
    if min(ssim_map.shape) > 2 * r:
        ssim_map, cs_map = ssim_map[r:-r, r:-r], cs_map[r:-r, r:-r]
    return float(np.mean(ssim_map)), float(np.mean(cs_map))


def _check_pair(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.ndim != 2:
        raise ValueError(f"{what} needs 2-D images, got shape {a.shape}")


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity of two equally shaped images (Wang et al. 2004).

    Local means, variances and covariance are Gaussian-weighted (sigma 1.5, an 11 x 11
    window), with K1 = 0.01, K2 = 0.03 and the given data range; the SSIM map is averaged
    over the pixels whose whole window lies inside the image (Wang's "valid" region), or
    over every pixel when the image is smaller than one window.
    """
    _check_pair(a, b, "SSIM")
    return _ssim_parts(a.astype(np.float64), b.astype(np.float64), data_range)[0]


#: MS-SSIM scale weights of Wang, Simoncelli and Bovik (2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0,
            weights: tuple[float, ...] = MS_SSIM_WEIGHTS) -> float:
    """Multi-scale structural similarity (Wang, Simoncelli and Bovik 2003).

    At each of ``len(weights)`` scales (each a 2 x 2 average of the one before) the mean
    contrast-structure term is raised to its weight; the coarsest scale contributes the
    whole SSIM (luminance included). The window and constants are those of :func:`ssim`.
    A negative mean term (anti-correlated structure) counts as 0, so the product stays
    real. With one weight it is :func:`ssim` raised to that weight.

    Raises
    ------
    ValueError
        When the shapes differ, or the coarsest scale would be smaller than one window
        (11 x 11): 5 scales need images of at least 176 x 176.
    """
    _check_pair(a, b, "MS-SSIM")
    scales = len(weights)
    side = 2 * SSIM_RADIUS + 1
    if min(a.shape) < side * 2 ** (scales - 1):
        raise ValueError(f"MS-SSIM at {scales} scales needs images of at least "
                         f"{side * 2 ** (scales - 1)} pixels a side, got {a.shape}")
    x, y = a.astype(np.float64), b.astype(np.float64)
    value = 1.0
    for scale, weight in enumerate(weights):
        whole, cs = _ssim_parts(x, y, data_range)
        term = whole if scale == scales - 1 else cs
        value *= max(term, 0.0) ** weight
        if scale < scales - 1:
            rows, cols = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
            x = x[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).mean(axis=(1, 3))
            y = y[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).mean(axis=(1, 3))
    return float(value)


def breast_mask(canonical: np.ndarray) -> np.ndarray:
    """The breast region of a canonical image (bright = dense), as a boolean array.

    The image is blurred lightly (Gaussian, sigma ``BREAST_BLUR_SIGMA`` pixels) and
    thresholded at ``BREAST_THRESHOLD``; only the largest connected region is kept, so
    burned-in labels and markers in the background do not count as breast. An image with
    no pixel above the threshold gives an all-True mask (the whole image is measured).
    """
    from scipy.ndimage import gaussian_filter, label

    smooth = gaussian_filter(canonical.astype(np.float32), BREAST_BLUR_SIGMA)
    above = smooth > BREAST_THRESHOLD
    regions, count = label(above)
    if count == 0:
        return np.ones(canonical.shape, dtype=bool)
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    return regions == int(np.argmax(sizes))


def psnr_region(a: np.ndarray, b: np.ndarray, mask: np.ndarray, peak: float = 1.0) -> float:
    """PSNR in dB over the pixels where ``mask`` is True; ``inf`` when they agree there."""
    if a.shape != b.shape or mask.shape != a.shape:
        raise ValueError(f"shapes differ: {a.shape}, {b.shape}, mask {mask.shape}")
    if not mask.any():
        raise ValueError("the region is empty")
    diff = a[mask].astype(np.float64) - b[mask].astype(np.float64)
    error = float(np.mean(diff * diff))
    return math.inf if error == 0 else 10.0 * math.log10(peak * peak / error)


def psnr_from_mse(mse_value: float, peak: float = 1.0) -> float:
    """PSNR in dB of a given MSE; ``inf`` for 0."""
    return math.inf if mse_value == 0 else 10.0 * math.log10(peak * peak / mse_value)


def object_visibility(image: np.ndarray, row: float, column: float, radius: float) -> tuple[float, float]:
    """Contrast and contrast-to-noise ratio of a small bright disc (a test object).

    Contrast is the mean over the disc (centre within ``radius`` pixels) less the mean
    over a surrounding ring (``radius + 2`` to ``radius + 2 + max(4, 2 radius)``, which
    the disc's anti-aliased edge does not reach); CNR divides it by the ring's standard
    deviation. Measured on the original and on a reconstruction, their ratios say how much
    of a calcification-like detail a codec keeps (``phantom.TestObject`` gives where).

    Raises
    ------
    ValueError
        When the disc or its ring leaves the image.
    """
    outer = radius + 2.0 + max(4.0, 2.0 * radius)
    top, bottom = math.floor(row - outer), math.ceil(row + outer) + 1
    left, right = math.floor(column - outer), math.ceil(column + outer) + 1
    if top < 0 or left < 0 or bottom > image.shape[0] or right > image.shape[1]:
        raise ValueError(f"the test object at ({row:.1f}, {column:.1f}) and its ring leave the image")
    patch = image[top:bottom, left:right].astype(np.float64)
    dy, dx = np.mgrid[top:bottom, left:right]
    distance = np.hypot(dy + 0.5 - row, dx + 0.5 - column)
    disc = patch[distance <= radius]
    ring = patch[(distance >= radius + 2.0) & (distance <= outer)]
    contrast = float(disc.mean() - ring.mean())
    spread = float(ring.std())
    return contrast, (contrast / spread if spread > 0 else math.inf)
