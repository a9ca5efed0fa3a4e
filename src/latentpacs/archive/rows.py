"""Rows from an archived image, and back (PS3.4 B.2 storage into the Q/R model, C.6.1).

Patient, study and series rows are upserted from the *effective* header: a new row is
inserted with ``INSERT ... ON CONFLICT DO NOTHING`` (safe when several node processes
store into one PostgreSQL archive), then its columns take the newest non-empty values.
A patient is Patient ID plus Issuer of Patient ID (PS3.3 C.7.1.1). A study or series
that already belongs to another patient or study is refused, never re-filed or merged
(PS3.4 C.6.1.1: each entity has exactly one parent). Instances whose last sibling is replaced leave no empty parents.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

from sqlalchemy import delete, exists, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from latentpacs.archive.matching import normalise
from latentpacs.archive.records import ArchivedImage
from latentpacs.dicomjson import first_value
from latentpacs.archive.schema import Instance, Latent, Patient, Series, Study
from latentpacs.errors import IdentityConflictError

logger = logging.getLogger(__name__)


def _integer(text: str) -> int | None:
    try:
        return int(float(text)) if text else None
    except ValueError:
        return None


#: What an entity that already exists under another parent is called in the refusal.
_ENTITY_NAMES = {"studies": ("Study", "patient"), "series": ("Series", "study")}


def _upsert(session: Session, entity: Any, keys: dict[str, str], parent: dict[str, int],
            columns: dict[str, Any]) -> int:
    """Insert the entity if absent, refresh its non-empty columns; returns its id.

    Raises
    ------
    IdentityConflictError
        When the entity exists under another parent (a Study Instance UID of another
        patient, a Series Instance UID of another study): nothing may be filed under it.
    """
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    session.execute(
        dialect.insert(entity).values({**keys, **parent, **columns})
        .on_conflict_do_nothing(index_elements=list(keys))
    )
    row = session.execute(
        select(entity).where(*(getattr(entity, name) == value for name, value in keys.items()))
    ).scalar_one()
    for name, parent_id in parent.items():
        if getattr(row, name) != parent_id:
            what, owner = _ENTITY_NAMES[entity.__tablename__]
            uid = next(iter(keys.values()))
            raise IdentityConflictError(
                f"{what} Instance UID belongs to another {owner}: {uid}"
            )
    changed = {name: new for name, new in columns.items() if new not in ("", None)}
    if changed:
        session.execute(update(entity).where(entity.id == row.id).values(changed))
    return int(row.id)


def add_instance(session: Session, image: ArchivedImage, stream_inline: bytes | None,
                 stream_path: str | None, stream_sha256: str | None) -> int:
    """Upsert the parents of ``image`` and insert its instance and latent rows.

    The patient is Patient ID (0010,0020) plus Issuer of Patient ID (0010,0021); a study
    or series that already belongs to another patient or study is refused
    (:class:`~latentpacs.errors.IdentityConflictError`), so the transaction rolls back.
    """
    header = image.effective_header

    def text(tag: str) -> str:
        return first_value(header, tag).strip()

    name = text("00100010")
    patient = _upsert(session, Patient, {
        "patient_id": text("00100020"), "issuer_of_patient_id": text("00100021"),
    }, {}, {
        "patient_name": name, "patient_name_folded": normalise("PN", name),
        "patient_birth_date": normalise("DA", text("00100030")), "patient_sex": text("00100040"),
    })
    study = _upsert(session, Study, {"study_instance_uid": text("0020000D")},
                    {"patient_fk": patient}, {
        "study_date": normalise("DA", text("00080020")),
        "study_time": normalise("TM", text("00080030")),
        "accession_number": text("00080050"), "study_id": text("00200010"),
        "study_description": text("00081030"),
    })
    series = _upsert(session, Series, {"series_instance_uid": text("0020000E")},
                     {"study_fk": study}, {
        "modality": text("00080060"), "series_number": _integer(text("00200011")),
        "series_description": text("0008103E"),
    })
    instance = Instance(
        series_fk=series, sop_instance_uid=text("00080018"),
        original_sop_instance_uid=image.original_sop_instance_uid,
        sop_class_uid=text("00080016"), instance_number=_integer(text("00200013")),
        tier=image.tier, header=json.dumps(image.header), overrides=json.dumps(image.overrides),
        pixel_rows=image.rows, pixel_columns=image.columns,
        bits_allocated=image.bits_allocated, bits_stored=image.bits_stored,
        high_bit=image.high_bit, photometric_interpretation=image.photometric_interpretation,
        original_transfer_syntax=image.original_transfer_syntax,
        original_stored_bytes=image.original_stored_bytes, archived_bytes=image.archived_bytes,
        stored_at=datetime.datetime.now(datetime.UTC),
        pixel_sha256=image.pixel_sha256, returned_sha256=image.returned_sha256,
        lossy_on_arrival=image.lossy_on_arrival,
    )
    session.add(instance)
    session.flush()
    session.add(Latent(
        instance_fk=instance.id, model_sha256=image.model_sha256, latent=image.latent,
        stream=stream_inline, stream_path=stream_path, stream_sha256=stream_sha256,
        stream_size=len(image.stream), stream_coder=image.stream_coder,
        stream_coder_version=image.stream_coder_version,
    ))
    session.flush()
    return instance.id


def remove_instance(session: Session, instance: Instance) -> str | None:
    """Delete an instance and its latent; returns the stream blob path it named, if any."""
    blob = session.scalar(select(Latent.stream_path).where(Latent.instance_fk == instance.id))
    session.execute(delete(Latent).where(Latent.instance_fk == instance.id))
    session.execute(delete(Instance).where(Instance.id == instance.id))
    return blob


def prune(session: Session, series_id: int) -> None:
    """Delete the series, then its study, then its patient, when left without children."""
    study_id = session.scalar(select(Series.study_fk).where(Series.id == series_id))
    if study_id is None or session.scalar(select(exists().where(Instance.series_fk == series_id))):
        return
    session.execute(delete(Series).where(Series.id == series_id))
    patient_id = session.scalar(select(Study.patient_fk).where(Study.id == study_id))
    if session.scalar(select(exists().where(Series.study_fk == study_id))):
        return
    session.execute(delete(Study).where(Study.id == study_id))
    if not session.scalar(select(exists().where(Study.patient_fk == patient_id))):
        session.execute(delete(Patient).where(Patient.id == patient_id))


def to_image(instance: Instance, latent: Latent, stream: bytes) -> ArchivedImage:
    """The :class:`ArchivedImage` an instance row and its latent row describe."""
    return ArchivedImage(
        header=json.loads(instance.header), overrides=json.loads(instance.overrides),
        tier=instance.tier, model_sha256=latent.model_sha256, latent=bytes(latent.latent),
        stream=stream, rows=instance.pixel_rows, columns=instance.pixel_columns,
        bits_allocated=instance.bits_allocated, bits_stored=instance.bits_stored,
        high_bit=instance.high_bit, photometric_interpretation=instance.photometric_interpretation,
        original_transfer_syntax=instance.original_transfer_syntax,
        original_stored_bytes=instance.original_stored_bytes,
        pixel_sha256=instance.pixel_sha256, returned_sha256=instance.returned_sha256,
        lossy_on_arrival=instance.lossy_on_arrival, stream_coder=latent.stream_coder,
        stream_coder_version=latent.stream_coder_version,
    )
