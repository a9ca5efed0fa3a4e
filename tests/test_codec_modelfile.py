"""Model files: safetensors + card round trip, SHA-256 identity and its verification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentpacs.codec.latent import calibrate
from latentpacs.codec.modelfile import (
    ModelCard,
    find_model_by_sha256,
    list_models,
    load_model,
    save_model,
    sha256_file,
)
from latentpacs.codec.models import build_model
from latentpacs.errors import ModelError, ModelHashMismatchError

TRAINING = {"data": "phantom, 8 images, seed 0", "command": "latentpacs train --arch vae"}


def _save(directory: Path, name: str = "tiny", arch: str = "vae", seed: int = 0) -> ModelCard:
    torch.manual_seed(seed)
    model = build_model(arch, image_size=64, latent_bits=6)
    model.train()(torch.rand(4, 1, 64, 64))  # move the BatchNorm statistics off their defaults
    model.eval()
    with torch.no_grad():
        calibrate(model, model.encode(torch.rand(6, 1, 64, 64)).numpy())
    return save_model(
        model, directory, name, description="test model", training=TRAINING, metrics={"mse": 0.01}
    )


def test_save_then_load_gives_identical_outputs(tmp_path: Path) -> None:
    card = _save(tmp_path)
    assert card.sha256 == sha256_file(tmp_path / "tiny.safetensors")
    assert card.latent_bytes == 12 and card.arch == "vae" and card.parameters > 0
    loaded = load_model("tiny", models_dir=tmp_path)
    again = load_model(tmp_path / "tiny.safetensors")
    assert loaded.card == card and not loaded.model.training
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode(x), again.model.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(
            loaded.model.decode(torch.zeros(1, 16)), again.model.decode(torch.zeros(1, 16))
        )
    assert loaded.latent_format.bits == 6
    assert loaded.latent_format.low == again.latent_format.low != (-4.0,) * 16


def test_saving_the_same_weights_twice_gives_the_same_sha256(tmp_path: Path) -> None:
    first = _save(tmp_path / "a", seed=5)
    second = _save(tmp_path / "b", seed=5)
    assert first.sha256 == second.sha256


def test_card_is_json_with_the_documented_fields(tmp_path: Path) -> None:
    card = _save(tmp_path)
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert data["training"] == TRAINING and data["metrics"] == {"mse": 0.01}
    assert data["image_size"] == 64 and data["latent_dim"] == 16 and data["latent_bits"] == 6
    assert ModelCard.from_json(card.to_json()) == card
    with pytest.raises(ModelError, match="latent_dim"):
        ModelCard.from_json(json.dumps({**data, "latent_dim": "16"}))


def test_a_flipped_byte_in_the_weights_is_refused(tmp_path: Path) -> None:
    _save(tmp_path)
    weights = tmp_path / "tiny.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-100] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelHashMismatchError, match="differs from its card"):
        load_model("tiny", models_dir=tmp_path)


def test_an_unexpected_sha256_is_refused(tmp_path: Path) -> None:
    card = _save(tmp_path)
    assert load_model("tiny", models_dir=tmp_path, expected_sha256=card.sha256.upper())
    with pytest.raises(ModelHashMismatchError, match="not the expected"):
        load_model("tiny", models_dir=tmp_path, expected_sha256="0" * 64)


def test_missing_model_raises_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read model weights"):
        load_model("absent", models_dir=tmp_path)
    with pytest.raises(ModelError, match="plain file name"):
        _save(tmp_path, name="../escape")


def test_list_and_find_by_sha256(tmp_path: Path) -> None:
    one = _save(tmp_path, "one", "ae", seed=1)
    two = _save(tmp_path, "two", "vae", seed=2)
    (tmp_path / "notes.json").write_text("{}")  # a stray JSON without weights is ignored
    assert [c.name for c in list_models(tmp_path)] == ["one", "two"]
    assert find_model_by_sha256(two.sha256, tmp_path) == tmp_path / "two.safetensors"
    assert find_model_by_sha256(one.sha256, tmp_path).name == "one.safetensors"
    with pytest.raises(ModelError, match="no model"):
        find_model_by_sha256("f" * 64, tmp_path)


def test_default_models_dir_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = _save(tmp_path)
    monkeypatch.setenv("LATENTPACS_MODELS", str(tmp_path))
    assert [c.sha256 for c in list_models()] == [card.sha256]
    assert np.isclose(load_model("tiny").card.metrics["mse"], 0.01)


def test_a_replaced_model_is_retired_not_deleted(tmp_path: Path) -> None:
    """Saving new weights under a used name keeps the old ones findable by their hash."""
    old = _save(tmp_path, "ae-model", "ae", seed=1)
    new = _save(tmp_path, "ae-model", "ae", seed=2)
    assert old.sha256 != new.sha256
    assert [c.sha256 for c in list_models(tmp_path)] == [new.sha256]  # the name means the new one
    kept = find_model_by_sha256(old.sha256, tmp_path)
    assert kept.parent.name == "retired" and sha256_file(kept) == old.sha256
    assert load_model(kept, expected_sha256=old.sha256).card.sha256 == old.sha256
    assert find_model_by_sha256(new.sha256, tmp_path) == tmp_path / "ae-model.safetensors"
    _save(tmp_path, "ae-model", "ae", seed=2)  # the same weights again: nothing is retired
    assert len(list((tmp_path / "retired").glob("*.safetensors"))) == 1
