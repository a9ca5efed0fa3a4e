"""Training of the learned stream coder (``latentpacs train-coder``).

The nine networks of :mod:`latentpacs.codec.learned` are trained, one after the other, on
contexts sampled from the training images (patient split, as ``train``), by the
discretised-logistic code length of the true value; the epoch with the lowest validation
code length is kept. The float networks are then made integer (weights times
2**WEIGHT_SHIFT, rounded), and each scale class's residual histogram is fitted to the
residuals the *integer* networks leave on the training contexts, so the tables describe
exactly the predictor that codes. The card records the command, data, split and the
bits per pixel of real streams of the validation images.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from tqdm import tqdm

from latentpacs.codec import learned
from latentpacs.codec.cards import CARD_SUFFIX, WEIGHTS_SUFFIX, ModelCard, sha256_file
from latentpacs.codec.modelfile import _atomic_write, _retire
from latentpacs.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

HIDDEN = (32, 16)
#: Validation images whose real streams the card's bits per pixel are measured on.
MEASURED_IMAGES = 4


@dataclass
class Samples:
    """Contexts (n, N) int64 of one network with the true values and bit depth of each."""

    context: list[np.ndarray] = field(default_factory=list)
    truth: list[np.ndarray] = field(default_factory=list)
    bits: list[np.ndarray] = field(default_factory=list)

    def add(self, context: np.ndarray, truth: np.ndarray, bits: int) -> None:
        self.context.append(context)
        self.truth.append(truth)
        self.bits.append(np.full(truth.shape, bits, dtype=np.int64))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.concatenate(self.context, axis=1), np.concatenate(self.truth),
                np.concatenate(self.bits))


def collect(stored: np.ndarray, bits: int, rng: np.random.Generator, per_pass: int,
            into: dict[str, Samples]) -> None:
    """Sample about ``per_pass`` contexts of each pass of one image into ``into``.

    Whole columns are sampled, as the coder codes them; the image is taken as the encoder
    takes it (complemented when its border is bright). Flat contexts go to ``flat``.
    """
    values = stored.astype(np.int64)
    top = (1 << bits) - 1
    if learned._inverted(values, bits):
        values = top - values
    height, width = values.shape
    for group in learned.PASSES:
        rows = learned.pass_rows(height, group)
        first = 1 if group == "E" else 0
        if rows.size == 0 or width <= first:
            continue
        count = min(width - first, max(1, per_pass // rows.size + 1))
        columns = np.sort(rng.choice(np.arange(first, width), size=count, replace=False))
        context = np.concatenate([learned.pass_context(values, group, int(c)) for c in columns], axis=1)
        target = np.concatenate([values[rows, int(c)] for c in columns])
        flat = np.all(context == context[:1], axis=0)
        into.setdefault(group, Samples()).add(context[:, ~flat], target[~flat], bits)
        into.setdefault("flat", Samples()).add(context[:4, flat], target[flat], bits)


def near_lossless_contexts(context: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half the contexts as a near-lossless decoder sees them: values off by up to NEAR = 1, 2 or 4."""
    near = rng.choice(np.array([0, 0, 0, 1, 2, 4]), size=context.shape[1])
    noise = np.rint((rng.random(context.shape) * 2 - 1) * near).astype(np.int64)
    return np.maximum(context + noise, 0)


def features(context: np.ndarray, truth: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, ...]:
    """Network inputs as :func:`learned.predict` computes them, and the training targets."""
    anchor = (context[0] + context[1] + context[2] + context[3] + 2) >> 2
    up = np.exp2(14 - bits.astype(np.float64))
    diffs = np.clip(np.floor((context - anchor) * up), -learned.MAX_INPUT, learned.MAX_INPUT)
    level = np.floor(anchor * np.exp2(9 - bits.astype(np.float64)))
    inputs = np.concatenate([diffs, level[None, :]], axis=0).T.astype(np.float32)
    target = ((truth - anchor) * up).astype(np.float32)
    return inputs, target, up.astype(np.float32)


