"""Integer-valued decoding: one latent, one image, on any batch, thread, process or device.

Guarantee "One derived UID, one content" (DESIGN.md): the pixels a derived SOP Instance
UID carries are an exact function of the latent and the model. Fresh phantoms use a seed
the shipped models never saw (their cards name the training command: seed 1).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from latentpacs.codec.engine import Engine, integer_plan, resize_bilinear
from latentpacs.codec.integer import (
    EXACT_LIMIT,
    RESIZE_BLOCK_ROWS,
    RESIZE_FRAC_BITS,
    IntegerDecoder,
    build_integer_decoder,
    resize_uint16,
    sigmoid_table,
    to_canonical,
)
from latentpacs.codec.integer import _axis_weights, transposed_sums
from latentpacs.codec.latent import LatentFormat, calibrate
from latentpacs.codec.modelfile import LoadedModel, load_model, save_model
from latentpacs.codec.models import build_model
from latentpacs.errors import ModelError
from latentpacs.phantom import PhantomSpec, render_image
from latentpacs.image.pixels import PixelModule, canonical_to_stored

FRESH_SEED = 515151
ODD_SHAPE = (1100, 873)  # neither side a multiple of the model's 1024

#: Decode latents given as hex on the command line and print SHA-256s of the 16-bit
#: images and of the canonical float32 images (run in a separate process).
DECODE_SCRIPT = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from latentpacs.codec.engine import Engine
from latentpacs.codec.modelfile import load_model
latents = [bytes.fromhex(h) for h in sys.argv[4:]]
shape = (int(sys.argv[2]), int(sys.argv[3]))
with Engine(load_model("ae"), device="cpu", max_batch=len(latents)) as engine:
    images = engine.decode_uint16(latents, [shape] * len(latents))
    canonical = engine.decode(latents, [shape] * len(latents))
print(hashlib.sha256(b"".join(i.tobytes() for i in images)).hexdigest())
print(hashlib.sha256(b"".join(c.tobytes() for c in canonical)).hexdigest())
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A small untrained model with non-trivial BatchNorm statistics."""
    directory = tmp_path_factory.mktemp("models")
    torch.manual_seed(3)
    model = build_model("ae", image_size=128)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            mean, var = module.running_mean, module.running_var
            if mean is None or var is None:
                raise AssertionError("BatchNorm without running statistics")
            with torch.no_grad():
                mean.uniform_(-0.2, 0.2)
                var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    model.eval()
    with torch.no_grad():
        calibrate(model, model.encode(torch.rand(8, 1, 128, 128)).numpy())
    save_model(model, directory, "tiny", description="integer test", training={}, metrics={})
    return load_model("tiny", models_dir=directory)


@pytest.fixture(scope="module")
def shipped_ae() -> LoadedModel:
    return load_model("ae")


def _phantom(seed: int, rows: int = 1024, cols: int = 832) -> np.ndarray:
    spec = PhantomSpec(rows, cols, "MLO", "L", 12, "MONOCHROME2", "FOR PROCESSING")
    return render_image(spec, np.random.default_rng(seed))


