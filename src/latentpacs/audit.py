"""The audit trail: DICOM audit messages (PS3.15 A.5) to syslog and/or a JSON-lines file.

Each event the node audits is one :class:`AuditEvent`, written as the XML message of the
DICOM Audit Message schema (PS3.15 A.5.1: ``AuditMessage`` with ``EventIdentification``,
``ActiveParticipant``, ``AuditSourceIdentification`` and ``ParticipantObjectIdentification``,
codes as ``csd-code``/``codeSystemName``/``originalText``) and sent to

- a syslog collector (``audit.syslog = "udp://host:port"`` or ``"tcp://host:port"``): one
  RFC 5424 message per event, facility authpriv (10), severity notice (5) for a success
  and warning (4) otherwise, APP-NAME ``latentpacs``, MSGID ``IHE+RFC-3881`` (what IHE
  ATNA collectors filter on), the XML as MSG (UTF-8, with the BOM RFC 5424 6.4 asks
  for); over UDP one datagram each (RFC 5426), over TCP with octet-counting framing
  (RFC 6587 3.4.1: ``LENGTH SP MESSAGE``);
- a JSON-lines file (``audit.file``): one line per event, the event's fields as JSON
  (``event``, ``event_id``, ``action``, ``outcome``, ``participants``, ``objects``, the
  query keys as keyword -> value) plus ``xml``, the message a collector would get.

The events (PS3.15 A.5.3, codes of PS3.16 CID 400-403): Application Activity (110100)
start and stop; Security Alert (110113) with Node Authentication (110126) for every
association accepted (outcome 0: PS3.15 A.5.3.11 names each authenticated DICOM
association a Node Authentication success) and refused (A-ASSOCIATE-RJ, a failed TLS
handshake: outcome 4), and with Use of Restricted Function (110132) for a DIMSE or web
request refused as not authorized (0124H, HTTP 403); User Authentication (110114,
Login 110122, outcome 4) for a web request without a valid bearer token (HTTP 401);
DICOM Instances Transferred (110104) for each instance stored (C-STORE, STOW-RS;
action C, or U when replaced, R when an identical copy was kept) and each retrieval
(C-GET, C-MOVE, WADO-RS; action R), after Begin Transferring DICOM Instances (110102)
for a C-GET or C-MOVE; Query (110112) for C-FIND and QIDO-RS with the query as
ParticipantObjectQuery (the identifier as received, base64); Export (110106) for
``latentpacs archive export``. Patient ID and name go into the audit message (it is
the record of who saw which patient) and never into the process's log.

The audit never blocks or fails a DICOM operation: :func:`emit` puts the event on a
bounded in-memory queue (``put_nowait``) and returns; one daemon thread formats and
writes. A full queue drops the event and counts it (:attr:`Auditor.dropped`, a WARNING
at most every :data:`WARN_EVERY_S`); a collector that is down or slow holds up only that
thread (socket timeouts of :data:`SOCKET_TIMEOUT_S`); TCP reconnects with exponential
backoff (:data:`BACKOFF_MAX_S`), messages due meanwhile are dropped and counted. Every
public function here catches its own errors.
"""

from __future__ import annotations

import base64
import datetime
import functools
import getpass
import json
import logging
import os
import queue
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit

from latentpacs.config import Config
from latentpacs.errors import ConfigError

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

#: Events held in memory while the writer thread is behind; more are dropped and counted.
QUEUE_SIZE = 10000
#: Seconds a socket connect or send may take (in the writer thread only).
SOCKET_TIMEOUT_S = 2.0
#: Longest wait between TCP reconnection attempts (the wait doubles from 0.5 s).
BACKOFF_MAX_S = 30.0
#: Least seconds between two WARNINGs about dropped events.
WARN_EVERY_S = 60.0
#: Seconds :func:`close` waits for the queue to drain.
CLOSE_WAIT_S = 5.0
#: Largest UDP datagram sent (RFC 5426 3.2: IPv4 limit less headers); longer: dropped.
UDP_MAX_BYTES = 65507

