"""Durability proven from the node's system calls: no C-STORE Success before fsync and commit.

PS3.4 B.2.3 lets an SCP answer Success only once it has taken responsibility for the
instance. The node (``latentpacs serve``, ``lossless`` tier) runs under ``strace -f``
while DCMTK's ``storescu`` sends full-size phantom mammograms (2294 x 1914). Each is
archived as received (deferred coding, with the background coder off here), so its
stream, the object as received, is far above the 64 KiB inline limit and is a blob. The trace (wall-clock
``-ttt`` times plus ``-T`` durations, fds resolved to paths and sockets with ``-yy``) is
then read back: for every C-STORE-RSP the node wrote to the peer's socket (a P-DATA-TF
PDU, PS3.8 9.3.5, whose command set has CommandField 0x8001, PS3.7 9.3.1.2, naming the
Affected SOP Instance UID), these must all have *finished before the response write
began*:

- the blob of that image: its ``.incoming-*`` file fsynced, renamed to its SHA-256 name,
  and the blob directory fsynced after the rename;
- the database commit of the row naming that blob. SQLite (WAL, synchronous=FULL): the
  first write of the WAL frames holding the blob's name, then a sync of ``archive.db-wal``.
  PostgreSQL (``fsync`` and ``synchronous_commit`` on, checked with SHOW): the node's
  ``COMMIT`` on the connection that sent the row, then an fdatasync/fsync of a ``pg_wal``
  segment by a server process, traced by a second ``strace -f`` on a dedicated server
  (the session's server runs with fsync off, for speed).

An implementation that answered before its commit (or without syncing) fails this test
whatever the timing: the image's commit starts only after the response, so no sync can
sit between the two.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from conftest import START_TIMEOUT_S, _admin, postgres_cluster
from sqlalchemy import create_engine, text

from dicomtools import require
from latentpacs import phantom
from latentpacs.archive.blobs import BLOB_NAME, INLINE_LIMIT, TEMP_NAME
from latentpacs.errors import Status
from netpeers import NodeProcess, dimse_responses, start_node, storescu
from test_node import write_config

COUNT = 3
SIZE = (2294, 1914)  # a vendor detector matrix (phantom.VENDOR_SIZES[0])
SYSCALLS = "fsync,fdatasync,write,pwrite64,sendto,sendmsg,rename,renameat,renameat2,openat"
#: Enough to hold a whole SQLite page (4096 bytes) of a WAL write, and a C-STORE-RSP.
STRING_BYTES = 8192
C_STORE_RSP = 0x8001


@dataclass(frozen=True)
class Call:
    """One traced system call: thread, entry and exit times (s), name, fd target, strings."""

    tid: int
    start: float
    end: float
    name: str
    target: str  # the first argument's path or socket, as strace -yy resolves it
    strings: tuple[bytes, ...]
    result: str


_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_COMPLETE = re.compile(r"^(\w+)\((.*)\) += (.*?)(?: <(\d+\.\d+)>)?$")
_TARGET = re.compile(r"^-?\w+<((?:[A-Z0-9-]+:\[[^\]]*\])|[^>]*)>")
_STRING = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
_HEX = re.compile(r"\\x([0-9a-f]{2})")


def _unhex(escaped: str) -> bytes:
    return bytes(int(pair, 16) for pair in _HEX.findall(escaped))


def _target(arguments: str) -> str:
    match = _TARGET.match(arguments)
    if match is None:
        return ""
    value = match[1]
    return value if re.match(r"[A-Z0-9-]+:\[", value) else _unhex(value).decode(errors="replace")


def parse_trace(path: Path) -> list[Call]:
    """The calls of an ``strace -f -ttt -T -yy -xx`` log, with split lines joined."""
    calls: list[Call] = []
    pending: dict[int, tuple[float, str, str]] = {}
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        tid, stamp, rest = int(match[1]), float(match[2]), match[3]
        if (unfinished := _UNFINISHED.match(rest)) is not None:
            pending[tid] = (stamp, unfinished[1], unfinished[2])
            continue
        if (resumed := _RESUMED.match(rest)) is not None:
            if tid not in pending:
                continue
            stamp, name, head = pending.pop(tid)
            rest = f"{name}({head}{resumed[2]}"
        if (complete := _COMPLETE.match(rest)) is None:
            continue
        duration = float(complete[4]) if complete[4] else 0.0
        arguments = complete[2]
        calls.append(Call(tid=tid, start=stamp, end=stamp + duration, name=complete[1],
                          target=_target(arguments),
                          strings=tuple(_unhex(s) for s in _STRING.findall(arguments)),
                          result=complete[3]))
    return calls


def _command_sets(data: bytes) -> Iterator[dict[tuple[int, int], bytes]]:
    """Command sets in a stream of PDUs (PS3.8 9.3.5 P-DATA-TF, PS3.7 6.3 implicit VR LE)."""
    position = 0
    while position + 6 <= len(data):
        kind, length = data[position], int.from_bytes(data[position + 2 : position + 6], "big")
        body = data[position + 6 : position + 6 + length]
        position += 6 + length
        if kind != 0x04:
            continue
        command, item = b"", 0
        while item + 6 <= len(body):
            item_length = int.from_bytes(body[item : item + 4], "big")
            if body[item + 5] & 0x01:  # message control header: command fragment
                command += body[item + 6 : item + 4 + item_length]
            item += 4 + item_length
        elements, offset = {}, 0
        while offset + 8 <= len(command):
            group = int.from_bytes(command[offset : offset + 2], "little")
            element = int.from_bytes(command[offset + 2 : offset + 4], "little")
            size = int.from_bytes(command[offset + 4 : offset + 8], "little")
            elements[(group, element)] = command[offset + 8 : offset + 8 + size]
            offset += 8 + size
        if elements:
            yield elements


@dataclass(frozen=True)
class StoreResponse:
    sop_instance_uid: str
    status: int
    call: Call


def store_responses(calls: list[Call], node_port: int) -> list[StoreResponse]:
    """Every C-STORE-RSP the node wrote to a peer's socket on its listening port."""
    found = []
    for call in calls:
        if call.name not in ("sendto", "write", "sendmsg") or not call.strings:
            continue
        if not call.target.startswith(("TCP:[", "TCPv6:[")) or f":{node_port}->" not in call.target:
            continue
        for elements in _command_sets(call.strings[0]):
            if int.from_bytes(elements.get((0x0000, 0x0100), b""), "little") == C_STORE_RSP:
                uid = elements.get((0x0000, 0x1000), b"").rstrip(b"\0 ").decode()
                status = int.from_bytes(elements.get((0x0000, 0x0900), b"\xff\xff"), "little")
                found.append(StoreResponse(uid, status, call))
    return found