def _latents(loaded: LoadedModel, count: int) -> list[bytes]:
    """Deterministic latents spread over the quantisation range."""
    fmt = loaded.latent_format
    rng = np.random.default_rng(11)
    levels = 1 << fmt.bits
    out = []
    for _ in range(count):
        index = rng.integers(levels // 8, levels - levels // 8, size=fmt.latent_dim)
        out.append(fmt.to_bytes(np.asarray(fmt.low) + (index + 0.5) * fmt.step))
    return out


def _digest(images: list[np.ndarray]) -> str:
    return hashlib.sha256(b"".join(image.tobytes() for image in images)).hexdigest()


def test_batch_size_and_concurrent_callers_do_not_change_a_pixel(tiny: LoadedModel) -> None:
    latents = _latents(tiny, 8)
    shapes = [(150, 97), (128, 128), (40, 300), (257, 64)] * 2
    with Engine(tiny, device="cpu", max_batch=1) as engine:
        one_by_one = engine.decode_uint16(latents, shapes)
        assert engine.batches_run == 8
    with Engine(tiny, device="cpu", max_batch=8) as engine:
        together = engine.decode_uint16(latents, shapes)
        assert engine.batches_run == 1
        concurrent: list[np.ndarray | None] = [None] * 8

        def call(i: int) -> None:
            (concurrent[i],) = engine.decode_uint16([latents[i]], [shapes[i]])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        with engine.hold():
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 60.0  # a hang guard; the outcome never depends on it
            while engine.pending < 8 and time.monotonic() < deadline:  # all eight queued
                time.sleep(0.001)
            assert engine.pending == 8 and engine.batches_run == 1
        for thread in threads:
            thread.join(timeout=60)
        assert engine.batches_run == 2  # the eight concurrent calls ran as one batch
    assert len({_digest([image]) for image in one_by_one}) == 8  # the latents differ
    for a, b, c in zip(one_by_one, together, concurrent):
        assert a.dtype == np.uint16 and c is not None
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_thread_count_and_device_do_not_change_a_pixel(tiny: LoadedModel) -> None:
    """One and two torch threads on the CPU, and CUDA when this machine has it."""
    plan = integer_plan(tiny)
    fmt = tiny.latent_format
    codes = np.stack([fmt.indices_from_bytes(z) for z in _latents(tiny, 8)])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = IntegerDecoder(plan, "cpu").decode_indices(codes)
        torch.set_num_threads(2)
        double = IntegerDecoder(plan, "cpu").decode_indices(codes)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(single, double)
    assert single.shape == (8, 128, 128) and len(np.unique(single)) > 100
    if torch.cuda.is_available():
        on_gpu = IntegerDecoder(plan, "cuda").decode_indices(codes)
        np.testing.assert_array_equal(single, on_gpu)
        latents = _latents(tiny, 8)
        with Engine(tiny, device="cuda", max_batch=8) as gpu, Engine(tiny, device="cpu") as cpu:
            shapes = [(333, 250)] * 8
            assert _digest(gpu.decode(latents, shapes)) == _digest(cpu.decode(latents, shapes))


def test_two_processes_with_one_and_two_threads_decode_the_same_bytes(
    shipped_ae: LoadedModel,
) -> None:
    latents = _latents(shipped_ae, 2)
    args = [str(ODD_SHAPE[0]), str(ODD_SHAPE[1])] + [z.hex() for z in latents]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DECODE_SCRIPT, threads, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for threads in ("1", "2")
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outputs.append(out.split())
    with Engine(shipped_ae, device="cpu", max_batch=1) as engine:
        images = engine.decode_uint16(latents, [ODD_SHAPE] * 2)
        canonical = engine.decode(latents, [ODD_SHAPE] * 2)
    assert outputs[0] == outputs[1] == [_digest(images), _digest(canonical)]


def test_two_engines_give_identical_stored_pixels(shipped_ae: LoadedModel) -> None:
    (latent,) = _latents(shipped_ae, 1)
    module = PixelModule(2294, 1914, 16, 12, 11, "MONOCHROME1")
    stored = []
    for max_batch in (1, 8):
        with Engine(shipped_ae, device="cpu", max_batch=max_batch) as engine:
            (image,) = engine.decode([latent], [(module.rows, module.columns)])
            stored.append(canonical_to_stored(image, module))
    np.testing.assert_array_equal(stored[0], stored[1])
    assert stored[0].dtype == np.uint16 and int(stored[0].max()) <= 4095
    assert len(np.unique(stored[0])) > 500


def test_building_twice_gives_the_same_integers(tiny: LoadedModel) -> None:
    first = build_integer_decoder(tiny.model, tiny.latent_format)
    second = build_integer_decoder(tiny.model, tiny.latent_format)
    assert [layer.out_frac for layer in first.layers] == [layer.out_frac for layer in second.layers]
    for a, b in zip(first.layers, second.layers):
        np.testing.assert_array_equal(a.weight, b.weight)
        np.testing.assert_array_equal(a.bias, b.bias)
        np.testing.assert_array_equal(a.shift, b.shift)
        assert a.accumulator_bound < EXACT_LIMIT
        assert np.all(a.weight == np.rint(a.weight)) and np.all(a.bias == np.rint(a.bias))


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_integer_decoding_stays_close_to_the_float_model(name: str) -> None:
    """The integer-vs-float difference is under 1 % of the model's own error."""
    loaded = load_model(name)
    images = [_phantom(FRESH_SEED + i) for i in range(3)]
    fmt = loaded.latent_format
    with Engine(loaded, device="cpu") as engine:
        latents = engine.encode(images)
        integer = engine.decode(latents, [image.shape for image in images])
    z = torch.from_numpy(np.stack([fmt.from_bytes(latent) for latent in latents]))
    with torch.inference_mode():
        floats = loaded.model.cpu().decode(z)[:, 0].numpy()
    differences, errors = [], []
    for image, exact, model_size in zip(images, integer, floats):
        reference = np.clip(resize_bilinear(model_size, image.shape), 0.0, 1.0)
        differences.append(float(np.mean((exact - reference) ** 2)))
        errors.append(float(np.mean((image - reference) ** 2)))
    assert max(differences) < 0.01 * min(errors), (differences, errors)


def test_an_impossible_layer_is_refused() -> None:
    """A layer whose sums could reach 2**53 cannot be exact in float64."""
    model = build_model("ae", image_size=64).eval()
    fmt = LatentFormat.from_model(model)
    with pytest.raises(ModelError, match="layer 1 .*2\\*\\*53"):  # 2**40 activations
        build_integer_decoder(model, fmt, activation_bits=40)
    build_integer_decoder(model, fmt)  # the same model at the defaults is exact
    wide = nn.ConvTranspose2d(64, 1, 32, 32)  # 2**16 weights of 3/4 full scale per channel
    with torch.no_grad():
        wide.weight.fill_(0.75)
    model.head = nn.Sequential(wide)
    with pytest.raises(ModelError, match="layer 1 .*2\\*\\*53"):
        build_integer_decoder(model, fmt)
    model.head = nn.Sequential(nn.ConvTranspose2d(64, 1, 4, 4), nn.Sigmoid())
    with pytest.raises(ModelError, match="Sigmoid"):
        build_integer_decoder(model, fmt)


def test_sigmoid_table_and_integer_resize() -> None:
    table = sigmoid_table()
    limit = (len(table) - 1) // 2
    assert table[0] == 0 and table[limit] == 32768 and table[-1] == 65535
    assert np.all(np.diff(table.astype(np.int64)) >= 0)
    np.testing.assert_array_equal(table[limit + 1 :].astype(np.int64) + table[limit - 1 :: -1], 65535)
    x = np.arange(-limit, limit + 1) / 1024.0
    assert np.max(np.abs(table / 65535.0 - 1 / (1 + np.exp(-x)))) <= 0.5 / 65535 + 1e-12

    constant = np.full((64, 64), 40000, np.uint16)
    for shape in ((100, 77), (5, 5), (64, 200)):
        np.testing.assert_array_equal(resize_uint16(constant, shape), 40000)
    ramp = (np.arange(128, dtype=np.float64)[None, :] * 500).repeat(8, 0).astype(np.uint16)
    for shape in ((8, 300), (8, 50)):
        got = resize_uint16(ramp, shape).astype(np.float64)
        want = resize_bilinear(ramp.astype(np.float32), shape).astype(np.float64)
        assert np.max(np.abs(got - want)) <= 2.0  # the float kernel, to rounding
        assert np.all(np.diff(got[0]) > 0)
    image = np.arange(30 * 20, dtype=np.uint16).reshape(30, 20) * 100
    assert to_canonical(resize_uint16(image, image.shape)).tobytes() == to_canonical(image).tobytes()
    assert to_canonical(np.array([0, 65535], np.uint16)).tolist() == [0.0, 1.0]


#: (input, weight, stride, padding, output_padding): the shipped decoders' 4/2/1 and 4/4/0
#: layers, the paper family's 3/1/1, and odd geometries (uneven strides, a kernel smaller
#: than its stride, output padding, phases of unequal length).
TRANSPOSED_GEOMETRIES = [
    ((1, 64, 16, 16), (64, 64, 4, 4), (2, 2), (1, 1), (0, 0)),
    ((2, 32, 20, 12), (32, 16, 4, 4), (2, 2), (1, 1), (0, 0)),
    ((1, 16, 24, 24), (16, 1, 4, 4), (4, 4), (0, 0), (0, 0)),
    ((2, 8, 5, 7), (8, 3, 2, 3), (2, 3), (0, 0), (0, 0)),
    ((2, 32, 9, 11), (32, 1, 3, 3), (1, 1), (1, 1), (0, 0)),
    ((3, 5, 7, 9), (5, 4, 5, 3), (3, 2), (2, 1), (1, 1)),
    ((2, 4, 6, 5), (4, 3, 2, 2), (3, 3), (0, 0), (2, 1)),
    ((1, 3, 4, 4), (3, 2, 7, 7), (3, 3), (4, 2), (2, 0)),
]


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "stride", "padding", "out_pad"), TRANSPOSED_GEOMETRIES
)
def test_the_fast_transposed_convolutions_give_torch_s_exact_sums(
    x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: tuple[int, int],
    padding: tuple[int, int], out_pad: tuple[int, int],
) -> None:
    """Full-scale integers (20-bit activations, 18-bit weights): every sum is exact, so
    the patch and per-phase matrix products must equal torch's im2col / col2im kernel
    bit for bit."""
    g = torch.Generator().manual_seed(sum(x_shape) + sum(w_shape))
    x = torch.randint(-(2**20), 2**20 + 1, x_shape, generator=g).double()
    w = torch.randint(-(2**18), 2**18 + 1, w_shape, generator=g).double()
    want = torch.nn.functional.conv_transpose2d(x, w, None, stride, padding, out_pad)
    got = transposed_sums(w, stride, padding, out_pad, (1, 1))(x)
    assert got.shape == want.shape
    assert torch.equal(got, want)
    assert float(want.abs().max()) > 2.0**36  # the sums are far beyond float32's 2**24


