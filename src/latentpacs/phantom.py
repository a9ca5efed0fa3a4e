"""Synthetic mammograms as DICOM Digital Mammography X-Ray images (PS3.3 A.26).

The phantom is built in three layers:

* :func:`render_image` draws a canonical image (float32, rows x cols, [0, 1], bright =
  dense; see DESIGN.md "Contracts"): a breast outline growing from the chest wall with a
  skin-line fall-off, power-law (1/f^beta, beta ~ 3) tissue texture, a pectoral muscle on
  MLO views, masses, calcification clusters and burned-in laterality/view text.
* :func:`make_dataset` quantises it to Bits Stored (MONOCHROME1 inverted) and wraps it in a
  Part 10 ready Digital Mammography X-Ray Image (For Presentation or For Processing).
* :func:`generate` writes a reproducible set of patients, studies and images.

Orientation follows the usual hanging convention: left breasts have the chest wall at the
left edge, right breasts at the right edge (Patient Orientation "A\\R", "P\\L", "A\\FR",
"P\\FL", PS3.3 C.7.6.1.1.1). For demos, tests and training only; never a clinical path.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    UID,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
)
from scipy.ndimage import gaussian_filter

from latentpacs.errors import ConfigError
from latentpacs.uid import uid_from_name

logger = logging.getLogger(__name__)

VENDOR_SIZES: tuple[tuple[int, int], ...] = ((2294, 1914), (3328, 2560), (4096, 3328))
"""Detector matrices (rows, cols) of common full-field digital mammography systems."""

VIEWS = ("CC", "MLO")
LATERALITIES = ("L", "R")
BITS_STORED = (12, 14, 16)
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
PRESENTATIONS = ("FOR PRESENTATION", "FOR PROCESSING")

_SOP_CLASS = {
    "FOR PRESENTATION": DigitalMammographyXRayImageStorageForPresentation,
    "FOR PROCESSING": DigitalMammographyXRayImageStorageForProcessing,
}
#: View Code Sequence items (PS3.16 CID 4014), SNOMED CT (formerly SRT R-10242 / R-10226).
_VIEW_CODE = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
#: Patient Orientation (row, column direction) per laterality and view (PS3.3 C.7.6.1.1.1).
_ORIENTATION = {
    ("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"],
    ("L", "MLO"): ["A", "FR"], ("R", "MLO"): ["P", "FL"],
}
_PIXEL_SPACING_MM = {2294: 0.1, 3328: 0.07, 4096: 0.07}
_WORK_GRID = 1024  # smooth fields are computed at most this size, then upsampled
#: Physical model (render_image with a dose): attenuation of the brightest anatomy in nats,
#: detector blur (Gaussian sigma in pixels) and electronic noise (photons, rms).
ATTENUATION_NATS = 3.0
DETECTOR_BLUR_PX = 0.7
ELECTRONIC_NOISE = 4.0
#: Photons per pixel of the unattenuated beam: the default and the accepted range.
DEFAULT_DOSE = 1000.0
MIN_DOSE, MAX_DOSE = 10.0, 1.0e6
#: Test objects (``PhantomSpec.test_objects``): disc diameters (mm, one per grid column,
#: smallest nearest the chest wall) and contrasts (added to the anatomy, one per grid row).
TEST_OBJECT_DIAMETERS_MM = (0.2, 0.35, 0.5)
TEST_OBJECT_CONTRASTS = (0.03, 0.06, 0.12)
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "latentpacs:phantom")


@dataclass(frozen=True)
class TestObject:
    """One calcification-like test disc: centre (image row, column), radius in pixels, contrast."""

    __test__ = False  # not a pytest class

    row: float
    column: float
    radius: float
    contrast: float


def _derived_uid(*parts: object) -> str:
    """A UID under 2.25 (PS3.5 B.2) from a name-based UUID of ``parts``: same parts, same UID."""
    return uid_from_name(_UID_NAMESPACE, *parts)


@dataclass(frozen=True)
class PhantomSpec:
    """What one synthetic image shows and how it is stored.

    Parameters
    ----------
    rows, columns:
        Matrix size (PS3.3 C.7.6.3 Rows, Columns); at least 32 x 32.
    view:
        ``"CC"`` or ``"MLO"`` (View Code Sequence, PS3.3 C.8.11.7).
    laterality:
        ``"L"`` or ``"R"`` (Image Laterality, PS3.3 C.8.11.7).
    bits_stored:
        12, 14 or 16; Bits Allocated is always 16, unsigned (PS3.3 C.8.11.3).
    photometric:
        ``"MONOCHROME1"`` or ``"MONOCHROME2"`` (PS3.3 C.7.6.3.1.2).
    presentation:
        Presentation Intent Type, ``"FOR PRESENTATION"`` or ``"FOR PROCESSING"``
        (PS3.3 C.8.11.1).
    masses, calcification_clusters:
        How many of each lesion to draw (0 or more).
    dose:
        None for the plain model (anatomy plus white noise), or the mean photon count per
        pixel of the unattenuated beam for the physical model of :func:`render_image`:
        Poisson quantum noise, detector blur, electronic noise, log transform, air at 0.
    test_objects:
        Also draw :data:`TEST_OBJECT_DIAMETERS_MM` x :data:`TEST_OBJECT_CONTRASTS`
        calcification-like discs of known size and contrast on a grid inside the breast
        (:func:`render_with_test_objects` says where), to score what a lossy codec keeps.
    """

    rows: int
    columns: int
    view: str
    laterality: str
    bits_stored: int
    photometric: str
    presentation: str
    masses: int = 1
    calcification_clusters: int = 1
    dose: float | None = None
    test_objects: bool = False

    def __post_init__(self) -> None:
        if self.rows < 32 or self.columns < 32:
            raise ConfigError(f"phantom size {self.rows}x{self.columns} is below 32x32")
        for name, value, allowed in (
            ("view", self.view, VIEWS),
            ("laterality", self.laterality, LATERALITIES),
            ("bits_stored", self.bits_stored, BITS_STORED),
            ("photometric", self.photometric, PHOTOMETRICS),
            ("presentation", self.presentation, PRESENTATIONS),
        ):
            if value not in allowed:
                raise ConfigError(f"phantom {name}={value!r} is not one of {allowed}")
        if self.masses < 0 or self.calcification_clusters < 0:
            raise ConfigError("phantom lesion counts must be 0 or more")
        if self.dose is not None and not MIN_DOSE <= self.dose <= MAX_DOSE:
            raise ConfigError(f"phantom dose {self.dose} is not within {MIN_DOSE:g} to "
                              f"{MAX_DOSE:g} photons per pixel")

    @property
    def pixel_spacing_mm(self) -> float:
        """Imager pixel spacing: the vendor's value, else a 23 cm tall detector."""
        return _PIXEL_SPACING_MM.get(self.rows, round(230.0 / self.rows, 4))


