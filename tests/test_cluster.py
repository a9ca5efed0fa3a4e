"""Stateless nodes behind HAProxy: three node processes, one PostgreSQL, one object store.

Three ``latentpacs serve`` processes (each its own work folder) share a fresh PostgreSQL
archive and one S3 bucket (``archive.blobs = "s3://..."`` on a ``moto_server`` started by
the test, ``tests/s3peers.py``), behind HAProxy in TCP mode started from
``deploy/haproxy.cfg`` (``tests/haproxy.py``): the multi-node recipe of
``deploy/README.md``. The lossless tier with 1024 x 832 images puts every stream in the
bucket (above the 64 KiB inline limit). Through the proxy:

- four parallel ``storescu`` store everything once (PS3.4 B.2.3), and C-FIND (PS3.4
  C.4.1) lists each instance exactly once; C-GET (PS3.4 C.4.3) returns, byte for byte,
  images stored directly at each of the three nodes, whichever node serves the C-GET;
- every peer arrives from the proxy's loopback address, so ``security.trust_loopback``
  is off: an AE title that is not in ``security.allowed_calling_aets`` may still store
  but is refused C-FIND and C-GET with 0124H and an ErrorComment (PS3.7 C.5.25);
- a node is SIGKILLed while four senders are storing through the proxy (the trigger: the
  archive has grown by a few rows and HAProxy shows that node with an association open):
  every C-STORE a sender saw Success for is in the archive, the ones that did not get
  Success are sent again by a new ``storescu`` (the retry), which HAProxy hands to the
  remaining nodes, and in the end every image is archived exactly once.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import create_engine, text

from dicomtools import require
from haproxy import Proxy, start_haproxy, start_node_behind_proxy
from latentpacs import phantom
from latentpacs.archive.blobs import BLOB_NAME
from latentpacs.errors import Status
from s3peers import ACCESS_KEY_ID, BUCKET, REGION, SECRET_ACCESS_KEY, S3Server, start_moto
from netpeers import (HOST, SCU_TIMEOUT_S, NodeProcess, dimse_responses, echoscu, findscu,
                      getscu, start_node, storescu)
from test_node import write_config

SIZE = (1024, 832)
SENDERS = 4
AET = "LATENTPACS"
#: Calling AE titles the nodes list (security.allowed_calling_aets); any other may only echo and store.
LISTED = ["STORESCU", "FINDSCU", "GETSCU"]
UNLISTED = "INTRUDER"
#: The node is killed once the archive holds this many more rows than before the senders started.
KILL_AFTER_ROWS = 4
_AFFECTED_UID = re.compile(r"^D: Affected SOP Instance UID\s+: (\S+)$")
_STATUS = re.compile(r"^D: DIMSE Status\s+: 0x([0-9A-Fa-f]{4})")


def _make(root: Path, count: int, seed: int) -> list[Path]:
    return phantom.generate(root, count, seed=seed, size=SIZE, images_per_study=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Phantoms for each phase, distinct instances throughout (patients overlap nowhere)."""
    root = tmp_path_factory.mktemp("cluster-phantoms")
    return {"first": _make(root / "first", 12, 31), "direct": _make(root / "direct", 3, 32),
            "unlisted": _make(root / "unlisted", 1, 33), "killed": _make(root / "killed", 24, 34)}


PREFIX = "cluster/streams"


@pytest.fixture
def bucket(tmp_path: Path) -> Iterator[S3Server]:
    """A real S3 API server on loopback (moto_server, its own process) with the bucket."""
    with start_moto(tmp_path) as server:
        yield server


@pytest.fixture
def cluster(archive_url: str, bucket: S3Server,
            tmp_path: Path) -> Iterator[tuple[list[NodeProcess], Proxy]]:
    """Three nodes on one fresh PostgreSQL database and one S3 bucket, behind HAProxy."""
    shared = {"blobs": f"s3://{BUCKET}/{PREFIX}", "s3_endpoint": bucket.endpoint,
              "s3_region": REGION, "s3_access_key_id": ACCESS_KEY_ID,
              "s3_secret_access_key": SECRET_ACCESS_KEY}
    configs = []
    for name in ("node1", "node2", "node3"):
        (tmp_path / name).mkdir()
        configs.append(write_config(
            tmp_path / name, archive_url, archive=shared,
            codec={"tier": "lossless", "deferred_background": False},
            security={"trust_loopback": False, "allowed_calling_aets": LISTED,
                      "unknown_peers": ["echo", "store"]}))
    nodes: list[NodeProcess] = []
    try:
        with ThreadPoolExecutor(len(configs)) as pool:
            futures = [pool.submit(start_node, config, aet=AET) for config in configs]
            for future in futures:
                nodes.append(future.result())
        with start_haproxy(tmp_path / "proxy", [(f"node{i + 1}", node.port)
                                                for i, node in enumerate(nodes)],
                           aet=AET) as proxy:
            yield nodes, proxy
    finally:
        for node in nodes:
            node.stop()


