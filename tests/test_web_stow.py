"""STOW-RS (PS3.18 10.5) against a running node: dicomweb-client and hand-made bodies.

Parts go through the same store path as C-STORE: what was sent comes back by C-GET
(``getscu``) byte for byte at the lossless tier, and each refused part carries the
Failure Reason (0008,1197) its C-STORE status would have, while the other parts of the
same request are stored. One node serves the module (``archive.duplicates = reject``,
``web.max_stow_bytes`` of about three parts); each test sends studies of its own.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from latentpacs import phantom
from latentpacs.errors import Status
from latentpacs.web.stow import SOP_CLASS_NOT_SUPPORTED, STUDY_MISMATCH
from netpeers import echoscu, findscu, getscu
from webpeers import WebNode, start_web_node

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BOUNDARY = "latentpacs-test-boundary"


#: Largest body the module's node takes: three phantom parts (about 110 kB each), not four.
MAX_STOW_BYTES = 400000


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Twelve small phantom mammograms: six studies of two images."""
    return phantom.generate(tmp_path_factory.mktemp("stow-phantoms"), 12, seed=41,
                            size=(256, 208), images_per_study=2)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebNode]:
    with start_web_node(tmp_path_factory.mktemp("stow-node"), tier="lossless",
                        archive={"duplicates": "reject"},
                        web={"max_stow_bytes": MAX_STOW_BYTES}) as node:
        yield node


def instances(web: WebNode, study: str) -> list[str]:
    """SOP Instance UIDs C-FIND (findscu) finds in ``study``, sorted."""
    found = findscu(web.node.port, web.node.aet, "IMAGE",
                    {"StudyInstanceUID": study, "SOPInstanceUID": ""})
    return sorted(ds.SOPInstanceUID for ds in found.datasets)


def multipart(parts: list[bytes], *, boundary: str = BOUNDARY, preamble: bytes = b"",
              part_headers: bytes = b"Content-Type: application/dicom\r\n",
              epilogue: bytes = b"") -> bytes:
    """A multipart/related body (RFC 2046 5.1.1) of ``parts``."""
    body = bytearray(preamble)
    for part in parts:
        body += b"--" + boundary.encode() + b"\r\n" + part_headers + b"\r\n" + part + b"\r\n"
    return bytes(body + b"--" + boundary.encode() + b"--\r\n" + epilogue)


