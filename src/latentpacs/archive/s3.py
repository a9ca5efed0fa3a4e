"""Content-addressed stream blobs in an S3-compatible bucket (``archive.blobs = "s3://..."``).

The same contract as the local :class:`latentpacs.archive.blobs.BlobStore`: a stream is
the object ``<prefix>/<sha256>``, uploaded and checked *before* the database row naming it
commits, so a C-STORE Success still means the instance is durable (PS3.4 B.2.3). The
upload sends Content-MD5 (a conformant server refuses a body that does not match it);
then a HeadObject must show the stream's size and, as its ETag, the MD5 of the bytes sent
(a single-part upload's ETag is the MD5 of the object S3 stored). Where a server's ETag
is not that MD5 (e.g. SSE-KMS), the object is read back and its SHA-256 checked instead.
Reads check the SHA-256 again and raise :class:`~latentpacs.errors.StreamHashError`.

Names are the content's hash, so two nodes writing the same stream at once write the same
bytes to the same key: harmless. The deletion lock is the database's, as for the local
store (:meth:`latentpacs.archive.db.Archive._lock_blob`); this module only offers the
object operations and only ever touches keys ``<prefix>/`` + 64 hex digits. A PutObject
is atomic (the object appears whole or not at all) and no multipart upload is started,
so there are no temporaries to sweep: :meth:`S3BlobStore.remove_temporaries` finds none.
A bucket prefix belongs to one archive database.

Every request has short connect and read timeouts and a limited number of attempts; any
failure to talk to the server (refused, timed out, a 5xx, missing credentials) is an
:class:`~latentpacs.errors.ObjectStoreError`, which a C-STORE answers with A700 and an
ErrorComment. boto3 is imported only when such a store is opened.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from latentpacs.archive.blobs import BLOB_NAME, S3_SCHEME
from latentpacs.errors import ArchiveError, ConfigError, ObjectStoreError, StreamHashError

logger = logging.getLogger(__name__)

#: Seconds to wait for a TCP connection to the object store.
CONNECT_TIMEOUT_S = 3.0
#: Seconds to wait for the object store's answer to a request.
READ_TIMEOUT_S = 10.0
#: Tries per request, the first one included (botocore "standard" retry mode).
ATTEMPTS = 2
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


@dataclass(frozen=True)
class S3Url:
    """The bucket and key prefix of an ``s3://bucket/prefix`` URL."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Url:
        """Split ``s3://bucket/prefix`` (the prefix may be empty).

        Raises
        ------
        ConfigError
            When the URL is not ``s3://`` or names no bucket.
        """
        if not url.startswith(S3_SCHEME):
            raise ConfigError(f"archive.blobs {url!r} is not an s3://bucket/prefix URL")
        bucket, _, prefix = url[len(S3_SCHEME):].partition("/")
        if not bucket:
            raise ConfigError(f"archive.blobs {url!r} names no bucket (s3://bucket/prefix)")
        return cls(bucket, prefix.strip("/"))

    def key(self, name: str) -> str:
        """The object key of the stream ``name``."""
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def list_prefix(self) -> str:
        """The key prefix under which every stream of this store lies."""
        return f"{self.prefix}/" if self.prefix else ""


