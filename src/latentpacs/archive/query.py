"""C-FIND answers and C-GET/C-MOVE selections from the archive tables (PS3.4 C.4.1-C.4.3).

Keys at or above the query level that have an indexed column are matched in SQL; other
keys are matched in Python against the *effective* header of a representative instance
of each candidate entity (the newest one stored). Behaviour chosen where PS3.4 leaves
room, documented for the conformance statement:

* Queries are answered relationally: unique keys of higher levels may be missing,
  universal or lists (C.4.1.2.2); a strictly hierarchical SCU gets the same answers.
* Keys below the query level are not matched and come back zero-length (C.4.1.2.1).
* Every answer carries each key of the request, Query/Retrieve Level and the unique
  keys of its level and the levels above; Specific Character Set is ISO_IR 192 when a
  value is not ASCII. Instance Availability, when asked, is ONLINE.
* Answers carry Retrieve AE Title (0008,0054), the node's own AE title, when
  the request asks for it. Sequence keys follow C.2.2.2.6 (see
  :mod:`latentpacs.archive.matching`).
* Answers are read in chunks, each in its own short database session closed before the
  chunk is handed on: no transaction stays open while answers go to the network.
* Retrieve (C.4.2.2.1, C.4.3.2.1) needs the unique key of the retrieve level; unique keys
  of higher levels present in the identifier narrow the selection; others are ignored.
  Every unique key present must be a single value or a list of UIDs: universal, empty
  and wildcard values are refused (A900).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Select, exists, func, select
from sqlalchemy.orm import Session, aliased

from latentpacs.archive.keys import (
    NOT_KEYS, SQL_KEYS, UNIQUE_KEYS, check_level, key_level, retrieve_unique_values,
)
from latentpacs.archive.matching import KeyMatch, json_values, normalise
from latentpacs.dicomjson import dataset_from_json
from latentpacs.archive.schema import Instance, Patient, Series, Study
from latentpacs.errors import LimitExceededError

logger = logging.getLogger(__name__)
CHUNK = 500
_UNIQUE_TAGS = {"PatientID": ("00100020", "LO"), "StudyInstanceUID": ("0020000D", "UI"),
                "SeriesInstanceUID": ("0020000E", "UI"), "SOPInstanceUID": ("00080018", "UI")}
_LABELS = ("patient", "study", "series", "instance")


@dataclass(frozen=True)
class RequestKey:
    """One key of a request identifier: where it sits and how it matches."""

    tag: str  # DICOM JSON tag (PS3.18 F.2.1.1), e.g. "0020000D"
    keyword: str  # "" for private or unknown tags
    vr: str
    level: int
    match: KeyMatch


def _count_queries() -> dict[str, Callable[[], Any]]:
    study, series, instance = aliased(Study), aliased(Series), aliased(Instance)
    count = func.count
    return {
        "NumberOfPatientRelatedStudies": lambda: select(count(study.id))
        .where(study.patient_fk == Patient.id),
        "NumberOfPatientRelatedSeries": lambda: select(count(series.id))
        .join(study, series.study_fk == study.id).where(study.patient_fk == Patient.id),
        "NumberOfPatientRelatedInstances": lambda: select(count(instance.id))
        .join(series, instance.series_fk == series.id).join(study, series.study_fk == study.id)
        .where(study.patient_fk == Patient.id),
        "NumberOfStudyRelatedSeries": lambda: select(count(series.id))
        .where(series.study_fk == Study.id),
        "NumberOfStudyRelatedInstances": lambda: select(count(instance.id))
        .join(series, instance.series_fk == series.id).where(series.study_fk == Study.id),
        "NumberOfSeriesRelatedInstances": lambda: select(count(instance.id))
        .where(instance.series_fk == Series.id),
    }


_COUNTS = _count_queries()
_SETS = {"ModalitiesInStudy": Series.modality, "SOPClassesInStudy": Instance.sop_class_uid}


def request_keys(identifier: Dataset, level: int, root: str) -> list[RequestKey]:
    """The keys of ``identifier`` plus the unique keys an answer at ``level`` carries."""
    keys: list[RequestKey] = []
    for element in identifier:
        keyword = element.keyword or ""
        if element.tag.group < 0x0008 or keyword in NOT_KEYS:
            continue
        keys.append(RequestKey(f"{element.tag:08X}", keyword, element.VR,
                               key_level(keyword, level, root), KeyMatch.parse(element)))
    present = {key.keyword for key in keys}
    first = 1 if root == "STUDY" else 0
    for index in range(first, level + 1):
        keyword = UNIQUE_KEYS[index]
        if keyword not in present:
            tag, vr = _UNIQUE_TAGS[keyword]
            keys.append(RequestKey(tag, keyword, vr, index, KeyMatch(keyword, vr, ())))
    return keys


def _joined(level: int, *columns: Any) -> Select[Any]:
    """SELECT columns FROM the level's table joined up to patients."""
    entities: list[Any] = [Patient, Study, Series, Instance]
    statement = select(*columns).select_from(entities[level])
    links = [Study.patient_fk == Patient.id, Series.study_fk == Study.id,
             Instance.series_fk == Series.id]
    for index in range(level - 1, -1, -1):
        statement = statement.join(entities[index], links[index])
    return statement


