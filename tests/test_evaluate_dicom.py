"""What ``latentpacs evaluate`` writes as DICOM: a TID 1500 report per study and difference maps.

Two small phantoms of one study, the shipped ``ae`` model. highdicom reads every object
back, the numbers are those of ``metrics.csv``, the maps are the differences recomputed
here, dciodvfy finds no errors, and the derived objects' codes are the dictionary's.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, ParametricMapStorage

from dicomtools import dciodvfy_errors
from netpeers import dimse_responses, start_orthanc, storescu
from latentpacs import phantom
from latentpacs.codec.engine import Engine
from latentpacs.codec.modelfile import load_model
from latentpacs.codec.tiers import Tier
from latentpacs.evaluate import baselines, dicom_maps, sr
from latentpacs.evaluate.dicom_common import CODING_SCHEME, header_of
from latentpacs.evaluate.records import read_metrics
from latentpacs.evaluate.run import EvaluationConfig, EvaluationResult, evaluate
from latentpacs.image import chain
from latentpacs.image.derive import lossy_attributes
from latentpacs.image.pixels import read_file, stored_to_canonical, stored_values, to_canonical

#: Private code value -> metrics.csv column.
MEASURE_FIELDS = {"MSE": "mse", "PSNR": "psnr", "SSIM": "ssim", "BITS": "bits", "EFFICIENCY": "efficiency"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(tmp_path_factory.mktemp("eval-dicom-data"), 2, 47, size=(256, 208), images_per_study=2)


@pytest.fixture(scope="module")
def result(data: list[Path], tmp_path_factory: pytest.TempPathFactory) -> EvaluationResult:
    out = tmp_path_factory.mktemp("eval-dicom-out")
    return evaluate(EvaluationConfig(images=tuple(data), out=out, models=("ae",), tiers=("near-lossless:2",),
                                     previews=1, jpeg_qualities=(85,), jpeg2000_psnr_db=(40.0,)), progress=False)


@pytest.fixture(scope="module")
def table(result: EvaluationResult) -> list[dict[str, str]]:
    with (result.out / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_one_report_per_study_in_the_evaluated_study(result: EvaluationResult, data: list[Path]) -> None:
    originals = [read_file(p) for p in data]
    assert len({str(o.StudyInstanceUID) for o in originals}) == 1
    assert [p.relative_to(result.out).parts[:2] for p in result.structured_reports] == [("dicom", "sr")]
    report = hd.sr.srread(result.structured_reports[0])
    assert isinstance(report, hd.sr.Comprehensive3DSR)
    assert report.StudyInstanceUID == originals[0].StudyInstanceUID
    assert report.PatientID == originals[0].PatientID
    assert report.SeriesInstanceUID != originals[0].SeriesInstanceUID
    assert result.structured_reports[0].name == f"{report.StudyInstanceUID}.dcm"
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {item.ReferencedSOPInstanceUID
                for study in report.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert evidence == {str(o.SOPInstanceUID) for o in originals}
    schemes = {item.CodingSchemeDesignator for item in report.CodingSchemeIdentificationSequence}
    assert CODING_SCHEME in schemes
    page = result.report.read_text()
    assert "DICOM objects" in page and str(result.structured_reports[0].relative_to(result.out)) in page


def test_report_measurements_are_the_metrics_csv_numbers(result: EvaluationResult, table: list[dict[str, str]]) -> None:
    content = hd.sr.srread(result.structured_reports[0]).content
    assert isinstance(content, hd.sr.MeasurementReport)  # TID 1500, as highdicom reads it
    codecs = {row["codec"] for row in table}
    assert {"ae", "jpeg-q85", "jpeg-q85-native", "ae+near-lossless:2", "jpeg-ls"} <= codecs
    for image in {row["image"] for row in table}:
        original = read_file(Path(image))
        uid = str(original.SOPInstanceUID)
        groups = content.get_image_measurement_groups(referenced_sop_instance_uid=uid)
        by_codec = {str(g.tracking_identifier).rsplit(" on ", 1)[0]: g for g in groups}
        assert set(by_codec) == codecs
        for row in (r for r in table if r["image"] == image):
            group = by_codec[row["codec"]]
            assert group.tracking_identifier == f"{row['codec']} on {uid}"
            assert [s.referenced_sop_instance_uid for s in group.source_images] == [uid]
            assert group.source_images[0].referenced_sop_class_uid == original.SOPClassUID
            found = {m.name.value: m for m in group.get_measurements()}
            assert {m.name.scheme_designator for m in found.values()} == {CODING_SCHEME}
            psnr = float(row["psnr"])
            expected = set(MEASURE_FIELDS) - ({"PSNR"} if math.isinf(psnr) else set())
            assert set(found) == expected
            for code, field in MEASURE_FIELDS.items():
                if code in found:
                    assert found[code].value == float(row[field]), (row["codec"], field)
            assert found["BITS"].value == int(row["bits"])
            assert (found["BITS"].unit.value, found["MSE"].unit.value) == ("bit", "1")
            if "PSNR" in found:
                assert found["PSNR"].unit == codes.UCUM.Decibel
            assert found["EFFICIENCY"].value == pytest.approx((1 - float(row["mse"])) / math.log(int(row["bits"])),
                                                              rel=1e-12)


def test_report_and_maps_have_no_dciodvfy_errors(result: EvaluationResult) -> None:
    assert result.difference_maps
    for path in (*result.structured_reports, *result.difference_maps):
        assert dciodvfy_errors(path) == [], path


def _recon(original: pydicom.Dataset, codec: str) -> np.ndarray:
    """The reconstruction the evaluator measured, recomputed here through the product's chain."""
    canonical, _ = to_canonical(original)
    if codec == "jpeg-q85-native":
        return baselines.jpeg_decode(baselines.jpeg_encode(canonical, 85))
    stored, module = stored_values(original)
    engine = Engine(load_model(codec))
    try:
        (encoded,) = chain.encode([original], engine, Tier("latent"))
        return stored_to_canonical(chain.decode(encoded, engine), module)
    finally:
        engine.close()


