"""The fast DIMSE sending path (:mod:`latentpacs.node.pdata`) against pynetdicom and real peers.

* Framing: the runs are byte for byte what pynetdicom 3.0.4 itself sends,
  ``b"".join(P_DATA_TF(p).encode() for p in msg.encode_msg(cx, max_pdu))``, at maximum PDU
  lengths 0 (unlimited), 4096, 16383 (odd), 16384 and 65537 (odd), for a command-only
  message and C-STOREs with an odd-sized and an 8.8 MB data set; each PDU stays within
  the maximum and no PDU spans two runs. This fails when pynetdicom's fragmentation, or
  the internals the path relies on, change.
* Live, on a node started in this process (``start_node``, lossless tier, so a retrieved
  object has the original Pixel Data byte for byte): DCMTK ``getscu`` at several
  ``-pdu`` sizes (odd ones too) receives files identical to a retrieval with the fast
  path unbound (pynetdicom's own path), and the process-wide counters show that the fast
  path sent every C-STORE in fewer writes than PDUs; C-MOVE to DCMTK ``storescp`` takes
  it on the sub-association; so do a C-GET and a C-MOVE over TLS.
* Mid-transfer: a peer killed while a large C-STORE is being written, a peer that sends
  A-ABORT mid-message, and a C-CANCEL sent mid-message: the node keeps serving (C-ECHO,
  a complete C-GET afterwards), and the cancelled C-GET ends Cancel (FE00) after the one
  sub-operation in flight.

Triggers are the peers' own events (bytes written or received), never sleeps.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE, build_role, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET  # type: ignore[attr-defined]

from dicomtools import require
from latentpacs import phantom
from latentpacs.config import load_config
from latentpacs.errors import Status
from latentpacs.node import pdata
from latentpacs.node.app import Node, start_node
from netpeers import (
    HOST,
    SCU_TIMEOUT_S,
    _run,
    echoscu,
    final_response,
    movescu,
    start_storescp,
    storescu,
)
from test_tls import _move_over_tls, _tls_args, _tls_storescp, pki  # noqa: F401  (pki is a fixture)

MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"
#: 2294 x 1914 x 16 bits: an 8.8 MB mammogram, about 540 PDUs at 16 KiB.
BIG = (2294, 1914)
COUNT = 3
PDU_SIZES = (4096, 16383, 16384, 65537, 131072)


# --- framing -------------------------------------------------------------------------------

def _store_message(size: int) -> DIMSEMessage:
    primitive = C_STORE()
    primitive.MessageID = 3
    primitive.AffectedSOPClassUID = MAMMOGRAPHY
    primitive.AffectedSOPInstanceUID = "2.25.1234"
    primitive.Priority = 0
    primitive.DataSet = BytesIO(bytes((i * 7 + 3) % 251 for i in range(size)))
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return message


def _echo_message() -> DIMSEMessage:
    primitive = C_ECHO()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return message


def _pdus(data: bytes) -> list[tuple[int, int]]:
    """(PDU type, PDU length) of each PDU in ``data``, which must hold whole PDUs only."""
    found, offset = [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset + 2:offset + 6], "big")
        found.append((data[offset], length))
        offset += 6 + length
    assert offset == len(data), "a run ends inside a PDU"
    return found


@pytest.fixture(scope="module")
def messages() -> dict[str, DIMSEMessage]:
    return {"command only": _echo_message(), "odd data set": _store_message(100_001),
            "8.8 MB data set": _store_message(BIG[0] * BIG[1] * 2)}


@pytest.mark.parametrize("max_pdu", [0, 4096, 16383, 16384, 65537])
@pytest.mark.parametrize("kind", ["command only", "odd data set", "8.8 MB data set"])
def test_runs_are_the_bytes_pynetdicom_sends(messages, kind: str, max_pdu: int) -> None:
    message = messages[kind]
    assert pdata.encodable(message, max_pdu)
    expected = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(5, max_pdu))
    runs = list(pdata.encode_runs(message, 5, max_pdu))
    assert b"".join(run.data for run in runs) == expected
    for run in runs:
        pdus = _pdus(run.data)
        assert len(pdus) == run.pdus
        assert all(kind == 0x04 for kind, _ in pdus)
        if max_pdu:
            assert max(length for _, length in pdus) <= max_pdu
    assert all(len(run.data) >= pdata.RUN_BYTES for run in runs[:-1])
    if kind == "8.8 MB data set" and max_pdu == 16384:
        assert sum(run.pdus for run in runs) == 538 and len(runs) == 9


def test_messages_the_path_leaves_to_pynetdicom(messages, tmp_path) -> None:
    """A data set sent from a file, or a maximum PDU length pynetdicom refuses (1 to 6),
    goes through pynetdicom's own path; a C-STORE from memory at any usable length does not."""
    assert not pdata.encodable(messages["odd data set"], 6)
    primitive = C_STORE()
    primitive.MessageID = 4
    primitive.AffectedSOPClassUID = MAMMOGRAPHY
    primitive.AffectedSOPInstanceUID = "2.25.1235"
    primitive.Priority = 0
    (tmp_path / "ds").write_bytes(b"\0" * 64)
    setattr(primitive, "_dataset_path", (tmp_path / "ds", 0))
    from_file = C_STORE_RQ()
    from_file.primitive_to_message(primitive)
    assert not pdata.encodable(from_file, 16384)
    assert all(pdata.encodable(messages["odd data set"], size) for size in (0, 7, 16383))


