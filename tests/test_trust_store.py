"""The archive of record, probed as a careless or hostile sender would (issue 8, guarantees 1 and 3).

Exactness: lossy transfer syntaxes are never preferred on arrival, an image that arrived
lossy says so, the ``lossless`` tier returns every bit of every pixel cell as sent, and the
checksum archived with each image catches a stream that decodes to other pixels.
Filing: patients by Patient ID + Issuer, a study or series UID re-used by another patient
or study is refused, and identifying UIDs are validated before they name anything.
"""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
)
from pynetdicom import AE, build_context
from pynetdicom import _config as pynetdicom_config

from archive_data import MODEL, archived, phantom, query
from dicomtools import require
from latentpacs import phantom as phantoms_module
from latentpacs.archive import Archive
from latentpacs.codec.jpegls import encode_stream
from latentpacs.image.derive import Derivation, returned_overrides
from latentpacs.codec.tiers import Tier
from latentpacs.errors import IdentityConflictError, Status
from netpeers import NodeProcess, dimse_responses, findscu, getscu, start_node, storescu
from test_node import write_config

MAMMO = "1.2.840.10008.5.1.4.1.1.1.2"


def values(value: object) -> list[str]:
    """A DICOM value as a list (pydicom gives a single value unwrapped)."""
    return [str(v) for v in value] if isinstance(value, pydicom.multival.MultiValue) else [str(value)]
SIZE = (256, 208)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four small phantoms; the first two have Bits Stored < 16 (their unused bits matter)."""
    return phantoms_module.generate(tmp_path_factory.mktemp("trust"), 4, seed=8080, size=SIZE,
                                    images_per_study=2)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One ``lossless`` node on SQLite for the whole module."""
    directory = tmp_path_factory.mktemp("node")
    config = write_config(directory, f"sqlite:///{directory / 'archive.db'}",
                          codec={"tier": "lossless"})
    with start_node(config) as started:
        yield started


def get_image(node: NodeProcess, ds: pydicom.Dataset, out_dir: Path) -> Path:
    """C-GET one instance by its unique keys with getscu; the one file it delivered."""
    got = getscu(node.port, node.aet, "IMAGE", {"StudyInstanceUID": ds.StudyInstanceUID,
                                                "SeriesInstanceUID": ds.SeriesInstanceUID,
                                                "SOPInstanceUID": ds.SOPInstanceUID}, out_dir)
    (path,) = got.files
    return path


def _association(node: NodeProcess, syntaxes: list[str]):  # noqa: ANN202 - pynetdicom types
    ae = AE(ae_title="CARELESS")
    ae.requested_contexts = [build_context(MAMMO, syntaxes)]
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet)
    assert assoc.is_established
    return assoc


@pytest.mark.parametrize(("proposed", "accepted"), [
    # A transcoding sender's proposal: the node must take the native syntax.
    ([JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, ExplicitVRLittleEndian],
     ExplicitVRLittleEndian),
    # Lossless compressed beats native, native beats lossy.
    ([JPEGBaseline8Bit, ExplicitVRLittleEndian, JPEGLSLossless], JPEGLSLossless),
    # Lossy only when nothing else is offered.
    ([JPEG2000, JPEGLSNearLossless], JPEGLSNearLossless),
])
def test_negotiation_never_prefers_a_lossy_syntax(node: NodeProcess, proposed: list[str],
                                                  accepted: str) -> None:
    assoc = _association(node, proposed)
    try:
        (context,) = assoc.accepted_contexts
        assert context.transfer_syntax[0] == accepted
    finally:
        assoc.release()


