"""Content-addressed residual blobs on the local file system.

A residual larger than :data:`INLINE_LIMIT` is written to ``blob_dir/<sha256>`` and
fsynced (file and directory) *before* the database row naming it commits, so a committed
instance never points at a missing or partial blob. Reads check the SHA-256 again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from latentpacs.errors import ArchiveError

logger = logging.getLogger(__name__)

#: Residuals of at most this many bytes stay inline in the database row.
INLINE_LIMIT = 64 * 1024


class BlobStore:
    """A directory of residual blobs named by their SHA-256.

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

    def put(self, data: bytes) -> tuple[str, str]:
        """Write ``data`` durably; returns (path relative to the root, sha256 hex).

        An existing blob of the same content is reused.

        Raises
        ------
        ArchiveError
            When the blob cannot be written and synced.
        """
        digest = hashlib.sha256(data).hexdigest()
        target = self.root / digest
        if target.is_file() and target.stat().st_size == len(data):
            return digest, digest
        try:
            handle, temp_name = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
            try:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(data)
                    stream.flush()
                    os.fsync(stream.fileno())
                os.replace(temp_name, target)
            except BaseException:
                Path(temp_name).unlink(missing_ok=True)
                raise
            directory = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise ArchiveError(f"cannot write residual blob {target}: {exc}") from exc
        logger.debug("wrote blob %s (%d bytes)", digest, len(data))
        return digest, digest

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
            raise ArchiveError(f"residual blob {path} is unreadable: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ArchiveError(f"residual blob {path} does not match its SHA-256")
        return data

    def remove(self, relative_path: str) -> None:
        """Delete a blob no row names any longer; a missing file is not an error."""
        try:
            (self.root / relative_path).unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove unused blob %s: %s", relative_path, exc)
