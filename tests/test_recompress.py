"""Deferred recompression (issue 13 part 4, latentpacs/recompress.py, Archive.restream).

JPEG-LS rows of an archive are re-coded with the learned coder, the new stream is decoded
and checked against the archived pixel checksum, and only then swapped in, by a
compare-and-swap on the old stream. Whatever happens (a damaged stream, a concurrent
change, SIGKILL at any point), every row names one valid stream and a retrieval returns
the original Pixel Data byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from latentpacs import phantom
from latentpacs.archive import Archive, DuplicatePolicy, StoreResult
from latentpacs.codec import learned
from latentpacs.codec.cards import default_models_dir, find_model_by_sha256
from latentpacs.codec.jpegls import encode_stream
from latentpacs.codec.streams import get_coder
from latentpacs.codec.tiers import Tier
from latentpacs.config import load_config
from latentpacs.errors import LatentPacsError
from latentpacs.recompress import (
    SKIP_NEAR_LOSSLESS, SKIP_NOT_SMALLER, Result, candidates, recompress_one, recompress_rows,
)
from latentpacs.service import Service, open_engines, open_service
from netpeers import getscu, start_node, storescu
from test_node import write_config

#: Failure bound for waits (never a timing assertion).
WAIT_S = 300.0
#: The coder rows are recompressed with.
TARGET = "learned"
#: Streams above 64 KiB live in blob files: a phantom this size codes to more than that.
BLOB_SIZE = (640, 520)
SMALL_SIZE = (128, 104)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Physical phantoms, two per study, so the storage profiles (bit depths, MONOCHROME1/2) vary."""
    return phantom.generate(tmp_path_factory.mktemp("small"), 6, seed=131, size=SMALL_SIZE,
                            images_per_study=2, dose=1000.0)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Physical phantoms whose streams are blobs."""
    return phantom.generate(tmp_path_factory.mktemp("large"), 2, seed=137, size=BLOB_SIZE,
                            images_per_study=1, dose=1000.0)


def _config(tmp_path: Path, *, database: str | None = None, tier: str = "lossless",
            coder: str = "jpeg-ls", **overrides: object):
    return load_config(None, environ={}, overrides={
        "archive.data_dir": str(tmp_path / "data"), "archive.database": database,
        "codec.tier": tier, "codec.coder": coder, **overrides})


def _archive(config) -> Archive:
    return Archive(config.database_url, blob_dir=Path(config["archive.data_dir"]) / "blobs")


def _store(config, paths: list[Path]) -> None:
    """Archive ``paths`` in line (no deferred coding) with the configuration's coder and tier."""
    service = Service(_archive(config), open_engines(config), config.tier,
                      coder=config["codec.coder"])
    try:
        for path in paths:
            assert service.store(pydicom.dcmread(path)) is StoreResult.STORED
    finally:
        service.close()


def _originals(paths: list[Path]) -> dict[str, bytes]:
    return {str(ds.SOPInstanceUID): ds.PixelData for ds in (pydicom.dcmread(p) for p in paths)}


def _blobs(config) -> set[str]:
    root = Path(config["archive.data_dir"]) / "blobs"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def _named_blobs(archive_url: str) -> set[str]:
    engine = create_engine(archive_url)
    try:
        with engine.connect() as connection:
            return {row[0] for row in connection.execute(
                text("SELECT stream_path FROM latents WHERE stream_path IS NOT NULL"))}
    finally:
        engine.dispose()


def _check_every_row(config, originals: dict[str, bytes]) -> dict[str, int]:
    """Every row returns its original Pixel Data, and the archive's figures count exactly
    the streams its rows name; returns the number of streams per coder."""
    service = open_service(config)
    try:
        returned = {uid: service.returned(row_id).PixelData
                    for row_id, uid in service.archive.instance_rows()}
        assert returned == originals
        stats = service.archive.stats()
        images = list(service.archive.iter_images())
        assert stats.archived_bytes == sum(image.archived_bytes for image in images)
        assert sum(c.streams for c in stats.coders) == stats.instances == len(originals)
        assert {c.coder: c.stream_bytes for c in stats.coders} == {
            coder: sum(len(i.stream) for i in images if i.stream_coder == coder)
            for coder in {i.stream_coder for i in images}}
        return {c.coder: c.streams for c in stats.coders}
    finally:
        service.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "latentpacs"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=WAIT_S)