#: RFC 5424 6.2.1: facility authpriv (10); severities notice (5) and warning (4).
FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE = 5
SEVERITY_WARNING = 4
#: RFC 5424 MSGID of an audit message (IHE ITI TF-2 3.20.7.2, ATNA).
MSGID = "IHE+RFC-3881"
APP_NAME = "latentpacs"
_BOM = "\ufeff"

#: EventOutcomeIndicator (PS3.15 A.5.1, RFC 3881 5.1.4).
SUCCESS = 0
MINOR_FAILURE = 4
SERIOUS_FAILURE = 8


@dataclass(frozen=True)
class Code:
    """A coded value (PS3.15 A.5.1 CodedValueType): code, coding scheme, meaning."""

    code: str
    system: str
    text: str


def _dcm(code: str, text: str) -> Code:
    return Code(code, "DCM", text)


# PS3.16 CID 400 Audit Event ID
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
BEGIN_TRANSFERRING = _dcm("110102", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
EXPORT = _dcm("110106", "Export")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")
# CID 401 Audit Event Type Code, CID 403 Security Alert Type
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
LOGIN = _dcm("110122", "Login")
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
# CID 402 Audit Active Participant Role ID Code
APPLICATION = _dcm("110150", "Application")
APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
DESTINATION = _dcm("110152", "Destination Role ID")
SOURCE = _dcm("110153", "Source Role ID")
DESTINATION_MEDIA = _dcm("110154", "Destination Media")
# CID 404 Audit Participant Object ID Type Code (and RFC 3881 5.5.4)
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")
STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
NODE_ID = _dcm("110182", "Node ID")

#: ParticipantObjectTypeCode / ParticipantObjectTypeCodeRole (RFC 3881 5.5.1, 5.5.2).
PERSON, SYSTEM_OBJECT = 1, 2
ROLE_PATIENT, ROLE_REPORT, ROLE_SECURITY_RESOURCE, ROLE_QUERY = 1, 3, 13, 24
#: NetworkAccessPointTypeCode (RFC 3881 5.3.2): machine name, IP address.
ACCESS_POINT_NAME, ACCESS_POINT_IP = "1", "2"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant (PS3.15 A.5.2.1): a process or person in the event."""

    user_id: str
    requestor: bool
    role: Code | None = None
    alternative_user_id: str = ""
    user_name: str = ""
    address: str = ""

    @property
    def address_type(self) -> str:
        """NetworkAccessPointTypeCode: IP address (2) when ``address`` is one, else name (1)."""
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in self.address else socket.AF_INET,
                             self.address)
        except (OSError, ValueError):
            return ACCESS_POINT_NAME
        return ACCESS_POINT_IP


@dataclass(frozen=True)
class SopClassCount:
    """The DICOM extension ``SOPClass`` of a study participant (PS3.15 A.5.1)."""

    uid: str
    instances: tuple[str, ...] = ()
    count: int = 0


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification (PS3.15 A.5.2): a patient, a study, a query..."""

    object_id: str
    type_code: int
    role: int
    id_type: Code
    name: str = ""
    query: bytes | None = None
    details: tuple[tuple[str, str], ...] = ()
    description: str = ""
    sop_classes: tuple[SopClassCount, ...] = ()


@dataclass(frozen=True)
class AuditEvent:
    """One audited event (PS3.15 A.5.3), as written to every sink."""

    event_id: Code
    action: str
    outcome: int
    type_codes: tuple[Code, ...] = ()
    outcome_description: str = ""
    participants: tuple[Participant, ...] = ()
    objects: tuple[ParticipantObject, ...] = ()
    #: The query keys as keyword -> value, for the JSON line (the XML carries the bytes).
    query_keys: dict[str, str] = field(default_factory=dict)
    time: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))


# --- the message ---------------------------------------------------------------------


def _timestamp(moment: datetime.datetime) -> str:
    """RFC 5424 6.2.3 / PS3.15 A.5.2.5: UTC, milliseconds, ``Z``."""
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system,
                                       "originalText": code.text})


