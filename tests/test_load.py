"""Load: 8 parallel associations of 50 images each are all stored and queryable.

Eight ``storescu`` processes run at once against one node (PS3.8: one association each,
well under ``node.max_associations``); every C-STORE must be answered Success and a
C-FIND at IMAGE level must then count all 400 instances, on SQLite and PostgreSQL.
The 400 distinct instances are 50 phantoms written again under 8 sets of new UIDs.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, Association
from pynetdicom.sop_class import Verification

from dicomtools import require
from latentpacs import phantom
from latentpacs.errors import Status
from netpeers import HOST, SCU_TIMEOUT_S, START_TIMEOUT_S, dimse_responses, echoscu, findscu
from test_node import node_factory  # noqa: F401 (fixture)

ASSOCIATIONS = 8
PER_ASSOCIATION = 50


@pytest.fixture(scope="module")
def batches(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    """``ASSOCIATIONS`` folders of ``PER_ASSOCIATION`` files, every UID distinct."""
    root = tmp_path_factory.mktemp("load")
    sources = [pydicom.dcmread(p) for p in phantom.generate(
        root / "phantoms", PER_ASSOCIATION, seed=41, size=(64, 52), images_per_study=5)]
    batches = []
    for copy in range(ASSOCIATIONS):
        folder = root / f"batch{copy}"
        folder.mkdir()
        new_uids: dict[str, str] = {}
        files = []
        for index, ds in enumerate(sources):
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                old = str(ds[keyword].value)
                setattr(ds, keyword, new_uids.setdefault(old, generate_uid()))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = folder / f"{index:03d}.dcm"
            ds.save_as(path)
            files.append(path)
        batches.append(files)
    return batches


def test_parallel_associations_are_all_stored(archive_url, node_factory, batches) -> None:
    node = node_factory(archive_url)
    senders = [
        subprocess.Popen([require("storescu"), "-d", "-to", "30", "-aet", f"LOAD{n}",
                          "-aec", node.aet, HOST, str(node.port), *map(str, files)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         stdin=subprocess.DEVNULL)
        for n, files in enumerate(batches)
    ]
    outputs = [sender.communicate(timeout=SCU_TIMEOUT_S)[0] for sender in senders]
    for sender, output in zip(senders, outputs):
        result = subprocess.CompletedProcess(sender.args, sender.returncode, output, "")
        statuses = [r.status for r in dimse_responses(result)]
        assert statuses == [Status.SUCCESS] * PER_ASSOCIATION, output[-2000:]
    images = findscu(node.port, node.aet, "IMAGE", {"SOPInstanceUID": ""})
    assert images.final.status == Status.SUCCESS
    assert len({ds.SOPInstanceUID for ds in images.datasets}) == ASSOCIATIONS * PER_ASSOCIATION
    studies = findscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": "",
                                                     "NumberOfStudyRelatedInstances": ""})
    assert len(studies.datasets) == ASSOCIATIONS * PER_ASSOCIATION // 5
    assert {int(ds.NumberOfStudyRelatedInstances) for ds in studies.datasets} == {5}


def _associate_when_free(port: int, aet: str) -> Association:
    """An established association, retried while the node still counts a finished one
    (its association thread ends a moment after the release)."""
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        association = holder.associate(HOST, port, ae_title=aet)
        if association.is_established:
            return association
        if time.monotonic() > deadline:
            pytest.fail(f"no association with {aet} within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def test_association_and_pdu_limits_are_applied(node_factory, tmp_path) -> None:
    """``node.max_associations`` refuses one association too many (PS3.8 7.1.1.9, reason 2:
    local limit exceeded); ``node.max_pdu_size`` is the maximum length the node announces
    in its A-ASSOCIATE-AC (PS3.8 D.1)."""
    node = node_factory(f"sqlite:///{tmp_path / 'a.db'}", codec={"tier": "lossless"},
                        node={"max_associations": 1, "max_pdu_size": 16384})  # no model engine needed
    held = _associate_when_free(node.port, node.aet)
    try:
        assert held.acceptor.maximum_length == 16384
        assert echoscu(node.port, node.aet).returncode != 0  # the one slot is taken
    finally:
        held.release()
    _associate_when_free(node.port, node.aet).release()  # and it is free again
