"""Content-addressed stream blobs on the local file system.

A stream larger than :data:`INLINE_LIMIT` is written to ``blob_dir/<sha256>`` through a
temporary file ``.incoming-*`` (written, fsynced, renamed, then the directory fsynced)
*before* the database row naming it commits, so a committed instance never points at a
missing or partial blob (PS3.4 B.2.3: Success only once the instance is durable). Reads
check the SHA-256 again.

Deleting a blob races with a concurrent store of the same content (the name is the
content's hash, so two instances may share one file). The rule that makes it safe lives
in :class:`latentpacs.archive.db.Archive`: a blob is only deleted inside a write
transaction that holds the blob's lock (SQLite: the database write lock; PostgreSQL: an
advisory lock on the hash) and sees no row naming it, and every store re-checks, under
that same lock, that its blob is still there (:meth:`BlobStore.present`), writing it
again when it is not. This module only offers the file operations, and it only ever
touches names that it makes: 64 lower-case hex digits, or ``.incoming-`` plus the
suffix :func:`tempfile.mkstemp` picks. A blob directory belongs to one archive database.

:class:`StreamStore` is the contract the archive relies on; :class:`BlobStore` (this
directory) is the embedded default, :class:`latentpacs.archive.s3.S3BlobStore` an
S3-compatible bucket (``archive.blobs = "s3://bucket/prefix"``); :func:`open_stream_store`
picks one from the settings and imports boto3 only for an ``s3://`` URL.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from latentpacs.errors import ArchiveError, ConfigError, StreamHashError

if TYPE_CHECKING:
    from latentpacs.config import Config

logger = logging.getLogger(__name__)

#: Streams of at most this many bytes stay inline in the database row.
INLINE_LIMIT = 64 * 1024
#: Prefix of a blob being written; such a file is never named by a row.
TEMP_PREFIX = ".incoming-"
#: The name of a finished blob: its SHA-256 in lower-case hex.
BLOB_NAME = re.compile(r"[0-9a-f]{64}")
#: The name of a temporary file made by :meth:`BlobStore.put`.
TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"[A-Za-z0-9_]+")
_WRITE_ATTEMPTS = 2
#: The URL scheme of an S3-compatible object store in ``archive.blobs``.
S3_SCHEME = "s3://"


class StreamStore(Protocol):
    """What :class:`latentpacs.archive.db.Archive` needs of a stream store.

    Names are the streams' SHA-256 (64 lower-case hex digits), the same in every store, so
    a row does not depend on where its stream lives. ``put`` returns only once the stream
    is durable and checked (PS3.4 B.2.3: Success only once the instance is durable);
    ``get`` raises :class:`~latentpacs.errors.StreamHashError` for content that no longer
    matches; every other failure is an :class:`~latentpacs.errors.ArchiveError`.
    """

    @property
    def location(self) -> str:
        """Where the streams live, for log lines: a directory or an ``s3://`` URL."""

    def put(self, data: bytes, sha256: str | None = None) -> tuple[str, str]:
        """Store ``data`` durably; returns (name, sha256 hex)."""

    def present(self, relative_path: str, size: int) -> bool:
        """Whether the stream exists with ``size`` bytes."""

    def get(self, relative_path: str, sha256: str) -> bytes:
        """The stream's bytes, checked against ``sha256``."""

    def names(self) -> Iterator[str]:
        """Every finished stream's name."""

    def remove(self, relative_path: str) -> bool:
        """Delete a stream no row names (the caller holds its lock); whether one was removed."""

    def remove_temporaries(self) -> int:
        """Delete leftovers of writers that died; returns how many."""


def open_stream_store(blobs: str, data_dir: Path, *, s3_endpoint: str = "",
                      s3_region: str = "", s3_access_key_id: str = "",
                      s3_secret_access_key: str = "") -> StreamStore:
    """The stream store the ``archive.blobs`` setting names.

    Empty: the directory ``data_dir/blobs``; ``s3://bucket/prefix``: that bucket
    (:class:`latentpacs.archive.s3.S3BlobStore`, credentials from the arguments or, when
    empty, boto3's standard chain); anything else: a local directory path.

    Raises
    ------
    ConfigError
        For an ``s3://`` URL without a bucket, or another URL scheme.
    ArchiveError
        When the directory cannot be created or the object store client cannot be made.
    """
    if blobs.startswith(S3_SCHEME):
        from latentpacs.archive.s3 import S3BlobStore

        return S3BlobStore(blobs, endpoint=s3_endpoint, region=s3_region,
                           access_key_id=s3_access_key_id,
                           secret_access_key=s3_secret_access_key)
    if "://" in blobs:
        raise ConfigError(f"archive.blobs {blobs!r}: a directory or s3://bucket/prefix")
    return BlobStore(Path(blobs) if blobs else data_dir / "blobs")


def configured_stream_store(config: Config) -> StreamStore:
    """The stream store of a node's settings (``archive.blobs``, ``archive.s3_*``)."""
    return open_stream_store(
        config["archive.blobs"], Path(config["archive.data_dir"]),
        s3_endpoint=config["archive.s3_endpoint"], s3_region=config["archive.s3_region"],
        s3_access_key_id=config["archive.s3_access_key_id"],
        s3_secret_access_key=config["archive.s3_secret_access_key"])


