"""The learned lossless and near-lossless stream coder (``codec.coder = "learned"``).

A small integer network predicts, for every pixel, a discrete distribution of its stored
value from pixels already decoded, and a range coder (constriction) codes the values.

Order
    Two interleaved subimages, each coded column by column: first the even rows (their
    first column as it is, then each column from the even rows' earlier columns), then
    the odd rows (each column from all even rows and the odd rows' earlier columns). Every
    pixel of one column of one subimage depends only on pixels coded before, so a column
    is predicted and coded as one vectorised batch, never a pixel at a time. Unlike a
    coarse-to-fine pyramid, every pixel keeps neighbours at distance 1, which the
    correlated noise of a blurring detector makes worth keeping (see the README).
Prediction
    For every pixel, the context is the differences of its neighbours to the mean of the
    four nearest (the anchor), in quarter units of a 12-bit scale, plus the anchor's level
    (9 bits; the noise of a log-transformed X-ray image grows with attenuation). One small
    network per subimage, a least-squares linear predictor of the mean plus a non-linear
    correction (two hidden layers), maps it to a mean and one of
    :data:`SCALE_CLASSES` scale classes. A pixel whose context is flat (air, flat images)
    is predicted as the anchor in a class of its own, without the network.
Distributions
    Each class has a cumulative histogram of residuals (12-bit units; the flat class's in
    units of the image, since a flat context repeats exact values) fitted in training.
    For a given bit depth and NEAR, the probability of each (quantised) residual is the
    histogram's mass over that residual's interval, by exact integer interpolation; a
    residual outside the histogram is an escape symbol followed by its value, uniformly.
Near-lossless (NEAR = K > 0)
    Residuals are quantised with step 2K + 1 and the prediction of later pixels uses the
    reconstructed values, so every pixel is within K of the original, guaranteed.
Determinism
    Encoder and decoder must compute identical distributions on every machine. Every
    quantity is an integer: weights and biases are integers, activations are floored and
    clipped integers, and the products and sums are computed in float64, where they are
    exact because every partial sum is an integer below 2**53 (bounded by
    :data:`MAX_INPUT`, the weight bound and the fan-in), so no summation order, thread
    count, BLAS kernel or device can change them. The tables are integer arithmetic. The
    range coder gets the same float64 probabilities on both sides.

A stream names the coder model by SHA-256 (models are only ever retired, never deleted:
:mod:`latentpacs.codec.modelfile`), carries the SHA-256 of its payload, so a corrupted
stream is refused before decoding, and of the values, so a decoder that went wrong is
caught. Decoding needs numpy, safetensors and constriction only, no training code.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from latentpacs.codec.cards import (
    ModelCard,
    default_models_dir,
    find_model_by_sha256,
    read_card,
    weights_path,
)
from latentpacs.errors import ModelError, PixelChecksumError, PixelDataError

logger = logging.getLogger(__name__)

#: Stream format version (archived as the row's ``stream_coder_version``).
FORMAT_VERSION = 1
#: The model the encoder uses, by name in the models directory.
DEFAULT_MODEL = "coder"
#: Architecture name on the coder model's card.
ARCH = "lossless-coder-v1"
MAGIC = b"LPLC"
#: Scale classes the networks choose from; class ``SCALE_CLASSES`` is the flat context.
SCALE_CLASSES = 48
#: Fractional bits of the weights; hidden activations are clipped to [0, ACTIVATION_MAX].
WEIGHT_SHIFT = 12
ACTIVATION_MAX = 4095
#: Context differences are clipped to +-MAX_INPUT quarter units (of a 12-bit scale).
MAX_INPUT = 8191
MAX_WEIGHT = 1 << 20
#: Escape symbols' probability, relative to a table's total mass.
ESCAPE_SHARE = 1 << 16
#: The largest image a stream may code or claim (a header is checked before any allocation).
MAX_PIXELS = 1 << 28
#: The two interleaved subimages, in coding order: even rows, then odd rows.
PASSES = ("E", "O")

# (dy, dx) of each pass's context, in image rows and columns from the target pixel. In
# pass E (even rows) only even rows at earlier columns are known; in pass O (odd rows)
# all even rows and the odd rows at earlier columns. The first four are the nearest,
# whose mean is the anchor; a same-pass neighbour left of column 0 takes entry 0's value.
_CONTEXT: dict[str, tuple[tuple[int, int], ...]] = {
    "E": ((0, -1), (-2, -1), (2, -1), (0, -2),
          (-2, -2), (2, -2), (0, -3), (-4, -1), (4, -1), (-2, -3), (2, -3), (-4, -2), (4, -2)),
    "O": ((-1, 0), (1, 0), (0, -1), (-1, -1),
          (1, -1), (-1, 1), (1, 1), (0, -2), (-1, -2), (1, -2), (-1, 2), (1, 2),
          (-3, 0), (3, 0), (-2, -1), (2, -1), (-3, -1), (3, -1), (-3, 1), (3, 1)),
}
_FIRST_ROW = {"E": 0, "O": 1}
_HEADER = struct.Struct("<4sBBIIBH32s16s16sI")  # magic ver flags rows cols bits near model payload-hash values-hash length
_FLAG_INVERTED = 1


def context_size(group: str) -> int:
    """Network inputs of pass ``group``: its context differences plus the anchor level."""
    return len(_CONTEXT[group]) + 1


# --------------------------------------------------------------------------- the model


@dataclass
class CoderModel:
    """A verified coder model: integer networks and per-class residual histograms.

    ``layers[group]`` is a list of (weights float64 (out, in), bias float64, clip) with
    integer values; ``cdf[c]`` the cumulative counts of class ``c`` at the half-integer
    points ``-M - 0.5 ... M + 0.5`` of a 12-bit residual (``M = (len - 2) // 2``).
    """

    sha256: str
    layers: dict[str, list[tuple[np.ndarray, np.ndarray, bool]]]
    cdf: list[np.ndarray]
    card: ModelCard | None = None
    _tables: dict[tuple[int, int, int], tuple[np.ndarray, int]] = field(default_factory=dict)
    _coding: dict[tuple[int, int, int], tuple[object, int]] = field(default_factory=dict)
    _sets: dict[tuple[int, int], tuple[list[object], np.ndarray]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def coding_set(self, bits: int, near: int) -> tuple[list[object], np.ndarray]:
        """Every class's range coder model and ``Q`` at this bit depth and NEAR (built once)."""
        key = (bits, near)
        with self._lock:
            found = self._sets.get(key)
        if found is None:
            pairs = [self.coding_model(cls, bits, near) for cls in range(SCALE_CLASSES + 1)]
            found = ([m for m, _ in pairs], np.array([q for _, q in pairs], dtype=np.int64))
            with self._lock:
                self._sets[key] = found
        return found

    def coding_model(self, cls: int, bits: int, near: int) -> tuple[object, int]:
        """The range coder's model of :meth:`table` (built once per class, depth and NEAR)."""
        import constriction

        key = (cls, bits, near)
        with self._lock:
            found = self._coding.get(key)
        if found is None:
            probabilities, q_max = self.table(cls, bits, near)
            found = (constriction.stream.model.Categorical(probabilities, perfect=False), q_max)
            with self._lock:
                self._coding[key] = found
        return found

    def table(self, cls: int, bits: int, near: int) -> tuple[np.ndarray, int]:
        """Probabilities of the quantised residuals ``-Q..Q`` and two escapes, and ``Q``."""
        key = (cls, bits, near)
        with self._lock:
            found = self._tables.get(key)
        if found is None:
            # the flat class's histogram is in units of the image at every bit depth: a flat
            # context (air, a flat image) repeats exact values, whatever the bit depth
            found = _table(self.cdf[cls], 12 if cls == SCALE_CLASSES else bits, near)
            with self._lock:
                self._tables[key] = found
        return found


def check_model(layers: dict[str, list[tuple[np.ndarray, np.ndarray, bool]]],
                cdf: list[np.ndarray]) -> None:
    """Refuse a model whose integers could leave float64's exact range or whose shapes differ.

    Raises
    ------
    ModelError
        On a missing network, a shape mismatch, a non-integer or too large weight, or a
        non-monotone histogram.
    """
    for name in PASSES:
        if True:
            net = layers.get(name)
            if not net:
                raise ModelError(f"coder model lacks network {name}")
            width = context_size(name)
            bound = float(MAX_INPUT)
            if len(net) < 2 or net[-1][0].shape != (2, width):
                raise ModelError(f"coder network {name} lacks its linear skip")
            skip = bound * float(np.abs(net[-1][0]).sum(axis=1).max(initial=0))
            for k, (weights, bias, clip) in enumerate(net[:-1]):
                if weights.ndim != 2 or weights.shape[1] != width or bias.shape != (weights.shape[0],):
                    raise ModelError(f"coder network {name} has inconsistent layer shapes")
                if not (np.all(np.isfinite(weights)) and np.all(weights == np.rint(weights))
                        and np.all(bias == np.rint(bias))):
                    raise ModelError(f"coder network {name} has non-integer weights")
                if np.abs(weights).max(initial=0) > MAX_WEIGHT:
                    raise ModelError(f"coder network {name} has a weight above {MAX_WEIGHT}")
                worst = bound * float(np.abs(weights).sum(axis=1).max(initial=0)) \
                    + float(np.abs(bias).max(initial=0)) + (skip if k == len(net) - 2 else 0.0)
                if worst >= 2.0 ** 52:
                    raise ModelError(f"coder network {name} could leave float64's exact range")
                bound = float(ACTIVATION_MAX) if clip else worst / 2 ** WEIGHT_SHIFT
                width = weights.shape[0]
            if width != 2:
                raise ModelError(f"coder network {name} must output a mean and a scale class")
    if len(cdf) != SCALE_CLASSES + 1:
        raise ModelError(f"coder model has {len(cdf)} histograms, not {SCALE_CLASSES + 1}")
    for counts in cdf:
        if counts.ndim != 1 or counts.size < 4 or counts.size % 2 or counts[0] != 0 \
                or np.any(np.diff(counts) < 0) or counts[-1] <= 0 or counts[-1] >= 2 ** 40:
            raise ModelError("coder model has a malformed residual histogram")


_MODELS: dict[str, CoderModel] = {}
_MODELS_LOCK = threading.Lock()


def load_coder_model(name_or_path: str | Path = DEFAULT_MODEL, *, models_dir: Path | None = None,
                     expected_sha256: str | None = None) -> CoderModel:
    """Load and verify a coder model (safetensors of integers plus a card), cached by SHA-256.

    Raises
    ------
    ModelError
        When the file is missing, its hash differs from its card or ``expected_sha256``,
        or its contents are not a coder model.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_numpy

    weights = weights_path(name_or_path, models_dir)
    try:
        blob = weights.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read coder model {weights}: {exc.strerror}") from exc
    sha = hashlib.sha256(blob).hexdigest()
    with _MODELS_LOCK:
        cached = _MODELS.get(sha)
    if cached is not None and (expected_sha256 is None or expected_sha256.lower() == sha):
        return cached
    card = read_card(weights)
    if card.sha256.lower() != sha:
        raise ModelError(f"{weights.name}: SHA-256 {sha[:16]}... differs from its card's")
    if expected_sha256 is not None and expected_sha256.lower() != sha:
        raise ModelError(f"{weights.name}: SHA-256 {sha[:16]}... is not the expected "
                         f"{expected_sha256[:16]}...")
    if card.arch != ARCH:
        raise ModelError(f"{weights.name} is a {card.arch} model, not a {ARCH} coder model")
    try:
        tensors = load_numpy(blob)
    except (SafetensorError, ValueError) as exc:
        raise ModelError(f"{weights.name}: unreadable coder model: {exc}") from exc
    model = model_from_tensors(tensors, sha, card)
    with _MODELS_LOCK:
        _MODELS[sha] = model
    logger.info("loaded coder model %s (sha256 %s)", card.name, sha[:16])
    return model


def model_from_tensors(tensors: dict[str, np.ndarray], sha256: str,
                       card: ModelCard | None = None) -> CoderModel:
    """Build a :class:`CoderModel` from its tensors (``NET.K.weight/bias/clip``, ``cdf.C``)."""
    layers: dict[str, list[tuple[np.ndarray, np.ndarray, bool]]] = {}
    try:
        for name in PASSES:
            if True:
                net, k = [], 0
                while f"{name}.{k}.weight" in tensors:
                    net.append((tensors[f"{name}.{k}.weight"].astype(np.float64),
                                tensors[f"{name}.{k}.bias"].astype(np.float64),
                                bool(tensors[f"{name}.{k}.clip"].item())))
                    k += 1
                layers[name] = net
        cdf = [tensors[f"cdf.{c}"].astype(np.int64) for c in range(SCALE_CLASSES + 1)]
    except (KeyError, ValueError) as exc:
        raise ModelError(f"coder model is incomplete: {exc}") from exc
    check_model(layers, cdf)
    return CoderModel(sha256, layers, cdf, card)


def model_tensors(model: CoderModel) -> dict[str, np.ndarray]:
    """The tensors :func:`model_from_tensors` reads, as integers."""
    tensors: dict[str, np.ndarray] = {}
    for name, net in model.layers.items():
        for k, (weights, bias, clip) in enumerate(net):
            tensors[f"{name}.{k}.weight"] = weights.astype(np.int32)
            tensors[f"{name}.{k}.bias"] = bias.astype(np.int64)
            tensors[f"{name}.{k}.clip"] = np.array([1 if clip else 0], dtype=np.uint8)
    for c, counts in enumerate(model.cdf):
        tensors[f"cdf.{c}"] = counts.astype(np.int64)
    return tensors


def _model_for_stream(sha256: str) -> CoderModel:
    """The model a stream names, from the cache or the models directory (retired included)."""
    with _MODELS_LOCK:
        cached = _MODELS.get(sha256)
    if cached is not None:
        return cached
    return load_coder_model(find_model_by_sha256(sha256, default_models_dir()),
                            expected_sha256=sha256)


# --------------------------------------------------------------------------- tables


def _table(counts: np.ndarray, bits: int, near: int) -> tuple[np.ndarray, int]:
    """Probabilities of residuals quantised with step 2K+1 at ``bits``, from a 12-bit histogram.

    Symbol ``q + Q`` is the residual interval ``[q(2K+1) - K - 1/2, q(2K+1) + K + 1/2]``
    (in units of the image); its mass is the histogram's, linearly interpolated between
    its half-integer points after rescaling to 12 bits. Integer arithmetic throughout.
    """
    half = (counts.size - 2) // 2  # M: the histogram covers -M-1/2 .. M+1/2 (12-bit units)
    step = 2 * near + 1
    shift = 12 - bits  # image units -> 12-bit units: * 2**shift
    reach = half * 2 ** bits // 4096 if shift < 0 else half >> shift
    q_max = max(1, (reach + near) // step)
    q = np.arange(-q_max, q_max + 2, dtype=np.int64)
    doubled_edges = 2 * q * step - step  # 2 * lower edge of each symbol; the last is the upper end
    if shift >= 0:
        numerator, denominator = doubled_edges * (1 << shift) + 2 * half + 1, 2
    else:
        numerator, denominator = doubled_edges + (2 * half + 1) * (1 << -shift), 1 << (1 - shift)
    index = numerator // denominator
    remainder = numerator - index * denominator
    top = counts.size - 1
    low = np.clip(index, 0, top)
    high = np.clip(index + 1, 0, top)
    scaled = counts[low] * denominator + (counts[high] - counts[low]) * remainder
    scaled = np.where(index < 0, 0, np.where(index >= top, counts[top] * denominator, scaled))
    mass = np.diff(scaled)
    total = int(counts[top]) * denominator
    escape = max(1, total // ESCAPE_SHARE)
    probabilities = np.concatenate([mass, [escape, escape]]).astype(np.float64)
    return probabilities, int(q_max)


# --------------------------------------------------------------------------- prediction


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Mirror indices into [0, size) without repeating the edge: parity is preserved."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


def _scale(values: np.ndarray, shift: int) -> np.ndarray:
    """``values * 2**shift``, floored for a negative ``shift`` (arithmetic shift)."""
    return values << shift if shift >= 0 else values >> -shift


def pass_rows(rows: int, group: str) -> np.ndarray:
    """The image rows of pass ``group``."""
    return np.arange(_FIRST_ROW[group], rows, 2)


@dataclass(frozen=True)
class _Gather:
    """Precomputed indices of one pass's context in an image of one shape."""

    group: str
    width: int
    rows: np.ndarray          # the pass's image rows
    row_base: np.ndarray      # (n, rows): reflected neighbour row * width
    dx: tuple[int, ...]
    same_pass: tuple[bool, ...]

    @classmethod
    def of(cls, shape: tuple[int, int], group: str) -> _Gather:
        height, width = shape
        rows = pass_rows(height, group)
        base = np.stack([_reflect(rows + dy, height) * width for dy, _ in _CONTEXT[group]])
        return cls(group, width, rows, np.ascontiguousarray(base),
                   tuple(dx for _, dx in _CONTEXT[group]),
                   tuple(dy % 2 == 0 for dy, _ in _CONTEXT[group]))

    def context(self, flat_image: np.ndarray, column: int) -> np.ndarray:
        """Context values (n, rows) at ``column``; ``flat_image`` is the raveled image."""
        columns, missing = [], []
        for k, (dx, same) in enumerate(zip(self.dx, self.same_pass)):
            x = column + dx
            if same and x < 0:  # not coded yet: takes entry 0's value
                missing.append(k)
                x = 0
            elif x >= self.width:
                x = 2 * (self.width - 1) - x if self.width > 1 else 0
            elif x < 0:
                x = -x if self.width > 1 else 0
            columns.append(x)
        values = flat_image[self.row_base + np.array(columns, dtype=np.int64)[:, None]]
        if missing:
            values[missing] = values[0]
        return values


def pass_context(image: np.ndarray, group: str, column: int) -> np.ndarray:
    """The context values (n, rows of the pass) of pass ``group``'s pixels at ``column``.

    ``image`` holds every value coded so far (the others are never read). For pass E at
    column 0 nothing is known; that column is coded as it is.
    """
    return _Gather.of(image.shape, group).context(np.ascontiguousarray(image).ravel(), column)


def predict(model: CoderModel, group: str, context: np.ndarray,
            bits: int, near: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Integer mean (image units, clipped to the range) and class of every target.

    ``context`` is (n, targets) int64 from :func:`pass_context`. A context whose values
    lie within ``near`` of each other is flat: predicted as its nearest value, in the flat
    class, so a near-lossless reconstruction of air stays one exact value instead of
    wandering within the bound and defeating the flat class.
    """
    top = (1 << bits) - 1
    anchor = (context[0] + context[1] + context[2] + context[3] + 2) >> 2
    flat = context.max(axis=0) - context.min(axis=0) <= near
    if near:
        anchor = np.where(flat, context[0], anchor)
    mean = anchor.copy()
    cls = np.full(anchor.shape, SCALE_CLASSES, dtype=np.int64)
    if flat.all():
        return np.minimum(np.maximum(mean, 0), top), cls
    todo = None if not flat.any() else np.flatnonzero(~flat)
    columns = context if todo is None else context[:, todo]
    base = anchor if todo is None else anchor[todo]
    diffs = columns - base
    shift = 14 - bits
    if shift >= 0:
        np.left_shift(diffs, shift, out=diffs)
    else:
        np.right_shift(diffs, -shift, out=diffs)
    np.minimum(np.maximum(diffs, -MAX_INPUT, out=diffs), MAX_INPUT, out=diffs)
    inputs = np.empty((diffs.shape[1], diffs.shape[0] + 1), dtype=np.float64)
    inputs[:, :-1] = diffs.T
    inputs[:, -1] = _scale(base, 9 - bits)  # 0..511
    offsets, classes = _network(model.layers[group], inputs)
    shift = bits - 14
    if shift >= 0:
        delta = offsets << shift
    else:
        delta = (offsets + (1 << (-shift - 1))) >> -shift
    classes = np.minimum(np.maximum(classes, 0), SCALE_CLASSES - 1)
    if todo is None:
        mean, cls = base + delta, classes
    else:
        mean[todo] = base + delta
        cls[todo] = classes
    return np.minimum(np.maximum(mean, 0), top), cls


def _network(net: list[tuple[np.ndarray, np.ndarray, bool]],
             inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run an integer network on (targets, features) inputs; exact in float64.

    ``net`` is the layers, then a linear skip (weights (2, features)) added to the last
    layer's sum: a linear predictor plus a non-linear correction. Scaling by the exact
    power of two 2**-WEIGHT_SHIFT and flooring keep every value an integer.
    """
    scale = 1.0 / float(2 ** WEIGHT_SHIFT)
    last = len(net) - 2  # the final entry is the linear skip from the inputs to the output
    act = inputs
    for k, (weights, bias, clip) in enumerate(net[:-1]):
        z = act @ weights.T
        if k == last:
            z += inputs @ net[-1][0].T
        z += bias
        z *= scale
        np.floor(z, out=z)
        if clip:
            np.minimum(np.maximum(z, 0.0, out=z), float(ACTIVATION_MAX), out=z)
        act = z
    return act[:, 0].astype(np.int64), act[:, 1].astype(np.int64)


# --------------------------------------------------------------------------- coding


class _Symbols:
    """One side of the range coder: encodes the true values, or decodes them."""

    def __init__(self, payload: bytes | None) -> None:
        import constriction

        self._constriction = constriction
        if payload is None:
            self.encoder = constriction.stream.queue.RangeEncoder()
            self.decoder = None
        else:
            words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
            self.encoder = None
            self.decoder = constriction.stream.queue.RangeDecoder(words)
        self._uniform: dict[int, object] = {}

    def uniform(self, values: np.ndarray | None, size: int, count: int) -> np.ndarray:
        """Code ``count`` values below ``size`` uniformly (``values`` when encoding)."""
        model = self._uniform.get(size)
        if model is None:
            model = self._uniform[size] = self._constriction.stream.model.Uniform(max(2, size))
        if self.encoder is not None and values is not None:
            if count:
                self.encoder.encode(values.astype(np.int32), model)
            return values
        if not count:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self.decoder.decode(model, count), dtype=np.int64)  # type: ignore[union-attr]

    def categorical(self, symbols: np.ndarray | None, model: object, count: int) -> np.ndarray:
        """Code ``count`` symbols of one table's model (``symbols`` when encoding)."""
        if self.encoder is not None and symbols is not None:
            self.encoder.encode(symbols.astype(np.int32), model)
            return symbols
        return np.asarray(self.decoder.decode(model, count), dtype=np.int64)  # type: ignore[union-attr]

    def payload(self) -> bytes:
        """The compressed words (encoder side)."""
        if self.encoder is None:
            raise PixelDataError("no encoder")
        return np.asarray(self.encoder.get_compressed(), dtype="<u4").tobytes()


def _code_column(model: CoderModel, symbols: _Symbols, flat_recon: np.ndarray, gather: _Gather,
                 column: int, bits: int, near: int, flat_truth: np.ndarray | None) -> None:
    """Predict, then code or decode one pass at ``column`` into ``flat_recon`` (raveled)."""
    means, classes = predict(model, gather.group, gather.context(flat_recon, column), bits, near)
    positions = gather.rows * gather.width + column
    top = (1 << bits) - 1
    step = 2 * near + 1
    order = np.argsort(classes.astype(np.uint8), kind="stable")  # radix sort of small integers
    counts = np.bincount(classes, minlength=SCALE_CLASSES + 1)
    present = np.flatnonzero(counts)
    ends = np.cumsum(counts)[present]
    starts = ends - counts[present]
    all_models, q_limit = model.coding_set(bits, near)
    codings = [(all_models[c], 0) for c in present]
    q_max = q_limit[classes]
    if flat_truth is not None:
        residual = flat_truth[positions] - means
        q = np.sign(residual) * ((np.abs(residual) + near) // step)
        low, high = q < -q_max, q > q_max
        sym = q + q_max
        sym[low] = 2 * q_max[low] + 1
        sym[high] = 2 * q_max[high] + 2
        ordered = sym[order]
        for (coding, _), a, b in zip(codings, starts, ends):
            symbols.categorical(ordered[a:b], coding, int(b - a))
        if low.any() or high.any():
            lows, highs = low[order], high[order]
            symbols.uniform((-q - q_max - 1)[order][lows], 1 << bits, int(lows.sum()))
            symbols.uniform((q - q_max - 1)[order][highs], 1 << bits, int(highs.sum()))
    else:
        ordered = np.empty(classes.size, dtype=np.int64)
        for (coding, _), a, b in zip(codings, starts, ends):
            ordered[a:b] = symbols.categorical(None, coding, int(b - a))
        sym = np.empty_like(ordered)
        sym[order] = ordered
        q = sym - q_max
        low, high = sym == 2 * q_max + 1, sym == 2 * q_max + 2
        if low.any() or high.any():
            lows, highs = low[order], high[order]
            q_sorted = q[order]
            q_sorted[lows] = -q_max[order][lows] - 1 - symbols.uniform(None, 1 << bits, int(lows.sum()))
            q_sorted[highs] = q_max[order][highs] + 1 + symbols.uniform(None, 1 << bits, int(highs.sum()))
            q[order] = q_sorted
    flat_recon[positions] = np.minimum(np.maximum(means + q * step, 0), top)


_BLAS_LOCK = threading.Lock()
_BLAS_USERS = 0
_BLAS_LIMIT: object = None


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """BLAS on one thread while any stream is coded.

    The products are a thousand rows by a few dozen columns, thousands of times per image:
    a multi-threaded BLAS spends more on waking its threads than on the sums (measured
    nine times slower on a busy 2-core machine). Results are exact either way.
    """
    global _BLAS_USERS, _BLAS_LIMIT
    from threadpoolctl import threadpool_limits

    with _BLAS_LOCK:
        if _BLAS_USERS == 0:
            _BLAS_LIMIT = threadpool_limits(limits=1, user_api="blas")
        _BLAS_USERS += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_USERS -= 1
            if _BLAS_USERS == 0 and _BLAS_LIMIT is not None:
                _BLAS_LIMIT.restore_original_limits()  # type: ignore[attr-defined]
                _BLAS_LIMIT = None


def _code(model: CoderModel, symbols: _Symbols, recon: np.ndarray, bits: int, near: int,
          truth: np.ndarray | None) -> None:
    """See :func:`_code_passes`; BLAS runs single-threaded meanwhile."""
    with _single_threaded_blas():
        _code_passes(model, symbols, recon, bits, near, truth)


def _code_passes(model: CoderModel, symbols: _Symbols, recon: np.ndarray, bits: int, near: int,
                 truth: np.ndarray | None) -> None:
    """Code or decode the whole image into ``recon`` (int64, C-contiguous, rows x cols).

    Pass E: the even rows' first column as it is, then column by column; pass O: the odd
    rows, column by column. Each column of a pass is one vectorised batch.
    """
    flat_recon = recon.reshape(-1)
    flat_truth = None if truth is None else np.ascontiguousarray(truth).reshape(-1)
    rows = pass_rows(recon.shape[0], "E")
    if truth is not None:
        recon[rows, 0] = truth[rows, 0]
        symbols.uniform(truth[rows, 0], 1 << bits, rows.size)
    else:
        recon[rows, 0] = symbols.uniform(None, 1 << bits, rows.size)
    even = _Gather.of(recon.shape, "E")
    for column in range(1, recon.shape[1]):
        _code_column(model, symbols, flat_recon, even, column, bits, near, flat_truth)
    if recon.shape[0] > 1:
        odd = _Gather.of(recon.shape, "O")
        for column in range(recon.shape[1]):
            _code_column(model, symbols, flat_recon, odd, column, bits, near, flat_truth)


def _inverted(stored: np.ndarray, bits: int) -> bool:
    """Whether the border is mostly bright (MONOCHROME1 air): code the complement instead."""
    edge = np.concatenate([stored[0], stored[-1], stored[:, 0], stored[:, -1]])
    return int(np.median(edge)) * 2 > (1 << bits) - 1


def _values_hash(values: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<u2").tobytes()).digest()[:16]


def encode_stream(stored: np.ndarray, bits: int, near: int, model: CoderModel | None = None) -> bytes:
    """Code unsigned ``bits``-bit values with every value within ``near`` (0: exact).

    Raises
    ------
    PixelDataError
        When the array, bit depth or NEAR is out of range.
    ModelError
        When the coder model cannot be loaded.
    """
    if stored.ndim != 2 or stored.size == 0:
        raise PixelDataError(f"stream needs a non-empty 2-D array, got shape {stored.shape}")
    if stored.size > MAX_PIXELS:
        raise PixelDataError(f"image of {stored.shape} exceeds {MAX_PIXELS} pixels")
    if not np.issubdtype(stored.dtype, np.integer):
        raise PixelDataError(f"stream needs integer stored values, got {stored.dtype}")
    if not 1 <= bits <= 16:
        raise PixelDataError(f"Bits Stored must be 1 to 16, got {bits}")
    top = (1 << bits) - 1
    if not 0 <= near <= min(255, top // 2):
        raise PixelDataError(f"NEAR {near} is out of range for {bits}-bit values")
    values = stored.astype(np.int64)
    if values.min() < 0 or values.max() > top:
        raise PixelDataError(f"stored values exceed {bits} bits")
    model = model or load_coder_model()
    inverted = _inverted(values, bits)
    truth = top - values if inverted else values
    recon = np.zeros_like(truth)
    symbols = _Symbols(None)
    _code(model, symbols, recon, bits, near, truth)
    decoded = top - recon if inverted else recon
    payload = symbols.payload()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, _FLAG_INVERTED if inverted else 0,
                          stored.shape[0], stored.shape[1], bits, near,
                          bytes.fromhex(model.sha256), hashlib.sha256(payload).digest()[:16],
                          _values_hash(decoded), len(payload))
    return header + payload


@dataclass(frozen=True)
class StreamHeader:
    """What a learned stream says of itself."""

    rows: int
    cols: int
    bits: int
    near: int
    inverted: bool
    model_sha256: str
    payload: bytes
    values_hash: bytes


def read_header(data: bytes) -> StreamHeader:
    """Parse and check a stream's header and payload hash.

    Raises
    ------
    PixelDataError
        When the stream is truncated, not a learned stream, of another version, or its
        payload differs from the hash it carries (corruption).
    """
    if len(data) < _HEADER.size:
        raise PixelDataError(f"learned stream of {len(data)} bytes is truncated")
    (magic, version, flags, rows, cols, bits, near, model_sha, payload_hash, values_hash,
     length) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PixelDataError("not a latentpacs learned stream (bad magic)")
    if version != FORMAT_VERSION:
        raise PixelDataError(f"learned stream version {version} is not {FORMAT_VERSION}")
    payload = data[_HEADER.size:]
    if len(payload) != length or length % 4:
        raise PixelDataError(f"learned stream payload is {len(payload)} bytes, header says {length}")
    if hashlib.sha256(payload).digest()[:16] != payload_hash:
        raise PixelDataError("learned stream is corrupt: its payload differs from its hash")
    if not (1 <= bits <= 16 and rows and cols and near <= ((1 << bits) - 1) // 2):
        raise PixelDataError("learned stream header is out of range")
    if rows * cols > MAX_PIXELS:
        raise PixelDataError(f"learned stream of {rows}x{cols} pixels exceeds {MAX_PIXELS}")
    return StreamHeader(rows, cols, bits, near, bool(flags & _FLAG_INVERTED), model_sha.hex(),
                        payload, values_hash)


def decode_stream(data: bytes, model: CoderModel | None = None) -> np.ndarray:
    """The uint16 values (rows, cols) of a learned stream.

    Raises
    ------
    PixelDataError
        When the stream is corrupt or truncated.
    PixelChecksumError
        When the decoded values differ from the hash the stream carries.
    ModelError
        When the model the stream names is not in the models directory.
    """
    header = read_header(data)
    if model is None or model.sha256 != header.model_sha256:
        model = _model_for_stream(header.model_sha256)
    recon = np.zeros((header.rows, header.cols), dtype=np.int64)
    try:
        _code(model, _Symbols(header.payload), recon, header.bits, header.near, None)
    except (ValueError, RuntimeError, AssertionError) as exc:  # constriction: exhausted or invalid words
        raise PixelDataError(f"learned stream does not decode: {exc}") from exc
    top = (1 << header.bits) - 1
    values = (top - recon if header.inverted else recon).astype(np.uint16)
    if _values_hash(values) != header.values_hash:
        raise PixelChecksumError("learned stream decoded to values that differ from its hash")
    return values


def stream_model(data: bytes) -> str:
    """SHA-256 (hex) of the coder model a learned stream names."""
    return read_header(data).model_sha256


def stream_precision(data: bytes) -> int:
    """The sample precision a learned stream was coded at."""
    return read_header(data).bits


@dataclass(frozen=True)
class LearnedCoder:
    """The learned coder behind :class:`latentpacs.codec.streams.StreamCoder`.

    No DICOM transfer syntax carries its stream, so a retrieval decodes it before sending.
    """

    name: str = "learned"
    version: int = FORMAT_VERSION
    sends_as: tuple[str, str] | None = None

    def encode(self, stored: np.ndarray, bits: int, near: int) -> bytes:
        """See :func:`encode_stream` (with the models directory's ``coder`` model)."""
        return encode_stream(stored, bits, near)

    def decode(self, data: bytes) -> np.ndarray:
        """See :func:`decode_stream`."""
        return decode_stream(data)

    def precision(self, data: bytes) -> int:
        """See :func:`stream_precision`."""
        return stream_precision(data)