def test_image_that_arrived_lossy_says_so_at_the_lossless_tier(node: NodeProcess,
                                                               sources: list[Path],
                                                               tmp_path: Path) -> None:
    # DCMTK codes a 12-bit phantom as JPEG extended (lossy); a careless sender then drops
    # the Lossy Image Compression attributes dcmcjpeg wrote.
    original = pydicom.dcmread(sources[0])
    original.BitsStored, original.HighBit = 12, 11
    original.PixelData = (original.pixel_array & 0x0FFF).astype("<u2").tobytes()
    plain = tmp_path / "plain.dcm"
    original.save_as(plain)
    jpeg = tmp_path / "jpeg.dcm"
    subprocess.run([require("dcmcjpeg"), "+ee", "+q", "60", str(plain), str(jpeg)], check=True)
    sent = pydicom.dcmread(jpeg)
    assert sent.file_meta.TransferSyntaxUID == JPEGExtended12Bit
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio",
                    "LossyImageCompressionMethod"):
        if keyword in sent:
            delattr(sent, keyword)
    assoc = _association(node, [JPEGExtended12Bit])
    try:
        assert assoc.send_c_store(sent).Status == Status.SUCCESS
    finally:
        assoc.release()
    path = get_image(node, sent, tmp_path / "get")
    back = pydicom.dcmread(path)
    assert back.SOPInstanceUID == sent.SOPInstanceUID  # lossless tier: original identity
    assert back.LossyImageCompression == "01"
    assert values(back.LossyImageCompressionMethod) == ["ISO_10918_1"]
    assert float(back.LossyImageCompressionRatio) > 1
    np.testing.assert_array_equal(back.pixel_array, sent.pixel_array)


def test_unused_high_bits_come_back_byte_for_byte(node: NodeProcess, sources: list[Path],
                                                  tmp_path: Path) -> None:
    ds = pydicom.dcmread(sources[1])
    assert ds.BitsStored < 16
    cells = ds.pixel_array.astype(np.uint16)
    cells[::3, ::5] |= np.uint16(0x8000)  # garbage in bit 15, above High Bit
    ds.PixelData = cells.astype("<u2").tobytes()
    sent_bytes = bytes(ds.PixelData)
    path = tmp_path / "garbage.dcm"
    ds.save_as(path)
    assert [r.status for r in dimse_responses(storescu(node.port, node.aet, [path]))] == [
        Status.SUCCESS]
    returned = get_image(node, ds, tmp_path / "get")
    back = pydicom.dcmread(returned)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert hashlib.sha256(bytes(back.PixelData)).digest() == hashlib.sha256(sent_bytes).digest()


def test_malformed_optional_attribute_is_kept_as_received(node: NodeProcess, sources: list[Path],
                                                          tmp_path: Path) -> None:
    ds = pydicom.dcmread(sources[2])
    # (0018,1164) Imager Pixel Spacing DS and (0020,0019) Acquisition Number IS, unparseable.
    ds[0x00181164] = RawDataElement(Tag(0x00181164), "DS", 4, b"x.y ", 0, False, True)
    ds[0x00200012] = RawDataElement(Tag(0x00200012), "IS", 4, b"abc ", 0, False, True)
    path = tmp_path / "malformed.dcm"
    ds.save_as(path)
    assert [r.status for r in dimse_responses(storescu(node.port, node.aet, [path]))] == [
        Status.SUCCESS]
    returned = get_image(node, ds, tmp_path / "get")
    back = pydicom.dcmread(returned)
    assert back.get_item(0x00181164).value.rstrip(b" ") == b"x.y"
    assert back.get_item(0x00200012).value.rstrip(b" ") == b"abc"
    np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)


@pytest.mark.parametrize(("keyword", "uid"), [
    ("SOPInstanceUID", "../../../../tmp/x"),
    ("SOPInstanceUID", "1.2.3/../../x"),
    ("SOPInstanceUID", "/etc/passwd"),
    ("SeriesInstanceUID", "1.2..3"),
    ("StudyInstanceUID", "1." + "2" * 70),  # over 64 characters
])
def test_store_refuses_identifiers_that_are_not_uids(node: NodeProcess, sources: list[Path],
                                                     keyword: str, uid: str) -> None:
    ds = pydicom.dcmread(sources[3])
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        setattr(ds, keyword, uid)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = uid
        assoc = _association(node, [ExplicitVRLittleEndian])
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
    finally:
        pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    assert status.Status == Status.CANNOT_UNDERSTAND
    assert "UID" in str(status.ErrorComment)
    found = findscu(node.port, node.aet, "IMAGE", {"PatientID": str(ds.PatientID),
                                                   "SOPInstanceUID": "",
                                                   "SeriesInstanceUID": ""},
                    root="PATIENT")
    assert uid not in {str(answer.get(keyword, "")) for answer in found.datasets}


