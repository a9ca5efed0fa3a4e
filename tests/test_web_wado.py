"""WADO-RS (PS3.18 10.4) against the reference client, compared with what C-GET returns.

Images go in with DCMTK ``storescu``; the node's answers are read with ``dicomweb-client``
(``retrieve_study/series/instance``, metadata, bulk data, frames, rendered) and with plain
HTTP for the refusals, and compared with DCMTK ``getscu`` of the same UIDs: the same SOP
Instance UIDs, Lossy Image Compression and Pixel Data bytes, at the ``latent`` tier (derived
objects) and at ``lossless`` (the original pixels, native and as the archived JPEG-LS).
"""

from __future__ import annotations

import email.parser
import hashlib
import email.policy
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from latentpacs import phantom
from latentpacs.codec.jpegls import decode_stream
from latentpacs.errors import Status
from latentpacs.web.render import VoiFunction, Window, apply_window, to_8bit, presentation_of
from netpeers import final_response, getscu, storescu
from webpeers import WebNode, start_web_node

SIZE = (256, 208)
DICOM_ANY = (("application/dicom", "*"),)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """4 phantoms: 1 patient, 2 studies of one series with 2 images each."""
    return phantom.generate(tmp_path_factory.mktemp("phantoms"), 4, seed=31, size=SIZE,
                            images_per_study=2)


def _stored(node: WebNode, images: list[Path]) -> None:
    result = storescu(node.node.port, node.node.aet, images)
    assert final_response(result).status == Status.SUCCESS, result.stdout[-2000:]


@pytest.fixture(scope="module")
def lossless(tmp_path_factory: pytest.TempPathFactory, images: list[Path]) -> Iterator[WebNode]:
    # Coded at store time (not deferred): transfer-syntax=* then always finds the JPEG-LS
    # stream archived, whatever the background coder's progress.
    with start_web_node(tmp_path_factory.mktemp("lossless"), tier="lossless",
                        codec={"deferred": False}) as node:
        _stored(node, images)
        yield node


@pytest.fixture(scope="module")
def latent(tmp_path_factory: pytest.TempPathFactory, images: list[Path]) -> Iterator[WebNode]:
    with start_web_node(tmp_path_factory.mktemp("latent"), tier="latent") as node:
        _stored(node, images)
        yield node


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _studies(images: list[Path]) -> list[str]:
    return sorted({str(_header(path).StudyInstanceUID) for path in images})


def _got(node: WebNode, study: str, out: Path) -> dict[str, pydicom.Dataset]:
    """What C-GET of ``study`` returns, by SOP Instance UID."""
    got = getscu(node.node.port, node.node.aet, "STUDY", {"StudyInstanceUID": study}, out)
    assert got.final.status == Status.SUCCESS, got.proc.stdout[-2000:]
    return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, got.files)}


def _same_as_get(web: list[pydicom.Dataset], dimse: dict[str, pydicom.Dataset]) -> None:
    assert sorted(str(ds.SOPInstanceUID) for ds in web) == sorted(dimse)
    for ds in web:
        other = dimse[str(ds.SOPInstanceUID)]
        assert ds.SeriesInstanceUID == other.SeriesInstanceUID
        assert ds.LossyImageCompression == other.LossyImageCompression
        assert ds.get("DerivationDescription") == other.get("DerivationDescription")
        assert _digest(ds.PixelData) == _digest(other.PixelData)


def _digest(data: bytes) -> str:
    """SHA-256 of ``data``: compared instead of the bytes, so a failure prints two lines."""
    return hashlib.sha256(bytes(data)).hexdigest()


def _parts(answer_body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related answer (RFC 2387)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + answer_body)
    assert message.is_multipart(), content_type
    return [(part.get_content_type() + "".join(f"; {k}={v}" for k, v in part.get_params()[1:]),
             part.get_payload(decode=True)) for part in message.iter_parts()]


