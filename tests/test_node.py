"""The node driven by real peers: DCMTK's SCUs and storescp, on SQLite and PostgreSQL.

Every test starts ``latentpacs serve`` on an OS-assigned loopback port (polled with
C-ECHO) with the shipped ``ae`` model, and stops it by PID; the tests that only query and
retrieve share one such node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomtools import dciodvfy_errors
from latentpacs import phantom
from latentpacs.image.derive import METHOD_LATENT
from latentpacs.errors import Status
from netpeers import (
    NodeProcess,
    StoreSCP,
    echoscu,
    final_response,
    dimse_responses,
    findscu,
    getscu,
    movescu,
    start_node,
    start_storescp,
    storescu,
)

SIZE = (256, 208)
#: 8 images: 2 patients x 2 studies x 2 images (one series each).
COUNT = 8


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(
        tmp_path_factory.mktemp("phantoms"), COUNT, seed=11, size=SIZE, images_per_study=2
    )


def write_config(directory: Path, database: str, **sections: dict[str, object]) -> Path:
    """A node TOML file: data under ``directory``, the given database, extra sections."""
    body = {
        "node": {"aet": "LATENTPACS", "host": "127.0.0.1"},
        "archive": {"database": database, "data_dir": str(directory / "data")},
        "codec": {"model": "ae", "tier": "latent"},
    }
    for section, values in sections.items():
        body.setdefault(section, {}).update(values)
    lines = []
    for section, values in body.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {str(value).lower()}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            elif isinstance(value, list):
                lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
            else:
                lines.append(f"{key} = {value}")
    config = directory / "node.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def make(database: str, **sections: dict[str, object]) -> NodeProcess:
        config = write_config(tmp_path, database, **sections)
        node = start_node(config)
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()


def ok_statuses(proc) -> list[int]:
    return [r.status for r in dimse_responses(proc)]


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    """storescp ``VIEWER``, the shared node's C-MOVE destination."""
    with start_storescp(tmp_path_factory.mktemp("viewer") / "received", aet="VIEWER") as scp:
        yield scp


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory, phantoms: list[Path],
                viewer: StoreSCP) -> Iterator[NodeProcess]:
    """One default (latent, SQLite) node holding the 8 phantoms, with ``VIEWER`` as its
    destination, for the tests that only query and retrieve: one node start and one
    ingest instead of one per test."""
    directory = tmp_path_factory.mktemp("shared-node")
    config = write_config(directory, f"sqlite:///{directory / 'a.db'}",
                          **{"destinations.VIEWER": {"host": "127.0.0.1", "port": viewer.port}})
    with start_node(config) as node:
        assert ok_statuses(storescu(node.port, node.aet, phantoms)) == [Status.SUCCESS] * COUNT
        yield node


def test_store_find_get_and_restart(archive_url, node_factory, phantoms, tmp_path) -> None:
    node = node_factory(archive_url)
    stored = storescu(node.port, node.aet, phantoms)
    assert ok_statuses(stored) == [Status.SUCCESS] * COUNT

    studies = findscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": "", "PatientName": "", "NumberOfStudyRelatedInstances": ""})
    assert studies.final.status == Status.SUCCESS
    assert len(studies.datasets) == 4
    assert {int(ds.NumberOfStudyRelatedInstances) for ds in studies.datasets} == {2}
    assert len(findscu(node.port, node.aet, "PATIENT", {"PatientID": ""}, root="PATIENT").datasets) == 2
    assert len(findscu(node.port, node.aet, "SERIES", {"SeriesInstanceUID": ""}).datasets) == 4
    images = findscu(node.port, node.aet, "IMAGE", {"SOPInstanceUID": "", "SeriesInstanceUID": "", "StudyInstanceUID": ""})
    assert len(images.datasets) == COUNT
    originals = {pydicom.dcmread(p).SOPInstanceUID for p in phantoms}
    shown = {ds.SOPInstanceUID for ds in images.datasets}
    assert not shown & originals, "C-FIND must show the derived identity of the latent tier"

    study_uid = pydicom.dcmread(phantoms[0]).StudyInstanceUID
    got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study_uid}, tmp_path / "get")
    assert got.final.status == Status.SUCCESS
    assert (got.final.completed, got.final.failed) == (2, 0)
    assert len(got.files) == 2
    find_identity = {(ds.SOPInstanceUID, ds.SeriesInstanceUID) for ds in images.datasets if ds.StudyInstanceUID == study_uid}
    for path in got.files:
        ds = pydicom.dcmread(path)
        assert (ds.SOPInstanceUID, ds.SeriesInstanceUID) in find_identity
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod == METHOD_LATENT
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.DerivationCodeSequence[0].CodeValue == "113040"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in originals
        assert ds.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121320"
        assert (ds.Rows, ds.Columns) == SIZE
        assert dciodvfy_errors(path) == []

    # Data survive a restart of the node.
    node.stop()
    again = node_factory(archive_url)
    assert len(findscu(again.port, again.aet, "IMAGE", {"SOPInstanceUID": ""}).datasets) == COUNT
    regot = getscu(again.port, again.aet, "STUDY", {"StudyInstanceUID": study_uid}, tmp_path / "regot")
    assert sorted(p.name for p in regot.files) == sorted(p.name for p in got.files)