def post(web: WebNode, parts: list[bytes], path: str = "/dicom-web/studies", *,
         content_type: str = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
         token: str | None = "admin", **body: Any) -> tuple[int, dict[str, Any]]:
    answer = web.request("POST", path, token=token, body=multipart(parts, **body),
                         headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
    data = json.loads(answer.body) if answer.body and answer.status in (200, 202, 409) else {}
    return answer.status, data


def items(response: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list((response.get(tag) or {}).get("Value") or [])


def value(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def failures(response: dict[str, Any]) -> dict[str | None, int]:
    """Referenced SOP Instance UID -> Failure Reason of the Failed SOP Sequence."""
    return {value(item, "00081155"): value(item, "00081197") for item in items(response, "00081198")}


def stored(response: dict[str, Any]) -> list[str]:
    return [value(item, "00081155") for item in items(response, "00081199")]


def variant(source: Path, folder: Path, name: str, **changes: Any) -> bytes:
    """``source`` with a new SOP Instance UID and ``changes`` applied, as PS3.10 bytes."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, new in changes.items():
        setattr(ds, keyword, new)
    if "SOPClassUID" in changes:
        ds.file_meta.MediaStorageSOPClassUID = changes["SOPClassUID"]
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def chunked_post(web: WebNode, body: bytes) -> int:
    """POST ``body`` with chunked transfer coding (no Content-Length); the status."""
    connection = http.client.HTTPConnection("127.0.0.1", web.node.web_port or 0, timeout=60)
    try:
        connection.request("POST", "/dicom-web/studies", body=iter([body[i:i + 65536] for i in
                                                                     range(0, len(body), 65536)]),
                           headers={**web.auth(), "Content-Type": (
                               f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')},
                           encode_chunked=True)
        return connection.getresponse().status
    finally:
        connection.close()


def test_stow_with_dicomweb_client_is_exact_at_the_lossless_tier(
        web: WebNode, tmp_path: Path, sources: list[Path]) -> None:
    sent = [pydicom.dcmread(path) for path in sources[:2]]
    response = web.client().store_instances(sent)
    study = sent[0].StudyInstanceUID
    references = response.ReferencedSOPSequence
    assert [item.ReferencedSOPInstanceUID for item in references] == [
        ds.SOPInstanceUID for ds in sent]
    assert "FailedSOPSequence" not in response
    assert response.RetrieveURL == f"{web.dicomweb}/studies/{study}"
    for item, ds in zip(references, sent, strict=True):
        assert item.ReferencedSOPClassUID == ds.SOPClassUID
        assert item.RetrieveURL == (f"{web.dicomweb}/studies/{study}/series/"
                                    f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    got = getscu(web.node.port, web.node.aet, "STUDY", {"StudyInstanceUID": study},
                 tmp_path / "got")
    assert got.final.status == Status.SUCCESS and len(got.files) == 2
    returned = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, got.files)}
    for ds in sent:
        assert returned[ds.SOPInstanceUID].PixelData == ds.PixelData


def test_each_refused_part_has_its_failure_reason_and_the_others_are_stored(
        web: WebNode, tmp_path: Path, sources: list[Path]) -> None:
    first = sources[2].read_bytes()
    assert post(web, [first])[0] == 200
    not_mammography = variant(sources[3], tmp_path, "sc", SOPClassUID=SECONDARY_CAPTURE)
    truncated_ds = pydicom.dcmread(sources[3])
    truncated_ds.SOPInstanceUID = generate_uid()
    truncated_ds.file_meta.MediaStorageSOPInstanceUID = truncated_ds.SOPInstanceUID
    truncated_ds.PixelData = truncated_ds.PixelData[:1000]
    truncated_ds.save_as(tmp_path / "truncated.dcm", enforce_file_format=True)
    truncated = (tmp_path / "truncated.dcm").read_bytes()
    good = sources[3].read_bytes()
    status, response = post(web, [not_mammography, truncated, first, b"not DICOM at all", good])
    assert status == 202
    sc_uid = pydicom.dcmread(tmp_path / "sc.dcm").SOPInstanceUID
    assert failures(response) == {
        sc_uid: SOP_CLASS_NOT_SUPPORTED,
        truncated_ds.SOPInstanceUID: Status.CANNOT_UNDERSTAND,
        pydicom.dcmread(sources[2]).SOPInstanceUID: Status.DUPLICATE_REJECTED,
        None: Status.CANNOT_UNDERSTAND,  # unreadable: no UID to name
    }
    assert stored(response) == [pydicom.dcmread(sources[3]).SOPInstanceUID]

    # Nothing stored: 409, and the node keeps serving.
    status, response = post(web, [not_mammography, b"\x00" * 200])
    assert status == 409 and len(failures(response)) == 2 and not stored(response)
    assert echoscu(web.node.port, web.node.aet).returncode == 0
    assert instances(web, truncated_ds.StudyInstanceUID) == sorted(
        pydicom.dcmread(path).SOPInstanceUID for path in sources[2:4])


def test_a_part_of_another_study_fails_on_the_study_resource(web: WebNode,
                                                             sources: list[Path]) -> None:
    mine = pydicom.dcmread(sources[4])
    other = pydicom.dcmread(sources[6])
    study = mine.StudyInstanceUID
    assert other.StudyInstanceUID != study
    status, response = post(web, [sources[4].read_bytes(), sources[6].read_bytes()],
                            f"/dicom-web/studies/{study}")
    assert status == 202
    assert failures(response) == {other.SOPInstanceUID: STUDY_MISMATCH}
    assert stored(response) == [mine.SOPInstanceUID]
    assert value(response, "00081190") == f"{web.dicomweb}/studies/{study}"
    assert instances(web, study) == [mine.SOPInstanceUID]
    assert instances(web, other.StudyInstanceUID) == []
    assert post(web, [sources[5].read_bytes()], "/dicom-web/studies/1.2.*")[0] == 400


def test_bodies_as_other_clients_write_them_are_parsed(web: WebNode, tmp_path: Path,
                                                      sources: list[Path]) -> None:
    """Unquoted parameters, a start parameter, a preamble and an epilogue, part headers
    with parameters, and bare LF line ends (RFC 2046 5.1.1, RFC 2387)."""
    status, response = post(
        web, [sources[8].read_bytes(), sources[9].read_bytes()],
        content_type=f"Multipart/Related; boundary=\"{BOUNDARY}\"; type=application/dicom; "
                     "start=\"<part1@latentpacs>\"",
        preamble=b"This is a preamble a MIME reader ignores.\r\n",
        part_headers=(b"Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n"
                      b"Content-ID: <part1@latentpacs>\r\n"),
        epilogue=b"and an epilogue\r\n")
    assert status == 200 and len(stored(response)) == 2
    lf_body = (f"--{BOUNDARY}\nContent-Type: application/dicom\n\n").encode() + \
        sources[10].read_bytes() + f"\n--{BOUNDARY}--".encode()
    answer = web.request("POST", "/dicom-web/studies", body=lf_body, headers={
        "Content-Type": f"multipart/related; type=\"application/dicom\"; boundary={BOUNDARY}"})
    assert answer.status == 200, answer.body
    assert answer.headers["content-type"] == "application/dicom+json"
    got = getscu(web.node.port, web.node.aet, "IMAGE",
                 {"StudyInstanceUID": pydicom.dcmread(sources[10]).StudyInstanceUID,
                  "SOPInstanceUID": pydicom.dcmread(sources[10]).SOPInstanceUID},
                 tmp_path / "got")
    assert [pydicom.dcmread(path).PixelData for path in got.files] == [
        pydicom.dcmread(sources[10]).PixelData]


def test_wrong_media_types_bad_bodies_and_too_large_bodies_store_nothing(
        web: WebNode, sources: list[Path]) -> None:
    part = sources[11].read_bytes()
    uid = pydicom.dcmread(sources[11])
    assert 4 * len(part) > MAX_STOW_BYTES > 3 * len(part)
    assert post(web, [part], content_type="application/dicom")[0] == 415
    assert post(web, [part], content_type=(f'multipart/related; type="application/dicom+json"; '
                                           f"boundary={BOUNDARY}"))[0] == 415
    assert post(web, [part], content_type='multipart/related; type="application/dicom"')[0] == 400
    cut = web.request("POST", "/dicom-web/studies", body=multipart([part])[:-30], headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})
    assert cut.status == 400
    assert post(web, [part, *(source.read_bytes() for source in sources[:3])])[0] == 413
    assert chunked_post(web, multipart([part] * 4)) == 413  # no Content-Length: counted as read
    assert uid.SOPInstanceUID not in instances(web, uid.StudyInstanceUID)
    assert post(web, [part])[0] == 200
    assert uid.SOPInstanceUID in instances(web, uid.StudyInstanceUID)