def test_recompressed_rows_return_the_original_pixels_byte_for_byte(
        tmp_path: Path, small: list[Path], large: list[Path]) -> None:
    config = _config(tmp_path)
    paths = small + large
    _store(config, paths)
    jpeg_ls_blobs = _blobs(config)
    assert len(jpeg_ls_blobs) == len(large)
    with _archive(config) as archive:
        rows = list(candidates(archive, TARGET))
        assert [row.coder for row in rows] == ["jpeg-ls"] * len(paths)
        summary = recompress_rows(archive, TARGET, rows, only_smaller=False)
        assert (summary.recompressed, summary.skipped, summary.failed) == (len(paths), 0, 0)
        assert summary.bytes_before == sum(row.stream_bytes for row in rows)
        assert list(candidates(archive, TARGET)) == []
        images = list(archive.iter_images())
    assert {image.stream_coder for image in images} == {TARGET}
    assert all(image.pixel_sha256 == image.returned_sha256 for image in images)
    assert _check_every_row(config, _originals(paths)) == {TARGET: len(paths)}
    # The JPEG-LS blobs were deleted after their swaps committed; what is left is named.
    assert not jpeg_ls_blobs & _blobs(config)
    assert _blobs(config) == _named_blobs(config.database_url)
    # Each learned stream names its coder model, and that model file is installed.
    for image in images:
        assert find_model_by_sha256(learned.stream_model(image.stream), default_models_dir())


def test_archive_recompress_and_stats_per_coder(tmp_path: Path, small: list[Path]) -> None:
    config = _config(tmp_path)
    _store(config, small)
    options = ("--data-dir", str(tmp_path / "data"))
    native = sum(ds.Rows * ds.Columns * ds.BitsAllocated // 8
                 for ds in (pydicom.dcmread(p) for p in small))

    part = _cli("archive", "recompress", "--coder", TARGET, "--limit", "2", "--even-if-larger",
                *options)
    assert part.returncode == 0, part.stderr
    assert f"recompressed 2, skipped 0, failed 0 of 2 stream(s) not coded by {TARGET}" in part.stdout
    stats = _cli("archive", "stats", "--json", *options)
    assert stats.returncode == 0, stats.stderr
    coders = {c["coder"]: c for c in json.loads(stats.stdout)["coders"]}
    assert sorted(coders) == ["jpeg-ls", TARGET]
    assert (coders["jpeg-ls"]["streams"], coders[TARGET]["streams"]) == (len(small) - 2, 2)
    assert coders["jpeg-ls"]["native_bytes"] + coders[TARGET]["native_bytes"] == native
    for c in coders.values():
        assert c["saved_bytes"] == c["native_bytes"] - c["stream_bytes"] > 0
        assert c["ratio"] == pytest.approx(c["native_bytes"] / c["stream_bytes"])

    rest = _cli("archive", "recompress", *options, "--coder", TARGET, "--even-if-larger")
    assert rest.returncode == 0, rest.stderr
    assert f"recompressed {len(small) - 2}, skipped 0, failed 0 of {len(small) - 2}" in rest.stdout
    table = _cli("archive", "stats", *options)
    assert table.returncode == 0, table.stderr
    (line,) = [line for line in table.stdout.splitlines() if line.startswith(f"{TARGET} v")]
    fields = line.split()  # coder, version, streams, native, stream, saved bytes, ratio
    assert fields[2:4] == [str(len(small)), str(native)]
    assert int(fields[5]) == native - int(fields[4]) > 0
    assert "jpeg-ls" not in table.stdout