def test_matching_types(shared_node, phantoms) -> None:
    node = shared_node
    first = pydicom.dcmread(phantoms[0])
    other_study = next(
        pydicom.dcmread(p).StudyInstanceUID for p in phantoms
        if pydicom.dcmread(p).PatientID != first.PatientID
    )

    def count(level: str, keys: dict[str, str], root: str = "STUDY") -> int:
        result = findscu(node.port, node.aet, level, keys, root=root)
        assert result.final.status == Status.SUCCESS
        return len(result.datasets)

    assert count("STUDY", {"PatientID": first.PatientID}) == 2  # single value
    assert count("STUDY", {"PatientName": "phantom^*"}) == 4  # wildcard, PN case-insensitive
    assert count("STUDY", {"PatientID": "LP000?"}) == 4  # single-character wildcard
    assert count("STUDY", {"PatientID": "NOBODY"}) == 0
    assert count("STUDY", {"StudyInstanceUID": f"{first.StudyInstanceUID}\\{other_study}"}) == 2  # UID list
    assert count("STUDY", {"StudyDate": ""}) == 4  # universal
    dates = sorted({pydicom.dcmread(p).StudyDate for p in phantoms})
    assert count("STUDY", {"StudyDate": f"{dates[0]}-{dates[0]}"}) == sum(
        1 for d in {(pydicom.dcmread(p).StudyInstanceUID, pydicom.dcmread(p).StudyDate) for p in phantoms} if d[1] == dates[0]
    )
    assert count("STUDY", {"StudyDate": "-19000101"}) == 0  # open range
    assert count("STUDY", {"StudyDate": "19000101-"}) == 4
    assert count("IMAGE", {"PatientID": first.PatientID, "SOPInstanceUID": ""}, root="PATIENT") == 4
    answer = findscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": first.StudyInstanceUID, "PatientBirthDate": "", "StudyDescription": "", "AccessionNumber": ""})
    (ds,) = answer.datasets
    assert ds.PatientBirthDate == first.PatientBirthDate  # optional keys filled from the headers
    assert ds.get("StudyDescription", "") == first.get("StudyDescription", "")


def test_bad_identifiers_are_refused_and_the_node_keeps_serving(shared_node, tmp_path) -> None:
    node = shared_node
    bad_level = findscu(node.port, node.aet, "PATIENT", {"PatientID": ""}, root="STUDY")
    assert bad_level.final.status == Status.DOES_NOT_MATCH_SOP_CLASS
    assert bad_level.final.error_comment
    no_level = findscu(node.port, node.aet, "FRAME", {"PatientID": ""})
    assert no_level.final.status == Status.DOES_NOT_MATCH_SOP_CLASS
    bad_get = getscu(node.port, node.aet, "STUDY", {"PatientID": "LP0001"}, tmp_path / "g")  # no Study UID
    assert bad_get.final.status != Status.SUCCESS and bad_get.final.error_comment
    assert not bad_get.files
    assert echoscu(node.port, node.aet).returncode == 0
    assert len(findscu(node.port, node.aet, "IMAGE", {"SOPInstanceUID": ""}).datasets) == COUNT