class S3BlobStore:
    """Stream blobs as objects ``<prefix>/<sha256>`` in an S3-compatible bucket.

    Parameters
    ----------
    url:
        ``s3://bucket/prefix``; the bucket must exist.
    endpoint:
        The server's URL, e.g. ``http://127.0.0.1:9000`` (path-style addressing); empty:
        AWS's endpoint for the region.
    region:
        The region; empty: boto3's default (``AWS_DEFAULT_REGION`` or its config).
    access_key_id, secret_access_key:
        Credentials; empty: boto3's standard chain (``AWS_ACCESS_KEY_ID`` and
        ``AWS_SECRET_ACCESS_KEY``, the shared credentials file, an instance role).
    connect_timeout, read_timeout, attempts:
        Per request: seconds to connect, seconds to wait for an answer, tries.

    Raises
    ------
    ConfigError
        For a URL without a bucket.
    ArchiveError
        When the client cannot be made (an invalid endpoint URL or region).
    """

    def __init__(self, url: str, *, endpoint: str = "", region: str = "",
                 access_key_id: str = "", secret_access_key: str = "",
                 connect_timeout: float = CONNECT_TIMEOUT_S,
                 read_timeout: float = READ_TIMEOUT_S, attempts: int = ATTEMPTS) -> None:
        self.url = S3Url.parse(url)
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError

        config = BotoConfig(
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            retries={"max_attempts": attempts, "mode": "standard"},
            s3={"addressing_style": "path" if endpoint else "auto"},
        )
        try:
            self._client: Any = boto3.session.Session().client(
                "s3", endpoint_url=endpoint or None, region_name=region or None,
                aws_access_key_id=access_key_id or None,
                aws_secret_access_key=secret_access_key or None, config=config)
        except (BotoCoreError, ValueError) as exc:
            raise ArchiveError(f"cannot open object store {url}: {exc}") from exc

    @property
    def location(self) -> str:
        """The ``s3://bucket/prefix`` URL, for log lines."""
        return f"{S3_SCHEME}{self.url.bucket}/{self.url.prefix}"

    def _call(self, operation: str, name: str, request: Callable[..., Any],
              **arguments: Any) -> Any:
        """Send one request; a failure to get an answer becomes ObjectStoreError.

        A ClientError that means "no such object" is re-raised as is, for the caller.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return request(Bucket=self.url.bucket, **arguments)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                raise
            logger.warning("S3 %s of %s refused: %s", operation, name, exc)
            raise ObjectStoreError(f"S3 {operation} refused: {code or 'error'}") from exc
        except BotoCoreError as exc:
            logger.warning("S3 %s of %s failed: %s", operation, name, exc)
            raise ObjectStoreError(f"S3 {operation} failed: {type(exc).__name__}") from exc

    def _head(self, name: str) -> dict[str, Any] | None:
        """The object's HeadObject answer, or None when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            head: dict[str, Any] = self._call("HeadObject", name, self._client.head_object,
                                              Key=self.url.key(name))
        except ClientError:
            return None
        return head

    @staticmethod
    def _matches(head: dict[str, Any] | None, size: int, md5_hex: str) -> bool:
        """Whether a HeadObject answer shows ``size`` bytes whose ETag is ``md5_hex``."""
        return (head is not None and int(head.get("ContentLength", -1)) == size
                and str(head.get("ETag", "")).strip('"') == md5_hex)

    def put(self, data: bytes, sha256: str | None = None) -> tuple[str, str]:
        """Upload ``data`` as ``<prefix>/<sha256>`` and check what the server stored.

        An existing object of the same size whose ETag is this content's MD5 is reused
        (another node stored the same stream). Otherwise the object is written with
        Content-MD5 and then checked: size and ETag by HeadObject, or, where the ETag is
        not the MD5, the SHA-256 of the object read back.

        Raises
        ------
        ObjectStoreError
            When the server cannot be reached or refuses the upload.
        ArchiveError
            When the stored object does not match what was sent.
        """
        digest = sha256 or hashlib.sha256(data).hexdigest()
        md5 = hashlib.md5(data, usedforsecurity=False)
        if self._matches(self._head(digest), len(data), md5.hexdigest()):
            return digest, digest
        self._call("PutObject", digest, self._client.put_object, Key=self.url.key(digest),
                   Body=data, ContentMD5=base64.b64encode(md5.digest()).decode("ascii"),
                   Metadata={"sha256": digest})
        head = self._head(digest)
        if not self._matches(head, len(data), md5.hexdigest()):
            if head is None or int(head.get("ContentLength", -1)) != len(data):
                raise ArchiveError(f"stream object {digest[:12]} missing or short after upload")
            try:
                self.get(digest, digest)  # an ETag that is not the MD5: read it back
            except StreamHashError as exc:
                raise ArchiveError(
                    f"stream object {digest[:12]} differs from what was uploaded") from exc
        logger.debug("uploaded blob %s (%d bytes) to %s", digest, len(data), self.location)
        return digest, digest

    def present(self, relative_path: str, size: int) -> bool:
        """Whether the object exists with ``size`` bytes (checked under the blob's lock).

        Raises
        ------
        ObjectStoreError
            When the server cannot be reached.
        """
        head = self._head(relative_path)
        return head is not None and int(head.get("ContentLength", -1)) == size

    def get(self, relative_path: str, sha256: str) -> bytes:
        """Read an object and check its SHA-256.

        Raises
        ------
        StreamHashError
            When its content does not match ``sha256``.
        ObjectStoreError
            When the server cannot be reached.
        ArchiveError
            When the object is missing.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._call("GetObject", relative_path, self._client.get_object,
                                Key=self.url.key(relative_path))
            data = bytes(answer["Body"].read())
        except ClientError as exc:
            raise ArchiveError(f"stream object {relative_path} is missing from "
                               f"{self.location}") from exc
        except BotoCoreError as exc:  # the body's read timed out or broke off
            raise ObjectStoreError(f"S3 GetObject failed: {type(exc).__name__}") from exc
        if hashlib.sha256(data).hexdigest() != sha256:
            logger.warning("stream object %s in %s does not match its SHA-256",
                           self.url.key(relative_path), self.location)
            # Short enough for an ErrorComment (64 characters) to keep the point.
            raise StreamHashError(
                f"stream object {relative_path[:16]} does not match its SHA-256")
        return data

    def names(self) -> Iterator[str]:
        """The streams under the prefix (keys ``<prefix>/`` + 64 hex digits only).

        Raises
        ------
        ObjectStoreError
            When the bucket cannot be listed.
        """
        start = self.url.list_prefix
        found: list[str] = []
        token: str | None = None
        while True:
            page = self._call("ListObjectsV2", start, self._client.list_objects_v2,
                              Prefix=start, **({"ContinuationToken": token} if token else {}))
            found.extend(name for name in (str(item["Key"])[len(start):]
                                           for item in page.get("Contents", []))
                         if BLOB_NAME.fullmatch(name))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                break
        yield from found

    def remove(self, relative_path: str) -> bool:
        """Delete an object no row names any longer (the caller holds its lock).

        Only a name of 64 hex digits is ever deleted; a missing object is not an error,
        nor is a failure (logged; the next sweep tries again). Returns whether an object
        was removed.
        """
        if not BLOB_NAME.fullmatch(relative_path):
            logger.warning("not removing %r: not a blob name", relative_path)
            return False
        try:
            if self._head(relative_path) is None:
                return False
            self._call("DeleteObject", relative_path, self._client.delete_object,
                       Key=self.url.key(relative_path))
        except ObjectStoreError as exc:
            logger.warning("could not remove unused blob %s: %s", relative_path, exc)
            return False
        return True

    def remove_temporaries(self) -> int:
        """None to remove: a PutObject is atomic and no multipart upload is ever started."""
        return 0