def test_lossless_study_and_instance_are_the_originals_as_c_get_returns_them(
        lossless: WebNode, images: list[Path], tmp_path: Path) -> None:
    client = lossless.client()
    originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, images)}
    for study in _studies(images):
        web = client.retrieve_study(study)
        assert len(web) == 2
        for ds in web:
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert _digest(ds.PixelData) == _digest(originals[str(ds.SOPInstanceUID)].PixelData)
            assert ds.LossyImageCompression == "00"
        _same_as_get(web, _got(lossless, study, tmp_path / study))
    first = originals[str(_header(images[0]).SOPInstanceUID)]
    one = client.retrieve_instance(first.StudyInstanceUID, first.SeriesInstanceUID,
                                   first.SOPInstanceUID,
                                   media_types=(("application/dicom", ExplicitVRLittleEndian),))
    assert _digest(one.PixelData) == _digest(first.PixelData)
    series = client.retrieve_series(first.StudyInstanceUID, first.SeriesInstanceUID)
    assert sorted(ds.SOPInstanceUID for ds in series) == sorted(
        uid for uid, ds in originals.items() if ds.SeriesInstanceUID == first.SeriesInstanceUID)


def test_lossless_transfer_syntax_star_and_jpeg_ls_send_the_archived_stream(
        lossless: WebNode, images: list[Path]) -> None:
    client = lossless.client()
    original = pydicom.dcmread(images[1])
    uids = (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    for media_types in (DICOM_ANY, (("application/dicom", JPEGLSLossless),)):
        ds = client.retrieve_instance(*uids, media_types=media_types)
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless, media_types
        assert np.array_equal(ds.pixel_array, original.pixel_array)
        assert len(ds.PixelData) < len(original.PixelData)  # encapsulated, compressed
    # q values: JPEG-LS preferred over native at q=1; native when it weighs more.
    answer = lossless.request("GET", "/dicom-web/studies/{}/series/{}/instances/{}".format(*uids),
                              headers={"Accept": 'multipart/related; type="application/dicom"; '
                                       "transfer-syntax=1.2.840.10008.1.2.4.80; q=0.4, "
                                       'multipart/related; type="application/dicom"; q=0.9'})
    assert answer.status == 200
    ((part_type, body),) = _parts(answer.body, answer.headers["content-type"])
    assert part_type == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
    assert _digest(pydicom.dcmread(io.BytesIO(body)).PixelData) == _digest(original.PixelData)


def test_latent_series_and_study_are_the_derived_objects_c_get_returns(
        latent: WebNode, images: list[Path], tmp_path: Path) -> None:
    client = latent.client()
    study = _studies(images)[0]
    dimse = _got(latent, study, tmp_path / "get")
    originals = {str(_header(path).SOPInstanceUID) for path in images}
    assert not originals & set(dimse)  # derived UIDs
    web = client.retrieve_study(study)
    _same_as_get(web, dimse)
    assert {ds.LossyImageCompression for ds in web} == {"01"}
    (series,) = {str(ds.SeriesInstanceUID) for ds in dimse.values()}
    _same_as_get(client.retrieve_series(study, series), dimse)
    sop = sorted(dimse)[0]
    _same_as_get([client.retrieve_instance(study, series, sop)], {sop: dimse[sop]})


def test_metadata_is_the_returned_header_with_pixel_data_as_bulk_data(
        latent: WebNode, images: list[Path], tmp_path: Path) -> None:
    client = latent.client()
    study = _studies(images)[1]
    dimse = _got(latent, study, tmp_path / "get")
    sop = sorted(dimse)[0]
    returned = dimse[sop]
    series = str(returned.SeriesInstanceUID)
    meta = client.retrieve_instance_metadata(study, series, sop)
    assert meta["00080018"]["Value"] == [sop]
    assert meta["00282110"]["Value"] == ["01"]  # Lossy Image Compression, as C-GET sends it
    assert meta["00280010"]["Value"] == [SIZE[0]] and meta["00280011"]["Value"] == [SIZE[1]]
    assert "00280006" not in meta and "latentpacsVR" not in str(meta)
    sent = {tag: element for tag, element in returned.to_json_dict().items() if tag != "7FE00010"}
    assert {tag: element for tag, element in meta.items() if tag != "7FE00010"} == sent
    uri = meta["7FE00010"]["BulkDataURI"]
    assert uri == f"{latent.dicomweb}/studies/{study}/series/{series}/instances/{sop}/bulkdata/7FE00010"
    (pixels,) = client.retrieve_bulkdata(uri)
    assert _digest(pixels) == _digest(returned.PixelData)
    assert pydicom.Dataset.from_json(
        {k: v for k, v in meta.items() if k != "7FE00010"}).SOPInstanceUID == sop
    listed = client.retrieve_series_metadata(study, series)
    assert sorted(item["00080018"]["Value"][0] for item in listed) == sorted(dimse)
    study_meta = client.retrieve_study_metadata(study)
    assert len(study_meta) == len(dimse)


def test_frames_are_the_pixel_cells_and_the_archived_jpeg_ls(
        lossless: WebNode, latent: WebNode, images: list[Path], tmp_path: Path) -> None:
    original = pydicom.dcmread(images[2])
    uids = (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    client = lossless.client()
    (frame,) = client.retrieve_instance_frames(*uids, [1])
    assert _digest(frame) == _digest(original.PixelData)
    (frame,) = client.retrieve_instance_frames(*uids, [1], media_types=("application/octet-stream",))
    assert _digest(frame) == _digest(original.PixelData)
    (jls,) = client.retrieve_instance_frames(*uids, [1], media_types=("image/jls",))
    assert np.array_equal(decode_stream(jls), original.pixel_array)
    base = "/dicom-web/studies/{}/series/{}/instances/{}".format(*uids)
    assert lossless.request("GET", base + "/frames/2").status == 404
    assert lossless.request("GET", base + "/frames/1,x").status == 400
    assert lossless.request("GET", base + "/frames/0").status == 400
    # The latent tier: the frame is the derived object's, as C-GET returns it.
    dimse = _got(latent, str(original.StudyInstanceUID), tmp_path / "get")
    derived = next(ds for ds in dimse.values()
                   if ds.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID)
    (frame,) = latent.client().retrieve_instance_frames(
        original.StudyInstanceUID, derived.SeriesInstanceUID, derived.SOPInstanceUID, [1])
    assert _digest(frame) == _digest(derived.PixelData)


def _expected_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR to 0..255, written out independently of the node."""
    x = values.astype(np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0, y)
    y = np.where(x > center - 0.5 + (width - 1) / 2, 255, y)
    return np.rint(y).astype(np.uint8)


def test_rendered_png_applies_the_window_and_jpeg_and_viewport(
        lossless: WebNode, images: list[Path]) -> None:
    client = lossless.client()
    for path in images[::2]:  # one image of each study: MONOCHROME1 and MONOCHROME2
        original = pydicom.dcmread(path)
        uids = (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
        png = client.retrieve_instance_rendered(*uids, media_types=("image/png",))
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.mode == "L"
        assert image.size == (SIZE[1], SIZE[0])
        shown = np.asarray(image)
        assert shown.std() > 5  # not blank
        values = original.pixel_array
        center = float(round(np.median(values)))
        width = float(round(np.percentile(values, 90) - np.percentile(values, 10)))
        windowed = np.asarray(Image.open(io.BytesIO(client.retrieve_instance_rendered(
            *uids, media_types=("image/png",),
            params={"window": f"{center:g},{width:g},linear"}))))
        expected = _expected_linear(values, center, width)
        if original.PhotometricInterpretation == "MONOCHROME1":
            expected = 255 - expected
        low = np.unravel_index(values.argmin(), values.shape)
        high = np.unravel_index(values.argmax(), values.shape)
        middle = np.unravel_index(np.abs(values - center).argmin(), values.shape)
        for where in (low, high, middle, (SIZE[0] // 2, SIZE[1] // 2), (10, 10)):
            assert windowed[where] == expected[where], (path.name, where)
        assert not np.array_equal(windowed, shown)
        jpeg = client.retrieve_instance_rendered(*uids, media_types=("image/jpeg",),
                                                 params={"quality": 80, "viewport": "104,128"})
        assert jpeg[:2] == b"\xff\xd8"
        assert Image.open(io.BytesIO(jpeg)).size == (104, 128)
    first = pydicom.dcmread(images[0])
    # dicomweb-client hands back the multipart body as it is; its first line names the boundary.
    body = client.retrieve_series_rendered(first.StudyInstanceUID, first.SeriesInstanceUID,
                                           media_types=("image/png",))
    boundary = body.split(b"\r\n", 1)[0][2:].decode()
    parts = _parts(body, f'multipart/related; type="image/png"; boundary={boundary}')
    assert [kind for kind, _ in parts] == ["image/png", "image/png"]
    assert {Image.open(io.BytesIO(body)).size for _, body in parts} == {(SIZE[1], SIZE[0])}
    study = lossless.request("GET", f"/dicom-web/studies/{first.StudyInstanceUID}/rendered")
    assert study.status == 200 and len(_parts(study.body, study.headers["content-type"])) == 2
    frame = lossless.request("GET", f"/dicom-web/studies/{first.StudyInstanceUID}/series/"
                             f"{first.SeriesInstanceUID}/instances/{first.SOPInstanceUID}"
                             "/frames/1/rendered")
    assert frame.status == 200 and frame.headers["content-type"] == "image/png"


def test_render_without_http_follows_the_voi_lut_functions() -> None:
    ds = pydicom.Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth, ds.RescaleSlope, ds.RescaleIntercept = 100, 51, 2, -10
    presentation = presentation_of(ds)
    stored = np.array([[0, 30, 55, 80]], dtype=np.uint16)  # rescaled: -10, 50, 100, 150
    assert to_8bit(stored, presentation).tolist() == [[0, 0, 130, 255]]
    exact = apply_window(np.array([75.0, 100.0, 125.0]), Window(100, 50, VoiFunction.LINEAR_EXACT))
    assert exact.tolist() == [0, 128, 255]
    sigmoid = apply_window(np.array([100.0]), Window(100, 50, VoiFunction.SIGMOID))
    assert sigmoid.tolist() == [128]
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert to_8bit(stored, presentation_of(ds)).tolist() == [[255, 255, 125, 0]]


def test_refusals_name_the_http_status(lossless: WebNode, images: list[Path]) -> None:
    original = _header(images[0])
    study = f"/dicom-web/studies/{original.StudyInstanceUID}"
    instance = (f"{study}/series/{original.SeriesInstanceUID}/instances/{original.SOPInstanceUID}")
    assert lossless.request("GET", "/dicom-web/studies/1.2.3.999").status == 404
    assert lossless.request("GET", f"{study}/series/1.2.3.999/metadata").status == 404
    assert lossless.request("GET", "/dicom-web/studies/1.2.abc").status == 400
    assert lossless.request("GET", f"{study}/series/{'1' * 65}").status == 400
    jpeg_baseline = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    assert lossless.request("GET", study, headers={"Accept": jpeg_baseline}).status == 406
    for path, accept in (("/rendered", "text/html"), ("/metadata", "application/dicom"),
                         ("/frames/1", "image/jpeg")):
        assert lossless.request("GET", instance + path, headers={"Accept": accept}).status == 406
    assert lossless.request("GET", instance + "/rendered?window=abc").status == 400
    assert lossless.request("GET", instance + "/rendered?quality=0").status == 400
    unauthenticated = lossless.request("GET", study, token=None)
    assert unauthenticated.status == 401
    assert unauthenticated.headers["www-authenticate"].startswith("Bearer")
    assert lossless.request("GET", instance + "/rendered", token="reader").status == 403


def test_limits_give_413_before_any_part(tmp_path: Path, images: list[Path], archive_url: str) -> None:
    """More instances than ``limits.max_retrieve_instances``: 413 before anything is read;
    images over ``limits.max_image_pixels``: each left out, and none left is 413."""
    small = phantom.generate(tmp_path / "small", 3, seed=32, size=(128, 104), images_per_study=3)
    with start_web_node(tmp_path / "node", tier="lossless", database=archive_url,
                        limits={"max_retrieve_instances": 2, "max_image_pixels": 128 * 104}) as node:
        _stored(node, images[:2] + small)
        first, large = pydicom.dcmread(small[0]), _header(images[0])
        refused = node.request("GET", f"/dicom-web/studies/{first.StudyInstanceUID}")
        assert refused.status == 413
        assert b"limit" in refused.body
        one = node.client().retrieve_instance(first.StudyInstanceUID, first.SeriesInstanceUID,
                                              first.SOPInstanceUID, media_types=DICOM_ANY)
        assert np.array_equal(one.pixel_array, first.pixel_array)
        too_large = node.request("GET", f"/dicom-web/studies/{large.StudyInstanceUID}")
        assert too_large.status == 413
        assert b"max_image_pixels" in too_large.body
        rendered = node.request("GET", f"/dicom-web/studies/{large.StudyInstanceUID}/series/"
                                f"{large.SeriesInstanceUID}/instances/{large.SOPInstanceUID}/rendered")
        assert rendered.status == 413