@dataclass(frozen=True)
class _Breast:
    """Random anatomy of one image, in a frame with the chest wall at the left edge."""

    depth: float      # chest wall to nipple, fraction of columns
    centre: float     # row of the nipple axis, fraction of rows
    half_up: float    # extent above the axis, fraction of rows
    half_down: float  # extent below the axis, fraction of rows
    wobble: tuple[tuple[float, float], ...]  # outline harmonics (amplitude, phase), k = 2..
    beta: float       # texture power-law exponent
    density: float    # bias of fibroglandular fraction (ACR a..d)


@dataclass(frozen=True)
class _Tone:
    """Grey levels of tissues for one presentation intent."""

    fat: float
    dense: float
    pectoral: float
    edge_gamma: float  # thickness fall-off exponent; small = peripheral equalisation
    lesion_gain: float
    noise: float


_TONES = {
    "FOR PRESENTATION": _Tone(0.30, 0.82, 0.86, 0.35, 1.0, 0.006),
    "FOR PROCESSING": _Tone(0.30, 0.55, 0.58, 1.0, 0.6, 0.004),
}


def _draw_breast(spec: PhantomSpec, rng: np.random.Generator) -> _Breast:
    """Draw the anatomy: an MLO breast sits lower and runs up into the axilla."""
    mlo = spec.view == "MLO"
    centre = rng.uniform(0.56, 0.64) if mlo else rng.uniform(0.46, 0.54)
    half = rng.uniform(0.34, 0.44)
    return _Breast(
        depth=rng.uniform(0.55, 0.76),
        centre=centre,
        half_up=centre * rng.uniform(1.25, 1.45) if mlo else half,
        half_down=half * (0.85 if mlo else 1.0),
        wobble=tuple((rng.uniform(0.0, 0.025), rng.uniform(0, 2 * math.pi)) for _ in range(4)),
        beta=rng.uniform(2.8, 3.2),
        density=rng.uniform(-1.2, 0.6),
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow."""
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _power_law_texture(shape: tuple[int, int], beta: float, rng: np.random.Generator,
                       stretch: float = 1.6) -> np.ndarray:
    """Gaussian noise with power spectrum 1/f^beta, zero mean, unit variance."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f = np.sqrt((stretch * fx) ** 2 + fy * fy)  # stretch > 1: strands run along rows
    f[0, 0] = 1.0
    spectrum = np.fft.rfft2(rng.standard_normal(shape)) * f ** (-beta / 2.0)
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=shape)
    return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def _upsample(field: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear resize of a smooth float32 field to (rows, cols)."""
    if field.shape == (rows, cols):
        return field
    image = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32))
    return np.asarray(image.resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.float32)


def _smooth_fields(spec: PhantomSpec, breast: _Breast, tone: _Tone,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius (1 on the skin line) and tissue grey level, both full size."""
    scale = min(1.0, _WORK_GRID / max(spec.rows, spec.columns))
    wr, wc = max(16, round(spec.rows * scale)), max(16, round(spec.columns * scale))
    yn = ((np.arange(wr, dtype=np.float32) + 0.5) / wr)[:, None]
    xn = ((np.arange(wc, dtype=np.float32) + 0.5) / wc)[None, :]
    big_x = xn / breast.depth
    big_y = (yn - breast.centre) / np.where(yn < breast.centre, breast.half_up, breast.half_down)
    theta = np.arctan2(big_y, big_x)
    outline = 1.0 + sum(a * np.cos(k * theta + p) for k, (a, p) in enumerate(breast.wobble, 2))
    radius = np.sqrt(big_x * big_x + big_y * big_y) / outline

    texture = _power_law_texture((wr, wc), breast.beta, rng)
    glands = np.exp(-((big_x - 0.45) ** 2) / 0.10 - (big_y + 0.05) ** 2 / 0.30)
    fibro = _sigmoid(1.5 * (texture + breast.density + 1.8 * glands - 1.0))
    tissue = tone.fat + (tone.dense - tone.fat) * fibro + 0.03 * texture
    if spec.view == "MLO":
        width, height = rng.uniform(0.22, 0.32), rng.uniform(0.35, 0.55)
        u, v = xn / width, yn / height
        edge = 1.0 - u - v + rng.uniform(0.0, 0.6) * u * v  # bowed muscle border
        muscle = _sigmoid(edge / 0.02)
        muscle_grey = tone.pectoral * (0.9 + 0.1 * np.clip(edge * 3.0, 0.0, 1.0)) + 0.03 * texture
        tissue = tissue * (1.0 - muscle) + muscle_grey * muscle
    return (_upsample(radius.astype(np.float32), spec.rows, spec.columns),
            _upsample(tissue.astype(np.float32), spec.rows, spec.columns))


def _add_patch(image: np.ndarray, top: int, left: int, patch: np.ndarray) -> None:
    """Add ``patch`` at (top, left), clipped to the image."""
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + patch.shape[0], image.shape[0]), min(left + patch.shape[1], image.shape[1])
    if r1 > r0 and c1 > c0:
        image[r0:r1, c0:c1] += patch[r0 - top:r1 - top, c0 - left:c1 - left]