def _sender(port: int, files: Sequence[Path]) -> subprocess.Popen[str]:
    """A ``storescu -d`` run in the background (one association for all ``files``)."""
    return subprocess.Popen([require("storescu"), "-d", "-to", "10", "-aet", "STORESCU",
                             "-aec", AET, HOST, str(port), *map(str, files)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)


def _acknowledged(output: str) -> set[str]:
    """SOP Instance UIDs of the C-STORE responses with status Success in a ``storescu -d`` log."""
    succeeded = set()
    uid = None
    for line in output.splitlines():
        if "INCOMING DIMSE MESSAGE" in line:
            uid = None
        elif (match := _AFFECTED_UID.match(line)) is not None:
            uid = match[1]
        elif (match := _STATUS.match(line)) is not None and uid is not None:
            if int(match[1], 16) == Status.SUCCESS:
                succeeded.add(uid)
    return succeeded


def _finish(senders: Sequence[subprocess.Popen[str]]) -> list[str]:
    return [sender.communicate(timeout=SCU_TIMEOUT_S)[0] for sender in senders]


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _found(port: int, calling: str = "FINDSCU") -> list[str]:
    """Every SOP Instance UID a C-FIND at IMAGE level through ``port`` answers, in order."""
    result = findscu(port, AET, "IMAGE", {"SOPInstanceUID": ""}, calling=calling)
    assert result.final.status == Status.SUCCESS, result.proc.stdout[-2000:]
    return [str(ds.SOPInstanceUID) for ds in result.datasets]


def _row_count(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM instances")).scalar_one())
    finally:
        engine.dispose()


def _streams_are_blobs(url: str) -> list[str | None]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [row[0] for row in connection.execute(text("SELECT stream_path FROM latents"))]
    finally:
        engine.dispose()


def _check_streams_in_bucket(url: str, bucket: S3Server, count: int) -> None:
    """Every instance's stream is an object in the bucket, none stayed in its row."""
    paths = _streams_are_blobs(url)
    assert len(paths) == count
    assert all(path is not None and BLOB_NAME.fullmatch(path) for path in paths), \
        "a stream stayed in the row"
    assert {f"{PREFIX}/{path}" for path in paths} <= set(bucket.keys(PREFIX + "/"))


def _split(files: Sequence[Path]) -> list[list[Path]]:
    return [list(files[index::SENDERS]) for index in range(SENDERS)]


@pytest.mark.parametrize("archive_url", ["postgresql"], indirect=True)  # a fresh database
def test_three_nodes_behind_haproxy(cluster, bucket, images, archive_url, tmp_path) -> None:
    nodes, proxy = cluster
    # Four parallel senders through the proxy: every C-STORE succeeds, each instance once.
    outputs = _finish([_sender(proxy.port, part) for part in _split(images["first"])])
    for output in outputs:
        assert [r.status for r in dimse_responses(
            subprocess.CompletedProcess([], 0, output, ""))] == [Status.SUCCESS] * 3, output[-2000:]
    assert sum(stat.total_sessions for stat in proxy.servers().values()) >= SENDERS
    # One image stored directly at each node, behind the proxy's back.
    for node, path in zip(nodes, images["direct"], strict=True):
        assert [r.status for r in dimse_responses(storescu(node.port, AET, [path]))] == [Status.SUCCESS]
    stored = images["first"] + images["direct"]
    found = _found(proxy.port)
    assert Counter(found) == Counter(_uid(path) for path in stored)
    _check_streams_in_bucket(archive_url, bucket, len(stored))

    # C-GET through the proxy: whichever node answers, it returns what each node stored.
    originals = {_uid(path): pydicom.dcmread(path) for path in stored}
    studies = "\\".join(sorted({str(ds.StudyInstanceUID) for ds in originals.values()}))
    got = getscu(proxy.port, AET, "STUDY", {"StudyInstanceUID": studies}, tmp_path / "got")
    assert got.final.status == Status.SUCCESS and got.final.completed == len(stored)
    received = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, got.files)}
    assert set(received) == set(originals)
    for uid, original in originals.items():
        assert received[uid].PixelData == original.PixelData, uid

    # Loopback trust is off behind the proxy: an unlisted AE title stores, but may not query
    # or retrieve (0124H with an ErrorComment), although it connects from 127.0.0.1.
    unlisted = storescu(proxy.port, AET, images["unlisted"], calling=UNLISTED)
    assert [r.status for r in dimse_responses(unlisted)] == [Status.SUCCESS]
    refused_find = findscu(proxy.port, AET, "IMAGE", {"SOPInstanceUID": ""}, calling=UNLISTED)
    assert refused_find.datasets == []
    assert refused_find.final.status == Status.NOT_AUTHORIZED
    assert refused_find.final.error_comment
    refused_get = getscu(proxy.port, AET, "STUDY", {"StudyInstanceUID": studies},
                         tmp_path / "refused", calling=UNLISTED)
    assert refused_get.files == []
    assert refused_get.final.status == Status.NOT_AUTHORIZED
    assert refused_get.final.error_comment
    stored += images["unlisted"]

    # SIGKILL of a node while four senders store through the proxy.
    before = _row_count(archive_url)
    senders = [_sender(proxy.port, part) for part in _split(images["killed"])]
    try:
        while True:
            busy = [name for name, stat in proxy.servers().items() if stat.current_sessions > 0]
            if _row_count(archive_url) >= before + KILL_AFTER_ROWS and busy:
                break
            if all(sender.poll() is not None for sender in senders):
                pytest.fail("the senders finished before a node could be killed mid-ingest")
            time.sleep(0.02)
        victim = nodes[int(busy[0].removeprefix("node")) - 1]
        victim.kill()
    finally:
        outputs = _finish(senders)
    acknowledged = set().union(*map(_acknowledged, outputs))
    in_archive = set(_found(proxy.port))
    assert acknowledged <= in_archive, "an acknowledged instance is missing"
    unacknowledged = [path for path in images["killed"] if _uid(path) not in acknowledged]
    assert unacknowledged, "no C-STORE failed: the node was not killed mid-association"

    # The retry: the images without Success are sent again; the remaining nodes take them.
    survivors = [f"node{index + 1}" for index, node in enumerate(nodes) if node is not victim]
    sessions_before = sum(proxy.servers()[name].total_sessions for name in survivors)
    retry = storescu(proxy.port, AET, unacknowledged)
    assert [r.status for r in dimse_responses(retry)] == [Status.SUCCESS] * len(unacknowledged), \
        retry.stdout[-2000:]
    assert victim.proc.poll() is not None
    assert sum(proxy.servers()[name].total_sessions for name in survivors) > sessions_before
    stored += images["killed"]
    found = _found(proxy.port)
    assert Counter(found) == Counter(_uid(path) for path in stored)
    assert _row_count(archive_url) == len(stored)
    _check_streams_in_bucket(archive_url, bucket, len(stored))


