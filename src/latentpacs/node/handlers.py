"""DIMSE service handlers: thin translations between pynetdicom events and :class:`Service`.

Each handler turns a :class:`~latentpacs.errors.LatentPacsError` into the DIMSE status it
names and an ErrorComment (PS3.7 C.4), returns right after yielding a failure, and never
lets an exception reach pynetdicom (which would answer with a bare, comment-less status).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import events as evt

from latentpacs import audit, metrics
from latentpacs.errors import InvalidIdentifierError, LatentPacsError, Status
from latentpacs.node.peers import (
    DimseService,
    MoveDestinations,
    PeerPolicy,
    Requestor,
    refuse_move,
)
from latentpacs.service import Service

logger = logging.getLogger(__name__)

#: Query/Retrieve information models by SOP Class UID (PS3.4 C.6): the root of each.
ROOTS = {
    "1.2.840.10008.5.1.4.1.2.1.1": "PATIENT",  # Patient Root Q/R - FIND
    "1.2.840.10008.5.1.4.1.2.1.2": "PATIENT",  # Patient Root Q/R - MOVE
    "1.2.840.10008.5.1.4.1.2.1.3": "PATIENT",  # Patient Root Q/R - GET
    "1.2.840.10008.5.1.4.1.2.2.1": "STUDY",  # Study Root Q/R - FIND
    "1.2.840.10008.5.1.4.1.2.2.2": "STUDY",  # Study Root Q/R - MOVE
    "1.2.840.10008.5.1.4.1.2.2.3": "STUDY",  # Study Root Q/R - GET
}


def failure(status: int, comment: str) -> Dataset:
    """A status data set with Status and ErrorComment (PS3.7 C.4, (0000,0900)/(0000,0902))."""
    ds = Dataset()
    ds.Status = int(status)
    ds.ErrorComment = " ".join(comment.split())[:64]
    return ds


def _from_error(exc: LatentPacsError) -> Dataset:
    return failure(exc.status, exc.error_comment)


def _audit_refused(event: evt.Event, service: DimseService, refused: Dataset) -> None:
    """Audit a request refused as not authorized (Security Alert, PS3.15 A.5.3.11)."""
    audit.restricted(Requestor.of(event), service.dimse_name, str(refused.get("ErrorComment", "")))


def _peer(event: evt.Event, role: audit.Code | None) -> audit.Participant:
    """The association requestor as an audit participant (calling AE title, IP address)."""
    return audit.peer_participant(Requestor.of(event), role)


def _level_and_root(event: evt.Event) -> tuple[str, str, Dataset]:
    """The Query/Retrieve Level, information model root and identifier of a request."""
    root = ROOTS.get(str(event.request.AffectedSOPClassUID))
    if root is None:
        raise InvalidIdentifierError(
            f"SOP Class {event.request.AffectedSOPClassUID} is not a supported Q/R model"
        )
    try:
        identifier = event.identifier
    except Exception as exc:  # pynetdicom raises on an undecodable identifier
        raise InvalidIdentifierError(f"identifier cannot be decoded: {exc}") from exc
    level = str(identifier.get("QueryRetrieveLevel", "")).strip()
    return level, root, identifier


def handle_echo(event: evt.Event, policy: PeerPolicy) -> int | Dataset:
    """C-ECHO (PS3.4 A.4): Success, for a peer that may echo (0124H otherwise)."""
    refused = policy.refusal(event, DimseService.ECHO)
    if refused is not None:
        _audit_refused(event, DimseService.ECHO, refused)
        return refused
    return int(Status.SUCCESS)


def handle_store(event: evt.Event, service: Service, policy: PeerPolicy) -> int | Dataset:
    """C-STORE SCP (PS3.4 B.2.2): Success only after the archive committed the instance.

    A peer that may not store is refused with 0124H before its data set is read.
    """
    metrics.received("C-STORE", metrics.store_received_bytes(event))
    refused = policy.refusal(event, DimseService.STORE)
    if refused is not None:
        _audit_refused(event, DimseService.STORE, refused)
        return refused
    try:
        ds = event.dataset
        ds.file_meta = event.file_meta
    except Exception as exc:  # an undecodable data set from the peer
        logger.warning("C-STORE from %s: data set cannot be decoded: %s", event.assoc.requestor.ae_title, exc)
        return failure(Status.CANNOT_UNDERSTAND, f"data set cannot be decoded: {exc}")
    requested_class = str(event.request.AffectedSOPClassUID)
    if str(ds.get("SOPClassUID", "")) != requested_class:
        return failure(
            Status.DOES_NOT_MATCH_SOP_CLASS,
            f"SOP Class UID {ds.get('SOPClassUID', '(none)')} differs from the request's",
        )
    affected = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "").strip()
    if affected != str(ds.get("SOPInstanceUID", "")).strip():
        return failure(
            Status.CANNOT_UNDERSTAND,
            "Affected SOP Instance UID differs from the data set's SOP Instance UID",
        )
    try:
        result = service.store(ds, received=_received_file(event))
    except LatentPacsError as exc:
        logger.warning("C-STORE refused: %s", exc.message)
        audit.stored(_peer(event, audit.SOURCE), ds, "stored", audit.MINOR_FAILURE, exc.message)
        return _from_error(exc)
    except Exception as exc:
        logger.exception("C-STORE failed")
        audit.stored(_peer(event, audit.SOURCE), ds, "stored", audit.SERIOUS_FAILURE,
                     f"internal error: {exc.__class__.__name__}")
        return failure(Status.PROCESSING_FAILURE, f"internal error: {exc.__class__.__name__}")
    audit.stored(_peer(event, audit.SOURCE), ds, str(result))
    return int(Status.SUCCESS)


def _received_file(event: evt.Event) -> Path | None:
    """The PS3.10 file pynetdicom received the data set into (chunked receive), if any."""
    try:
        return Path(event.dataset_path)
    except (AttributeError, TypeError):
        return None


def handle_find(
    event: evt.Event, service: Service, policy: PeerPolicy
) -> Iterator[tuple[Any, Dataset | None]]:
    """C-FIND SCP (PS3.4 C.4.1.3): one Pending answer per matching entity, then Success.

    A peer that may not query is refused with 0124H before anything is matched.

    The answers beyond ``limits.max_find_answers`` are replaced by one A700 failure with
    an ErrorComment, after the answers already sent. Retrieve AE Title, when asked, is
    this node's AE title.
    """
    refused = policy.refusal(event, DimseService.FIND)
    if refused is not None:
        _audit_refused(event, DimseService.FIND, refused)
        yield refused, None
        return
    try:
        level, root, identifier = _level_and_root(event)
        audit.query(_peer(event, audit.SOURCE), str(event.request.AffectedSOPClassUID),
                    _encoded_identifier(event), str(event.context.transfer_syntax), identifier)
        answers = service.find(level, identifier, root=root, retrieve_aet=str(event.assoc.ae.ae_title))
        for answer in answers:
            if event.is_cancelled:
                yield Status.CANCEL, None
                return
            yield Status.PENDING, answer
    except LatentPacsError as exc:
        logger.warning("C-FIND refused: %s", exc.message)
        yield _from_error(exc), None
        return
    except Exception as exc:
        logger.exception("C-FIND failed")
        yield failure(Status.UNABLE_TO_PROCESS, f"internal error: {exc.__class__.__name__}"), None
        return
    yield Status.SUCCESS, None


#: What a handler yields in place of a data set for a sub-operation that failed before its
#: C-STORE: pynetdicom counts a Pending result whose data set is not a Dataset as one failed
#: sub-operation and goes on with the next (PS3.4 C.4.2.3.1, C.4.3.3.1).
SUB_OPERATION_FAILED = "sub-operation failed"


def _encoded_identifier(event: evt.Event) -> bytes:
    """The C-FIND identifier as the peer encoded it (for the audit's ParticipantObjectQuery)."""
    request: Any = event.request
    try:
        return bytes(request.Identifier.getvalue())
    except (AttributeError, TypeError):
        return b""


def _send(
    event: evt.Event, service: Service, matches: list[int], sendable: frozenset[tuple[str, str]],
    transfer: audit.Transfer | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Yield each matched instance as a Pending sub-operation (PS3.4 C.4.2.3/C.4.3.3).

    Each instance is loaded and decoded on a worker thread while the previous one is
    being sent. An instance that cannot be loaded or decoded fails its sub-operation only:
    a Pending response carrying its ErrorComment, counted as failed, and the others are
    still sent; the final response is then Warning B000 (or A702 when every one failed)
    with the failed count. pynetdicom 3.0.4 lists such a sub-operation in Failed SOP
    Instance UID List as an empty value (its UID was never known to it) and keeps the
    last ErrorComment on the responses that follow; the node logs the archive row.
    """
    with closing(service.returned_ahead(matches, sendable=sendable)) as decoded:
        for match, future in decoded:
            if event.is_cancelled:
                yield Status.CANCEL, None
                return
            try:
                ds = future.result()
            except LatentPacsError as exc:
                logger.warning("sub-operation for archive row %s failed: %s", match, exc.message)
                yield failure(Status.PENDING, exc.error_comment), SUB_OPERATION_FAILED
                continue
            except Exception as exc:
                logger.exception("sub-operation for archive row %s failed", match)
                yield (failure(Status.PENDING, f"internal error: {exc.__class__.__name__}"),
                       SUB_OPERATION_FAILED)
                continue
            if transfer is not None:
                transfer.add(ds)
            yield Status.PENDING, ds


def _accepted_for_get(event: evt.Event) -> frozenset[tuple[str, str]]:
    """(SOP Class, Transfer Syntax) pairs a C-GET requestor accepted for our C-STOREs.

    C-GET sub-operations go back on the same association (PS3.4 C.4.3.3), so the contexts
    the requestor accepted with us as Storage SCU say which transfer syntaxes it takes.
    """
    return frozenset(
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        for cx in event.assoc.accepted_contexts
        if cx.as_scu and cx.transfer_syntax
    )


def _retrieve(event: evt.Event, service: Service, service_name: str,
              sendable: Callable[[], frozenset[tuple[str, str]]],
              destination: audit.Participant | None = None) -> Iterator[Any]:
    """The sub-operation count, then one C-STORE per matched instance (C-GET and C-MOVE).

    ``sendable`` is asked after the count: pynetdicom opens a C-MOVE's sub-association
    between the two, and its accepted contexts say what may be sent.

    A refused identifier is answered with its failure status and ErrorComment. pynetdicom
    answers a sub-operation count of 0 with Success at once, so the refusal is announced
    as one sub-operation that then fails (PS3.4 C.4.2.3.1 lets a failure response carry
    the failed count).
    """
    try:
        level, root, identifier = _level_and_root(event)
        matches = service.matches(level, identifier, root=root)
    except LatentPacsError as exc:
        logger.warning("%s refused: %s", service_name, exc.message)
        yield 1
        yield _from_error(exc), None
        return
    # Audit (PS3.15 A.5.3.3, A.5.3.4): the start, then what was handed to the sub-operations.
    requestor = _peer(event, None)
    audit.begin_transfer(requestor, destination, identifier)
    transfer = audit.Transfer()
    try:
        yield len(matches)
        yield from _send(event, service, matches, sendable(), transfer)
    finally:
        audit.transferred(requestor, destination, transfer,
                          audit.SUCCESS if transfer.count == len(matches) else audit.MINOR_FAILURE,
                          f"{service_name}: {transfer.count} of {len(matches)} instance(s) sent")


def handle_get(event: evt.Event, service: Service, policy: PeerPolicy) -> Iterator[Any]:
    """C-GET SCP (PS3.4 C.4.3.3): the sub-operation count, then one C-STORE per instance.

    A peer that may not retrieve is refused with 0124H before anything is matched, as one
    announced sub-operation that fails (pynetdicom answers a count of 0 with Success); no
    C-STORE is sent.
    """
    refused = policy.refusal(event, DimseService.GET)
    if refused is not None:
        _audit_refused(event, DimseService.GET, refused)
        yield 1
        yield refused, None
        return
    yield from _retrieve(event, service, "C-GET", lambda: _accepted_for_get(event),
                         _peer(event, audit.DESTINATION))


class SubAssociation:
    """The C-MOVE sub-association pynetdicom opens for one request (PS3.4 C.4.2.3).

    ``handler`` goes into the destination's ``evt_handlers``; once the association is
    accepted, :meth:`sendable` gives the (SOP Class, Transfer Syntax) pairs its
    destination accepted, as :func:`_accepted_for_get` does for a C-GET.
    """

    def __init__(self) -> None:
        self._association: Any = None
        self.handler = (evt.EVT_ACCEPTED, self._accepted)

    def _accepted(self, event: evt.Event) -> None:
        self._association = event.assoc

    def sendable(self) -> frozenset[tuple[str, str]]:
        """What the destination accepted; empty (native) when nothing was recorded."""
        if self._association is None:
            return frozenset()
        return frozenset(
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in self._association.accepted_contexts if cx.transfer_syntax
        )


def handle_move(
    event: evt.Event, service: Service, destinations: MoveDestinations, policy: PeerPolicy
) -> Iterator[Any]:
    """C-MOVE SCP (PS3.4 C.4.2.3): only to configured destinations, then one C-STORE per instance.

    A peer that may not retrieve is refused with 0124H before the destination is looked
    up: no sub-association is opened. A destination marked ``tls = true`` is reached over
    DICOM TLS.
    """
    refused = policy.refusal(event, DimseService.MOVE)
    if refused is not None:
        _audit_refused(event, DimseService.MOVE, refused)
        yield refuse_move(event, refused)
        return
    sub_association = SubAssociation()
    address = destinations.address(str(event.move_destination), [sub_association.handler])
    if address is None:
        logger.warning("C-MOVE to unknown destination %r refused", event.move_destination)
        yield None, None  # pynetdicom answers Move Destination Unknown (0xA801)
        return
    yield address
    # pynetdicom has now opened the sub-association: the contexts its destination accepted
    # decide, per instance, whether the archived stream goes as it is or pixels go native.
    destination = audit.Participant(str(event.move_destination).strip(), False, audit.DESTINATION,
                                    f"AETITLES={str(event.move_destination).strip()}", "",
                                    str(address[0]))
    yield from _retrieve(event, service, "C-MOVE", sub_association.sendable, destination)
