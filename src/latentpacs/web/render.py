"""Rendered images of WADO-RS (PS3.18 10.4.1.1.3, 8.3.5.1): 8-bit PNG or JPEG of a returned object.

The grayscale pipeline of PS3.3 C.11 on the stored values of the object a retrieval
returns: Modality LUT as Rescale Slope and Intercept (C.11.1), VOI LUT as the window
(Window Center and Width with VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID,
C.11.2.1.2), then MONOCHROME1 inverted so that 0 is black (C.7.6.3.1.2). A ``window``
query parameter replaces the object's window (PS3.18 8.3.5.1.3); without either, the
image's own value range is the window. A ``viewport`` scales the result to fit, keeping
its aspect (8.3.5.1.2). No HTTP here: :func:`render` takes a data set and returns bytes.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from latentpacs.image.pixels import Photometric, stored_values
from latentpacs.web.negotiate import JPEG, PNG

logger = logging.getLogger(__name__)

#: JPEG quality when the request names none (PS3.18 8.3.5.1.4 leaves it to the server).
DEFAULT_QUALITY = 90


class VoiFunction(StrEnum):
    """VOI LUT Function (0028,1056), PS3.3 C.11.2.1.3."""

    LINEAR = "LINEAR"
    LINEAR_EXACT = "LINEAR_EXACT"
    SIGMOID = "SIGMOID"


@dataclass(frozen=True)
class Window:
    """A VOI window: center and width in rescaled units, and its function (PS3.3 C.11.2.1.2)."""

    center: float
    width: float
    function: VoiFunction = VoiFunction.LINEAR

    def __post_init__(self) -> None:
        least = 1.0 if self.function is VoiFunction.LINEAR else 0.0
        if not np.isfinite(self.center) or not np.isfinite(self.width) or self.width < least \
                or (self.width == 0 and self.function is not VoiFunction.LINEAR):
            raise ValueError(f"window width {self.width:g} is not valid for {self.function.value} "
                             "(LINEAR needs >= 1, the others > 0)")


@dataclass(frozen=True)
class Presentation:
    """What the grayscale pipeline needs from an object (PS3.3 C.11)."""

    slope: float = 1.0
    intercept: float = 0.0
    window: Window | None = None
    monochrome1: bool = False


def _first_number(ds: Dataset, keyword: str) -> float | None:
    """The first value of a numeric (DS/IS) attribute, or None when absent or malformed."""
    try:
        value = ds.get(keyword)
        if isinstance(value, (MultiValue, list, tuple)):
            value = value[0] if len(value) else None
        if value is None or value == "":
            return None
        number = float(value)
    except Exception:  # a malformed optional attribute: ignored, as a viewer would
        logger.info("rendering ignores malformed %s", keyword)
        return None
    return number if np.isfinite(number) else None


def presentation_of(ds: Dataset) -> Presentation:
    """The rescale, first window and photometric interpretation of ``ds`` (PS3.3 C.11.1, C.11.2)."""
    center = _first_number(ds, "WindowCenter")
    width = _first_number(ds, "WindowWidth")
    window = None
    if center is not None and width is not None:
        try:
            name = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
            window = Window(center, width, VoiFunction(name))
        except ValueError:
            logger.info("rendering ignores an unusable window of the object")
    slope = _first_number(ds, "RescaleSlope")
    intercept = _first_number(ds, "RescaleIntercept")
    return Presentation(
        slope=1.0 if slope is None or slope == 0 else slope,
        intercept=0.0 if intercept is None else intercept,
        window=window,
        monochrome1=str(ds.get("PhotometricInterpretation", "")).strip() == Photometric.MONOCHROME1,
    )


def parse_window(text: str) -> Window:
    """The ``window=center,width[,function]`` query parameter (PS3.18 8.3.5.1.3).

    ``function`` is ``linear`` (the default), ``linear-exact`` or ``sigmoid``.

    Raises
    ------
    ValueError
        For a malformed value.
    """
    values = [value.strip() for value in text.split(",")]
    if len(values) not in (2, 3):
        raise ValueError("window is center,width[,function]")
    try:
        center, width = float(values[0]), float(values[1])
    except ValueError:
        raise ValueError("window center and width must be numbers") from None
    function = VoiFunction.LINEAR
    if len(values) == 3:
        try:
            function = VoiFunction(values[2].upper().replace("-", "_"))
        except ValueError:
            raise ValueError("window function is linear, linear-exact or sigmoid") from None
    return Window(center, width, function)


def parse_viewport(text: str) -> tuple[int, int]:
    """The ``viewport=vw,vh`` query parameter (PS3.18 8.3.5.1.2): width and height in pixels.

    Raises
    ------
    ValueError
        For anything but two integers from 1 to 16384 (a source region is not supported).
    """
    values = text.split(",")
    if len(values) != 2:
        raise ValueError("viewport is vw,vh (a source region sx,sy,sw,sh is not supported)")
    try:
        width, height = int(values[0]), int(values[1])
    except ValueError:
        raise ValueError("viewport width and height must be integers") from None
    if not (1 <= width <= 16384 and 1 <= height <= 16384):
        raise ValueError("viewport width and height must be 1 to 16384")
    return width, height


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """8-bit output of the VOI LUT function on rescaled values (PS3.3 C.11.2.1.2, 0..255)."""
    x = values.astype(np.float64)
    c, w = window.center, window.width
    if window.function is VoiFunction.SIGMOID:
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif window.function is VoiFunction.LINEAR_EXACT:
        y = np.clip(((x - c) / w + 0.5) * 255.0, 0.0, 255.0)
        y = np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 255.0, y))
    else:
        low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
        inside = ((x - (c - 0.5)) / max(w - 1, 1e-12) + 0.5) * 255.0
        y = np.where(x <= low, 0.0, np.where(x > high, 255.0, inside))
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def to_8bit(stored: np.ndarray, presentation: Presentation, window: Window | None = None) -> np.ndarray:
    """Stored values through rescale, VOI window and polarity to 8-bit display values.

    ``window`` (the request's) replaces the object's; without either the window spans
    the image's rescaled value range (LINEAR_EXACT from minimum to maximum).
    """
    values = stored.astype(np.float64) * presentation.slope + presentation.intercept
    window = window or presentation.window
    if window is None:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        width = max(high - low, 1.0)
        window = Window(low + width / 2, width, VoiFunction.LINEAR_EXACT)
    display = apply_window(values, window)
    if presentation.monochrome1:
        np.subtract(np.uint8(255), display, out=display)
    return display


def encode(display: np.ndarray, media_type: str = PNG, *, viewport: tuple[int, int] | None = None,
           quality: int = DEFAULT_QUALITY) -> bytes:
    """An 8-bit image as PNG or JPEG bytes, scaled to fit ``viewport`` keeping its aspect."""
    image = Image.fromarray(np.ascontiguousarray(display, dtype=np.uint8))
    if viewport is not None:
        rows, cols = display.shape
        scale = min(viewport[0] / cols, viewport[1] / rows)
        size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
        if size != (cols, rows):
            image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if media_type == JPEG:
        image.save(out, format="JPEG", quality=quality)
    elif media_type == PNG:
        image.save(out, format="PNG")
    else:
        raise ValueError(f"cannot render as {media_type}")
    return out.getvalue()


def render(ds: Dataset, media_type: str = PNG, *, window: Window | None = None,
           viewport: tuple[int, int] | None = None, quality: int = DEFAULT_QUALITY) -> bytes:
    """The rendered image of a returned object (native Pixel Data): PNG or JPEG bytes.

    Raises
    ------
    LatentPacsError
        When the object's pixels cannot be read (see :func:`~latentpacs.image.pixels.stored_values`).
    """
    stored, _ = stored_values(ds)
    return encode(to_8bit(stored, presentation_of(ds), window), media_type,
                  viewport=viewport, quality=quality)
