"""Orthanc as the viewer: it pushes a study to the node and receives the reconstructions by C-MOVE."""

from __future__ import annotations

from pathlib import Path

import pydicom

from latentpacs import phantom
from latentpacs.errors import Status
from netpeers import final_response, findscu, free_port, movescu, start_node, start_orthanc
from test_node import write_config


def test_orthanc_pushes_and_receives(tmp_path: Path) -> None:
    sources = phantom.generate(tmp_path / "dicom", 4, seed=21, size=(256, 208), images_per_study=4)
    study_uid = pydicom.dcmread(sources[0]).StudyInstanceUID
    node_port = free_port()  # Orthanc must know the node's port before the node starts
    with start_orthanc(tmp_path / "orthanc", aet="VIEWER", modalities={"LATENTPACS": ("LATENTPACS", "127.0.0.1", node_port)}) as viewer:
        config = write_config(
            tmp_path,
            f"sqlite:///{tmp_path / 'archive.db'}",
            **{"destinations.VIEWER": {"host": "127.0.0.1", "port": viewer.dicom_port}},
        )
        with start_node(config, extra_args=["--port", str(node_port)]) as node:
            uploaded = [viewer.upload(path) for path in sources]
            job = viewer.store_to("LATENTPACS", uploaded)
            assert job.get("FailedInstancesCount", 0) == 0, job
            found = findscu(node.port, node.aet, "IMAGE", {"StudyInstanceUID": study_uid, "SOPInstanceUID": ""})
            assert len(found.datasets) == 4

            final = final_response(movescu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study_uid}, "VIEWER"))
            assert final.status == Status.SUCCESS and (final.completed, final.failed) == (4, 0)
            received = [viewer.instance_tags(oid) for oid in viewer.instances()]
            derived = [tags for tags in received if tags.get("LossyImageCompression") == "01"]
            assert len(received) == 8 and len(derived) == 4
            assert {tags["SOPInstanceUID"] for tags in derived} == {ds.SOPInstanceUID for ds in found.datasets}
            assert all(tags["StudyInstanceUID"] == study_uid for tags in derived)
