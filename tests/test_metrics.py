"""``/metrics`` of a running node moves when real peers use it (issue 11, "Metrics").

One ``latentpacs serve`` (latent tier, so the inference engine runs in line; SQLite) with
its web server on an OS-assigned loopback port; DCMTK's storescu, findscu, getscu and
movescu, a pynetdicom association held open, and urllib for HTTP. Each check scrapes
``/metrics`` before and after one action and compares the parsed samples
(prometheus-client's own parser). A second node, with DICOM TLS, counts failed handshakes.
The mapping of URLs to service names and the archive collector's refresh rule are
checked in-process.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from latentpacs import metrics, phantom
from latentpacs.errors import Status
from latentpacs.web.instrument import service_of
from netpeers import (
    HOST,
    NodeProcess,
    _port_written,
    _spawn,
    _stop,
    dimse_responses,
    findscu,
    final_response,
    getscu,
    movescu,
    storescu,
)
from test_node import write_config
from test_tls import _ca, _scu, _signed, _tls_args
from webpeers import WebNode, start_web_node, token_entries

#: The node's association limit: small, so a test can reach it; 3, so that the association
#: of a DCMTK tool the node is still closing never makes it refuse the next tool's.
MAX_ASSOCIATIONS = 3

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(web: WebNode, token: str | None = "admin") -> Samples:
    """Every sample of ``GET /metrics``, by (name, labels); fails unless it answers 200."""
    answer = web.request("GET", "/metrics", token=token)
    assert answer.status == 200, answer.body
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def data_set_bytes(path: Path) -> int:
    """Bytes of a PS3.10 file's data set: what follows its File Meta group (PS3.10 7.1)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"
    return len(raw) - 144 - int.from_bytes(raw[140:144], "little")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(tmp_path_factory.mktemp("phantoms"), 2, seed=5, size=(192, 160),
                            images_per_study=1, studies_per_patient=1)  # 2 studies


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebNode]:
    with start_web_node(tmp_path_factory.mktemp("node"), tier="latent",
                        node={"max_associations": MAX_ASSOCIATIONS}) as node:
        yield node


def test_a_store_moves_requests_bytes_engine_and_archive_size(web: WebNode, images: list[Path]) -> None:
    before = scrape(web)
    stored = storescu(web.node.port, web.node.aet, images[:1])
    assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS]
    after = scrape(web)

    assert moved(before, after, "latentpacs_request_seconds_count", service="C-STORE") == 1
    assert moved(before, after, "latentpacs_requests_total", service="C-STORE", status="0000") == 1
    assert moved(before, after, "latentpacs_associations_total") == 1
    # the data set as sent (storescu sends the file's own Explicit VR Little Endian data set)
    assert moved(before, after, "latentpacs_received_bytes_total",
                 service="C-STORE") == data_set_bytes(images[0])
    archived = moved(before, after, "latentpacs_archived_bytes_total", tier="latent")
    assert archived > 0
    assert moved(before, after, "latentpacs_archived_instances_total", tier="latent") == 1
    # archive size per tier, read from the archive at scrape time
    assert value(after, "latentpacs_archive_instances", tier="latent") == 1
    assert value(after, "latentpacs_archive_bytes", tier="latent") == archived
    assert value(after, "latentpacs_archive_original_bytes", tier="latent") > archived
    assert value(after, "latentpacs_archive_entities", level="IMAGE") == 1
    assert value(after, "latentpacs_deferred_pending_instances") == 0
    # the latent tier encodes in line: one engine batch of one image, one queue wait
    assert moved(before, after, "latentpacs_engine_batch_images_count", kind="encode") == 1
    assert moved(before, after, "latentpacs_engine_batch_images_sum", kind="encode") == 1
    assert moved(before, after, "latentpacs_engine_queue_wait_seconds_count", kind="encode") == 1


def test_find_get_and_move_are_timed_and_their_final_statuses_counted(
        web: WebNode, images: list[Path], tmp_path: Path) -> None:
    stored = storescu(web.node.port, web.node.aet, images[1:2])
    assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS]
    study = str(pydicom.dcmread(images[1], stop_before_pixels=True).StudyInstanceUID)
    before = scrape(web)

    found = findscu(web.node.port, web.node.aet, "STUDY", {"StudyInstanceUID": study})
    assert found.final.status == Status.SUCCESS and len(found.datasets) == 1
    got = getscu(web.node.port, web.node.aet, "STUDY", {"StudyInstanceUID": study}, tmp_path)
    assert got.final.status == Status.SUCCESS and len(got.files) == 1
    nowhere = movescu(web.node.port, web.node.aet, "STUDY", {"StudyInstanceUID": study}, "NOWHERE")
    assert final_response(nowhere).status == 0xA801
    after = scrape(web)

    for service in ("C-FIND", "C-GET", "C-MOVE"):
        assert moved(before, after, "latentpacs_request_seconds_count", service=service) == 1
    assert moved(before, after, "latentpacs_requests_total", service="C-FIND", status="0000") == 1
    assert moved(before, after, "latentpacs_requests_total", service="C-GET", status="0000") == 1
    # set by pynetdicom itself (Move Destination Unknown), counted all the same
    assert moved(before, after, "latentpacs_requests_total", service="C-MOVE", status="A801") == 1
    assert moved(before, after, "latentpacs_sent_bytes_total", service="C-FIND") > 0
    # the C-GET's one C-STORE sub-operation carried the returned object's data set
    assert moved(before, after, "latentpacs_sent_bytes_total",
                 service="C-GET") > data_set_bytes(got.files[0])


