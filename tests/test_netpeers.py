"""The network harness itself, against real DCMTK tools and Orthanc (no latentpacs node).

Each flow a node test will use runs once here between real peers on loopback:
C-STORE into storescp and into Orthanc, Orthanc's REST upload and C-STORE SCU, and
C-FIND, C-GET and C-MOVE against Orthanc's Query/Retrieve SCP (PS3.4 Annexes B and C).
Every server is stopped by PID in fixture teardown, which also checks with ``ps`` that
the PID is gone.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from latentpacs import phantom
from latentpacs.errors import Status
from netpeers import (
    Orthanc,
    StoreSCP,
    dimse_responses,
    echoscu,
    final_response,
    findscu,
    free_port,
    getscu,
    movescu,
    start_node,
    start_orthanc,
    start_storescp,
    storescu,
    wait_for_echo,
)

#: 8 images = 2 studies of 4 (one patient), small enough to move in well under a second.
IMAGE_COUNT = 8
STUDY_COUNT = 2


def _assert_gone(pid: int) -> None:
    listed = subprocess.run(["ps", "-o", "pid=", "-p", str(pid)], capture_output=True, text=True)
    assert listed.stdout.strip() == "", f"process {pid} is still running after stop()"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two phantom studies of four small mammograms each."""
    return phantom.generate(tmp_path_factory.mktemp("phantom"), IMAGE_COUNT, seed=1,
                            size=(128, 104))


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StoreSCP]:
    """A storescp receiving into ``tmp_path/received``."""
    server = start_storescp(tmp_path / "received", aet="STORESCP")
    try:
        yield server
    finally:
        server.stop()
        _assert_gone(server.proc.pid)


@pytest.fixture
def orthanc(tmp_path: Path, scp: StoreSCP) -> Iterator[Orthanc]:
    """An Orthanc that knows ``scp`` as modality ``archive`` (AE title STORESCP)."""
    server = start_orthanc(tmp_path / "orthanc", aet="ORTHANC",
                           modalities={"archive": (scp.aet, "127.0.0.1", scp.port)})
    try:
        yield server
    finally:
        server.stop()
        _assert_gone(server.proc.pid)


def _sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths}


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"{' '.join(proc.args)}\n{proc.stdout}{proc.stderr}"


def test_storescu_files_arrive_at_storescp(scp: StoreSCP, phantoms: list[Path]) -> None:
    result = storescu(scp.port, scp.aet, phantoms[:4])

    assert result.returncode == 0, _output(result)
    assert [r.status for r in dimse_responses(result)] == [Status.SUCCESS] * 4
    assert _sop_uids(scp.files()) == _sop_uids(phantoms[:4])
    received = pydicom.dcmread(scp.files()[0])
    original = next(pydicom.dcmread(p) for p in phantoms if
                    pydicom.dcmread(p).SOPInstanceUID == received.SOPInstanceUID)
    assert received.PixelData == original.PixelData


def test_storescu_scans_a_folder(scp: StoreSCP, phantoms: list[Path]) -> None:
    result = storescu(scp.port, scp.aet, [phantoms[0].parent])

    assert result.returncode == 0, _output(result)
    assert _sop_uids(scp.files()) == _sop_uids(phantoms[:4])


def test_echo_to_a_closed_port_fails_and_waiting_for_it_fails_the_test() -> None:
    port = free_port()

    assert echoscu(port, "NOBODY").returncode != 0
    with pytest.raises(pytest.fail.Exception, match="no C-ECHO answer from NOBODY"):
        wait_for_echo(port, "NOBODY", timeout=0.3)