def test_the_pynetdicom_internals_the_path_relies_on() -> None:
    """DT-1 and AR-7 send through ``dul._send(P_DATA_TF(primitive))``, and a P-DATA-TF
    built from a primitive keeps each PDV's value object: the wrapper recognises a run."""
    import inspect

    from pynetdicom import fsm

    for action in (fsm.DT_1, fsm.AR_7):
        assert "dul._send(P_DATA_TF(primitive))" in inspect.getsource(action)
    assert pdata._DATA_STATES == {"Sta6", "Sta8"}
    run = pdata.Run(b"", 0)
    pdu = P_DATA_TF(pdata.RunPrimitive(1, run))
    assert pdu.presentation_data_value_items[0].presentation_data_value is run


# --- live ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """3 mammograms of 8.8 MB in one study."""
    return phantom.generate(tmp_path_factory.mktemp("big"), COUNT, seed=41, size=BIG,
                            images_per_study=COUNT)


def _config(directory: Path, extra: str = "") -> Path:
    config = directory / "node.toml"
    config.write_text(
        '[node]\naet = "LATENTPACS"\nhost = "127.0.0.1"\nport = 0\n'
        f'[archive]\ndatabase = "sqlite:///{directory / "a.db"}"\n'
        f'data_dir = "{directory / "data"}"\n'
        '[codec]\nmodel = "ae"\ntier = "lossless"\n' + extra)
    return config


@contextmanager
def _node(config: Path) -> Iterator[Node]:
    """The node in this process, so the test can read its counters and bind handlers."""
    chunked = pynetdicom_config.STORE_RECV_CHUNKED_DATASET
    node = start_node(load_config(config))
    try:
        yield node
    finally:
        node.stop(grace=5.0)
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = chunked


@dataclass(frozen=True)
class Served:
    node: Node
    viewer_dir: Path
    study: str
    #: SOP Instance UID -> the original Pixel Data.
    pixels: dict[str, bytes]
    #: getscu's files with the fast path unbound (pynetdicom's own sending), by file name.
    reference: dict[str, bytes]


def _getscu(port: int, out_dir: Path, study: str, *, pdu: int = 16384,
            extra: Sequence[str] = ()) -> tuple[subprocess.CompletedProcess[str], dict[str, bytes]]:
    out_dir.mkdir(parents=True)
    proc = _run([require("getscu"), "-d", "-to", "10", "-pdu", str(pdu), *extra, "-S",
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                 "-od", out_dir, "-aet", "GETSCU", "-aec", "LATENTPACS", HOST, str(port)],
                SCU_TIMEOUT_S)
    return proc, {path.name: path.read_bytes() for path in sorted(out_dir.iterdir())}


