"""C-FIND matching and retrieve selection of the archive (PS3.4 C.2.2.2, C.4, C.6),
on a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pydicom
import pytest
from archive_data import (
    MODEL, ROOT, S1, S2, S3, S4, archived, catalogue, derived_uid, filled_archive, phantom, query,
)
from pydicom.filebase import DicomBytesIO

from latentpacs.archive import Archive
from latentpacs.archive.matching import glob_steps
from latentpacs.errors import InvalidIdentifierError, LimitExceededError, Status


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
        assert caught.value.status == Status.DOES_NOT_MATCH_SOP_CLASS


def test_match_instances_selects_by_unique_keys(archive: Archive) -> None:
    def originals(level: str, root: str = "STUDY", **keys: object) -> list[str]:
        return [archive.load(row).original_sop_instance_uid for row in
                archive.match_instances(level, query(level, **keys), root=root)]

    assert originals("STUDY", StudyInstanceUID=f"{S1}\\{S4}") == [
        f"{S1}.1.{n}" for n in (1, 2, 3, 4)] + [f"{S4}.1.1"]
    assert originals("SERIES", SeriesInstanceUID=derived_uid(f"{S1}.1", MODEL)) == [
        f"{S1}.1.3", f"{S1}.1.4"]
    assert originals("IMAGE", SOPInstanceUID=derived_uid(f"{S1}.1.3", MODEL)) == [f"{S1}.1.3"]
    assert originals("PATIENT", "PATIENT", PatientID="P2") == [f"{S3}.1.{n}" for n in (1, 2, 3)]
    assert originals("STUDY", "PATIENT", PatientID="P2", StudyInstanceUID=S1) == []
    expected = {image.original_sop_instance_uid: image for image in catalogue()}
    for row in archive.match_instances("STUDY", query("STUDY", StudyInstanceUID=S1)):
        image = archive.load(row)
        assert image == expected[image.original_sop_instance_uid]
    with pytest.raises(InvalidIdentifierError):
        archive.match_instances("SERIES", query("SERIES", StudyInstanceUID=S1))


S5 = f"{ROOT}.5"


def _extra(archive: Archive, **attributes: object) -> pydicom.Dataset:
    """Store one more image (study S5 of patient P3) with extra header attributes."""
    ds = copy.deepcopy(phantom("P3", "Müller^Eva", "19820415", S5, "20250101", "100000",
                               "Extra", 1))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    archive.store(archived(ds))
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_retrieve_unique_keys_are_never_wildcards_or_universal(archive: Archive) -> None:
    """PS3.4 C.4.2.2.1 / C.4.3.2.1: single values or UID lists only (today `*` selects all)."""
    for level, root, keys in (
        ("PATIENT", "PATIENT", {"PatientID": "*"}),
        ("PATIENT", "PATIENT", {"PatientID": "P?"}),
        ("PATIENT", "PATIENT", {"PatientID": "P*"}),
        ("PATIENT", "PATIENT", {"PatientID": ""}),
        ("PATIENT", "PATIENT", {"PatientID": '""'}),
        ("PATIENT", "PATIENT", {"PatientID": "P1\\P2"}),
        ("STUDY", "STUDY", {"StudyInstanceUID": "*"}),
        ("STUDY", "STUDY", {"StudyInstanceUID": ""}),
        ("STUDY", "STUDY", {"StudyInstanceUID": f"{S1}\\"}),
        ("SERIES", "STUDY", {"StudyInstanceUID": "*", "SeriesInstanceUID": f"{S3}.1"}),
        ("STUDY", "PATIENT", {"PatientID": "*", "StudyInstanceUID": S1}),
        ("IMAGE", "STUDY", {"SOPInstanceUID": "?"}),
    ):
        with pytest.raises(InvalidIdentifierError) as caught:
            archive.match_instances(level, query(level, **keys), root=root)
        assert caught.value.status == Status.DOES_NOT_MATCH_SOP_CLASS
        assert caught.value.error_comment, keys
    # a UID list and a higher-level key with a single value still select
    assert len(archive.match_instances("STUDY", query("STUDY", StudyInstanceUID=f"{S2}\\{S3}"))) == 4
    assert len(archive.match_instances("STUDY", query("STUDY", PatientID="P1", StudyInstanceUID=S1),
                                       root="PATIENT")) == 4


def test_retrieve_beyond_the_limit_is_refused_before_loading(archive: Archive) -> None:
    identifier = query("STUDY", StudyInstanceUID=S1)
    assert len(archive.match_instances("STUDY", identifier, limit=4)) == 4
    with pytest.raises(LimitExceededError) as caught:
        archive.match_instances("STUDY", identifier, limit=3)
    assert caught.value.status == Status.OUT_OF_RESOURCES
    assert "4" in caught.value.error_comment and "3" in caught.value.error_comment


@pytest.mark.timeout(10)
def test_wildcard_matching_cannot_backtrack(archive: Archive) -> None:
    """`*a*a*a*a*a*a*a*a*a*a*b` against 60 `a`s: the regex matcher of before backtracked for
    minutes; the two-pointer matcher answers at once and provably within O(n*m) steps."""
    _extra(archive, ImageComments="a" * 60)
    hostile = "*a" * 10 + "*b"
    assert values(archive, "IMAGE", "ImageComments", StudyInstanceUID=S5, ImageComments=hostile) == []
    assert values(archive, "IMAGE", "ImageComments", StudyInstanceUID=S5,
                  ImageComments="*a" * 10 + "*") == ["a" * 60]
    assert values(archive, "IMAGE", "ImageComments", ImageComments="a?a*") == ["a" * 60]
    matched, steps = glob_steps(hostile, "a" * 60)
    assert not matched and steps <= (len(hostile) + 1) * (60 + 2)
    matched, steps = glob_steps("*" + "a" * 30 + "b", "a" * 2000)
    assert not matched and steps <= 32 * 2002


def test_find_holds_no_connection_while_paused(archive: Archive) -> None:
    """An answer iterator left open (a C-FIND writing to a slow peer) holds no database
    connection, so no transaction: a store goes through meanwhile."""
    answers = archive.find("IMAGE", query("IMAGE", SOPInstanceUID=""))
    first = next(answers)
    assert first.SOPInstanceUID
    assert archive._engine.pool.checkedout() == 0  # noqa: SLF001 - the property under test
    _extra(archive)
    rest = list(answers)
    assert len(rest) >= 8
    assert archive._engine.pool.checkedout() == 0  # noqa: SLF001


def test_retrieve_ae_title_and_every_requested_key_come_back(archive: Archive) -> None:
    identifier = query("STUDY", StudyInstanceUID="", RetrieveAETitle="", PatientID="",
                       ImageComments="", InstanceAvailability="")
    answers = list(archive.find("STUDY", identifier, retrieve_aet="LATENTPACS"))
    assert len(answers) == 4
    for answer in answers:
        assert answer.RetrieveAETitle == "LATENTPACS"
        assert set(identifier.dir()) <= set(answer.dir())
    assert [a.StudyInstanceUID for a in archive.find(
        "STUDY", query("STUDY", StudyInstanceUID="", RetrieveAETitle="LATENTPACS"),
        retrieve_aet="LATENTPACS")] == [S1, S2, S3, S4]


def _code(value: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "99LP", meaning
    return item


def _sequence_key(*items: pydicom.Dataset) -> dict[str, object]:
    return {"ProcedureCodeSequence": pydicom.Sequence(list(items)), "StudyInstanceUID": ""}


def _code_only(value: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue = value
    return item


def test_sequence_keys_are_matched_item_by_item(archive: Archive) -> None:
    """PS3.4 C.2.2.2.6: a sequence key with a matching item selects (and returns) only the
    stored items that match; before, any sequence key was treated as universal."""
    _extra(archive, ProcedureCodeSequence=[_code("A1", "Alpha"), _code("B2", "Beta")])

    def find(*items: pydicom.Dataset) -> list[pydicom.Dataset]:
        return list(archive.find("STUDY", query("STUDY", **_sequence_key(*items))))

    (beta,) = find(_code_only("B2"))
    assert beta.StudyInstanceUID == S5
    assert [(i.CodeValue, "CodeMeaning" in i) for i in beta.ProcedureCodeSequence] == [("B2", False)]
    assert [a.StudyInstanceUID for a in find(_code_only("B*"))] == [S5]
    assert find(_code_only("Z9")) == []
    both = pydicom.Dataset()
    both.CodeValue, both.CodeMeaning = "A1", "Beta"  # one item must match every key
    assert find(both) == []
    everything = find()  # an empty sequence: universal, the stored sequence returned
    assert [a.StudyInstanceUID for a in everything] == [S1, S2, S3, S4, S5]
    assert [i.CodeMeaning for i in everything[-1].ProcedureCodeSequence] == ["Alpha", "Beta"]
    universal = find(_code_only(""))  # an item of universal keys: every item, those keys
    assert len(universal) == 5
    assert [i.CodeValue for i in universal[-1].ProcedureCodeSequence] == ["A1", "B2"]
    assert "ProcedureCodeSequence" in universal[0] and not universal[0].ProcedureCodeSequence
    with pytest.raises(InvalidIdentifierError) as caught:
        find(_code_only("A1"), _code_only("B2"))
    assert caught.value.status == Status.DOES_NOT_MATCH_SOP_CLASS