#: The source address HAProxy puts in the PROXY header (TEST-NET-1, RFC 5737): not loopback.
REAL_PEER = "192.0.2.10"


def test_proxy_protocol_applies_permissions_to_the_real_peer(images, tmp_path) -> None:
    """With ``node.proxy_protocol``, HAProxy's ``send-proxy-v2`` header names the peer.

    The node keeps ``security.trust_loopback`` on (the default) and the proxy connects to it
    from 127.0.0.1, yet the peer HAProxy names (``tcp-request connection set-src``, so the
    header carries a non-loopback source) is judged: an unlisted AE title may store but is
    refused C-FIND with 0124H, a listed one is served; a connection straight to the node,
    without the header, is closed before the association.
    """
    workdir = tmp_path / "node"
    workdir.mkdir()
    config = write_config(workdir, f"sqlite:///{workdir / 'archive.db'}",
                          node={"proxy_protocol": True}, codec={"tier": "lossless"},
                          security={"allowed_calling_aets": LISTED})
    node = start_node_behind_proxy(config, workdir)
    try:
        with start_haproxy(tmp_path / "proxy", [("node1", node.port)], aet=AET,
                           server_options="send-proxy-v2",
                           frontend_lines=[f"tcp-request connection set-src ipv4({REAL_PEER})"]
                           ) as proxy:
            stored = storescu(proxy.port, AET, images["unlisted"], calling=UNLISTED)
            assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS]
            refused = findscu(proxy.port, AET, "IMAGE", {"SOPInstanceUID": ""}, calling=UNLISTED)
            assert refused.final.status == Status.NOT_AUTHORIZED and refused.final.error_comment
            assert _found(proxy.port) == [_uid(images["unlisted"][0])]
            assert echoscu(node.port, AET).returncode != 0  # no PROXY header: closed
        assert f"({REAL_PEER}) refused" in node.log.read_text()  # the log names the real peer
    finally:
        node.stop()