def to_xml(event: AuditEvent, source_id: str, site_id: str = "") -> str:
    """The audit message (PS3.15 A.5.1 schema) of ``event`` from audit source ``source_id``."""
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": event.action, "EventDateTime": _timestamp(event.time),
        "EventOutcomeIndicator": str(event.outcome)})
    _coded(ident, "EventID", event.event_id)
    for code in event.type_codes:
        _coded(ident, "EventTypeCode", code)
    if event.outcome_description:
        ET.SubElement(ident, "EventOutcomeDescription").text = event.outcome_description
    for who in event.participants:
        attributes = {"UserID": who.user_id or "-", "UserIsRequestor": str(who.requestor).lower()}
        if who.alternative_user_id:
            attributes["AlternativeUserID"] = who.alternative_user_id
        if who.user_name:
            attributes["UserName"] = who.user_name
        if who.address:
            attributes["NetworkAccessPointID"] = who.address
            attributes["NetworkAccessPointTypeCode"] = who.address_type
        participant = ET.SubElement(root, "ActiveParticipant", attributes)
        if who.role is not None:
            _coded(participant, "RoleIDCode", who.role)
    source = ET.SubElement(root, "AuditSourceIdentification",
                           {"AuditSourceID": source_id,
                            **({"AuditEnterpriseSiteID": site_id} if site_id else {})})
    # RFC 3881 5.4.3: 4 = application server process tier
    _coded(source, "AuditSourceTypeCode",
           Code("4", "DCM", "Application Server process tier in a multi-tier system"))
    for obj in event.objects:
        element = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": obj.object_id, "ParticipantObjectTypeCode": str(obj.type_code),
            "ParticipantObjectTypeCodeRole": str(obj.role)})
        _coded(element, "ParticipantObjectIDTypeCode", obj.id_type)
        if obj.name:
            ET.SubElement(element, "ParticipantObjectName").text = obj.name
        elif obj.query is not None:
            ET.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(
                obj.query).decode("ascii")
        for kind, value in obj.details:
            ET.SubElement(element, "ParticipantObjectDetail",
                          {"type": kind, "value": base64.b64encode(value.encode()).decode("ascii")})
        if obj.description:
            ET.SubElement(element, "ParticipantObjectDescription").text = obj.description
        for sop_class in obj.sop_classes:
            counted = ET.SubElement(element, "SOPClass", {
                "UID": sop_class.uid,
                "NumberOfInstances": str(sop_class.count or len(sop_class.instances))})
            for uid in sop_class.instances:
                ET.SubElement(counted, "Instance", {"UID": uid})
    return ET.tostring(root, encoding="unicode")


def to_json(event: AuditEvent, xml_text: str) -> str:
    """The JSON line of ``event``: its fields, the query keys and ``xml`` (no newline)."""
    body: dict[str, Any] = {
        "time": _timestamp(event.time),
        "event": event.event_id.text,
        "event_id": event.event_id.code,
        "type": [code.text for code in event.type_codes],
        "action": event.action,
        "outcome": event.outcome,
        "outcome_description": event.outcome_description,
        "participants": [
            {"user_id": p.user_id, "requestor": p.requestor,
             "role": p.role.text if p.role else "", "address": p.address,
             **({"user_name": p.user_name} if p.user_name else {})}
            for p in event.participants],
        "objects": [
            {"id": o.object_id, "id_type": o.id_type.text, "name": o.name,
             **({"instances": [i for c in o.sop_classes for i in c.instances]}
                if o.sop_classes else {}),
             **({"count": sum(c.count or len(c.instances) for c in o.sop_classes)}
                if o.sop_classes else {})}
            for o in event.objects],
        "xml": xml_text,
    }
    if event.query_keys:
        body["query"] = event.query_keys
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def syslog_line(event: AuditEvent, xml_text: str, hostname: str, procid: int) -> bytes:
    """The RFC 5424 message of ``event`` (PRI, VERSION 1, header, no SD, BOM + XML)."""
    severity = SEVERITY_NOTICE if event.outcome == SUCCESS else SEVERITY_WARNING
    pri = FACILITY_AUTHPRIV * 8 + severity
    header = f"<{pri}>1 {_timestamp(event.time)} {hostname or '-'} {APP_NAME} {procid} {MSGID} -"
    return f"{header} {_BOM}{xml_text}".encode("utf-8")


