"""Orthanc with its DICOMweb plugin as the client: it STOWs a study to the node and retrieves it by WADO-RS.

The node's web server is configured in Orthanc as a DICOMweb server (``DicomWeb.Servers``
with the node's URL and a bearer token in ``HttpHeaders``), the way a site would set it
up. Orthanc pushes the study with the plugin's ``/stow`` (STOW-RS, PS3.18 10.5), asks
the node with ``/qido`` (QIDO-RS, 10.6), forgets its copy, and takes the study back with
``/retrieve`` (WADO-RS, 10.4): what Orthanc then holds is what the node sent, and it
must be what C-GET returns (the same SOP Instance UIDs and pixels): at ``lossless`` the
pixels that were sent, byte for byte; at ``latent`` the derived objects C-FIND lists.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from latentpacs import phantom
from netpeers import DicomWebPeer, Orthanc, findscu, getscu, start_orthanc
from webpeers import start_web_node

#: What Orthanc's token may do: everything its DICOMweb client asks for.
ORTHANC_TOKEN = {"orthanc": ("store", "query", "retrieve")}
SOP_INSTANCE_UID = "00080018"
STUDY_INSTANCE_UID = "0020000D"


def _sources(tmp_path: Path) -> list[Path]:
    return phantom.generate(tmp_path / "dicom", 4, seed=23, size=(256, 208), images_per_study=4)


def _qido_values(answers: list[dict[str, Any]], tag: str) -> set[str]:
    """The values of ``tag`` in the plugin's QIDO answers (it rewrites DICOM JSON per tag
    as ``{"Value": ..., "vr": ...}``, the value a string or a list)."""
    found = set()
    for answer in answers:
        value = answer[tag]["Value"]
        found.update(value if isinstance(value, list) else [value])
    return found


def _push_and_forget(viewer: Orthanc, sources: list[Path]) -> str:
    """Upload ``sources`` into Orthanc, STOW the study to the node, delete Orthanc's copy.

    Returns the Study Instance UID.
    """
    uploaded = [viewer.upload(path) for path in sources]
    study = str(viewer.rest("GET", f"/instances/{uploaded[0]}/study")["ID"])
    job = viewer.stow_to("latentpacs", [study])
    assert int(job["InstancesCount"]) == len(sources), job
    viewer.rest("DELETE", f"/studies/{study}")
    assert viewer.instances() == []
    return str(pydicom.dcmread(sources[0]).StudyInstanceUID)


@pytest.mark.parametrize("tier", ["lossless", "latent"])
def test_orthanc_stows_queries_and_retrieves(tmp_path: Path, tier: str) -> None:
    sources = _sources(tmp_path)
    originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, sources)}
    with start_web_node(tmp_path / "node", tier=tier, tokens=ORTHANC_TOKEN) as web:
        peer = DicomWebPeer(web.dicomweb, web.auth("orthanc"))
        with start_orthanc(tmp_path / "orthanc", aet="VIEWER", dicomweb={"latentpacs": peer}) as viewer:
            study_uid = _push_and_forget(viewer, sources)

            # The node archived every instance: C-FIND and Orthanc's QIDO-RS through the
            # plugin name the same instances (at latent: the derived ones).
            found = findscu(web.node.port, web.node.aet, "IMAGE",
                            {"StudyInstanceUID": study_uid, "SOPInstanceUID": ""})
            listed = {str(ds.SOPInstanceUID) for ds in found.datasets}
            assert len(listed) == len(sources)
            answers = viewer.qido_from("latentpacs", f"/studies/{study_uid}/instances", {})
            assert _qido_values(answers, SOP_INSTANCE_UID) == listed
            studies = viewer.qido_from("latentpacs", "/studies", {"StudyInstanceUID": study_uid})
            assert _qido_values(studies, STUDY_INSTANCE_UID) == {study_uid}

            retrieved = viewer.retrieve_from("latentpacs", study_uid)
            assert int(retrieved["ReceivedInstancesCount"]) == len(sources), retrieved
            received = [pydicom.dcmread(BytesIO(viewer.file(oid))) for oid in viewer.instances()]
            got = getscu(web.node.port, web.node.aet, "STUDY", {"StudyInstanceUID": study_uid},
                         tmp_path / "c-get")
            by_get = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, got.files)}
    assert {str(ds.SOPInstanceUID) for ds in received} == listed == set(by_get)
    # What Orthanc took by WADO-RS is what C-GET returns: the same objects, the same pixels.
    for ds in received:
        assert _native_pixel_bytes(ds) == _native_pixel_bytes(by_get[str(ds.SOPInstanceUID)])
    assert all(str(ds.StudyInstanceUID) == study_uid for ds in received)
    if tier == "lossless":
        assert listed == set(originals)
        for ds in received:
            sent = originals[str(ds.SOPInstanceUID)]
            assert ds.get("LossyImageCompression", "00") != "01"
            # Byte for byte what was sent, whichever syntax the node chose to send in
            # (the plugin accepts any, transfer-syntax=*): decoded back to native.
            assert _native_pixel_bytes(ds) == sent.PixelData
    else:
        assert not listed & set(originals)  # derived: new SOP Instance UIDs
        for ds in received:
            assert ds.LossyImageCompression == "01"
            assert "DERIVED" in ds.ImageType
            assert str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) in originals
            assert (ds.Rows, ds.Columns) == (256, 208)


def _native_pixel_bytes(ds: pydicom.Dataset) -> bytes:
    """Pixel Data as native little-endian bytes: as stored when native, else decoded."""
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        return bytes(ds.PixelData)
    return np.asarray(ds.pixel_array, dtype="<u2").tobytes()