def _inside_point(spec: PhantomSpec, breast: _Breast, rng: np.random.Generator,
                  reach: float) -> tuple[float, float]:
    """A random (row, col) inside the breast at normalised radius at most ``reach``."""
    rho, theta = rng.uniform(0.15, reach), rng.uniform(-1.1, 1.1)
    big_y = rho * math.sin(theta)
    half = breast.half_up if big_y < 0 else breast.half_down
    return (breast.centre + big_y * half) * spec.rows, rho * math.cos(theta) * breast.depth * spec.columns


def _draw_mass(image: np.ndarray, spec: PhantomSpec, breast: _Breast, tone: _Tone,
               rng: np.random.Generator) -> None:
    """A lobulated, blurred ellipse, spiculated one time in three."""
    row, col = _inside_point(spec, breast, rng, 0.7)
    radius = max(2.0, rng.uniform(4.0, 12.0) / spec.pixel_spacing_mm)
    ratio, angle = rng.uniform(0.6, 1.0), rng.uniform(0, math.pi)
    contrast = rng.uniform(0.15, 0.28) * tone.lesion_gain
    half = int(radius * 2.8) + 2
    dy, dx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    along = dx * math.cos(angle) + dy * math.sin(angle)
    across = (-dx * math.sin(angle) + dy * math.cos(angle)) / ratio
    phi = np.arctan2(across, along)
    lobes = 1.0 + 0.08 * np.cos(3 * phi + rng.uniform(0, 6.3)) + 0.05 * np.cos(5 * phi)
    rho = np.sqrt(along * along + across * across) / (radius * lobes)
    patch = contrast * _sigmoid((1.0 - rho) / 0.07)
    if rng.random() < 1 / 3:
        canvas = Image.new("F", (2 * half + 1, 2 * half + 1), 0.0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(8, 17))):
            a, length = rng.uniform(0, 2 * math.pi), radius * rng.uniform(1.6, 2.7)
            end = (half + length * math.cos(a), half + length * math.sin(a))
            draw.line([(half, half), end], fill=float(contrast * 0.7), width=max(1, round(radius / 8)))
        blurred = gaussian_filter(np.asarray(canvas, dtype=np.float32), max(0.6, radius / 12))
        patch = np.maximum(patch, blurred)
    _add_patch(image, round(row) - half, round(col) - half, patch)


