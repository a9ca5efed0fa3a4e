"""C-FIND matching and retrieve selection of the archive (PS3.4 C.2.2.2, C.4, C.6),
on a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator

import pydicom
import pytest
from archive_data import MODEL, S1, S2, S3, S4, catalogue, derived_uid, filled_archive, query
from pydicom.filebase import DicomBytesIO

from latentpacs.archive import Archive
from latentpacs.errors import InvalidIdentifierError, Status


@pytest.fixture
def archive(archive_url: str) -> Iterator[Archive]:
    archive = filled_archive(archive_url)
    yield archive
    archive.dispose()


def values(archive: Archive, level: str, keyword: str, root: str = "STUDY",
           **keys: object) -> list[str]:
    """One keyword's value from every answer, in answer order."""
    keys.setdefault(keyword, "")
    return [str(answer.get(keyword, "")) for answer in
            archive.find(level, query(level, **keys), root=root)]


def test_one_answer_per_entity_at_every_level_and_root(archive: Archive) -> None:
    for root in ("PATIENT", "STUDY"):
        assert values(archive, "STUDY", "StudyInstanceUID", root) == [S1, S2, S3, S4]
        assert len(values(archive, "SERIES", "SeriesInstanceUID", root)) == 5
        assert len(values(archive, "IMAGE", "SOPInstanceUID", root)) == 9
    assert values(archive, "PATIENT", "PatientID", "PATIENT") == ["P1", "P2", "P3"]
    patients = list(archive.find("PATIENT", query("PATIENT", PatientID="",
                                                  NumberOfPatientRelatedStudies="",
                                                  NumberOfPatientRelatedInstances=""),
                                 root="PATIENT"))
    assert [(a.NumberOfPatientRelatedStudies, a.NumberOfPatientRelatedInstances)
            for a in patients] == [(2, 5), (1, 3), (1, 1)]
    assert all(a.QueryRetrieveLevel == "PATIENT" for a in patients)


def test_single_value_matching_is_exact_except_person_names(archive: Archive) -> None:
    assert values(archive, "STUDY", "StudyInstanceUID", PatientID="P1") == [S1, S2]
    assert values(archive, "STUDY", "StudyInstanceUID", PatientName="doe^jane") == [S1, S2]
    assert values(archive, "STUDY", "StudyInstanceUID", PatientName="MÜLLER^EVA") == [S4]
    assert values(archive, "STUDY", "StudyInstanceUID",
                  StudyDescription="screening mammogram") == []
    assert values(archive, "STUDY", "StudyInstanceUID",
                  StudyDescription="Screening mammogram") == [S1, S3]
    assert values(archive, "SERIES", "Modality", Modality="OT") == ["OT"]
    assert values(archive, "IMAGE", "InstanceNumber", StudyInstanceUID=S3,
                  InstanceNumber="2") == ["2"]
    assert values(archive, "STUDY", "StudyInstanceUID", PatientName='""') == []


def test_wildcards_are_case_sensitive_and_sql_characters_literal(archive: Archive) -> None:
    assert values(archive, "STUDY", "PatientName", PatientName="sm*") == ["SMITH^Anna"]
    assert values(archive, "STUDY", "PatientID", PatientName="D?E^*") == ["P1", "P1"]
    assert values(archive, "STUDY", "StudyInstanceUID", StudyDescription="*mammo*") == [S1, S2, S3]
    assert values(archive, "STUDY", "StudyInstanceUID", StudyDescription="*Mammo*") == []
    assert values(archive, "STUDY", "StudyInstanceUID", StudyDescription="*%*") == [S4]
    assert values(archive, "STUDY", "StudyInstanceUID", StudyDescription="*_*") == [S4]
    assert values(archive, "STUDY", "StudyInstanceUID", StudyDescription="100?_check") == [S4]
    assert values(archive, "STUDY", "StudyInstanceUID", AccessionNumber="ACC?") == [S1, S2, S3, S4]
    assert values(archive, "STUDY", "StudyInstanceUID", StudyDescription="*") == [S1, S2, S3, S4]


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # pydicom on partial ranges
def test_date_and_time_ranges(archive: Archive) -> None:
    assert values(archive, "STUDY", "StudyInstanceUID", StudyDate="20230101-20231231") == [S2]
    assert values(archive, "STUDY", "StudyInstanceUID", StudyDate="-2022") == [S3]
    assert values(archive, "STUDY", "StudyInstanceUID", StudyDate="2024-") == [S1, S4]
    assert values(archive, "STUDY", "StudyInstanceUID", StudyDate="20240115") == [S1]
    assert values(archive, "STUDY", "StudyInstanceUID", StudyTime="0800-1000") == [S1, S3]
    assert values(archive, "STUDY", "StudyInstanceUID", StudyTime="1200-") == [S2, S4]
    assert values(archive, "PATIENT", "PatientID", "PATIENT",
                  PatientBirthDate="19700101-19901231") == ["P2", "P3"]
    # Python-matched keys (not indexed columns) follow the same rules
    assert values(archive, "SERIES", "SeriesDate", SeriesDate="20220101-20221231") == ["20220601"]


def test_uid_lists_and_study_root_hierarchy(archive: Archive) -> None:
    assert values(archive, "STUDY", "StudyInstanceUID", StudyInstanceUID=f"{S1}\\{S3}") == [S1, S3]
    images = values(archive, "IMAGE", "SOPInstanceUID", StudyInstanceUID=S1)
    assert len(images) == 4
    picked = values(archive, "IMAGE", "SOPInstanceUID", SOPInstanceUID="\\".join(images[1:3]))
    assert picked == images[1:3]
    assert values(archive, "SERIES", "SeriesInstanceUID", StudyInstanceUID=S2) == [
        derived_uid(f"{S2}.1", MODEL)]


