"""Faults a node survives (issue 12, part 3), each made on a deterministic trigger.

Every test drives a real ``latentpacs serve`` node with DCMTK's ``storescu`` and ``getscu``
(:mod:`netpeers`) and breaks a real part under it:

- PostgreSQL restarted mid-ingest, on a throw-away cluster of the test's own
  (:func:`conftest.postgres_cluster`): the in-flight C-STORE is held inside its
  transaction by a conflicting uncommitted row of the test's, the server is stopped and
  started on the same port while it waits. The peer sees A700 with an ErrorComment
  (PS3.4 B.2.3: Refused, Out of Resources), never a hang or C000/0110; every Success it
  saw is archived; the node reconnects by itself (``pool_pre_ping``, broken connections
  invalidated) and a second ``storescu`` stores everything. A row whose background coding
  (deferred coding) the restart broke is coded later by the same node. A server that
  never answers is an error after the connect timeout, not a hang.
- The data directory full: ``archive.data_dir`` on a 16 MiB tmpfs, filled by a filler
  file until the next stream blob cannot be written. C-STOREs are answered A700 with an
  ErrorComment naming the disk, no temporary file or partial blob is left, no row lacks
  its blob (``latentpacs archive verify`` exits 0), and once the filler is deleted the
  same node stores again. With deferred coding on as well (the object as received is
  the blob).
- A corrupt stream blob on disk: the C-GET of its study fails that one sub-operation
  (B000, PS3.4 C.4.3.1.4, with the failed count and an ErrorComment) and sends the
  others; ``latentpacs archive verify`` names the instance and exits 1.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pydicom
import pytest
from conftest import PG_BIN, PG_USER, PostgresCluster, _admin, _as_postgres, postgres_cluster

from dicomtools import require
from latentpacs import phantom
from latentpacs.archive import Archive
from latentpacs.archive.database import PG_CONNECT_TIMEOUT_S
from latentpacs.archive.blobs import BLOB_NAME, TEMP_PREFIX
from latentpacs.codec.tiers import RECEIVED
from latentpacs.errors import ArchiveError, Status
from netpeers import DimseResponse, dimse_responses, getscu, start_node, storescu
from test_node import write_config

#: Big enough that every stream (JPEG-LS, lossless) is a blob, not inline (64 KiB).
BLOB_SIZE = (1024, 832)
#: Small images for the PostgreSQL test: what matters there is the transaction, not the pixels.
SMALL_SIZE = (256, 208)
TMPFS_SIZE = "16m"
POLL_TIMEOUT_S = 60.0
PG_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
LOSSLESS_NOW = {"tier": "lossless", "deferred": False}


def _poll(condition: str, check: Callable[[], bool], timeout: float = POLL_TIMEOUT_S) -> None:
    """Wait until ``check()`` is true; fail naming ``condition`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{condition} did not happen within {timeout:.0f} s")
        time.sleep(0.05)


def _verify(config: Path) -> subprocess.CompletedProcess[str]:
    latentpacs = Path(sys.executable).parent / "latentpacs"
    return subprocess.run([str(latentpacs), "--config", str(config), "archive", "verify"],
                          capture_output=True, text=True, timeout=300)


def _statuses(responses: list[DimseResponse]) -> list[int]:
    return [response.status for response in responses]


def _uids(paths: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths]


# --- PostgreSQL restarted mid-ingest -------------------------------------------------------


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Nine small phantoms: three patients of one three-image study each, in that order."""
    return phantom.generate(tmp_path_factory.mktemp("faults-small"), 9, 31, size=SMALL_SIZE,
                            images_per_study=3, studies_per_patient=1)


def _pg_ctl(cluster: PostgresCluster, *args: str) -> None:
    """Run ``pg_ctl`` on the test's own cluster as user postgres; fail with its output."""
    done = subprocess.run(_as_postgres(PG_BIN / "pg_ctl", "-D", cluster.root / "data", "-w",
                                       "-t", "60", *args),
                          capture_output=True, text=True, timeout=90)
    if done.returncode != 0:
        pytest.fail(f"pg_ctl {' '.join(args)} failed: {done.stdout}{done.stderr}")


def _restart(cluster: PostgresCluster) -> None:
    """Stop the server (fast shutdown: every session is terminated) and start it again on
    the same port, unix socket directory and settings."""
    _pg_ctl(cluster, "stop", "-m", "fast")
    options = " ".join([f"-h 127.0.0.1 -p {cluster.port} -k {cluster.root}",
                        *(f"-c {setting}" for setting in PG_SETTINGS)])
    _pg_ctl(cluster, "start", "-l", str(cluster.root / "restarted.log"), "-o", options)


def _count(port: int) -> int:
    with psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="latentpacs",
                         connect_timeout=5) as connection:
        row = connection.execute("SELECT count(*) FROM instances").fetchone()
    return int(row[0]) if row else 0


def _archived_uids(port: int) -> set[str]:
    with psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="latentpacs",
                         connect_timeout=5) as connection:
        return {str(uid) for (uid,) in connection.execute(
            "SELECT original_sop_instance_uid FROM instances")}


def _waiting_on_a_lock(port: int) -> bool:
    """Whether a node session waits for a lock that the test's transaction holds."""
    with _admin(port) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'latentpacs' "
            "AND wait_event_type = 'Lock'").fetchone()
    return bool(row and row[0])


def test_postgresql_restarted_mid_ingest(small_images: list[Path], tmp_path: Path) -> None:
    """The in-flight store fails with A700, nothing acknowledged is lost, the node reconnects."""
    first_patient = pydicom.dcmread(small_images[0], stop_before_pixels=True).PatientID
    held = pydicom.dcmread(small_images[3], stop_before_pixels=True)
    assert held.PatientID != first_patient  # images 4..6 are the second patient's
    with postgres_cluster("latentpacs-faults-pg-", PG_SETTINGS) as cluster:
        with _admin(cluster.port) as admin:
            admin.execute("CREATE DATABASE latentpacs")
        url = f"postgresql+psycopg://{PG_USER}@127.0.0.1:{cluster.port}/latentpacs"
        config = write_config(tmp_path, url, codec=LOSSLESS_NOW)
        with start_node(config) as node:
            # The gate: the second patient's row, inserted and not committed. The node's
            # insert of that patient (the fourth image) waits for this transaction.
            gate = psycopg.connect(host="127.0.0.1", port=cluster.port, user=PG_USER,
                                   dbname="latentpacs")
            try:
                gate.execute(
                    "INSERT INTO patients (patient_id, issuer_of_patient_id, patient_name, "
                    "patient_name_folded, patient_birth_date, patient_sex) "
                    "VALUES (%s, %s, '', '', '', '')",
                    (str(held.PatientID), str(held.get("IssuerOfPatientID", ""))))
                # Its -d log goes to a file: a pipe nobody reads while we poll could fill.
                sender_log = tmp_path / "storescu.log"
                with sender_log.open("w") as log:
                    sender = subprocess.Popen(
                        [str(require("storescu")), "-d", "-nh", "-to", "10", "-aet", "STORESCU",
                         "-aec", node.aet, "127.0.0.1", str(node.port), *map(str, small_images)],
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                try:
                    _poll("three images archived, the fourth waiting inside its transaction",
                          lambda: _count(cluster.port) == 3 and _waiting_on_a_lock(cluster.port))
                    _restart(cluster)  # terminates the gate and the waiting store alike
                    try:
                        sender.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        pytest.fail("storescu still waits 120 s after the restart: a hang")
                finally:
                    if sender.poll() is None:
                        sender.kill()
                        sender.wait()
                output = sender_log.read_text(errors="replace")
            finally:
                gate.close()
            sent = dimse_responses(subprocess.CompletedProcess(sender.args, 0, output, ""))
            statuses = _statuses(sent)
            assert len(statuses) == len(small_images), output[-3000:]
            assert statuses[:3] == [Status.SUCCESS] * 3
            assert statuses[3] == Status.OUT_OF_RESOURCES, output[-3000:]
            assert set(statuses) <= {Status.SUCCESS, Status.OUT_OF_RESOURCES}
            for response in sent:
                if response.status != Status.SUCCESS:
                    assert response.error_comment, response
                    assert response.error_comment.startswith("archive database unavailable")
            # Nothing acknowledged is lost.
            acknowledged = {uid for uid, status in zip(_uids(small_images), statuses,
                                                       strict=True) if status == Status.SUCCESS}
            assert acknowledged <= _archived_uids(cluster.port)
            # The same node, not restarted, stores everything now.
            again = dimse_responses(storescu(node.port, node.aet, small_images))
            assert _statuses(again) == [Status.SUCCESS] * len(small_images)
            assert node.proc.poll() is None
        assert _archived_uids(cluster.port) == set(_uids(small_images))


def _received_rows(port: int) -> list[int]:
    with psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="latentpacs",
                         connect_timeout=5) as connection:
        return [int(row_id) for (row_id,) in connection.execute(
            "SELECT instance_fk FROM latents WHERE stream_coder = %s ORDER BY instance_fk",
            (RECEIVED,))]


def test_deferred_coding_resumes_after_a_postgresql_restart(small_images: list[Path],
                                                            tmp_path: Path) -> None:
    """A row whose background coding met the restart is coded later by the same node."""
    with postgres_cluster("latentpacs-faults-pg-", PG_SETTINGS) as cluster:
        with _admin(cluster.port) as admin:
            admin.execute("CREATE DATABASE latentpacs")
        url = f"postgresql+psycopg://{PG_USER}@127.0.0.1:{cluster.port}/latentpacs"
        deferred = {"tier": "lossless", "deferred": True}
        # First archived as received and left so (no background coder) ...
        config = write_config(tmp_path, url, codec={**deferred, "deferred_background": False})
        with start_node(config) as node:
            assert _statuses(dimse_responses(storescu(node.port, node.aet, small_images[:3]))) \
                == [Status.SUCCESS] * 3
        pending = _received_rows(cluster.port)
        assert len(pending) == 3
        # ... then a node with its background coder, whose first swap waits on a row lock.
        gate = psycopg.connect(host="127.0.0.1", port=cluster.port, user=PG_USER,
                               dbname="latentpacs")
        try:
            gate.execute("SELECT 1 FROM latents WHERE instance_fk = %s FOR UPDATE",
                         (pending[0],))
            config = write_config(tmp_path, url, codec={**deferred, "deferred_background": True})
            with start_node(config) as node:
                _poll("the background coder waiting on the locked row",
                      lambda: _waiting_on_a_lock(cluster.port))
                _restart(cluster)  # its transaction is terminated: kept as received
                _poll("the node log naming the failed coding",
                      lambda: "to be tried again" in node.log.read_text())
                # A store after the restart: the archive is back, the row is coded again.
                assert _statuses(dimse_responses(storescu(node.port, node.aet,
                                                          small_images[3:4]))) == [Status.SUCCESS]
                _poll("every row coded", lambda: _received_rows(cluster.port) == [])
                assert node.proc.poll() is None
        finally:
            gate.close()


def test_an_unanswering_database_server_is_an_error_not_a_hang() -> None:
    """A server that takes the TCP connection and never answers (hung, or behind a broken
    network path): opening the archive fails with ArchiveError (A700) after the connect
    timeout instead of waiting for ever, as libpq does by default."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # the kernel completes the handshake; nobody ever reads or answers
    outcome: list[BaseException | None] = []

    def open_archive() -> None:
        try:
            Archive(f"postgresql+psycopg://{PG_USER}@127.0.0.1:{silent.getsockname()[1]}/x")
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread below
            outcome.append(exc)

    try:
        worker = threading.Thread(target=open_archive, daemon=True)
        worker.start()
        worker.join(PG_CONNECT_TIMEOUT_S * 4)
    finally:
        silent.close()
    if not outcome:
        pytest.fail(f"opening an archive on a silent server still waits after "
                    f"{PG_CONNECT_TIMEOUT_S * 4} s")
    error = outcome[0]
    assert isinstance(error, ArchiveError), error
    assert error.status == Status.OUT_OF_RESOURCES
    assert "timeout" in error.message


# --- The data directory full ----------------------------------------------------------------


@pytest.fixture(scope="module")
def blob_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six phantoms of one study, big enough that every stream is a blob file."""
    return phantom.generate(tmp_path_factory.mktemp("faults-blob"), 6, 32, size=BLOB_SIZE,
                            images_per_study=6, studies_per_patient=1)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted for the test (the tests run as root), unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.fail("the data-disk-full test mounts a tmpfs and needs root (id -u is not 0)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs",
                              str(mount_point)], capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the data-disk-full test: {mounted.stderr}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def _fill(disk: Path, leave: int) -> Path:
    """Write a filler file so that only about ``leave`` bytes stay free on ``disk``."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    filler = disk / "filler"
    with filler.open("wb") as stream:
        stream.write(b"\0" * max(free - leave, 0))
    return filler


def _blob_dir_is_clean(blobs: Path) -> list[str]:
    """Every file in the blob directory is a complete blob named by its content's SHA-256."""
    names = sorted(path.name for path in blobs.iterdir())
    assert not [name for name in names if name.startswith(TEMP_PREFIX) or name.endswith(".tmp")]
    for name in names:
        assert BLOB_NAME.fullmatch(name), name
        assert hashlib.sha256((blobs / name).read_bytes()).hexdigest() == name
    return names


@pytest.mark.parametrize(("deferred", "database_on_disk"),
                         [(False, False), (True, False), (False, True)],
                         ids=["coded", "deferred", "database-on-the-full-disk"])
def test_data_disk_full(blob_images: list[Path], small_disk: Path, tmp_path: Path,
                        deferred: bool, database_on_disk: bool) -> None:
    """A700 naming the disk while it is full, nothing half-written, storing again after.

    The SQLite file lives elsewhere (only the blobs fill the disk) or, as by default, in
    ``archive.data_dir`` on the full disk itself.
    """
    database = (small_disk if database_on_disk else tmp_path) / "archive.db"
    config = write_config(tmp_path, "" if database_on_disk else f"sqlite:///{database}",
                          archive={"data_dir": str(small_disk)},
                          codec={"tier": "lossless", "deferred": deferred,
                                 "deferred_background": False})
    with start_node(config) as node:
        stored = dimse_responses(storescu(node.port, node.aet, blob_images[:2]))
        assert _statuses(stored) == [Status.SUCCESS] * 2
        blobs = small_disk / "blobs"
        assert len(_blob_dir_is_clean(blobs)) == 2
        # Less room than any blob needs: the next write runs out of space part way.
        filler = _fill(small_disk, 48 * 1024)
        refused = dimse_responses(storescu(node.port, node.aet, blob_images[2:4], extra=["-nh"]))
        assert _statuses(refused) == [Status.OUT_OF_RESOURCES] * 2
        for response in refused:
            assert response.error_comment and "disk full" in response.error_comment
        assert len(_blob_dir_is_clean(blobs)) == 2  # no partial blob, no temporary file
        # Reading needs no space: the archived images are still retrieved.
        study = str(pydicom.dcmread(blob_images[0], stop_before_pixels=True).StudyInstanceUID)
        got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study}, tmp_path / "get")
        assert got.final.status == Status.SUCCESS and len(got.files) == 2
        with sqlite3.connect(database) as connection:
            rows = connection.execute("SELECT count(*) FROM instances").fetchone()[0]
        connection.close()
        assert rows == 2
        checked = _verify(config)
        assert checked.returncode == 0, checked.stderr
        assert "verified 2 of 2" in checked.stdout
        filler.unlink()  # space returns; the same node stores again
        again = dimse_responses(storescu(node.port, node.aet, blob_images[2:]))
        assert _statuses(again) == [Status.SUCCESS] * 4
        assert node.proc.poll() is None
    assert len(_blob_dir_is_clean(blobs)) == 6


# --- A corrupt stream on disk ---------------------------------------------------------------


def test_corrupt_blob_fails_one_sub_operation(blob_images: list[Path], tmp_path: Path) -> None:
    """C-GET sends every other image and fails the corrupt one; verify names it and exits 1."""
    database = tmp_path / "archive.db"
    config = write_config(tmp_path, f"sqlite:///{database}", codec=LOSSLESS_NOW)
    images = blob_images[:3]
    with start_node(config) as node:
        assert _statuses(dimse_responses(storescu(node.port, node.aet, images))) == [
            Status.SUCCESS] * 3
        victim = _uids(images)[1]
        with sqlite3.connect(database) as connection:
            (blob,) = connection.execute(
                "SELECT l.stream_path FROM latents l JOIN instances i ON l.instance_fk = i.id "
                "WHERE i.original_sop_instance_uid = ?", (victim,)).fetchone()
        connection.close()
        path = tmp_path / "data" / "blobs" / blob
        size = path.stat().st_size
        with path.open("r+b") as stream:  # same size, other bytes: only the hash can tell
            stream.seek(size // 2)
            original = stream.read(64)
            stream.seek(size // 2)
            stream.write(bytes(255 - byte for byte in original))
        assert path.stat().st_size == size
        study = str(pydicom.dcmread(images[0], stop_before_pixels=True).StudyInstanceUID)
        got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study}, tmp_path / "get")
    assert got.final.status == Status.SUB_OPERATIONS_WARNING
    assert (got.final.completed, got.final.failed) == (2, 1)
    assert sorted(_uids(got.files)) == sorted(uid for uid in _uids(images) if uid != victim)
    comments = [r.error_comment or "" for r in dimse_responses(got.proc)]
    assert any("SHA-256" in comment for comment in comments), comments
    checked = _verify(config)
    assert checked.returncode == 1
    assert victim in checked.stderr and "SHA-256" in checked.stderr
    assert "verified 2 of 3" in checked.stdout