def _draw_calcifications(image: np.ndarray, spec: PhantomSpec, breast: _Breast, tone: _Tone,
                         rng: np.random.Generator) -> None:
    """A cluster of 5-15 tiny bright dots within a few millimetres."""
    row, col = _inside_point(spec, breast, rng, 0.75)
    spread = rng.uniform(2.0, 6.0) / spec.pixel_spacing_mm
    for _ in range(int(rng.integers(5, 16))):
        r, c = row + rng.normal(0, spread / 2), col + rng.normal(0, spread / 2)
        sigma = max(0.45, rng.uniform(0.15, 0.6) / spec.pixel_spacing_mm / 2.5)
        half = int(math.ceil(3 * sigma))
        top, left = math.floor(r) - half, math.floor(c) - half
        dy, dx = np.mgrid[0:2 * half + 2, 0:2 * half + 2].astype(np.float32)
        dist2 = (dy + top + 0.5 - r) ** 2 + (dx + left + 0.5 - c) ** 2
        amplitude = rng.uniform(0.25, 0.5) * tone.lesion_gain
        _add_patch(image, top, left, amplitude * np.exp(-dist2 / (2 * sigma * sigma)))


def _draw_test_objects(image: np.ndarray, spec: PhantomSpec, breast: _Breast) -> list[TestObject]:
    """The test discs on a grid well inside the breast (chest wall at the left), no randomness.

    Columns sit at 22, 36 and 50 % of the breast depth, rows at 0 and +-20 % of the
    breast's half-height around the nipple axis; each disc is anti-aliased and adds its
    contrast to the anatomy (attenuation, under the physical model).
    """
    objects = []
    for column_share, diameter in zip((0.22, 0.36, 0.50), TEST_OBJECT_DIAMETERS_MM):
        for row_share, contrast in zip((-0.2, 0.0, 0.2), TEST_OBJECT_CONTRASTS):
            half = breast.half_up if row_share < 0 else breast.half_down
            row = (breast.centre + row_share * half) * spec.rows
            col = column_share * breast.depth * spec.columns
            radius = max(0.75, diameter / 2.0 / spec.pixel_spacing_mm)
            reach = int(math.ceil(radius)) + 1
            top, left = math.floor(row) - reach, math.floor(col) - reach
            dy, dx = np.mgrid[0:2 * reach + 2, 0:2 * reach + 2].astype(np.float32)
            distance = np.sqrt((dy + top + 0.5 - row) ** 2 + (dx + left + 0.5 - col) ** 2)
            _add_patch(image, top, left, contrast * np.clip(radius + 0.5 - distance, 0.0, 1.0))
            objects.append(TestObject(row, col, radius, contrast))
    return objects


def _burn_in_text(image: np.ndarray, label: str, chest_wall_left: bool) -> None:
    """Write ``label`` bright in the top corner away from the chest wall."""
    rows, cols = image.shape
    font = ImageFont.load_default(size=max(10, round(rows * 0.035)))
    left, top, right, bottom = font.getbbox(label)
    pad = 2 + (bottom - top) // 3
    canvas = Image.new("1", (int(right - left + 2 * pad), int(bottom - top + 2 * pad)), 0)  # crisp strokes
    ImageDraw.Draw(canvas).text((pad - left, pad - top), label, fill=1, font=font)
    canvas = canvas.crop(canvas.getbbox())
    glyphs = np.asarray(canvas, dtype=np.float32)
    margin_r, margin_c = round(rows * 0.03), round(cols * 0.03)
    c0 = cols - margin_c - glyphs.shape[1] if chest_wall_left else margin_c
    region = image[margin_r:margin_r + glyphs.shape[0], c0:c0 + glyphs.shape[1]]
    np.maximum(region, glyphs[:region.shape[0], :region.shape[1]], out=region)