def test_effective_identity_is_what_answers_show(archive: Archive) -> None:
    series = values(archive, "SERIES", "SeriesInstanceUID", StudyInstanceUID=S1)
    assert series == [f"{S1}.1", derived_uid(f"{S1}.1", MODEL)]
    answers = list(archive.find("IMAGE", query("IMAGE", StudyInstanceUID=S1, SOPInstanceUID="",
                                               ImageType="", LossyImageCompression="")))
    assert [a.SOPInstanceUID for a in answers] == [
        f"{S1}.1.1", f"{S1}.1.2", derived_uid(f"{S1}.1.3", MODEL), derived_uid(f"{S1}.1.4", MODEL)]
    assert [list(a.ImageType) for a in answers][2:] == [["DERIVED", "SECONDARY"]] * 2
    assert [a.LossyImageCompression for a in answers] == ["00", "00", "01", "01"]
    assert values(archive, "IMAGE", "SOPInstanceUID", SOPInstanceUID=f"{S1}.1.3") == []


def test_optional_keys_filled_from_headers_and_counts(archive: Archive) -> None:
    identifier = query("STUDY", StudyInstanceUID="", PatientName="", PatientBirthDate="",
                       StudyDescription="", ReferringPhysicianName="", PatientAge="",
                       ModalitiesInStudy="", NumberOfStudyRelatedSeries="",
                       NumberOfStudyRelatedInstances="", InstanceAvailability="",
                       SOPInstanceUID="")
    answers = list(archive.find("STUDY", identifier))
    first = answers[0]
    assert str(first.PatientName) == "Doe^Jane" and first.PatientBirthDate == "19600101"
    assert first.StudyDescription == "Screening mammogram"
    assert first.ModalitiesInStudy == "MG" and first.InstanceAvailability == "ONLINE"
    assert (first.NumberOfStudyRelatedSeries, first.NumberOfStudyRelatedInstances) == (2, 4)
    assert first.PatientAge == "" and first.ReferringPhysicianName == ""
    assert first.SOPInstanceUID == ""  # below the query level: returned empty
    assert set(identifier.dir()) <= set(first.dir())
    eva = answers[3]
    assert eva.SpecificCharacterSet == "ISO_IR 192" and str(eva.PatientName) == "Müller^Eva"
    for answer in answers:  # every answer encodes as a DIMSE identifier
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, True
        pydicom.filewriter.write_dataset(buffer, answer)


def test_keys_matched_outside_sql_and_below_the_level(archive: Archive) -> None:
    assert values(archive, "SERIES", "BodyPartExamined", BodyPartExamined="BREAST",
                  StudyInstanceUID=S3) == ["BREAST"]
    assert values(archive, "IMAGE", "ImageLaterality", StudyInstanceUID=S3,
                  ImageLaterality="R") == []
    assert values(archive, "STUDY", "StudyInstanceUID", ModalitiesInStudy="CT\\OT") == [S4]
    assert values(archive, "STUDY", "StudyInstanceUID", NumberOfStudyRelatedInstances="3") == [S3]
    # a key below the query level does not restrict the answers
    assert len(values(archive, "STUDY", "StudyInstanceUID", SOPInstanceUID="9.9.9")) == 4


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_invalid_identifiers_are_refused(archive: Archive) -> None:
    for level, root, identifier in (
        ("PATIENT", "STUDY", query("PATIENT", PatientID="")),
        ("", "STUDY", pydicom.Dataset()),
        ("FRAME", "STUDY", query("FRAME")),
        ("STUDY", "STUDY", query("SERIES")),
        ("STUDY", "STUDY", query("STUDY", StudyInstanceUID="1.2.*")),
    ):
        with pytest.raises(InvalidIdentifierError) as caught:
            archive.find(level, identifier, root=root)
        assert caught.value.status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS


def test_match_instances_selects_by_unique_keys(archive: Archive) -> None:
    def originals(level: str, root: str = "STUDY", **keys: object) -> list[str]:
        return [image.original_sop_instance_uid for image in
                archive.match_instances(level, query(level, **keys), root=root)]

    assert originals("STUDY", StudyInstanceUID=f"{S1}\\{S4}") == [
        f"{S1}.1.{n}" for n in (1, 2, 3, 4)] + [f"{S4}.1.1"]
    assert originals("SERIES", SeriesInstanceUID=derived_uid(f"{S1}.1", MODEL)) == [
        f"{S1}.1.3", f"{S1}.1.4"]
    assert originals("IMAGE", SOPInstanceUID=derived_uid(f"{S1}.1.3", MODEL)) == [f"{S1}.1.3"]
    assert originals("PATIENT", "PATIENT", PatientID="P2") == [f"{S3}.1.{n}" for n in (1, 2, 3)]
    assert originals("STUDY", "PATIENT", PatientID="P2", StudyInstanceUID=S1) == []
    expected = {image.original_sop_instance_uid: image for image in catalogue()}
    for image in archive.match_instances("STUDY", query("STUDY", StudyInstanceUID=S1)):
        assert image == expected[image.original_sop_instance_uid]
    with pytest.raises(InvalidIdentifierError):
        archive.match_instances("SERIES", query("SERIES", StudyInstanceUID=S1))
