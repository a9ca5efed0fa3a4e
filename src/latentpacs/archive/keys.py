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

#: Request elements that are not keys (PS3.4 C.4.1.1.3.1) or that the node fills.
NOT_KEYS = frozenset({
    "QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC", "QueryRetrieveView",
    "RetrieveAETitle",
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