def test_refused_associations_are_counted_by_reason(web: WebNode, images: list[Path],
                                                    tmp_path: Path) -> None:
    ct = pydicom.dcmread(images[0])
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.1234.1"
    ct_file = tmp_path / "ct.dcm"
    ct.save_as(ct_file)
    before = scrape(web)

    wrong_called = storescu(web.node.port, "NOT-THE-NODE", images[:1])
    assert wrong_called.returncode != 0
    unsupported = storescu(web.node.port, web.node.aet, [ct_file], extra=["-R"])  # CT only
    assert not dimse_responses(unsupported)  # no context for CT: nothing was sent
    after = scrape(web)

    assert moved(before, after, "latentpacs_associations_refused_total",
                 reason="called-ae-title") == 1
    assert moved(before, after, "latentpacs_associations_refused_total",
                 reason="no-presentation-context") == 1
    assert moved(before, after, "latentpacs_request_seconds_count", service="C-STORE") == 0


def test_open_associations_and_the_association_limit(web: WebNode) -> None:
    """Associations are held open until the node refuses one (``node.max_associations``)."""
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    before = scrape(web)
    held = []
    try:
        for _ in range(MAX_ASSOCIATIONS + 1):
            association = ae.associate(HOST, web.node.port, ae_title=web.node.aet)
            if not association.is_established:
                assert association.is_rejected
                break
            held.append(association)
            # answered only once the node's side is established
            assert association.send_c_echo().Status == Status.SUCCESS
        assert 1 <= len(held) <= MAX_ASSOCIATIONS
        during = scrape(web)
    finally:
        for association in held:
            association.release()
    assert value(during, "latentpacs_associations_open") >= len(held)
    assert moved(before, during, "latentpacs_associations_refused_total",
                 reason="max-associations") == 1
    assert moved(before, during, "latentpacs_requests_total", service="C-ECHO",
                 status="0000") == len(held)


def test_http_requests_are_counted_by_service_and_status(web: WebNode) -> None:
    before = scrape(web)
    assert web.request("GET", "/dicom-web/studies", token=None).status == 401
    assert web.request("GET", "/metrics", token=None).status == 401
    assert web.request("GET", "/metrics", token="reader").status == 403  # query only
    after = scrape(web)

    assert moved(before, after, "latentpacs_requests_total", service="QIDO-RS", status="401") == 1
    assert moved(before, after, "latentpacs_requests_total", service="metrics", status="401") == 1
    assert moved(before, after, "latentpacs_requests_total", service="metrics", status="403") == 1
    assert moved(before, after, "latentpacs_request_seconds_count", service="QIDO-RS") == 1
    assert moved(before, after, "latentpacs_sent_bytes_total", service="QIDO-RS") > 0
    # the scrape before this one was answered, and counted, before ``after`` was rendered
    assert moved(before, after, "latentpacs_requests_total", service="metrics", status="200") == 1


