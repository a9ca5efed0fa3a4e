"""The batching inference engine: sizes, determinism, shared batches, errors, closing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from latentpacs.codec.engine import Engine, resize_bilinear
from latentpacs.codec.latent import calibrate
from latentpacs.codec.modelfile import LoadedModel, load_model, save_model
from latentpacs.codec.models import build_model
from latentpacs.errors import LatentFormatError, ModelError, UnsupportedImageError
from latentpacs.phantom import PhantomSpec, render_image


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    directory = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = build_model("ae", image_size=64).eval()
    with torch.no_grad():
        calibrate(model, model.encode(torch.rand(8, 1, 64, 64)).numpy())
    save_model(model, directory, "tiny", description="engine test", training={}, metrics={})
    return load_model("tiny", models_dir=directory)


def _image(rows: int, cols: int, seed: int) -> np.ndarray:
    """A canonical phantom mammogram (the phantom needs 32 x 32 at least)."""
    spec = PhantomSpec(max(rows, 32), max(cols, 32), "CC", "R", 14, "MONOCHROME2", "FOR PROCESSING")
    return render_image(spec, np.random.default_rng(seed))[:rows, :cols]


def test_images_of_any_size_round_trip_to_their_own_shape(loaded: LoadedModel) -> None:
    shapes = [(64, 64), (120, 90), (33, 257), (5, 5)]
    images = [_image(r, c, i) for i, (r, c) in enumerate(shapes)]
    with Engine(loaded, device="cpu", max_batch=3) as engine:
        latents = engine.encode(images)
        assert [len(b) for b in latents] == [16] * 4
        decoded = engine.decode(latents, shapes)
        assert engine.images_run == 8 and engine.batches_run >= 4  # 4 images at max_batch 3
    for image, shape in zip(decoded, shapes):
        assert image.shape == shape and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0


def test_engine_matches_the_model_it_wraps(loaded: LoadedModel) -> None:
    image = _image(64, 64, 7)
    with Engine(loaded, device="cpu") as engine:
        z = engine.encode_resized(image[None])
        (latent,) = engine.encode([image])
    with torch.no_grad():
        direct = loaded.model.encode(torch.from_numpy(image)[None, None]).numpy()
    np.testing.assert_allclose(z, direct, rtol=1e-5, atol=1e-6)
    assert latent == loaded.latent_format.to_bytes(direct[0])


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (a hang guard only: the outcome never depends on the time)."""
    deadline = time.monotonic() + 60.0
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached: {what}")
        time.sleep(0.001)


@pytest.mark.parametrize(("max_batch", "batches"), [(8, 1), (3, 3)])
def test_queued_requests_share_batches_of_at_most_max_batch(
    loaded: LoadedModel, max_batch: int, batches: int
) -> None:
    """Eight callers queued behind a held worker run as ceil(8 / max_batch) batches."""
    images = [_image(80 + 8 * i, 70, i) for i in range(8)]
    with Engine(loaded, device="cpu", max_batch=max_batch, max_wait_ms=0.0) as engine:
        alone = [engine.encode([image])[0] for image in images]
        assert engine.batches_run == 8
        results: list[bytes | None] = [None] * 8

        def call(i: int) -> None:
            results[i] = engine.encode([images[i]])[0]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        with engine.hold():
            for thread in threads:
                thread.start()
            wait_until(lambda: engine.pending == 8, "eight queued requests")
            assert engine.batches_run == 8  # held: nothing ran yet
        for thread in threads:
            thread.join(timeout=60)
        assert engine.batches_run - 8 == batches
        assert engine.images_run == 16
        assert engine.pending == 0
    assert results == alone


def test_bad_input_fails_the_caller_not_the_engine(loaded: LoadedModel) -> None:
    with Engine(loaded, device="cpu") as engine:
        with pytest.raises(UnsupportedImageError, match="2-D"):
            engine.encode([np.zeros((2, 8, 8), np.float32)])
        with pytest.raises(LatentFormatError, match="needs 16"):
            engine.decode([b"\x00" * 3], [(10, 10)])
        with pytest.raises(LatentFormatError, match="shapes"):
            engine.decode([b"\x00" * 16], [])
        assert len(engine.decode([b"\x80" * 16], [(20, 30)])[0]) == 20


def test_a_failing_batch_reaches_every_caller_and_the_worker_lives_on(
    loaded: LoadedModel,
) -> None:
    with Engine(loaded, device="cpu") as engine:
        wrong = np.zeros((2, 64 * 64), np.float32)  # bypasses the caller checks on purpose
        with pytest.raises(LatentFormatError, match="indices"):
            engine._submit("decode", wrong)
        assert len(engine.encode([_image(64, 64, 1)])) == 1


def test_closed_engine_refuses_work(loaded: LoadedModel) -> None:
    with pytest.raises(ModelError, match="device"):
        Engine(loaded, device="tpu-of-dreams")
    engine = Engine(loaded, device="cpu")
    engine.close()
    engine.close()
    with pytest.raises(ModelError, match="closed"):
        engine.encode([_image(64, 64, 0)])


def test_resize_is_bilinear_and_keeps_constant_images() -> None:
    constant = np.full((50, 70), 0.25, np.float32)
    np.testing.assert_allclose(resize_bilinear(constant, (64, 64)), 0.25, atol=1e-6)
    ramp = np.tile(np.linspace(0, 1, 128, dtype=np.float32), (4, 1))
    half = resize_bilinear(ramp, (4, 64))
    assert half.shape == (4, 64) and np.all(np.diff(half[0]) > 0)
    np.testing.assert_array_equal(resize_bilinear(ramp, ramp.shape), ramp)


#: Frees 192 MiB of 64 KiB heap blocks (below glibc's mmap threshold, so they stay in the
#: heap behind a block still in use) and prints VmRSS in KiB before and after
#: release_free_memory().
TRIM_SCRIPT = """
from latentpacs.codec.engine import release_free_memory
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
blocks = [bytearray(b"x" * 65536) for _ in range(3072)]
sentinel = bytearray(b"y" * 65536)
del blocks
before = rss()
release_free_memory()
print(before, rss(), len(sentinel))
"""


def test_free_heap_pages_go_back_to_the_system() -> None:
    """What the calibration pass frees leaves the process (glibc keeps it otherwise)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", TRIM_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    before, after, _ = (int(n) for n in result.stdout.split())
    assert before - after > 100 * 1024, (before, after)
