"""The learned stream coder: exact round trips, the NEAR bound, determinism, refusals, training.

Issue 13. Streams are coded with the shipped coder model (src/latentpacs/models/coder) on
physical phantoms of seeds and doses it was not trained on, and on synthetic edge cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from latentpacs import phantom
from latentpacs.codec import learned
from latentpacs.codec.engine import Engine
from latentpacs.codec.modelfile import load_model
from latentpacs.codec.streams import get_coder
from latentpacs.codec.tiers import Tier
from latentpacs.errors import ModelError, PixelChecksumError, PixelDataError
from latentpacs.image import chain
from latentpacs.image.pixels import pixel_cells

ROOT = Path(__file__).resolve().parents[1]


def _phantom(seed: int, bits: int, size: tuple[int, int] = (160, 128), dose: float = 1500.0,
             photometric: str = "MONOCHROME2") -> np.ndarray:
    spec = phantom.PhantomSpec(size[0], size[1], "CC", "R", bits, photometric, "FOR PRESENTATION",
                               dose=dose)
    return phantom._quantise(phantom.render_image(spec, np.random.default_rng(seed)), spec)


def _round_trip(values: np.ndarray, bits: int, near: int = 0) -> tuple[np.ndarray, bytes]:
    data = learned.encode_stream(values, bits, near)
    return learned.decode_stream(data), data


@pytest.mark.parametrize("bits", [12, 14, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_physical_phantoms_round_trip_bit_exact(bits: int, photometric: str) -> None:
    values = _phantom(9100 + bits, bits, photometric=photometric)
    back, data = _round_trip(values, bits)
    assert back.dtype == np.uint16 and back.shape == values.shape
    assert np.array_equal(back, values)
    assert len(data) < values.nbytes  # it compresses
    assert learned.stream_model(data) == learned.load_coder_model().sha256
    assert learned.stream_precision(data) == bits


@pytest.mark.parametrize("bits", [1, 2, 8, 9, 10, 11, 13, 15])
def test_every_bit_depth_round_trips(bits: int) -> None:
    rng = np.random.default_rng(bits)
    top = (1 << bits) - 1
    smooth = np.add.outer(np.linspace(0, top, 37), np.linspace(0, top / 3, 23)) / 1.4
    values = np.clip(np.rint(smooth + rng.normal(0, max(1, top / 40), smooth.shape)), 0, top)
    values = values.astype(np.uint16)
    back, _ = _round_trip(values, bits)
    assert np.array_equal(back, values)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (2, 2), (3, 5), (33, 17), (17, 33)])
def test_odd_and_tiny_sizes_round_trip(shape: tuple[int, int]) -> None:
    values = np.random.default_rng(sum(shape)).integers(0, 4096, shape).astype(np.uint16)
    back, _ = _round_trip(values, 12)
    assert np.array_equal(back, values)


@pytest.mark.parametrize("fill", [0, 1, 4095])
def test_flat_images_cost_almost_nothing(fill: int) -> None:
    values = np.full((256, 208), fill, dtype=np.uint16)
    back, data = _round_trip(values, 12)
    assert np.array_equal(back, values)
    assert len(data) < 1024  # 53 248 pixels: the first column and the header dominate


def test_garbage_above_high_bit_survives_the_image_chain(phantom_dir: Path) -> None:
    path = sorted(phantom_dir.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    cells = ds.pixel_array.astype(np.uint16)
    garbage = cells | np.uint16(0xA000 & ~((1 << int(ds.BitsStored)) - 1) & 0xFFFF)
    ds.PixelData = garbage.tobytes()
    engine = Engine(load_model("ae"))
    try:
        (record,) = chain.encode([ds], engine, Tier("lossless"), coder="learned")
        assert record.stream_coder == "learned" and record.stream_coder_version == learned.FORMAT_VERSION
        returned = chain.returned(record, engine)
    finally:
        engine.close()
    back, _ = pixel_cells(returned)
    assert np.array_equal(back, garbage)  # every bit as sent, the unused ones included


@pytest.mark.parametrize("near", [1, 2, 3, 4, 7])
def test_near_lossless_keeps_every_pixel_within_near(near: int) -> None:
    values = _phantom(9200 + near, 14, dose=500.0)
    back, data = _round_trip(values, 14, near)
    error = np.abs(back.astype(np.int64) - values.astype(np.int64))
    assert int(error.max()) <= near
    assert int(error.max()) == near  # the bound is used, not just respected
    exact = learned.encode_stream(values, 14, 0)
    assert len(data) < len(exact)


def test_near_lossless_bound_holds_at_the_range_ends() -> None:
    values = np.zeros((64, 48), dtype=np.uint16)
    values[::2] = 4095
    values[:, ::3] = 1
    back, _ = _round_trip(values, 12, 5)
    assert int(np.abs(back.astype(np.int64) - values.astype(np.int64)).max()) <= 5
    assert back.max() <= 4095


def test_stream_coder_registry_serves_the_learned_coder() -> None:
    coder = get_coder("learned", learned.FORMAT_VERSION)
    assert coder.sends_as is None  # no DICOM transfer syntax carries it: decoded before sending
    values = _phantom(9301, 12, size=(64, 52))
    assert np.array_equal(coder.decode(coder.encode(values, 12, 0)), values)


_DETERMINISM = """
import hashlib, sys, numpy as np
from latentpacs import phantom
from latentpacs.codec import learned
spec = phantom.PhantomSpec(192, 160, "MLO", "L", 16, "MONOCHROME1", "FOR PRESENTATION", dose=700.0)
values = phantom._quantise(phantom.render_image(spec, np.random.default_rng(9401)), spec)
if sys.argv[1] == "encode":
    sys.stdout.write(" ".join(learned.encode_stream(values, 16, near).hex() for near in (0, 2)))