def test_a_stow_moves_received_bytes_and_the_archive_like_a_c_store(
        web: WebNode, tmp_path: Path) -> None:
    (image,) = phantom.generate(tmp_path, 1, seed=9, size=(160, 128), images_per_study=1,
                                studies_per_patient=1)
    boundary = "latentpacs-metrics-test"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
    before = scrape(web)
    stowed = web.request("POST", "/dicom-web/studies", body=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    assert stowed.status == 200, stowed.body
    searched = web.request("GET", "/dicom-web/studies", headers={"Accept": "application/dicom+json"})
    assert searched.status == 200
    after = scrape(web)

    assert moved(before, after, "latentpacs_requests_total", service="STOW-RS", status="200") == 1
    assert moved(before, after, "latentpacs_received_bytes_total", service="STOW-RS") == len(body)
    assert moved(before, after, "latentpacs_sent_bytes_total", service="STOW-RS") == len(stowed.body)
    assert moved(before, after, "latentpacs_archived_instances_total", tier="latent") == 1
    assert moved(before, after, "latentpacs_archive_instances", tier="latent") == 1
    assert moved(before, after, "latentpacs_requests_total", service="QIDO-RS", status="200") == 1
    assert moved(before, after, "latentpacs_sent_bytes_total", service="QIDO-RS") == len(searched.body)


@contextmanager
def tls_web_node(folder: Path, pki: dict[str, tuple[Path, Path]]) -> Iterator[WebNode]:
    """A node with DICOM TLS (client certificate required) and its web server on plain HTTP.

    Started by hand, as tests/test_tls.py does (the harness probes in plain TCP), and
    polled with ``echoscu +tls`` until it answers; stopped by its PID.
    """
    folder.mkdir(parents=True, exist_ok=True)
    secrets_by_name, tokens = token_entries({"admin": ("metrics",)})
    security = {"tls_cert": str(pki["server"][1]), "tls_key": str(pki["server"][0]),
                "tls_ca": str(pki["ca"][1]), "tls_require_client_cert": True}
    config = write_config(folder, f"sqlite:///{folder / 'a.db'}", security=security,
                          codec={"tier": "lossless"}, **tokens)
    port_file, web_port_file, log = folder / "node.port", folder / "web.port", folder / "node.log"
    script = Path(sys.executable).parent / "latentpacs"
    proc = _spawn([script, "--config", config, "serve", "--port", "0", "--port-file", port_file,
                   "--web-port", "0", "--web-port-file", web_port_file], log, cwd=folder)
    try:
        deadline = time.monotonic() + 60.0
        while not (_port_written(port_file)
                   and _scu("echoscu", int(port_file.read_text()), _tls_args(pki, "client"))
                   .returncode == 0):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"TLS node did not answer C-ECHO:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        node = NodeProcess(port=int(port_file.read_text()), aet="LATENTPACS", proc=proc, log=log,
                           web_port=int(web_port_file.read_text()))
        yield WebNode(node, secrets_by_name)
    finally:
        _stop(proc)


def test_a_failed_tls_handshake_counts_as_a_refused_association(tmp_path: Path,
                                                                images: list[Path]) -> None:
    ca = _ca(tmp_path, "ca")
    pki = {"ca": ca, "server": _signed(tmp_path, "server", ca),
           "client": _signed(tmp_path, "client", ca),
           "rogue": _signed(tmp_path, "rogue", _ca(tmp_path, "rogue-ca"))}
    with tls_web_node(tmp_path / "node", pki) as node:
        before = scrape(node)
        plain = storescu(node.node.port, node.node.aet, images[:1])  # no TLS at all
        assert plain.returncode != 0 and not dimse_responses(plain)
        rogue = _scu("storescu", node.node.port, _tls_args(pki, "rogue"), images[:1])
        assert rogue.returncode != 0 and not dimse_responses(rogue)
        after = scrape(node)
    assert moved(before, after, "latentpacs_associations_refused_total", reason="tls-handshake") == 2
    assert moved(before, after, "latentpacs_associations_total") == 0


@pytest.mark.parametrize(("method", "path", "service"), [
    ("GET", "/dicom-web/studies", "QIDO-RS"),
    ("GET", "/dicom-web/series", "QIDO-RS"),
    ("GET", "/dicom-web/studies/1.2.3/series", "QIDO-RS"),
    ("GET", "/dicom-web/studies/1.2.3/series/4.5/instances", "QIDO-RS"),
    ("GET", "/dicom-web/studies/1.2.3", "WADO-RS"),
    ("GET", "/dicom-web/studies/1.2.3/metadata", "WADO-RS"),
    ("GET", "/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1", "WADO-RS"),
    ("GET", "/dicom-web/studies/1.2.3/series/4.5/instances/6.7/rendered", "rendered"),
    ("GET", "/dicom-web/studies/1.2.3/thumbnail", "rendered"),
    ("POST", "/dicom-web/studies", "STOW-RS"),
    ("POST", "/dicom-web/studies/1.2.3", "STOW-RS"),
    ("DELETE", "/dicom-web/studies/1.2.3", "DICOMweb-other"),
    ("GET", "/", "viewer"),
    ("GET", "/viewer/static/viewer.js", "viewer"),
    ("GET", "/viewer/api/studies", "viewer"),
    ("GET", "/dicom-webby", "viewer"),
    ("GET", "/metrics", "metrics"),
])
def test_the_service_label_comes_from_the_route_shape(method: str, path: str, service: str) -> None:
    assert service_of(method, path) == service


class _Figures:
    def __init__(self, instances: int) -> None:
        self.patients = self.studies = self.series = self.instances = instances
        self.tiers = ()
        self.pending = 0


def test_archive_figures_are_fetched_again_only_after_a_change() -> None:
    calls: list[int] = []

    def source() -> _Figures:
        calls.append(1)
        return _Figures(len(calls))

    def instances(collector: metrics.ArchiveCollector) -> int:
        figures = collector.figures()
        assert figures is not None
        return figures.instances

    collector = metrics.ArchiveCollector(max_age_s=3600.0)
    collector.watch(source)
    assert instances(collector) == 1
    assert instances(collector) == 1  # served from the last fetch
    collector.changed()  # this process archived something
    assert instances(collector) == 2
    assert len(calls) == 2
    always = metrics.ArchiveCollector(max_age_s=-1.0)  # every figure is too old
    always.watch(source)
    always.figures()
    always.figures()
    assert len(calls) == 4
