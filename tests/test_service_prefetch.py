"""Retrievals decode the next instance ahead (Service.returned_ahead, used by C-GET/C-MOVE).

What a user notices: the objects sent are the same, in the same order, as decoding one at
a time; a bad instance still fails the retrieval at that instance with its error; and a
retrieval stopped early (cancel, failure) leaves the service usable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from latentpacs import phantom
from latentpacs.config import load_config
from latentpacs.errors import LatentFormatError
from latentpacs.service import Service, open_service


@dataclasses.dataclass(frozen=True)
class Stored:
    """A service and the one study it holds."""

    service: Service
    study_uid: str


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[Stored]:
    """A service on a fresh SQLite archive holding one study of four small phantoms (seed 3)."""
    config = load_config(None, environ={}, overrides={"archive.data_dir": str(tmp_path / "data")})
    opened = open_service(config)
    try:
        for path in phantom.generate(tmp_path / "images", 4, 3, size=(96, 80), images_per_study=4):
            ds = pydicom.dcmread(path)
            opened.store(ds)
        yield Stored(opened, str(ds.StudyInstanceUID))
    finally:
        opened.close()


def _study(stored: Stored) -> list:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = stored.study_uid
    service = stored.service
    return [service.archive.load(row) for row in service.matches("STUDY", query, root="STUDY")]


def test_decoded_ahead_equals_decoded_one_by_one(stored: Stored) -> None:
    service = stored.service
    matches = _study(stored)
    assert len(matches) == 4
    ahead = [(archived, future.result()) for archived, future in service.returned_ahead(matches)]
    assert [archived for archived, _ in ahead] == matches
    for archived, ds in ahead:
        one = service.returned(archived)
        assert ds.SOPInstanceUID == one.SOPInstanceUID
        assert ds.PixelData == one.PixelData


def test_a_bad_instance_fails_at_its_place(stored: Stored) -> None:
    service = stored.service
    matches = _study(stored)
    broken = dataclasses.replace(matches[2], latent=b"\x00")
    sent, error = [], None
    for archived, future in service.returned_ahead([*matches[:2], broken, matches[3]]):
        try:
            sent.append(future.result().SOPInstanceUID)
        except LatentFormatError as exc:
            error = exc
            break
    assert len(sent) == 2
    assert error is not None


def test_stopping_early_leaves_the_service_usable(stored: Stored) -> None:
    service = stored.service
    matches = _study(stored)
    decoded = service.returned_ahead(matches, depth=2)
    _, first = next(decoded)
    decoded.close()
    assert first.result().SOPInstanceUID
    again = [future.result() for _, future in service.returned_ahead(matches)]
    assert len(again) == 4
    assert again[0].SOPInstanceUID == first.result().SOPInstanceUID
