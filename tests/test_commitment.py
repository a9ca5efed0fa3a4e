"""Storage Commitment Push Model SCP (PS3.4 Annex J), against a real ``latentpacs serve``.

Images go in with DCMTK's ``storescu``; commitment is asked with a pynetdicom SCU
(N-ACTION, PS3.7 10.1.4), which receives the N-EVENT-REPORT (PS3.7 10.1.1) on the same
association, or, once it has released, a pynetdicom SCP configured as
``[destinations.SCUAET]`` receives it on a new association the node opens with the SCP
role (SCP/SCU Role Selection, PS3.7 D.3.3.4). DCMTK has no Storage Commitment SCU
(``storescu`` has none; ``dcmpsnd`` is not in the Debian package), so pynetdicom plays it.

What "committed" means here: the instance's row is committed, its stream is readable
(inline or in a blob file) and its SHA-256 still matches; a row archived as received with
its coding pending counts (the object as received is that stream).
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import time
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from latentpacs import phantom
from latentpacs.codec.tiers import RECEIVED
from latentpacs.errors import Status
from netpeers import HOST, NodeProcess, final_response, start_node, storescu
from test_node import write_config

#: CT Image Storage: a class none of the archived (mammography) instances has.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: A SOP Instance UID nothing was stored under.
UNKNOWN_UID = "1.2.826.0.1.3680043.2.1143.424242.1"
#: How long a test waits for a report before it fails (never reached when all is well).
REPORT_WAIT_S = 60.0
_BLOB = re.compile(r"[0-9a-f]{64}")
_uid_counter = iter(range(1, 1 << 30))


def _transaction_uid() -> str:
    return f"1.2.826.0.1.3680043.2.1143.777.{next(_uid_counter)}"


@dataclass(frozen=True)
class Ref:
    """A (SOP Class UID, SOP Instance UID) pair."""

    sop_class: str
    sop_instance: str


def refs_of(paths: Sequence[Path]) -> list[Ref]:
    """The references of stored Part 10 files, as their sender knows them."""
    out = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append(Ref(str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out


@dataclass
class Report:
    """One N-EVENT-REPORT as received: event type, transaction, committed and failed."""

    event_type: int
    transaction_uid: str
    committed: list[Ref]
    failed: dict[Ref, int]
    retrieve_aet: str


@dataclass
class Reports:
    """Reports received by an EVT_N_EVENT_REPORT handler, with an event per answer sent.

    ``answered`` is set once the N-EVENT-REPORT-RSP is queued for sending (see
    :meth:`watch`): an SCU that releases on the report's arrival alone would send its
    A-RELEASE-RQ before its answer (pynetdicom sends the answer after the handler).
    """

    received: list[Report] = field(default_factory=list)
    answered: threading.Event = field(default_factory=threading.Event)

    def watch(self, assoc: Any) -> None:
        """Set ``answered`` after ``assoc`` has queued an N-EVENT-REPORT response."""
        dimse = assoc.dimse
        send_msg = dimse.send_msg

        def sent(primitive: Any, context_id: int) -> None:
            send_msg(primitive, context_id)
            if (type(primitive).__name__ == "N_EVENT_REPORT"
                    and primitive.MessageIDBeingRespondedTo is not None):
                self.answered.set()

        dimse.send_msg = sent

    def handler(self, event: evt.Event) -> tuple[int, None]:
        """Record the report (decoded here, while the event lives) and answer Success."""
        info = event.event_information
        self.received.append(Report(
            event_type=int(event.event_type or 0),
            transaction_uid=str(info.TransactionUID),
            committed=[Ref(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                       for i in info.get("ReferencedSOPSequence", [])],
            failed={Ref(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)):
                    int(i.FailureReason) for i in info.get("FailedSOPSequence", [])},
            retrieve_aet=str(info.get("RetrieveAETitle", "")),
        ))
        return 0x0000, None

    def wait(self) -> Report:
        """The first report, once answered; fails the test when none arrives."""
        if not self.answered.wait(REPORT_WAIT_S):
            pytest.fail(f"no N-EVENT-REPORT within {REPORT_WAIT_S:.0f} s")
        return self.received[0]


def request_info(refs: Sequence[Ref], transaction_uid: str | None) -> Dataset:
    """Action Information of a Request Storage Commitment (PS3.4 Table J.3-1)."""
    info = Dataset()
    if transaction_uid is not None:
        info.TransactionUID = transaction_uid
    items = []
    for ref in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class
        item.ReferencedSOPInstanceUID = ref.sop_instance
        items.append(item)
    info.ReferencedSOPSequence = DicomSequence(items)
    return info


@dataclass
class Asked:
    """The N-ACTION's response status and, when waited for, the report on the same association."""

    status: Dataset
    reports: Reports


