"""The archive's tables: the Query/Retrieve information model plus latents and models.

Patients, studies, series and instances follow the entity hierarchy of PS3.4 C.6.1.1 /
C.6.2.1 with one indexed column per matching key that C-FIND translates to SQL
(:mod:`latentpacs.archive.query`). Series and instances carry their *effective* identity
(what a retrieval returns); an instance also keeps the sender's SOP Instance UID, which
identifies it for duplicate handling. Each instance has one latent row naming the model
that made it (DESIGN.md "Contracts"); a model that any latent names can never be deleted
(the foreign key forbids it).

Tables are created by the Alembic migrations in ``migrations/versions`` only, never by
``create_all``; a test checks that the migrations and these classes agree.
"""

from __future__ import annotations

import datetime

from sqlalchemy import (
    BigInteger, Boolean, DateTime, ForeignKey, Integer, LargeBinary, MetaData, String, Text,
    UniqueConstraint, false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with stable constraint names (Alembic compares them)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Model(Base):
    """A registered codec model, identified by the SHA-256 of its weights file."""

    __tablename__ = "models"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    arch: Mapped[str] = mapped_column(String(64))
    card: Mapped[str] = mapped_column(Text)  # the model card, JSON
    registered_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))


class Patient(Base):
    """PATIENT level (PS3.4 C.6.1.1.2): Patient ID (0010,0020) + Issuer of Patient ID (0010,0021).

    Two patients may share a Patient ID under two issuers (PS3.3 C.7.1.1); the pair is
    unique.
    """

    __tablename__ = "patients"
    __table_args__ = (
        UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_patients_patient_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String)
    issuer_of_patient_id: Mapped[str] = mapped_column(String, server_default="")
    patient_name: Mapped[str] = mapped_column(String)
    #: Patient Name upper-cased: PN matching is case-insensitive (PS3.4 C.2.2.2.1).
    patient_name_folded: Mapped[str] = mapped_column(String, index=True)
    patient_birth_date: Mapped[str] = mapped_column(String, index=True)
    patient_sex: Mapped[str] = mapped_column(String, index=True)


class Study(Base):
    """STUDY level (PS3.4 C.6.1.1.3); unique key Study Instance UID (0020,000D)."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String, unique=True)
    study_date: Mapped[str] = mapped_column(String, index=True)  # YYYYMMDD or ""
    study_time: Mapped[str] = mapped_column(String, index=True)  # HHMMSS.FFFFFF or ""
    accession_number: Mapped[str] = mapped_column(String, index=True)
    study_id: Mapped[str] = mapped_column(String, index=True)
    study_description: Mapped[str] = mapped_column(String, index=True)


class Series(Base):
    """SERIES level (PS3.4 C.6.1.1.4); unique key Series Instance UID (0020,000E), effective."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String, unique=True)
    modality: Mapped[str] = mapped_column(String, index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, index=True)
    series_description: Mapped[str] = mapped_column(String, index=True)


class Instance(Base):
    """IMAGE level (PS3.4 C.6.1.1.5); unique key SOP Instance UID (0008,0018), effective."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String, unique=True)
    #: The sender's SOP Instance UID: the identity for re-sent instances.
    original_sop_instance_uid: Mapped[str] = mapped_column(String, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String, index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, index=True)
    tier: Mapped[str] = mapped_column(String(32), index=True)
    header: Mapped[str] = mapped_column(Text)  # original data set without Pixel Data, DICOM JSON
    overrides: Mapped[str] = mapped_column(Text)  # DICOM JSON of the returned differences
    pixel_rows: Mapped[int] = mapped_column(Integer)
    pixel_columns: Mapped[int] = mapped_column(Integer)
    bits_allocated: Mapped[int] = mapped_column(Integer)
    bits_stored: Mapped[int] = mapped_column(Integer)
    high_bit: Mapped[int] = mapped_column(Integer)
    photometric_interpretation: Mapped[str] = mapped_column(String(16))
    original_transfer_syntax: Mapped[str] = mapped_column(String(64))
    original_stored_bytes: Mapped[int] = mapped_column(BigInteger)
    archived_bytes: Mapped[int] = mapped_column(BigInteger)
    stored_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    #: SHA-256 of the original pixel cells, native little endian, every bit ("" before 0002).
    pixel_sha256: Mapped[str] = mapped_column(String(64), server_default="")
    #: SHA-256 of the pixel cells a retrieval of the stream returns ("" for ``latent``).
    returned_sha256: Mapped[str] = mapped_column(String(64), server_default="")
    #: The pixels arrived lossy-compressed (lossy transfer syntax or Lossy Image Compression 01).
    lossy_on_arrival: Mapped[bool] = mapped_column(Boolean, server_default=false())


class Latent(Base):
    """The codec bytes of one instance; the stream is inline or a content-addressed blob."""

    __tablename__ = "latents"

    instance_fk: Mapped[int] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True
    )
    model_sha256: Mapped[str] = mapped_column(ForeignKey("models.sha256"), index=True)
    latent: Mapped[bytes] = mapped_column(LargeBinary)
    stream: Mapped[bytes | None] = mapped_column(LargeBinary)  # inline stream, else NULL
    stream_path: Mapped[str | None] = mapped_column(String)  # blob path relative to blob_dir
    stream_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    stream_size: Mapped[int] = mapped_column(BigInteger)
    #: The stream's coder (``jpeg-ls``; ``""`` for the latent tier) and its format version.
    stream_coder: Mapped[str] = mapped_column(String(32), server_default="")
    stream_coder_version: Mapped[int] = mapped_column(Integer, server_default="0")