def blob_durable_at(calls: list[Call], blob_dir: Path, digest: str) -> float | None:
    """When the blob ``digest`` was last made durable: content fsynced, renamed into place,
    directory fsynced after the rename (the exit time of that directory fsync)."""
    synced_temp = {Path(c.target).name: c.end for c in calls
                   if c.name == "fsync" and Path(c.target).parent == blob_dir
                   and TEMP_NAME.fullmatch(Path(c.target).name)}
    placed = [c.end for c in calls if c.name.startswith("rename") and len(c.strings) == 2
              and Path(c.strings[1].decode()) == blob_dir / digest
              and Path(c.strings[0].decode()).name in synced_temp
              and synced_temp[Path(c.strings[0].decode()).name] <= c.start]
    placed += [c.end for c in calls if c.name == "fsync" and Path(c.target) == blob_dir / digest]
    if not placed:
        return None
    after = min(placed)
    directory = [c.end for c in calls if c.name == "fsync" and Path(c.target) == blob_dir
                 and c.start >= after]
    return min(directory) if directory else None


def sqlite_commit_synced_at(calls: list[Call], digest: str) -> float | None:
    """Exit time of the first sync of archive.db-wal after the WAL write naming ``digest``."""
    writes = [c for c in calls if c.name == "pwrite64" and c.target.endswith("archive.db-wal")
              and c.strings and digest.encode() in c.strings[0]]
    if not writes:
        return None
    first = min(writes, key=lambda c: c.start)
    syncs = [c.end for c in calls if c.name in ("fsync", "fdatasync")
             and c.target.endswith("archive.db-wal") and c.start >= first.end]
    return min(syncs) if syncs else None


def postgres_commit_synced_at(node_calls: list[Call], server_calls: list[Call], pg_port: int,
                              digest: str) -> float | None:
    """Exit time of the first pg_wal sync by the server after the node's COMMIT of the row
    naming ``digest`` (sent on the same connection)."""
    to_server = [c for c in node_calls if c.name in ("sendto", "write") and c.strings
                 and c.target.startswith("TCP:[") and f"->127.0.0.1:{pg_port}]" in c.target]
    rows = [c for c in to_server if digest.encode() in c.strings[0]]
    if not rows:
        return None
    row = min(rows, key=lambda c: c.start)
    commits = [c for c in to_server if c.target == row.target and c.start >= row.end
               and b"COMMIT" in c.strings[0]]
    if not commits:
        return None
    commit = min(commits, key=lambda c: c.start)
    syncs = [c.end for c in server_calls if c.name in ("fsync", "fdatasync")
             and "/pg_wal/" in c.target and c.start >= commit.start]
    return min(syncs) if syncs else None