def test_bad_store_is_refused_with_a_comment(node_factory, phantoms, tmp_path) -> None:
    node = node_factory(f"sqlite:///{tmp_path / 'a.db'}")
    truncated = tmp_path / "truncated.dcm"
    ds = pydicom.dcmread(phantoms[0])
    ds.SOPInstanceUID = "2.25.1"
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(truncated)
    result = storescu(node.port, node.aet, [truncated, phantoms[1]], extra=["-nh"])
    first, second = dimse_responses(result)
    assert first.status == Status.CANNOT_UNDERSTAND and "Pixel Data" in (first.error_comment or "")
    assert second.status == Status.SUCCESS
    answers = findscu(node.port, node.aet, "IMAGE", {"SOPInstanceUID": ""}).datasets
    assert len(answers) == 1  # nothing of the refused image was stored


@pytest.mark.parametrize("policy", ["keep", "reject", "replace"])
def test_duplicate_policy(node_factory, phantoms, tmp_path, policy) -> None:
    node = node_factory(f"sqlite:///{tmp_path / 'a.db'}", archive={"duplicates": policy})
    assert final_response(storescu(node.port, node.aet, phantoms[:1])).status == Status.SUCCESS
    again = final_response(storescu(node.port, node.aet, phantoms[:1]))
    if policy == "reject":
        assert again.status == Status.DUPLICATE_REJECTED and again.error_comment
    else:
        assert again.status == Status.SUCCESS
    assert len(findscu(node.port, node.aet, "IMAGE", {"SOPInstanceUID": ""}).datasets) == 1


def test_lossless_tier_is_bit_exact_with_original_identity(archive_url, node_factory, phantoms, tmp_path) -> None:
    node = node_factory(archive_url, codec={"tier": "lossless"})
    storescu(node.port, node.aet, phantoms)
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in phantoms}
    found = findscu(node.port, node.aet, "IMAGE", {"SOPInstanceUID": ""}).datasets
    assert {ds.SOPInstanceUID for ds in found} == set(by_uid)
    got = getscu(node.port, node.aet, "PATIENT", {"PatientID": "LP0001"}, tmp_path / "get", root="PATIENT")
    assert got.final.failed == 0 and got.files
    for path in got.files:
        ds = pydicom.dcmread(path)
        original = by_uid[ds.SOPInstanceUID]
        assert ds.SeriesInstanceUID == original.SeriesInstanceUID
        assert ds.get("LossyImageCompression") == original.get("LossyImageCompression")
        np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)


def test_move_to_configured_destination_only(shared_node, viewer, phantoms) -> None:
    node = shared_node
    assert viewer.files() == []  # no other test moves to it
    study_uid = pydicom.dcmread(phantoms[0]).StudyInstanceUID
    moved = movescu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study_uid}, "VIEWER")
    final = final_response(moved)
    assert final.status == Status.SUCCESS and (final.completed, final.failed) == (2, 0)
    files = viewer.files()
    assert len(files) == 2
    assert all(pydicom.dcmread(f).LossyImageCompression == "01" for f in files)
    unknown = final_response(movescu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study_uid}, "STRANGER"))
    assert unknown.status == Status.MOVE_DESTINATION_UNKNOWN
    assert len(viewer.files()) == 2


def test_calling_ae_title_access_control(node_factory, tmp_path) -> None:
    """An unlisted calling AE title still associates (unknown peers may echo and store;
    test_security.py covers the rest); a called AE title other than the node's does not.
    (At the lossless tier: only associations are tested, no model engine is needed.)"""
    node = node_factory(f"sqlite:///{tmp_path / 'a.db'}", codec={"tier": "lossless"},
                        security={"allowed_calling_aets": ["FRIEND"], "trust_loopback": "false"})
    assert echoscu(node.port, node.aet, calling="FRIEND").returncode == 0
    assert echoscu(node.port, node.aet, calling="STRANGER").returncode == 0
    assert echoscu(node.port, "NOTTHENODE", calling="FRIEND").returncode != 0