def _dense_resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Reference: each pass as a dense int64 matrix product, rounded half up."""
    values = image.astype(np.int64)
    half = 1 << (RESIZE_FRAC_BITS - 1)
    for axis, size in enumerate(shape):
        if values.shape[axis] == size:
            continue
        taps, weights = _axis_weights(values.shape[axis], size)
        matrix = np.zeros((size, values.shape[axis]), np.int64)
        for t in range(taps.shape[1]):
            np.add.at(matrix, (np.arange(size), taps[:, t]), weights[:, t])
        values = matrix @ values if axis == 0 else values @ matrix.T
        values = (values + half) >> RESIZE_FRAC_BITS
    return values.astype(np.uint16)


def test_the_blocked_integer_resize_equals_the_dense_formula() -> None:
    """Enlarging, shrinking and keeping each axis, across block boundaries."""
    rng = np.random.default_rng(7)
    image = rng.integers(0, 65536, (64, 48)).astype(np.uint16)
    image[:8, :8] = 65535  # full-scale corner: the int32 sums at their largest
    shapes = [
        (150, 97), (30, 20), (64, 100), (RESIZE_BLOCK_ROWS * 3 + 1, 48), (7, 300), (1, 1), (64, 48)
    ]
    for shape in shapes:
        got = resize_uint16(image, shape)
        assert got.dtype == np.uint16 and got.shape == shape
        np.testing.assert_array_equal(got, _dense_resize(image, shape), err_msg=str(shape))


def test_the_canonical_image_is_the_16_bit_image_over_65535(tmp_path: Path) -> None:
    model = build_model("vae", image_size=64).eval()
    save_model(model, tmp_path, "small", description="integer test", training={}, metrics={})
    with Engine(load_model("small", models_dir=tmp_path), device="cpu") as engine:
        latents = [bytes(range(16)), bytes(16)]
        shapes = [(70, 50), (64, 64)]
        canonical = engine.decode(latents, shapes)
        sixteen = engine.decode_uint16(latents, shapes)
    for c, v in zip(canonical, sixteen):
        assert c.dtype == np.float32 and c.shape == v.shape
        np.testing.assert_array_equal(c, v.astype(np.float32) / np.float32(65535))


@pytest.mark.parametrize("arch", ["ae", "vae", "ae-r16", "vae-r16", "paper-ae", "paper-vae"])
def test_every_architecture_decodes_within_one_logit_step_of_float(arch: str) -> None:
    """Error bound: half a logit step (2**-11) times the sigmoid's slope 1/4, plus 16-bit rounding."""
    torch.manual_seed(1)
    model = build_model(arch, image_size=64).eval()
    with torch.no_grad():
        calibrate(model, model.encode(torch.rand(8, 1, 64, 64)).numpy())
    fmt = LatentFormat.from_model(model)
    codes = np.random.default_rng(0).integers(0, 1 << fmt.bits, (4, fmt.latent_dim))
    exact = IntegerDecoder(build_integer_decoder(model, fmt)).decode_indices(codes)
    z = torch.from_numpy((np.asarray(fmt.low) + (codes + 0.5) * fmt.step).astype(np.float32))
    with torch.no_grad():
        floats = model.decode(z)[:, 0].double().numpy()
    assert exact.shape == (4, 64, 64) and exact.dtype == np.uint16
    assert np.max(np.abs(exact / 65535.0 - floats)) < 2.0**-11 / 4 + 1 / 65535


