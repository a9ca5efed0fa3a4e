"""The audit trail (PS3.15 A.5): what a run of real peers leaves at the collector and in the file.

A node sends its audit messages as RFC 5424 syslog to a TCP or UDP listener this test
runs on loopback, and as JSON lines to a file; DCMTK peers, a refused peer and web
requests with bad tokens drive it. The messages are then parsed: the RFC 5424 header
(PRI, VERSION 1, TIMESTAMP, HOSTNAME, APP-NAME, MSGID), the XML of the DICOM audit
message schema (EventID, EventActionCode, EventOutcomeIndicator, ActiveParticipant,
ParticipantObjectIdentification) and the JSON line of the same event. A collector that is
not listening does not fail a C-STORE.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_dataset
from pydicom.uid import ImplicitVRLittleEndian

from latentpacs import audit, phantom
from latentpacs.errors import ConfigError, Status
from netpeers import (
    HOST,
    dimse_responses,
    echoscu,
    findscu,
    getscu,
    movescu,
    start_storescp,
    storescu,
)
from test_tls import _running_tls_node, _scu, _tls_args, pki  # noqa: F401 (fixture)
from webpeers import start_web_node

#: RFC 5424 6: PRI VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD SP MSG
SYSLOG = re.compile(r"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\]) (.*)$", re.DOTALL)
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Collector:
    """A syslog collector on a loopback port: UDP datagrams or RFC 6587 octet-counted TCP."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.messages: list[bytes] = []
        self.connections: list[socket.socket] = []
        self.readers: list[threading.Thread] = []
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind((HOST, 0))
        self.port = int(self.sock.getsockname()[1])
        if transport == "tcp":
            self.sock.listen(4)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.transport}://{HOST}:{self.port}"

    def _run(self) -> None:
        try:
            if self.transport == "udp":
                while True:
                    data, _ = self.sock.recvfrom(70000)
                    if not data:  # shut down by close()
                        return
                    self.messages.append(data)
            while True:
                connection, _ = self.sock.accept()
                self.connections.append(connection)
                reader = threading.Thread(target=self._frames, args=(connection,), daemon=True)
                self.readers.append(reader)
                reader.start()
        except OSError:  # the socket was closed: the test is done
            return

    def _frames(self, connection: socket.socket) -> None:
        """RFC 6587 3.4.1: MSG-LEN SP SYSLOG-MSG, repeated."""
        buffer = b""
        with connection:
            while True:
                try:
                    chunk = connection.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while b" " in buffer:
                    length, _, rest = buffer.partition(b" ")
                    if not length.isdigit() or len(rest) < int(length):
                        break
                    self.messages.append(rest[:int(length)])
                    buffer = rest[int(length):]

    def received(self, event_id: str, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``count`` messages of ``event_id`` arrived (the sender's last ones);
        over TCP, until every connection the sender closed was read to its end."""
        for reader in list(self.readers):
            reader.join(timeout)
        deadline = time.monotonic() + timeout
        while sum(f"csd-code=\"{event_id}\"".encode() in m for m in self.messages) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"the collector got no {count} message(s) {event_id}")
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() or recvfrom()
        except OSError:
            pass
        self.sock.close()
        for connection in self.connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)  # wakes its reader
            except OSError:
                pass
            connection.close()  # the sender's next writes meet a reset


@dataclass(frozen=True)
class Message:
    """One syslog message: header fields and the parsed audit XML."""

    pri: int
    timestamp: str
    hostname: str
    app: str
    msgid: str
    xml: ET.Element

    @property
    def event_id(self) -> str:
        return str(self.xml.find("EventIdentification/EventID").get("csd-code"))  # type: ignore[union-attr]

    @property
    def event(self) -> ET.Element:
        return self.xml.find("EventIdentification")  # type: ignore[return-value]

    @property
    def type_codes(self) -> list[str]:
        return [str(c.get("csd-code")) for c in self.xml.findall("EventIdentification/EventTypeCode")]

    def participants(self) -> list[ET.Element]:
        return self.xml.findall("ActiveParticipant")

    def objects(self) -> list[ET.Element]:
        return self.xml.findall("ParticipantObjectIdentification")

    def object_ids(self, id_type: str) -> list[str]:
        return [str(o.get("ParticipantObjectID")) for o in self.objects()
                if o.find("ParticipantObjectIDTypeCode").get("csd-code") == id_type]  # type: ignore[union-attr]


def parse(raw: bytes) -> Message:
    text = raw.decode("utf-8")
    match = SYSLOG.match(text)
    assert match is not None, f"not an RFC 5424 message: {text[:200]!r}"
    pri, timestamp, hostname, app, _procid, msgid, _sd, body = match.groups()
    assert body.startswith("\ufeff")  # RFC 5424 6.4: UTF-8 MSG starts with the BOM
    return Message(int(pri), timestamp, hostname, app, msgid, ET.fromstring(body[1:]))


def _files(tmp_path: Path) -> list[Path]:
    return phantom.generate(tmp_path / "phantoms", 2, seed=71, size=(64, 52), images_per_study=2)


def _by_event(messages: list[Message], code: str) -> list[Message]:
    return [m for m in messages if m.event_id == code]


def _stop_and_collect(web_node: object, collector: Collector) -> list[Message]:
    node = web_node.node  # type: ignore[attr-defined]
    node.stop()  # SIGTERM: the node writes Application Stop and drains its queue, then exits
    collector.received("110100", 2)  # Application Start and Stop
    collector.close()
    return [parse(raw) for raw in collector.messages]


def test_audit_trail_over_tcp_and_file(tmp_path: Path) -> None:
    files = _files(tmp_path)
    ds = pydicom.dcmread(files[0])
    patient_id, patient_name, study_uid = ds.PatientID, str(ds.PatientName), ds.StudyInstanceUID
    collector = Collector("tcp")
    journal = tmp_path / "audit.jsonl"
    storescp = start_storescp(tmp_path / "moved", aet="MOVEDEST")
    try:
        with start_web_node(
                tmp_path / "node", tier="lossless",
                audit={"syslog": collector.url, "file": str(journal)},
                security={"trust_loopback": False,
                          "allowed_calling_aets": ["FINDSCU", "GETSCU", "MOVESCU", "ECHOSCU"]},
                **{"destinations.MOVEDEST": {"host": HOST, "port": storescp.port}}) as web:
            node = web.node
            stored = storescu(node.port, node.aet, files, extra=["-nh"])
            assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS] * 2
            found = findscu(node.port, node.aet, "STUDY",
                            {"PatientID": patient_id, "StudyInstanceUID": ""})
            assert len(found.datasets) == 1
            got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study_uid},
                         tmp_path / "got")
            assert got.final.status == Status.SUCCESS and len(got.files) == 2
            moved = movescu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study_uid},
                            "MOVEDEST")
            assert dimse_responses(moved)[-1].status == Status.SUCCESS
            refused = findscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": ""},
                              calling="INTRUDER")
            assert refused.final.status == Status.NOT_AUTHORIZED
            wrong_called = echoscu(node.port, "NOTTHENODE")
            assert wrong_called.returncode != 0
            assert web.request("GET", "/dicom-web/studies", token=None,
                               headers={"Authorization": "Bearer wrong"}).status == 401
            assert web.request("POST", "/dicom-web/studies", token="reader",
                               headers={"Content-Type": "multipart/related; "
                                        "type=\"application/dicom\"; boundary=x"},
                               body=b"--x--").status == 403
            assert web.request("GET", f"/dicom-web/studies?PatientID={patient_id}",
                               token="reader").status == 200
            messages = _stop_and_collect(web, collector)
    finally:
        storescp.stop()
        collector.close()

    for message in messages:
        assert message.app == "latentpacs" and message.msgid == "IHE+RFC-3881"
        assert TIMESTAMP.match(message.timestamp) and message.hostname not in ("", "-")
        outcome = int(message.event.get("EventOutcomeIndicator", "-1"))
        assert message.pri == 10 * 8 + (5 if outcome == 0 else 4)  # authpriv, notice/warning
        assert message.event.get("EventActionCode") in ("C", "R", "U", "D", "E")
        assert message.xml.find("AuditSourceIdentification").get("AuditSourceID") == "LATENTPACS"  # type: ignore[union-attr]

    activity = _by_event(messages, "110100")
    assert [m.type_codes for m in activity] == [["110120"], ["110121"]]  # start, then stop

    stores = [m for m in _by_event(messages, "110104") if m.event.get("EventActionCode") == "C"]
    assert len(stores) == 2
    for message in stores:
        assert message.event.get("EventOutcomeIndicator") == "0"
        source = [p for p in message.participants()
                  if p.find("RoleIDCode").get("csd-code") == "110153"]  # type: ignore[union-attr]
        assert source[0].get("UserID") == "STORESCU"
        assert source[0].get("NetworkAccessPointID") == HOST
        assert patient_id in message.object_ids("2") and study_uid in message.object_ids("110180")
        patient = [o for o in message.objects() if o.get("ParticipantObjectTypeCodeRole") == "1"]
        assert patient[0].findtext("ParticipantObjectName") == patient_name

    (query, *web_queries) = _by_event(messages, "110112")
    queried = query.objects()[0]
    encoded = base64.b64decode(queried.findtext("ParticipantObjectQuery") or "")
    detail = queried.find("ParticipantObjectDetail")
    assert detail is not None and detail.get("type") == "TransferSyntax"
    syntax = base64.b64decode(detail.get("value", "")).decode()
    asked = read_dataset(io.BytesIO(encoded), syntax == ImplicitVRLittleEndian, True)
    assert asked.PatientID == patient_id  # the identifier as received, base64
    assert query.participants()[0].get("UserID") == "FINDSCU"
    assert len(web_queries) == 1 and patient_id in web_queries[0].object_ids("2")

    begins = _by_event(messages, "110102")
    assert len(begins) == 2 and all(study_uid in m.object_ids("110180") for m in begins)
    retrievals = [m for m in _by_event(messages, "110104") if m.event.get("EventActionCode") == "R"]
    assert len(retrievals) == 2
    users = [{p.get("UserID") for p in m.participants()} for m in retrievals]
    assert {"LATENTPACS", "GETSCU"} <= users[0] and {"LATENTPACS", "MOVEDEST", "MOVESCU"} <= users[1]
    for message in retrievals:
        assert patient_id in message.object_ids("2") and study_uid in message.object_ids("110180")
        assert len(message.xml.findall("ParticipantObjectIdentification/SOPClass/Instance")) == 2

    alerts = _by_event(messages, "110113")
    accepted = [m for m in alerts if m.type_codes == ["110126"]
                and m.event.get("EventOutcomeIndicator") == "0"]
    assert len(accepted) >= 5  # storescu, findscu, getscu, movescu, the refused findscu
    rejected = [m for m in alerts if m.type_codes == ["110126"]
                and m.event.get("EventOutcomeIndicator") == "4"]
    assert len(rejected) == 1 and "called-ae-title" in (rejected[0].event.findtext("EventOutcomeDescription") or "")
    restricted = [m for m in alerts if m.type_codes == ["110132"]]
    assert {p.get("UserID") for m in restricted for p in m.participants()} >= {"INTRUDER", "reader"}
    assert [m.type_codes for m in _by_event(messages, "110114")] == [["110122"]]  # the 401

    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert sorted(line["event_id"] for line in lines) == sorted(m.event_id for m in messages)
    for line in lines:
        ET.fromstring(line["xml"])  # each line carries the message a collector gets
    query_line = next(line for line in lines if line["event_id"] == "110112" and "query" in line)
    assert query_line["query"]["PatientID"] == patient_id

    log = node.log.read_text()
    assert patient_name not in log and patient_id not in log  # only the audit trail names them


def test_udp_collector_and_export(tmp_path: Path) -> None:
    files = _files(tmp_path)[:1]
    ds = pydicom.dcmread(files[0])
    collector = Collector("udp")
    journal = tmp_path / "audit.jsonl"
    try:
        with start_web_node(tmp_path / "node", tier="lossless",
                            audit={"syslog": collector.url, "file": str(journal)}) as web:
            stored = storescu(web.node.port, web.node.aet, files, extra=["-nh"])
            assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS]
            web.node.stop()
        config = tmp_path / "node" / "node.toml"
        exported = subprocess.run(
            [str(Path(sys.executable).parent / "latentpacs"), "--config", str(config), "archive",
             "export", "--study", ds.StudyInstanceUID, "--out", str(tmp_path / "export")],
            capture_output=True, text=True, timeout=120)
        assert exported.returncode == 0, exported.stderr
        collector.received("110106")  # Export, the last message
    finally:
        collector.close()
    messages = [parse(raw) for raw in collector.messages]
    codes = [m.event_id for m in messages]
    assert codes.count("110104") == 1 and codes.count("110100") == 2
    export = _by_event(messages, "110106")
    assert len(export) == 1 and ds.PatientID in export[0].object_ids("2")
    media = [p for p in export[0].participants()
             if p.find("RoleIDCode").get("csd-code") == "110154"]  # type: ignore[union-attr]
    assert media and media[0].get("UserID") == str((tmp_path / "export").resolve())
    assert [json.loads(line)["event_id"] for line in journal.read_text().splitlines()] == codes


def test_collector_down_does_not_fail_a_store(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind((HOST, 0))
        closed = int(probe.getsockname()[1])
    files = _files(tmp_path)
    with start_web_node(tmp_path / "node", tier="lossless",
                        audit={"syslog": f"tcp://{HOST}:{closed}"}) as web:
        stored = storescu(web.node.port, web.node.aet, files, extra=["-nh"])
        assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS] * 2
        web.node.stop()
    log = web.node.log.read_text()
    assert "cannot reach syslog collector" in log
    assert re.search(r"audit: \d+ message\(s\) dropped in all", log)


class _StalledSink:
    """A sink whose first write waits until released: a collector that hangs."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lines: list[str] = []

    def write(self, event: audit.AuditEvent, xml_text: str) -> bool:
        self.entered.set()
        self.release.wait(30)
        self.lines.append(xml_text)
        return True

    def close(self) -> None:
        pass


def test_a_stalled_collector_drops_and_counts_never_blocks() -> None:
    sink = _StalledSink()
    auditor = audit.Auditor([sink], "TEST", audit.Local("TEST", "localhost"), maxsize=4)
    event = audit.AuditEvent(audit.QUERY, "E", audit.SUCCESS)
    auditor.emit(event)
    assert sink.entered.wait(30)  # the writer holds the first event, stuck in the sink
    for _ in range(4 + 3):
        auditor.emit(event)  # returns at once: 4 queued, 3 dropped
    assert auditor.dropped == 3
    sink.release.set()
    auditor.close()
    assert len(sink.lines) == 5 and auditor.written == 5


def test_message_format_and_file_mode(tmp_path: Path) -> None:
    event = audit.AuditEvent(
        audit.INSTANCES_TRANSFERRED, "C", audit.SUCCESS,
        participants=(audit.Participant("MODALITY", True, audit.SOURCE, "AETITLES=MODALITY", "",
                                        "192.0.2.7"),),
        objects=(audit.study("1.2.3", [audit.SopClassCount("1.2.840.10008.5.1.4.1.1.1.2",
                                                          ("1.2.3.4",))]),
                 audit.patient("P-1", "DOE^JANE")))
    xml_text = audit.to_xml(event, "NODE")
    message = parse(audit.syslog_line(event, xml_text, "host.example", 42))
    assert (message.pri, message.hostname, message.app) == (85, "host.example", "latentpacs")
    participant = message.participants()[0]
    assert participant.get("NetworkAccessPointTypeCode") == "2"  # an IP address
    assert message.xml.find("ParticipantObjectIdentification/SOPClass").get("NumberOfInstances") == "1"  # type: ignore[union-attr]
    sink = audit.FileSink(tmp_path / "audit.jsonl")
    assert sink.write(event, xml_text)
    sink.close()
    assert (tmp_path / "audit.jsonl").stat().st_mode & 0o077 == 0  # it names patients
    line = json.loads((tmp_path / "audit.jsonl").read_text())
    assert line["objects"][1] == {"id": "P-1", "id_type": "Patient Number", "name": "DOE^JANE"}
    with pytest.raises(ConfigError):
        audit.parse_syslog_url("http://collector:514")


def test_tcp_sink_reconnects_after_the_collector_restarts() -> None:
    collector = Collector("tcp")
    port = collector.port
    sink = audit.SyslogSink("tcp", HOST, port)
    event = audit.AuditEvent(audit.QUERY, "E", audit.SUCCESS)
    xml_text = audit.to_xml(event, "TEST")
    assert sink.write(event, xml_text)
    collector.close()  # the collector goes away: sends fail once the peer's reset arrives
    failed = False
    for _ in range(500):  # poll: the reset arrives after the first write that follows
        if not sink.write(event, xml_text):
            failed = True
            break
        time.sleep(0.01)
    assert failed
    assert not sink.write(event, xml_text)  # within the backoff: dropped, no connect attempt
    restarted = socket.socket()
    restarted.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    restarted.bind((HOST, port))
    restarted.listen(1)
    try:
        sink._retry_at = 0.0  # the backoff is over
        assert sink.write(event, xml_text)
        connection, _ = restarted.accept()
        with connection:
            connection.settimeout(10)
            data = b""
            while b" " not in data or len(data.partition(b" ")[2]) < int(data.partition(b" ")[0]):
                chunk = connection.recv(65536)
                assert chunk, "the collector got no whole message"
                data += chunk
        assert parse(data.partition(b" ")[2][:int(data.partition(b" ")[0])]).event_id == "110112"
    finally:
        sink.close()
        restarted.close()


def test_a_bad_client_certificate_is_a_security_alert(tmp_path: Path,
                                                       pki: dict[str, tuple[Path, Path]]) -> None:
    journal = tmp_path / "audit.jsonl"
    files = _files(tmp_path)[:1]
    with _running_tls_node(tmp_path, pki, audit={"file": str(journal)}) as port:
        rogue = _scu("storescu", port, _tls_args(pki, "rogue"), files)  # a CA the node does not trust
        assert rogue.returncode != 0 and not dimse_responses(rogue)
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    failed = [line for line in lines if line["event_id"] == "110113"
              and line["type"] == ["Node Authentication"] and line["outcome"] == 4]
    assert [line["outcome_description"] for line in failed] == ["TLS handshake failed"]
    assert HOST in {p["address"] for p in failed[0]["participants"]}
