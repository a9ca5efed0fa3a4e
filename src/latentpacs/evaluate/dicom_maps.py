"""Difference maps as DICOM Parametric Maps (PS3.3 A.75), one per evaluated image and codec.

A map holds |reconstruction - original| of the canonical images (DESIGN.md "Contracts":
[0, 1], 0 the darkest displayed value) as 32-bit float pixels (Float Pixel Data), with an
identity Real World Value Mapping (PS3.3 C.7.6.16.2.11, unit UCUM ``1``: a fraction of the
displayed range) and a window from 0 to the map's 99.5th percentile. The figures of
``report.html`` show the same maps, shrunk (``previews.npz``).

Size: a float32 map of a 4096 x 3328 mammogram is 54 MB. A map whose longest side is over
``max_side`` is reduced by the smallest integer factor f that brings it within: each map
pixel is then the mean absolute difference over an f x f block of image pixels (edge
blocks over the pixels they hold), with Pixel Spacing x f and Spatial Locations Preserved
NO. Below the bound the map is the image's own matrix, pixel for pixel.

Geometry: the Parametric Map IOD requires a Frame of Reference and plane position and
orientation (PS3.3 A.75.3, C.7.6.2, C.7.6.16.2.1-3); a projection mammogram has none. Each
image's maps therefore share a new Frame of Reference of their own (no other object uses
it, so it claims nothing about the patient's position), the plane at the origin, Image
Orientation (Patient) from the image's Patient Orientation (PS3.3 C.7.6.1.1.1) where it
names two orthogonal directions, else the identity; Pixel Spacing from Pixel Spacing or
Imager Pixel Spacing (else 1 mm) and Slice Thickness the Body Part Thickness (else 1 mm).
The map's tie to the image is its Source Image and Derivation Image Sequences (Derivation
Code DCM 113062 "Pixel by pixel subtraction").
"""

from __future__ import annotations

import hashlib
import logging
import math

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from latentpacs.evaluate import dicom_common

logger = logging.getLogger(__name__)

#: Longest side of a map before it is reduced by block averaging (0: never reduce).
DEFAULT_MAX_SIDE = 2048
#: Series Number of the first map series of a study; each image's maps take the next.
FIRST_SERIES_NUMBER = 991
DERIVATION = codes.DCM.PixelByPixelSubtraction
LUT_LABEL = "ABS_DIFFERENCE"
CONTENT_LABEL = "ABS_DIFFERENCE"

#: Patient Orientation letters (PS3.3 C.7.6.1.1.1) as LPS direction cosines (PS3.3 C.7.6.2.1.1).
_DIRECTIONS = {"L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0), "P": (0.0, 1.0, 0.0), "A": (0.0, -1.0, 0.0),
               "H": (0.0, 0.0, 1.0), "F": (0.0, 0.0, -1.0)}
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def reduction_factor(shape: tuple[int, int], max_side: int) -> int:
    """The smallest integer f with ceil(max(shape) / f) <= ``max_side`` (1 when ``max_side`` is 0)."""
    if max_side <= 0:
        return 1
    return max(1, math.ceil(max(shape) / max_side))


def absolute_difference(original: np.ndarray, recon: np.ndarray, factor: int = 1) -> np.ndarray:
    """|recon - original| as float32, averaged over ``factor`` x ``factor`` blocks when factor > 1."""
    diff = np.abs(recon.astype(np.float32) - original.astype(np.float32))
    if factor == 1:
        return diff
    rows, cols = diff.shape
    out_rows, out_cols = math.ceil(rows / factor), math.ceil(cols / factor)
    if (out_rows * factor, out_cols * factor) != diff.shape:
        diff = np.pad(diff, ((0, out_rows * factor - rows), (0, out_cols * factor - cols)))
    sums = diff.reshape(out_rows, factor, out_cols, factor).sum(axis=(1, 3), dtype=np.float64)
    row_counts = np.full(out_rows, factor, dtype=np.float64)
    row_counts[-1] = rows - (out_rows - 1) * factor
    col_counts = np.full(out_cols, factor, dtype=np.float64)
    col_counts[-1] = cols - (out_cols - 1) * factor
    return (sums / np.outer(row_counts, col_counts)).astype(np.float32)


def _direction(text: str) -> np.ndarray | None:
    vector = np.zeros(3)
    for letter in text.upper():
        if letter not in _DIRECTIONS:
            return None
        vector += _DIRECTIONS[letter]
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else None


def orientation(header: Dataset) -> tuple[float, ...]:
    """Image Orientation (Patient) from Patient Orientation (row, column direction), else the identity."""
    values = header.get("PatientOrientation")
    if values is None or isinstance(values, str) or len(values) != 2:
        return _IDENTITY
    row, column = _direction(str(values[0])), _direction(str(values[1]))
    if row is None or column is None or abs(float(row @ column)) > 1e-6:
        return _IDENTITY
    return tuple(round(float(v), 6) for v in (*row, *column))