def test_near_lossless_rows_are_skipped_and_counted(tmp_path: Path, small: list[Path]) -> None:
    config = _config(tmp_path, tier="near-lossless:2")
    _store(config, small[:3])
    with _archive(config) as archive:
        before = list(archive.iter_images())
    done = _cli("archive", "recompress", "--coder", TARGET, "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr
    assert "recompressed 0, skipped 3, failed 0 of 3" in done.stdout
    assert f"skipped 3: {SKIP_NEAR_LOSSLESS}" in done.stdout
    with _archive(config) as archive:
        assert list(archive.iter_images()) == before
        # The background coder does not even list them.
        assert list(candidates(archive, TARGET, tiers=("lossless",))) == []


def test_a_damaged_old_stream_is_refused_and_named(tmp_path: Path, small: list[Path],
                                                   large: list[Path]) -> None:
    """A blob whose bytes changed (SHA-256 check) and an inline stream replaced, hash and
    all, by a valid JPEG-LS stream of other pixels (pixel checksum): neither is re-coded."""
    config = _config(tmp_path)
    _store(config, [large[0], small[0], small[1]])
    uids = list(_originals([large[0], small[0], small[1]]))
    (blob,) = _blobs(config)
    damaged = Path(config["archive.data_dir"]) / "blobs" / blob
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    ds = pydicom.dcmread(small[0])
    pixels = ds.pixel_array.copy()
    pixels[5, 5] ^= 1
    forged = encode_stream(pixels, int(ds.BitsStored), 0)
    engine = create_engine(config.database_url)
    with engine.begin() as connection:
        connection.execute(text(
            "UPDATE latents SET stream = :s, stream_sha256 = :h WHERE instance_fk = "
            "(SELECT id FROM instances WHERE sop_instance_uid = :u)"),
            {"s": forged, "h": hashlib.sha256(forged).hexdigest(), "u": uids[1]})
    engine.dispose()
    before = _named_blobs(config.database_url)

    done = _cli("archive", "recompress", "--coder", TARGET, "--even-if-larger",
                "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 1
    assert "recompressed 1, skipped 0, failed 2 of 3" in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("latentpacs: ")]
    assert len(errors) == 2
    assert uids[0] in errors[0] and "SHA-256" in errors[0]
    assert uids[1] in errors[1] and "checksum" in errors[1]
    with _archive(config) as archive:
        coders = {image.sop_instance_uid: image.stream_coder for image in _loadable(archive)}
    assert coders == {uids[1]: "jpeg-ls", uids[2]: TARGET}
    assert _named_blobs(config.database_url) == before and damaged.exists()


def _loadable(archive: Archive) -> list:
    """The rows whose stream still reads (the damaged blob does not)."""
    images = []
    for row_id, _uid in archive.instance_rows():
        try:
            images.append(archive.load(row_id))
        except LatentPacsError:
            continue
    return images


def test_compare_and_swap_loses_to_a_concurrent_change(tmp_path: Path, archive_url: str,
                                                       large: list[Path]) -> None:
    config = _config(tmp_path, database=archive_url, **{"archive.duplicates": "replace"})
    _store(config, large[:1])
    with _archive(config) as archive:
        (row,) = list(candidates(archive, TARGET))
        stale = archive.load(row.instance_id)
        stale_sha256 = hashlib.sha256(stale.stream).hexdigest()
        coded = get_coder(TARGET).encode(pydicom.dcmread(large[0]).pixel_array, stale.bits_stored, 0)
        # Two workers race on the same row: exactly one swaps, the other is told it lost.
        results: list[Result] = []
        workers = [threading.Thread(target=lambda: results.append(
            recompress_one(archive, TARGET, row, only_smaller=False).result)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(WAIT_S)
        assert sorted(results) == [Result.RECOMPRESSED, Result.SKIPPED]
        winner = archive.load(row.instance_id)
        # A swap that still expects the JPEG-LS stream loses, and leaves no blob behind.
        assert not archive.restream(row.instance_id, stale_sha256, coded,
                                    coder=TARGET, coder_version=1)
        assert archive.load(row.instance_id) == winner

    # A re-send replaces the row while a recompression is under way: the swap loses.
    changed = pydicom.dcmread(large[0])
    pixels = changed.pixel_array.copy()
    pixels[:8, :8] = 3
    changed.PixelData = pixels.tobytes()
    service = Service(_archive(config), open_engines(config), config.tier,
                      duplicates=DuplicatePolicy.REPLACE)
    try:
        assert service.store(changed) is StoreResult.REPLACED
        row_id = service.archive.instance_id(str(changed.SOPInstanceUID))
        assert row_id is not None
        current = service.archive.load(row_id)
        assert not service.archive.restream(row_id, hashlib.sha256(winner.stream).hexdigest(),
                                            coded, coder=TARGET, coder_version=1)
        assert service.archive.load(row_id) == current
        assert service.returned(row_id).PixelData == changed.PixelData
    finally:
        service.close()
    assert _blobs(config) == _named_blobs(archive_url)


def _learned_rows(database: Path) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return int(connection.execute(
            "SELECT count(*) FROM latents WHERE stream_coder = ?", (TARGET,)).fetchone()[0])


def test_sigkill_during_archive_recompress_loses_nothing(tmp_path: Path, small: list[Path],
                                                         large: list[Path]) -> None:
    """`archive recompress` is killed three times, each once it has swapped one or two more
    rows (polled in the archive, never timed); each time every row returns its original
    pixels and the figures count exactly what the rows name, and a last run finishes."""
    config = _config(tmp_path)
    paths = small + large
    _store(config, paths)
    originals = _originals(paths)
    script = Path(sys.executable).parent / "latentpacs"
    command = [str(script), "archive", "recompress", "--coder", TARGET, "--even-if-larger",
               "--data-dir", str(tmp_path / "data")]
    database = tmp_path / "data" / "archive.db"
    done = 0
    for step in (1, 2, 2):
        k = done + step
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + WAIT_S
            while _learned_rows(database) < k:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, f"{k} rows not recompressed in {WAIT_S:.0f} s"
                time.sleep(0.005)
            process.send_signal(signal.SIGKILL)
            assert process.wait(WAIT_S) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(WAIT_S)
            if process.stderr is not None:
                process.stderr.close()
        counts = _check_every_row(config, originals)
        done = counts.get(TARGET, 0)
        assert k <= done < len(paths)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=WAIT_S)
    assert finished.returncode == 0, finished.stderr
    assert _check_every_row(config, originals) == {TARGET: len(paths)}
    with _archive(config):  # opening sweeps what a kill left unnamed
        pass
    assert _blobs(config) == _named_blobs(config.database_url)


_KILL_AT = """
import os, signal, sys
from pathlib import Path
from latentpacs.archive import Archive
from latentpacs.archive.blobs import BlobStore
from latentpacs.recompress import candidates, recompress_one

class KilledAfterPut(BlobStore):
    def put(self, data, sha256=None):
        written = super().put(data, sha256)
        os.kill(os.getpid(), signal.SIGKILL)  # the new blob is durable, the swap not begun
        return written

class KilledAfterCommit(Archive):
    def _drop_blob_if_unused(self, blob):
        os.kill(os.getpid(), signal.SIGKILL)  # the swap committed, the old blob not deleted

url, blobs, point, coder = sys.argv[1:]
if point == "after-put":
    archive = Archive(url, blob_store=KilledAfterPut(Path(blobs)), sweep=False)
else:
    archive = KilledAfterCommit(url, blob_dir=Path(blobs), sweep=False)
row = next(candidates(archive, coder))
recompress_one(archive, coder, row, only_smaller=False)
"""


@pytest.mark.parametrize("point", ["after-put", "after-commit"])
def test_sigkill_inside_one_swap_leaves_one_valid_stream(tmp_path: Path, large: list[Path],
                                                         point: str) -> None:
    """Killed with the new blob durable but the swap not begun, or with the swap
    committed but the old blob not yet deleted: the row names one valid stream (the old
    or the new), the other blob is an orphan no figure counts, and the next open sweeps it."""
    config = _config(tmp_path)
    _store(config, large[:1])
    originals = _originals(large[:1])
    (old_blob,) = _blobs(config)
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AT, config.database_url,
         str(tmp_path / "data" / "blobs"), point, TARGET],
        capture_output=True, text=True, timeout=WAIT_S)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(_blobs(config)) == 2  # old and new, one of them named by the row
    expected = "jpeg-ls" if point == "after-put" else TARGET
    assert _check_every_row(config, originals) == {expected: 1}
    named = _named_blobs(config.database_url)
    assert (old_blob in named) == (point == "after-put") and len(named) == 1
    with _archive(config) as archive:  # the open sweeps the orphan
        assert _blobs(config) == named
        summary = recompress_rows(archive, TARGET, candidates(archive, TARGET),
                                  only_smaller=False)
    assert summary.recompressed == int(point == "after-put")
    assert _check_every_row(config, originals) == {TARGET: 1}
    assert _blobs(config) == _named_blobs(config.database_url)