def test_maps_hold_the_float_difference_of_each_reconstruction(result: EvaluationResult, data: list[Path]) -> None:
    original = read_file(data[0])
    uid = str(original.SOPInstanceUID)
    folder = result.out / "dicom" / "maps" / uid
    assert sorted(p.name for p in folder.iterdir()) == ["ae.dcm", "jpeg-q85-native.dcm", "jpeg-q85.dcm"]
    canonical, _ = to_canonical(original)
    series = set()
    for codec in ("ae", "jpeg-q85-native"):
        pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(folder / f"{codec}.dcm"))
        pixels = pm.pixel_array
        expected = np.abs(_recon(original, codec).astype(np.float32) - canonical.astype(np.float32))
        assert pixels.dtype == np.float32 and pixels.shape == canonical.shape
        assert np.array_equal(pixels, expected)
        assert pixels.max() > 0
        mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
        assert mapping.DoubleFloatRealWorldValueLastValueMapped == pytest.approx(float(pixels.max()))
        assert pm.SourceImageSequence[0].ReferencedSOPInstanceUID == uid
        derivation = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
        assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == uid
        assert derivation.SourceImageSequence[0].SpatialLocationsPreserved == "YES"
        assert (pm.StudyInstanceUID, pm.PatientID) == (original.StudyInstanceUID, original.PatientID)
        assert pm.SOPInstanceUID != uid and pm.FrameOfReferenceUID
        series.add(pm.SeriesInstanceUID)
    assert len(series) == 1  # one series per evaluated image
    assert len(result.difference_maps) == 3 * len(data)


