"""The exception hierarchy of latentpacs.

Every error carries the DIMSE status it maps to on the network and a short
ErrorComment (PS3.7 Annex C, element (0000,0902), at most 64 characters), so a
handler turns any failure into a conformant response without a lookup table of
its own. This module imports nothing of the project.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """DIMSE status codes used by latentpacs (PS3.7 Annex C, PS3.4 Annexes B and C)."""

    SUCCESS = 0x0000
    #: PS3.7 C.5.25: Refused, not authorized (a general status, valid for every DIMSE-C
    #: service; it carries an Error Comment).
    NOT_AUTHORIZED = 0x0124
    #: PS3.7 C.5.4: Failure, processing failure (an unexpected internal error).
    PROCESSING_FAILURE = 0x0110
    #: PS3.7 C.5.9: Failure, no such SOP Instance.
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    #: PS3.7 C.5: Failure, invalid argument value (DIMSE-N, e.g. an N-ACTION's
    #: Action Information; PS3.7 10.1.4.1.10).
    INVALID_ARGUMENT_VALUE = 0x0115
    #: PS3.7 C.5: Failure, class-instance conflict (also a Failure Reason, PS3.4 J.3.3.1.1).
    CLASS_INSTANCE_CONFLICT = 0x0119
    #: PS3.7 C.5: Failure, no such action (an N-ACTION's Action Type ID).
    NO_SUCH_ACTION = 0x0123
    #: PS3.7 C.5: Failure, resource limitation (DIMSE-N; DIMSE-C's A700 counterpart).
    RESOURCE_LIMITATION = 0x0213
    #: PS3.4 B.2.3: Refused, out of resources.
    OUT_OF_RESOURCES = 0xA700
    #: A900, one code for two services: PS3.4 B.2.3 (C-STORE) Error, data set does not
    #: match SOP Class; PS3.4 C.4.1.1.4 / C.4.2.1.4 / C.4.3.1.4 (C-FIND, C-MOVE, C-GET)
    #: Failure, identifier does not match SOP Class.
    DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: PS3.4 C.4.2.1.4: Refused, move destination unknown.
    MOVE_DESTINATION_UNKNOWN = 0xA801
    #: PS3.4 B.2.3: Error, cannot understand.
    CANNOT_UNDERSTAND = 0xC000
    #: PS3.4 C.4.1.1.4: Failure, unable to process (query).
    UNABLE_TO_PROCESS = 0xC001
    #: PS3.4 B.2.3 (implementation specific range Cxxx): duplicate SOP Instance refused.
    DUPLICATE_REJECTED = 0xC011
    #: PS3.4 B.2.3 (implementation specific range Cxxx): the instance's Study or Series
    #: Instance UID already belongs to another patient or study; nothing was stored.
    IDENTITY_CONFLICT = 0xC012
    #: PS3.7 C.5.2: Cancel.
    CANCEL = 0xFE00
    #: PS3.7 C.5.3: Pending.
    PENDING = 0xFF00
    #: PS3.4 C.4.2.1.4: Warning, sub-operations complete, one or more failures.
    SUB_OPERATIONS_WARNING = 0xB000


class LatentPacsError(Exception):
    """Base class of every latentpacs error.

    Parameters
    ----------
    message:
        A one-line, human-readable explanation naming what is wrong.
    """

    status: Status = Status.CANNOT_UNDERSTAND

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def error_comment(self) -> str:
        """The ErrorComment (0000,0902) for a DIMSE response: LO, at most 64 characters."""
        text = " ".join(self.message.split())
        return text if len(text) <= 64 else text[:61] + "..."


class InvalidDicomError(LatentPacsError):
    """The input is not a readable DICOM object (PS3.10 file or PS3.5 data set)."""

    status = Status.CANNOT_UNDERSTAND


class InvalidUidError(InvalidDicomError):
    """A UID is not digits and dots of at most 64 characters (PS3.5 9.1)."""

    status = Status.CANNOT_UNDERSTAND


class IdentityConflictError(LatentPacsError):
    """A Study or Series Instance UID already belongs to another patient or study (PS3.4 C.6.1)."""

    status = Status.IDENTITY_CONFLICT


class UnsupportedImageError(LatentPacsError):
    """The image is DICOM but of a kind latentpacs does not archive.

    Colour, multi-frame, signed or otherwise unsupported pixel modules (PS3.3 C.7.6.3).
    """

    status = Status.DOES_NOT_MATCH_SOP_CLASS


class PixelDataError(LatentPacsError):
    """Pixel Data is missing, truncated, corrupt or inconsistent with its Image Pixel module."""

    status = Status.CANNOT_UNDERSTAND


class PixelChecksumError(LatentPacsError):
    """Pixels decoded from an archived stream differ from the checksum archived with them.

    At store time nothing is archived; at retrieval the sub-operation fails. Both are the
    archive's own fault, hence a processing failure (PS3.7 C.5.4), not the peer's.
    """

    status = Status.PROCESSING_FAILURE


class ModelError(LatentPacsError):
    """A model file, card or registry entry is missing or unusable."""

    status = Status.OUT_OF_RESOURCES


class ModelHashMismatchError(ModelError):
    """A weights file's SHA-256 differs from the hash its card or a latent names."""