def _write_failure(exc: OSError) -> str:
    """The message (and so the ErrorComment, PS3.7 C.4) for a blob that could not be written.

    It fits the 64 characters of an ErrorComment and says first what an operator must fix:
    a full disk (ENOSPC) or quota (EDQUOT) names the archive's data disk.
    """
    reason = exc.strerror or exc.__class__.__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"archive data disk full ({reason}); not stored"
    return f"cannot write stream blob ({reason}); not stored"


class BlobStore:
    """A directory of stream blobs named by their SHA-256.

    Parameters
    ----------
    root:
        The blob directory; created when missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(f"cannot create blob directory {self.root}: {exc}") from exc

    @property
    def location(self) -> str:
        """The blob directory, for log lines."""
        return str(self.root)

    def put(self, data: bytes, sha256: str | None = None) -> tuple[str, str]:
        """Write ``data`` durably; returns (path relative to the root, sha256 hex).

        ``sha256`` is the data's digest when the caller has it already (it names the file).

        An existing blob of the same content is reused once its content has been checked
        against the hash and it has been fsynced again (with the directory), so that a blob
        whose writer crashed between rename and directory sync is durable before a row
        names it. A blob of the wrong content under that name is rewritten.

        Raises
        ------
        ArchiveError
            When the blob cannot be written and synced.
        """
        digest = sha256 or hashlib.sha256(data).hexdigest()
        target = self.root / digest
        try:
            if self._refresh(target, digest, len(data)):
                return digest, digest
            for attempt in range(1, _WRITE_ATTEMPTS + 1):
                try:
                    self._write(target, data)
                    break
                except FileNotFoundError:
                    # A start-up sweep of another process removed the temporary file
                    # in the instant before it was locked; write it once more.
                    if attempt == _WRITE_ATTEMPTS:
                        raise
            self._sync_directory()
        except OSError as exc:
            logger.error("cannot write stream blob %s: %s", target, exc)
            raise ArchiveError(_write_failure(exc)) from exc
        logger.debug("wrote blob %s (%d bytes)", digest, len(data))
        return digest, digest

    def _refresh(self, target: Path, digest: str, size: int) -> bool:
        """Whether ``target`` already holds this content; if so, fsync it and the directory."""
        try:
            with target.open("rb") as stream:
                if os.fstat(stream.fileno()).st_size != size:
                    return False
                hasher = hashlib.sha256()
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    hasher.update(chunk)
                if hasher.hexdigest() != digest:
                    logger.warning("blob %s does not match its name; rewriting it", digest)
                    return False
                os.fsync(stream.fileno())
        except FileNotFoundError:
            return False
        self._sync_directory()
        return True

    def _write(self, target: Path, data: bytes) -> None:
        handle, temp_name = tempfile.mkstemp(dir=self.root, prefix=TEMP_PREFIX)
        try:
            # Held until the file is closed: a concurrent sweep leaves a locked file alone.
            fcntl.flock(handle, fcntl.LOCK_EX)
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
                os.replace(temp_name, target)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise

    def _sync_directory(self) -> None:
        directory = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def present(self, relative_path: str, size: int) -> bool:
        """Whether the blob exists with ``size`` bytes (checked under the blob's lock)."""
        try:
            return (self.root / relative_path).stat().st_size == size
        except OSError:
            return False

    def get(self, relative_path: str, sha256: str) -> bytes:
        """Read a blob and check its SHA-256.

        Raises
        ------
        ArchiveError
            When the blob is missing, unreadable or its content does not match ``sha256``.
        """
        path = self.root / relative_path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArchiveError(f"stream blob {path} is unreadable: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StreamHashError(f"stream blob {path.name} does not match its SHA-256")
        return data

    def names(self) -> Iterator[str]:
        """The finished blobs in the directory (names of 64 hex digits only)."""
        yield from self._listed(BLOB_NAME)

    def _listed(self, pattern: re.Pattern[str]) -> list[str]:
        """Names of the plain files in the directory that match ``pattern`` in full."""
        try:
            with os.scandir(self.root) as entries:
                return [entry.name for entry in entries
                        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)]
        except OSError as exc:
            raise ArchiveError(f"cannot list blob directory {self.root}: {exc}") from exc

    def remove(self, relative_path: str) -> bool:
        """Delete a blob no row names any longer (the caller holds its lock).

        Only a name of 64 hex digits is ever deleted; a missing file is not an error.
        Returns whether a file was removed.
        """
        if not BLOB_NAME.fullmatch(relative_path):
            logger.warning("not removing %r: not a blob name", relative_path)
            return False
        try:
            (self.root / relative_path).unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            logger.warning("could not remove unused blob %s: %s", relative_path, exc)
            return False
        return True

    def remove_temporaries(self) -> int:
        """Delete leftover ``.incoming-*`` files of writers that died; returns how many.

        A temporary file still locked by its writer (another live process) is kept.
        """
        removed = 0
        for name in self._listed(TEMP_NAME):
            path = self.root / name
            try:
                handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue  # renamed or removed by its writer meanwhile
            try:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer holds it
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass  # renamed to its blob name just before we locked it
            except OSError as exc:
                logger.warning("could not remove temporary blob %s: %s", name, exc)
            finally:
                os.close(handle)
        return removed
