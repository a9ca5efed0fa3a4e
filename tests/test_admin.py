"""``latentpacs db upgrade`` and ``archive stats / verify / export`` on a filled archive."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from latentpacs import phantom
from latentpacs.cli import main
from latentpacs.codec.modelfile import default_models_dir
from latentpacs.config import load_config
from latentpacs.image.pixels import read_file
from latentpacs.service import open_service


@pytest.fixture
def filled(archive_url: str, tmp_path: Path) -> tuple[list[str], list[Path]]:
    """An archive holding 4 phantoms at the latent tier and 2 at lossless, and the CLI flags for it."""
    sources = phantom.generate(tmp_path / "dicom", 6, seed=31, size=(192, 160), images_per_study=2)
    models = tmp_path / "models"
    models.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(default_models_dir() / f"ae{suffix}", models / f"ae{suffix}")
    flags = ["--database", archive_url, "--data-dir", str(tmp_path / "data")]
    for tier, chunk in (("latent", sources[:4]), ("lossless", sources[4:])):
        config = load_config(None, environ={}, overrides={
            "archive.database": archive_url, "archive.data_dir": str(tmp_path / "data"),
            "codec.tier": tier, "codec.models_dir": str(models)})
        service = open_service(config)
        try:
            for path in chunk:
                service.store(read_file(path))
        finally:
            service.close()
    return [*flags, "--models-dir", str(models)], sources


def test_db_upgrade_is_idempotent(archive_url: str, tmp_path: Path, capsys) -> None:
    for _ in range(2):
        assert main(["db", "upgrade", "--database", archive_url]) == 0
    assert "up to date" in capsys.readouterr().out


def test_stats(filled, capsys) -> None:
    flags, _ = filled
    capsys.readouterr()
    assert main(["archive", "stats", "--json", *flags[:4]]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["patients"], stats["studies"], stats["instances"]) == (2, 3, 6)
    tiers = {t["tier"]: t for t in stats["tiers"]}
    assert tiers["latent"]["instances"] == 4 and tiers["latent"]["archived_bytes"] == 4 * 16
    assert tiers["lossless"]["instances"] == 2 and tiers["lossless"]["ratio"] > 1
    assert tiers["latent"]["ratio"] > 1000
    assert stats["ratio"] == pytest.approx(stats["original_bytes"] / stats["archived_bytes"])


def test_verify_passes_then_fails_when_the_model_is_replaced(filled, capsys) -> None:
    flags, _ = filled
    assert main(["archive", "verify", *flags]) == 0
    assert "verified 6 of 6" in capsys.readouterr().out
    models = Path(flags[-1])
    weights = models / "ae.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))  # the file the latents name is gone: its hash differs
    assert main(["archive", "verify", *flags]) != 0


def test_export_writes_the_returned_objects(filled, tmp_path, capsys) -> None:
    flags, sources = filled
    lossless = pydicom.dcmread(sources[4])
    out = tmp_path / "export"
    assert main(["archive", "export", "--study", lossless.StudyInstanceUID, "--out", str(out), *flags]) == 0
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 2
    exported = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    for source in sources[4:]:
        original = pydicom.dcmread(source)
        np.testing.assert_array_equal(exported[original.SOPInstanceUID].pixel_array, original.pixel_array)
    capsys.readouterr()
    assert main(["archive", "export", "--study", "2.25.999", "--out", str(out), *flags]) == 2
    assert "no archived study" in capsys.readouterr().err


def test_import_archives_folders_and_names_bad_files(archive_url: str, tmp_path: Path, capsys) -> None:
    sources = phantom.generate(tmp_path / "dicom", 4, seed=32, size=(128, 104), images_per_study=2)
    (tmp_path / "dicom" / "notes.txt").write_text("not DICOM")
    flags = ["--database", archive_url, "--data-dir", str(tmp_path / "data")]
    assert main(["archive", "import", str(tmp_path / "dicom"), "--tier", "lossless", *flags]) == 1
    captured = capsys.readouterr()
    assert "imported 4 of 5" in captured.out and "4 stored" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("latentpacs:")]
    assert len(errors) == 1 and "notes.txt" in errors[0]
    assert main(["archive", "import", str(sources[0]), *flags]) == 0  # re-sent: kept, not doubled
    assert "1 kept-existing" in capsys.readouterr().out
    assert main(["archive", "stats", "--json", *flags]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["instances"] == 4 and [t["tier"] for t in stats["tiers"]] == ["lossless"]
    out = tmp_path / "export"
    study = pydicom.dcmread(sources[0]).StudyInstanceUID
    assert main(["archive", "export", "--study", study, "--out", str(out), *flags]) == 0
    exported = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in out.glob("*.dcm")}
    for source in sources[:2]:
        original = pydicom.dcmread(source)
        np.testing.assert_array_equal(exported[original.SOPInstanceUID].pixel_array, original.pixel_array)
