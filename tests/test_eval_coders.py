"""The lossless / near-lossless coder comparison (``latentpacs.evaluate.coders``, ``evaluate --coders``).

Small physical phantoms; every registered stream coder at every NEAR and the classical
lossless coders. Broken coders are real coders: JPEG-LS with one bit of its stream
flipped, and JPEG-LS coding with a looser NEAR than it was asked for; each must come out
as a failure of its row, never as a figure.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import pytest

from latentpacs import phantom
from latentpacs.cli import EXIT_ERROR, main
from latentpacs.codec import learned, streams
from latentpacs.codec.streams import JpegLsCoder
from latentpacs.evaluate import coders, plots
from latentpacs.evaluate.metrics import breast_mask

NEARS = (0, 1, 2, 4)
CLASSICAL = ("jpeg-xl-e7", "jpeg-xl-e9", "jpeg2000", "htj2k")


def _phantom(seed: int, bits: int, dose: float, photometric: str = "MONOCHROME2") -> tuple[np.ndarray, int]:
    spec = phantom.PhantomSpec(192, 160, "CC", "L", bits, photometric, "FOR PRESENTATION", dose=dose)
    canonical = phantom.render_image(spec, np.random.default_rng(seed))
    return phantom._quantise(canonical, spec), int(breast_mask(canonical).sum())


@pytest.fixture(scope="module")
def images() -> list[tuple[str, np.ndarray, int, int]]:
    out = []
    for seed, bits, dose, photometric in ((9100, 12, 500.0, "MONOCHROME2"), (9101, 16, 5000.0, "MONOCHROME1")):
        stored, breast = _phantom(seed, bits, dose, photometric)
        out.append((f"seed{seed}", stored, bits, breast))
    return out


def _expected_stream_coders() -> list[str]:
    """The registered stream coders: JPEG-LS and the learned coder (its model ships in models/)."""
    return ["jpeg-ls", "learned"]


@pytest.fixture(scope="module")
def summary(images: list[tuple[str, np.ndarray, int, int]]) -> dict:
    chosen = coders.default_coders(NEARS)
    measures, failures = [], []
    for name, stored, bits, breast in images:
        found, failed = coders.measure_image(chosen.coders, name, stored, bits, breast)
        measures += found
        failures += failed
    return coders.summarise(measures, failures, chosen.unavailable)


def test_table_has_every_coder_at_every_near(summary: dict) -> None:
    keys = [(r["coder"], r["near"]) for r in summary["rows"]]
    expected = [(name, near) for name in _expected_stream_coders() for near in NEARS]
    assert keys == expected + [(name, 0) for name in CLASSICAL]
    assert summary["failures"] == []
    assert all(r["images"] == 2 and r["failed"] == 0 for r in summary["rows"])
    assert summary["unavailable"] == {}
    table = coders.markdown_table(summary, targets=True)
    for name, near in keys:
        assert f"| {name} | {near} |" in table


def test_lossless_rows_are_exact_and_near_rows_within_near(summary: dict) -> None:
    for row in summary["rows"]:
        assert row["max_abs_error"] <= row["near"]
        if row["near"] == 0:
            assert row["max_abs_error"] == 0
    by_key = {(r["coder"], r["near"]): r for r in summary["rows"]}
    # JPEG-LS really uses its bound: NEAR=2 costs fewer bits than lossless, and its error reaches 2.
    assert by_key["jpeg-ls", 2]["mean_bpp"] < by_key["jpeg-ls", 0]["mean_bpp"]
    assert by_key["jpeg-ls", 2]["max_abs_error"] == 2
    assert by_key["jpeg-ls", 0]["vs_reference_percent"] == 0.0
    assert by_key["jpeg-ls", 0]["ratio_allocated"] == pytest.approx(16 / by_key["jpeg-ls", 0]["mean_bpp"])


def test_bits_are_the_real_streams(images: list[tuple[str, np.ndarray, int, int]]) -> None:
    """bpp is 8 x the codestream's bytes over the pixels, recomputed here with imagecodecs."""
    name, stored, bits, breast = images[0]
    rows = {c.name: c for c in coders.classical_coders()}
    measured = coders.measure(rows["htj2k"], name, stored, bits, breast)
    stream = imagecodecs.htj2k_encode(np.ascontiguousarray(stored), reversible=True)
    assert measured.nbytes == len(stream)
    assert measured.bpp == pytest.approx(8 * len(stream) / stored.size)
    assert measured.breast_bpp == pytest.approx(8 * len(stream) / breast)
    assert np.array_equal(imagecodecs.htj2k_decode(stream), stored)


@dataclass(frozen=True)
class FlippedJpegLs:
    """JPEG-LS whose stream has one bit flipped in its entropy-coded data (a storage fault)."""

    name: str = "jpeg-ls-flipped"
    version: int = 1
    sends_as: tuple[str, str] | None = None

    def encode(self, stored: np.ndarray, bits: int, near: int) -> bytes:
        data = bytearray(JpegLsCoder().encode(stored, bits, near))
        i = len(data) // 2
        while data[i - 1] == 0xFF or data[i] in (0xFF, 0xEF):  # keep the marker structure intact
            i += 1
        data[i] ^= 0x10
        return bytes(data)

    def decode(self, data: bytes) -> np.ndarray:
        return JpegLsCoder().decode(data)

    def precision(self, data: bytes) -> int:
        return JpegLsCoder().precision(data)


