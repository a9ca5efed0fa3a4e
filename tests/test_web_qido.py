"""QIDO-RS (PS3.18 10.6) with dicomweb-client, checked against C-FIND (DCMTK ``findscu``).

One node per archive database (SQLite at the latent tier, whose answers carry derived
UIDs; PostgreSQL at the lossless tier) holds four studies of two images, stored with
STOW-RS; ``limits.max_find_answers`` is 4, so the eight instances are one too many for
an unfiltered instance search. Every search is made with the same keys through
``findscu`` and the answers must agree.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset

from latentpacs import phantom
from netpeers import findscu
from webpeers import WebNode, start_web_node

#: Keys compared between QIDO-RS and C-FIND at each level.
STUDY_KEYS = ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "StudyTime",
              "AccessionNumber", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances")
IMAGE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns")
PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"


@dataclass(frozen=True)
class Loaded:
    """The module's node, what was stored and the STOW-RS answer."""

    web: WebNode
    sources: list[Path]
    stow: Dataset
    tier: str

    def find(self, level: str, keys: Mapping[str, str], returned: tuple[str, ...]) -> list[Dataset]:
        """findscu at ``level`` with ``keys`` and the ``returned`` return keys, sorted."""
        query = {**{key: "" for key in returned}, **keys}
        result = findscu(self.web.node.port, self.web.node.aet, level, query)
        assert result.final.status == 0
        return sorted(result.datasets, key=lambda ds: str(ds.get(returned[0])))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    folder = tmp_path_factory.mktemp(f"qido-{request.param}")
    sources = phantom.generate(folder / "dicom", 8, seed=43, size=(256, 208), images_per_study=2,
                               studies_per_patient=2)
    database, tier, dropped = None, "latent", ""
    if request.param == "postgresql":
        port = request.getfixturevalue("postgres_server")
        dropped = f"qido_{uuid.uuid4().hex}"
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                             autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{dropped}"')
        database, tier = f"postgresql+psycopg://postgres@127.0.0.1:{port}/{dropped}", "lossless"
    try:
        with start_web_node(folder / "node", tier=tier, database=database,
                            limits={"max_find_answers": 4}) as web:
            stow = web.client().store_instances([pydicom.dcmread(path) for path in sources])
            assert len(stow.ReferencedSOPSequence) == 8
            yield Loaded(web, sources, stow, tier)
    finally:
        if dropped:
            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                                 autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{dropped}" WITH (FORCE)')


def datasets(answers: list[dict[str, Any]], first: str) -> list[Dataset]:
    """QIDO-RS answers (DICOM JSON) as data sets, sorted by ``first``."""
    return sorted((Dataset.from_json(answer) for answer in answers), key=lambda ds: str(ds.get(first)))


def same(qido: list[Dataset], found: list[Dataset], keys: tuple[str, ...]) -> None:
    """The QIDO-RS answers hold the values the C-FIND answers hold for ``keys``."""
    assert len(qido) == len(found)
    for answer, expected in zip(qido, found, strict=True):
        for key in keys:
            assert str(answer.get(key, "")) == str(expected.get(key, "")), key


def uids(paths: list[Path], keyword: str) -> list[str]:
    return sorted({str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword)) for path in paths})


@pytest.mark.parametrize(("filters", "keys"), [
    ({}, {}),
    ({"PatientName": "PHANTOM^0002*"}, {"PatientName": "PHANTOM^0002*"}),
    ({"PatientName": "*0001"}, {"PatientName": "*0001"}),
    ({"PatientID": "LP000?"}, {"PatientID": "LP000?"}),
    ({"StudyDate": "20210101-20211231"}, {"StudyDate": "20210101-20211231"}),
    ({"00080050": "LP0002V0?"}, {"AccessionNumber": "LP0002V0?"}),
])
def test_study_searches_answer_as_cfind(loaded: Loaded, filters: dict[str, str],
                                        keys: dict[str, str]) -> None:
    answers = loaded.web.client().search_for_studies(search_filters=filters)
    qido = datasets(answers, "StudyInstanceUID")
    found = loaded.find("STUDY", keys, STUDY_KEYS)
    assert found, "the case must match something"
    same(qido, found, STUDY_KEYS)
    for ds in qido:
        assert ds.RetrieveURL == f"{loaded.web.dicomweb}/studies/{ds.StudyInstanceUID}"


def test_uid_lists_includefield_and_paging(loaded: Loaded) -> None:
    client = loaded.web.client()
    studies = uids(loaded.sources, "StudyInstanceUID")
    picked = datasets(client.search_for_studies(
        search_filters={"StudyInstanceUID": f"{studies[0]},{studies[2]}"}), "StudyInstanceUID")
    same(picked, loaded.find("STUDY", {"StudyInstanceUID": f"{studies[0]}\\{studies[2]}"},
                             STUDY_KEYS), STUDY_KEYS)
    assert [ds.StudyInstanceUID for ds in picked] == [studies[0], studies[2]]

    plain = datasets(client.search_for_studies(), "StudyInstanceUID")
    assert all("StudyDescription" not in ds for ds in plain)
    for fields in (["StudyDescription"], ["00081030"], ["all"]):
        extended = datasets(client.search_for_studies(fields=fields), "StudyInstanceUID")
        assert [ds.StudyDescription for ds in extended] == ["Synthetic screening mammogram"] * 4
    everything = datasets(client.search_for_studies(fields=["all"]), "StudyInstanceUID")
    assert [ds.NumberOfPatientRelatedStudies for ds in everything] == [2, 2, 2, 2]

    order = [answer["0020000D"]["Value"][0] for answer in client.search_for_studies()]
    page = client.search_for_studies(limit=2, offset=1)
    assert [answer["0020000D"]["Value"][0] for answer in page] == order[1:3]
    more = loaded.web.request("GET", "/dicom-web/studies?limit=2&offset=1")
    assert more.status == 200 and "additional results" in more.headers["warning"]
    last = loaded.web.request("GET", "/dicom-web/studies?limit=2&offset=2")
    assert len(json.loads(last.body)) == 2 and "warning" not in last.headers
    assert loaded.web.request("GET", "/dicom-web/studies?offset=4").status == 204


