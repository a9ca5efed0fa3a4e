"""``latentpacs encode / decode / inspect / models list`` on synthetic mammograms.

The model here is a small untrained ``ae`` at 64x64 input, saved like a shipped model:
these tests check the container, tiers, identity and error handling, not image quality
(tests/test_shipped_models.py checks that).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomtools import dciodvfy_errors, require
from latentpacs import phantom
from latentpacs.cli import main
from latentpacs.codec.models import build_model
from latentpacs.codec.modelfile import save_model
from latentpacs.image.derive import METHOD_LATENT
from latentpacs.image.pixels import stored_values

SIZE = (160, 128)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    model = build_model("ae", image_size=64)
    save_model(model, directory, "tiny", description="untrained test model", training={}, metrics={})
    return directory


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(tmp_path_factory.mktemp("dicom"), 12, seed=7, size=SIZE, images_per_study=2)


def run(*argv: str | Path) -> int:
    return main([str(a) for a in argv])


def encode(sources: list[Path], out: Path, models_dir: Path, tier: str) -> int:
    return run("encode", *sources, "--out", out, "--tier", tier, "--model", "tiny", "--models-dir", models_dir)


def decoded(out: Path) -> dict[str, pydicom.Dataset]:
    """Decoded objects by the SOP Instance UID of their original."""
    result = {}
    for path in sorted(out.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        key = ds.SourceImageSequence[0].ReferencedSOPInstanceUID if "SourceImageSequence" in ds else ds.SOPInstanceUID
        result[key] = ds
    return result


def test_latent_tier_returns_derived_objects(sources, models_dir, tmp_path, capsys) -> None:
    assert encode(sources, tmp_path / "lpz", models_dir, "latent") == 0
    assert run("decode", tmp_path / "lpz", "--out", tmp_path / "out", "--models-dir", models_dir) == 0
    out = decoded(tmp_path / "out")
    assert len(out) == len(sources)
    for source in sources:
        original = pydicom.dcmread(source)
        ds = out[original.SOPInstanceUID]
        assert ds.SOPInstanceUID != original.SOPInstanceUID
        assert ds.SeriesInstanceUID != original.SeriesInstanceUID
        assert ds.StudyInstanceUID == original.StudyInstanceUID
        assert ds.PatientID == original.PatientID and ds.PatientName == original.PatientName
        assert ds.SOPInstanceUID.startswith("2.25.")
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod == METHOD_LATENT
        assert float(ds.LossyImageCompressionRatio) > 100
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.DerivationCodeSequence[0].CodeValue == "113040"
        ref = ds.SourceImageSequence[0]
        assert ref.ReferencedSOPClassUID == original.SOPClassUID
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121320"
        assert "tiny" in ds.DerivationDescription
        assert (ds.Rows, ds.Columns, ds.BitsStored) == (original.Rows, original.Columns, original.BitsStored)
        assert ds.PhotometricInterpretation == original.PhotometricInterpretation
        assert ds.pixel_array.max() <= 2**ds.BitsStored - 1


def test_derived_uids_are_deterministic_and_split_by_presentation(sources, models_dir, tmp_path) -> None:
    for run_name in ("a", "b"):
        encode(sources[:6], tmp_path / run_name, models_dir, "latent")
        run("decode", tmp_path / run_name, "--out", tmp_path / f"{run_name}-out", "--models-dir", models_dir)
    a, b = decoded(tmp_path / "a-out"), decoded(tmp_path / "b-out")
    assert {k: v.SOPInstanceUID for k, v in a.items()} == {k: v.SOPInstanceUID for k, v in b.items()}
    series_by_class: dict[str, set[str]] = {}
    for ds in a.values():
        series_by_class.setdefault(ds.SOPClassUID, set()).add(ds.SeriesInstanceUID)
    classes = list(series_by_class.values())
    for i, first in enumerate(classes):
        for second in classes[i + 1 :]:
            assert not first & second, "For Presentation and For Processing share a series"


def test_derived_objects_are_dciodvfy_clean(sources, models_dir, tmp_path) -> None:
    picked = sources[:4]
    for source in picked:
        assert dciodvfy_errors(source) == [], f"phantom {source} is not valid to begin with"
    encode(picked, tmp_path / "lpz", models_dir, "latent")
    run("decode", tmp_path / "lpz", "--out", tmp_path / "out", "--models-dir", models_dir)
    for path in sorted((tmp_path / "out").glob("*.dcm")):
        assert dciodvfy_errors(path) == []


def test_lossless_is_bit_exact_with_original_uids(sources, models_dir, tmp_path) -> None:
    assert encode(sources, tmp_path / "lpz", models_dir, "lossless") == 0
    assert run("decode", tmp_path / "lpz", "--out", tmp_path / "out") == 0  # no model needed
    out = decoded(tmp_path / "out")
    seen = set()
    for source in sources:
        original = pydicom.dcmread(source)
        ds = out[original.SOPInstanceUID]
        assert ds.SeriesInstanceUID == original.SeriesInstanceUID
        assert "LossyImageCompression" not in ds or ds.LossyImageCompression == original.get("LossyImageCompression")
        np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)
        seen.add((original.PhotometricInterpretation, original.BitsStored))
    assert len(seen) == 6, f"phantoms should cover photometric x bit depths, got {seen}"


@pytest.mark.parametrize("near", [1, 4])
def test_near_lossless_bound(sources, models_dir, tmp_path, near) -> None:
    assert encode(sources[:6], tmp_path / "lpz", models_dir, f"near-lossless:{near}") == 0
    run("decode", tmp_path / "lpz", "--out", tmp_path / "out")
    out = decoded(tmp_path / "out")
    for source in sources[:6]:
        original = pydicom.dcmread(source)
        ds = out[original.SOPInstanceUID]
        diff = np.abs(ds.pixel_array.astype(np.int64) - original.pixel_array.astype(np.int64))
        assert diff.max() <= near
        assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_14495_1"


def test_compressed_input_is_decoded(sources, models_dir, tmp_path) -> None:
    compressed = tmp_path / "jls.dcm"
    subprocess.run([require("dcmcjpls"), str(sources[0]), str(compressed)], check=True)
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    assert encode([compressed], tmp_path / "lpz", models_dir, "lossless") == 0
    run("decode", tmp_path / "lpz", "--out", tmp_path / "out")
    (ds,) = decoded(tmp_path / "out").values()
    np.testing.assert_array_equal(ds.pixel_array, pydicom.dcmread(sources[0]).pixel_array)


def test_inspect_reports_sizes(sources, models_dir, tmp_path, capsys) -> None:
    encode(sources[:1], tmp_path / "latent", models_dir, "latent")
    encode(sources[:1], tmp_path / "lossless", models_dir, "lossless")
    capsys.readouterr()
    (latent_file,) = (tmp_path / "latent").glob("*.lpz")
    (lossless_file,) = (tmp_path / "lossless").glob("*.lpz")
    assert run("inspect", "--json", latent_file) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["latent_bytes"] == 16 and info["stream_bytes"] == 0
    assert info["tier"] == "latent" and len(info["model"]["sha256"]) == 64
    assert info["geometry"]["rows"] == SIZE[0]
    assert run("inspect", "--json", lossless_file) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["stream_bytes"] > 0 and info["tier"] == "lossless"
    assert run("inspect", lossless_file) == 0
    assert "stream_bytes" in capsys.readouterr().out


def test_bad_inputs_give_one_line_and_the_rest_is_processed(sources, models_dir, tmp_path, capsys) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM" * 10)
    rgb = tmp_path / "rgb.dcm"
    ds = pydicom.dcmread(sources[0])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = bytes(ds.Rows * ds.Columns * 3)
    ds.save_as(rgb)
    missing = tmp_path / "missing.dcm"
    code = encode([junk, sources[0], rgb, missing, sources[1]], tmp_path / "lpz", models_dir, "latent")
    captured = capsys.readouterr()
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("latentpacs:")]
    assert len(errors) == 3, captured.err
    assert any("junk.dcm" in e for e in errors) and any("rgb.dcm" in e and "grayscale" in e for e in errors)
    assert "Traceback" not in captured.err
    assert len(list((tmp_path / "lpz").glob("*.lpz"))) == 2


def test_corrupt_container_and_unknown_tier(sources, models_dir, tmp_path, capsys) -> None:
    encode(sources[:2], tmp_path / "lpz", models_dir, "latent")
    first, second = sorted((tmp_path / "lpz").glob("*.lpz"))
    data = bytearray(first.read_bytes())
    data[40] ^= 0xFF
    first.write_bytes(bytes(data))
    capsys.readouterr()
    assert run("decode", first, second, "--out", tmp_path / "out", "--models-dir", models_dir) == 1
    err = capsys.readouterr().err
    assert "corrupt" in err and "Traceback" not in err
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 1
    assert encode(sources[:1], tmp_path / "x", models_dir, "medium") == 2
    assert "unknown tier" in capsys.readouterr().err


def test_replaced_model_is_refused(sources, models_dir, tmp_path, capsys) -> None:
    encode(sources[:1], tmp_path / "lpz", models_dir, "latent")
    other = tmp_path / "models"
    other.mkdir()
    # A different model saved under the same name: the latent names the original by hash.
    torch_model = build_model("ae", image_size=64)
    save_model(torch_model, other, "tiny", description="another", training={}, metrics={})
    capsys.readouterr()
    assert run("decode", tmp_path / "lpz", "--out", tmp_path / "out", "--models-dir", other) == 1
    assert "no model with sha-256" in capsys.readouterr().err.lower()


def test_models_list_json(models_dir, capsys) -> None:
    assert run("models", "list", "--json", "--models-dir", models_dir) == 0
    (card,) = json.loads(capsys.readouterr().out)
    assert card["name"] == "tiny" and card["arch"] == "ae" and card["latent_dim"] == 16
    assert len(card["sha256"]) == 64 and card["latent_bytes"] == 16


def test_console_script_runs(tmp_path) -> None:
    script = Path(sys.executable).parent / "latentpacs"
    result = subprocess.run([str(script), "inspect", str(tmp_path / "nope.lpz")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot read" in result.stderr


def test_the_lpz_module_imports_no_sql_networking_or_torch() -> None:
    """``latentpacs inspect`` needs only the image layer: no SQLAlchemy, pynetdicom or torch."""
    import subprocess
    import sys

    probe = ("import sys, latentpacs.image.lpz; print(sorted({m.split('.')[0] for m in sys.modules}"
             " & {'sqlalchemy', 'pynetdicom', 'torch'}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_the_stream_coder_is_chosen_and_recorded(sources, models_dir, tmp_path, capsys) -> None:
    assert run("encode", sources[0], "--out", tmp_path / "lpz", "--tier", "lossless",
               "--coder", "jpeg-ls", "--model", "tiny", "--models-dir", models_dir) == 0
    (written,) = (tmp_path / "lpz").glob("*.lpz")
    capsys.readouterr()
    assert run("inspect", "--json", written) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["stream"] == {"coder": "jpeg-ls", "version": 1}
    assert run("encode", sources[0], "--out", tmp_path / "x", "--tier", "lossless",
               "--coder", "zip", "--model", "tiny", "--models-dir", models_dir) == 2
    err = capsys.readouterr().err
    assert "unknown stream coder 'zip'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").iterdir())
