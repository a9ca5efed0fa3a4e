"""The DIMSE sending path: a message's P-DATA-TF PDUs encoded in one pass, written in runs.

pynetdicom 3.0.4 sends a DIMSE message (PS3.7 6.3.1) one PDU at a time:
``DIMSEServiceProvider.send_msg`` fragments it with ``DIMSEMessage.encode_msg`` into one
P-DATA request primitive per PDV, each goes through the DUL's provider queue to its
reactor thread, the state machine (Evt9, DT-1, PS3.8 9.2) and ``P_DATA_TF.encode``, and is
written by its own ``socket.send``: about 100 us of Python per PDU, 540 PDUs for an
8.8 MB mammogram at a peer's 16 KiB maximum PDU length.

:func:`install` replaces that, per association (instance attributes, never pynetdicom's
module globals), with:

- ``assoc.dimse.send_msg``: builds the DIMSE message as pynetdicom does, triggers
  ``EVT_DIMSE_SENT`` once per message as before, and encodes every PDU of the message in
  one pass (:func:`encode_runs`): the same fragmentation, one PDV per PDU, and the same
  bytes as ``P_DATA_TF(p).encode() for p in msg.encode_msg(context_id, max_pdu)``. Each
  PDU's variable field stays within the peer's Maximum Length (PS3.8 D.1; 0 means
  unlimited). Complete PDUs are joined into runs of about :data:`RUN_BYTES`; each run is
  one P-DATA request primitive (:class:`RunPrimitive`) on the provider queue, so the
  state machine still sees Evt9 and takes DT-1 (Sta6) or AR-7 (Sta8) for each, and
  A-RELEASE and A-ABORT requests queued behind it keep their order. At most
  :data:`WINDOW_RUNS` runs wait in the queue: memory stays bounded by the message's own
  data set plus a few MiB.
- ``assoc.dul._send``: a wrapper that writes a run's bytes with ``AssociationSocket.send``
  (a memoryview, so a partial write copies nothing; over TLS the ssl socket does the
  records). A failed write is Evt17, as for any PDU; every other PDU goes to
  pynetdicom's own ``_send``.

What changes for event handlers: ``EVT_PDU_SENT`` is not triggered for the P-DATA-TF
PDUs of this path (nor logged by pynetdicom's standard handler), and ``EVT_DATA_SENT``
and ``EVT_FSM_TRANSITION`` fire once per run instead of once per PDU (``EVT_DATA_SENT``'s
``data`` is then a memoryview of the run). ``EVT_DIMSE_SENT`` fires once per message, as
before. A message whose data set is a file (``_data_set_path``), or a maximum PDU length
pynetdicom refuses (1 to 6), goes through pynetdicom's own path unchanged.

The reactor reads received PDUs (A-ABORT, C-CANCEL, A-RELEASE-RQ) only when its provider
queue is empty (``run_reactor`` tries ``_process_recv_primitive`` first), with either
path: between messages, or whenever the sender falls behind. A C-CANCEL is therefore seen
before the next C-STORE sub-operation (PS3.4 C.4.3.3), as before; a peer that closes its
socket mid-message fails the next write (Evt17, A-P-ABORT indication).

What this depends on in pynetdicom (``tests/test_node_pdata.py`` fails when any changes):
``DT_1``/``AR_7`` call ``dul._send(P_DATA_TF(primitive))`` looked up on the instance,
``P_DATA_TF.from_primitive`` keeps each PDV's value object as given,
``dimse._RQ_TO_MESSAGE``/``_RSP_TO_MESSAGE`` and ``DIMSEMessage.primitive_to_message``,
``encode_msg``'s fragmentation, and ``AssociationSocket.send`` writing any bytes-like
object.
"""

from __future__ import annotations

import logging
import struct
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dsutils import encode
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from latentpacs import metrics

logger = logging.getLogger(__name__)

#: Bytes of complete PDUs per write (a run is one P-DATA request on the provider queue).
RUN_BYTES = 1 << 20
#: Runs a message may have waiting in the provider queue before its sender waits.
WINDOW_RUNS = 4
#: Seconds between checks, while waiting for room in the window, that the DUL still runs.
_POLL_S = 0.05

#: P-DATA-TF PDU type, and the PDU header with one PDV item (PS3.8 9.3.5, Table 9-22, 9-23):
#: type, reserved, PDU length, item length, presentation context ID, message control header.
_P_DATA_TF = 0x04
_HEADER = struct.Struct(">BBIIBB")
#: Message control header (PS3.8 E.2): bit 0 command, bit 1 last fragment.
_DATA, _COMMAND, _LAST = 0x00, 0x01, 0x02

#: States in which a P-DATA request (Evt9) is sent: Sta6 (DT-1) and Sta8 (AR-7).
_DATA_STATES = frozenset(state for event, state in TRANSITION_TABLE if event == "Evt9")