class _Net(torch.nn.Module):
    """The float twin of one integer network (clipped ReLU activations)."""

    def __init__(self, inputs: int) -> None:
        super().__init__()
        widths = (inputs, *HIDDEN, 2)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.skip = torch.nn.Linear(inputs, 1, bias=False)  # the linear predictor of the mean
        with torch.no_grad():
            self.skip.weight.zero_()
            self.output.weight.mul_(0.1)
            self.output.bias.copy_(torch.tensor([0.0, 24.0]))
            for layer in self.layers[:-1]:
                cast(torch.nn.Linear, layer).bias.fill_(64.0)

    @property
    def output(self) -> torch.nn.Linear:
        """The last layer: the mean's correction and the scale class."""
        return cast(torch.nn.Linear, self.layers[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = x
        for layer in self.layers[:-1]:
            act = torch.clamp(layer(act), 0.0, float(learned.ACTIVATION_MAX))
        out = self.layers[-1](act)
        return torch.stack([out[:, 0] + self.skip(x)[:, 0], out[:, 1]], dim=1)


def code_length(out: torch.Tensor, target: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Bits of each target under a discretised logistic (quarter units of a 12-bit scale)."""
    mean = out[:, 0]
    scale = 4.0 * torch.exp2((torch.clamp(out[:, 1], 0.0, learned.SCALE_CLASSES - 1.0) - 8.0) / 4.0)
    upper = torch.sigmoid((target - mean + width / 2) / scale)
    lower = torch.sigmoid((target - mean - width / 2) / scale)
    return -torch.log2(torch.clamp(upper - lower, min=1e-12))


class _Checkpoints:
    """``OUT.coder-checkpoint.pt``: the run's fingerprint, finished networks, the one in training.

    Written atomically after every epoch, so a killed run resumes (``--resume``) where it
    stopped and ends with the model an uninterrupted run makes.
    """

    def __init__(self, path: Path | None, fingerprint: dict[str, object], resume: bool) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.state: dict[str, object] = {"fingerprint": fingerprint, "done": {}, "current": None}
        if not resume:
            return
        if path is None or not path.is_file():
            raise ConfigError(f"nothing to resume: no {path}")
        saved = torch.load(path, weights_only=True)
        if saved.get("fingerprint") != fingerprint:
            differing = sorted(k for k in fingerprint if saved.get("fingerprint", {}).get(k) != fingerprint[k])
            raise ConfigError(f"{path} was written by another run (differs in {', '.join(differing)})")
        self.state = saved

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(self.state, tmp)
        tmp.replace(self.path)


def _train_net(inputs: np.ndarray, target: np.ndarray, width: np.ndarray, val: tuple[np.ndarray, ...],
               epochs: int, batch: int, lr: float, seed: int, bar: tqdm,
               checkpoints: _Checkpoints, group: str) -> tuple[dict[str, torch.Tensor], float, int]:
    """Adam on the code length; returns the best epoch's state, its validation bits, the epoch."""
    torch.manual_seed(seed)
    net = _Net(inputs.shape[1])
    # start from the least-squares linear predictor: the network learns the non-linear rest
    design = np.c_[inputs.astype(np.float64), np.ones(inputs.shape[0])]
    solution = np.linalg.lstsq(design, target.astype(np.float64), rcond=None)[0]
    with torch.no_grad():
        net.skip.weight.copy_(torch.from_numpy(solution[None, :-1]).float())
        net.output.bias[0] = float(solution[-1])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    x, t, w = (torch.from_numpy(a) for a in (inputs, target, width))
    vx, vt, vw = (torch.from_numpy(a) for a in val)
    generator = torch.Generator().manual_seed(seed)
    best: tuple[dict[str, torch.Tensor], float, int] = ({}, math.inf, 0)
    first = 1
    current = checkpoints.state.get("current")
    if isinstance(current, dict) and current.get("group") == group:
        net.load_state_dict(current["net"])
        opt.load_state_dict(current["opt"])
        sched.load_state_dict(current["sched"])
        generator.set_state(current["generator"])
        best = (current["best_state"], float(current["best_bits"]), int(current["best_epoch"]))
        first = int(current["epoch"]) + 1
        bar.update(first - 1)
    for epoch in range(first, epochs + 1):
        net.train()
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch):
            pick = order[start:start + batch]
            loss = code_length(net(x[pick]), t[pick], w[pick]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        net.eval()
        with torch.no_grad():
            bits = float(code_length(net(vx), vt, vw).mean()) if vx.shape[0] else float(loss)
        if bits < best[1]:
            best = ({k: v.clone() for k, v in net.state_dict().items()}, bits, epoch)
        checkpoints.state["current"] = {
            "group": group, "epoch": epoch, "net": net.state_dict(), "opt": opt.state_dict(),
            "sched": sched.state_dict(), "generator": generator.get_state(),
            "best_state": best[0], "best_bits": best[1], "best_epoch": best[2]}
        checkpoints.save()
        bar.update(1)
        bar.set_postfix_str(f"val {bits:.3f} bits")
    return best


def integer_layers(state: dict[str, torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """The float network's integer twin: weights and biases times 2**WEIGHT_SHIFT, rounded."""
    count = len([k for k in state if k.startswith("layers.") and k.endswith(".weight")])
    scale = float(2 ** learned.WEIGHT_SHIFT)
    layers = []
    for k in range(count):
        weights = np.rint(state[f"layers.{k}.weight"].double().numpy() * scale)
        bias = np.rint(state[f"layers.{k}.bias"].double().numpy() * scale)
        layers.append((np.clip(weights, -learned.MAX_WEIGHT, learned.MAX_WEIGHT), bias, k < count - 1))
    skip = np.rint(state["skip.weight"].double().numpy() * scale)
    skip = np.concatenate([skip, np.zeros_like(skip)])  # the scale class has no linear part
    layers.append((np.clip(skip, -learned.MAX_WEIGHT, learned.MAX_WEIGHT), np.zeros(2), False))
    return layers


def class_scale(cls: int) -> float:
    """The nominal residual scale (12-bit units) of scale class ``cls``."""
    return float(2.0 ** ((min(cls, learned.SCALE_CLASSES - 1) - 8) / 4))


def fit_histograms(residuals: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Cumulative integer histograms (12-bit units) of each class's residuals, smoothed.

    A discretised logistic of the class's nominal scale is mixed in at 2 % (and one count
    everywhere), so a class seen rarely in training still codes sensibly.
    """
    cdfs = []
    for cls, parts in enumerate(residuals):
        r = np.concatenate(parts) if parts else np.zeros(0)
        sigma = class_scale(cls) if cls < learned.SCALE_CLASSES else 0.25
        half = int(np.clip(math.ceil(16 * sigma) + 16, 16, 2048))
        edges = np.arange(-half - 0.5, half + 1.0, 1.0)
        hist = np.histogram(np.clip(r, -half, half), bins=edges)[0].astype(np.float64)
        prior = np.diff(1.0 / (1.0 + np.exp(-edges / max(sigma, 0.25))))
        mass = hist + 0.02 * max(hist.sum(), 100.0) * prior / prior.sum()
        counts = np.floor(mass / mass.sum() * 2 ** 30) + 1
        cdfs.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    return cdfs


@dataclass(frozen=True)
class CoderTrainConfig:
    """What ``train-coder`` was asked for (recorded on the card)."""

    out: Path
    epochs: int = 12
    batch_size: int = 4096
    learning_rate: float = 3e-3
    samples_per_pass: int = 20000
    seed: int = 0
    command: str = ""
    data_note: str = ""
    #: Where the per-epoch checkpoint goes (None: no checkpoint), and whether to resume from it.
    checkpoint: Path | None = None
    resume: bool = False


def _data_digest(*sets: Sequence[tuple[np.ndarray, int]]) -> str:
    """SHA-256 of the training and validation images' values and depths (a resume must match)."""
    digest = hashlib.sha256()
    for side, images in enumerate(sets):
        for values, bits in images:
            digest.update(f"{side}:{values.shape}:{bits}:".encode())
            digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def _sample_images(images: Sequence[tuple[np.ndarray, int]], seed: int, per_phase: int) -> dict[str, Samples]:
    into: dict[str, Samples] = {}
    for index, (stored, bits) in enumerate(images):
        collect(stored, bits, np.random.default_rng([seed, index]), per_phase, into)
    return into


def train_coder(train_images: Sequence[tuple[np.ndarray, int]], val_images: Sequence[tuple[np.ndarray, int]],
                config: CoderTrainConfig, *, progress: bool = True) -> tuple[learned.CoderModel, dict[str, object]]:
    """Train, make integer, fit the tables, measure on the validation images."""
    if not train_images:
        raise ConfigError("train-coder needs at least one training image")
    started = time.monotonic()
    train = _sample_images(train_images, config.seed, config.samples_per_pass)
    val = _sample_images(val_images, config.seed + 1, config.samples_per_pass // 4)
    groups = list(learned.PASSES)
    layers: dict[str, list[tuple[np.ndarray, np.ndarray, bool]]] = {}
    val_bits: dict[str, float] = {}
    fingerprint: dict[str, object] = {
        "epochs": config.epochs, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
        "samples_per_pass": config.samples_per_pass, "seed": config.seed, "hidden": list(HIDDEN),
        "data": _data_digest(train_images, val_images)}
    checkpoints = _Checkpoints(config.checkpoint, fingerprint, config.resume)
    done = checkpoints.state["done"]
    if not isinstance(done, dict):
        raise ConfigError("malformed coder checkpoint")
    with tqdm(total=len(groups) * config.epochs, desc="train-coder", unit="epoch",
              disable=not progress) as bar:
        for number, group in enumerate(groups):
            if group in done:
                state, bits, epoch = done[group]
                layers[group] = integer_layers(state)
                val_bits[group] = round(float(bits), 4)
                bar.update(config.epochs)
                continue
            samples = train.get(group)
            if samples is None:
                raise ConfigError(f"training images are too small to train network {group}")
            context, truth, bits_arr = samples.arrays()
            context = near_lossless_contexts(context, np.random.default_rng([config.seed, number]))
            inputs, target, width = features(context, truth, bits_arr)
            held = val.get(group)
            v = features(*held.arrays()) if held is not None else (inputs[:0], target[:0], width[:0])
            state, bits, epoch = _train_net(inputs, target, width, v, config.epochs, config.batch_size,
                                            config.learning_rate, config.seed + number, bar,
                                            checkpoints, group)
            done[group] = (state, bits, epoch)
            checkpoints.state["current"] = None
            checkpoints.save()
            layers[group] = integer_layers(state)
            val_bits[group] = round(bits, 4)
            logger.info("coder network %s: best epoch %d, validation %.3f bits", group, epoch, bits)
    residuals: list[list[np.ndarray]] = [[] for _ in range(learned.SCALE_CLASSES + 1)]
    probe = learned.CoderModel("0" * 64, layers, [np.array([0, 1, 2, 3])] * (learned.SCALE_CLASSES + 1))
    for group in groups:
        context, truth, bits_arr = train[group].arrays()
        for bits in np.unique(bits_arr):
            pick = bits_arr == bits
            mean, cls = learned.predict(probe, group, context[:, pick], int(bits))
            r = (truth[pick] - mean) * 2.0 ** (12 - int(bits))
            for c in np.unique(cls):
                residuals[int(c)].append(r[cls == c])
    flat_context, flat_truth, flat_bits = train["flat"].arrays()
    if flat_truth.size:
        anchor = (flat_context[0] + flat_context[1] + flat_context[2] + flat_context[3] + 2) >> 2
        residuals[learned.SCALE_CLASSES].append((flat_truth - anchor).astype(np.float64))  # image units
    cdf = fit_histograms(residuals)
    learned.check_model(layers, cdf)
    model = learned.CoderModel("0" * 64, layers, cdf)
    metrics: dict[str, object] = {"validation_code_length_bits": val_bits,
                                  "train_seconds": round(time.monotonic() - started, 1)}
    if val_images:
        metrics.update(measure(model, val_images[:MEASURED_IMAGES]))
    return model, metrics


def measure(model: learned.CoderModel, images: Sequence[tuple[np.ndarray, int]]) -> dict[str, object]:
    """Bits per pixel of real streams (lossless and NEAR=2) of ``images``, checked exact/within K."""
    from latentpacs.codec import charls

    pixels = sum(img.size for img, _ in images)
    out: dict[str, object] = {"images": len(images), "pixels": int(pixels)}
    for near in (0, 2):
        ours = jls = 0
        for img, bits in images:
            data = learned.encode_stream(img, bits, near, model)
            back = learned.decode_stream(data, model)
            if int(np.abs(back.astype(np.int64) - img.astype(np.int64)).max()) > near:
                raise ModelError(f"trained coder broke its bound at NEAR={near}")
            ours += len(data)
            jls += len(charls.encode(img, bits, near))
        out[f"bpp_near{near}"] = round(8 * ours / pixels, 4)
        out[f"jpegls_bpp_near{near}"] = round(8 * jls / pixels, 4)
    return out


def save_coder_model(model: learned.CoderModel, directory: Path, name: str, *, description: str,
                     training: dict[str, object], metrics: dict[str, object]) -> tuple[learned.CoderModel, ModelCard]:
    """Write ``NAME.safetensors`` (integers) and ``NAME.json``; a replaced model is retired, never deleted."""
    from safetensors.numpy import save as save_numpy

    if not name or Path(name).name != name or name.startswith("."):
        raise ModelError(f"model name {name!r} must be a plain file name")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = learned.model_tensors(model)
    blob = save_numpy({k: tensors[k] for k in sorted(tensors)}, metadata={"arch": learned.ARCH})
    sha = hashlib.sha256(blob).hexdigest()
    weights = directory / f"{name}{WEIGHTS_SUFFIX}"
    if weights.exists() and sha256_file(weights) != sha:
        _retire(weights, sha256_file(weights))
    parameters = sum(w.size + b.size for net in model.layers.values() for w, b, _ in net)
    card = ModelCard(name=name, arch=learned.ARCH, image_size=0, latent_dim=0, latent_bits=0,
                     latent_bytes=0, parameters=int(parameters), sha256=sha, description=description,
                     training=training, metrics=metrics)
    _atomic_write(weights, blob)
    _atomic_write(directory / f"{name}{CARD_SUFFIX}", card.to_json().encode())
    logger.info("saved coder model %s (sha256 %s)", name, sha[:16])
    return learned.model_from_tensors(tensors, sha, card), card


__all__ = ["CoderTrainConfig", "collect", "fit_histograms", "measure", "save_coder_model", "train_coder"]
