"""Durability: a C-STORE Success means the instance is committed (PS3.4 B.2.3).

The node (``lossless`` tier) is killed with SIGKILL in the middle of an ingest
(``storescu`` still sending), restarted on the same archive, and then every image
``storescu`` saw acknowledged must be retrievable by C-GET with its original pixels,
while the database holds no half-written record: every instance has its latent, every
series its instances. The images are large enough (512 x 416, JPEG-LS streams well above
the 64 KiB inline limit) that every stream is a blob in ``data_dir/blobs``: each
acknowledged image's blob exists and matches its SHA-256, ``latentpacs archive verify``
passes, and the restart's sweep has left exactly the blobs that rows name (none of the
killed store's, no ``.incoming-*``). Re-sending the whole batch afterwards completes the
archive. SQLite (WAL, synchronous=FULL) and PostgreSQL both.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import pydicom
import pytest
from sqlalchemy import create_engine, text

from dicomtools import require
from latentpacs import phantom
from latentpacs.archive.blobs import BLOB_NAME, INLINE_LIMIT
from latentpacs.errors import Status
from netpeers import HOST, SCU_TIMEOUT_S, dimse_responses, findscu, getscu, storescu
from test_node import node_factory  # noqa: F401 (fixture)

COUNT = 12
SIZE = (512, 416)
#: The node is killed once storescu has seen this many Success responses.
KILL_AFTER = 4
_SUCCESS = re.compile(r"DIMSE Status\s+: 0x0000")


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(tmp_path_factory.mktemp("batch"), COUNT, seed=31, size=SIZE,
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


def _blobs_named(url: str) -> dict[str, tuple[str, str]]:
    """Original SOP Instance UID -> (blob path, SHA-256) of every archived instance."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {uid: (path, digest) for uid, path, digest in connection.execute(text(
                "SELECT i.original_sop_instance_uid, l.stream_path, l.stream_sha256 "
                "FROM instances i JOIN latents l ON l.instance_fk = i.id"))}
    finally:
        engine.dispose()


def test_acknowledged_images_survive_sigkill(archive_url, node_factory, batch, tmp_path) -> None:
    node = node_factory(archive_url, codec={"tier": "lossless"})
    interrupted = _store_until_killed(node, batch)
    statuses = [r.status for r in dimse_responses(interrupted)]
    assert statuses[:KILL_AFTER] == [Status.SUCCESS] * KILL_AFTER
    acknowledged = {pydicom.dcmread(path).SOPInstanceUID
                    for path, status in zip(batch, statuses) if status == Status.SUCCESS}
    assert KILL_AFTER <= len(acknowledged) < COUNT, "the kill must land in the middle of the ingest"

    # The restarted node codes nothing in the background, so the blobs and rows this test
    # inspects stay as the kill and the restart's sweep left them (images acknowledged as
    # received, or coded before the kill).
    again = node_factory(archive_url, codec={"tier": "lossless", "deferred_background": False})
    assert _half_written(archive_url) == dict.fromkeys(
        ("instance without latent", "series without instance", "study without series"), 0)
    found = findscu(again.port, again.aet, "IMAGE", {"SOPInstanceUID": ""}).datasets
    assert len(found) >= len(acknowledged)

    # Every acknowledged stream is a blob that survived the kill intact; the restart's
    # sweep left exactly the blobs rows name.
    blob_dir = tmp_path / "data" / "blobs"
    named = _blobs_named(archive_url)
    assert acknowledged <= set(named)
    for uid in acknowledged:
        path, digest = named[uid]
        assert path is not None and BLOB_NAME.fullmatch(path), f"{uid} was stored inline"
        data = (blob_dir / path).read_bytes()
        assert len(data) > INLINE_LIMIT and hashlib.sha256(data).hexdigest() == digest == path
    assert sorted(p.name for p in blob_dir.iterdir()) == sorted(path for path, _ in named.values())
    verify = subprocess.run([str(Path(sys.executable).parent / "latentpacs"), "--config",
                             str(tmp_path / "node.toml"), "archive", "verify"],
                            capture_output=True, text=True, timeout=SCU_TIMEOUT_S)
    assert verify.returncode == 0, verify.stderr
    assert f"verified {len(named)} of {len(named)}" in verify.stdout

    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in batch}
    studies = "\\".join(originals[uid].StudyInstanceUID for uid in sorted(acknowledged))
    got = getscu(again.port, again.aet, "STUDY", {"StudyInstanceUID": studies}, tmp_path / "get")
    assert got.final.status == Status.SUCCESS and got.final.failed == 0
    returned = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, got.files)}
    assert set(returned) == acknowledged  # lossless: the original UIDs
    for uid, ds in returned.items():
        np.testing.assert_array_equal(ds.pixel_array, originals[uid].pixel_array)

    # The interrupted batch can simply be sent again: everything ends up archived once.
    resent = storescu(again.port, again.aet, batch)
    assert [r.status for r in dimse_responses(resent)] == [Status.SUCCESS] * COUNT
    assert len(findscu(again.port, again.aet, "IMAGE", {"SOPInstanceUID": ""}).datasets) == COUNT
    assert len({path for path, _ in _blobs_named(archive_url).values()}) == COUNT
    assert len([p for p in blob_dir.iterdir() if BLOB_NAME.fullmatch(p.name)]) == COUNT
    assert _half_written(archive_url) == dict.fromkeys(
        ("instance without latent", "series without instance", "study without series"), 0)