def ask(node: NodeProcess, refs: Sequence[Ref], *, calling: str = "MODALITY",
        transaction_uid: str | None = "", wait: bool = True, listen: bool = True,
        action_type: int = 1, info: Dataset | None = None) -> Asked:
    """N-ACTION Request Storage Commitment from a pynetdicom SCU (PS3.4 J.3.2).

    ``transaction_uid=""`` makes a fresh one, None leaves it out. With ``wait`` the SCU
    keeps the association until the report arrives on it, then releases; otherwise it
    releases right after the response. ``listen=False`` binds no report handler: a
    report on this association is then answered with a failure status by pynetdicom.
    """
    reports = Reports()
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    handlers = [(evt.EVT_N_EVENT_REPORT, reports.handler)] if listen else []
    # As modalities do: propose both roles, SCU for N-ACTION and SCP for the report
    # (PS3.7 D.3.3.4); the node keeps the default roles, and the report may still come here.
    role = build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    assoc = ae.associate(HOST, node.port, ae_title=node.aet, evt_handlers=handlers,
                         ext_neg=[role])
    if not assoc.is_established:
        pytest.fail(f"no association with the node:\n{node.log.read_text()[-3000:]}")
    reports.watch(assoc)
    try:
        uid = _transaction_uid() if transaction_uid == "" else transaction_uid
        status, _reply = assoc.send_n_action(
            info if info is not None else request_info(refs, uid), action_type,
            StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
        if wait and status.get("Status") == Status.SUCCESS:
            reports.wait()
    finally:
        assoc.release()
    return Asked(status, reports)


def _config(folder: Path, **sections: dict[str, object]) -> Path:
    return write_config(folder, f"sqlite:///{folder / 'a.db'}", **sections)


# --- a lossless node with streams in blob files, and a report destination ----------------


@dataclass
class Destination:
    """A pynetdicom SCP taking reports on new associations as AE title SCUAET."""

    port: int
    reports: Reports
    server: Any


@pytest.fixture(scope="module")
def destination() -> Iterator[Destination]:
    reports = Reports()
    ae = AE(ae_title="SCUAET")
    # Accept the node's proposal to be the SCP of the class (role selection, PS3.7 D.3.3.4).
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    handlers = [(evt.EVT_N_EVENT_REPORT, reports.handler),
                (evt.EVT_ESTABLISHED, lambda event: reports.watch(event.assoc))]
    server = ae.start_server((HOST, 0), block=False, evt_handlers=handlers)
    try:
        yield Destination(int(server.server_address[1]), reports, server)
    finally:
        server.shutdown()


@dataclass(frozen=True)
class Lossless:
    """A lossless node (coding in line) holding small images and one large one."""

    node: NodeProcess
    small: list[Ref]
    large: Ref
    folder: Path


@pytest.fixture(scope="module")
def lossless(tmp_path_factory: pytest.TempPathFactory, destination: Destination) -> Iterator[Lossless]:
    folder = tmp_path_factory.mktemp("lossless")
    small = phantom.generate(folder / "small", 3, seed=31, size=(64, 52), images_per_study=3)
    # Full-size-ish: its JPEG-LS stream is well above the 64 KiB inline limit (a blob file).
    large = phantom.generate(folder / "large", 1, seed=32, size=(1024, 832))
    config = _config(
        folder, codec={"tier": "lossless", "deferred": False},
        node={"dimse_timeout": 10.0}, limits={"max_retrieve_instances": 5},
        **{"destinations.SCUAET": {"host": HOST, "port": destination.port}})
    node = start_node(config)
    try:
        stored = storescu(node.port, node.aet, [*small, *large], calling="MODALITY")
        assert final_response(stored).status == Status.SUCCESS, stored.stdout[-2000:]
        yield Lossless(node, refs_of(small), refs_of(large)[0], folder)
    finally:
        node.stop()


def test_known_unknown_and_wrong_class_instances_are_reported_on_the_same_association(
        lossless: Lossless) -> None:
    wrong_class = Ref(CT_IMAGE_STORAGE, lossless.small[1].sop_instance)
    unknown = Ref(lossless.small[0].sop_class, UNKNOWN_UID)
    transaction = _transaction_uid()
    asked = ask(lossless.node, [lossless.small[0], unknown, wrong_class, lossless.small[2]],
                transaction_uid=transaction)
    assert asked.status.Status == Status.SUCCESS
    (report,) = asked.reports.received
    assert report.event_type == 2  # PS3.4 J.3.3: one or more failures
    assert report.transaction_uid == transaction
    assert report.committed == [lossless.small[0], lossless.small[2]]
    assert report.failed == {unknown: 0x0112, wrong_class: 0x0119}
    assert report.retrieve_aet == "LATENTPACS"


def test_all_committed_is_event_type_1(lossless: Lossless) -> None:
    refs = [*lossless.small, lossless.large]
    asked = ask(lossless.node, refs)
    (report,) = asked.reports.received
    assert report.event_type == 1
    assert report.committed == refs and report.failed == {}


def test_invalid_requests_fail_with_an_error_comment(lossless: Lossless) -> None:
    node, one = lossless.node, lossless.small[:1]
    missing = ask(node, one, transaction_uid=None)
    assert missing.status.Status == Status.INVALID_ARGUMENT_VALUE == 0x0115
    assert "Transaction UID" in missing.status.ErrorComment
    bad = ask(node, one, transaction_uid="1.2.x")
    assert bad.status.Status == Status.INVALID_ARGUMENT_VALUE
    assert "not a UID" in bad.status.ErrorComment
    empty = ask(node, [])
    assert empty.status.Status == Status.INVALID_ARGUMENT_VALUE
    assert "Referenced SOP Sequence" in empty.status.ErrorComment
    no_uid = ask(node, [Ref(one[0].sop_class, "")])
    assert no_uid.status.Status == Status.INVALID_ARGUMENT_VALUE
    assert "item 1 SOP Instance UID" in no_uid.status.ErrorComment
    # limits.max_retrieve_instances = 5: six references are refused before any is checked.
    many = ask(node, [one[0]] * 6)
    assert many.status.Status == Status.RESOURCE_LIMITATION == 0x0213
    assert "at most 5" in many.status.ErrorComment
    action = ask(node, one, action_type=2)
    assert action.status.Status == Status.NO_SUCH_ACTION == 0x0123
    for refused in (missing, bad, empty, no_uid, many, action):
        assert refused.reports.received == []  # no report follows a failed N-ACTION


def test_after_release_the_report_comes_on_a_new_association(
        lossless: Lossless, destination: Destination) -> None:
    """SCUAET releases right after the N-ACTION response; the node associates with
    ``[destinations.SCUAET]`` and sends the report there. (Had the node been quicker than
    the release, the report on the first association is answered with a failure, this
    SCU binding no handler, and the node sends it again on a new association.)"""
    transaction = _transaction_uid()
    asked = ask(lossless.node, [lossless.small[0], Ref(lossless.small[0].sop_class, UNKNOWN_UID)],
                calling="SCUAET", transaction_uid=transaction, wait=False, listen=False)
    assert asked.status.Status == Status.SUCCESS
    report = destination.reports.wait()
    assert report.transaction_uid == transaction
    assert report.event_type == 2
    assert report.committed == [lossless.small[0]]
    assert report.failed == {Ref(lossless.small[0].sop_class, UNKNOWN_UID): 0x0112}


def test_a_corrupted_blob_is_a_processing_failure(lossless: Lossless) -> None:
    """Runs last on this node: it breaks the large image's stream blob for good."""
    blobs = [path for path in (lossless.folder / "data").rglob("*")
             if path.is_file() and _BLOB.fullmatch(path.name)]
    assert len(blobs) == 1, blobs  # only the large image's stream is above 64 KiB
    size = blobs[0].stat().st_size
    blobs[0].write_bytes(bytes(size))  # same length, other content
    asked = ask(lossless.node, [lossless.large, lossless.small[0]])
    (report,) = asked.reports.received
    assert report.event_type == 2
    assert report.committed == [lossless.small[0]]
    assert report.failed == {lossless.large: 0x0110}


# --- deferred coding pending; a peer that may not store ---------------------------------


@pytest.fixture(scope="module")
def pending(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, list[Ref], Path]]:
    folder = tmp_path_factory.mktemp("pending")
    images = phantom.generate(folder / "images", 2, seed=33, size=(64, 52), images_per_study=2)
    config = _config(
        folder, codec={"tier": "lossless", "deferred": True, "deferred_background": False},
        security={"allowed_calling_aets": ["MODALITY"], "trust_loopback": False,
                  "unknown_peers": ["echo"]})
    node = start_node(config)
    try:
        stored = storescu(node.port, node.aet, images, calling="MODALITY")
        assert final_response(stored).status == Status.SUCCESS, stored.stdout[-2000:]
        yield node, refs_of(images), folder / "a.db"
    finally:
        node.stop()


def test_rows_pending_as_received_count_as_committed(pending) -> None:
    node, refs, database = pending
    with sqlite3.connect(database) as connection:
        (still_pending,) = connection.execute(
            "SELECT count(*) FROM latents WHERE stream_coder = ?", (RECEIVED,)).fetchone()
    connection.close()
    assert still_pending == len(refs)  # codec.deferred_background = false: not coded yet
    asked = ask(node, refs)
    (report,) = asked.reports.received
    assert report.event_type == 1 and report.committed == refs


def test_a_peer_that_may_not_store_is_refused(pending) -> None:
    node, refs, _database = pending
    asked = ask(node, refs, calling="STRANGER")
    assert asked.status.Status == Status.NOT_AUTHORIZED == 0x0124
    assert asked.status.ErrorComment == "calling AE title STRANGER may not ask storage commitment"
    assert asked.reports.received == []
    assert "refused: not authorized" in node.log.read_text()
