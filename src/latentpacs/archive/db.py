"""The archive: one database (SQLite or PostgreSQL) plus a stream blob directory.

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
from sqlalchemy import BigInteger, CursorResult, cast, exists, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from latentpacs.archive import query, summary
from latentpacs.archive.blobs import INLINE_LIMIT, BlobStore, StreamStore
from latentpacs.archive.database import IMMEDIATE, make_engine, migrate as run_migrations
from latentpacs.archive.rows import add_instance, prune, remove_instance, to_image
from latentpacs.archive.keys import check_level
from latentpacs.archive.records import (
    ArchivedImage, ArchiveStats, CoderStats, StreamRow, TierStats,
)
from latentpacs.archive.schema import Instance, Latent, Model, Patient, Series, Study
from latentpacs.codec.tiers import RECEIVED
from latentpacs.errors import (
    ArchiveError, ConfigError, ConstraintViolationError, DuplicateInstanceError, LatentPacsError,
    ModelError, NotFoundError, StreamHashError,
)

logger = logging.getLogger(__name__)
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: One first try and one retry: a second violation is not a concurrent store's doing.
_STORE_ATTEMPTS = 2
#: Violations a concurrent store can cause (it inserted the same entity first): retried once.
_TRANSIENT_SQLSTATES = frozenset({"23505", "23503"})  # unique_violation, foreign_key_violation
_TRANSIENT_SQLITE = frozenset({"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY",
                               "SQLITE_CONSTRAINT_FOREIGNKEY"})
_CHUNK = 200


def _violation(exc: IntegrityError) -> tuple[str, bool]:
    """The violated constraint's name, and whether a concurrent store can have caused it."""
    original = exc.orig
    sqlstate = getattr(original, "sqlstate", None)
    if sqlstate is not None:  # psycopg (PostgreSQL)
        diag = getattr(original, "diag", None)
        name = getattr(diag, "constraint_name", None) or getattr(diag, "column_name", None)
        return str(name or sqlstate), sqlstate in _TRANSIENT_SQLSTATES
    message = str(original)  # sqlite3: "UNIQUE constraint failed: instances.sop_instance_uid"
    name = message.split(":", 1)[1].strip() if ":" in message else message
    return name or "unknown", getattr(original, "sqlite_errorname", "") in _TRANSIENT_SQLITE


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
        Directory for streams above 64 KiB, written and fsynced before their row
        commits; without one every stream stays inline in the database. It belongs to
        this database alone: opening the archive sweeps it (:meth:`sweep`).
    blob_store:
        A stream store to use instead of ``blob_dir`` (e.g. an S3 bucket,
        :func:`latentpacs.archive.blobs.open_stream_store`); same rules.
    migrate:
        Apply the Alembic migrations up to head first.
    sweep:
        Remove orphan blobs and leftover temporary files at open (see :meth:`sweep`).

    Raises
    ------
    ConfigError
        For an unusable URL.
    ArchiveError
        When the database cannot be reached or migrated.
    """

    def __init__(self, url: str, *, blob_dir: Path | None = None, migrate: bool = True,
                 sweep: bool = True, blob_store: StreamStore | None = None) -> None:
        self._engine = make_engine(url)
        try:
            self._blobs: StreamStore | None = (
                blob_store if blob_store is not None
                else BlobStore(blob_dir) if blob_dir is not None else None)
            if migrate:
                run_migrations(self._engine)
            if sweep and self._blobs is not None:
                self.sweep()
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
        retries (a concurrent process stored the same entity first). A lost or refused
        connection (PostgreSQL restarted, SQLite's disk full) is "archive database
        unavailable" plus the driver's reason; SQLAlchemy has invalidated the broken
        connection, and the next checkout's pre-ping (:func:`make_engine`) replaces any
        other pooled connection the restart broke, so the next request reconnects.
        """
        try:
            with self._engine.connect() as connection:
                if write:
                    connection = connection.execution_options(**{IMMEDIATE: True})
                with Session(bind=connection, expire_on_commit=False) as session, session.begin():
                    yield session
        except IntegrityError:
            raise
        except (OperationalError, InterfaceError) as exc:
            reason = " ".join(str(exc.orig).split()) if exc.orig is not None else str(exc)
            logger.info("archive database unavailable%s: %s",
                           " (connection invalidated)" if exc.connection_invalidated else "",
                           reason)
            raise ArchiveError(f"archive database unavailable: {reason}") from exc
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

    def store(self, image: ArchivedImage, *,
              duplicates: DuplicatePolicy = DuplicatePolicy.KEEP) -> StoreResult:
        """Archive one instance in one transaction; returns after the commit.

        A stream above 64 KiB goes to a blob, durable before the row naming it commits
        (PS3.4 B.2.3: Success only once the instance is durable). A constraint violation
        that a concurrent store can cause (it inserted the same patient, study, series or
        instance first) is retried once; the same or any other violation after that, or a
        violation no concurrency explains (NOT NULL, CHECK), is permanent. Errors of the
        project (:class:`~latentpacs.errors.LatentPacsError`, e.g. an identity conflict
        found by ingest) propagate untouched.

        Raises
        ------
        DuplicateInstanceError
            When the instance is already archived and ``duplicates`` is REJECT.
        ModelError
            When ``image.model_sha256`` is not registered.
        ConfigError
            When ``duplicates`` names no policy.
        ConstraintViolationError
            When the instance breaks an archive constraint for good (Cxxx, the ErrorComment
            names the constraint); nothing is committed.
        ArchiveError
            When the database or blob store fails; nothing is committed.
        """
        try:
            duplicates = DuplicatePolicy(duplicates)
        except ValueError:
            raise ConfigError(
                f"duplicate policy {duplicates!r} is not keep, replace or reject") from None
        uid = image.original_sop_instance_uid
        inline, path, digest = self._place_stream(image.stream)
        for attempt in range(1, _STORE_ATTEMPTS + 1):
            try:
                result, old_blob = self._store_once(image, duplicates, inline, path, digest)
            except IntegrityError as exc:
                constraint, transient = _violation(exc)
                if transient and attempt < _STORE_ATTEMPTS:
                    logger.info("store of %s met a concurrent change (%s); retrying",
                                uid, constraint)
                    continue
                logger.warning("store of %s violates %s: %s", uid, constraint, exc.orig)
                if path is not None:
                    self._drop_blob_if_unused(path)
                raise ConstraintViolationError(
                    f"archive constraint {constraint} violated; not stored") from exc
            except LatentPacsError:
                if path is not None:  # refused (duplicate, identity conflict...): no orphan
                    self._drop_blob_if_unused(path)
                raise
            if old_blob and old_blob != path:
                self._drop_blob_if_unused(old_blob)
            if result is StoreResult.KEPT_EXISTING and path is not None:
                self._drop_blob_if_unused(path)  # a re-send with other pixels: not kept
            logger.debug("%s %s", result, uid)
            return result
        raise ArchiveError(f"cannot store {uid}")  # not reached: the loop returns or raises

    def _place_stream(self, stream: bytes) -> tuple[bytes | None, str | None, str | None]:
        """Inline bytes, or the blob written (and fsynced) for a stream above the limit."""
        digest = hashlib.sha256(stream).hexdigest() if stream else None
        if self._blobs is not None and len(stream) > INLINE_LIMIT:
            path, digest = self._blobs.put(stream, digest)
            return None, path, digest
        return stream, None, digest

    def _lock_blob(self, session: Session, blob: str, *, exclusive: bool) -> None:
        """Hold ``blob``'s lock until the session's transaction ends.

        SQLite: a write session's BEGIN IMMEDIATE takes the one database write lock, which
        covers every blob. PostgreSQL: a transaction-scoped advisory lock keyed by the
        blob's name, shared by stores and exclusive for a deletion; the deletion's check
        that no row names the blob then runs after any store holding the lock committed
        (READ COMMITTED: each statement sees what committed before it started).
        """
        if self._engine.dialect.name != "postgresql":
            session.connection()  # BEGIN IMMEDIATE now: the write lock is held from here
            return
        key = int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big", signed=True)
        function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        session.execute(text(f"SELECT {function}(:key)"), {"key": key})

    def _store_once(self, image: ArchivedImage, duplicates: DuplicatePolicy, inline: bytes | None,
                    path: str | None, digest: str | None) -> tuple[StoreResult, str | None]:
        uid = image.original_sop_instance_uid
        with self._session(write=True) as session:
            if path is not None and self._blobs is not None:
                # Under the blob's lock, nobody can delete it until this row commits; if a
                # replace or a sweep removed it since put(), write it again.
                self._lock_blob(session, path, exclusive=False)
                if not self._blobs.present(path, len(image.stream)):
                    logger.info("blob %s was removed since it was written; writing it again",
                                path)
                    self._blobs.put(image.stream)
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

    def recode(self, instance_id: int, expected_stream_sha256: str, image: ArchivedImage) -> bool:
        """Swap an instance's stream for ``image``'s, if it still holds the expected one.

        The background coder (:mod:`latentpacs.deferred`) calls this once the tier's stream
        of an image archived as received is written and verified. The new stream is made
        durable first (a blob is fsynced before the row names it); then one transaction
        checks that the instance still exists and still names ``expected_stream_sha256``
        (a replace or another process's coder may have come first) and updates its stream,
        coder, latent, checksums, overrides and byte count. The stream it replaced is
        deleted after the commit, when nothing names it. A crash at any point leaves the
        row naming one valid stream: the old one, or the new one.

        Returns
        -------
        bool
            Whether the row was updated (False: it was gone or already changed).

        Raises
        ------
        ArchiveError
            When the database or blob store fails; the row is unchanged.
        """
        inline, path, digest = self._place_stream(image.stream)
        old_blob: str | None = None
        updated = False
        with self._session(write=True) as session:
            if path is not None and self._blobs is not None:
                self._lock_blob(session, path, exclusive=False)
                if not self._blobs.present(path, len(image.stream)):
                    self._blobs.put(image.stream)
            latent = session.get(Latent, instance_id)
            if latent is not None and latent.stream_sha256 == expected_stream_sha256:
                old_blob = latent.stream_path
                latent.model_sha256 = image.model_sha256
                latent.latent = image.latent
                latent.stream, latent.stream_path = inline, path
                latent.stream_sha256, latent.stream_size = digest, len(image.stream)
                latent.stream_coder = image.stream_coder
                latent.stream_coder_version = image.stream_coder_version
                session.execute(update(Instance).where(Instance.id == instance_id).values(
                    overrides=json.dumps(image.overrides), archived_bytes=image.archived_bytes,
                    pixel_sha256=image.pixel_sha256, returned_sha256=image.returned_sha256,
                    lossy_on_arrival=image.lossy_on_arrival,
                ))
                updated = True
        if old_blob and old_blob != path:
            self._drop_blob_if_unused(old_blob)
        if not updated and path is not None:
            self._drop_blob_if_unused(path)
        return updated

    def restream(self, instance_id: int, expected_stream_sha256: str, stream: bytes, *,
                 coder: str, coder_version: int) -> bool:
        """Replace an instance's stream by another coder's stream of the same pixels.

        :mod:`latentpacs.recompress` calls this once it has decoded the new stream and
        checked that it gives exactly the cells the old one gave (the archived pixel
        checksum), so the row's checksums, tier, overrides and identity stay as they are;
        only the stream, its coder and version, and the instance's archived byte count
        change. The new stream is made durable first (a blob is fsynced before a row names
        it). Then one transaction updates the row only if it still names the expected
        stream (compare-and-swap: ``UPDATE ... WHERE stream_sha256 = expected``, which a
        concurrent replace, recode or restream makes match no row). The stream it replaced
        is deleted after the commit, when no row names it; a loser's new blob likewise. A
        crash at any point leaves the row naming one valid stream, the old or the new, and
        at most an orphan blob that no row names (not counted in :meth:`stats`, removed by
        the next :meth:`sweep`).

        Returns
        -------
        bool
            Whether the row was updated (False: it is gone or names another stream now).

        Raises
        ------
        ConfigError
            When ``stream`` is empty or ``coder`` is empty or the reserved ``received``.
        ArchiveError
            When the database or blob store fails; the row is unchanged.
        """
        if not stream or not coder or coder == RECEIVED:
            raise ConfigError(f"restream needs a coded stream and a coder name, not {coder!r}")
        inline, path, digest = self._place_stream(stream)
        old_blob: str | None = None
        updated = False
        with self._session(write=True) as session:
            if path is not None and self._blobs is not None:
                self._lock_blob(session, path, exclusive=False)
                if not self._blobs.present(path, len(stream)):
                    self._blobs.put(stream)
            row = session.execute(
                select(Latent.stream_path, Latent.stream_size)
                .where(Latent.instance_fk == instance_id,
                       Latent.stream_sha256 == expected_stream_sha256)
                .with_for_update()).first()
            if row is not None:
                swapped: CursorResult[Any] = session.execute(  # type: ignore[assignment]
                    update(Latent).where(Latent.instance_fk == instance_id,
                                         Latent.stream_sha256 == expected_stream_sha256,
                                         Latent.stream_coder != RECEIVED)
                    .values(stream=inline, stream_path=path, stream_sha256=digest,
                            stream_size=len(stream), stream_coder=coder,
                            stream_coder_version=coder_version)
                    .execution_options(synchronize_session=False))
                updated = swapped.rowcount == 1
            if updated and row is not None:
                old_blob = row.stream_path
                session.execute(update(Instance).where(Instance.id == instance_id).values(
                    archived_bytes=Instance.archived_bytes - int(row.stream_size) + len(stream)))
        if old_blob and old_blob != path:
            self._drop_blob_if_unused(old_blob)
        if not updated and path is not None:
            self._drop_blob_if_unused(path)
        return updated

    def pending(self, *, after: int = 0, limit: int = _CHUNK) -> list[int]:
        """Row ids of instances archived as received whose coding is pending, in order.

        Their stream names the reserved coder :data:`~latentpacs.codec.tiers.RECEIVED`.
        """
        with self._session() as session:
            return list(session.scalars(
                select(Latent.instance_fk).where(Latent.stream_coder == RECEIVED,
                                                 Latent.instance_fk > after)
                .order_by(Latent.instance_fk).limit(limit)))

    def streams_not_by(self, coder: str, coder_version: int, *, after: int = 0,
                       limit: int = _CHUNK, tiers: tuple[str, ...] | None = None,
                       ) -> list[StreamRow]:
        """Coded streams written by another coder (or version) than ``coder``, in row order.

        Rows of the latent tier (no stream) and rows archived as received (their coding is
        pending, :mod:`latentpacs.deferred`) are not listed. ``tiers`` keeps only rows of
        those tiers (e.g. ``("lossless",)``); ``after`` and ``limit`` page through them.
        """
        query = (select(Instance.id, Instance.sop_instance_uid, Instance.tier,
                        Latent.stream_coder, Latent.stream_coder_version, Latent.stream_size)
                 .join(Latent, Latent.instance_fk == Instance.id)
                 .where(Instance.id > after, Latent.stream_coder.not_in(("", RECEIVED)),
                        (Latent.stream_coder != coder)
                        | (Latent.stream_coder_version != coder_version))
                 .order_by(Instance.id).limit(limit))
        if tiers is not None:
            query = query.where(Instance.tier.in_(tiers))
        with self._session() as session:
            return [StreamRow(int(row_id), str(uid), str(tier), str(name), int(version),
                              int(size))
                    for row_id, uid, tier, name, version, size in session.execute(query)]

    def _drop_blob_if_unused(self, blob: str) -> None:
        """Delete a blob a replace left unnamed, in a write transaction holding its lock.

        Never inside the replacing transaction itself: were that commit to fail, the old
        row would come back naming a deleted file. A failure here leaves an orphan for the
        next :meth:`sweep`; the store itself has committed.
        """
        if self._blobs is None:
            return
        try:
            with self._session(write=True) as session:
                self._lock_blob(session, blob, exclusive=True)
                if not session.scalar(select(exists().where(Latent.stream_path == blob))):
                    self._blobs.remove(blob)
        except ArchiveError as exc:
            logger.warning("unused blob %s kept for the next sweep: %s", blob, exc)

    def sweep(self) -> tuple[int, int]:
        """Remove orphan blobs and leftover temporary files; returns (blobs, temporaries).

        An orphan is a file named like a blob (64 hex digits) that no latent row names: a
        replace whose clean-up failed, or a store whose process died between writing the
        blob and committing. A temporary file (``.incoming-*``) is removed unless a live
        writer holds it. Each orphan is deleted under its lock after a second check (see
        :meth:`_lock_blob`), so a store of the same content running in another process
        at the same time either is seen naming it, or finds it gone and writes it again.
        Nothing else in the directory is touched.

        Raises
        ------
        ArchiveError
            When the database or the directory cannot be read.
        """
        if self._blobs is None:
            return 0, 0
        temporaries = self._blobs.remove_temporaries()
        on_disk = sorted(self._blobs.names())
        removed = 0
        for start in range(0, len(on_disk), _CHUNK):
            chunk = on_disk[start : start + _CHUNK]
            with self._session() as session:
                candidates = set(chunk) - self._named_blobs(session, chunk)
            if not candidates:
                continue
            with self._session(write=True) as session:
                for blob in sorted(candidates):
                    self._lock_blob(session, blob, exclusive=True)
                orphans = candidates - self._named_blobs(session, sorted(candidates))
                removed += sum(self._blobs.remove(blob) for blob in sorted(orphans))
        if removed or temporaries:
            logger.info("swept %d orphan blobs and %d temporary files from %s",
                        removed, temporaries, self._blobs.location)
        return removed, temporaries

    @staticmethod
    def _named_blobs(session: Session, blobs: list[str]) -> set[str]:
        return {path for path in session.scalars(
            select(Latent.stream_path).where(Latent.stream_path.in_(blobs))) if path}

    def find(self, level: str, identifier: pydicom.Dataset, *, root: str = "STUDY",
             retrieve_aet: str = "") -> Iterator[pydicom.Dataset]:
        """C-FIND answers (PS3.4 C.4.1), one per matching entity, in storage order.

        ``level`` is the identifier's Query/Retrieve Level (0008,0052); ``root`` is
        ``"PATIENT"`` or ``"STUDY"`` (C.6.1, C.6.2). Matching follows C.2.2.2; see
        :mod:`latentpacs.archive.matching` and :mod:`latentpacs.archive.query`.
        ``retrieve_aet`` fills Retrieve AE Title (0008,0054) when the request asks for it.
        Answers are read a chunk at a time, each chunk in its own short session: while the
        caller holds the iterator between answers, no connection is checked out.

        Raises
        ------
        InvalidIdentifierError
            At the call, for an invalid level, root or key value.
        ArchiveError
            While iterating, when the database fails.
        """
        query.request_keys(identifier, check_level(level, identifier, root), root)
        return query.find(self._session, level, identifier, root, retrieve_aet=retrieve_aet)

    def match_instances(self, level: str, identifier: pydicom.Dataset, *, root: str = "STUDY",
                        limit: int | None = None) -> list[int]:
        """Row ids of the instances a C-GET / C-MOVE identifier selects (PS3.4 C.4.2.2, C.4.3.2).

        Only ids: each instance is read by :meth:`load` when its sub-operation comes, so a
        retrieval never holds the whole match set in memory.

        Raises
        ------
        InvalidIdentifierError
            For an invalid level or unique key: empty, universal or a wildcard (A900).
        LimitExceededError
            When more than ``limit`` instances match (A700).
        """
        with self._session() as session:
            return query.matching_instance_ids(session, level, identifier, root, limit=limit)

    def is_archived(self, original_sop_instance_uid: str) -> bool:
        """Whether an instance sent under this SOP Instance UID is archived (PS3.4 B.2)."""
        with self._session() as session:
            return bool(session.scalar(select(exists().where(
                Instance.original_sop_instance_uid == original_sop_instance_uid))))

    def instance_id(self, original_sop_instance_uid: str) -> int | None:
        """The row id of the instance sent under this SOP Instance UID, if archived."""
        with self._session() as session:
            return session.scalar(select(Instance.id).where(
                Instance.original_sop_instance_uid == original_sop_instance_uid))

    def returned_identity(self, original_sop_instance_uid: str) -> tuple[str, str, str] | None:
        """(Study, Series, SOP Instance UID) a retrieval returns for the instance sent under
        this UID, from indexed columns only (no header, no stream), or None if not archived."""
        with self._session() as session:
            row = session.execute(
                select(Study.study_instance_uid, Series.series_instance_uid, Instance.sop_instance_uid)
                .join(Series, Instance.series_fk == Series.id)
                .join(Study, Series.study_fk == Study.id)
                .where(Instance.original_sop_instance_uid == original_sop_instance_uid)
            ).first()
        return None if row is None else (str(row[0]), str(row[1]), str(row[2]))

    def load(self, instance_id: int) -> ArchivedImage:
        """One archived instance by row id (from :meth:`match_instances`), in a short session.

        Raises
        ------
        NotFoundError
            When the instance was removed since it matched (e.g. replaced by a re-send).
        """
        with self._session() as session:
            found = self._load(session, [instance_id])
        if not found:
            raise NotFoundError(f"archived instance row {instance_id} no longer exists")
        return found[0]

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

    def instance_rows(self) -> Iterator[tuple[int, str]]:
        """(row id, returned SOP Instance UID) of every archived instance, in storage order.

        ``latentpacs archive verify`` loads each by :meth:`load`, so that one unreadable
        stream fails that instance only and the report names it.
        """
        last = 0
        while True:
            with self._session() as session:
                rows = [(int(row_id), str(uid)) for row_id, uid in session.execute(
                    select(Instance.id, Instance.sop_instance_uid).where(Instance.id > last)
                    .order_by(Instance.id).limit(_CHUNK))]
            if not rows:
                return
            yield from rows
            last = rows[-1][0]

    def _load(self, session: Session, ids: list[int]) -> list[ArchivedImage]:
        rows = session.execute(
            select(Instance, Latent).join(Latent, Latent.instance_fk == Instance.id)
            .where(Instance.id.in_(ids)).order_by(Instance.id)).all()
        images = []
        for instance, latent in rows:
            try:
                stream = self._stream(latent)
            except ArchiveError as exc:
                # A corrupt or missing stream: what a peer (its ErrorComment, 64 characters)
                # and an operator need first is what failed, then which instance.
                logger.error("archive row %d (%s): %s", instance.id, instance.sop_instance_uid,
                             exc.message)
                what = ("fails its SHA-256 check" if isinstance(exc, StreamHashError)
                        else "is unreadable")
                raise type(exc)(f"archived stream {what}: {instance.sop_instance_uid}") from exc
            images.append(to_image(instance, latent, stream))
        return images

    def _stream(self, latent: Latent) -> bytes:
        if latent.stream_path is None:
            data = bytes(latent.stream or b"")
            if latent.stream_sha256 and hashlib.sha256(data).hexdigest() != latent.stream_sha256:
                raise StreamHashError("archived stream does not match its SHA-256")
            return data
        if self._blobs is None:
            raise ArchiveError(f"stream blob {latent.stream_path} needs a blob directory")
        return self._blobs.get(latent.stream_path, latent.stream_sha256 or "")

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
            pending = session.scalar(select(func.count()).select_from(Latent)
                                     .where(Latent.stream_coder == RECEIVED)) or 0
            # Bits, summed as BIGINT (a 64 Mi-pixel image at 16 bits overflows INTEGER).
            native_bits = (cast(Instance.pixel_rows, BigInteger) * Instance.pixel_columns
                           * Instance.bits_allocated)
            coders = tuple(
                CoderStats(coder=str(name), version=int(version), streams=int(count),
                           stream_bytes=int(size or 0), native_bytes=int(bits or 0) // 8)
                for name, version, count, size, bits in session.execute(
                    select(Latent.stream_coder, Latent.stream_coder_version, func.count(),
                           func.sum(Latent.stream_size), func.sum(native_bits))
                    .join(Instance, Instance.id == Latent.instance_fk)
                    .where(Latent.stream_coder != "")
                    .group_by(Latent.stream_coder, Latent.stream_coder_version)
                    .order_by(Latent.stream_coder, Latent.stream_coder_version))
            )
        return ArchiveStats(patients, studies, series, instances, tiers=tiers, pending=pending,
                            coders=coders)

    def study_summaries(self, *, study_uids: list[str] | None = None, limit: int,
                        offset: int = 0) -> list[summary.StudySummary]:
        """Tiers, bytes and ratio per study, for the viewer (:func:`summary.study_summaries`)."""
        return summary.study_summaries(self._session, study_uids=study_uids, limit=limit,
                                       offset=offset)

    def instance_summaries(self, study_uid: str, *, limit: int) -> list[summary.InstanceSummary]:
        """Tier, bytes and ratio per instance of one study (:func:`summary.instance_summaries`)."""
        return summary.instance_summaries(self._session, study_uid, limit=limit)
