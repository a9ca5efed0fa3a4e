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
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from latentpacs.errors import ArchiveError, StreamHashError

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
            raise ArchiveError(f"cannot write stream blob {target}: {exc}") from exc
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