#: SHA-256 of what the shipped models decode a fixed latent to. A derived SOP Instance UID
#: is fixed when an image is stored, so the pixels a latent decodes to must never change
#: for an archived model: a change to the integer decoder or its resize that alters them
#: fails here, on any machine (the arithmetic is exact). Such a change needs a new
#: decoder revision that keeps decoding old latents as before.
GOLDEN = {
    ("ae", (1100, 873)): "c2b84be7a9466421e132ee2b6ace2f8b5e13167983a3fc3d8cf7c0e98afee214",
    ("ae", (700, 600)): "c06e37d3dd80cb39da54bc06f48ba2dc9217d49f37598d33de613215051f9aec",
    ("vae", (1100, 873)): "7683924889b607166b53dc2626452072748cca9564dd226fb9f94f00adc5b6a6",
    ("vae", (700, 600)): "0bbeaf9892d6b12d2a78193c6a7f278830aeea091f0e01a0377c572102850c1b",
    # the detector matrix of the benchmark (an enlargement along both axes); computed
    # with the decoder and resize of commit 827ffe6, before they were made faster
    ("ae", (2294, 1914)): "04ea9ec5c6b92a05f2641f6a4da6bfd9122c27778116d6ddbf7016b74dface7f",
    ("vae", (2294, 1914)): "5ea2b824c0663555f12e52905998bea7c5be35dfb1819fbe28ba1d4749459568",
}


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_a_latent_decodes_to_the_same_pixels_in_every_release(name: str) -> None:
    from latentpacs.codec.modelfile import load_model

    with Engine(load_model(name)) as engine:
        for shape in [shape for model, shape in GOLDEN if model == name]:
            (image,) = engine.decode_uint16([bytes(range(0, 256, 16))], [shape])
            digest = hashlib.sha256(image.astype("<u2").tobytes()).hexdigest()
            assert digest == GOLDEN[(name, shape)], (name, shape)