def test_affected_sop_instance_uid_must_match_the_data_set(node: NodeProcess, sources: list[Path],
                                                           tmp_path: Path) -> None:
    # pynetdicom, sending a file in chunks, takes the Affected SOP Instance UID of the
    # C-STORE request from the file's meta information (Media Storage SOP Instance UID).
    ds = pydicom.dcmread(sources[3])
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    path = tmp_path / "mismatch.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=False)
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5.6.7"
    assoc = _association(node, [ExplicitVRLittleEndian])
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    assert status.Status == Status.CANNOT_UNDERSTAND
    assert "Affected SOP Instance UID" in str(status.ErrorComment)


def test_archive_verify_proves_correct_decoding(tmp_path: Path, sources: list[Path]) -> None:
    """A stream that decodes cleanly but to other pixels is caught by its pixel checksum."""
    directory = tmp_path / "verify"
    directory.mkdir()
    database = directory / "archive.db"
    config = write_config(directory, f"sqlite:///{database}", codec={"tier": "lossless"})
    with start_node(config) as started:
        assert [r.status for r in dimse_responses(storescu(started.port, started.aet,
                                                           sources[:2]))] == [Status.SUCCESS] * 2
    latentpacs = Path(sys.executable).parent / "latentpacs"
    verify = [str(latentpacs), "--config", str(config), "archive", "verify"]
    clean = subprocess.run(verify, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    # Swap one image's stream for a valid JPEG-LS stream of different pixels, with a
    # matching stream hash: only the pixel checksum can tell.
    other = pydicom.dcmread(sources[1])
    forged = encode_stream(np.zeros((other.Rows, other.Columns), np.uint16), other.BitsStored, 0)
    with sqlite3.connect(database) as connection:
        (instance_fk,) = connection.execute("SELECT MIN(instance_fk) FROM latents").fetchone()
        connection.execute(
            "UPDATE latents SET stream = ?, stream_path = NULL, stream_sha256 = ?, "
            "stream_size = ? WHERE instance_fk = ?",
            (forged, hashlib.sha256(forged).hexdigest(), len(forged), instance_fk))
    damaged = subprocess.run(verify, capture_output=True, text=True, timeout=300)
    assert damaged.returncode == 1
    assert "checksum" in damaged.stderr
    assert "verified 1 of 2" in damaged.stdout
    # A retrieval fails that sub-operation with an ErrorComment and sends the other image.
    with start_node(config) as started:
        patient = str(pydicom.dcmread(sources[0]).PatientID)
        got = getscu(started.port, started.aet, "PATIENT", {"PatientID": patient},
                     tmp_path / "get", root="PATIENT")
    assert (got.final.completed, got.final.failed) == (1, 1)
    assert got.final.status == Status.SUB_OPERATIONS_WARNING
    assert len(got.files) == 1
    assert "checksum" in (got.proc.stdout + got.proc.stderr) or "checksum" in (
        started.log.read_text())


def test_a_lossy_original_is_named_a_lossy_predecessor() -> None:
    header = phantom("P9", "Doe^Ann", "19700101", "1.2.3.9", "20240101", "080000", "x", 1)
    derivation = Derivation("ae", MODEL, Tier.parse("latent"), 1000.0,
                            arrival_method="ISO_10918_1", arrival_ratio=8.0,
                            lossy_predecessor=True)
    overrides = returned_overrides(header, derivation)
    (source,) = overrides.SourceImageSequence
    assert source.PurposeOfReferenceCodeSequence[0].CodeValue == "121330"
    assert values(overrides.LossyImageCompressionMethod) == ["ISO_10918_1", "LP_LATENT_AE"]
    plain = returned_overrides(header, Derivation("ae", MODEL, Tier.parse("latent"), 1000.0))
    assert plain.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121320"


# --- Filing -------------------------------------------------------------------------------


@pytest.fixture
def archive(archive_url: str) -> Iterator[Archive]:
    with Archive(archive_url) as opened:
        opened.register_model(sha256=MODEL, name="test", arch="ae", card={})
        yield opened


def test_a_study_uid_reused_by_another_patient_is_refused(archive: Archive) -> None:
    study = "1.2.826.0.1.3680043.10.1234.77"
    first = phantom("A", "Alpha^A", "19600101", study, "20240101", "080000", "s", 1)
    archive.store(archived(first))
    intruder = phantom("B", "Beta^B", "19700101", study, "20240101", "080000", "s", 2)
    with pytest.raises(IdentityConflictError, match="another patient"):
        archive.store(archived(intruder))
    assert IdentityConflictError("x").status == Status.IDENTITY_CONFLICT
    assert list(archive.find("PATIENT", query("PATIENT", PatientID="B"), root="PATIENT")) == []
    answers = list(archive.find("IMAGE", query("IMAGE", PatientID="A", SOPInstanceUID=""),
                                root="PATIENT"))
    assert [str(answer.SOPInstanceUID) for answer in answers] == [first.SOPInstanceUID]
    assert archive.stats().instances == 1


def test_a_series_uid_reused_in_another_study_is_refused(archive: Archive) -> None:
    first = phantom("A", "Alpha^A", "19600101", "1.2.3.100", "20240101", "080000", "s", 1)
    archive.store(archived(first))
    other = phantom("A", "Alpha^A", "19600101", "1.2.3.200", "20240101", "080000", "s", 2).copy()
    other.SeriesInstanceUID = first.SeriesInstanceUID
    with pytest.raises(IdentityConflictError, match="another study"):
        archive.store(archived(other))
    assert archive.stats().studies == 1


def test_one_patient_id_under_two_issuers_is_two_patients(archive: Archive) -> None:
    one = phantom("SAME", "One^A", "19600101", "1.2.3.300", "20240101", "080000", "s", 1).copy()
    one.IssuerOfPatientID = "HOSPITAL_A"
    two = phantom("SAME", "Two^B", "19700101", "1.2.3.400", "20240101", "080000", "s", 2).copy()
    two.IssuerOfPatientID = "HOSPITAL_B"
    archive.store(archived(one))
    archive.store(archived(two))
    assert archive.stats().patients == 2
    answers = list(archive.find("PATIENT", query("PATIENT", PatientID="SAME", IssuerOfPatientID=""),
                                root="PATIENT"))
    assert sorted(str(answer.IssuerOfPatientID) for answer in answers) == [
        "HOSPITAL_A", "HOSPITAL_B"]


def test_a_conflicting_store_is_refused_on_the_network(node: NodeProcess, sources: list[Path],
                                                       tmp_path: Path) -> None:
    ds = pydicom.dcmread(sources[2])
    assert [r.status for r in dimse_responses(storescu(node.port, node.aet, [sources[2]]))] == [
        Status.SUCCESS]
    intruder = pydicom.dcmread(sources[3])
    intruder.StudyInstanceUID = ds.StudyInstanceUID  # the study of another patient
    intruder.PatientID = "INTRUDER"
    path = tmp_path / "intruder.dcm"
    intruder.save_as(path)
    (response,) = dimse_responses(storescu(node.port, node.aet, [path]))
    assert response.status == Status.IDENTITY_CONFLICT
    assert "belongs to another patient" in (response.error_comment or "")
    assert findscu(node.port, node.aet, "STUDY", {"PatientID": "INTRUDER",
                                                  "StudyInstanceUID": ""}).datasets == []
