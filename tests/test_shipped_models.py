"""The weights shipped in models/: they load, hash-verify and reconstruct fresh phantoms.

Fresh means a seed the training data never used (the cards name the training command).
"""

from __future__ import annotations

from pathlib import Path
from statistics import median

import numpy as np
import pytest

from latentpacs import phantom
from latentpacs.codec.engine import Engine, resize_bilinear
from latentpacs.codec.modelfile import default_models_dir, list_models, load_model, sha256_file
from latentpacs.evaluate.metrics import PAPER_SIZE, paper_mse
from latentpacs.image.pixels import read_file, to_canonical

FRESH_SEED = 424242


@pytest.fixture(scope="module")
def fresh_images(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    paths = phantom.generate(tmp_path_factory.mktemp("fresh"), 8, FRESH_SEED, size=(1024, 832), images_per_study=1)
    return [to_canonical(read_file(p))[0] for p in paths]


def test_shipped_models_are_listed_with_verified_hashes() -> None:
    cards = {card.name: card for card in list_models()}
    assert {"ae", "vae"} <= set(cards)
    for name in ("ae", "vae"):
        card = cards[name]
        assert card.sha256 == sha256_file(default_models_dir() / f"{name}.safetensors")
        assert card.image_size == 1024 and card.latent_dim == 16
        assert card.latent_bytes <= 64
        assert card.parameters <= 2_000_000
        assert "latentpacs train" in str(card.training["command"])


@pytest.mark.parametrize(("name", "fraction"), [("ae", 0.25), ("vae", 0.25), ("pca", 0.25)])
def test_reconstruction_error_is_well_below_image_variance(name: str, fraction: float, fresh_images) -> None:
    with Engine(load_model(name)) as engine:
        latents = engine.encode(fresh_images)
        recons = engine.decode(latents, [img.shape for img in fresh_images])
    assert all(len(latent) <= 64 for latent in latents)
    errors = [paper_mse(img, rec) for img, rec in zip(fresh_images, recons)]
    variances = [float(np.var(resize_bilinear(img, PAPER_SIZE))) for img in fresh_images]
    assert median(errors) < fraction * median(variances), (errors, variances)
    # The card's held-out figure is this very measurement (integer decoding: exact).
    metrics = load_model(name).card.metrics
    assert metrics["test_images"] == len(fresh_images)
    assert median(errors) == pytest.approx(metrics["test_mse_median"], rel=1e-4)


def test_the_shipped_pca_baseline_was_fitted_on_the_training_images_of_ae_and_vae() -> None:
    """PCA-16, the linear baseline of every report, saw exactly the data the models trained on."""
    cards = {card.name: card for card in list_models()}
    pca = cards["pca"]
    assert pca.arch == "pca" and pca.latent_dim == 16 and pca.latent_bytes == 16
    assert str(pca.training["optimizer"]).startswith("none: fitted in closed form")
    for name in ("ae", "vae"):
        for key in ("data_note", "seed", "train_images", "train_patients", "val_images", "val_patients"):
            assert pca.training.get(key) == cards[name].training.get(key), (name, key)


def test_a_tampered_shipped_model_is_refused(tmp_path: Path) -> None:
    from latentpacs.errors import ModelHashMismatchError

    for suffix in (".safetensors", ".json"):
        (tmp_path / f"ae{suffix}").write_bytes((default_models_dir() / f"ae{suffix}").read_bytes())
    weights = tmp_path / "ae.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelHashMismatchError):
        load_model("ae", models_dir=tmp_path)
