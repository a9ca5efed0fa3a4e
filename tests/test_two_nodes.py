"""Scale out: two node processes on one PostgreSQL archive store and serve consistently.

Both nodes share the database and the data directory (the blob store), as two processes
on one machine behind distinct ports would. Half of the images go to each node; each
node then finds all of them (PS3.4 C.4.1) and retrieves by C-GET (PS3.4 C.4.3) what the
other one stored, bit-exact at the ``lossless`` tier. Then both nodes receive the same
images at the same time: every C-STORE succeeds and the archive keeps one copy of each.
The images (512 x 416) are large enough that every JPEG-LS stream is a blob in the
shared ``blobs`` directory (above the 64 KiB inline limit): one blob per image, each
named by its row and matching its SHA-256, whichever node wrote it.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import create_engine, text

from dicomtools import require
from latentpacs import phantom
from latentpacs.archive.blobs import BLOB_NAME, INLINE_LIMIT
from latentpacs.codec.tiers import RECEIVED
from latentpacs.errors import Status
from netpeers import HOST, SCU_TIMEOUT_S, dimse_responses, findscu, getscu, start_node, storescu
from test_node import write_config

COUNT = 8
SIZE = (512, 416)
#: Failure bound for the background coders to finish (never a timing assertion).
SETTLE_S = 120.0


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(tmp_path_factory.mktemp("phantoms"), COUNT, seed=17, size=SIZE,
                            images_per_study=2)


def _settled_rows(url: str, blob_dir: Path) -> list[tuple[str | None, str]]:
    """The rows' (stream_path, stream_sha256) once the background coders are done.

    The lossless tier codes deferred: each node acknowledges an image as received, and its
    background coder then writes the JPEG-LS blob, swaps it into the row and removes the
    blob as received. Until then a row is pending and the directory holds one blob more;
    under load that can outlast the C-STORE. Polled until no row is pending and the
    directory holds the rows' blobs alone (or ``SETTLE_S`` passes; the checks then fail).
    """
    engine = create_engine(url)
    deadline = time.monotonic() + SETTLE_S
    try:
        while True:
            with engine.connect() as connection:
                rows = connection.execute(text("SELECT stream_path, stream_sha256, stream_coder "
                                               "FROM latents")).all()
            on_disk = sorted(p.name for p in blob_dir.iterdir())
            pending = any(coder == RECEIVED for _, _, coder in rows)
            if (not pending and on_disk == sorted(str(path) for path, _, _ in rows)
                    or time.monotonic() > deadline):
                return [(path, digest) for path, digest, _ in rows]
            time.sleep(0.1)
    finally:
        engine.dispose()


def _check_blobs(url: str, blob_dir: Path, count: int) -> None:
    """Every instance's stream is a blob on disk, intact; no other blob is there."""
    rows = _settled_rows(url, blob_dir)
    assert len(rows) == count
    for path, digest in rows:
        assert path is not None and BLOB_NAME.fullmatch(path), "a stream was stored inline"
        data = (blob_dir / path).read_bytes()
        assert len(data) > INLINE_LIMIT and hashlib.sha256(data).hexdigest() == digest
    assert sorted(p.name for p in blob_dir.iterdir()) == sorted(path for path, _ in rows)


def _images(node) -> set[str]:
    found = findscu(node.port, node.aet, "IMAGE", {"SOPInstanceUID": ""})
    assert found.final.status == Status.SUCCESS
    return {ds.SOPInstanceUID for ds in found.datasets}


@pytest.mark.parametrize("archive_url", ["postgresql"], indirect=True)  # a fresh database
def test_two_nodes_on_one_postgresql_archive(archive_url, phantoms, tmp_path) -> None:
    shared = {"data_dir": str(tmp_path / "shared-data")}
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        configs.append(write_config(tmp_path / name, archive_url, archive=shared,
                                    codec={"tier": "lossless"}))
    with start_node(configs[0]) as first, start_node(configs[1]) as second:
        half = COUNT // 2
        assert [r.status for r in dimse_responses(storescu(first.port, first.aet, phantoms[:half]))] == [Status.SUCCESS] * half
        assert [r.status for r in dimse_responses(storescu(second.port, second.aet, phantoms[half:]))] == [Status.SUCCESS] * half

        originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in phantoms}
        assert _images(first) == _images(second) == set(originals)
        _check_blobs(archive_url, tmp_path / "shared-data" / "blobs", COUNT)

        # Each node retrieves what the other one stored.
        for node, stored_elsewhere in ((second, phantoms[:half]), (first, phantoms[half:])):
            studies = "\\".join(sorted({pydicom.dcmread(p).StudyInstanceUID for p in stored_elsewhere}))
            got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": studies},
                         tmp_path / f"get-{node.port}")
            assert got.final.status == Status.SUCCESS and got.final.completed == half
            for path in got.files:
                ds = pydicom.dcmread(path)
                np.testing.assert_array_equal(ds.pixel_array, originals[ds.SOPInstanceUID].pixel_array)

        # The same instances sent to both nodes at once: all acknowledged, kept once.
        fresh = phantom.generate(tmp_path / "fresh", 4, seed=18, size=SIZE, images_per_study=2)
        senders = [subprocess.Popen([require("storescu"), "-d", "-to", "10", "-aec", node.aet,
                                     HOST, str(node.port), *map(str, fresh)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    stdin=subprocess.DEVNULL)
                   for node in (first, second)]
        for sender in senders:
            output = sender.communicate(timeout=SCU_TIMEOUT_S)[0]
            result = subprocess.CompletedProcess(sender.args, sender.returncode, output, "")
            assert [r.status for r in dimse_responses(result)] == [Status.SUCCESS] * 4, output[-2000:]
        assert len(_images(first)) == len(_images(second)) == COUNT + 4
        _check_blobs(archive_url, tmp_path / "shared-data" / "blobs", COUNT + 4)