def _positive(value: object) -> float | None:
    """``value`` as a positive number, or None when it is missing or malformed (the header is kept as received)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _pixel_spacing(header: Dataset) -> tuple[float, float]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = header.get(keyword)
        if value is not None and not isinstance(value, (str, bytes)) and len(value) == 2:
            row, column = _positive(value[0]), _positive(value[1])
            if row is not None and column is not None:
                return row, column
    return 1.0, 1.0


def _geometry_source(header: Dataset, shape: tuple[int, int], factor: int, frame_of_reference_uid: str) -> Dataset:
    """``header`` with the plane the maps are placed on, for highdicom to take the geometry from."""
    source = dicom_common.header_of(header)
    source.Rows, source.Columns = shape
    source.FrameOfReferenceUID = frame_of_reference_uid
    source.PositionReferenceIndicator = ""
    source.ImagePositionPatient = [0.0, 0.0, 0.0]
    source.ImageOrientationPatient = list(orientation(header))
    row_spacing, column_spacing = _pixel_spacing(header)
    source.PixelSpacing = [row_spacing * factor, column_spacing * factor]
    source.SliceThickness = _positive(header.get("BodyPartThickness")) or 1.0
    return source


def difference_map(
    header: Dataset,
    original: np.ndarray,
    recon: np.ndarray,
    codec: str,
    *,
    series_uid: str,
    series_number: int,
    frame_of_reference_uid: str,
    instance_number: int,
    max_side: int = DEFAULT_MAX_SIDE,
) -> hd.pm.ParametricMap:
    """The Parametric Map of |``recon`` - ``original``| for one image and one codec.

    Parameters
    ----------
    header:
        The evaluated image's data set (Pixel Data is not read); it is not modified.
    original, recon:
        Canonical images (float, rows x cols, [0, 1]) of the original and the codec's
        reconstruction at the image's matrix.
    codec:
        The codec's name in ``metrics.csv``, in the map's Content Description and LUT Explanation.
    series_uid, series_number, frame_of_reference_uid, instance_number:
        The map's series (one per evaluated image) and place in it.
    max_side:
        Longest side before the map is reduced (:func:`reduction_factor`).

    Raises
    ------
    ValueError
        When the two images differ in shape or the shape is not the header's Rows x Columns.
    """
    if original.shape != recon.shape or original.shape != (int(header.Rows), int(header.Columns)):
        raise ValueError(f"{codec}: original {original.shape}, reconstruction {recon.shape} and header "
                         f"{header.Rows}x{header.Columns} must agree")
    factor = reduction_factor(original.shape, max_side)
    pixels = absolute_difference(original, recon, factor)
    largest = float(pixels.max())
    # Window 0 .. the 99.5th percentile: a few outliers (burned-in text) must not leave the map black.
    top = float(np.percentile(pixels, 99.5)) or largest
    block = "" if factor == 1 else f", mean over {factor}x{factor} pixel blocks"
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=LUT_LABEL,
        lut_explanation=f"|{codec} - original|, fraction of the displayed range{block}"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, max(largest, 1e-12)),
        slope=1.0,
        intercept=0.0,
    )
    source = _geometry_source(header, pixels.shape, factor, frame_of_reference_uid)
    pm = hd.pm.ParametricMap(
        source_images=[source],
        pixel_array=pixels,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=dicom_common.evaluation_uid(
            "map-sop", str(header.SOPInstanceUID), codec, hashlib.sha256(pixels.tobytes()).hexdigest()),
        instance_number=instance_number,
        manufacturer=dicom_common.MANUFACTURER,
        manufacturer_model_name=dicom_common.MODEL_NAME,
        software_versions=dicom_common.SOFTWARE_VERSION,
        device_serial_number=dicom_common.DEVICE_SERIAL_NUMBER,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(
            window_center=max(top, 1e-12) / 2, window_width=max(top, 1e-12), voi_lut_function="LINEAR_EXACT")],
        content_label=CONTENT_LABEL,
        content_description=f"|{codec} - original| (latentpacs evaluate)"[:64],
        derived_pixel_contrast=hd.pm.DerivedPixelContrastValues.SUBTRACTION,
        derivation=DERIVATION,
        series_description=f"latentpacs evaluate: difference maps of image {header.get('InstanceNumber', '')}"[:64],
    )
    laterality = header.get("ImageLaterality") or header.get("Laterality")
    if laterality in ("L", "R"):
        pm.Laterality = laterality  # General Series, Type 2C for a paired body part
    if factor > 1:
        for frame in pm.PerFrameFunctionalGroupsSequence:
            for derivation in frame.get("DerivationImageSequence", []):
                for item in derivation.SourceImageSequence:
                    item.SpatialLocationsPreserved = "NO"
    return pm
