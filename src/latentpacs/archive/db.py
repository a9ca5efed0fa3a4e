"""The archive: one database (SQLite or PostgreSQL) plus a residual blob directory.

Each stored instance is one transaction (PS3.4 B.2.3: Success only after commit).
Re-sent instances, identified by the sender's SOP Instance UID, follow a
:class:`DuplicatePolicy`; the archive never holds two copies of one instance.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import exists, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from latentpacs.archive import query
from latentpacs.archive.blobs import INLINE_LIMIT, BlobStore
from latentpacs.archive.engine import IMMEDIATE, make_engine, migrate as run_migrations
from latentpacs.archive.ingest import add_instance, prune, remove_instance, to_image
from latentpacs.archive.keys import check_level
from latentpacs.archive.records import ArchivedImage, ArchiveStats, TierStats
from latentpacs.archive.schema import Instance, Latent, Model, Patient, Series, Study
from latentpacs.errors import (
    ArchiveError, ConfigError, DuplicateInstanceError, ModelError, NotFoundError,
)

logger = logging.getLogger(__name__)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_STORE_ATTEMPTS = 3
_CHUNK = 200


class DuplicatePolicy(StrEnum):
    """What a re-sent SOP Instance (same original SOP Instance UID) does."""

    KEEP = "keep"  #: keep the first copy; the re-send is answered Success
    REPLACE = "replace"  #: the new copy replaces the old one
    REJECT = "reject"  #: refuse the re-send (DuplicateInstanceError)


class StoreResult(StrEnum):
    """What :meth:`Archive.store` did."""

    STORED = "stored"
    KEPT_EXISTING = "kept-existing"
    REPLACED = "replaced"


class Archive:
    """Ingest, query and fetch of archived images.

    Parameters
    ----------
    url:
        ``sqlite:///path.db`` (WAL, synchronous=FULL) or ``postgresql+psycopg://...``.
    blob_dir:
        Directory for residuals above 64 KiB, written and fsynced before their row
        commits; without one every residual stays inline in the database.
    migrate:
        Apply the Alembic migrations up to head first.

    Raises
    ------
    ConfigError
        For an unusable URL.
    ArchiveError
        When the database cannot be reached or migrated.
    """

    def __init__(self, url: str, *, blob_dir: Path | None = None, migrate: bool = True) -> None:
        self._engine = make_engine(url)
        self._blobs = BlobStore(blob_dir) if blob_dir is not None else None
        if migrate:
            try:
                run_migrations(self._engine)
            except BaseException:
                self._engine.dispose()
                raise

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.dispose()

    def dispose(self) -> None:
        """Close every pooled database connection."""
        self._engine.dispose()

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        """A session in one transaction, committed when the block ends without an exception.

        Database errors become ArchiveError, except IntegrityError, which :meth:`store`
        retries (a concurrent process stored the same entity first).
        """
        try:
            with self._engine.connect() as connection:
                if write:
                    connection = connection.execution_options(**{IMMEDIATE: True})
                with Session(bind=connection, expire_on_commit=False) as session, session.begin():
                    yield session
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise ArchiveError(f"archive database error: {exc.__class__.__name__}: {exc}") from exc

    def register_model(self, *, sha256: str, name: str, arch: str, card: dict[str, Any]) -> None:
        """Record a codec model; registering the same SHA-256 again changes nothing."""
        if not _SHA256.fullmatch(sha256):
            raise ModelError(f"model hash {sha256!r} is not a lower-case SHA-256 hex digest")
        dialect = postgresql if self._engine.dialect.name == "postgresql" else sqlite
        with self._session(write=True) as session:
            session.execute(dialect.insert(Model).values(
                sha256=sha256, name=name, arch=arch, card=json.dumps(card, sort_keys=True),
                registered_at=datetime.datetime.now(datetime.UTC),
            ).on_conflict_do_nothing(index_elements=["sha256"]))

    def model_in_use(self, sha256: str) -> bool:
        """Whether any archived latent names this model (it must then never be removed)."""
        with self._session() as session:
            return bool(session.scalar(select(exists().where(Latent.model_sha256 == sha256))))

    def store(self, image: ArchivedImage, *,
              duplicates: DuplicatePolicy = DuplicatePolicy.KEEP) -> StoreResult:
        """Archive one instance in one transaction; returns after the commit.

        Raises
        ------
        DuplicateInstanceError
            When the instance is already archived and ``duplicates`` is REJECT.
        ModelError
            When ``image.model_sha256`` is not registered.
        ConfigError
            When ``duplicates`` names no policy.
        ArchiveError
            When the database or blob store fails; nothing is committed.
        """
        try:
            duplicates = DuplicatePolicy(duplicates)
        except ValueError:
            raise ConfigError(
                f"duplicate policy {duplicates!r} is not keep, replace or reject") from None
        inline, path, digest = self._place_residual(image.residual)
        for attempt in range(1, _STORE_ATTEMPTS + 1):
            try:
                result, old_blob = self._store_once(image, duplicates, inline, path, digest)
            except IntegrityError as exc:
                if attempt == _STORE_ATTEMPTS:
                    raise ArchiveError(
                        f"cannot store {image.original_sop_instance_uid}: {exc.orig}") from exc
                logger.info("store of %s met a concurrent change; retrying",
                            image.original_sop_instance_uid)
                continue
            if old_blob and old_blob != path:
                self._drop_blob_if_unused(old_blob)
            logger.debug("%s %s", result, image.original_sop_instance_uid)
            return result
        raise ArchiveError(f"cannot store {image.original_sop_instance_uid}")

    def _place_residual(self, residual: bytes) -> tuple[bytes | None, str | None, str | None]:
        digest = hashlib.sha256(residual).hexdigest() if residual else None
        if self._blobs is not None and len(residual) > INLINE_LIMIT:
            path, digest = self._blobs.put(residual)
            return None, path, digest
        return residual, None, digest

    def _store_once(self, image: ArchivedImage, duplicates: DuplicatePolicy, inline: bytes | None,
                    path: str | None, digest: str | None) -> tuple[StoreResult, str | None]:
        uid = image.original_sop_instance_uid
        with self._session(write=True) as session:
            if session.get(Model, image.model_sha256) is None:
                raise ModelError(f"model {image.model_sha256[:12]} is not registered")
            existing = session.scalar(
                select(Instance).where(Instance.original_sop_instance_uid == uid))
            if existing is None:
                add_instance(session, image, inline, path, digest)
                return StoreResult.STORED, None
            if duplicates is DuplicatePolicy.KEEP:
                return StoreResult.KEPT_EXISTING, None
            if duplicates is DuplicatePolicy.REJECT:
                raise DuplicateInstanceError(f"SOP Instance {uid} is already archived")
            old_series, old_blob = existing.series_fk, remove_instance(session, existing)
            session.expunge(existing)
            add_instance(session, image, inline, path, digest)
            prune(session, old_series)
            return StoreResult.REPLACED, old_blob

    def _drop_blob_if_unused(self, blob: str) -> None:
        if self._blobs is None:
            return
        with self._session() as session:
            used = session.scalar(select(exists().where(Latent.residual_path == blob)))
        if not used:
            self._blobs.remove(blob)

    def find(self, level: str, identifier: pydicom.Dataset, *,
             root: str = "STUDY") -> Iterator[pydicom.Dataset]:
        """C-FIND answers (PS3.4 C.4.1), one per matching entity, in storage order.

        ``level`` is the identifier's Query/Retrieve Level (0008,0052); ``root`` is
        ``"PATIENT"`` or ``"STUDY"`` (C.6.1, C.6.2). Matching follows C.2.2.2; see
        :mod:`latentpacs.archive.matching` and :mod:`latentpacs.archive.query`.

        Raises
        ------
        InvalidIdentifierError
            At the call, for an invalid level, root or key value.
        ArchiveError
            While iterating, when the database fails.
        """
        query.request_keys(identifier, check_level(level, identifier, root), root)
        return self._answers(level, identifier, root)

    def _answers(self, level: str, identifier: pydicom.Dataset,
                 root: str) -> Iterator[pydicom.Dataset]:
        with self._session() as session:
            yield from query.find(session, level, identifier, root)

    def match_instances(self, level: str, identifier: pydicom.Dataset, *,
                        root: str = "STUDY") -> list[ArchivedImage]:
        """The instances a C-GET / C-MOVE identifier selects (PS3.4 C.4.2.2, C.4.3.2)."""
        with self._session() as session:
            ids = query.matching_instance_ids(session, level, identifier, root)
            return [image for start in range(0, len(ids), _CHUNK)
                    for image in self._load(session, ids[start : start + _CHUNK])]

    def get(self, returned_sop_instance_uid: str) -> ArchivedImage:
        """The instance a retrieval returns under this SOP Instance UID.

        Raises
        ------
        NotFoundError
            When no archived instance is returned under that UID.
        """
        with self._session() as session:
            found = session.scalar(select(Instance.id).where(
                Instance.sop_instance_uid == returned_sop_instance_uid))
            if found is None:
                raise NotFoundError(f"no archived instance {returned_sop_instance_uid}")
            return self._load(session, [found])[0]

    def iter_images(self) -> Iterator[ArchivedImage]:
        """Every archived instance in storage order (for ``latentpacs archive verify``)."""
        last = 0
        while True:
            with self._session() as session:
                ids = list(session.scalars(select(Instance.id).where(Instance.id > last)
                                           .order_by(Instance.id).limit(_CHUNK)))
                images = self._load(session, ids)
            if not ids:
                return
            yield from images
            last = ids[-1]

    def _load(self, session: Session, ids: list[int]) -> list[ArchivedImage]:
        rows = session.execute(
            select(Instance, Latent).join(Latent, Latent.instance_fk == Instance.id)
            .where(Instance.id.in_(ids)).order_by(Instance.id)).all()
        return [to_image(instance, latent, self._residual(latent)) for instance, latent in rows]

    def _residual(self, latent: Latent) -> bytes:
        if latent.residual_path is None:
            return bytes(latent.residual or b"")
        if self._blobs is None:
            raise ArchiveError(f"residual blob {latent.residual_path} needs a blob directory")
        return self._blobs.get(latent.residual_path, latent.residual_sha256 or "")

    def stats(self) -> ArchiveStats:
        """Entity counts and per-tier bytes (``latentpacs archive stats``)."""
        with self._session() as session:
            patients, studies, series, instances = (
                session.scalar(select(func.count()).select_from(entity)) or 0
                for entity in (Patient, Study, Series, Instance)
            )
            tiers = tuple(
                TierStats(tier=tier, instances=int(count), original_bytes=int(original or 0),
                          archived_bytes=int(archived or 0))
                for tier, count, original, archived in session.execute(
                    select(Instance.tier, func.count(), func.sum(Instance.original_stored_bytes),
                           func.sum(Instance.archived_bytes))
                    .group_by(Instance.tier).order_by(Instance.tier))
            )
        return ArchiveStats(patients, studies, series, instances, tiers=tiers)