def _expose(anatomy: np.ndarray, inside: np.ndarray, dose: float,
            rng: np.random.Generator) -> np.ndarray:
    """The physical acquisition chain of a phantom: what a detector records of ``anatomy``.

    ``anatomy`` (bright = dense) is read as the attenuation line integral, up to
    :data:`ATTENUATION_NATS` at 1. The expected photon count ``dose * exp(-mu t)`` is drawn
    as Poisson quanta, spread by the detector's point-spread function (a Gaussian of
    :data:`DETECTOR_BLUR_PX`: correlated noise, as in indirect CsI detectors), offset by
    electronic noise, and log-transformed back to attenuation, so the noise grows where the
    breast is dense, as on real FOR PRESENTATION images (PS3.3 C.8.11.7 Pixel Intensity
    Relationship LOG). Pixels outside the breast are air, set to exactly 0 as processed
    mammograms show them.
    """
    mu_t = np.clip(anatomy.astype(np.float64), 0.0, 1.0) * ATTENUATION_NATS
    quanta = rng.poisson(dose * np.exp(-mu_t)).astype(np.float64)
    detected = gaussian_filter(quanta, DETECTOR_BLUR_PX)
    detected += rng.normal(0.0, ELECTRONIC_NOISE, detected.shape)
    attenuation = np.log(dose / np.maximum(detected, 0.5)) / ATTENUATION_NATS
    return np.where(inside >= 0.5, attenuation, 0.0).astype(np.float32)


def render_image(spec: PhantomSpec, rng: np.random.Generator) -> np.ndarray:
    """Draw one synthetic mammogram as a canonical image.

    Without a dose, white noise is added to the anatomy; with one, :func:`_expose` records
    it through the physical chain (quantum, blur, electronic noise, log, air at 0).

    Parameters
    ----------
    spec:
        What to draw.
    rng:
        Source of every random choice; the same generator state gives the same image.

    Returns
    -------
    numpy.ndarray
        float32 (rows, columns) in [0, 1]; 0 is the darkest displayed value under
        MONOCHROME2 (PS3.3 C.7.6.3.1.2): air near 0, dense tissue and text bright.
    """
    return _render(spec, rng, False)[0]


def render_with_test_objects(spec: PhantomSpec, rng: np.random.Generator) -> tuple[np.ndarray, list[TestObject]]:
    """:func:`render_image` of a spec with ``test_objects``, and where each test disc is.

    The image is exactly :func:`render_image`'s for the same generator state; the discs
    draw no random numbers, so the rest of the image is the one without them.

    Raises
    ------
    ConfigError
        For a spec without ``test_objects``.
    """
    if not spec.test_objects:
        raise ConfigError("the phantom spec draws no test objects (test_objects=False)")
    image, _, objects = _render(spec, rng, False)
    return image, objects


