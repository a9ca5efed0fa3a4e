"""Abuse-proof queries and retrievals (issue 8, guarantee 5; query parts of guarantee 7).

Driven the way a careless or hostile peer would: DCMTK ``findscu``, ``getscu`` and
``movescu`` against ``latentpacs serve`` on loopback, and the :class:`Service` directly for
what a network cannot trigger deterministically (the decode budget, the pixel limit).

* C-GET / C-MOVE unique keys that are universal or wildcards are refused with A900 and an
  ErrorComment (PS3.4 C.4.2.2.1, C.4.3.2.1); before, ``PatientID=*`` retrieved everything.
* ``limits.max_retrieve_instances`` refuses a larger retrieval with A700 before any
  sub-operation; ``limits.max_find_answers`` ends a C-FIND with A700 after that many answers.
* One instance that cannot be decoded fails its sub-operation only: the others arrive and
  the final status is B000 with one failed sub-operation.
* ``limits.max_image_pixels`` and ``limits.max_concurrent_decodes`` refuse with A700.
* C-FIND returns Retrieve AE Title and matches sequence keys (C.2.2.2.6).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from latentpacs import phantom
from latentpacs.config import load_config
from latentpacs.errors import LimitExceededError, Status
from latentpacs.service import Service, open_service
from netpeers import (
    NodeProcess,
    StoreSCP,
    final_response,
    findscu,
    getscu,
    movescu,
    start_node,
    start_storescp,
    storescu,
)

SIZE = (128, 104)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """4 small phantoms: 2 patients x 1 study x 2 images."""
    return phantom.generate(tmp_path_factory.mktemp("phantoms"), 4, seed=21, size=SIZE,
                            images_per_study=2)


def _config(directory: Path, extra: str = "", tier: str = "latent") -> Path:
    config = directory / "node.toml"
    config.write_text(
        '[node]\naet = "LATENTPACS"\nhost = "127.0.0.1"\n'
        f'[archive]\ndatabase = "sqlite:///{directory / "a.db"}"\ndata_dir = "{directory / "data"}"\n'
        f'[codec]\nmodel = "ae"\ntier = "{tier}"\n' + extra)
    return config


@dataclass(frozen=True)
class Served:
    """A node holding the 4 phantoms, with a storescp as its C-MOVE destination VIEWER."""

    node: NodeProcess
    viewer: StoreSCP
    database: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, images: list[Path]) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("node")
    with start_storescp(directory / "received", aet="VIEWER") as viewer:
        node = start_node(_config(directory, f'[destinations.VIEWER]\nhost = "127.0.0.1"\n'
                                             f"port = {viewer.port}\n"))
        try:
            assert final_response(storescu(node.port, node.aet, images)).status == Status.SUCCESS
            yield Served(node, viewer, directory / "a.db")
        finally:
            node.stop()


def _study(images: list[Path], index: int = 0) -> str:
    return str(pydicom.dcmread(images[index], stop_before_pixels=True).StudyInstanceUID)


def test_wildcard_and_universal_unique_keys_are_refused(served: Served, images, tmp_path) -> None:
    node = served.node
    for level, root, keys in (
        ("PATIENT", "PATIENT", {"PatientID": "*"}),
        ("PATIENT", "PATIENT", {"PatientID": "LP*"}),
        ("STUDY", "STUDY", {"StudyInstanceUID": "*"}),
        ("STUDY", "STUDY", {"StudyInstanceUID": ""}),
        ("STUDY", "PATIENT", {"PatientID": "?P0001", "StudyInstanceUID": _study(images)}),
    ):
        got = getscu(node.port, node.aet, level, keys, tmp_path / "get", root=root)
        assert got.final.status == Status.DOES_NOT_MATCH_SOP_CLASS, keys
        assert got.final.error_comment, keys
        assert got.files == [], keys
    before = served.viewer.files()
    moved = final_response(movescu(node.port, node.aet, "PATIENT", {"PatientID": "*"},
                                   "VIEWER", root="PATIENT"))
    assert moved.status == Status.DOES_NOT_MATCH_SOP_CLASS
    assert moved.error_comment
    assert served.viewer.files() == before


def test_find_returns_retrieve_ae_title_and_matches_sequences(served: Served) -> None:
    node = served.node
    studies = findscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": "", "RetrieveAETitle": ""})
    assert len(studies.datasets) == 2
    assert all(ds.RetrieveAETitle == "LATENTPACS" for ds in studies.datasets)
    breast = findscu(node.port, node.aet, "IMAGE",
                     {"SOPInstanceUID": "", "AnatomicRegionSequence[0].CodeValue": "76752008"})
    assert breast.final.status == Status.SUCCESS and len(breast.datasets) == 4
    assert all(ds.AnatomicRegionSequence[0].CodeValue == "76752008" for ds in breast.datasets)
    other = findscu(node.port, node.aet, "IMAGE",
                    {"SOPInstanceUID": "", "AnatomicRegionSequence[0].CodeValue": "T-D0050"})
    assert other.final.status == Status.SUCCESS and other.datasets == []


def _corrupt_latent(database: Path, sop_instance_uid: str) -> None:
    """Overwrite one archived latent in the SQLite file so that it cannot be decoded."""
    with sqlite3.connect(database) as connection:
        changed = connection.execute(
            "UPDATE latents SET latent = x'00' WHERE instance_fk = "
            "(SELECT id FROM instances WHERE original_sop_instance_uid = ?)",
            (sop_instance_uid,)).rowcount
    connection.close()
    assert changed == 1


def test_one_undecodable_instance_fails_only_its_sub_operation(served: Served, images,
                                                                tmp_path) -> None:
    """Runs last on the shared node: it breaks one latent of the first study for good."""
    node = served.node
    broken = pydicom.dcmread(images[0], stop_before_pixels=True)
    _corrupt_latent(served.database, str(broken.SOPInstanceUID))
    got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": broken.StudyInstanceUID},
                 tmp_path / "get")
    assert got.final.status == Status.SUB_OPERATIONS_WARNING
    assert (got.final.completed, got.final.failed) == (1, 1)
    assert len(got.files) == 1
    sent = pydicom.dcmread(got.files[0])
    assert sent.SourceImageSequence[0].ReferencedSOPInstanceUID != broken.SOPInstanceUID
    before = len(served.viewer.files())
    moved = final_response(movescu(node.port, node.aet, "STUDY",
                                   {"StudyInstanceUID": broken.StudyInstanceUID}, "VIEWER"))
    assert moved.status == Status.SUB_OPERATIONS_WARNING
    assert (moved.completed, moved.failed) == (1, 1)
    assert len(served.viewer.files()) == before + 1


def test_retrieve_and_find_limits_refuse_with_a700(images, tmp_path) -> None:
    # The limits refuse before any image is sent: the lossless tier needs no model engine.
    node = start_node(_config(tmp_path, "[limits]\nmax_retrieve_instances = 1\n"
                                        "max_find_answers = 3\n", tier="lossless"))
    try:
        storescu(node.port, node.aet, images)
        got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": _study(images)},
                     tmp_path / "g")
        assert got.final.status == Status.OUT_OF_RESOURCES
        assert "2" in (got.final.error_comment or "") and "1" in (got.final.error_comment or "")
        assert got.files == []
        found = findscu(node.port, node.aet, "IMAGE", {"SOPInstanceUID": ""})
        assert len(found.datasets) == 3
        assert found.final.status == Status.OUT_OF_RESOURCES and found.final.error_comment
    finally:
        node.stop()


@pytest.fixture
def service(tmp_path: Path, images: list[Path]) -> Iterator[Service]:
    """A service on a fresh SQLite archive with tight limits, holding the 4 phantoms."""
    config = load_config(None, environ={}, overrides={
        "archive.data_dir": str(tmp_path / "data"), "limits.max_image_pixels": SIZE[0] * SIZE[1],
        "limits.max_concurrent_decodes": 1, "limits.max_find_answers": 2,
        "node.dimse_timeout": 0.2})
    opened = open_service(config)
    try:
        for path in images:
            opened.store(pydicom.dcmread(path))
        yield opened
    finally:
        opened.close()


def _rows(service: Service, images: list[Path]) -> list[int]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = _study(images)
    return service.matches("STUDY", identifier, root="STUDY")


def test_images_over_the_pixel_limit_are_not_decoded(service: Service, images) -> None:
    rows = _rows(service, images)
    assert service.returned(rows[0]).Rows == SIZE[0]  # at the limit: decoded
    tight = Service(service.archive, service.engines, service.tier,
                    limits=type(service.limits)(max_image_pixels=SIZE[0] * SIZE[1] - 1))
    with pytest.raises(LimitExceededError) as caught:
        tight.returned(rows[0])
    assert caught.value.status == Status.OUT_OF_RESOURCES
    assert "max_image_pixels" in caught.value.message


def test_decodes_beyond_the_budget_are_refused_not_queued(service: Service, images) -> None:
    rows = _rows(service, images)
    with service.decodes.slot():  # the only slot is busy (another association's decode)
        with pytest.raises(LimitExceededError) as caught:
            service.returned(rows[0])
    assert caught.value.status == Status.OUT_OF_RESOURCES
    assert service.returned(rows[0]).SOPInstanceUID  # the slot is free again


def test_find_answers_beyond_the_limit_end_with_a700(service: Service) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.SOPInstanceUID = ""
    answers = service.find("IMAGE", identifier, root="STUDY")
    assert next(answers).SOPInstanceUID and next(answers).SOPInstanceUID
    with pytest.raises(LimitExceededError) as caught:
        next(answers)
    assert caught.value.status == Status.OUT_OF_RESOURCES
