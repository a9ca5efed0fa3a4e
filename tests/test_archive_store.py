"""Ingest, duplicates, blobs, statistics and durability of the archive (PS3.4 B.2),
on a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from archive_data import MODEL, S1, S3, archived, catalogue, derived_uid, filled_archive, phantom, retrieved
from archive_data import query as identifier

from latentpacs.archive import Archive, DuplicatePolicy, StoreResult
from latentpacs.errors import (
    ArchiveError, DuplicateInstanceError, InvalidDicomError, ModelError, Status,
    TierError,
)

JANE = ("P1", "Doe^Jane", "19600101", S1, "20240115", "090000", "Screening mammogram")


def test_stored_images_come_back_identical_after_reopening(archive_url: str) -> None:
    images = catalogue()
    with filled_archive(archive_url) as archive:
        assert retrieved(archive, images[0].sop_instance_uid) == [images[0]]
    with Archive(archive_url) as reopened:  # migrations run again: a no-op at head
        assert list(reopened.iter_images()) == images
        assert retrieved(reopened, derived_uid(f"{S1}.1.3", MODEL)) == [images[2]]
        assert retrieved(reopened, f"{S1}.1.3") == []  # a latent-tier image's original UID is not returned


def test_duplicate_policies(archive_url: str) -> None:
    first = archived(phantom(*JANE, 1), stream=b"first")
    second = dataclasses.replace(first, stream=b"second")
    with Archive(archive_url) as archive:
        archive.register_model(sha256=MODEL, name="test", arch="ae", card={})
        assert archive.store(first) is StoreResult.STORED
        assert archive.store(second) is StoreResult.KEPT_EXISTING
        assert archive.store(second, duplicates="keep") is StoreResult.KEPT_EXISTING
        assert [found.stream for found in retrieved(archive, first.sop_instance_uid)] == [b"first"]
        with pytest.raises(DuplicateInstanceError) as caught:
            archive.store(second, duplicates=DuplicatePolicy.REJECT)
        assert caught.value.status == Status.DUPLICATE_REJECTED
        assert [found.stream for found in retrieved(archive, first.sop_instance_uid)] == [b"first"]
        assert archive.store(second, duplicates=DuplicatePolicy.REPLACE) is StoreResult.REPLACED
        assert [found.stream for found in retrieved(archive, first.sop_instance_uid)] == [b"second"]
        assert archive.stats().instances == 1


def test_replacing_with_another_tier_moves_the_instance(archive_url: str) -> None:
    lossless = archived(phantom(*JANE, 1), "lossless", stream=b"x" * 10)
    with Archive(archive_url) as archive:
        archive.register_model(sha256=MODEL, name="test", arch="ae", card={})
        archive.store(lossless)
        latent = archived(phantom(*JANE, 1), "latent")
        assert archive.store(latent, duplicates="replace") is StoreResult.REPLACED
        assert retrieved(archive, f"{S1}.1.1") == []
        assert [found.tier for found in retrieved(archive, latent.sop_instance_uid)] == ["latent"]
        stats = archive.stats()
        assert (stats.patients, stats.studies, stats.series, stats.instances) == (1, 1, 1, 1)
        series = [a.SeriesInstanceUID for a in archive.find("SERIES", identifier("SERIES"))]
        assert series == [derived_uid(f"{S1}.1", MODEL)]  # the emptied original series is gone


def test_models_must_be_registered_and_are_tracked(archive_url: str) -> None:
    image = archived(phantom(*JANE, 1))
    with Archive(archive_url) as archive:
        with pytest.raises(ModelError):
            archive.store(image)
        assert archive.stats().instances == 0
        for _ in range(2):  # idempotent
            archive.register_model(sha256=MODEL, name="test", arch="ae", card={"bits": 8})
        archive.store(image)
        with pytest.raises(ModelError):
            archive.register_model(sha256="not-a-hash", name="x", arch="ae", card={})


def test_large_streams_go_to_content_addressed_blobs(archive_url: str, tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    big = os.urandom(100 * 1024)
    image = archived(phantom(*JANE, 1), stream=big)
    small = archived(phantom(*JANE, 2), stream=b"s" * 1024)
    with Archive(archive_url, blob_dir=blobs) as archive:
        archive.register_model(sha256=MODEL, name="test", arch="ae", card={})
        archive.store(image)
        archive.store(small)
        digest = hashlib.sha256(big).hexdigest()
        assert [path.name for path in blobs.iterdir()] == [digest]
        assert (blobs / digest).read_bytes() == big
        assert [found.stream for found in retrieved(archive, image.sop_instance_uid)] == [big]
        replacement = dataclasses.replace(image, stream=os.urandom(80 * 1024))
        archive.store(replacement, duplicates=DuplicatePolicy.REPLACE)
        assert [path.name for path in blobs.iterdir()] == [
            hashlib.sha256(replacement.stream).hexdigest()]  # the unused blob is removed
        (blobs / hashlib.sha256(replacement.stream).hexdigest()).write_bytes(b"corrupt")
        with pytest.raises(ArchiveError):
            retrieved(archive, image.sop_instance_uid)


def test_stats_count_entities_and_bytes_per_tier(archive_url: str) -> None:
    images = catalogue()
    with filled_archive(archive_url) as archive:
        stats = archive.stats()
    assert (stats.patients, stats.studies, stats.series, stats.instances) == (3, 4, 5, 9)
    assert [tier.tier for tier in stats.tiers] == ["latent", "lossless", "near-lossless:2"]
    lossless = stats.tiers[1]
    expected = [image for image in images if image.tier == "lossless"]
    assert lossless.instances == len(expected) == 6
    assert lossless.original_bytes == sum(i.original_stored_bytes for i in expected)
    assert lossless.archived_bytes == sum(len(i.latent) + len(i.stream) for i in expected)
    assert stats.ratio == pytest.approx(
        sum(i.original_stored_bytes for i in images) / sum(i.archived_bytes for i in images))


def test_malformed_images_are_refused() -> None:
    good = archived(phantom(*JANE, 1))
    header = {tag: element for tag, element in good.header.items() if tag != "00080018"}
    with pytest.raises(InvalidDicomError, match="SOP Instance UID"):
        dataclasses.replace(good, header=header)
    with pytest.raises(TierError):
        dataclasses.replace(good, tier="near-lossless:0")


def test_concurrent_stores_of_the_same_instances_keep_one_copy(archive_url: str) -> None:
    images = catalogue()[5:8]  # one study, three instances
    with Archive(archive_url) as archive:
        archive.register_model(sha256=MODEL, name="test", arch="ae", card={})
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(archive.store, [i for i in images for _ in range(4)]))
        assert sorted(results).count(StoreResult.STORED) == 3
        assert results.count(StoreResult.KEPT_EXISTING) == 9
        stats = archive.stats()
        assert (stats.patients, stats.studies, stats.series, stats.instances) == (1, 1, 1, 3)


_STORE_THEN_DIE = """
import json, os, signal, sys
from latentpacs.archive import Archive, ArchivedImage
fields = json.load(sys.stdin)
fields["latent"], fields["stream"] = bytes.fromhex(fields["latent"]), b""
archive = Archive(sys.argv[1])
archive.register_model(sha256=fields["model_sha256"], name="m", arch="ae", card={})
archive.store(ArchivedImage(**fields))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_committed_store_survives_sigkill(archive_url: str) -> None:
    image = archived(phantom("P2", "SMITH^Anna", "19751231", S3, "20220601", "080000",
                             "Screening mammogram", 1), "latent")
    fields = dataclasses.asdict(image) | {"latent": image.latent.hex(), "stream": ""}
    killed = subprocess.run([sys.executable, "-c", _STORE_THEN_DIE, archive_url],
                            input=json.dumps(fields), text=True, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    with Archive(archive_url) as archive:
        assert retrieved(archive, image.sop_instance_uid) == [image]
