"""``latentpacs evaluate`` on small phantoms with the shipped ae and vae models.

Checks the numbers against values recomputed here by hand, the JPEG series against
dciodvfy, the figures, and the report in a real headless browser (Debian's chromium).
"""

from __future__ import annotations

import csv
import io
import math
import re
import subprocess
from pathlib import Path
from statistics import median

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_fragments
from pydicom.uid import JPEGBaseline8Bit

from dicomtools import dciodvfy_errors, require
from latentpacs import phantom
from latentpacs.cli import main
from latentpacs.codec.engine import resize_bilinear
from latentpacs.codec.modelfile import load_model
from latentpacs.evaluate import baselines, plots
from latentpacs.evaluate.metrics import paper_mse, ssim
from latentpacs.evaluate.run import EvaluationConfig, EvaluationResult, evaluate
from latentpacs.image.pixels import read_file, to_canonical

CODECS = {"ae", "vae", "pca", "jpeg-q85", "jpeg-q85-native", "ae+near-lossless:2", "ae+lossless", "jpeg-ls", "jpeg2000-lossless",
          "jpeg-xl-lossless"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """4 images, 2 studies of 2: more than the 3 previews, and each test's data[:3]."""
    return phantom.generate(tmp_path_factory.mktemp("eval-data"), 4, 31, size=(256, 208), images_per_study=2)


@pytest.fixture(scope="module")
def bogus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An input that is not DICOM, evaluated among the phantoms (one run for both)."""
    path = tmp_path_factory.mktemp("eval-bogus") / "not-dicom.dcm"
    path.write_text("not a DICOM file")
    return path


@pytest.fixture(scope="module")
def result(data: list[Path], bogus: Path, tmp_path_factory: pytest.TempPathFactory) -> EvaluationResult:
    out = tmp_path_factory.mktemp("eval-out")
    images = (data[0], bogus, *data[1:])  # the unreadable one between readable ones
    return evaluate(EvaluationConfig(images=images, out=out, previews=3), progress=False)  # default models


@pytest.fixture(scope="module")
def table(result: EvaluationResult) -> list[dict[str, str]]:
    with (result.out / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_metrics_csv_has_one_row_per_image_and_codec(table: list[dict[str, str]], data: list[Path]) -> None:
    assert {"image", "codec", "mse", "mse_over_variance", "psnr", "ssim", "bits", "efficiency"} <= set(table[0])
    pairs = [(row["image"], row["codec"]) for row in table]
    assert len(pairs) == len(set(pairs)) == len(data) * len(CODECS)
    assert {row["codec"] for row in table} == CODECS


def test_efficiency_column_is_consistent_with_mse_and_bits(table: list[dict[str, str]]) -> None:
    for row in table:
        expected = (1 - float(row["mse"])) / math.log(int(row["bits"]))
        assert float(row["efficiency"]) == pytest.approx(expected, rel=1e-12)


def test_jpeg_q85_is_the_papers_protocol_a_jpeg_of_the_1024_image(
    result: EvaluationResult, table: list[dict[str, str]], data: list[Path]
) -> None:
    """Paper III.B-C: resize to 1024 x 1024, then JPEG q85; bits = that file, MSE at 1024."""
    for path in data[:3]:
        canonical, _ = to_canonical(read_file(path))
        resized = resize_bilinear(canonical, (1024, 1024))
        buffer = io.BytesIO()  # recomputed here with Pillow, not through the evaluator's baselines
        Image.fromarray(np.rint(np.clip(resized, 0, 1) * 255).astype(np.uint8), mode="L").save(
            buffer, "JPEG", quality=85)
        with Image.open(io.BytesIO(buffer.getvalue())) as image:
            decoded = np.asarray(image, dtype=np.float64) / 255
        assert decoded.shape == (1024, 1024)
        row = next(r for r in table if r["image"] == str(path) and r["codec"] == "jpeg-q85")
        assert int(row["bits"]) == 8 * len(buffer.getvalue())
        assert int(row["bits"]) != 8 * len(baselines.jpeg_encode(canonical, 85))  # not the native file
        hand_mse = float(np.mean((resized.astype(np.float64) - decoded) ** 2))
        assert float(row["mse"]) == pytest.approx(hand_mse, rel=1e-9)
        assert float(row["psnr"]) == pytest.approx(-10 * math.log10(float(row["mse"])), rel=1e-9)
        assert float(row["ssim"]) == pytest.approx(ssim(resized, decoded), rel=1e-9)
        assert float(row["bpp"]) == pytest.approx(int(row["bits"]) / (256 * 208))
        assert (int(row["rows"]), int(row["columns"])) == (256, 208)
    # the files it measured are written as they are
    assert len(result.jpeg_files) == len(data)
    for jpeg_file in result.jpeg_files:
        assert jpeg_file.parent.name == "jpeg-q85" and jpeg_file.suffix == ".jpg"
        with Image.open(jpeg_file) as image:
            assert image.format == "JPEG" and image.size == (1024, 1024)
    sizes = {8 * p.stat().st_size for p in result.jpeg_files}
    assert sizes == {int(r["bits"]) for r in table if r["codec"] == "jpeg-q85"}


def test_jpeg_q85_native_codes_the_native_matrix(table: list[dict[str, str]], data: list[Path]) -> None:
    for path in data[:3]:
        canonical, _ = to_canonical(read_file(path))
        stream = baselines.jpeg_encode(canonical, 85)
        with Image.open(io.BytesIO(stream)) as image:
            assert image.size == (208, 256)  # native columns x rows
        row = next(r for r in table if r["image"] == str(path) and r["codec"] == "jpeg-q85-native")
        assert row["kind"] == "jpeg"
        assert int(row["bits"]) == 8 * len(stream)
        assert float(row["mse"]) == pytest.approx(paper_mse(canonical, baselines.jpeg_decode(stream)), rel=1e-6)
        assert float(row["psnr"]) == pytest.approx(-10 * math.log10(float(row["mse"])), rel=1e-9)


def test_pca_baseline_is_a_row_and_mse_over_variance_normalises_by_the_image(
        table: list[dict[str, str]], data: list[Path]) -> None:
    for path in data[:2]:
        paper = resize_bilinear(to_canonical(read_file(path))[0], (1024, 1024))
        for codec in ("ae", "pca", "jpeg-q85"):
            row = next(r for r in table if r["image"] == str(path) and r["codec"] == codec)
            assert float(row["mse_over_variance"]) == pytest.approx(float(row["mse"]) / float(paper.var()), rel=1e-4)
        pca = next(r for r in table if r["image"] == str(path) and r["codec"] == "pca")
        assert pca["kind"] == "learned" and 0 < float(pca["mse_over_variance"]) < 1


def test_latent_and_tier_bits_are_the_stored_bytes(table: list[dict[str, str]]) -> None:
    rows = {(r["image"], r["codec"]): r for r in table}
    for name in ("ae", "vae", "pca"):
        latent_bits = 8 * load_model(name).card.latent_bytes
        assert {int(r["bits"]) for r in table if r["codec"] == name} == {latent_bits}
    for image in {r["image"] for r in table}:
        lossless = rows[(image, "ae+lossless")]
        assert float(lossless["mse"]) == 0 and int(lossless["max_abs_error"]) == 0
        # the lossless tier stores exactly the JPEG-LS stream (no latent: nothing reads it)
        assert int(lossless["bits"]) == int(rows[(image, "jpeg-ls")]["bits"])
        assert int(rows[(image, "ae+near-lossless:2")]["max_abs_error"]) <= 2
        for jpeg in ("jpeg-q85", "jpeg-q85-native"):
            assert float(rows[(image, "ae")]["mse"]) > float(rows[(image, jpeg)]["mse"]) > 0
            assert 0 < float(rows[(image, "ae")]["ssim"]) < float(rows[(image, jpeg)]["ssim"]) < 1


def test_summary_medians_are_the_csv_medians(result: EvaluationResult, table: list[dict[str, str]]) -> None:
    for codec, stats in result.summary["codecs"].items():  # type: ignore[union-attr]
        for measure in ("mse", "ssim", "bits", "efficiency", "bpp"):
            values = [float(r[measure]) for r in table if r["codec"] == codec]
            assert stats[measure]["median"] == pytest.approx(median(values))
    assert result.summary["codecs"]["jpeg-ls"]["psnr"]["median"] is None  # type: ignore[index]


def test_jpeg_series_is_valid_dicom_carrying_the_measured_stream(result: EvaluationResult, table,
                                                                data: list[Path]) -> None:
    require("dciodvfy")
    assert len(result.jpeg_series) == len(data)
    for path in result.jpeg_series[:4]:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"
        assert ds.ImageType[0] == "DERIVED" and ds.BitsStored == 8
        source = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        original = next(p for p in {r["image"] for r in table} if read_file(p).SOPInstanceUID == source)
        frames = list(generate_fragments(ds.PixelData))[1:]
        row = next(r for r in table if r["image"] == original and r["codec"] == "jpeg-q85-native")
        assert 8 * len(b"".join(frames).rstrip(b"\x00")) == int(row["bits"])  # minus the even-length pad
        assert ds.pixel_array.shape == (256, 208)
        assert path.parent.name == "jpeg-q85-native"
        assert dciodvfy_errors(path) == []


def test_figures_are_pngs_redrawn_from_the_written_files_alone(result: EvaluationResult) -> None:
    assert [p.name for p in result.figures] == list(plots.FIGURES)
    for figure in result.figures:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000
        figure.unlink()
    redrawn = plots.write_figures(result.out)
    assert all(p.exists() for p in redrawn)


def _figures_loaded(page: Path, workdir: Path) -> tuple[int, int]:
    """Open ``page`` in headless chromium; how many of its images decoded, of how many."""
    browser = require("chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={workdir}", "--virtual-time-budget=10000", "--dump-dom"]
    run = subprocess.run([browser, *flags, page.as_uri()], capture_output=True, text=True, timeout=180)
    match = re.search(r'<html[^>]*data-figures="(\d+)/(\d+)"', run.stdout)
    assert match, f"the page did not finish loading: {run.stderr[-2000:]}"
    return int(match.group(1)), int(match.group(2))


def test_report_loads_every_figure_in_a_headless_browser(result: EvaluationResult, tmp_path: Path) -> None:
    text = result.report.read_text()
    assert "http://" not in text and "https://" not in text  # readable offline
    assert "<table>" in text and "jpeg-q85" in text and "jpeg-q85-native" in text and "ae+lossless" in text
    assert _figures_loaded(result.report, tmp_path / "profile-1") == (len(plots.FIGURES), len(plots.FIGURES))
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAAA", 1))
    loaded, total = _figures_loaded(broken, tmp_path / "profile-2")
    assert (loaded, total) == (len(plots.FIGURES) - 1, len(plots.FIGURES))


def test_cli_evaluate_writes_the_report_and_prints_medians(data: list[Path], tmp_path: Path, capsys) -> None:
    folder = data[0].parent  # one study: 2 images
    code = main(["evaluate", "--data", str(folder), "--model", "ae", "--tiers", "--previews", "1",
                 "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "evaluated 2 image(s)" in printed and "jpeg-q85" in printed
    for name in ("metrics.csv", "summary.json", "rate_distortion.csv", "report.html"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    with (tmp_path / "out" / "metrics.csv").open() as handle:
        codecs = {row["codec"] for row in csv.DictReader(handle)}
    assert codecs == {"ae", "jpeg-q85", "jpeg-q85-native", "jpeg-ls", "jpeg2000-lossless", "jpeg-xl-lossless"}
    with (tmp_path / "out" / "rate_distortion.csv").open() as handle:
        curves = {row["codec"] for row in csv.DictReader(handle)}
    assert curves == {"jpeg", "jpeg-native", "jpeg2000"}


def test_an_unreadable_input_is_skipped_and_named(result: EvaluationResult, data: list[Path], bogus: Path) -> None:
    assert [p for p, _ in result.skipped] == [bogus]
    assert result.summary["images"] == len(data)  # the images after it are measured too
    assert "not-dicom.dcm" in result.report.read_text()