def _flat(source: Path, out: Path) -> Path:
    """A copy of ``source`` under a new SOP Instance UID whose pixels are all one value:
    JPEG-LS codes it in a few dozen bytes, less than the learned coder's header alone."""
    ds = pydicom.dcmread(source)
    ds.PixelData = np.full((ds.Rows, ds.Columns), 700, np.uint16).tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[str(source), "flat"])
    ds.save_as(out, enforce_file_format=True)
    return out


def _expected_coders(config) -> dict[str, str]:
    """The coder each row ends with once recompressed: the target where its verified
    stream is smaller than the row's stream, else the row's own (computed here, the
    coders being deterministic)."""
    target = get_coder(TARGET)
    expected = {}
    with _archive(config) as archive:
        for image in archive.iter_images():
            stored = get_coder(image.stream_coder).decode(image.stream)
            smaller = len(target.encode(stored, image.bits_stored, 0)) < len(image.stream)
            expected[image.sop_instance_uid] = TARGET if smaller else image.stream_coder
    return expected


def _coders(config) -> dict[str, str]:
    """Each row's stream coder (read without sweeping: a node may be running)."""
    with Archive(config.database_url, blob_dir=Path(config["archive.data_dir"]) / "blobs",
                 migrate=False, sweep=False) as archive:
        return {image.sop_instance_uid: image.stream_coder for image in archive.iter_images()}