def _sent_stores() -> int:
    return pdata.totals().messages.get("C_STORE_RQ", 0)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, big_images: list[Path]) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("node")
    originals = [pydicom.dcmread(path) for path in big_images]
    with start_storescp(directory / "viewer", aet="VIEWER") as viewer, \
            _node(_config(directory, f'[destinations.VIEWER]\nhost = "127.0.0.1"\n'
                                     f"port = {viewer.port}\n")) as node:
        assert final_response(storescu(node.port, "LATENTPACS", big_images)).status == Status.SUCCESS
        study = str(originals[0].StudyInstanceUID)
        node.server.unbind(*pdata.ON_ACCEPTED)  # type: ignore[attr-defined]
        before = _sent_stores()
        proc, reference = _getscu(node.port, directory / "reference", study)
        node.server.bind(*pdata.ON_ACCEPTED)  # type: ignore[attr-defined]
        assert _sent_stores() == before, "the fast path ran while it was unbound"
        assert final_response(proc).status == Status.SUCCESS and len(reference) == COUNT
        yield Served(node, viewer.directory, study,
                     {str(ds.SOPInstanceUID): ds.PixelData for ds in originals}, reference)


def _assert_originals(served: Served, files: dict[str, bytes]) -> None:
    assert len(files) == COUNT
    for data in files.values():
        ds = pydicom.dcmread(BytesIO(data))
        assert ds.PixelData == served.pixels[str(ds.SOPInstanceUID)]


@pytest.mark.parametrize("pdu", PDU_SIZES)
def test_getscu_receives_the_same_bytes_at_every_pdu_size(served, tmp_path, pdu: int) -> None:
    before = pdata.totals()
    proc, files = _getscu(served.node.port, tmp_path / "get", served.study, pdu=pdu)
    after = pdata.totals()
    final = final_response(proc)
    assert final.status == Status.SUCCESS and (final.completed, final.failed) == (COUNT, 0)
    assert files == served.reference
    _assert_originals(served, files)
    assert after.messages.get("C_STORE_RQ", 0) - before.messages.get("C_STORE_RQ", 0) == COUNT
    pdus, runs = after.pdus - before.pdus, after.runs - before.runs
    assert pdus >= COUNT * (BIG[0] * BIG[1] * 2) // pdu  # each PDU within the peer's maximum
    assert runs < pdus / 3


def test_move_to_storescp_goes_through_the_fast_path(served) -> None:
    before = _sent_stores()
    moved = movescu(served.node.port, "LATENTPACS", "STUDY", {"StudyInstanceUID": served.study},
                    "VIEWER")
    final = final_response(moved)
    assert final.status == Status.SUCCESS and final.completed == COUNT
    assert _sent_stores() - before == COUNT
    received = sorted(served.viewer_dir.glob("*.dcm"))
    assert len(received) == COUNT
    references = {str(ds.SOPInstanceUID): ds for ds in
                  (pydicom.dcmread(BytesIO(data)) for data in served.reference.values())}
    for path in received:
        ds = pydicom.dcmread(path)
        reference = references[str(ds.SOPInstanceUID)]
        original = served.pixels[str(ds.SOPInstanceUID)]
        if ds.file_meta.TransferSyntaxUID == JPEGLSLossless:
            # storescp +xa takes JPEG-LS lossless: a coded image goes as it is archived.
            assert ds.pixel_array.tobytes() == original
        else:  # still archived as received (deferred coding): native, byte for byte
            assert ds.PixelData == original
        del ds.PixelData, reference.PixelData
        assert ds == reference  # every other attribute, as C-GET sent it