def test_move_cancel_stops_the_sub_operations(node_factory, tmp_path) -> None:
    """A C-CANCEL (PS3.7 9.3.2.3) during a C-MOVE ends it with FE00 and the counts so far.

    Ordered by the peers, not by the machine's speed: the destination (a pynetdicom
    Storage SCP in this process) answers the first C-STORE at once and holds the second
    one's response until the requestor (pynetdicom, same process) has sent its C-CANCEL,
    which it does on the first Pending response. So the cancel is on the node's socket
    before sub-operation 2 can complete, and the node, which checks for a cancel before
    each sub-operation, stops there (or, if it reads the cancel a moment after the
    store response, after sub-operation 3), never running all ten.
    """
    import threading

    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    images = phantom.generate(tmp_path / "ten", 10, seed=13, size=(128, 104), images_per_study=10)
    cancel_sent = threading.Event()
    stored: list[str] = []

    def on_store(event: evt.Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        if len(stored) == 2:
            cancel_sent.wait(timeout=60)
        return 0x0000

    destination = AE(ae_title="VIEWER")
    for context in StoragePresentationContexts:
        destination.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = destination.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        node = node_factory(
            f"sqlite:///{tmp_path / 'a.db'}",
            **{"destinations.VIEWER": {"host": "127.0.0.1", "port": server.server_address[1]}},
        )
        assert final_response(storescu(node.port, node.aet, images)).status == Status.SUCCESS
        requestor = AE(ae_title="MOVESCU")
        requestor.add_requested_context(MOVE)
        assoc = requestor.associate("127.0.0.1", node.port, ae_title=node.aet)
        assert assoc.is_established
        context_id = next(cx.context_id for cx in assoc.accepted_contexts
                          if cx.abstract_syntax == MOVE)
        identifier = pydicom.Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = pydicom.dcmread(images[0]).StudyInstanceUID
        responses = []
        for status, _ in assoc.send_c_move(identifier, "VIEWER", MOVE, msg_id=7):
            responses.append(status)
            if status and status.Status == Status.PENDING and not cancel_sent.is_set():
                assoc.send_c_cancel(7, context_id)
                cancel_sent.set()
        assoc.release()
    finally:
        cancel_sent.set()
        server.shutdown()
    final = responses[-1]
    assert final.Status == Status.CANCEL
    assert final.NumberOfCompletedSuboperations in (2, 3)
    assert final.NumberOfRemainingSuboperations == 10 - final.NumberOfCompletedSuboperations
    assert len(stored) == final.NumberOfCompletedSuboperations
    assert echoscu(node.port, node.aet).returncode == 0


def test_extra_storage_classes_are_configurable(node_factory, shared_node, phantoms, tmp_path) -> None:
    """Grayscale single-frame classes beyond mammography are accepted only when configured."""
    computed_radiography = "1.2.840.10008.5.1.4.1.1.1"
    ds = pydicom.dcmread(phantoms[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = computed_radiography
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "2.25.4242"
    cr = tmp_path / "cr.dcm"
    ds.save_as(cr)

    plain = shared_node  # the default configuration
    refused = storescu(plain.port, plain.aet, [cr])
    assert refused.returncode != 0 and not dimse_responses(refused)

    extended = node_factory(
        f"sqlite:///{tmp_path / 'extended.db'}", node={"extra_storage_classes": [computed_radiography]}
    )
    assert final_response(storescu(extended.port, extended.aet, [cr])).status == Status.SUCCESS
    (found,) = findscu(extended.port, extended.aet, "IMAGE", {"SOPClassUID": "", "SOPInstanceUID": ""}).datasets
    assert found.SOPClassUID == computed_radiography


@dataclass(frozen=True)
class LosslessNode:
    """The shared ``lossless`` node, its database URL and its C-MOVE destination."""

    node: NodeProcess
    database: str
    viewer: StoreSCP


@pytest.fixture(scope="module")
def lossless_node(tmp_path_factory: pytest.TempPathFactory,
                  phantoms: list[Path]) -> Iterator[LosslessNode]:
    """One ``lossless`` SQLite node holding the 8 phantoms, ``VIEWER`` (a storescp of its
    own) as destination, for the two tests that only retrieve from it."""
    directory = tmp_path_factory.mktemp("lossless-node")
    database = f"sqlite:///{directory / 'a.db'}"
    with start_storescp(directory / "viewer", aet="VIEWER") as viewer:
        config = write_config(directory, database, codec={"tier": "lossless"},
                              **{"destinations.VIEWER": {"host": "127.0.0.1", "port": viewer.port}})
        with start_node(config) as node:
            assert ok_statuses(storescu(node.port, node.aet, phantoms)) == [Status.SUCCESS] * COUNT
            yield LosslessNode(node, database, viewer)


def test_lossless_tier_sends_the_archived_jpeg_ls_stream(lossless_node, phantoms, tmp_path) -> None:
    """A C-GET requestor that accepts only JPEG-LS Lossless gets the archived stream itself.

    No decode on the node, and the peer decodes the original pixels bit for bit.
    """
    from pydicom.uid import JPEGLSLossless
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    node = lossless_node.node
    classes = sorted({str(pydicom.dcmread(p).SOPClassUID) for p in phantoms})
    received: list[pydicom.Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="JLSVIEWER")
    ae.add_requested_context(GET)
    for sop_class in classes:
        ae.add_requested_context(sop_class, [JPEGLSLossless])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet,
                         ext_neg=[build_role(c, scp_role=True) for c in classes],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = pydicom.dcmread(phantoms[0]).StudyInstanceUID
    final = [status for status, _ in assoc.send_c_get(identifier, GET)][-1]
    assoc.release()
    assert final.Status == Status.SUCCESS and final.NumberOfCompletedSuboperations == 2
    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in phantoms}
    assert len(received) == 2
    for index, ds in enumerate(received):
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
        np.testing.assert_array_equal(ds.pixel_array, originals[ds.SOPInstanceUID].pixel_array)
        path = tmp_path / f"jls-{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []


def test_get_in_the_compressed_syntax_the_requestor_prefers(shared_node, phantoms, tmp_path) -> None:
    """getscu +xt (JPEG-LS first, native as fallback) gets latent reconstructions JPEG-LS coded.

    The node accepts the requestor's compressed proposal and codes each reconstruction
    losslessly in it: the pixels equal those of an uncompressed C-GET.
    """
    from dicomtools import require
    from netpeers import HOST, _run

    node = shared_node
    study_uid = pydicom.dcmread(phantoms[0]).StudyInstanceUID
    native = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study_uid}, tmp_path / "native")
    out = tmp_path / "jls"
    out.mkdir()
    proc = _run([require("getscu"), "-d", "+xt", "-S", "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={study_uid}", "-od", out, "-aec", node.aet,
                 HOST, str(node.port)], 120)
    final = final_response(proc)
    assert final.status == Status.SUCCESS and (final.completed, final.failed) == (2, 0)
    plain = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in native.files}
    for path in sorted(out.iterdir()):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"  # JPEG-LS Lossless
        np.testing.assert_array_equal(ds.pixel_array, plain[ds.SOPInstanceUID].pixel_array)