# --- sinks ---------------------------------------------------------------------------


class Sink(Protocol):
    """Where formatted messages go (called from the writer thread only)."""

    def write(self, event: AuditEvent, xml_text: str) -> bool: ...

    def close(self) -> None: ...


class FileSink:
    """A JSON-lines file, appended to, one flushed line per event."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None

    def write(self, event: AuditEvent, xml_text: str) -> bool:
        """Append the event's line; False when the file cannot be written."""
        try:
            if self._handle is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # it names patients: readable by the node's user only (new files)
                descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                self._handle = os.fdopen(descriptor, "a", encoding="utf-8")
            self._handle.write(to_json(event, xml_text) + "\n")
            self._handle.flush()
        except OSError as exc:
            _warn_sink(f"audit file {self.path}: {exc.strerror}")
            self._handle = None
            return False
        return True

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class SyslogSink:
    """RFC 5424 messages to a collector over UDP (RFC 5426) or TCP (RFC 6587 octet counting)."""

    def __init__(self, transport: str, host: str, port: int) -> None:
        self.transport, self.host, self.port = transport, host, port
        self.hostname = socket.gethostname()
        self.procid = os.getpid()
        self._sock: socket.socket | None = None
        self._backoff = 0.0
        self._retry_at = 0.0

    def _connect(self) -> socket.socket | None:
        if self._sock is not None:
            return self._sock
        if time.monotonic() < self._retry_at:
            return None
        try:
            if self.transport == "udp":
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.settimeout(SOCKET_TIMEOUT_S)
                sock.connect((self.host, self.port))
            else:
                sock = socket.create_connection((self.host, self.port), timeout=SOCKET_TIMEOUT_S)
        except OSError as exc:
            self._failed(f"cannot reach syslog collector {self.transport}://{self.host}:"
                         f"{self.port}: {exc.strerror or exc}")
            return None
        self._sock = sock
        return sock

    def _failed(self, message: str) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._backoff = min(max(self._backoff * 2, 0.5), BACKOFF_MAX_S)
        self._retry_at = time.monotonic() + self._backoff
        _warn_sink(f"{message} (next attempt in {self._backoff:g} s)")

    def write(self, event: AuditEvent, xml_text: str) -> bool:
        """Send one message; False when it could not be sent (dropped)."""
        data = syslog_line(event, xml_text, self.hostname, self.procid)
        sock = self._connect()
        if sock is None:
            return False
        try:
            if self.transport == "udp":
                if len(data) > UDP_MAX_BYTES:
                    _warn_sink(f"audit message of {len(data)} bytes too long for UDP; dropped")
                    return False
                sock.send(data)
            else:
                sock.sendall(b"%d " % len(data) + data)
        except OSError as exc:
            self._failed(f"syslog collector {self.transport}://{self.host}:{self.port}: "
                         f"{exc.strerror or exc}")
            return False
        self._backoff = 0.0
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_SINK_WARNED = [0.0]


def _warn_sink(message: str) -> None:
    now = time.monotonic()
    if now - _SINK_WARNED[0] >= WARN_EVERY_S or _SINK_WARNED[0] == 0.0:
        _SINK_WARNED[0] = now
        logger.warning("audit: %s", message)


def parse_syslog_url(url: str) -> tuple[str, str, int]:
    """``udp://host:port`` or ``tcp://host:port`` as (transport, host, port).

    Raises
    ------
    ConfigError
        For another scheme, or a missing host or port.
    """
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("udp", "tcp") or not parts.hostname or port is None:
        raise ConfigError(f"audit.syslog must be udp://host:port or tcp://host:port, not {url!r}")
    return parts.scheme, parts.hostname, port


# --- the queue -----------------------------------------------------------------------