@dataclass(frozen=True)
class LooseJpegLs:
    """JPEG-LS that codes with NEAR + 1 when asked for NEAR (a coder that breaks its bound)."""

    name: str = "jpeg-ls-loose"
    version: int = 1
    sends_as: tuple[str, str] | None = None

    def encode(self, stored: np.ndarray, bits: int, near: int) -> bytes:
        return JpegLsCoder().encode(stored, bits, near + 1)

    def decode(self, data: bytes) -> np.ndarray:
        return JpegLsCoder().decode(data)

    def precision(self, data: bytes) -> int:
        return JpegLsCoder().precision(data)


def test_a_corrupted_stream_and_a_broken_bound_are_failures(
    images: list[tuple[str, np.ndarray, int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(streams.CODERS, "jpeg-ls-flipped", FlippedJpegLs())
    monkeypatch.setitem(streams.CODERS, "jpeg-ls-loose", LooseJpegLs())
    rows, _ = coders.stream_coders((0, 2))
    name, stored, bits, breast = images[0]
    measures, failures = coders.measure_image(rows, name, stored, bits, breast)
    failed = {(f.coder, f.near): f.reason for f in failures}
    assert set(failed) == {("jpeg-ls-flipped", 0), ("jpeg-ls-flipped", 2), ("jpeg-ls-loose", 0), ("jpeg-ls-loose", 2)}
    assert "is not bit-exact" in failed["jpeg-ls-loose", 0]
    assert "is not within NEAR=2: a value is 3 away" in failed["jpeg-ls-loose", 2]
    assert {m.coder for m in measures} == {"jpeg-ls", "learned"}
    summary = coders.summarise(measures, failures)
    by_key = {(r["coder"], r["near"]): r for r in summary["rows"]}
    assert by_key["jpeg-ls-loose", 0]["failed"] == 1 and "mean_bpp" not in by_key["jpeg-ls-loose", 0]
    table = coders.markdown_table(summary)
    assert "| jpeg-ls-flipped | 0 | FAILED |" in table and "| jpeg-ls-loose | 2 | FAILED |" in table
    with pytest.raises(coders.CoderVerificationError):
        loose = next(r for r in rows if (r.name, r.near) == ("jpeg-ls-loose", 2))
        coders.measure(loose, name, stored, bits)


@dataclass(frozen=True)
class LearnedWithoutModel:
    """The learned coder pointed at a models directory that holds no coder model."""

    models_dir: Path
    name: str = "learned-without-model"
    version: int = 1
    sends_as: tuple[str, str] | None = None

    def encode(self, stored: np.ndarray, bits: int, near: int) -> bytes:
        return learned.encode_stream(stored, bits, near, learned.load_coder_model(models_dir=self.models_dir))

    def decode(self, data: bytes) -> np.ndarray:
        return learned.decode_stream(data)

    def precision(self, data: bytes) -> int:
        return learned.stream_precision(data)


def test_a_coder_whose_model_is_missing_is_named_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(streams.CODERS, "learned-without-model", LearnedWithoutModel(tmp_path))
    rows, unavailable = coders.stream_coders((0,))
    assert [(r.name, r.near) for r in rows] == [("jpeg-ls", 0), ("learned", 0)]
    assert list(unavailable) == ["learned-without-model"]
    assert str(tmp_path / "coder.safetensors") in unavailable["learned-without-model"]
    table = coders.markdown_table(coders.summarise([], [], unavailable))
    assert "learned-without-model: not measured (cannot read coder model" in table


@pytest.fixture(scope="module")
def dicom_data(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.generate(tmp_path_factory.mktemp("coders-data"), 2, 9200, size=(192, 160), dose=1500.0)


@pytest.fixture(scope="module")
def evaluated(dicom_data: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, str]:
    """``latentpacs evaluate --coders`` with a corrupting coder registered beside the real ones:
    (output folder, exit status, stdout, stderr)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("coders-eval")
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.setitem(streams.CODERS, "jpeg-ls-flipped", FlippedJpegLs())
        status = main(["evaluate", "--data", str(dicom_data[0].parents[2]), "--out", str(out), "--model", "ae",
                       "--tiers", "--no-dicom", "--previews", "1", "--coders"])
    return out, status, stdout.getvalue(), stderr.getvalue()


def test_evaluate_reports_the_coder_table_when_asked(evaluated: tuple[Path, int, str, str]) -> None:
    out, _, printed, _ = evaluated
    summary = json.loads((out / "summary.json").read_text())["coders"]
    keys = [(r["coder"], r["near"]) for r in summary["rows"] if r["coder"] != "jpeg-ls-flipped"]
    assert keys == [(n, k) for n in _expected_stream_coders() for k in NEARS] + [(n, 0) for n in CLASSICAL]
    assert all(r["images"] == 2 and r["failed"] == 0 for r in summary["rows"] if r["coder"] != "jpeg-ls-flipped")
    page = (out / "report.html").read_text()
    assert 'id="lossless-coders"' in page and "<td>htj2k</td>" in page and "<td>jpeg-xl-e9</td>" in page
    figure = out / "figures" / "lossless-coders.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f'alt="{html.escape(plots.CODER_FIGURE[1])}"' in page
    assert "| jpeg-ls | 2 |" in printed


def test_evaluate_names_a_failing_coder_and_exits_with_an_error(evaluated: tuple[Path, int, str, str]) -> None:
    out, status, _, errors = evaluated
    assert status == EXIT_ERROR
    assert "jpeg-ls-flipped NEAR=0 failed verification" in errors
    summary = json.loads((out / "summary.json").read_text())["coders"]
    assert {(f["coder"], f["near"]) for f in summary["failures"]} == {("jpeg-ls-flipped", k) for k in NEARS}
    page = (out / "report.html").read_text()
    assert "Verification failures" in page and "FAILED on 2" in page