def render_with_noise_floor(spec: PhantomSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A physical phantom and the entropy of its recorded noise, bits per pixel.

    The second array is, for every pixel, the entropy rate of the noise the acquisition
    chain of :func:`_expose` adds, given the exact anatomy, in bits of a stored value at
    ``spec.bits_stored`` (0 in air, on burnt-in text and where the value is clipped: they
    are deterministic). No coder knows the anatomy, so its mean is below what any lossless
    coder can reach on the image (a noise floor); and at NEAR = K, no coder that keeps every
    value within K can spend less than that less ``log2(2K + 1)`` per noisy pixel (the
    Shannon lower bound for the maximum-error criterion): see :func:`noise_floor_bpp`.

    The noise is treated as Gaussian with the local variance of the photon counts (the
    Poisson counts at the doses used here are large), linearised through the log transform,
    with the spectrum of the detector blur plus white electronic noise; for a Gaussian
    field, the entropy rate is ``1/2 log2(2 pi e) + 1/2`` times the mean of ``log2`` of the
    spectrum over frequency, whatever order a coder visits the pixels in. The image is
    exactly :func:`render_image`'s for the same generator state.

    Raises
    ------
    ConfigError
        For a phantom without a dose (white noise has no physical floor).
    """
    if spec.dose is None:
        raise ConfigError("a noise floor needs the physical model (a phantom dose)")
    image, floor, _ = _render(spec, rng, True)
    return image, floor if floor is not None else np.zeros(image.shape)


def noise_floor_bpp(floor: np.ndarray, near: int = 0) -> float:
    """Mean bits per pixel below which no coder within ``near`` of every value can go.

    ``floor`` is the second array of :func:`render_with_noise_floor`. Whatever a coder
    sends describes the noisy pixels (``floor > 0``) within K; even given the anatomy that
    takes at least their noise entropy less ``log2(2K + 1)`` bits each (the values within
    K of a pixel), the Shannon lower bound for the maximum-error criterion.
    """
    noisy = floor[floor > 0]
    total = float(noisy.sum()) - noisy.size * math.log2(2 * near + 1)
    return max(total, 0.0) / max(floor.size, 1)


def _noise_bits(anatomy: np.ndarray, dose: float, bits: int) -> np.ndarray:
    """Entropy rate (bits per stored value) of :func:`_expose`'s noise at each pixel."""
    grid = 128
    delta = np.zeros((grid, grid))
    delta[0, 0] = 1.0
    blur_power = np.abs(np.fft.fft2(gaussian_filter(delta, DETECTOR_BLUR_PX, mode="wrap"))) ** 2
    photons = dose * np.exp(-np.clip(anatomy.astype(np.float64), 0.0, 1.0) * ATTENUATION_NATS)
    # the rate depends on the photon count only: tabulate it on a log grid, interpolate
    knots = np.geomspace(max(float(photons.min()), 1e-3), max(float(photons.max()), 1e-3) * 1.001, 256)
    top = (1 << bits) - 1
    gain = (top / ATTENUATION_NATS / knots) ** 2  # (stored units per photon)^2 through the log
    spectrum = gain[:, None, None] * (knots[:, None, None] * blur_power + ELECTRONIC_NOISE ** 2)
    rate = 0.5 * math.log2(2 * math.pi * math.e) + 0.5 * np.log2(spectrum).mean(axis=(1, 2))
    return np.interp(np.log(photons), np.log(knots), rate)


def _render(spec: PhantomSpec, rng: np.random.Generator,
            with_floor: bool) -> tuple[np.ndarray, np.ndarray | None, list[TestObject]]:
    """:func:`render_image`, with ``with_floor`` the noise floor of :func:`render_with_noise_floor`,
    and the test objects drawn (image coordinates)."""
    tone = _TONES[spec.presentation]
    breast = _draw_breast(spec, rng)
    radius, tissue = _smooth_fields(spec, breast, tone, rng)
    band = 0.07  # thickness fall-off band, in units of the normalised radius
    depth = np.clip((1.0 - radius) / band, 0.0, 1.0)
    thickness = np.sqrt(1.0 - (1.0 - depth) ** 2)
    per_pixel = 1.0 / (breast.depth * spec.columns)  # radius change per pixel
    inside = np.clip((1.0 - radius) / per_pixel + 0.5, 0.0, 1.0)  # anti-aliased skin edge
    skin_width = max(per_pixel, 0.8 / spec.pixel_spacing_mm * per_pixel)
    skin = 0.10 * np.exp(-0.5 * ((1.0 - radius - skin_width) / skin_width) ** 2)
    image = inside * (tissue * (0.12 + 0.88 * thickness ** tone.edge_gamma) + skin)
    for _ in range(spec.masses):
        _draw_mass(image, spec, breast, tone, rng)
    for _ in range(spec.calcification_clusters):
        _draw_calcifications(image, spec, breast, tone, rng)
    objects = _draw_test_objects(image, spec, breast) if spec.test_objects else []
    floor = None
    if spec.dose is None:
        noise = rng.standard_normal((spec.rows, spec.columns), dtype=np.float32)
        image += 0.01 + noise * np.float32(tone.noise * 0.5) * (1.0 + inside)
    else:
        if with_floor:
            floor = np.where(inside >= 0.5, _noise_bits(image, spec.dose, spec.bits_stored), 0.0)
        image = _expose(image, inside, spec.dose, rng)
    chest_wall_left = spec.laterality == "L"
    if not chest_wall_left:
        image = np.ascontiguousarray(image[:, ::-1])
        floor = None if floor is None else np.ascontiguousarray(floor[:, ::-1])
        objects = [dataclasses.replace(o, column=spec.columns - o.column) for o in objects]  # pixel j+1/2 -> W-(j+1/2)
    exposed = image.copy() if floor is not None else None
    _burn_in_text(image, f"{spec.laterality} {spec.view}", chest_wall_left)
    if floor is not None:
        # burnt-in text and clipped values are deterministic: no noise entropy there
        floor[(image != exposed) | (image <= 0.0) | (image >= 1.0)] = 0.0
    return np.clip(image, 0.0, 1.0).astype(np.float32), floor, objects


def _code_item(value: str, meaning: str) -> pydicom.Dataset:
    """A Code Sequence item (PS3.3 8.8) in SNOMED CT."""
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def _quantise(canonical: np.ndarray, spec: PhantomSpec) -> np.ndarray:
    """Stored values: round(canonical * (2**bits - 1)), inverted for MONOCHROME1 (PS3.3 C.7.6.3.1.2)."""
    top = (1 << spec.bits_stored) - 1
    stored = np.rint(np.clip(canonical, 0.0, 1.0) * top).astype(np.uint16)
    return (top - stored).astype(np.uint16) if spec.photometric == "MONOCHROME1" else stored


def _window(canonical: np.ndarray, stored: np.ndarray) -> tuple[int, int]:
    """Window Center and Width (PS3.3 C.11.2.1.2) spanning the breast's stored values."""
    tissue = stored[::4, ::4][canonical[::4, ::4] > 0.05]
    if tissue.size == 0:
        tissue = stored.ravel()
    low, high = np.percentile(tissue, [0.5, 99.5])
    return round((low + high) / 2), max(2, round(high - low))


def make_dataset(spec: PhantomSpec, rng: np.random.Generator, *, patient_id: str,
                 patient_name: str, study_uid: str, series_uid: str, instance_number: int,
                 study_date: str = "20240115", study_time: str = "090000",
                 patient_birth_date: str = "19600101", accession_number: str = "",
                 study_id: str = "1", series_number: int = 1,
                 sop_instance_uid: str | None = None) -> pydicom.Dataset:
    """Render one phantom as a Digital Mammography X-Ray Image (PS3.3 A.26).

    Modules: Patient, General Study, General Series, DX Series, Mammography Series,
    General Equipment, General Image, Image Pixel, DX Anatomy Imaged, DX Image, DX Detector,
    Mammography Image, VOI LUT, Acquisition Context and SOP Common (PS3.3 A.26.3).

    Parameters
    ----------
    spec, rng:
        Passed to :func:`render_image`; ``rng`` also draws the exposure parameters.
    patient_id, patient_name, study_uid, series_uid, instance_number:
        Identity of the object (PS3.3 C.7.1.1, C.7.2.1, C.7.3.1, C.7.6.1).
    sop_instance_uid:
        Defaults to a UID derived from ``series_uid`` and ``instance_number``.

    Returns
    -------
    pydicom.Dataset
        With ``file_meta`` set for Explicit VR Little Endian, uncompressed.
    """
    canonical = render_image(spec, rng)
    stored = _quantise(canonical, spec)
    sop_class = _SOP_CLASS[spec.presentation]
    sop_uid = sop_instance_uid or _derived_uid("instance", series_uid, instance_number)
    spacing = f"{spec.pixel_spacing_mm:.4f}".rstrip("0")
    mono1 = spec.photometric == "MONOCHROME1"

    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = study_time
    ds.AccessionNumber = accession_number
    ds.Modality = "MG"
    ds.Manufacturer = "latentpacs phantom"
    ds.InstitutionName = "latentpacs synthetic data"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic screening mammogram"
    ds.SeriesDescription = f"{spec.presentation.title()} phantom"
    ds.ManufacturerModelName = "phantom"
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = patient_birth_date, "F"
    ds.BodyPartExamined = "BREAST"
    ds.KVP = f"{rng.uniform(26, 32):.0f}"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "latentpacs"
    ds.DetectorType = "DIRECT"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.PositionerPrimaryAngle = 0 if spec.view == "CC" else (45 if spec.laterality == "R" else -45)
    ds.BodyPartThickness = f"{rng.uniform(35, 70):.0f}"
    ds.CompressionForce = f"{rng.uniform(60, 140):.0f}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = study_id, series_number, instance_number
    ds.PatientOrientation = _ORIENTATION[(spec.laterality, spec.view)]
    ds.ImageLaterality = spec.laterality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.Rows, ds.Columns = spec.rows, spec.columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, spec.bits_stored, spec.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "YES"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if mono1 else -1
    if spec.presentation == "FOR PRESENTATION":  # VOI LUT module, PS3.3 A.26.3 condition
        ds.WindowCenter, ds.WindowWidth = _window(canonical, stored)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.LossyImageCompression = "00"
    ds.PresentationIntentType = spec.presentation
    ds.PresentationLUTShape = "INVERSE" if mono1 else "IDENTITY"
    ds.OrganExposed = "BREAST"
    ds.AnatomicRegionSequence = [_code_item("76752008", "Breast")]
    view = _code_item(*_VIEW_CODE[spec.view])
    view.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [view]
    ds.AcquisitionContextSequence = []
    ds.PixelData = stored.tobytes()

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@dataclass(frozen=True)
class _StudyProfile:
    """How one study's device stores its images (shared by the study's single series)."""

    bits_stored: int
    photometric: str
    presentation: str


#: 12 distinct profiles; any 6 consecutive ones use every bit depth, photometric
#: interpretation and presentation intent, and every (bits, photometric) pair.
_PROFILES = tuple(
    _StudyProfile(BITS_STORED[j % 3], PHOTOMETRICS[j % 2], PRESENTATIONS[(j // 3 + j // 6) % 2])
    for j in range(12)
)
_VIEW_ORDER = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))


def generate(out_dir: Path, count: int, seed: int, *, size: tuple[int, int] | None = None,
             images_per_study: int = 4, studies_per_patient: int = 2,
             dose: float | None = None) -> list[Path]:
    """Write ``count`` phantom mammograms as DICOM Part 10 files (PS3.10 7.1).

    Images are grouped ``images_per_study`` to a study (one series each, the views cycling
    R CC, L CC, R MLO, L MLO) and ``studies_per_patient`` to a patient, a year apart. Each
    study takes the next storage profile (bit depth, photometric interpretation,
    presentation intent) and, when ``size`` is None, the next of :data:`VENDOR_SIZES`.
    Everything, UIDs included, derives from ``seed``: the same arguments write
    byte-identical files.

    Parameters
    ----------
    out_dir:
        Created if missing; files go to ``out_dir/<PatientID>/<StudyInstanceUID>/<n>.dcm``.
    count:
        Number of images, at least 1.
    seed:
        Non-negative integer.
    size:
        (rows, cols) for every image, or None to cycle the vendor sizes.
    dose:
        None for the plain phantom, or photons per pixel for the physical model
        (:class:`PhantomSpec` ``dose``).

    Returns
    -------
    list[pathlib.Path]
        The files in generation order.
    """
    if count < 1 or seed < 0 or images_per_study < 1 or studies_per_patient < 1:
        raise ConfigError("demo data needs count, images per study and studies per patient "
                          f">= 1 and seed >= 0 (got {count}, {images_per_study}, "
                          f"{studies_per_patient}, {seed})")
    paths: list[Path] = []
    for index in range(count):
        study_index, number = divmod(index, images_per_study)
        patient, visit = divmod(study_index, studies_per_patient)
        profile = _PROFILES[study_index % len(_PROFILES)]
        rows, cols = size or VENDOR_SIZES[study_index % len(VENDOR_SIZES)]
        laterality, view = _VIEW_ORDER[index % len(_VIEW_ORDER)]
        rng = np.random.default_rng([seed, index])
        spec = PhantomSpec(rows, cols, view, laterality, profile.bits_stored, profile.photometric,
                           profile.presentation, masses=int(rng.integers(0, 3)),
                           calcification_clusters=int(rng.integers(0, 3)), dose=dose)
        study_uid = _derived_uid("study", seed, study_index)
        series_uid = _derived_uid("series", seed, study_index)
        date = datetime.date(2020, 1, 6) + datetime.timedelta(days=patient * 3 + visit * 365)
        patient_id = f"LP{patient + 1:04d}"
        ds = make_dataset(
            spec, rng, patient_id=patient_id, patient_name=f"PHANTOM^{patient + 1:04d}",
            study_uid=study_uid, series_uid=series_uid, instance_number=number + 1,
            study_date=date.strftime("%Y%m%d"), study_time=f"{8 + patient % 9:02d}{visit:02d}00",
            patient_birth_date=f"{1950 + patient % 30}{patient % 12 + 1:02d}15",
            accession_number=f"LP{patient + 1:04d}V{visit + 1:02d}", study_id=str(visit + 1),
            series_number=1 if profile.presentation == "FOR PRESENTATION" else 2,
        )
        path = Path(out_dir) / patient_id / study_uid / f"{number + 1}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        logger.debug("wrote %s (%s %s%s, %dx%d)", path, profile.presentation, laterality,
                     view, rows, cols)
        paths.append(path)
    logger.info("wrote %d phantom images under %s (seed %d)", count, out_dir, seed)
    return paths
