"""Storage commitment: whether the archive holds each instance a requestor asks about.

PS3.4 Annex J (Storage Commitment Push Model): a modality names the instances it sent,
by SOP Class UID and SOP Instance UID, and the archive answers which ones it commits to
keep (J.3.3: Referenced SOP Sequence) and which not, with a Failure Reason (J.3.3.1:
Failed SOP Sequence). This module decides; :mod:`latentpacs.node.commitment` carries the
N-ACTION and N-EVENT-REPORT. No DICOM networking here.

An instance is committed when all of these hold, checked now, not remembered:

- its row is committed: the archive knows the SOP Instance UID *as the sender gave it*
  (the archive's identity of an instance; a lossy tier returns a derived UID, which
  the modality never sent, so it is not looked up);
- its SOP Class UID is the one asked about (else 0119H, Class-Instance conflict);
- its stream is durable and intact: read back from the database row or the blob store
  and its SHA-256 matches the one archived with it (else 0110H, Processing failure).
  This is the decode-free part of ``latentpacs archive verify``: every byte the archive
  would decode from is hashed, no pixel is decoded. An image archived as received with
  its coding pending (``codec.deferred``) is committed: the object as received is the
  stream, durable and checksummed before its C-STORE was answered. At the ``latent``
  tier there is no stream; the latent is in the committed row itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from latentpacs.archive import Archive
from latentpacs.dicomjson import first_value
from latentpacs.errors import ArchiveError, LatentPacsError, NotFoundError, Status

logger = logging.getLogger(__name__)

#: DICOM JSON tag (PS3.18 F.2.1.1) of SOP Class UID (0008,0016).
SOP_CLASS_UID = "00080016"


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) of a Failed SOP Sequence item (PS3.4 J.3.3.1.1)."""

    #: A general failure: the stream is missing, unreadable or fails its checksum, or the
    #: archive could not be read.
    PROCESSING_FAILURE = Status.PROCESSING_FAILURE
    #: The archive holds no instance of this SOP Instance UID.
    NO_SUCH_OBJECT_INSTANCE = Status.NO_SUCH_OBJECT_INSTANCE
    #: The instance is archived under another SOP Class UID.
    CLASS_INSTANCE_CONFLICT = Status.CLASS_INSTANCE_CONFLICT


@dataclass(frozen=True)
class Reference:
    """One instance a requestor asks about (a Referenced SOP Sequence item, PS3.4 J.3.2)."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Failure:
    """An instance the archive does not commit to, why (``reason``), and a log line."""

    reference: Reference
    reason: FailureReason
    detail: str


@dataclass(frozen=True)
class Commitment:
    """The outcome of one request: committed references and failures, in request order."""

    committed: tuple[Reference, ...]
    failed: tuple[Failure, ...]

    @property
    def event_type(self) -> int:
        """Event Type ID of the N-EVENT-REPORT (PS3.4 J.3.3): 1 all succeeded, 2 not all."""
        return 2 if self.failed else 1


def check(archive: Archive, reference: Reference) -> Failure | None:
    """Whether the archive commits to ``reference``: None when it does, else the failure.

    Reads the instance's row and stream and checks the stream's SHA-256
    (:meth:`Archive.load`); a database or blob store error is a processing failure of
    this instance only.
    """
    try:
        instance_id = archive.instance_id(reference.sop_instance_uid)
        if instance_id is None:
            return Failure(reference, FailureReason.NO_SUCH_OBJECT_INSTANCE, "not archived")
        archived = archive.load(instance_id)
    except NotFoundError:  # removed since it was looked up (a replace or a delete)
        return Failure(reference, FailureReason.NO_SUCH_OBJECT_INSTANCE, "no longer archived")
    except ArchiveError as exc:  # StreamHashError included: the stream no longer verifies
        return Failure(reference, FailureReason.PROCESSING_FAILURE, exc.message)
    except LatentPacsError as exc:  # a row that cannot be read back as an image
        return Failure(reference, FailureReason.PROCESSING_FAILURE, exc.message)
    archived_class = first_value(archived.header, SOP_CLASS_UID)
    if archived_class != reference.sop_class_uid:
        return Failure(reference, FailureReason.CLASS_INSTANCE_CONFLICT,
                       f"archived as SOP Class {archived_class}")
    return None


def commitment(archive: Archive, references: Sequence[Reference]) -> Commitment:
    """Check each reference in turn (:func:`check`), one instance in memory at a time."""
    committed: list[Reference] = []
    failed: list[Failure] = []
    for reference in references:
        failure = check(archive, reference)
        if failure is None:
            committed.append(reference)
        else:
            logger.info("not committed: %s (%04XH, %s)", reference.sop_instance_uid,
                        int(failure.reason), failure.detail)
            failed.append(failure)
    return Commitment(tuple(committed), tuple(failed))