@dataclass(frozen=True)
class Local:
    """This node as an ActiveParticipant: its AE title and host name."""

    aet: str
    host: str

    def participant(self, role: Code | None, requestor: bool = False) -> Participant:
        return Participant(self.aet, requestor, role, f"AETITLES={self.aet}", "", self.host)


class Auditor:
    """The bounded queue, its writer thread and the sinks (one per process).

    Parameters
    ----------
    sinks:
        Where each message goes.
    source_id:
        AuditSourceID (``audit.source_id``, by default the node's AE title).
    local:
        The node as a participant.
    """

    def __init__(self, sinks: Sequence[Sink], source_id: str, local: Local,
                 maxsize: int = QUEUE_SIZE) -> None:
        self.sinks = list(sinks)
        self.source_id = source_id
        self.local = local
        self.dropped = 0
        self.written = 0
        self._queue: queue.Queue[AuditEvent | None] = queue.Queue(maxsize=maxsize)
        self._warned = 0.0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, name="latentpacs-audit", daemon=True)
        self._thread.start()

    def emit(self, event: AuditEvent) -> None:
        """Queue ``event`` without waiting; a full queue drops it (counted)."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._dropped(1)

    def _dropped(self, count: int) -> None:
        with self._lock:
            self.dropped += count
            now = time.monotonic()
            warn = now - self._warned >= WARN_EVERY_S or self._warned == 0.0
            if warn:
                self._warned = now
            total = self.dropped
        if warn:
            logger.warning("audit: %d message(s) dropped so far (queue full or collector "
                           "unreachable)", total)

    def _drain(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                text = to_xml(event, self.source_id)
                for sink in self.sinks:
                    if sink.write(event, text):
                        with self._lock:
                            self.written += 1
                    else:
                        self._dropped(1)
            except Exception:  # never let the writer die
                logger.exception("audit: message not written")

    def close(self, wait: float = CLOSE_WAIT_S) -> None:
        """Write what is queued (up to ``wait`` seconds), then close the sinks."""
        try:
            self._queue.put(None, timeout=wait)
        except queue.Full:
            pass
        self._thread.join(wait)
        for sink in self.sinks:
            try:
                sink.close()
            except OSError:
                pass
        if self.dropped:
            logger.warning("audit: %d message(s) dropped in all", self.dropped)


_AUDITOR: Auditor | None = None


def configure(config: Config) -> Auditor | None:
    """Start the process's auditor from ``audit.*`` settings; None when both sinks are off.

    Raises
    ------
    ConfigError
        For an ``audit.syslog`` value that is not a udp:// or tcp:// URL.
    """
    global _AUDITOR
    sinks: list[Sink] = []
    if config["audit.syslog"]:
        sinks.append(SyslogSink(*parse_syslog_url(config["audit.syslog"])))
    if config["audit.file"]:
        sinks.append(FileSink(Path(config["audit.file"])))
    if not sinks:
        return None
    if _AUDITOR is not None:
        _AUDITOR.close(0.5)
    aet = str(config["node.aet"])
    _AUDITOR = Auditor(sinks, config["audit.source_id"] or aet, Local(aet, socket.gethostname()))
    logger.info("audit trail to %s", ", ".join(
        filter(None, (config["audit.syslog"], config["audit.file"]))))
    return _AUDITOR


def close() -> None:
    """Write what is queued and stop the process's auditor (no-op when there is none)."""
    global _AUDITOR
    auditor, _AUDITOR = _AUDITOR, None
    if auditor is not None:
        auditor.close()


def emit(event: AuditEvent) -> None:
    """Queue ``event`` for the process's auditor (no-op without one); never raises."""
    auditor = _AUDITOR
    if auditor is not None:
        auditor.emit(event)


def _guarded(builder: Callable[P, None]) -> Callable[P, None]:
    """Run an audit hook only with an auditor, and never let it raise into the caller."""

    @functools.wraps(builder)
    def call(*args: P.args, **kwargs: P.kwargs) -> None:
        if _AUDITOR is None:
            return
        try:
            builder(*args, **kwargs)
        except Exception:
            logger.exception("audit: event not recorded")

    return call