class Run:
    """Complete, encoded P-DATA-TF PDUs: what one write sends.

    It stands where a PDV's bytes would be in a :class:`RunPrimitive`, so the
    ``P_DATA_TF`` that pynetdicom's DT-1 builds carries it to the wrapped ``_send``.
    """

    __slots__ = ("data", "pdus")

    def __init__(self, data: bytes, pdus: int) -> None:
        self.data = data
        self.pdus = pdus


class RunPrimitive(P_DATA):
    """A P-DATA request primitive (PS3.8 7.6) whose PDUs are already encoded in ``run``."""

    def __init__(self, context_id: int, run: Run) -> None:
        super().__init__()
        self._presentation_data_value_list = [(context_id, run)]  # type: ignore[list-item]


def _fragments(payload: bytes | memoryview, max_pdu: int) -> Iterator[bytes | memoryview]:
    """``payload`` cut as ``DIMSEMessage._generate_pdv_fragments`` does (PS3.8 D.1)."""
    if max_pdu == 0:
        yield payload
        return
    step = max_pdu - 6  # item length (4), context ID (1), message control header (1)
    for offset in range(0, len(payload), step):
        yield payload[offset:offset + step]


class _Runs:
    """Joins PDUs into runs of at least ``run_bytes`` (the last one may be shorter)."""

    def __init__(self, context_id: int, run_bytes: int) -> None:
        self.context_id = context_id
        self.run_bytes = run_bytes
        self.parts: list[bytes | memoryview] = []
        self.size = 0

    def add(self, payload: bytes | memoryview, kind: int, max_pdu: int) -> Iterator[Run]:
        """The runs completed by the PDUs of one command set or data set."""
        pieces = list(_fragments(payload, max_pdu))
        for index, piece in enumerate(pieces):
            flags = kind | (_LAST if index == len(pieces) - 1 else 0)
            length = len(piece)
            self.parts.append(_HEADER.pack(_P_DATA_TF, 0, length + 6, length + 2,
                                           self.context_id, flags))
            self.parts.append(piece)
            self.size += length + 12
            if self.size >= self.run_bytes:
                yield self.flush()

    def flush(self) -> Run:
        run = Run(b"".join(self.parts), len(self.parts) // 2)
        self.parts.clear()
        self.size = 0
        return run


def encodable(dimse_msg: DIMSEMessage, max_pdu: int) -> bool:
    """Whether :func:`encode_runs` sends this message (else pynetdicom's own path does)."""
    data_set = dimse_msg.data_set
    return ((data_set is None or isinstance(data_set, BytesIO))
            and getattr(dimse_msg, "_data_set_path", None) is None
            and (max_pdu == 0 or max_pdu >= 7))


def encode_runs(dimse_msg: DIMSEMessage, context_id: int, max_pdu: int,
                run_bytes: int = RUN_BYTES) -> Iterator[Run]:
    """The message's P-DATA-TF PDUs (PS3.8 9.3.5), joined into runs of about ``run_bytes``.

    The bytes are those pynetdicom sends for ``dimse_msg.encode_msg(context_id, max_pdu)``:
    the command set in Implicit VR Little Endian (PS3.7 6.3.1), then the data set if it is
    not empty, each cut into fragments of ``max_pdu - 6`` bytes (one PDV per PDU), with
    the message control header of PS3.8 E.2. A run always ends on a PDU boundary.
    Only for a message :func:`encodable` accepts.
    """
    runs = _Runs(context_id, run_bytes)
    command = encode(dimse_msg.command_set, True, True)
    if command is None:
        raise ValueError("the command set could not be encoded")
    yield from runs.add(command, _COMMAND, max_pdu)
    data_set = dimse_msg.data_set
    if data_set is not None:
        with data_set.getbuffer() as view:  # no copy of the data set
            if view.nbytes:  # an empty data set is not sent
                yield from runs.add(view, _DATA, max_pdu)
                if runs.parts:  # slices of ``view`` are joined before it is released
                    yield runs.flush()
    if runs.parts:
        yield runs.flush()


@dataclass
class FastPath:
    """The sending path of one association, and what it has sent.

    ``messages`` counts messages by DIMSE message class name (``C_STORE_RQ``, ...);
    ``runs`` and ``pdus`` the writes (a failed one counts too: it became Evt17) and the
    P-DATA-TF PDUs in them. Each message's bytes, once queued whole, also go into
    ``latentpacs_sent_bytes_total`` (:func:`latentpacs.metrics.dimse_sent`).
    """

    assoc: Any
    messages: Counter[str] = field(default_factory=Counter)
    runs: int = 0
    pdus: int = 0
    _queued: int = 0
    _room: threading.Condition = field(default_factory=threading.Condition)
    _one_message: threading.Lock = field(default_factory=threading.Lock)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """``DIMSEServiceProvider.send_msg``, with the PDUs written in runs (PS3.7 6.3.1)."""
        dimse = self.assoc.dimse
        if primitive.MessageIDBeingRespondedTo is None:
            dimse_msg = _RQ_TO_MESSAGE[primitive.__class__]()
        else:
            dimse_msg = _RSP_TO_MESSAGE[primitive.__class__]()
        dimse_msg.primitive_to_message(primitive)
        dimse_msg.context_id = context_id
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": dimse_msg})
        max_pdu = int(dimse.maximum_pdu_size)
        if not encodable(dimse_msg, max_pdu):
            for pdata in dimse_msg.encode_msg(context_id, max_pdu):
                dimse.dul.send_pdu(pdata)
            return
        queued = 0
        with self._one_message:  # no PDU of another message between these (PS3.8 Annex E)
            for run in encode_runs(dimse_msg, context_id, max_pdu):
                if not self._queue(RunPrimitive(context_id, run)):
                    return  # the association has ended; pynetdicom drops what is left too
                queued += len(run.data)
        name = type(dimse_msg).__name__
        _count_message(name)
        self.messages[name] += 1
        metrics.dimse_sent(name, bool(self.assoc.is_requestor), queued)

    def _queue(self, primitive: RunPrimitive) -> bool:
        """Put a run on the provider queue once the window has room; False if the DUL ended."""
        dul = self.assoc.dul
        with self._room:
            while self._queued >= WINDOW_RUNS:
                if not dul.is_alive() or dul.state_machine.current_state not in _DATA_STATES:
                    return False
                self._room.wait(_POLL_S)
            self._queued += 1
        dul.send_pdu(primitive)
        return True

    def write(self, run: Run) -> None:
        """In the DUL thread (DT-1/AR-7): write the run; a failed write is Evt17."""
        dul = self.assoc.dul
        try:
            if dul.socket is None:
                logger.warning("Attempted to send data over closed connection")
            else:
                dul.socket.send(memoryview(run.data))
                self.runs += 1
                self.pdus += run.pdus
                _count_write(run.pdus)
        finally:
            with self._room:
                self._queued -= 1
                self._room.notify()


def install(assoc: Any) -> FastPath:
    """Send this association's DIMSE messages through :class:`FastPath` (idempotent)."""
    with _LOCK:
        existing = _INSTALLED.get(assoc)
        if existing is not None:
            return existing
        fast = FastPath(assoc)
        dul = assoc.dul
        original_send = dul._send  # pynetdicom's bound method

        def send(pdu: Any) -> None:
            items = getattr(pdu, "presentation_data_value_items", None)
            if (isinstance(pdu, P_DATA_TF) and items is not None and len(items) == 1
                    and isinstance(items[0].presentation_data_value, Run)):
                fast.write(items[0].presentation_data_value)
            else:
                original_send(pdu)

        setattr(dul, "_send", send)  # before send_msg: a run is never queued unrecognised
        setattr(assoc.dimse, "send_msg", fast.send_msg)
        _INSTALLED[assoc] = fast
    logger.debug("fast DIMSE sending path on the association with %s",
                 assoc.acceptor.address if assoc.is_requestor else assoc.requestor.address)
    return fast


def install_handler(event: evt.Event) -> None:
    """``EVT_ACCEPTED`` handler: :func:`install` on the event's association.

    EVT_ACCEPTED fires in the association's own thread before any DIMSE message, on the
    acceptor (after the A-ASSOCIATE-AC is queued) and on the requestor (when it arrives,
    before ``is_established`` lets the caller send).
    """
    install(event.assoc)


#: (event, handler) to bind on an AE server or pass to ``ae.associate(evt_handlers=...)``.
ON_ACCEPTED: tuple[evt.EventType, Any] = (evt.EVT_ACCEPTED, install_handler)


def fast_path_of(assoc: Any) -> FastPath | None:
    """The association's :class:`FastPath`, or None when it was not installed."""
    with _LOCK:
        return _INSTALLED.get(assoc)


@dataclass(frozen=True)
class Totals:
    """What every association of this process sent through the fast path."""

    messages: dict[str, int]
    runs: int
    pdus: int


def totals() -> Totals:
    """A snapshot of the process-wide counts (messages by DIMSE class name, writes, PDUs)."""
    with _LOCK:
        return Totals(dict(_MESSAGES), _WRITES[0], _WRITES[1])


def _count_message(name: str) -> None:
    with _LOCK:
        _MESSAGES[name] += 1


def _count_write(pdus: int) -> None:
    with _LOCK:
        _WRITES[0] += 1
        _WRITES[1] += pdus


_LOCK = threading.Lock()
_INSTALLED: weakref.WeakKeyDictionary[Any, FastPath] = weakref.WeakKeyDictionary()
_MESSAGES: Counter[str] = Counter()
_WRITES = [0, 0]