def test_series_and_instance_searches_answer_as_cfind(loaded: Loaded) -> None:
    client = loaded.web.client()
    study = uids(loaded.sources, "StudyInstanceUID")[3]
    series = datasets(client.search_for_series(study_instance_uid=study), "SeriesInstanceUID")
    same(series, loaded.find("SERIES", {"StudyInstanceUID": study}, SERIES_KEYS), SERIES_KEYS)
    (one,) = series
    assert one.RetrieveURL == f"{loaded.web.dicomweb}/studies/{study}/series/{one.SeriesInstanceUID}"
    assert "PatientID" not in one  # study attributes only when searching all series

    every = datasets(client.search_for_series(), "SeriesInstanceUID")
    same(every, loaded.find("SERIES", {}, (*SERIES_KEYS, "PatientID", "StudyInstanceUID")),
         (*SERIES_KEYS, "PatientID", "StudyInstanceUID"))
    numbered = datasets(client.search_for_series(search_filters={"SeriesNumber": "2"}),
                        "SeriesInstanceUID")
    same(numbered, loaded.find("SERIES", {"SeriesNumber": "2"}, SERIES_KEYS), SERIES_KEYS)

    images = datasets(client.search_for_instances(study_instance_uid=study,
                                                  series_instance_uid=one.SeriesInstanceUID),
                      "SOPInstanceUID")
    same(images, loaded.find("IMAGE", {"StudyInstanceUID": study,
                                       "SeriesInstanceUID": one.SeriesInstanceUID}, IMAGE_KEYS),
         IMAGE_KEYS)
    assert [ds.Rows for ds in images] == [256, 256]
    in_study = datasets(client.search_for_instances(study_instance_uid=study), "SOPInstanceUID")
    same(in_study, images, (*IMAGE_KEYS, "SeriesInstanceUID"))
    processing = datasets(client.search_for_instances(search_filters={"SOPClassUID": PROCESSING}),
                          "SOPInstanceUID")
    same(processing, loaded.find("IMAGE", {"SOPClassUID": PROCESSING},
                                 (*IMAGE_KEYS, "StudyInstanceUID", "PatientID")),
         (*IMAGE_KEYS, "StudyInstanceUID", "PatientID"))
    assert len(processing) == 2

    # The UIDs QIDO-RS shows are the ones C-FIND shows (derived at the latent tier), and the
    # Retrieve URLs STOW-RS answered point at them.
    shown = set()
    for study_uid in uids(loaded.sources, "StudyInstanceUID"):
        shown |= {ds.RetrieveURL for ds in datasets(
            client.search_for_instances(study_instance_uid=study_uid), "SOPInstanceUID")}
    assert shown == {item.RetrieveURL for item in loaded.stow.ReferencedSOPSequence}
    sent = set(uids(loaded.sources, "SOPInstanceUID"))
    returned = {url.rsplit("/", 1)[1] for url in shown}
    assert returned.isdisjoint(sent) if loaded.tier == "latent" else returned == sent

    with pytest.raises(requests.HTTPError) as too_many:
        client.search_for_instances()
    assert too_many.value.response.status_code == 413


@pytest.mark.parametrize("query", [
    "Foo=1", "limit=-1", "offset=x", "fuzzymatching=maybe", "StudyInstanceUID=1.2.*",
    "QueryRetrieveLevel=SERIES", "includefield=NotAKeyword", "NumberOfStudyRelatedInstances=abc",
    "PatientID.PatientName=X",
])
def test_bad_parameters_are_400(loaded: Loaded, query: str) -> None:
    answer = loaded.web.request("GET", f"/dicom-web/studies?{query}")
    assert answer.status == 400, answer.body
    assert answer.body.strip()


def test_no_match_fuzzy_and_media_types(loaded: Loaded) -> None:
    nothing = loaded.web.request("GET", "/dicom-web/studies?PatientID=NOBODY")
    assert nothing.status == 204 and nothing.body == b""
    assert loaded.web.client().search_for_studies(search_filters={"PatientID": "NOBODY"}) == []
    fuzzy = loaded.web.request("GET", "/dicom-web/studies?fuzzymatching=true&PatientName=phantom*")
    assert fuzzy.status == 200 and "fuzzymatching" in fuzzy.headers["warning"]
    assert fuzzy.headers["content-type"] == "application/dicom+json"
    assert len(json.loads(fuzzy.body)) == 4
    xml = loaded.web.request("GET", "/dicom-web/studies", headers={"Accept": "application/dicom+xml"})
    assert xml.status == 406
    assert loaded.web.request("GET", "/dicom-web/studies/1.2.x/series").status == 400