class LatentFormatError(LatentPacsError):
    """Latent bytes or an ``.lpz`` container are malformed or of an unknown version."""

    status = Status.CANNOT_UNDERSTAND


class ConfigError(LatentPacsError):
    """A setting has an invalid value or a configuration file cannot be read."""


class TierError(ConfigError):
    """A fidelity tier name is not ``latent``, ``lossless`` or ``near-lossless:K``."""


class ArchiveError(LatentPacsError):
    """The archive database or blob store failed; nothing was committed."""

    status = Status.OUT_OF_RESOURCES


class ConstraintViolationError(ArchiveError):
    """The instance breaks an archive constraint that a retry cannot fix; nothing was stored.

    A conflict with a concurrent store is retried once; the same violation again (or one
    no concurrency can cause, such as NOT NULL) is this error. PS3.4 B.2.3: Error, Cannot
    understand (Cxxx); the ErrorComment names the constraint.
    """

    status = Status.CANNOT_UNDERSTAND


class StreamHashError(ArchiveError):
    """An archived stream (inline or blob) no longer matches the SHA-256 archived with it."""

    status = Status.PROCESSING_FAILURE


class ObjectStoreError(ArchiveError):
    """The S3-compatible object store was unreachable, timed out or refused a request.

    Nothing was committed (PS3.4 B.2.3: Refused, Out of Resources, A700); the ErrorComment
    names the S3 operation and the failure.
    """

    status = Status.OUT_OF_RESOURCES


class DuplicateInstanceError(LatentPacsError):
    """A re-sent SOP Instance was refused under the ``reject`` duplicate policy."""

    status = Status.DUPLICATE_REJECTED


class InvalidIdentifierError(LatentPacsError):
    """A C-FIND/C-GET/C-MOVE identifier is not valid for its information model (PS3.4 C.4)."""

    status = Status.DOES_NOT_MATCH_SOP_CLASS


class NotFoundError(LatentPacsError):
    """No archived instance has the requested identity."""

    status = Status.NO_SUCH_OBJECT_INSTANCE


class LimitExceededError(LatentPacsError):
    """A request needs more than a configured limit allows (``limits.*``): refused, A700.

    PS3.4 C.4.1.1.4 / C.4.2.1.4 / C.4.3.1.4: Refused, Out of Resources.
    """

    status = Status.OUT_OF_RESOURCES


class NotAuthorizedError(LatentPacsError):
    """The requesting peer may not use this service (``security.*`` settings, PS3.7 C.5.25)."""

    status = Status.NOT_AUTHORIZED


class CommitmentRequestError(LatentPacsError):
    """A Storage Commitment N-ACTION the node cannot act on (PS3.4 J.3.2.1).

    A missing or invalid Transaction UID, Referenced SOP Sequence or item UID: Failure,
    invalid argument value (0115H, PS3.7 10.1.4.1.10); the ErrorComment names it.
    """

    status = Status.INVALID_ARGUMENT_VALUE


class CommitmentLimitError(LatentPacsError):
    """A Storage Commitment request names more instances than ``limits.max_retrieve_instances``.

    Failure, resource limitation (0213H, PS3.7 10.1.4.1.10), before any is checked.
    """

    status = Status.RESOURCE_LIMITATION
