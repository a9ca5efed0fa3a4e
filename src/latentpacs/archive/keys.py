"""Query/Retrieve levels and keys (PS3.4 C.6.1 Patient Root, C.6.2 Study Root).

Which level each known key belongs to, which keys are matched in SQL on an indexed
column, and which are computed by the archive (counts, ModalitiesInStudy). In the Study
Root model the patient attributes belong to the STUDY level (C.6.2.1); keys the tables
below do not name are treated as attributes of the level queried.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from latentpacs.archive.schema import Instance, Patient, Series, Study
from latentpacs.errors import InvalidIdentifierError

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
ROOTS = ("PATIENT", "STUDY")
#: The unique key of each level (PS3.4 C.6.1.1.2 to C.6.1.1.5).
UNIQUE_KEYS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

#: Keys matched in SQL: keyword -> (level index, indexed column of normalised values).
SQL_KEYS: dict[str, tuple[int, Any]] = {
    "PatientID": (0, Patient.patient_id),
    "PatientName": (0, Patient.patient_name_folded),
    "PatientBirthDate": (0, Patient.patient_birth_date),
    "PatientSex": (0, Patient.patient_sex),
    "StudyInstanceUID": (1, Study.study_instance_uid),
    "StudyDate": (1, Study.study_date),
    "StudyTime": (1, Study.study_time),
    "AccessionNumber": (1, Study.accession_number),
    "StudyID": (1, Study.study_id),
    "StudyDescription": (1, Study.study_description),
    "SeriesInstanceUID": (2, Series.series_instance_uid),
    "Modality": (2, Series.modality),
    "SeriesNumber": (2, Series.series_number),
    "SeriesDescription": (2, Series.series_description),
    "SOPInstanceUID": (3, Instance.sop_instance_uid),
    "SOPClassUID": (3, Instance.sop_class_uid),
    "InstanceNumber": (3, Instance.instance_number),
}

#: Keys the archive computes from its tables rather than reading a header.
COMPUTED_KEYS: dict[str, int] = {
    "NumberOfPatientRelatedStudies": 0,
    "NumberOfPatientRelatedSeries": 0,
    "NumberOfPatientRelatedInstances": 0,
    "ModalitiesInStudy": 1,
    "SOPClassesInStudy": 1,
    "NumberOfStudyRelatedSeries": 1,
    "NumberOfStudyRelatedInstances": 1,
    "NumberOfSeriesRelatedInstances": 2,
}

#: Other keys of PS3.4 C.6.1.1 / C.6.2.1 whose level is not the IMAGE level.
OTHER_KEY_LEVELS: dict[str, int] = {
    "IssuerOfPatientID": 0,
    "OtherPatientIDsSequence": 0,
    "PatientBirthTime": 0,
    "OtherPatientNames": 0,
    "EthnicGroup": 0,
    "PatientComments": 0,
    "ReferringPhysicianName": 1,
    "PatientAge": 1,
    "PatientSize": 1,
    "PatientWeight": 1,
    "Occupation": 1,
    "AdditionalPatientHistory": 1,
    "OtherStudyNumbers": 1,
    "NameOfPhysiciansReadingStudy": 1,
    "AdmittingDiagnosesDescription": 1,
    "SeriesDate": 2,
    "SeriesTime": 2,
    "BodyPartExamined": 2,
    "Laterality": 2,
    "ProtocolName": 2,
    "PerformedProcedureStepStartDate": 2,
    "PerformedProcedureStepStartTime": 2,
}

#: Request elements that are not keys (PS3.4 C.4.1.1.3.1). Retrieve AE Title is a key
#: the node fills with its own AE title (C.4.1.1.3.2), so it is not listed here.
NOT_KEYS = frozenset({
    "QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC", "QueryRetrieveView",
})


def check_level(level: str, identifier: Dataset, root: str) -> int:
    """The index of ``level``, after checking it against the identifier and the root.

    Raises
    ------
    InvalidIdentifierError
        For an unknown root or level, an identifier whose Query/Retrieve Level (0008,0052)
        differs from ``level``, or the PATIENT level in the Study Root model (PS3.4 C.6.2).
    """
    if root not in ROOTS:
        raise InvalidIdentifierError(f"unknown information model root {root!r}")
    stated = identifier.get("QueryRetrieveLevel")
    if stated is not None and str(stated).strip() != level:
        raise InvalidIdentifierError(
            f"QueryRetrieveLevel {stated!r} differs from the requested level {level!r}"
        )
    if level not in LEVELS:
        shown = level or "missing"
        raise InvalidIdentifierError(f"QueryRetrieveLevel {shown!r} is not one of {LEVELS}")
    if root == "STUDY" and level == "PATIENT":
        raise InvalidIdentifierError("the PATIENT level does not exist in the Study Root model")
    return LEVELS.index(level)


def key_level(keyword: str, level: int, root: str) -> int:
    """The level a key belongs to under ``root``; unknown keys belong to ``level``."""
    if keyword in SQL_KEYS:
        found = SQL_KEYS[keyword][0]
    elif keyword in COMPUTED_KEYS:
        found = COMPUTED_KEYS[keyword]
    else:
        found = OTHER_KEY_LEVELS.get(keyword, level)
    return max(found, 1) if root == "STUDY" else found


def retrieve_unique_values(identifier: Dataset, level: int, root: str) -> dict[str, list[str]]:
    """The unique key values of a C-MOVE / C-GET identifier, checked (PS3.4 C.4.2.2.1, C.4.3.2.1).

    The unique key of the retrieve level is required; those of the levels above narrow
    the selection when present. Each present one must hold a single value, or, for the
    UID keys (Study, Series, SOP Instance UID), a list of UIDs (C.2.2.2.2). Universal
    matching (empty value, ``*``), wildcards (``*``, ``?``) and empty list members are
    refused, so a retrieve can never select the whole archive by a pattern.

    Returns
    -------
    dict
        Keyword -> list of values, for each unique key present at or above ``level``.

    Raises
    ------
    InvalidIdentifierError
        When the retrieve level's unique key is missing, or any present unique key is
        empty, a wildcard, or (Patient ID) more than one value; A900 on the network.
    """
    first = 1 if root == "STUDY" else 0
    found: dict[str, list[str]] = {}
    for index in range(first, level + 1):
        keyword = UNIQUE_KEYS[index]
        if keyword not in identifier:
            if index == level:
                raise InvalidIdentifierError(
                    f"a {LEVELS[level]} level retrieve needs {keyword}")
            continue
        value = identifier[keyword].value
        raw = [str(item) for item in value] if identifier[keyword].VM > 1 else [
            "" if value is None else str(value)]
        values = [item.strip() for item in raw]
        if any(not item or item == '""' for item in values):
            raise InvalidIdentifierError(
                f"{keyword}: empty value; a retrieve needs unique key values")
        if any("*" in item or "?" in item for item in values):
            raise InvalidIdentifierError(
                f"{keyword}: wildcards are not allowed in a retrieve unique key")
        if index == 0 and len(values) > 1:
            raise InvalidIdentifierError(f"{keyword}: a retrieve takes one Patient ID")
        found[keyword] = values
    return found