else:
    streams = [bytes.fromhex(text) for text in sys.stdin.read().split()]
    sys.stdout.write(" ".join(hashlib.sha256(learned.decode_stream(d).tobytes()).hexdigest()
                              for d in streams))
"""


def _run(threads: int, *args: str, stdin: str = "") -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", _DETERMINISM, *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    return done.stdout


def test_streams_are_identical_across_processes_and_thread_counts() -> None:
    import hashlib

    one = _run(1, "encode")
    two = _run(2, "encode")
    assert one == two
    spec = phantom.PhantomSpec(192, 160, "MLO", "L", 16, "MONOCHROME1", "FOR PRESENTATION", dose=700.0)
    values = phantom._quantise(phantom.render_image(spec, np.random.default_rng(9401)), spec)
    here = [learned.encode_stream(values, 16, near) for near in (0, 2)]
    assert " ".join(d.hex() for d in here) == one  # lossless and NEAR=2
    decoded_elsewhere = _run(2, "decode", stdin=one)
    assert decoded_elsewhere == " ".join(hashlib.sha256(learned.decode_stream(d).tobytes()).hexdigest()
                                         for d in here)


def test_corrupt_truncated_and_foreign_streams_are_refused() -> None:
    values = _phantom(9501, 12, size=(96, 80))
    data = bytearray(learned.encode_stream(values, 12, 0))
    flipped = bytearray(data)
    flipped[-5] ^= 0x40
    with pytest.raises(PixelDataError, match="corrupt"):
        learned.decode_stream(bytes(flipped))
    with pytest.raises(PixelDataError, match="truncated|payload"):
        learned.decode_stream(bytes(data[:-8]))
    with pytest.raises(PixelDataError, match="magic"):
        learned.decode_stream(b"JPLS" + bytes(data[4:]))
    with pytest.raises(PixelDataError, match="truncated"):
        learned.decode_stream(bytes(data[:10]))
    huge = bytearray(data)
    huge[6:14] = (1 << 20).to_bytes(4, "little") * 2  # claims 2**40 pixels: refused before allocating
    with pytest.raises(PixelDataError, match="exceeds"):
        learned.decode_stream(bytes(huge))
    other_model = bytearray(data)
    other_model[17:49] = bytes(32)  # the model SHA-256 field: names a model no directory holds
    with pytest.raises(ModelError, match="no model"):
        learned.decode_stream(bytes(other_model))


def test_out_of_range_input_is_refused() -> None:
    with pytest.raises(PixelDataError, match="exceed"):
        learned.encode_stream(np.full((4, 4), 5000, dtype=np.uint16), 12, 0)
    with pytest.raises(PixelDataError, match="NEAR"):
        learned.encode_stream(np.zeros((4, 4), dtype=np.uint16), 2, 2)
    with pytest.raises(PixelDataError, match="Bits Stored"):
        learned.encode_stream(np.zeros((4, 4), dtype=np.uint16), 17, 0)


def test_a_decoder_that_went_wrong_is_caught_by_the_values_hash() -> None:
    values = _phantom(9601, 12, size=(64, 52))
    data = learned.encode_stream(values, 12, 0)
    model = learned.load_coder_model()
    wrong = learned.CoderModel(model.sha256, model.layers, [c.copy() for c in model.cdf])
    wrong.cdf[learned.SCALE_CLASSES] = np.cumsum(np.r_[0, np.ones(wrong.cdf[learned.SCALE_CLASSES].size - 1,
                                                                   dtype=np.int64)])
    with pytest.raises((PixelChecksumError, PixelDataError)):
        learned.decode_stream(data, wrong)


def _train_coder(data: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "latentpacs.cli", "train-coder", "--data", str(data),
                           "--samples", "20000", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_train_coder_writes_a_card_resumes_after_sigkill_and_retires(tmp_path: Path) -> None:
    import signal

    import torch

    data = tmp_path / "data"
    phantom.generate(data, 6, seed=77, size=(128, 104), images_per_study=1, studies_per_patient=1,
                     dose=1000.0)
    out = tmp_path / "models" / "mycoder"
    done = _train_coder(data, out, "--epochs", "6")
    assert done.returncode == 0, done.stderr[-2000:]
    card = json.loads((out.parent / "mycoder.json").read_text())
    assert card["arch"] == learned.ARCH
    assert card["training"]["command"].startswith("latentpacs train-coder")
    assert card["training"]["validation_patients"] >= 1
    assert card["metrics"]["bpp_near0"] > 0 and card["metrics"]["jpegls_bpp_near0"] > 0
    model = learned.load_coder_model(out.with_suffix(".safetensors"), expected_sha256=card["sha256"])
    values = _phantom(9701, 14, size=(96, 80))
    assert np.array_equal(learned.decode_stream(learned.encode_stream(values, 14, 0, model), model), values)

    # the same run, SIGKILLed while its first network trains, then resumed: the same model
    other = tmp_path / "other" / "mycoder"
    checkpoint = other.with_name("mycoder.coder-checkpoint.pt")
    process = subprocess.Popen([sys.executable, "-m", "latentpacs.cli", "train-coder", "--data", str(data),
                                "--samples", "20000", "--epochs", "6", "--out", str(other)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None:
            if checkpoint.is_file():
                current = torch.load(checkpoint, weights_only=True).get("current") or {}
                if current.get("group") == "E" and current.get("epoch", 0) >= 2:
                    process.send_signal(signal.SIGKILL)
                    break
        assert process.wait(timeout=600) == -signal.SIGKILL, "the run ended before the trigger"
    finally:
        if process.poll() is None:
            process.kill()
    assert not other.with_suffix(".safetensors").exists()
    resumed = _train_coder(data, other, "--epochs", "6", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(other.with_suffix(".json").read_text())["sha256"] == card["sha256"]

    # a resume with other settings is refused; retraining under the name retires the model
    from latentpacs.errors import ConfigError
    from latentpacs.train.coder import CoderTrainConfig, save_coder_model, train_coder

    images = [(_phantom(9800 + k, 12, size=(64, 52)), 12) for k in range(2)]
    with pytest.raises(ConfigError, match="epochs"):
        train_coder(images, [], CoderTrainConfig(out=other, epochs=7, checkpoint=checkpoint, resume=True),
                    progress=False)
    smaller, _ = train_coder(images, [], CoderTrainConfig(out=out, epochs=1, samples_per_pass=500),
                             progress=False)
    _, new_card = save_coder_model(smaller, out.parent, "mycoder", description="test", training={},
                                   metrics={})
    assert new_card.sha256 != card["sha256"]
    retired = list((out.parent / "retired").glob("mycoder-*.safetensors"))
    assert len(retired) == 1  # the replaced model is kept, never deleted
    assert learned.load_coder_model(retired[0]).sha256 == card["sha256"]


def test_train_coder_without_images_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    done = subprocess.run([sys.executable, "-m", "latentpacs.cli", "train-coder", "--data",
                           str(tmp_path / "empty"), "--out", str(tmp_path / "m" / "x")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0
    assert "no trainable DICOM images" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
