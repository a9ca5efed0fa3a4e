"""The stream store contract on the local directory and on a real S3 API server (moto).

The same tests run on :class:`BlobStore` and on :class:`S3BlobStore` against
``moto_server`` started on loopback as a separate process (:mod:`s3peers`), each S3 test
under its own key prefix. Then the archive on S3 (orphan sweep, a replace's clean-up),
an object store that refuses or never answers (a named A700 error, no hang), and a real
node (``archive.blobs = "s3://..."``) driven by DCMTK: stored streams are objects in the
bucket, C-GET returns the pixels byte-identical, ``archive verify`` names a corrupted
object, and with the S3 server stopped a C-STORE is answered A700 with an ErrorComment,
nothing half-stored, and stores work again once the server is back, without a restart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from archive_data import MODEL, S1, archived, phantom, retrieved

from latentpacs import phantom as phantoms
from latentpacs.archive import Archive, DuplicatePolicy, StoreResult
from latentpacs.archive.blobs import INLINE_LIMIT, BlobStore, StreamStore, open_stream_store
from latentpacs.archive.s3 import S3BlobStore
from latentpacs.config import load_config
from latentpacs.errors import (
    ArchiveError, ConfigError, ObjectStoreError, Status, StreamHashError,
)
from netpeers import HOST, SCU_TIMEOUT_S, dimse_responses, findscu, free_port, getscu, storescu
from s3peers import ACCESS_KEY_ID, BUCKET, REGION, SECRET_ACCESS_KEY, S3Server, start_moto
from test_node import write_config

BIG = 100 * 1024  # above the 64 KiB inline limit
JANE = ("P1", "Doe^Jane", "19600101", S1, "20240115", "090000", "Screening mammogram")


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with start_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server


def _s3_store(server: S3Server, prefix: str, **options: Any) -> S3BlobStore:
    return S3BlobStore(f"s3://{BUCKET}/{prefix}", endpoint=server.endpoint, region=REGION,
                       access_key_id=ACCESS_KEY_ID, secret_access_key=SECRET_ACCESS_KEY,
                       **options)


#: A store and a function that overwrites one stream's stored bytes behind its back.
Backend = tuple[StreamStore, Callable[[str, bytes], None]]


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        local = BlobStore(tmp_path / "blobs")
        return local, lambda name, data: (local.root / name).write_bytes(data)
    server: S3Server = request.getfixturevalue("moto")
    prefix = f"t-{uuid.uuid4().hex[:12]}/streams"

    def overwrite(name: str, data: bytes) -> None:
        server.client().put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=data)

    return _s3_store(server, prefix), overwrite


def test_a_stream_is_put_found_read_back_and_removed(backend: Backend) -> None:
    store, _ = backend
    data = os.urandom(BIG)
    digest = hashlib.sha256(data).hexdigest()
    assert store.put(data) == (digest, digest)
    assert store.present(digest, len(data))
    assert not store.present(digest, len(data) + 1)
    assert store.get(digest, digest) == data
    assert list(store.names()) == [digest]
    assert store.remove(digest) is True
    assert not store.present(digest, len(data))
    assert store.remove(digest) is False  # already gone: not an error
    assert list(store.names()) == []
    assert store.remove("../../etc/passwd") is False  # only blob names are ever deleted
    assert store.remove_temporaries() == 0


def test_the_same_content_twice_is_one_stream(backend: Backend) -> None:
    store, _ = backend
    data = os.urandom(BIG)
    first = store.put(data)
    assert store.put(data, first[1]) == first
    other = store.put(os.urandom(BIG))
    assert sorted(store.names()) == sorted({first[0], other[0]})


def test_a_corrupt_stream_is_detected_on_read_and_rewritten_by_the_next_put(
        backend: Backend) -> None:
    store, overwrite = backend
    data = os.urandom(BIG)
    name, digest = store.put(data)
    flipped = bytearray(data)
    flipped[BIG // 2] ^= 0xFF
    overwrite(name, bytes(flipped))  # same size, other bytes
    with pytest.raises(StreamHashError, match="does not match its SHA-256") as caught:
        store.get(name, digest)
    assert caught.value.status == Status.PROCESSING_FAILURE
    assert store.put(data) == (name, digest)  # same name, wrong content: written again
    assert store.get(name, digest) == data


def test_a_missing_stream_is_a_named_archive_error(backend: Backend) -> None:
    store, _ = backend
    digest = hashlib.sha256(b"never stored").hexdigest()
    with pytest.raises(ArchiveError):
        store.get(digest, digest)
    assert not store.present(digest, 10)


def test_an_s3_url_without_a_bucket_is_a_one_line_config_error(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[archive]\nblobs = "s3:///streams"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    assert "names no bucket" in caught.value.message and "\n" not in caught.value.message
    config.write_text('[archive]\nblobs = "gs://bucket/streams"\n')
    with pytest.raises(ConfigError, match="a directory or s3://bucket/prefix"):
        load_config(config, environ={})
    with pytest.raises(ConfigError, match="names no bucket"):
        open_stream_store("s3://", tmp_path)
    assert isinstance(open_stream_store("", tmp_path), BlobStore)
    assert (tmp_path / "blobs").is_dir()  # the embedded default: <data_dir>/blobs


def test_a_node_on_the_local_store_never_imports_boto3(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from latentpacs.archive import Archive; "
            "from latentpacs.archive.blobs import open_stream_store; "
            f"Archive('sqlite:///{tmp_path / 'a.db'}', blob_store=open_stream_store('', "
            f"Path({str(tmp_path)!r}))).dispose(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_object_store_that_refuses_connections_is_a_named_a700_error() -> None:
    # Nothing listens on a port just freed: connection refused, on every attempt.
    store = S3BlobStore(f"s3://{BUCKET}/x", endpoint=f"http://{HOST}:{free_port()}",
                        region=REGION, access_key_id=ACCESS_KEY_ID,
                        secret_access_key=SECRET_ACCESS_KEY)
    with pytest.raises(ObjectStoreError) as caught:
        store.put(os.urandom(BIG))
    assert caught.value.status == Status.OUT_OF_RESOURCES
    assert caught.value.error_comment.startswith("S3 HeadObject failed: ")
    with pytest.raises(ObjectStoreError):
        list(store.names())


def test_an_object_store_that_never_answers_times_out_as_a_named_error() -> None:
    # A socket that listens but never reads: the connection is made, no answer comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind((HOST, 0))
        silent.listen(8)
        store = S3BlobStore(f"s3://{BUCKET}/x", endpoint=f"http://{HOST}:{silent.getsockname()[1]}",
                            region=REGION, access_key_id=ACCESS_KEY_ID,
                            secret_access_key=SECRET_ACCESS_KEY, connect_timeout=0.5,
                            read_timeout=0.5, attempts=1)
        with pytest.raises(ObjectStoreError, match="ReadTimeoutError"):
            store.put(os.urandom(BIG))


def _archive(moto: S3Server, prefix: str, url: str) -> Archive:
    archive = Archive(url, blob_store=_s3_store(moto, prefix))
    archive.register_model(sha256=MODEL, name="test", arch="ae", card={})
    return archive


def test_the_archive_on_s3_sweeps_orphans_and_cleans_up_after_a_replace(
        moto: S3Server, tmp_path: Path) -> None:
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    url = f"sqlite:///{tmp_path / 'archive.db'}"
    image = archived(phantom(*JANE, 1), stream=os.urandom(BIG))
    named = hashlib.sha256(image.stream).hexdigest()
    with _archive(moto, prefix, url) as archive:
        assert archive.store(image) is StoreResult.STORED
        assert [found.stream for found in retrieved(archive, image.sop_instance_uid)] == [image.stream]
        replacement = archived(phantom(*JANE, 1), stream=os.urandom(BIG))
        assert archive.store(replacement, duplicates=DuplicatePolicy.REPLACE) is StoreResult.REPLACED
        replaced = hashlib.sha256(replacement.stream).hexdigest()
        assert moto.keys(prefix + "/") == [f"{prefix}/{replaced}"]  # the old stream deleted
    assert named != replaced
    orphan = hashlib.sha256(b"a store that died before its commit").hexdigest()
    moto.client().put_object(Bucket=BUCKET, Key=f"{prefix}/{orphan}", Body=b"x" * BIG)
    moto.client().put_object(Bucket=BUCKET, Key=f"{prefix}/README", Body=b"not ours")
    with _archive(moto, prefix, url) as reopened:  # opening sweeps the orphan
        assert reopened.sweep() == (0, 0)
        assert [found.stream for found in retrieved(reopened, replacement.sop_instance_uid)] == [
            replacement.stream]
    assert moto.keys(prefix + "/") == sorted([f"{prefix}/{replaced}", f"{prefix}/README"])


def test_on_s3_neither_a_replace_nor_another_node_s_sweep_loses_a_stream_being_stored(
        moto: S3Server, tmp_path: Path) -> None:
    # test_blobs.py's two interleavings, played on one bucket prefix by two archives.
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    url = f"sqlite:///{tmp_path / 'archive.db'}"
    shared = os.urandom(BIG)
    first = archived(phantom(*JANE, 1), stream=shared)
    second = archived(phantom(*JANE, 2), stream=shared)  # another instance, same content
    with _archive(moto, prefix, url) as a, _archive(moto, prefix, url) as b:
        assert a.store(first) is StoreResult.STORED
        placed = b._place_stream(second.stream)  # the object exists: reused
        replacement = dataclasses.replace(first, stream=os.urandom(BIG))
        assert a.store(replacement, duplicates=DuplicatePolicy.REPLACE) is StoreResult.REPLACED
        assert b._store_once(second, DuplicatePolicy.KEEP, *placed)[0] is StoreResult.STORED
        assert [found.stream for found in retrieved(b, second.sop_instance_uid)] == [shared]

        third = archived(phantom(*JANE, 3), stream=os.urandom(BIG))
        placed = b._place_stream(third.stream)  # uploaded, not committed
        with Archive(url, blob_store=_s3_store(moto, prefix)):  # a node starts and sweeps
            pass
        assert f"{prefix}/{placed[1]}" not in moto.keys(prefix + "/")  # an orphan then
        assert b._store_once(third, DuplicatePolicy.KEEP, *placed)[0] is StoreResult.STORED
        assert f"{prefix}/{placed[1]}" in moto.keys(prefix + "/")  # uploaded again
        assert [found.stream for found in retrieved(a, third.sop_instance_uid)] == [third.stream]


# --- a real node on the bucket -------------------------------------------------------

SIZE = (512, 416)  # JPEG-LS streams well above the 64 KiB inline limit
COUNT = 3


@pytest.fixture(scope="module")
def batches(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("s3batch")
    first = phantoms.generate(root / "a", COUNT, seed=41, size=SIZE, images_per_study=COUNT)
    second = phantoms.generate(root / "b", COUNT, seed=43, size=SIZE, images_per_study=COUNT)
    return first, second


def _archive_command(config: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "latentpacs"), "--config",
                           str(config), "archive", *command], capture_output=True, text=True,
                          timeout=SCU_TIMEOUT_S, env={**os.environ, **_AWS_ENV})


#: The node finds its credentials by boto3's standard chain (AWS_* variables).
_AWS_ENV = {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY}


def test_a_node_on_s3_stores_retrieves_survives_an_outage_and_names_corruption(
        tmp_path: Path, batches: tuple[list[Path], list[Path]]) -> None:
    from netpeers import start_node

    first, second = batches
    workdir = tmp_path / "s3node"
    workdir.mkdir()
    with start_moto(workdir) as server:
        prefix = "archive/streams"
        config = write_config(workdir, f"sqlite:///{workdir / 'archive.db'}",
                              archive={"blobs": f"s3://{BUCKET}/{prefix}",
                                       "s3_endpoint": server.endpoint, "s3_region": REGION},
                              codec={"tier": "lossless", "deferred": False})
        node = start_node(config, env=_AWS_ENV)
        try:
            stored = storescu(node.port, node.aet, first)
            assert [r.status for r in dimse_responses(stored)] == [Status.SUCCESS] * COUNT
            keys = server.keys(prefix + "/")
            assert len(keys) == COUNT and not (workdir / "data" / "blobs").exists()
            for key in keys:
                body = server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
                assert len(body) > INLINE_LIMIT
                assert hashlib.sha256(body).hexdigest() == key.rsplit("/", 1)[1]

            study = pydicom.dcmread(first[0]).StudyInstanceUID
            got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study},
                         tmp_path / "get")
            assert got.final.status == Status.SUCCESS and got.final.completed == COUNT
            originals = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, first)}
            for ds in map(pydicom.dcmread, got.files):
                assert ds.PixelData == originals[ds.SOPInstanceUID].PixelData  # byte-identical

            stats = _archive_command(config, "stats", "--json")
            assert stats.returncode == 0, stats.stderr
            assert json.loads(stats.stdout)["instances"] == COUNT

            # A corrupted object (same size, one byte flipped): verify names it, and the
            # retrieval fails that one sub-operation.
            body = bytearray(server.client().get_object(Bucket=BUCKET, Key=keys[0])["Body"].read())
            body[len(body) // 2] ^= 0xFF
            server.client().put_object(Bucket=BUCKET, Key=keys[0], Body=bytes(body))
            broken = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study},
                            tmp_path / "get-broken")
            assert (broken.final.completed, broken.final.failed) == (COUNT - 1, 1)
            assert any("SHA-256" in (r.error_comment or "") for r in dimse_responses(broken.proc))
            verify = _archive_command(config, "verify")
            assert verify.returncode != 0
            corrupted = keys[0].rsplit("/", 1)[1]
            failed_lines = [line for line in verify.stderr.splitlines()
                            if line.startswith("latentpacs: ") and "SHA-256" in line]
            assert len(failed_lines) == 1, verify.stderr
            assert corrupted[:16] in failed_lines[0] or any(
                uid in failed_lines[0] for uid in originals), verify.stderr

            # The object store goes away: A700 with an ErrorComment, nothing half-stored.
            server.stop()
            refused = storescu(node.port, node.aet, second[:1])
            [response] = dimse_responses(refused)
            assert response.status == Status.OUT_OF_RESOURCES
            assert response.error_comment and response.error_comment.startswith("S3 ")
            uid = pydicom.dcmread(second[0]).SOPInstanceUID
            assert findscu(node.port, node.aet, "IMAGE", {"SOPInstanceUID": uid}).datasets == []

            # Back on the same port (moto starts empty; the bucket is made again): the same
            # node stores again, without a restart.
            with start_moto(workdir, port=server.port) as back:
                again = storescu(node.port, node.aet, second)
                assert [r.status for r in dimse_responses(again)] == [Status.SUCCESS] * COUNT
                assert len(back.keys(prefix + "/")) == COUNT
                study = pydicom.dcmread(second[0]).StudyInstanceUID
                got = getscu(node.port, node.aet, "STUDY", {"StudyInstanceUID": study},
                             tmp_path / "get2")
                assert got.final.status == Status.SUCCESS and got.final.completed == COUNT
                originals = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, second)}
                for ds in map(pydicom.dcmread, got.files):
                    np.testing.assert_array_equal(ds.pixel_array,
                                                  originals[ds.SOPInstanceUID].pixel_array)
        finally:
            node.stop()
