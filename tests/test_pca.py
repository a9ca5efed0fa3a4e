"""The ``pca`` architecture: the linear baseline every learned latent is measured against.

It is fitted in closed form by ``latentpacs train --arch pca`` and then archives and
decodes through the product like any model (16-byte latent, integer decoding).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from latentpacs import phantom
from latentpacs.codec.engine import Engine
from latentpacs.codec.integer import LOGIT_FRAC_BITS
from latentpacs.codec.modelfile import load_model
from latentpacs.errors import ModelError
from latentpacs.train import CachedImageDataset, TrainConfig, TrainResult, train

SIZE = 32


def _config(data: Path, out: Path, **changes: object) -> TrainConfig:
    base = TrainConfig(data_dirs=(data,), arch="pca", out=out, epochs=1, batch_size=8, image_size=SIZE,
                       seed=0, command="latentpacs train --arch pca (test)")
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, Path]:
    data = tmp_path_factory.mktemp("pca-data")
    phantom.generate(data, 48, 11, size=(128, 104))
    out = tmp_path_factory.mktemp("pca-model") / "pca"
    return train(_config(data, out), progress=False), out


def test_pca_is_the_best_linear_code_of_its_training_images(fitted: tuple[TrainResult, Path]) -> None:
    result, out = fitted
    loaded = load_model(out.with_suffix(".safetensors"))
    images = CachedImageDataset(result.split.train, SIZE, progress=False)
    x = torch.stack([images[i] for i in range(len(images))]).double()
    flat = x.reshape(len(images), -1).numpy()
    centred = flat - flat.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    best = centred @ vt[:16].T @ vt[:16]  # Eckart-Young: the best rank-16 approximation
    model = loaded.model.double()
    with torch.no_grad():
        ours = model.decode_logits(model.encode(x)).reshape(len(images), -1).numpy() - flat.mean(axis=0)
    best_error = float(np.mean((centred - best) ** 2))
    assert float(np.mean((centred - ours) ** 2)) == pytest.approx(best_error, rel=1e-6)
    assert best_error == pytest.approx(float(np.sum(singular[16:] ** 2)) / centred.size, rel=1e-6)
    assert best_error < 0.5 * float(np.mean(centred ** 2))  # far better than the mean image alone


def test_pca_archives_16_bytes_and_decodes_through_the_integer_engine(fitted: tuple[TrainResult, Path]) -> None:
    _, out = fitted
    loaded = load_model(out.with_suffix(".safetensors"))
    image = phantom.render_image(phantom.PhantomSpec(256, 208, "MLO", "R", 12, "MONOCHROME2", "FOR PRESENTATION"),
                                 np.random.default_rng(99))
    with Engine(loaded) as engine:
        latent = engine.encode([image])[0]
        decoded = engine.decode_uint16([latent], [(SIZE, SIZE)])[0]
        again = engine.decode_uint16([latent], [(SIZE, SIZE)])[0]
    assert len(latent) == 16 and np.array_equal(decoded, again)
    z = torch.from_numpy(loaded.latent_format.from_bytes(latent))[None].double()
    with torch.no_grad():
        expected = loaded.model.double().decode(z)[0, 0].numpy() * 65535
    # the identity output keeps LOGIT_FRAC_BITS bits: the integer image is the float one to that precision
    assert np.abs(decoded - expected).max() <= 65535 * 2.0 ** -LOGIT_FRAC_BITS


def test_pca_card_says_it_was_fitted_not_trained(fitted: tuple[TrainResult, Path]) -> None:
    result, out = fitted
    split = json.loads((out.parent / f"{out.name}.checkpoints" / "split.json").read_text())
    assert len(split["train"]) == result.card.training["train_images"]  # which images it saw
    card = result.card
    assert card.arch == "pca" and card.latent_bytes == 16
    assert str(card.training["optimizer"]).startswith("none: fitted in closed form")
    assert card.training["epochs"] == 0 and "fitted in closed form" in card.description
    assert int(str(card.metrics["test_images"])) > 0 and 0 < float(str(card.metrics["test_mse"])) < 0.05
    assert result.history[0]["train_loss"] <= result.history[0]["val_loss"] + 0.05


def test_too_few_images_for_the_components_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "few"
    phantom.generate(data, 12, 5, size=(128, 104))
    with pytest.raises(ModelError, match="16 components need at least 17 training images"):
        train(_config(data, tmp_path / "pca"), progress=False)
    assert not (tmp_path / "pca.safetensors").exists()