def _local() -> Local:
    auditor = _AUDITOR
    return auditor.local if auditor is not None else Local("-", "-")


# --- who and what ---------------------------------------------------------------------


class Peer(Protocol):
    """The requestor of an association or HTTP request (:class:`latentpacs.node.peers.Requestor`)."""

    @property
    def ae_title(self) -> str: ...

    @property
    def address(self) -> str: ...


def peer_participant(peer: Peer, role: Code | None, requestor: bool = True) -> Participant:
    """A DIMSE peer (calling AE title and IP address) as an ActiveParticipant."""
    aet = str(peer.ae_title).strip()
    return Participant(aet or "-", requestor, role, f"AETITLES={aet}" if aet else "", "",
                       str(peer.address))


def web_participant(principal: str, address: str, role: Code | None) -> Participant:
    """A web client (its token's name, or none, and IP address) as an ActiveParticipant."""
    return Participant(principal or "-", True, role, "", "", address)


def patient(patient_id: str, name: str = "") -> ParticipantObject:
    """The patient participant (RFC 3881 Patient Number, PS3.15 A.5.2)."""
    return ParticipantObject(patient_id or "-", PERSON, ROLE_PATIENT, PATIENT_NUMBER, name=name)


def study(study_uid: str, sop_classes: Iterable[SopClassCount] = ()) -> ParticipantObject:
    """A study participant (Study Instance UID, with its SOP classes and instances)."""
    return ParticipantObject(study_uid, SYSTEM_OBJECT, ROLE_REPORT, STUDY_INSTANCE_UID,
                             sop_classes=tuple(sop_classes))


class Transfer:
    """The patients, studies and instances of one transfer (a retrieval, an export)."""

    def __init__(self) -> None:
        self.patients: dict[str, str] = {}
        self.studies: dict[str, dict[str, list[str]]] = {}
        self.failed = 0

    def add(self, ds: Any) -> None:
        """Count one data set sent (its Patient ID and Name, Study, SOP Class and Instance)."""
        try:
            self.patients.setdefault(str(ds.get("PatientID", "")), str(ds.get("PatientName", "")))
            classes = self.studies.setdefault(str(ds.get("StudyInstanceUID", "")), {})
            classes.setdefault(str(ds.get("SOPClassUID", "")), []).append(
                str(ds.get("SOPInstanceUID", "")))
        except Exception:  # an odd data set must not fail the sub-operation
            pass

    @property
    def count(self) -> int:
        return sum(len(i) for c in self.studies.values() for i in c.values())

    def objects(self) -> tuple[ParticipantObject, ...]:
        """The study participants (with SOP classes and instances), then the patients."""
        studies = [study(uid, (SopClassCount(cls, tuple(uids)) for cls, uids in classes.items()))
                   for uid, classes in self.studies.items()]
        return (*studies, *(patient(pid, name) for pid, name in self.patients.items()))


def _dataset_keys(ds: Any) -> dict[str, str]:
    keys: dict[str, str] = {}
    try:
        for element in ds:
            if element.VR == "SQ":
                keys[element.keyword or str(element.tag)] = "(sequence)"
            else:
                keys[element.keyword or str(element.tag)] = str(element.value)
    except Exception:
        pass
    return keys


# --- the events -----------------------------------------------------------------------


@_guarded
def application_activity(start: bool) -> None:
    """Application Activity (PS3.15 A.5.3.1): the node started or is stopping."""
    local = _local()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    emit(AuditEvent(APPLICATION_ACTIVITY, "E", SUCCESS,
                    (APPLICATION_START if start else APPLICATION_STOP,),
                    participants=(local.participant(APPLICATION),
                                  Participant(user, True, APPLICATION_LAUNCHER))))


@_guarded
def node_authentication(peer: Peer, accepted: bool, reason: str = "") -> None:
    """Security Alert / Node Authentication (A.5.3.11): an association accepted or refused."""
    local = _local()
    emit(AuditEvent(SECURITY_ALERT, "E", SUCCESS if accepted else MINOR_FAILURE,
                    (NODE_AUTHENTICATION,), reason,
                    participants=(local.participant(None, False),
                                  peer_participant(peer, None, True)),
                    objects=(ParticipantObject(local.aet, SYSTEM_OBJECT, ROLE_SECURITY_RESOURCE,
                                               NODE_ID, description="association"),)))