def test_wait_for_echo_reports_a_dead_server(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("listener refused to start: address in use\n")
    dead = subprocess.Popen(["false"])
    dead.wait()

    with pytest.raises(pytest.fail.Exception, match="address in use"):
        wait_for_echo(free_port(), "NOBODY", proc=dead, log=log)


def test_start_node_shows_the_log_of_a_node_that_exits(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"

    with pytest.raises(pytest.fail.Exception, match="latentpacs serve exited") as failure:
        start_node(missing, workdir=tmp_path)

    log = (tmp_path / "node.log").read_text()
    assert log.strip() and log.strip().splitlines()[-1] in failure.value.msg
    assert not (tmp_path / "node.port").exists()


def test_orthanc_rest_upload_then_store_to_storescp(orthanc: Orthanc, scp: StoreSCP,
                                                    phantoms: list[Path]) -> None:
    ids = [orthanc.upload(path) for path in phantoms[:4]]

    assert sorted(orthanc.instances()) == sorted(ids)
    tags = orthanc.instance_tags(ids[0])
    assert tags["SOPInstanceUID"] == pydicom.dcmread(phantoms[0]).SOPInstanceUID
    assert orthanc.file(ids[0]) == phantoms[0].read_bytes()

    job = orthanc.store_to("archive", ids)

    assert job["FailedInstancesCount"] == 0, job
    assert _sop_uids(scp.files()) == _sop_uids(phantoms[:4])


def test_orthanc_receives_storescu_and_answers_find_get_move(
        orthanc: Orthanc, scp: StoreSCP, phantoms: list[Path], tmp_path: Path) -> None:
    stored = storescu(orthanc.dicom_port, orthanc.aet, phantoms)
    assert stored.returncode == 0, _output(stored)
    assert len(orthanc.instances()) == IMAGE_COUNT

    found = findscu(orthanc.dicom_port, orthanc.aet, "STUDY",
                    {"StudyInstanceUID": "", "PatientID": "", "NumberOfStudyRelatedInstances": ""})
    assert found.proc.returncode == 0, _output(found.proc)
    assert len(found.datasets) == STUDY_COUNT
    assert found.final.status == Status.SUCCESS
    first_study = str(pydicom.dcmread(phantoms[0]).StudyInstanceUID)
    assert first_study in {str(ds.StudyInstanceUID) for ds in found.datasets}
    assert {int(ds.NumberOfStudyRelatedInstances) for ds in found.datasets} == {4}

    images = findscu(orthanc.dicom_port, orthanc.aet, "IMAGE",
                     {"StudyInstanceUID": first_study, "SeriesInstanceUID": "",
                      "SOPInstanceUID": ""})
    assert images.proc.returncode == 0, _output(images.proc)
    assert {str(ds.SOPInstanceUID) for ds in images.datasets} == _sop_uids(phantoms[:4])

    got = getscu(orthanc.dicom_port, orthanc.aet, "STUDY", {"StudyInstanceUID": first_study},
                 tmp_path / "got")
    assert got.proc.returncode == 0, _output(got.proc)
    assert _sop_uids(got.files) == _sop_uids(phantoms[:4])
    assert (got.final.status, got.final.completed, got.final.failed) == (Status.SUCCESS, 4, 0)

    moved = movescu(orthanc.dicom_port, orthanc.aet, "STUDY", {"StudyInstanceUID": first_study},
                    scp.aet)
    assert moved.returncode == 0, _output(moved)
    assert final_response(moved).status == Status.SUCCESS
    assert final_response(moved).completed == 4
    assert _sop_uids(scp.files()) == _sop_uids(phantoms[:4])


def test_patient_root_find(orthanc: Orthanc, phantoms: list[Path]) -> None:
    for path in phantoms:
        orthanc.upload(path)

    found = findscu(orthanc.dicom_port, orthanc.aet, "PATIENT", {"PatientID": ""},
                    root="PATIENT")

    assert found.proc.returncode == 0, _output(found.proc)
    patient = str(pydicom.dcmread(phantoms[0]).PatientID)
    assert [str(ds.PatientID) for ds in found.datasets] == [patient]


def test_move_to_an_unknown_destination_fails(orthanc: Orthanc, phantoms: list[Path],
                                              scp: StoreSCP) -> None:
    orthanc.upload(phantoms[0])
    study = str(pydicom.dcmread(phantoms[0]).StudyInstanceUID)

    moved = movescu(orthanc.dicom_port, orthanc.aet, "STUDY", {"StudyInstanceUID": study},
                    "NOWHERE")

    assert moved.returncode != 0, _output(moved)
    assert 0xA000 <= final_response(moved).status < 0xFF00
    assert scp.files() == []


def test_failure_status_and_error_comment_are_read() -> None:
    """A pynetdicom Query SCP (in-process, loopback) refuses with 0xC001 and an Error Comment."""
    def refuse(event: evt.Event) -> Iterator[tuple[Dataset, None]]:
        status = Dataset()
        status.Status = Status.UNABLE_TO_PROCESS
        status.ErrorComment = "level BOGUS is not supported"
        yield status, None

    ae = AE("REFUSER")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, refuse)])
    try:
        found = findscu(server.server_address[1], "REFUSER", "BOGUS", {"PatientID": ""})
    finally:
        server.shutdown()

    assert found.datasets == []
    assert found.final.status == Status.UNABLE_TO_PROCESS
    assert found.final.error_comment == "level BOGUS is not supported"
