"""Model cards and weights files, without torch: what a node needs to name a model.

A model named ``NAME`` is ``NAME.safetensors`` (its weights; their SHA-256 is the model's
identity) plus the card ``NAME.json`` (:class:`ModelCard`); :mod:`latentpacs.codec.modelfile`
loads the weights into torch. This half reads cards and hashes files only, so a node
that archives streams (whose records name the model but never run it) does not import
torch until a latent must be decoded (:func:`verified_card`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from latentpacs.errors import ModelError, ModelHashMismatchError

logger = logging.getLogger(__name__)

WEIGHTS_SUFFIX = ".safetensors"
#: Where replaced models are kept, so latents naming them stay decodable.
RETIRED_DIR = "retired"
CARD_SUFFIX = ".json"
_INT_FIELDS = ("image_size", "latent_dim", "latent_bits", "latent_bytes", "parameters")
_STR_FIELDS = ("name", "arch", "sha256", "description")


@dataclass(frozen=True)
class ModelCard:
    """The JSON card that documents a weights file."""

    name: str
    arch: str
    image_size: int
    latent_dim: int
    latent_bits: int
    latent_bytes: int
    parameters: int
    sha256: str
    description: str
    training: Mapping[str, object] = field(default_factory=dict, hash=False)
    metrics: Mapping[str, object] = field(default_factory=dict, hash=False)

    def to_json(self) -> str:
        """The card as indented JSON with sorted keys."""
        data = asdict(self)
        data["training"], data["metrics"] = dict(self.training), dict(self.metrics)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        """Parse a card; a malformed card raises :class:`ModelError` naming the field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"model card is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ModelError("model card must be a JSON object")
        for key in _INT_FIELDS:
            if not isinstance(data.get(key), int) or isinstance(data.get(key), bool):
                raise ModelError(f"model card field {key!r} must be an integer")
        for key in _STR_FIELDS:
            if not isinstance(data.get(key), str):
                raise ModelError(f"model card field {key!r} must be a string")
        for key in ("training", "metrics"):
            if not isinstance(data.get(key, {}), dict):
                raise ModelError(f"model card field {key!r} must be an object")
        return cls(
            **{key: data[key] for key in _INT_FIELDS + _STR_FIELDS},
            training=data.get("training", {}),
            metrics=data.get("metrics", {}),
        )


def default_models_dir() -> Path:
    """``$LATENTPACS_MODELS`` when set, else the shipped models.

    The shipped models are ``latentpacs/models/`` inside the package: an installed wheel
    carries them there, and in a source checkout it is a link to the top-level
    ``models/`` (with its ``retired/``). A checkout where that link did not survive (a
    plain file, or no link at all) falls back to ``models/`` at the repository root.
    """
    env = os.environ.get("LATENTPACS_MODELS")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    shipped = package / "models"
    if shipped.is_dir():
        return shipped
    return package.parents[1] / "models"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_path(name_or_path: str | Path, models_dir: Path | None) -> Path:
    """The weights file of a model name (in ``models_dir``) or of a weights path."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(WEIGHTS_SUFFIX) or os.sep in text:
        return Path(name_or_path)
    return (models_dir or default_models_dir()) / f"{text}{WEIGHTS_SUFFIX}"


def read_card(weights: Path) -> ModelCard:
    """The card beside a weights file (not hash-checked here)."""
    card_path = weights.with_suffix(CARD_SUFFIX)
    try:
        return ModelCard.from_json(card_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"cannot read model card {card_path}: {exc.strerror}") from exc


def verified_card(name_or_path: str | Path, *, models_dir: Path | None = None) -> tuple[Path, ModelCard]:
    """A model's weights path and card, the weights' SHA-256 checked against the card.

    Raises
    ------
    ModelHashMismatchError
        When the weights' SHA-256 differs from the card's.
    ModelError
        When a file is missing or unreadable.
    """
    weights = weights_path(name_or_path, models_dir)
    card = read_card(weights)
    try:
        sha = sha256_file(weights)
    except OSError as exc:
        raise ModelError(f"cannot read model weights {weights}: {exc.strerror}") from exc
    if sha != card.sha256.lower():
        raise ModelHashMismatchError(
            f"{weights.name}: SHA-256 {sha[:16]}... differs from its card's {card.sha256[:16]}..."
        )
    return weights, card


def _cards(directory: Path) -> list[tuple[Path, ModelCard]]:
    """(weights path, card) of every readable card in ``directory`` that has weights."""
    found = []
    for card_path in sorted(directory.glob(f"*{CARD_SUFFIX}")):
        weights = card_path.with_suffix(WEIGHTS_SUFFIX)
        if not weights.is_file():
            continue
        try:
            found.append((weights, ModelCard.from_json(card_path.read_text(encoding="utf-8"))))
        except (ModelError, OSError) as exc:
            logger.warning("skipping %s: %s", card_path, exc)
    return found


def list_models(models_dir: Path | None = None) -> list[ModelCard]:
    """Cards of the models in ``models_dir`` that have a weights file, sorted by name.

    Unreadable cards are skipped with a warning; the files are not hashed here.
    """
    cards = [card for _, card in _cards(Path(models_dir or default_models_dir()))]
    return sorted(cards, key=lambda card: card.name)


def find_model_by_sha256(sha256: str, models_dir: Path | None = None) -> Path:
    """The weights file in ``models_dir`` (or its ``retired/``) whose content has this SHA-256.

    Candidates come from the cards; the match is confirmed by hashing the file.

    Raises
    ------
    ModelError
        When no model in the directory has that hash.
    """
    wanted = sha256.lower()
    directory = Path(models_dir or default_models_dir())
    for weights, card in [*_cards(directory), *_cards(directory / RETIRED_DIR)]:
        if card.sha256.lower() == wanted and sha256_file(weights) == wanted:
            return weights
    raise ModelError(f"no model with SHA-256 {sha256[:16]}... in {directory}")
