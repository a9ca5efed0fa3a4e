"""Storage Commitment Push Model SCP (PS3.4 Annex J): N-ACTION in, N-EVENT-REPORT out.

A modality asks with an N-ACTION (Action Type ID 1, Request Storage Commitment, J.3.2)
on the well-known SOP Instance 1.2.840.10008.1.20.1.1, naming a Transaction UID and the
instances it sent (Referenced SOP Sequence). The node checks the request, answers the
N-ACTION Success at once, and only then checks each instance
(:func:`latentpacs.commitment.commitment`) and sends the outcome as an N-EVENT-REPORT
(J.3.3): Event Type 1 when every instance is committed, 2 when any is not, with the
committed ones in Referenced SOP Sequence and the others in Failed SOP Sequence, each
with its Failure Reason.

Where the report goes (J.3.3, PS3.7 10.3): on the same association while the requestor
keeps it open; once it has released (or if the report cannot be sent on it), on a new
association to the requestor's AE title as configured in ``[destinations.AET]`` (the
table C-MOVE uses), the node proposing the SCP role of the SOP class with SCP/SCU Role
Selection (PS3.7 D.3.3.4). A requestor that is not configured there and has released
gets no report (logged at WARNING); it asks again, as J.3.2 lets it.

Who may ask: a peer that may store (``store`` in the peer policy, node/peers.py): a
modality that may send may ask whether what it sent was kept.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom import events as evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_ACTION, N_EVENT_REPORT
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE

from latentpacs.commitment import Commitment, Reference, commitment
from latentpacs.errors import (
    CommitmentLimitError,
    CommitmentRequestError,
    InvalidUidError,
    LatentPacsError,
    NotAuthorizedError,
    Status,
)
from latentpacs.node.peers import DimseService, MoveDestinations, PeerPolicy, Requestor
from latentpacs.service import Service
from latentpacs.uid import check_uid

logger = logging.getLogger(__name__)

#: Storage Commitment Push Model SOP Class (PS3.4 J.3).
STORAGE_COMMITMENT = UID("1.2.840.10008.1.20.1")
#: Its well-known SOP Instance (PS3.4 J.3.2.1.1, J.3.3.1.1).
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")
#: Action Type ID "Request Storage Commitment" (PS3.4 J.3.2.1.1).
REQUEST_STORAGE_COMMITMENT = 1
#: Transfer syntaxes of the context the node proposes for a report on a new association.
REPORT_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: How long a report waits for the requestor's association to be between messages.
PAUSE_WAIT_S = 10.0

#: Message IDs of the N-EVENT-REPORT requests this process sends (PS3.7 9.3.1.1).
_message_ids = itertools.count(1)


@dataclass(frozen=True)
class CommitmentRequest:
    """A valid N-ACTION Request Storage Commitment: its Transaction UID and references."""

    transaction_uid: str
    references: tuple[Reference, ...]


def parse_request(information: Dataset | None, limit: int) -> CommitmentRequest:
    """The request an N-ACTION's Action Information holds (PS3.4 J.3.2.1.1, Table J.3-1).

    Raises
    ------
    CommitmentRequestError
        No Action Information, no valid Transaction UID (0008,1195), no or an empty
        Referenced SOP Sequence (0008,1199), or an item without valid Referenced SOP
        Class / Instance UIDs (0115H, the ErrorComment names it).
    CommitmentLimitError
        More than ``limit`` items (0213H), before any item is read.
    """
    if information is None:
        raise CommitmentRequestError("the N-ACTION has no Action Information")
    try:
        transaction_uid = check_uid(information.get("TransactionUID"), "Transaction UID")
        items = information.get("ReferencedSOPSequence")
        if not items:
            raise CommitmentRequestError("Referenced SOP Sequence (0008,1199) is missing or empty")
        if len(items) > limit:
            raise CommitmentLimitError(
                f"{len(items)} instances named; at most {limit} per request")
        references = tuple(
            Reference(check_uid(item.get("ReferencedSOPClassUID"), f"item {number} SOP Class UID"),
                      check_uid(item.get("ReferencedSOPInstanceUID"),
                                f"item {number} SOP Instance UID"))
            for number, item in enumerate(items, start=1))
    except InvalidUidError as exc:
        raise CommitmentRequestError(exc.message) from exc
    except LatentPacsError:
        raise
    except Exception as exc:  # pydicom decodes lazily: any malformed element raises here
        raise CommitmentRequestError(f"Action Information cannot be decoded: {exc}") from exc
    return CommitmentRequest(transaction_uid, references)


def event_information(transaction_uid: str, outcome: Commitment, retrieve_aet: str) -> Dataset:
    """The N-EVENT-REPORT's Event Information (PS3.4 J.3.3.1.1, Tables J.3-2 and J.3-3).

    Referenced SOP Sequence is present when an instance is committed (required for
    Event Type 1), Failed SOP Sequence when one is not, each item with its Failure
    Reason (0008,1197). Retrieve AE Title (0008,0054) names the node.
    """
    info = Dataset()
    info.TransactionUID = transaction_uid
    info.RetrieveAETitle = retrieve_aet
    if outcome.committed:
        info.ReferencedSOPSequence = DicomSequence([
            _item(reference.sop_class_uid, reference.sop_instance_uid)
            for reference in outcome.committed])
    if outcome.failed:
        failed = []
        for failure in outcome.failed:
            item = _item(failure.reference.sop_class_uid, failure.reference.sop_instance_uid)
            item.FailureReason = int(failure.reason)
            failed.append(item)
        info.FailedSOPSequence = DicomSequence(failed)
    return info


def _item(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def _status(status: int, comment: str) -> Dataset:
    """An N-ACTION failure status with its ErrorComment (PS3.7 10.1.4.1.10, C.4)."""
    ds = Dataset()
    ds.Status = int(status)
    ds.ErrorComment = " ".join(comment.split())[:64]
    return ds


class Reporter:
    """Sends N-EVENT-REPORTs on an association of their own (PS3.4 J.3.3, PS3.7 10.3).

    Parameters
    ----------
    ae_title:
        The node's AE title (the calling AE title of the new association).
    destinations:
        Where each requestor AE title is reached (``[destinations.AET]``, TLS included).
    acse_timeout, dimse_timeout, network_timeout:
        As the node's own (``node.*``), in seconds.
    """

    def __init__(self, ae_title: str, destinations: MoveDestinations, *, acse_timeout: float,
                 dimse_timeout: float, network_timeout: float) -> None:
        self.destinations = destinations
        self.ae = AE(ae_title=ae_title)
        self.ae.add_requested_context(STORAGE_COMMITMENT, REPORT_TRANSFER_SYNTAXES)
        self.ae.acse_timeout = acse_timeout
        self.ae.dimse_timeout = dimse_timeout
        self.ae.network_timeout = network_timeout

    def send(self, requestor_aet: str, event_type: int, info: Dataset) -> bool:
        """Associate with ``requestor_aet`` and send one report; whether it was answered Success.

        The node proposes only the SCP role for the SOP class (SCP/SCU Role Selection,
        PS3.7 D.3.3.4: SCU role false, SCP role true), as PS3.4 J.3.3 asks of an SCP
        that sends the report on an association it opens.
        """
        address = self.destinations.address(requestor_aet)
        if address is None:
            logger.warning("storage commitment report for %s dropped: the association ended "
                           "and [destinations.%s] is not configured", requestor_aet,
                           requestor_aet.strip() or "AET")
            return False
        host, port = address[0], address[1]
        kwargs: dict[str, Any] = dict(address[2]) if len(address) > 2 else {}  # type: ignore[misc]
        assoc = self.ae.associate(
            host, port, ae_title=requestor_aet.strip(),
            ext_neg=[build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)], **kwargs)
        if not assoc.is_established:
            logger.warning("storage commitment report: %s at %s:%d did not accept an association",
                           requestor_aet, host, port)
            return False
        try:
            return _send_report(assoc, event_type, info)
        finally:
            if assoc.is_established:
                assoc.release()


def _send_report(assoc: Association, event_type: int, info: Dataset) -> bool:
    """Send the N-EVENT-REPORT-RQ on an association the node requested; whether answered Success."""
    status, _reply = assoc.send_n_event_report(
        info, event_type, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE,
        msg_id=_message_id())
    code = status.get("Status")
    if code is None:
        logger.warning("storage commitment report: no answer from %s", assoc.acceptor.ae_title)
        return False
    if int(code) != Status.SUCCESS:
        logger.warning("storage commitment report answered %04XH by %s", int(code),
                       assoc.acceptor.ae_title)
        return False
    return True


def _message_id() -> int:
    """The next Message ID (PS3.7 E.1: US, 1 to 65535)."""
    return next(_message_ids) % 0xFFFF + 1


def _peer_ending(assoc: Association) -> bool:
    """Whether the requestor has asked to release or aborted (looked at, not taken)."""
    primitive = assoc.dul.peek_next_pdu()
    return (isinstance(primitive, (A_ABORT, A_P_ABORT))
            or (isinstance(primitive, A_RELEASE) and primitive.result is None)
            or not assoc.dul.is_alive())


def report_on_same(assoc: Association, event_type: int, info: Dataset, wait_s: float) -> bool:
    """Send the report on the requestor's own association; whether it answered Success.

    pynetdicom's ``send_n_event_report`` pauses the acceptor's reactor and then waits the
    whole DIMSE timeout for the answer, even when the requestor has meanwhile asked to
    release (a modality commonly releases right after the N-ACTION response) or when
    the reactor has already ended. This pauses the reactor the same way (its checkpoint,
    between two messages), but gives up at once when the association is ending: before
    sending (the reactor then answers the release) and while waiting for the answer.
    Messages other than the answer that arrive meanwhile are left for the reactor.
    """
    context = next((cx for cx in assoc.accepted_contexts
                    if cx.abstract_syntax == STORAGE_COMMITMENT), None)
    if context is None or context.context_id is None:
        return False
    syntax = context.transfer_syntax[0]
    encoded = encode(info, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    if encoded is None:
        logger.error("storage commitment report cannot be encoded in %s", syntax.name)
        return False
    checkpoint: threading.Event = getattr(assoc, "_reactor_checkpoint")
    checkpoint.clear()
    held: list[tuple[Any, Any]] = []
    try:
        deadline = time.monotonic() + PAUSE_WAIT_S
        while not getattr(assoc, "_is_paused"):
            if not assoc.is_established or time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        if not assoc.is_established or _peer_ending(assoc):
            return False
        request = N_EVENT_REPORT()
        request.MessageID = _message_id()
        request.AffectedSOPClassUID = STORAGE_COMMITMENT
        request.AffectedSOPInstanceUID = STORAGE_COMMITMENT_INSTANCE
        request.EventTypeID = event_type
        request.EventInformation = BytesIO(encoded)
        assoc.dimse.send_msg(request, context.context_id)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                context_id, message = assoc.dimse.msg_queue.get(timeout=0.05)
            except queue.Empty:
                if _peer_ending(assoc):
                    return False
                continue
            if message is None:  # the connection closed or the peer aborted
                held.append((context_id, message))
                return False
            if (isinstance(message, N_EVENT_REPORT)
                    and message.MessageIDBeingRespondedTo == request.MessageID):
                code = int(message.Status if message.Status is not None else -1)
                if code != Status.SUCCESS:
                    logger.warning("storage commitment report answered %04XH on the same "
                                   "association", code & 0xFFFF)
                return code == Status.SUCCESS
            held.append((context_id, message))  # a new request: the reactor serves it
        logger.warning("storage commitment report: no answer within %.0f s", wait_s)
        return False
    finally:
        for item in held:
            assoc.dimse.msg_queue.put(item)
        checkpoint.set()


@dataclass(frozen=True)
class CommitmentSCP:
    """What the N-ACTION handler needs: the service, the peer policy and the reporter."""

    service: Service
    policy: PeerPolicy
    reporter: Reporter
    retrieve_aet: str

    def report(self, assoc: Association, requestor_aet: str, request: CommitmentRequest) -> None:
        """Check the request's instances and send the N-EVENT-REPORT (run in its own thread).

        On ``assoc`` while it is established, else (or when that fails) on a new one.
        """
        try:
            outcome = commitment(self.service.archive, request.references)
        except Exception:  # never let the thread die silently: the requestor asks again
            logger.exception("storage commitment check of transaction %s failed",
                             request.transaction_uid)
            return
        info = event_information(request.transaction_uid, outcome, self.retrieve_aet)
        event_type = outcome.event_type
        logger.info("storage commitment %s: %d committed, %d failed", request.transaction_uid,
                    len(outcome.committed), len(outcome.failed))
        try:
            if report_on_same(assoc, event_type, info, self.reporter.ae.dimse_timeout or 60.0):
                return
            logger.info("storage commitment report %s: on a new association",
                        request.transaction_uid)
            self.reporter.send(requestor_aet, event_type, info)
        except Exception:
            logger.exception("storage commitment report of transaction %s not sent",
                             request.transaction_uid)


def _after_response(event: evt.Event, message_id: int, then: Callable[[], None]) -> None:
    """Run ``then`` in a new thread once the N-ACTION-RSP to ``message_id`` is queued.

    PS3.4 J.3.3: the N-EVENT-REPORT follows the N-ACTION response. pynetdicom sends the
    response after the handler returns, so the handler wraps the DIMSE provider's
    ``send_msg`` for that one message (as :func:`latentpacs.node.peers.refuse_move`
    does): once the response's PDUs are queued, the report thread starts; a response
    other than Success (pynetdicom failed to encode it) starts nothing.
    """
    dimse = event.assoc.dimse
    send_msg = dimse.send_msg

    def send_then_report(primitive: Any, context_id: int) -> None:
        send_msg(primitive, context_id)
        if isinstance(primitive, N_ACTION) and primitive.MessageIDBeingRespondedTo == message_id:
            setattr(dimse, "send_msg", send_msg)
            if primitive.Status == Status.SUCCESS:
                threading.Thread(target=then, name="latentpacs-commitment", daemon=True).start()

    setattr(dimse, "send_msg", send_then_report)


def handle_n_action(event: evt.Event, scp: CommitmentSCP) -> tuple[Dataset | int, None]:
    """EVT_N_ACTION: a Request Storage Commitment (PS3.4 J.3.2), answered at once.

    Statuses (PS3.7 10.1.4.1.10): 0000 Success (the report follows); 0124 not
    authorized (the requestor may not store); 0123 no such action (Action Type ID not
    1); 0112 no such SOP Instance (not the well-known instance); 0115 invalid argument
    value (Transaction UID or references missing or invalid); 0213 resource limitation
    (more than ``limits.max_retrieve_instances`` references). Each failure has an
    ErrorComment.
    """
    requestor = Requestor.of(event)
    aet = requestor.ae_title.strip() or "(empty)"
    if DimseService.STORE not in scp.policy.allowed(requestor):
        refused = NotAuthorizedError(f"calling AE title {aet} may not ask storage commitment")
        logger.warning("N-ACTION storage commitment from %s (%s) refused: not authorized", aet,
                       requestor.address)
        return _status(refused.status, refused.error_comment), None
    request = event.request
    if not isinstance(request, N_ACTION):  # EVT_N_ACTION carries an N-ACTION: never taken
        return _status(Status.PROCESSING_FAILURE, "not an N-ACTION request"), None
    if request.ActionTypeID != REQUEST_STORAGE_COMMITMENT:
        return _status(Status.NO_SUCH_ACTION,
                       f"Action Type ID {request.ActionTypeID} is not 1 (J.3.2)"), None
    if str(request.RequestedSOPInstanceUID) != STORAGE_COMMITMENT_INSTANCE:
        return _status(Status.NO_SUCH_OBJECT_INSTANCE,
                       f"SOP Instance must be {STORAGE_COMMITMENT_INSTANCE}"), None
    try:
        information = (event.action_information if request.ActionInformation is not None
                       else None)
        parsed = parse_request(information, scp.service.limits.max_retrieve_instances)
    except LatentPacsError as exc:
        logger.warning("N-ACTION storage commitment from %s refused: %s", aet, exc.message)
        return _status(exc.status, exc.error_comment), None
    logger.info("storage commitment %s asked by %s for %d instance(s)", parsed.transaction_uid,
                aet, len(parsed.references))
    assoc = event.assoc
    _after_response(event, int(request.MessageID or 0),
                    lambda: scp.report(assoc, requestor.ae_title, parsed))
    return Status.SUCCESS, None
