"""No patient identifiers in the node's log at INFO (the level ``latentpacs serve`` runs at).

A store, a refused store, a C-FIND that names the patient, a C-GET and a refused C-MOVE
all go through one node; its log must then hold none of the patients' names, IDs or
birth dates (PS3.15 Annex E lists them among the identifiers to protect), while still
saying what happened.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from latentpacs import phantom
from latentpacs.errors import Status
from netpeers import dimse_responses, findscu, getscu, movescu, storescu
from test_node import node_factory  # noqa: F401 (fixture)


def test_no_patient_identifiers_in_the_log(node_factory, tmp_path) -> None:
    files = phantom.generate(tmp_path / "phantoms", 2, seed=53, size=(64, 52), images_per_study=2)
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "2.25.99"
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(broken)
    node = node_factory(f"sqlite:///{tmp_path / 'a.db'}")

    statuses = [r.status for r in dimse_responses(storescu(node.port, node.aet, [*files, broken], extra=["-nh"]))]
    assert statuses[:2] == [Status.SUCCESS] * 2 and statuses[2] != Status.SUCCESS
    found = findscu(node.port, node.aet, "STUDY", {"PatientName": str(ds.PatientName), "PatientID": ds.PatientID, "StudyInstanceUID": ""})
    assert len(found.datasets) == 1
    got = getscu(node.port, node.aet, "PATIENT", {"PatientID": ds.PatientID}, tmp_path / "get", root="PATIENT")
    assert got.final.status == Status.SUCCESS and len(got.files) == 2
    movescu(node.port, node.aet, "PATIENT", {"PatientID": ds.PatientID}, "NOWHERE", root="PATIENT")

    log = node.log.read_text()
    assert "C-STORE refused" in log and "stored" in log  # the log does say what happened
    for identifier in (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, "PHANTOM^"):
        assert identifier not in log, f"{identifier!r} appears in the node log"
