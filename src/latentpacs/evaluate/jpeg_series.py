"""The native JPEG baseline as DICOM objects, so a viewer shows it beside the reconstructions.

The evaluator writes these for ``jpeg-qQ-native`` (the image coded at its own matrix),
under ``jpeg-qQ-native/``. The paper's ``jpeg-qQ`` codes a 1024 x 1024 resize, whose
pixels are no longer square for a mammogram's matrix: as DICOM it would need new Pixel
Spacing and would show a distorted breast, so it is written only as the plain ``.jpg``
files it measures (:mod:`latentpacs.evaluate.run`).

Each object is the original data set with JPEG Baseline pixel data (PS3.5 A.4.1,
transfer syntax 1.2.840.10008.1.2.4.50, one fragment per frame) holding exactly the
native stream the evaluator measured, and the lossy-compression conventions of
:mod:`latentpacs.image.derive`: new deterministic SOP Instance and Series Instance UIDs
(:func:`~latentpacs.image.derive.derived_uid`), Image Type DERIVED\\SECONDARY, Lossy Image
Compression 01 with ratio and method ISO_10918_1 (PS3.3 C.7.6.1.1.5), a Derivation
Description and Code Sequence (DCM 113040) and a Source Image Sequence naming the
original (DCM 121320; PS3.3 C.7.6.1.1.3-4).

The JPEG codes the canonical image at 8 bits (MONOCHROME2, bright = dense), so the Image
Pixel module becomes 8 bits MONOCHROME2, Presentation LUT Shape IDENTITY, Pixel Intensity
Relationship Sign -1 (PS3.3 C.8.11.3.1.2) and any window is mapped to the 8-bit scale.
"""

from __future__ import annotations

import copy
import logging

from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.uid import JPEGBaseline8Bit

from latentpacs.image.derive import derived_uid, file_meta, lossy_attributes
from latentpacs.image.pixels import MONOCHROME1, PixelModule

logger = logging.getLogger(__name__)

#: Lossy Image Compression Method (0028,2114) defined term for JPEG (PS3.3 C.7.6.1.1.5.1).
METHOD_JPEG = "ISO_10918_1"
_PIXEL_DATA = 0x7FE00010
_VOI_LUT_ONLY = ("VOILUTSequence", "VOILUTFunction", "WindowCenterWidthExplanation")


def _values(value: object) -> list[float]:
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, (list, MultiValue)) else [value]
    return [float(v) for v in items]  # type: ignore[arg-type]


def _map_window(original: Dataset, module: PixelModule) -> tuple[list[float], list[float]]:
    """Window Center/Width (PS3.3 C.11.2.1.2) moved from stored values to the 8-bit scale."""
    scale = 255.0 / module.max_value
    centers = _values(original.get("WindowCenter"))
    widths = _values(original.get("WindowWidth"))
    if module.photometric_interpretation == MONOCHROME1:  # canonical inverts MONOCHROME1
        centers = [module.max_value - c for c in centers]
    return [round(c * scale, 2) for c in centers], [max(1.0, round(w * scale, 2)) for w in widths]


def jpeg_dataset(original: Dataset, stream: bytes, quality: int, original_bytes: int) -> Dataset:
    """Build the DICOM object carrying the JPEG baseline ``stream`` of ``original``.

    Parameters
    ----------
    original:
        The source image's data set; it is not modified.
    stream:
        The JPEG (ISO/IEC 10918-1 baseline, 8-bit grayscale) of its canonical image at its
        own matrix (Rows x Columns).
    quality:
        The JPEG quality used, named in the derivation and the series.
    original_bytes:
        Size of the original Pixel Data, the numerator of the compression ratio.
    """
    module = PixelModule.from_dataset(original)
    tag = f"jpeg-q{quality}"
    ds = Dataset()
    for element in original:  # copies: setting a value must never change ``original``
        if element.tag != _PIXEL_DATA:
            ds.add(copy.deepcopy(element))
    ratio = original_bytes / max(len(stream), 1)
    ds.update(lossy_attributes(
        original,
        sop_uid=derived_uid(str(original.SOPInstanceUID), "sop", tag, str(original.SOPClassUID)),
        series_uid=derived_uid(str(original.SeriesInstanceUID), "series", tag, str(original.SOPClassUID)),
        method=METHOD_JPEG,
        ratio=ratio,
        description=(
            f"latentpacs evaluate: JPEG baseline quality {quality} of the image scaled to 8 bits, native matrix; "
            f"ratio {ratio:.1f}:1"
        ),
    ))
    ds.SeriesDescription = f"JPEG q{quality} native matrix (latentpacs evaluate)"

    PixelModule(module.rows, module.columns, 8, 8, 7, "MONOCHROME2").apply_to(ds)
    for keyword in _VOI_LUT_ONLY:
        if keyword in ds:
            delattr(ds, keyword)
    if "WindowCenter" in original and "WindowWidth" in original:
        ds.WindowCenter, ds.WindowWidth = _map_window(original, module)
    if "PresentationLUTShape" in ds:
        ds.PresentationLUTShape = "IDENTITY"
    if "PixelIntensityRelationshipSign" in ds:
        ds.PixelIntensityRelationshipSign = -1
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"

    ds.file_meta = file_meta(ds, JPEGBaseline8Bit)
    ds.set_original_encoding(False, True)
    return ds
