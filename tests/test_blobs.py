"""Stream blobs: no clean-up race on replace, start-up sweep, permanent constraint failures.

Two :class:`Archive` objects on one database and one blob directory stand for two node
processes; the interleavings that lose a blob are played out step by step (the blob is
placed, the other archive deletes it, then the row commits), on a real SQLite file and a
real PostgreSQL server.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import psycopg
import pytest
from archive_data import MODEL, S1, S3, archived, phantom, retrieved

from latentpacs.archive import Archive, DuplicatePolicy, StoreResult
from latentpacs.archive.rows import add_instance
from latentpacs.errors import ArchiveError, ConstraintViolationError, DuplicateInstanceError, Status

JANE = ("P1", "Doe^Jane", "19600101", S1, "20240115", "090000", "Screening mammogram")
ANNA = ("P2", "SMITH^Anna", "19751231", S3, "20220601", "080000", "Screening mammogram")
BIG = 100 * 1024  # above the 64 KiB inline limit


def _open(url: str, blobs: Path) -> Archive:
    archive = Archive(url, blob_dir=blobs)
    archive.register_model(sha256=MODEL, name="test", arch="ae", card={})
    return archive


def test_a_replace_never_deletes_a_blob_a_concurrent_store_reuses(archive_url: str,
                                                                  tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    shared = os.urandom(BIG)
    digest = hashlib.sha256(shared).hexdigest()
    first = archived(phantom(*JANE, 1), stream=shared)
    second = archived(phantom(*JANE, 2), stream=shared)  # another instance, same content
    with _open(archive_url, blobs) as a, _open(archive_url, blobs) as b:
        assert a.store(first) is StoreResult.STORED
        # b starts storing `second`: the blob is already there, so it is reused ...
        placed = b._place_stream(second.stream)
        assert placed[1] == digest
        # ... a replaces `first` with other pixels, leaving the shared blob unnamed ...
        replacement = dataclasses.replace(first, stream=os.urandom(BIG))
        assert a.store(replacement, duplicates=DuplicatePolicy.REPLACE) is StoreResult.REPLACED
        # ... and then b's row naming the shared blob commits.
        assert b._store_once(second, DuplicatePolicy.KEEP, *placed)[0] is StoreResult.STORED
        assert [found.stream for found in retrieved(b, second.sop_instance_uid)] == [shared]
        assert (blobs / digest).read_bytes() == shared
        assert [found.stream for found in retrieved(a, replacement.sop_instance_uid)] == [replacement.stream]


def test_the_start_up_sweep_of_another_process_cannot_lose_a_blob_being_stored(
        archive_url: str, tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    image = archived(phantom(*ANNA, 1), stream=os.urandom(BIG))
    digest = hashlib.sha256(image.stream).hexdigest()
    with _open(archive_url, blobs) as storing:
        placed = storing._place_stream(image.stream)  # written and fsynced, not committed
        with Archive(archive_url, blob_dir=blobs):  # a second node starts and sweeps
            pass
        assert not (blobs / digest).exists()  # unnamed at that moment: an orphan
        assert storing._store_once(image, DuplicatePolicy.KEEP, *placed)[0] is StoreResult.STORED
        assert [found.stream for found in retrieved(storing, image.sop_instance_uid)] == [image.stream]
    with Archive(archive_url, blob_dir=blobs) as reopened:  # and the next sweep keeps it
        assert [found.stream for found in retrieved(reopened, image.sop_instance_uid)] == [image.stream]


def test_orphan_blobs_and_leftover_temporary_files_are_swept_at_open(archive_url: str,
                                                                     tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    image = archived(phantom(*JANE, 1), stream=os.urandom(BIG))
    named = hashlib.sha256(image.stream).hexdigest()
    with _open(archive_url, blobs) as archive:
        archive.store(image)
    orphan = hashlib.sha256(b"a store that died before its commit").hexdigest()
    (blobs / orphan).write_bytes(b"x" * BIG)
    (blobs / ".incoming-k3j_9x2a").write_bytes(b"half a blob")  # its writer was killed
    untouchable = ["README", "notes.txt", "0123abcd", orphan.upper(), orphan + ".bak",
                   ".incoming-", "incoming-abc"]
    for name in untouchable:
        (blobs / name).write_bytes(b"not ours")
    (blobs / hashlib.sha256(b"a directory").hexdigest()).mkdir()
    live = blobs / ".incoming-livewriter"  # a writer in another process, still writing
    with live.open("wb") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)
        with Archive(archive_url, blob_dir=blobs) as reopened:
            assert live.exists()
            assert reopened.sweep() == (0, 0)  # nothing left to do
            assert [found.stream for found in retrieved(reopened, image.sop_instance_uid)] == [image.stream]
    remaining = {path.name for path in blobs.iterdir()}
    assert remaining == {named, live.name, hashlib.sha256(b"a directory").hexdigest(),
                         *untouchable}
    with Archive(archive_url, blob_dir=blobs) as again:  # the writer has gone: swept now
        assert again.sweep() == (0, 0)
    assert not live.exists()


def test_a_permanent_constraint_violation_fails_clearly_after_one_retry(
        archive_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = archived(phantom(*JANE, 1))
    # Another instance whose returned SOP Instance UID is the first one's: no retry can
    # make the unique constraint on the returned UID hold.
    clash = archived(phantom(*JANE, 2), "latent")
    clash = dataclasses.replace(clash, overrides={
        **clash.overrides, "00080018": {"vr": "UI", "Value": [first.sop_instance_uid]}})
    with _open(archive_url, tmp_path / "blobs") as archive:
        archive.store(first)
        with caplog.at_level(logging.INFO, logger="latentpacs.archive.db"):
            with pytest.raises(ConstraintViolationError) as caught:
                archive.store(clash)
        assert caught.value.status == Status.CANNOT_UNDERSTAND != Status.OUT_OF_RESOURCES
        assert "sop_instance_uid" in caught.value.error_comment
        assert len(caught.value.error_comment) <= 64
        assert isinstance(caught.value, ArchiveError)
        retries = [r for r in caplog.records if "retrying" in r.getMessage()]
        assert len(retries) == 1
        stats = archive.stats()
        assert stats.instances == 1  # nothing of the clash was committed
        assert retrieved(archive, first.sop_instance_uid) == [first]


@pytest.mark.parametrize("archive_url", ["postgresql"], indirect=True)
def test_on_postgresql_a_blob_clean_up_waits_for_the_store_holding_the_blob(
        archive_url: str, tmp_path: Path) -> None:
    """The advisory lock: a deletion that starts while a store holds the blob waits for its
    commit, then sees the new row and keeps the file (the SQLite write lock does this for
    SQLite by construction)."""
    blobs = tmp_path / "blobs"
    shared = os.urandom(BIG)
    digest = hashlib.sha256(shared).hexdigest()
    second = archived(phantom(*JANE, 2), stream=shared)
    server = archive_url.replace("postgresql+psycopg://", "postgresql://")
    with _open(archive_url, blobs) as a, _open(archive_url, blobs) as b, \
            psycopg.connect(server, autocommit=True) as observer:
        assert a._place_stream(shared)[1] == digest  # on disk, named by no row yet
        with b._session(write=True) as session:
            b._lock_blob(session, digest, exclusive=False)
            assert b._blobs is not None and b._blobs.present(digest, len(shared))
            deleter = threading.Thread(target=a._drop_blob_if_unused, args=(digest,))
            deleter.start()
            deadline = time.monotonic() + 60
            while not observer.execute("SELECT count(*) FROM pg_locks WHERE locktype = "
                                       "'advisory' AND NOT granted").fetchone()[0]:
                if not deleter.is_alive() or time.monotonic() > deadline:
                    pytest.fail("the clean-up did not wait for the blob's lock")
                time.sleep(0.02)
            add_instance(session, second, None, digest, digest)
        deleter.join(timeout=60)
        assert not deleter.is_alive()
        assert (blobs / digest).read_bytes() == shared
        assert [found.stream for found in retrieved(b, second.sop_instance_uid)] == [shared]


def test_a_refused_or_kept_re_send_leaves_no_orphan_blob(archive_url: str, tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    image = archived(phantom(*JANE, 1), stream=os.urandom(BIG))
    kept = hashlib.sha256(image.stream).hexdigest()
    with _open(archive_url, blobs) as archive:
        archive.store(image)
        for policy in (DuplicatePolicy.KEEP, DuplicatePolicy.REJECT):
            other_pixels = dataclasses.replace(image, stream=os.urandom(BIG))
            try:
                assert archive.store(other_pixels, duplicates=policy) is StoreResult.KEPT_EXISTING
            except DuplicateInstanceError:
                assert policy is DuplicatePolicy.REJECT
            assert [p.name for p in blobs.iterdir()] == [kept]
        assert archive.store(image) is StoreResult.KEPT_EXISTING  # same content: still there
        assert [found.stream for found in retrieved(archive, image.sop_instance_uid)] == [image.stream]
