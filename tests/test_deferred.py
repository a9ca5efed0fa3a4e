"""Deferred coding at the lossless tier (issue 10, latentpacs/deferred.py).

A native image is acknowledged once the object as received is durable; JPEG-LS coding
runs afterwards. Whatever state a row is in (pending, coded, or a crash in between), a
retrieval returns the original pixels and nothing acknowledged is lost.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEGLSLossless

from latentpacs import phantom
from latentpacs.archive import Archive, DuplicatePolicy, StoreResult
from latentpacs.codec.tiers import RECEIVED
from latentpacs.codec.tiers import Tier
from latentpacs.config import load_config
from latentpacs.deferred import code_all, code_one
from latentpacs.errors import PixelDataError
from latentpacs.service import Service, open_engines, open_service
from netpeers import getscu, start_node, storescu
from test_node import write_config

#: Failure bound for waits (never a timing assertion).
WAIT_S = 300.0


def _config(tmp_path: Path, **overrides: object):
    return load_config(None, environ={}, overrides={
        "archive.data_dir": str(tmp_path / "data"), "codec.tier": "lossless", **overrides})


def _service(tmp_path: Path, *, duplicates: DuplicatePolicy = DuplicatePolicy.KEEP) -> Service:
    """A lossless service with deferred coding on and its worker not started."""
    config = _config(tmp_path)
    archive = Archive(config.database_url, blob_dir=tmp_path / "data" / "blobs")
    return Service(archive, open_engines(config), Tier.parse("lossless"), duplicates=duplicates,
                   deferred=True)


def _blobs(tmp_path: Path) -> set[str]:
    root = tmp_path / "data" / "blobs"
    return {p.name for p in root.iterdir()} if root.exists() else set()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(tmp_path_factory.mktemp("deferred"), 3, seed=41, size=(300, 240),
                            images_per_study=3)


def test_a_native_image_is_archived_as_received_then_coded(tmp_path: Path, images: list[Path]) -> None:
    service = _service(tmp_path)
    try:
        original = pydicom.dcmread(images[0])
        assert service.store(pydicom.dcmread(images[0]), received=images[0]) is StoreResult.STORED
        assert service.archive.stats().pending == 1
        (pending,) = service.archive.iter_images()
        assert pending.stream_coder == RECEIVED and pending.stream == images[0].read_bytes()
        # Before coding, a retrieval returns the original from the object as received.
        assert service.returned(pending).PixelData == original.PixelData
        raw_blobs = _blobs(tmp_path)

        instance_id = service.archive.pending()[0]
        assert code_one(service.archive, service.engines, service.coder, instance_id)
        assert service.archive.stats().pending == 0
        (coded,) = service.archive.iter_images()
        assert coded.stream_coder == "jpeg-ls" and coded.pixel_sha256 == coded.returned_sha256
        assert len(coded.stream) < len(pending.stream) / 1.5
        assert service.returned(coded).PixelData == original.PixelData
        # The object as received is gone once its stream is coded and committed.
        assert not raw_blobs & _blobs(tmp_path)
        # Coding again changes nothing.
        assert not code_one(service.archive, service.engines, service.coder, instance_id)
    finally:
        service.close()


def test_only_native_lossless_images_are_deferred(tmp_path: Path, images: list[Path]) -> None:
    compressed = pydicom.dcmread(images[1])
    compressed.compress(JPEGLSLossless, generate_instance_uid=False)
    path = tmp_path / "jls.dcm"
    compressed.save_as(path)
    service = _service(tmp_path)
    try:
        service.store(pydicom.dcmread(path), received=path)
        service.store(pydicom.dcmread(images[0]))  # no received file: coded in line
        coders = sorted(image.stream_coder for image in service.archive.iter_images())
        assert coders == ["jpeg-ls", "jpeg-ls"]
        assert service.archive.stats().pending == 0
    finally:
        service.close()


def test_malformed_pixels_are_refused_before_the_acknowledgement(tmp_path: Path,
                                                                 images: list[Path]) -> None:
    broken = pydicom.dcmread(images[0])
    broken.PixelData = broken.PixelData[:-100]
    path = tmp_path / "short.dcm"
    broken.save_as(path)
    service = _service(tmp_path)
    try:
        with pytest.raises(PixelDataError):
            service.store(pydicom.dcmread(path), received=path)
        assert service.archive.stats().instances == 0
    finally:
        service.close()


def test_a_replace_while_pending_keeps_the_new_copy(tmp_path: Path, images: list[Path]) -> None:
    service = _service(tmp_path, duplicates=DuplicatePolicy.REPLACE)
    try:
        service.store(pydicom.dcmread(images[0]), received=images[0])
        (first_id,) = service.archive.pending()
        changed = pydicom.dcmread(images[0])
        pixels = changed.pixel_array.copy()
        pixels[:10, :10] = 7
        changed.PixelData = pixels.tobytes()
        path = tmp_path / "resent.dcm"
        changed.save_as(path)
        assert service.store(pydicom.dcmread(path), received=path) is StoreResult.REPLACED
        # The worker's item for the replaced row codes whatever that row id holds now
        # (SQLite may give the new copy the same id): never the old pixels.
        code_one(service.archive, service.engines, service.coder, first_id)
        code_all(service.archive, service.engines, service.coder)
        assert service.archive.stats().pending == 0
        (coded,) = service.archive.iter_images()
        assert service.returned(coded).PixelData == changed.PixelData
        # Both objects as received are gone (the small coded stream is inline in its row).
        assert len(coded.stream) <= 64 * 1024 and _blobs(tmp_path) == set()
    finally:
        service.close()


def test_a_coded_blob_left_by_a_crash_before_the_commit_is_swept(tmp_path: Path,
                                                                 images: list[Path]) -> None:
    """A crash between writing the coded stream and its commit: the row still names the
    object as received, the coded blob is an orphan the next open removes."""
    service = _service(tmp_path)
    try:
        service.store(pydicom.dcmread(images[0]), received=images[0])
    finally:
        service.close()
    before = _blobs(tmp_path)
    orphan = tmp_path / "data" / "blobs" / ("ab" * 32)
    orphan.write_bytes(b"a coded stream whose row never committed" * 2000)
    reopened = open_service(_config(tmp_path), background=True)  # sweeps, then codes
    try:
        assert reopened.deferred is not None and reopened.deferred.wait_idle(WAIT_S)
        assert reopened.archive.stats().pending == 0
        (coded,) = reopened.archive.iter_images()
        assert reopened.returned(coded).PixelData == pydicom.dcmread(images[0]).PixelData
        assert not orphan.exists() and not before & _blobs(tmp_path)
    finally:
        reopened.close()


def test_a_killed_node_loses_nothing_it_acknowledged(tmp_path: Path, images: list[Path]) -> None:
    """storescu into a lossless node, SIGKILL while coding may be under way, restart:
    every acknowledged image is coded and returned byte for byte."""
    database = f"sqlite:///{tmp_path / 'a.db'}"
    config = write_config(tmp_path, database, codec={"tier": "lossless"})
    with start_node(config) as node:
        sent = storescu(node.port, node.aet, images)
        assert sent.returncode == 0, sent.stderr
        node.kill()
    with Archive(database, blob_dir=tmp_path / "data" / "blobs") as archive:
        assert archive.stats().instances == len(images)
    with start_node(config) as node:
        deadline = time.monotonic() + WAIT_S
        with Archive(database, blob_dir=tmp_path / "data" / "blobs", sweep=False) as archive:
            while archive.stats().pending:
                if time.monotonic() > deadline:
                    pytest.fail(f"rows still pending after {WAIT_S:.0f} s")
                time.sleep(0.1)
        study = str(pydicom.dcmread(images[0]).StudyInstanceUID)
        got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study}, tmp_path / "got")
        assert got.final.completed == len(images)
    sent_pixels = {str(ds.SOPInstanceUID): ds.PixelData
                   for ds in (pydicom.dcmread(p) for p in images)}
    for path in got.files:
        ds = pydicom.dcmread(path)
        assert ds.PixelData == sent_pixels[str(ds.SOPInstanceUID)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The console script as the lossless node's operator runs it: at that node's tier
    (at ``lossless`` no model engine is built; the archive holds no latent)."""
    script = Path(sys.executable).parent / "latentpacs"
    env = {**os.environ, "LATENTPACS_CODEC_TIER": "lossless"}
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=WAIT_S,
                          env=env)


def test_archive_stats_verify_and_code_pending(tmp_path: Path, images: list[Path]) -> None:
    service = _service(tmp_path)
    try:
        for path in images:
            service.store(pydicom.dcmread(path), received=path)
    finally:
        service.close()
    options = ("--data-dir", str(tmp_path / "data"))
    stats = _cli("archive", "stats", *options)
    assert stats.returncode == 0, stats.stderr
    assert f"pending coding {len(images)}" in stats.stdout
    verify = _cli("archive", "verify", *options)
    assert verify.returncode == 0, verify.stderr
    assert f"verified {len(images)} of {len(images)}" in verify.stdout
    coded = _cli("archive", "code-pending", *options)
    assert coded.returncode == 0, coded.stderr
    assert f"coded {len(images)} of {len(images)}" in coded.stdout
    assert "pending coding 0" in _cli("archive", "stats", *options).stdout
    with Archive(f"sqlite:///{tmp_path / 'data' / 'archive.db'}",
                 blob_dir=tmp_path / "data" / "blobs") as archive:
        assert {image.stream_coder for image in archive.iter_images()} == {"jpeg-ls"}