def _strace(output: Path, *target: str) -> list[str]:
    return [require("strace"), "-f", "-ttt", "-T", "-yy", "-xx", "-s", str(STRING_BYTES),
            "-e", f"trace={SYSCALLS}", "-o", str(output), *target]


@dataclass(frozen=True)
class TracedPostgres:
    port: int
    trace: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture
def traced_postgres() -> Iterator[TracedPostgres]:
    """A PostgreSQL 15 server with fsync and synchronous_commit on, running under strace -f."""
    trace = Path(tempfile.mkdtemp(prefix="latentpacs-pgtrace-")) / "server.trace"
    try:
        with postgres_cluster("latentpacs-pgtrace-", ("fsync=on", "synchronous_commit=on"),
                              wrap=lambda argv: _strace(trace, *argv)) as cluster:
            yield TracedPostgres(port=cluster.port, trace=trace, proc=cluster.proc)
    finally:
        shutil.rmtree(trace.parent, ignore_errors=True)


def _attach(node: NodeProcess, trace: Path, log: Path) -> subprocess.Popen[bytes]:
    """``strace -f -p`` on every thread of the running node; returns once all are attached."""
    with log.open("wb") as handle:
        tracer = subprocess.Popen(_strace(trace, "-p", str(node.proc.pid)), stdout=handle,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    # strace reports "Process PID attached with N threads" once it holds them all.
    while f"Process {node.proc.pid} attached" not in log.read_text():
        if tracer.poll() is not None or time.monotonic() > deadline:
            tracer.kill()
            pytest.fail(f"strace could not attach to the node: {log.read_text()}")
        time.sleep(0.05)
    return tracer


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(tmp_path_factory.mktemp("full-size"), COUNT, seed=41, size=SIZE,
                            images_per_study=COUNT)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_no_store_response_before_the_blob_fsync_and_the_commit(
        database: str, full_size: list[Path], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    server: TracedPostgres | None = None
    if database == "postgresql":
        server = request.getfixturevalue("traced_postgres")
        with _admin(server.port) as admin:
            assert admin.execute("SHOW fsync").fetchone() == ("on",)
            assert admin.execute("SHOW synchronous_commit").fetchone() == ("on",)
            admin.execute("CREATE DATABASE trace")
        url = f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/trace"
    else:
        url = f"sqlite:///{tmp_path / 'data' / 'archive.db'}"
    # The images are acknowledged as received (deferred coding); the background coder is
    # off, so the rows still name the blobs that had to be durable before each answer.
    config = write_config(tmp_path, url, codec={"tier": "lossless", "deferred_background": False})
    blob_dir = (tmp_path / "data" / "blobs").resolve()
    trace = tmp_path / "node.trace"
    with start_node(config) as node:
        tracer = _attach(node, trace, tmp_path / "strace.log")
        try:
            sent = storescu(node.port, node.aet, full_size)
        finally:
            tracer.terminate()  # detaches; the node keeps running
            tracer.wait(timeout=30)
        assert [r.status for r in dimse_responses(sent)] == [Status.SUCCESS] * COUNT
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            blob_of = dict(connection.execute(text(
                "SELECT i.original_sop_instance_uid, l.stream_path FROM instances i "
                "JOIN latents l ON l.instance_fk = i.id")).all())
    finally:
        engine.dispose()
    uids = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in full_size}
    assert set(blob_of) == uids
    assert all(blob is not None and BLOB_NAME.fullmatch(blob) for blob in blob_of.values())
    assert sorted(p.name for p in blob_dir.iterdir()) == sorted(blob_of.values())
    assert all((blob_dir / blob).stat().st_size > INLINE_LIMIT for blob in blob_of.values())

    node_calls = parse_trace(trace)
    server_calls = parse_trace(server.trace) if server is not None else []
    responses = store_responses(node_calls, node.port)
    assert sorted(r.sop_instance_uid for r in responses) == sorted(uids)
    for response in responses:
        digest = blob_of[response.sop_instance_uid]
        answered = response.call.start
        assert response.status == Status.SUCCESS
        blob = blob_durable_at(node_calls, blob_dir, digest)
        assert blob is not None, f"no fsync + rename + directory fsync of blob {digest}"
        assert blob <= answered, f"C-STORE-RSP {blob - answered:.6f} s before the blob was durable"
        if server is None:
            commit = sqlite_commit_synced_at(node_calls, digest)
        else:
            commit = postgres_commit_synced_at(node_calls, server_calls, server.port, digest)
        assert commit is not None, f"no synced commit of the row naming blob {digest}"
        assert commit <= answered, f"C-STORE-RSP {commit - answered:.6f} s before the commit"