def test_a_stream_that_would_grow_is_kept(tmp_path: Path, small: list[Path]) -> None:
    config = _config(tmp_path)
    _store(config, [_flat(small[0], tmp_path / "flat.dcm")])
    options = ("--coder", TARGET, "--data-dir", str(tmp_path / "data"))
    kept = _cli("archive", "recompress", *options)
    assert kept.returncode == 0, kept.stderr
    assert "recompressed 0, skipped 1, failed 0 of 1" in kept.stdout
    assert f"skipped 1: {SKIP_NOT_SMALLER}" in kept.stdout
    assert set(_coders(config).values()) == {"jpeg-ls"}
    forced = _cli("archive", "recompress", "--even-if-larger", *options)
    assert forced.returncode == 0, forced.stderr
    assert "recompressed 1, skipped 0, failed 0 of 1" in forced.stdout
    assert set(_coders(config).values()) == {TARGET}


def test_the_idle_background_coder_recompresses_unless_turned_off(
        tmp_path: Path, small: list[Path]) -> None:
    """A node with codec.coder = learned codes its pending image, then recompresses the
    JPEG-LS rows while idle (keeping a stream the learned one would not shrink); with
    codec.recompress = false it leaves them alone."""
    config = _config(tmp_path)
    flat = _flat(small[0], tmp_path / "flat.dcm")
    _store(config, [*small[:3], flat])
    before = _coders(config)
    expected = _expected_coders(config)
    assert expected[str(pydicom.dcmread(flat).SOPInstanceUID)] == "jpeg-ls"
    off = open_service(_config(tmp_path, coder=TARGET, **{"codec.recompress": False}),
                       background=True)
    try:
        assert off.deferred is not None and not off.deferred.recompress
        assert off.store(pydicom.dcmread(small[3]), received=small[3]) is StoreResult.STORED
        assert off.deferred.wait_idle(WAIT_S) and off.deferred.wait_recompressed(WAIT_S)
    finally:
        off.close()
    # The pending image only was coded, by learned; the JPEG-LS rows are as they were.
    assert _coders(config) == {**before, str(pydicom.dcmread(small[3]).SOPInstanceUID): TARGET}
    on = open_service(_config(tmp_path, coder=TARGET), background=True)
    try:
        assert on.deferred is not None and on.deferred.recompress
        assert on.store(pydicom.dcmread(small[4]), received=small[4]) is StoreResult.STORED
        assert on.deferred.wait_recompressed(WAIT_S)
        assert on.archive.stats().pending == 0
        assert on.deferred.recompressed == list(expected.values()).count(TARGET)
    finally:
        on.close()
    received = {str(pydicom.dcmread(p).SOPInstanceUID): TARGET for p in small[3:5]}
    assert _coders(config) == {**expected, **received}
    _check_every_row(config, _originals([*small[:5], flat]))


def test_a_learned_node_recompresses_while_idle_and_c_get_returns_the_originals(
        tmp_path: Path, small: list[Path]) -> None:
    """JPEG-LS rows archived before; a node with codec.coder = learned acknowledges new
    images as before, recompresses the old rows when idle, and C-GET returns every
    original byte for byte (getscu, the learned stream decoded for it)."""
    database = f"sqlite:///{tmp_path / 'node.db'}"
    archived = _config(tmp_path, database=database)
    _store(archived, small[:2])  # one study, JPEG-LS
    expected = {**_expected_coders(archived), **{
        str(pydicom.dcmread(p).SOPInstanceUID): TARGET for p in small[2:4]}}
    config = write_config(tmp_path, database, codec={"tier": "lossless", "coder": TARGET})
    with start_node(config) as node:
        sent = storescu(node.port, node.aet, small[2:4])
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + WAIT_S
        while _coders(archived) != expected:  # polled in the archive, never timed
            assert time.monotonic() < deadline, f"not recompressed in {WAIT_S:.0f} s"
            time.sleep(0.05)
        files: list[Path] = []
        for study in sorted({str(pydicom.dcmread(p).StudyInstanceUID) for p in small[:4]}):
            got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study},
                         tmp_path / "got")
            assert got.final.status == 0x0000, got
            files += got.files
    returned = {str(ds.SOPInstanceUID): ds.PixelData
                for ds in (pydicom.dcmread(path) for path in files)}
    assert returned == _originals(small[:4])