def test_a_peer_killed_mid_transfer_leaves_the_node_serving(served, tmp_path) -> None:
    """getscu is SIGKILLed from the node's own event for its 3rd large write (of 9 for the
    first image): the rest of that C-STORE meets a closed socket (Evt17)."""
    launched = threading.Event()
    holder: list[subprocess.Popen[bytes]] = []
    writes: list[int] = []

    def on_write(event: evt.Event) -> None:
        if len(event.data) < pdata.RUN_BYTES:
            return
        writes.append(len(event.data))
        if len(writes) == 3:
            launched.wait(timeout=60)
            os.kill(holder[0].pid, signal.SIGKILL)

    out_dir = tmp_path / "killed"
    out_dir.mkdir()
    served.node.server.bind(evt.EVT_DATA_SENT, on_write)  # type: ignore[attr-defined]
    try:
        proc = subprocess.Popen(
            [require("getscu"), "-to", "10", "-S", "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={served.study}", "-od", str(out_dir), "-aet", "GETSCU",
             "-aec", "LATENTPACS", HOST, str(served.node.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        holder.append(proc)
        launched.set()
        assert proc.wait(timeout=SCU_TIMEOUT_S) == -signal.SIGKILL
    finally:
        launched.set()
        served.node.server.unbind(evt.EVT_DATA_SENT, on_write)  # type: ignore[attr-defined]
    assert len(writes) >= 3
    assert not list(out_dir.iterdir()), "the first image arrived whole"
    assert echoscu(served.node.port, "LATENTPACS").returncode == 0
    proc_after, files = _getscu(served.node.port, tmp_path / "after", served.study)
    assert final_response(proc_after).status == Status.SUCCESS
    assert files == served.reference


def _get_requestor(max_pdu: int) -> AE:
    requestor = AE(ae_title="PYGETSCU")
    requestor.maximum_pdu_size = max_pdu
    requestor.add_requested_context(GET)
    requestor.add_requested_context(MAMMOGRAPHY, [ExplicitVRLittleEndian])
    return requestor


def _study_identifier(study: str) -> pydicom.Dataset:
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    return identifier


def test_a_cancel_mid_transfer_ends_the_get_after_the_image_in_flight(served) -> None:
    """pynetdicom as C-GET SCU with an unlimited maximum PDU length (0): the node sends each
    8.8 MB data set as one PDU. The C-CANCEL goes out on the first PDU received, while the
    node is still writing image 1; the node reads it before image 1's C-STORE response
    and stops before image 2 (PS3.4 C.4.3.3)."""
    received: dict[str, bytes] = {}
    cancelled = threading.Event()

    def on_pdu(event: evt.Event) -> None:
        if isinstance(event.pdu, P_DATA_TF) and not cancelled.is_set():
            cancelled.set()
            context = next(cx for cx in event.assoc.accepted_contexts if cx.abstract_syntax == GET)
            event.assoc.send_c_cancel(7, context.context_id)

    def on_store(event: evt.Event) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = event.dataset.PixelData
        return 0x0000

    requestor = _get_requestor(0)
    before = pdata.totals()
    assoc = requestor.associate(HOST, served.node.port, ae_title="LATENTPACS",
                                ext_neg=[build_role(MAMMOGRAPHY, scp_role=True)],
                                evt_handlers=[(evt.EVT_PDU_RECV, on_pdu),
                                              (evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    responses = [status for status, _ in assoc.send_c_get(_study_identifier(served.study), GET,
                                                          msg_id=7)]
    assoc.release()
    final = responses[-1]
    assert cancelled.is_set()
    assert final.Status == Status.CANCEL
    assert (final.NumberOfCompletedSuboperations, final.NumberOfRemainingSuboperations) == (1, 2)
    assert len(received) == 1
    for uid, pixels in received.items():
        assert pixels == served.pixels[uid]
    after = pdata.totals()
    assert after.messages.get("C_STORE_RQ", 0) - before.messages.get("C_STORE_RQ", 0) == 1
    assert after.pdus - before.pdus >= 2  # command and the whole data set, one PDU each
    assert echoscu(served.node.port, "LATENTPACS").returncode == 0


def test_an_abort_mid_transfer_leaves_the_node_serving(served, tmp_path) -> None:
    """pynetdicom as C-GET SCU aborts (A-ABORT, PS3.8 7.3) on its 100th P-DATA-TF, in the
    middle of image 1 (538 PDUs at 16 KiB)."""
    stored: list[str] = []
    count = [0]

    def on_pdu(event: evt.Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            count[0] += 1
            if count[0] == 100:
                threading.Thread(target=event.assoc.abort).start()

    def on_store(event: evt.Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    requestor = _get_requestor(16384)
    # After its own abort, pynetdicom's send_c_get waits out its DIMSE timeout for a
    # response that cannot come: 5 s instead of 30 (the node answers within a second).
    requestor.dimse_timeout = 5
    assoc = requestor.associate(
        HOST, served.node.port, ae_title="LATENTPACS",
        ext_neg=[build_role(MAMMOGRAPHY, scp_role=True)],
        evt_handlers=[(evt.EVT_PDU_RECV, on_pdu), (evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    for _ in assoc.send_c_get(_study_identifier(served.study), GET, msg_id=9):
        pass
    assoc.join(timeout=60)  # pynetdicom's thread
    assert not assoc.is_established and count[0] >= 100 and not stored
    assert echoscu(served.node.port, "LATENTPACS").returncode == 0
    proc, files = _getscu(served.node.port, tmp_path / "after", served.study, pdu=16383)
    assert final_response(proc).status == Status.SUCCESS
    assert files == served.reference


def _cells(ds: pydicom.Dataset) -> bytes:
    """Native Pixel Data as sent, or the cells a JPEG-LS lossless object decodes to."""
    if ds.file_meta.TransferSyntaxUID == JPEGLSLossless:
        return bytes(ds.pixel_array.tobytes())
    return bytes(ds.PixelData)


def test_get_and_move_over_tls_go_through_the_fast_path(tmp_path, pki, big_images) -> None:  # noqa: F811
    """TLS (PS3.15 B.1) both ways: a C-GET from a pynetdicom SCU over TLS at an odd
    maximum PDU length (DCMTK 3.6's getscu has no ``+tls``), and a C-MOVE whose
    sub-association goes to a TLS-only ``storescp +tls`` (the node as TLS client)."""
    images = big_images[:2]
    pixels = {str(ds.SOPInstanceUID): ds.PixelData for ds in map(pydicom.dcmread, images)}
    study = str(pydicom.dcmread(images[0]).StudyInstanceUID)
    received = tmp_path / "received"
    with _tls_storescp(received, pki, "SECURE") as scp_port:
        security = (f'[security]\ntls_cert = "{pki["server"][1]}"\n'
                    f'tls_key = "{pki["server"][0]}"\ntls_ca = "{pki["ca"][1]}"\n'
                    "tls_require_client_cert = true\n"
                    f'[destinations.SECURE]\nhost = "{HOST}"\nport = {scp_port}\ntls = true\n')
        with _node(_config(tmp_path, security)) as node:
            stored = _run([require("storescu"), "-to", "10", *_tls_args(pki, "client"),
                           "-aet", "TLSSCU", "-aec", "LATENTPACS", HOST, str(node.port),
                           *map(str, images)], SCU_TIMEOUT_S)
            assert stored.returncode == 0, stored.stdout + stored.stderr

            got: dict[str, bytes] = {}

            def on_store(event: evt.Event) -> int:
                got[str(event.request.AffectedSOPInstanceUID)] = event.dataset.PixelData
                return 0x0000

            context = ssl.create_default_context(cafile=str(pki["ca"][1]))
            context.load_cert_chain(certfile=str(pki["client"][1]), keyfile=str(pki["client"][0]))
            before = _sent_stores()
            assoc = _get_requestor(16383).associate(
                HOST, node.port, ae_title="LATENTPACS", tls_args=(context, HOST),
                ext_neg=[build_role(MAMMOGRAPHY, scp_role=True)],
                evt_handlers=[(evt.EVT_C_STORE, on_store)])
            assert assoc.is_established
            responses = [status for status, _ in assoc.send_c_get(_study_identifier(study), GET)]
            assoc.release()
            assert responses[-1].Status == Status.SUCCESS
            assert got == pixels
            assert _sent_stores() - before == 2

            moved = _move_over_tls(node.port, pki, study, "SECURE")
            assert (moved.Status, moved.NumberOfCompletedSuboperations) == (Status.SUCCESS, 2)
            assert _sent_stores() - before == 4
    files = sorted(received.glob("*.dcm"))
    # Native, or JPEG-LS as archived where storescp took it: the original cells either way.
    assert {str(ds.SOPInstanceUID): _cells(ds) for ds in map(pydicom.dcmread, files)} == pixels