def _representative(level: int) -> Any:
    """The newest instance under the outer entity of ``level`` (a correlated subquery)."""
    if level == 3:
        return Instance.id
    series, study = aliased(Series), aliased(Study)
    query = select(func.max(Instance.id))
    if level == 2:
        return query.where(Instance.series_fk == Series.id).scalar_subquery()
    query = query.join(series, Instance.series_fk == series.id)
    if level == 1:
        return query.where(series.study_fk == Study.id).scalar_subquery()
    query = query.join(study, series.study_fk == study.id)
    return query.where(study.patient_fk == Patient.id).scalar_subquery()


def _set_exists(keyword: str, match: KeyMatch) -> ColumnElement[bool]:
    """A study has a series (ModalitiesInStudy) or instance (SOPClassesInStudy) that matches."""
    series, instance = aliased(Series), aliased(Instance)
    if keyword == "ModalitiesInStudy":
        found = exists().where(series.study_fk == Study.id)
        condition = match.sql(series.modality)
    else:
        found = exists().where(instance.series_fk == series.id, series.study_fk == Study.id)
        condition = match.sql(instance.sop_class_uid)
    return found.where(condition) if condition is not None else found


def find(open_session: Callable[[], AbstractContextManager[Session]], level_name: str,
         identifier: Dataset, root: str, *, retrieve_aet: str = "") -> Iterator[Dataset]:
    """C-FIND answers, one per matching entity (see the module docstring).

    Candidates are read ``CHUNK`` at a time (keyset pagination on the level's row id),
    each chunk in its own short session from ``open_session``; the session is closed
    before the chunk's answers are yielded, so a caller that writes each answer to the
    network (or is paused between answers) holds no database transaction or connection.
    ``retrieve_aet`` is the Retrieve AE Title (0008,0054) an answer carries when asked.
    """
    level = check_level(level_name, identifier, root)
    keys = request_keys(identifier, level, root)
    active = [key for key in keys if key.level <= level and not key.match.universal]
    wanted = {key.keyword for key in keys if key.level <= level}
    entities: tuple[Any, ...] = (Patient, Study, Series, Instance)[: level + 1]
    columns = [entity.id.label(label) for entity, label in zip(entities, _LABELS, strict=False)]
    counts = [_COUNTS[name]().scalar_subquery().label(name) for name in _COUNTS if name in wanted]
    statement = _joined(level, *columns, _representative(level).label("representative"), *counts)
    for key in active:
        if key.keyword in SQL_KEYS:
            condition = key.match.sql(SQL_KEYS[key.keyword][1])
            statement = statement.where(condition) if condition is not None else statement
        elif key.keyword in _SETS:
            statement = statement.where(_set_exists(key.keyword, key.match))
    in_python = [key for key in active if key.keyword not in SQL_KEYS and key.keyword not in _SETS]
    fixed: dict[str, list[Any]] = {}
    if "InstanceAvailability" in wanted:
        fixed["InstanceAvailability"] = ["ONLINE"]
    if "RetrieveAETitle" in wanted:
        fixed["RetrieveAETitle"] = [retrieve_aet] if retrieve_aet else []
    last = 0
    while True:
        with open_session() as session:
            rows = session.execute(statement.where(entities[level].id > last)
                                   .order_by(columns[-1]).limit(CHUNK)).all()
            if not rows:
                return
            headers = _effective_headers(session, [row.representative for row in rows])
            sets = _study_sets(session, [row.study for row in rows], wanted) if level else {}
        logger.debug("C-FIND %s root %s: %d candidates from SQL", level_name, root, len(rows))
        answers = []
        for row in rows:
            header = headers.get(row.representative)
            if header is None:
                continue
            computed: dict[str, list[Any]] = {name: [getattr(row, name)] for name in _COUNTS
                                              if name in row._fields}
            computed.update(sets.get(row.study, {}) if level else {})
            computed.update(fixed)
            if all(_python_match(key, header, computed) for key in in_python):
                answers.append(_answer(keys, header, computed, level, level_name))
        last = getattr(rows[-1], _LABELS[level])
        yield from answers