@_guarded
def restricted(peer: Peer, service: str, reason: str) -> None:
    """Security Alert / Use of Restricted Function (A.5.3.11): a request not authorized."""
    local = _local()
    emit(AuditEvent(SECURITY_ALERT, "E", MINOR_FAILURE, (RESTRICTED_FUNCTION,),
                    f"{service} refused: {reason}",
                    participants=(local.participant(None, False),
                                  peer_participant(peer, None, True)),
                    objects=(ParticipantObject(service, SYSTEM_OBJECT, ROLE_SECURITY_RESOURCE,
                                               URI, description=reason),)))


@_guarded
def web_refused(principal: str, address: str, status: int, path: str, reason: str) -> None:
    """A web request refused: 401 is a failed User Authentication (A.5.3.12, Login),
    403 a Security Alert / Use of Restricted Function (A.5.3.11)."""
    local = _local()
    who = web_participant(principal, address, None)
    resource = ParticipantObject(path, SYSTEM_OBJECT, ROLE_SECURITY_RESOURCE, URI,
                                 description=f"HTTP {status}")
    if status == 401:
        emit(AuditEvent(USER_AUTHENTICATION, "E", MINOR_FAILURE, (LOGIN,), reason,
                        participants=(who, local.participant(None, False)), objects=(resource,)))
    else:
        emit(AuditEvent(SECURITY_ALERT, "E", MINOR_FAILURE, (RESTRICTED_FUNCTION,), reason,
                        participants=(local.participant(None, False), who), objects=(resource,)))


#: EventActionCode of a stored instance, by :class:`~latentpacs.archive.StoreResult` value.
_STORE_ACTIONS = {"stored": "C", "replaced": "U", "kept-existing": "R"}


@_guarded
def stored(source: Participant, ds: Any, result: str, outcome: int = SUCCESS,
           description: str = "") -> None:
    """DICOM Instances Transferred (A.5.3.4) for one instance received (C-STORE, STOW-RS).

    ``source`` is the sender (Source Role ID); the node is the destination.
    """
    transfer = Transfer()
    transfer.add(ds)
    emit(AuditEvent(INSTANCES_TRANSFERRED, _STORE_ACTIONS.get(str(result), "C"), outcome,
                    outcome_description=description,
                    participants=(source, _local().participant(DESTINATION)),
                    objects=transfer.objects()))


@_guarded
def begin_transfer(requestor: Participant, destination: Participant | None,
                   identifier: Any) -> None:
    """Begin Transferring DICOM Instances (A.5.3.3): a C-GET or C-MOVE starts; the studies
    and patient are those the identifier names (the unique keys of the request)."""
    keys = _dataset_keys(identifier)
    objects: list[ParticipantObject] = [
        study(uid) for uid in keys.get("StudyInstanceUID", "").split("\\") if uid]
    if keys.get("PatientID"):
        objects.append(patient(keys["PatientID"]))
    participants = [_local().participant(SOURCE)]
    if destination is not None:
        participants.append(destination)
    if destination is None or destination.user_id != requestor.user_id:
        participants.append(requestor)
    emit(AuditEvent(BEGIN_TRANSFERRING, "E", SUCCESS, participants=tuple(participants),
                    objects=tuple(objects)))


@_guarded
def transferred(requestor: Participant, destination: Participant | None, transfer: Transfer,
                outcome: int = SUCCESS, description: str = "") -> None:
    """DICOM Instances Transferred (A.5.3.4, action R) for a retrieval the node served.

    The node is the source; ``destination`` receives (the C-GET requestor itself, a C-MOVE
    destination); a C-MOVE requestor other than the destination is one more participant.
    """
    participants = [_local().participant(SOURCE)]
    if destination is not None:
        participants.append(destination)
    if destination is None or destination.user_id != requestor.user_id:
        participants.append(requestor)
    emit(AuditEvent(INSTANCES_TRANSFERRED, "R", outcome, outcome_description=description,
                    participants=tuple(participants), objects=transfer.objects()))


