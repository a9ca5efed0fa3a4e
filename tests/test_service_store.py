"""Service.store does no work whose result is never read (issue 10).

A re-sent instance that the duplicate policy keeps or rejects is answered before any
pixel is decoded or coded: the engine never sees it. A stream tier never runs the
engine at all: nothing reads the latent of an image whose stream is returned.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from latentpacs import phantom
from latentpacs.archive import StoreResult
from latentpacs.config import load_config
from latentpacs.errors import DuplicateInstanceError
from latentpacs.service import open_service


@pytest.mark.parametrize("policy", ["keep", "reject", "replace"])
def test_a_resent_instance_is_coded_again_only_to_replace_it(tmp_path: Path, policy: str) -> None:
    config = load_config(None, environ={}, overrides={
        "archive.data_dir": str(tmp_path / "data"), "archive.duplicates": policy,
        "codec.tier": "latent"})
    (path,) = phantom.generate(tmp_path / "images", 1, 21, size=(96, 80))
    service = open_service(config)
    try:
        engine = service.engines.primary
        assert service.store(pydicom.dcmread(path)) is StoreResult.STORED
        coded = engine.images_run
        assert coded == 1
        if policy == "keep":
            assert service.store(pydicom.dcmread(path)) is StoreResult.KEPT_EXISTING
            assert engine.images_run == coded
        elif policy == "reject":
            with pytest.raises(DuplicateInstanceError):
                service.store(pydicom.dcmread(path))
            assert engine.images_run == coded
        else:
            assert service.store(pydicom.dcmread(path)) is StoreResult.REPLACED
            assert engine.images_run == coded + 1
        assert service.archive.stats().instances == 1
    finally:
        service.close()


@pytest.mark.parametrize("tier", ["lossless", "near-lossless:2"])
def test_a_stream_tier_never_runs_the_engine(tmp_path: Path, tier: str) -> None:
    config = load_config(None, environ={}, overrides={
        "archive.data_dir": str(tmp_path / "data"), "codec.tier": tier})
    (path,) = phantom.generate(tmp_path / "images", 1, 22, size=(96, 80))
    service = open_service(config)
    try:
        assert service.store(pydicom.dcmread(path)) is StoreResult.STORED
        assert service.engines.loaded == []  # no engine was even loaded
        (archived,) = service.archive.iter_images()
        assert archived.latent == b"" and archived.stream
        returned = service.returned(archived)
        original = pydicom.dcmread(path)
        if tier == "lossless":
            assert returned.PixelData == original.PixelData
        else:
            assert returned.SOPInstanceUID != original.SOPInstanceUID
    finally:
        service.close()


def test_a_lossless_node_process_never_imports_torch(tmp_path: Path) -> None:
    """The memory a lossless node saves: torch and the model are loaded only when a
    latent must be encoded or decoded (here: never)."""
    import subprocess
    import sys

    (path,) = phantom.generate(tmp_path / "images", 1, 23, size=(96, 80))
    script = f"""
import sys, pydicom
from latentpacs.config import load_config
from latentpacs.service import open_service
config = load_config(None, environ={{}}, overrides={{
    "archive.data_dir": {str(tmp_path / "data")!r}, "codec.tier": "lossless"}})
service = open_service(config, background=True)
service.store(pydicom.dcmread({str(path)!r}), received={str(path)!r})
assert service.deferred.wait_idle(120)
(archived,) = service.archive.iter_images()
assert archived.stream_coder == "jpeg-ls", archived.stream_coder
service.returned(archived)
service.close()
print("torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