def _python_match(key: RequestKey, header: dict[str, Any], computed: dict[str, list[Any]]) -> bool:
    if key.vr == "SQ":
        return key.match.matching_items(header.get(key.tag)) is not None
    if key.keyword in computed:
        return key.match.matches([str(value) for value in computed[key.keyword]])
    return key.match.matches(json_values(header.get(key.tag), key.vr))


def _answer(keys: list[RequestKey], header: dict[str, Any], computed: dict[str, list[Any]],
            level: int, level_name: str) -> Dataset:
    """One C-FIND response identifier (PS3.4 C.4.1.1.3.2) as a pydicom Dataset."""
    data: dict[str, Any] = {"00080052": {"vr": "CS", "Value": [level_name]}}
    for key in keys:
        if key.level > level:
            data[key.tag] = {"vr": key.vr}
        elif key.vr == "SQ":
            data[key.tag] = key.match.answer(header.get(key.tag))
        elif key.keyword in computed:
            values = computed[key.keyword]
            data[key.tag] = {"vr": key.vr, "Value": values} if values else {"vr": key.vr}
        else:
            data[key.tag] = header.get(key.tag) or {"vr": key.vr}
    if not json.dumps(data, ensure_ascii=False).isascii():
        data["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    return dataset_from_json(data)


def _effective_headers(session: Session, ids: list[int]) -> dict[int, dict[str, Any]]:
    """Effective headers (header updated with overrides) of the given instance rows."""
    rows = session.execute(
        select(Instance.id, Instance.header, Instance.overrides).where(Instance.id.in_(ids))
    )
    return {row.id: {**json.loads(row.header), **json.loads(row.overrides)} for row in rows}


def _study_sets(session: Session, study_ids: list[int], wanted: set[str]
                ) -> dict[int, dict[str, list[Any]]]:
    """ModalitiesInStudy / SOPClassesInStudy of the given studies, when asked for."""
    result: dict[int, dict[str, list[Any]]] = {}
    for keyword, column in _SETS.items():
        if keyword not in wanted:
            continue
        statement = (select(Series.study_fk, column).distinct()
                     .where(Series.study_fk.in_(study_ids)).where(column != ""))
        if keyword == "SOPClassesInStudy":
            statement = statement.join(Instance, Instance.series_fk == Series.id)
        for study_id, value in session.execute(statement.order_by(column)):
            result.setdefault(study_id, {}).setdefault(keyword, []).append(value)
        for study_id in study_ids:
            result.setdefault(study_id, {}).setdefault(keyword, [])
    return result


def matching_instance_ids(session: Session, level_name: str, identifier: Dataset,
                          root: str, *, limit: int | None = None) -> list[int]:
    """Instance row ids under every entity the identifier's unique keys select (retrieve).

    The unique keys are checked by :func:`~latentpacs.archive.keys.retrieve_unique_values`
    (single values or UID lists, never universal or wildcards). Only ids are read: the
    caller loads each instance when its sub-operation comes.

    Raises
    ------
    InvalidIdentifierError
        For an invalid level, root or unique key (A900).
    LimitExceededError
        When more than ``limit`` instances match (A700); nothing has been sent yet.
    """
    level = check_level(level_name, identifier, root)
    statement = _joined(3, Instance.id)
    for keyword, values in retrieve_unique_values(identifier, level, root).items():
        column = SQL_KEYS[keyword][1]
        wanted = [normalise("UI" if keyword != "PatientID" else "LO", value) for value in values]
        statement = statement.where(column.in_(wanted) if len(wanted) > 1 else column == wanted[0])
    if limit is not None:
        count = session.scalar(select(func.count()).select_from(statement.subquery())) or 0
        if count > limit:
            raise LimitExceededError(
                f"{count} instances match, more than the limit of {limit} per retrieve")
    return list(session.scalars(statement.order_by(Instance.id)))