@_guarded
def query(requestor: Participant, sop_class: str, encoded: bytes, transfer_syntax: str,
          identifier: Any) -> None:
    """Query (A.5.3.10): the query as received (base64), its SOP class and transfer syntax."""
    keys = _dataset_keys(identifier)
    objects = [ParticipantObject(sop_class, SYSTEM_OBJECT, ROLE_REPORT, SOP_CLASS_UID,
                                 query=encoded,
                                 details=(("TransferSyntax", transfer_syntax),))]
    if keys.get("PatientID"):
        objects.append(patient(keys["PatientID"], keys.get("PatientName", "")))
    emit(AuditEvent(QUERY, "E", SUCCESS,
                    participants=(requestor, _local().participant(DESTINATION)),
                    objects=tuple(objects), query_keys=keys))


@_guarded
def web_query(principal: str, address: str, url: str, query_string: str,
              identifier: Any) -> None:
    """Query (A.5.3.10) for QIDO-RS: the URL, and the query string as ParticipantObjectQuery."""
    keys = _dataset_keys(identifier)
    objects = [ParticipantObject(url, SYSTEM_OBJECT, ROLE_QUERY, URI,
                                 query=query_string.encode("utf-8"))]
    if keys.get("PatientID"):
        objects.append(patient(keys["PatientID"], keys.get("PatientName", "")))
    emit(AuditEvent(QUERY, "E", SUCCESS,
                    participants=(web_participant(principal, address, SOURCE),
                                  _local().participant(DESTINATION)),
                    objects=tuple(objects), query_keys=keys))


@_guarded
def exported(out: Path, transfer: Transfer) -> None:
    """Export (A.5.3.6): ``latentpacs archive export`` wrote a study's objects to ``out``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    local = _local()
    emit(AuditEvent(EXPORT, "R", SUCCESS,
                    participants=(Participant(user, True, SOURCE, "", "", local.host),
                                  Participant(str(out.resolve()), False, DESTINATION_MEDIA)),
                    objects=transfer.objects()))


# --- pynetdicom event handlers (bound by latentpacs.node.app) -------------------------


@dataclass(frozen=True)
class _Address:
    ae_title: str
    address: str


def _requestor(event: Any) -> _Address:
    requestor = event.assoc.requestor
    return _Address(str(requestor.ae_title or ""), str(requestor.address or ""))


def on_established(event: Any) -> None:
    """``EVT_ESTABLISHED``: Node Authentication success, or a refusal when no presentation
    context was accepted (PS3.8 9.3.3.2)."""
    if _AUDITOR is None:
        return
    try:
        if event.assoc.accepted_contexts:
            node_authentication(_requestor(event), True, "association accepted")
        else:
            node_authentication(_requestor(event), False, "no presentation context accepted")
    except Exception:
        logger.exception("audit: association not recorded")


def on_rejected(event: Any) -> None:
    """``EVT_REJECTED`` (acceptor): Node Authentication failure with the A-ASSOCIATE-RJ
    reason (PS3.8 Table 9-21)."""
    if _AUDITOR is None:
        return
    from latentpacs import metrics

    try:
        primitive = getattr(event.assoc.acceptor, "primitive", None)
        key = (int(getattr(primitive, "result_source", 0) or 0),
               int(getattr(primitive, "diagnostic", 0) or 0))
        reason = metrics.REJECT_REASONS.get(key, metrics.OTHER)
        node_authentication(_requestor(event), False, f"A-ASSOCIATE-RJ: {reason}")
    except Exception:
        logger.exception("audit: association not recorded")


def on_tls_failure(event: Any) -> None:
    """A failed TLS handshake (bad or missing certificate): Node Authentication failure."""
    if _AUDITOR is None:
        return
    try:
        node_authentication(_Address("", str(event.assoc.requestor.address or "")), False,
                            "TLS handshake failed")
    except Exception:
        logger.exception("audit: TLS failure not recorded")
