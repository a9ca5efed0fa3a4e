"""Durability: a C-STORE Success means the instance is committed (PS3.4 B.2.3).

The node is killed with SIGKILL in the middle of an ingest (``storescu`` still sending),
restarted on the same archive, and then every image ``storescu`` saw acknowledged must be
retrievable by C-GET, while the database holds no half-written record: every instance has
its latent, every series its instances. Re-sending the whole batch afterwards completes
the archive. SQLite (WAL, synchronous=FULL) and PostgreSQL both.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import create_engine, text

from dicomtools import require
from latentpacs import phantom
from latentpacs.errors import Status
from netpeers import HOST, SCU_TIMEOUT_S, dimse_responses, findscu, getscu, storescu
from test_node import node_factory  # noqa: F401 (fixture)

COUNT = 60
#: The node is killed once storescu has seen this many Success responses.
KILL_AFTER = 6
_SUCCESS = re.compile(r"DIMSE Status\s+: 0x0000")


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(tmp_path_factory.mktemp("batch"), COUNT, seed=31, size=(64, 52),
                            images_per_study=1)


def _store_until_killed(node, files: list[Path]) -> subprocess.CompletedProcess[str]:
    """Run storescu on ``files``; SIGKILL the node after KILL_AFTER Success responses."""
    argv = [require("storescu"), "-d", "-to", "10", "-nh", "-aet", "STORESCU", "-aec", node.aet,
            HOST, str(node.port), *map(str, files)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    lines, acknowledged = [], 0
    assert proc.stdout is not None
    for line in proc.stdout:  # ends when storescu exits (after the node is gone)
        lines.append(line)
        if _SUCCESS.search(line):
            acknowledged += 1
            if acknowledged == KILL_AFTER:
                node.kill()
    proc.wait(timeout=SCU_TIMEOUT_S)
    return subprocess.CompletedProcess(argv, proc.returncode, "".join(lines), "")


def _half_written(url: str) -> dict[str, int]:
    """Rows that a torn transaction would leave behind, by kind (all must be 0)."""
    checks = {
        "instance without latent": "SELECT count(*) FROM instances i "
                                   "LEFT JOIN latents l ON l.instance_fk = i.id WHERE l.instance_fk IS NULL",
        "series without instance": "SELECT count(*) FROM series s WHERE NOT EXISTS "
                                   "(SELECT 1 FROM instances i WHERE i.series_fk = s.id)",
        "study without series": "SELECT count(*) FROM studies t WHERE NOT EXISTS "
                                "(SELECT 1 FROM series s WHERE s.study_fk = t.id)",
    }
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {kind: int(connection.execute(text(sql)).scalar_one()) for kind, sql in checks.items()}
    finally:
        engine.dispose()


def test_acknowledged_images_survive_sigkill(archive_url, node_factory, batch, tmp_path) -> None:
    node = node_factory(archive_url)
    interrupted = _store_until_killed(node, batch)
    statuses = [r.status for r in dimse_responses(interrupted)]
    assert statuses[:KILL_AFTER] == [Status.SUCCESS] * KILL_AFTER
    acknowledged = {pydicom.dcmread(path).SOPInstanceUID
                    for path, status in zip(batch, statuses) if status == Status.SUCCESS}
    assert KILL_AFTER <= len(acknowledged) < COUNT, "the kill must land in the middle of the ingest"

    again = node_factory(archive_url)
    assert _half_written(archive_url) == dict.fromkeys(
        ("instance without latent", "series without instance", "study without series"), 0)
    found = findscu(again.port, again.aet, "IMAGE", {"SOPInstanceUID": ""}).datasets
    assert len(found) >= len(acknowledged)

    studies = "\\".join(pydicom.dcmread(p).StudyInstanceUID for p in batch
                        if pydicom.dcmread(p).SOPInstanceUID in acknowledged)
    got = getscu(again.port, again.aet, "STUDY", {"StudyInstanceUID": studies}, tmp_path / "get")
    assert got.final.status == Status.SUCCESS and got.final.failed == 0
    sources = {pydicom.dcmread(f).SourceImageSequence[0].ReferencedSOPInstanceUID for f in got.files}
    assert sources == acknowledged

    # The interrupted batch can simply be sent again: everything ends up archived once.
    resent = storescu(again.port, again.aet, batch)
    assert [r.status for r in dimse_responses(resent)] == [Status.SUCCESS] * COUNT
    assert len(findscu(again.port, again.aet, "IMAGE", {"SOPInstanceUID": ""}).datasets) == COUNT
    assert _half_written(archive_url) == dict.fromkeys(
        ("instance without latent", "series without instance", "study without series"), 0)