def _wait_until_coded(database: str, timeout: float = 300.0) -> None:
    """Poll the archive until the node's background coder has coded every image."""
    import time

    from latentpacs.archive import Archive

    deadline = time.monotonic() + timeout
    with Archive(database, migrate=False, sweep=False) as archive:
        while archive.stats().pending:
            if time.monotonic() > deadline:
                pytest.fail(f"images still pending coding after {timeout:.0f} s")
            time.sleep(0.1)


def test_move_sends_a_lossless_stream_as_archived_where_the_destination_takes_it(
        lossless_node, phantoms) -> None:
    """The node proposes JPEG-LS lossless beside native on a C-MOVE sub-association: a
    destination that accepts it (storescp +xa) gets the archived stream, no decode; the
    pixels are the originals."""
    from pydicom.uid import JPEGLSLossless

    node, viewer = lossless_node.node, lossless_node.viewer
    assert viewer.files() == []  # no other test moves to it
    study_uid = pydicom.dcmread(phantoms[0]).StudyInstanceUID
    _wait_until_coded(lossless_node.database)
    proc = movescu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study_uid}, "VIEWER")
    originals = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, phantoms)
                 if ds.StudyInstanceUID == study_uid}
    assert final_response(proc).completed == len(originals) >= 2
    files = viewer.files()
    assert len(files) == len(originals)
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
        np.testing.assert_array_equal(ds.pixel_array, originals[ds.SOPInstanceUID].pixel_array)
