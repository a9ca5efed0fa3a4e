"""The evaluation as a DICOM Structured Report: one TID 1500 Measurement Report per study.

Each evaluated study gets one Comprehensive 3D SR (PS3.3 A.35.13) holding a TID 1500
"Measurement Report" (PS3.16) built with highdicom. For every evaluated image and every
codec there is one TID 1501 "Measurement and Qualitative Evaluation Group":

* Tracking Identifier ``"<codec> on <SOP Instance UID>"`` and a Tracking Unique
  Identifier derived from both; the group's Algorithm Identification (TID 4019) names the
  codec (Algorithm Name, e.g. ``ae`` or ``jpeg-q85-native``), its version (a model's
  SHA-256, else the latentpacs version) and its kind (``kind=learned``...);
* the evaluated image as the group's Source (SOP Class and Instance UID from its header);
* five TID 300 measurements, the numbers of ``metrics.csv`` (``FloatingPointValue``
  keeps them exactly): MSE, PSNR (UCUM ``dB``), SSIM, bits (UCUM ``bit``) and the paper's
  efficiency (1 - MSE) / ln(bits), unitless ones in UCUM ``1``. An exact codec's PSNR is
  infinite and has no item (its MSE is 0).

No standard code names these measures, so they are private codes of
:data:`~latentpacs.evaluate.dicom_common.CODING_SCHEME` (:data:`MEASURES`), declared in
the document's Coding Scheme Identification Sequence. The procedure reported is SNOMED CT
133887000 "Image quality analysis"; the observer is the device "latentpacs evaluate".
The document inherits patient and study from the evaluated images and lists them as
evidence (PS3.3 C.17.2 Current Requested Procedure Evidence Sequence).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from latentpacs import __version__
from latentpacs.evaluate import dicom_common
from latentpacs.evaluate.records import MetricRow

logger = logging.getLogger(__name__)

#: Series Number of the evaluation SR series (a high number keeps it after the images).
SERIES_NUMBER = 990
SERIES_DESCRIPTION = "latentpacs evaluation: MSE PSNR SSIM bits efficiency per codec"

UNIT_NONE = codes.UCUM.NoUnits  # UCUM "1"
UNIT_DB = codes.UCUM.Decibel
UNIT_BIT = hd.sr.CodedConcept(value="bit", scheme_designator="UCUM", meaning="bit")


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=dicom_common.CODING_SCHEME, meaning=meaning)


@dataclass(frozen=True)
class Measure:
    """One measure of a ``metrics.csv`` row as a TID 300 measurement."""

    field: str
    concept: hd.sr.CodedConcept
    unit: hd.sr.CodedConcept


#: The measures written per image and codec, by ``MetricRow`` field (paper's scale, see records).
MEASURES: tuple[Measure, ...] = (
    Measure("mse", _private("MSE", "Mean squared error at 1024 x 1024, [0, 1] scale"),
            hd.sr.CodedConcept.from_code(UNIT_NONE)),
    Measure("psnr", _private("PSNR", "Peak signal-to-noise ratio at 1024 x 1024, [0, 1] scale"),
            hd.sr.CodedConcept.from_code(UNIT_DB)),
    Measure("ssim", _private("SSIM", "Structural similarity index at 1024 x 1024, [0, 1] scale"),
            hd.sr.CodedConcept.from_code(UNIT_NONE)),
    Measure("bits", _private("BITS", "Size of the stored encoding in bits"), UNIT_BIT),
    Measure("efficiency", _private("EFFICIENCY", "Compression efficiency (1 - MSE) / ln(bits)"),
            hd.sr.CodedConcept.from_code(UNIT_NONE)),
)
PROCEDURE_REPORTED = codes.SCT.ImageQualityAnalysis


@dataclass(frozen=True)
class EvaluatedImage:
    """One evaluated image: its header (no Pixel Data) and its ``metrics.csv`` rows."""

    header: Dataset
    rows: tuple[MetricRow, ...]


def _measurements(row: MetricRow) -> list[hd.sr.Measurement]:
    """The TID 300 measurements of one row; an infinite PSNR (an exact codec) is left out.

    highdicom 0.28 cannot read back a NUM without a value (the Numeric Value Qualifier
    form of PS3.3 C.18.1), and MSE 0 already says the codec is exact.
    """
    items = []
    for measure in MEASURES:
        value = getattr(row, measure.field)
        if measure.field == "psnr" and math.isinf(value) and value > 0:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{measure.field} of {row.codec} is {value}; a measurement must be finite")
        items.append(hd.sr.Measurement(name=measure.concept, value=value, unit=measure.unit))
    return items


def tracking_uid(sop_instance_uid: str, codec: str) -> str:
    """Tracking Unique Identifier of the group measuring ``codec`` on one image."""
    return dicom_common.evaluation_uid("sr-tracking", sop_instance_uid, codec)


def _group(header: Dataset, row: MetricRow, version: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    sop_uid = str(header.SOPInstanceUID)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(sop_uid, row.codec), identifier=f"{row.codec} on {sop_uid}"),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=row.codec, version=version, parameters=[f"kind={row.kind}"]),
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(header.SOPClassUID), sop_uid)],
        measurements=_measurements(row),
    )


def _digest(images: Sequence[EvaluatedImage]) -> str:
    return dicom_common.content_digest(
        [str(image.header.SOPInstanceUID), row.codec, row.kind,
         *[repr(getattr(row, m.field)) for m in MEASURES]]
        for image in images for row in image.rows
    )


def study_report(images: Sequence[EvaluatedImage], versions: Mapping[str, str]) -> hd.sr.Comprehensive3DSR:
    """The Measurement Report (TID 1500) of one study's evaluated images.

    Parameters
    ----------
    images:
        The study's evaluated images, in evaluation order; all share one Study Instance UID.
    versions:
        Algorithm Version per codec (a model's SHA-256); other codecs get the latentpacs version.

    Raises
    ------
    ValueError
        When ``images`` is empty or spans more than one study.
    """
    if not images:
        raise ValueError("a study report needs at least one evaluated image")
    study_uid = str(images[0].header.StudyInstanceUID)
    if any(str(i.header.StudyInstanceUID) != study_uid for i in images):
        raise ValueError("the images of one report must share one Study Instance UID")
    digest = _digest(images)
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=dicom_common.evaluation_uid("device", dicom_common.MODEL_NAME, __version__),
            name=dicom_common.MODEL_NAME, manufacturer_name=dicom_common.MANUFACTURER,
            model_name=dicom_common.MODEL_NAME),
    )
    groups = [
        _group(image.header, row, versions.get(row.codec, f"latentpacs {__version__}"))
        for image in images for row in image.rows
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    document = hd.sr.Comprehensive3DSR(
        evidence=[image.header for image in images],
        content=report[0],
        series_instance_uid=dicom_common.evaluation_uid("sr-series", study_uid, digest),
        series_number=SERIES_NUMBER,
        sop_instance_uid=dicom_common.evaluation_uid("sr-sop", study_uid, digest),
        instance_number=1,
        manufacturer=dicom_common.MANUFACTURER,
        is_complete=True,
        series_description=SERIES_DESCRIPTION,
    )
    dicom_common.declare_private_scheme(document)
    return document


def group_by_study(images: Sequence[EvaluatedImage]) -> dict[str, list[EvaluatedImage]]:
    """The evaluated images per Study Instance UID, in first-seen order."""
    studies: dict[str, list[EvaluatedImage]] = {}
    for image in images:
        studies.setdefault(str(image.header.StudyInstanceUID), []).append(image)
    return studies
