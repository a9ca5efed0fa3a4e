"""Model files: safetensors weights plus a JSON model card; identity = SHA-256 of the weights.

A model named ``NAME`` is two files in the models directory:

``NAME.safetensors``
    Every tensor of the model's state dict (weights, BatchNorm statistics and the latent
    quantisation ranges), with ``__metadata__`` naming the architecture, input size,
    latent dimension and bits. The JSON header is written with sorted keys, so the same
    weights always give the same bytes and the same SHA-256. No pickles anywhere.
``NAME.json``
    The :class:`ModelCard`: architecture, sizes, latent format, parameter count, the
    weights' SHA-256, training data and command, measured metrics.

Every latent names its model by that SHA-256; :func:`load_model` hashes the exact bytes
it then deserialises and refuses a file whose hash differs from its card or the caller's
expectation, so a latent is never decoded by a model other than the one that made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from latentpacs.codec.cards import (  # re-exported: the torch-free half of model files
    CARD_SUFFIX,
    RETIRED_DIR,
    WEIGHTS_SUFFIX,
    ModelCard,
    default_models_dir,
    find_model_by_sha256,
    list_models,
    read_card,
    sha256_file,
    weights_path,
)
from latentpacs.codec.latent import LatentFormat
from latentpacs.codec.learned import ARCH as CODER_ARCH
from latentpacs.codec.models import LatentAutoencoder, build_model, count_parameters
from latentpacs.errors import ModelError, ModelHashMismatchError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A verified model ready for inference (``eval()`` mode)."""

    model: LatentAutoencoder
    card: ModelCard
    latent_format: LatentFormat
    weights_path: Path


def _canonical(blob: bytes) -> bytes:
    """Rewrite a safetensors blob's JSON header with sorted keys (offsets are unchanged)."""
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + length :]


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its header is 8-byte length + JSON)."""
    try:
        (length,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + length])
    except (struct.error, ValueError) as exc:
        raise ModelError(f"weights file has no readable safetensors header: {exc}") from exc
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return meta if isinstance(meta, dict) else {}


def _atomic_write(path: Path, data: bytes) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; model files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(
    model: LatentAutoencoder,
    directory: Path,
    name: str,
    *,
    description: str,
    training: Mapping[str, object],
    metrics: Mapping[str, object],
) -> ModelCard:
    """Write ``directory/name.safetensors`` and its card ``directory/name.json``.

    Both files are written atomically. A model is never deleted: when ``name`` exists with
    different weights, the old weights and card move to ``directory/retired/`` (named
    ``NAME-<sha256[:16]>``) with a warning, and :func:`find_model_by_sha256` still finds
    them there, so every latent naming the old hash stays decodable. This is the one
    place latentpacs replaces a model file and nothing deletes one, so a model that any
    archived latent names can never be deleted (DESIGN.md, "Model identity") without the
    archive being asked: there is no deletion for it to guard.

    Raises
    ------
    ModelError
        When ``name`` is not a plain file name.
    """
    if not name or Path(name).name != name or name.startswith("."):
        raise ModelError(f"model name {name!r} must be a plain file name")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        "arch": model.arch,
        "image_size": str(model.image_size),
        "latent_dim": str(model.latent_dim),
        "latent_bits": str(model.latent_bits),
    }
    blob = _canonical(save_safetensors(tensors, metadata=metadata))
    sha = hashlib.sha256(blob).hexdigest()
    weights = directory / f"{name}{WEIGHTS_SUFFIX}"
    if weights.exists():
        previous = sha256_file(weights)
        if previous != sha:
            _retire(weights, previous)
    card = ModelCard(
        name=name,
        arch=model.arch,
        image_size=model.image_size,
        latent_dim=model.latent_dim,
        latent_bits=model.latent_bits,
        latent_bytes=LatentFormat.from_model(model).nbytes,
        parameters=count_parameters(model),
        sha256=sha,
        description=description,
        training=dict(training),
        metrics=dict(metrics),
    )
    _atomic_write(weights, blob)
    _atomic_write(directory / f"{name}{CARD_SUFFIX}", card.to_json().encode())
    logger.info("saved model %s (%s, sha256 %s)", name, model.arch, sha[:16])
    return card


def _retire(weights: Path, sha: str) -> None:
    """Move a replaced model's weights and card to ``retired/`` beside it, never deleting them."""
    retired = weights.parent / RETIRED_DIR
    retired.mkdir(exist_ok=True)
    target = retired / f"{weights.name[: -len(WEIGHTS_SUFFIX)]}-{sha[:16]}{WEIGHTS_SUFFIX}"
    card = weights.with_suffix(CARD_SUFFIX)
    if card.is_file():
        os.replace(card, target.with_suffix(CARD_SUFFIX))
    os.replace(weights, target)
    logger.warning(
        "model %s replaced: the previous weights (sha256 %s) are kept as %s", weights, sha[:16], target
    )


def load_model(
    name_or_path: str | Path,
    *,
    models_dir: Path | None = None,
    expected_sha256: str | None = None,
    device: str = "cpu",
) -> LoadedModel:
    """Load and verify a model by name (in ``models_dir``) or by weights path.

    Raises
    ------
    ModelHashMismatchError
        When the weights' SHA-256 differs from the card's or from ``expected_sha256``.
    ModelError
        When a file is missing or unreadable, or the card disagrees with the weights.
    """
    weights = weights_path(name_or_path, models_dir)
    try:
        blob = weights.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model weights {weights}: {exc.strerror}") from exc
    card = read_card(weights)
    if card.arch == CODER_ARCH:
        raise ModelError(f"{weights.name} is the stream coder's model ({card.arch}), not an "
                         "autoencoder: it serves codec.coder = learned, not codec.model")
    sha = hashlib.sha256(blob).hexdigest()
    if sha != card.sha256.lower():
        raise ModelHashMismatchError(
            f"{weights.name}: SHA-256 {sha[:16]}... differs from its card's {card.sha256[:16]}..."
        )
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise ModelHashMismatchError(
            f"{weights.name}: SHA-256 {sha[:16]}... is not the expected {expected_sha256[:16]}..."
        )
    meta = _metadata(blob)
    keys = ("arch", "image_size", "latent_dim", "latent_bits")
    expected = {key: str(getattr(card, key)) for key in keys}
    if any(meta.get(k) != v for k, v in expected.items()):
        raise ModelError(f"{weights.name}: weights metadata {meta} disagree with its card")
    model = build_model(
        card.arch,
        image_size=card.image_size,
        latent_dim=card.latent_dim,
        latent_bits=card.latent_bits,
    )
    try:
        model.load_state_dict(load_safetensors(blob), strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise ModelError(f"{weights.name}: weights do not fit {card.arch}: {exc}") from exc
    model.to(torch.device(device)).eval()
    logger.info("loaded model %s (%s, sha256 %s) on %s", card.name, card.arch, sha[:16], device)
    return LoadedModel(model, card, LatentFormat.from_model(model), weights)


__all__ = [
    "CARD_SUFFIX", "RETIRED_DIR", "WEIGHTS_SUFFIX", "LoadedModel", "ModelCard",
    "default_models_dir", "find_model_by_sha256", "list_models", "load_model", "read_card",
    "save_model", "sha256_file", "weights_path",
]