def test_a_large_map_is_block_averaged_with_coarser_spacing(data: list[Path], tmp_path: Path) -> None:
    original = read_file(data[1])
    canonical, _ = to_canonical(original)
    recon = baselines.jpeg_decode(baselines.jpeg_encode(canonical, 30))
    pm = dicom_maps.difference_map(original, canonical, recon, "jpeg-q30-native", series_uid="2.25.1",
                                   series_number=991, frame_of_reference_uid="2.25.2", instance_number=1,
                                   max_side=128)
    path = tmp_path / "map.dcm"
    pm.save_as(path, enforce_file_format=True)
    back = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(path))
    diff = np.abs(recon.astype(np.float32) - canonical.astype(np.float32)).astype(np.float64)
    blocks = diff.reshape(128, 2, 104, 2).mean(axis=(1, 3))  # 256 x 208 in 2 x 2 blocks
    assert back.pixel_array.shape == (128, 104)
    np.testing.assert_allclose(back.pixel_array, blocks, rtol=1e-6, atol=1e-9)
    measures = back.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx([2 * float(v) for v in original.ImagerPixelSpacing])
    derivation = back.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert derivation.SourceImageSequence[0].SpatialLocationsPreserved == "NO"
    assert dciodvfy_errors(path) == []


def test_report_uids_follow_the_content(result: EvaluationResult, data: list[Path]) -> None:
    rows = read_metrics(result.out / "metrics.csv")
    images = [sr.EvaluatedImage(header_of(read_file(p)), tuple(r for r in rows if r.image == str(p))) for p in data]
    first, again = sr.study_report(images, {}), sr.study_report(images, {})
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert first.SOPInstanceUID == hd.sr.srread(result.structured_reports[0]).SOPInstanceUID
    changed = [images[0], sr.EvaluatedImage(images[1].header, images[1].rows[:-1])]
    assert sr.study_report(changed, {}).SOPInstanceUID != first.SOPInstanceUID


def test_jpeg_series_and_derived_objects_use_the_dictionary_codes(result: EvaluationResult, data: list[Path]) -> None:
    """PS3.16 CID 7203 / 7202 codes as pydicom's dictionary has them, value, scheme and meaning."""
    def coded(item: pydicom.Dataset) -> tuple[str, str, str]:
        return item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning

    def code(c: Code) -> tuple[str, str, str]:
        return c.value, c.scheme_designator, c.meaning

    jpeg = pydicom.dcmread(result.jpeg_series[0])
    assert coded(jpeg.DerivationCodeSequence[0]) == code(codes.DCM.LossyCompression) == ("113040", "DCM",
                                                                                          "Lossy Compression")
    purpose = jpeg.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0]
    assert coded(purpose) == code(codes.DCM.UncompressedPredecessor)
    header = read_file(data[0])
    lossy = lossy_attributes(header, sop_uid="2.25.3", series_uid="2.25.4", method="ISO_10918_1", ratio=10.0,
                             description="test", lossy_predecessor=True)
    assert coded(lossy.DerivationCodeSequence[0]) == code(codes.DCM.LossyCompression)
    assert coded(lossy.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0]) == code(
        codes.DCM.LossyCompressedPredecessor) == ("121330", "DCM", "Lossy compressed predecessor")


def test_storescu_sends_the_evaluation_into_orthanc(result: EvaluationResult, data: list[Path], tmp_path: Path) -> None:
    """The README's command, ``storescu -R +sd +r`` of ``dicom/``, files every object in a PACS (Orthanc)."""
    study_uid = str(read_file(data[0]).StudyInstanceUID)
    with start_orthanc(tmp_path / "orthanc") as orthanc:
        sent = storescu(orthanc.dicom_port, orthanc.aet, [result.out / "dicom"], extra=["-R"])
        statuses = [r.status for r in dimse_responses(sent) if r.kind == "C-STORE RSP"]
        assert statuses == [0] * (len(result.structured_reports) + len(result.difference_maps))
        held = [orthanc.instance_tags(oid) for oid in orthanc.instances()]
    assert {t["StudyInstanceUID"] for t in held} == {study_uid}
    classes = [t["SOPClassUID"] for t in held]
    assert classes.count(Comprehensive3DSRStorage) == len(result.structured_reports) == 1
    assert classes.count(ParametricMapStorage) == len(result.difference_maps)

