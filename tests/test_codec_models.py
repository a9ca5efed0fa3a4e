"""Architectures: shapes, parameter budgets, losses of the paper and compact models."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from latentpacs.codec.models import ARCHITECTURES, build_model, count_parameters
from latentpacs.errors import ModelError


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_arch_maps_images_to_16_numbers_and_back(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, image_size=64).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        z = model.encode(x)
        recon = model.decode(z)
        out = model.train()(x)
    assert z.shape == (3, 16)
    assert recon.shape == (3, 1, 64, 64)
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0
    assert out.recon.shape == x.shape and out.z.shape == (3, 16)
    assert (out.mu is None) == ("vae" not in arch)


def test_latent_dim_and_image_size_are_configurable() -> None:
    model = build_model("ae", image_size=128, latent_dim=32, latent_bits=6).eval()
    with torch.no_grad():
        z = model.encode(torch.rand(2, 1, 128, 128))
    assert z.shape == (2, 32)
    assert model.latent_low.shape == (32,) and model.latent_bits == 6


def test_paper_model_has_the_papers_flatten_to_dense_layout() -> None:
    model = build_model("paper-ae", image_size=128)
    # two stride-2 convs: 128 -> 32 x 32 x 64 features into the dense layer
    assert model.to_mu.in_features == 32 * 32 * 64
    expected_dense = 2 * 32 * 32 * 64 * 16 + 16 + 32 * 32 * 64
    convs = count_parameters(model) - expected_dense
    assert 0 < convs < 200_000
    vae = build_model("paper-vae", image_size=128)
    assert count_parameters(vae) - count_parameters(model) == 32 * 32 * 64 * 16 + 16


@pytest.mark.parametrize("arch", ["ae", "vae"])
def test_compact_models_stay_under_two_million_parameters_at_1024(arch: str) -> None:
    model = build_model(arch, image_size=1024)
    assert model.to_mu.in_features == 16 * 16 * 64
    assert count_parameters(model) <= 2_000_000


@pytest.mark.parametrize("arch", ["ae-r16", "vae-r16"])
def test_fine_grid_models_keep_an_8x8_grid_at_128(arch: str) -> None:
    model = build_model(arch, image_size=128).eval()
    assert model.to_mu.in_features == 8 * 8 * 64
    assert count_parameters(model) < 500_000
    # the last layer overlaps (kernel 4, stride 2), unlike the compact family's 4x4 blocks
    last = list(model.head)[-1]
    assert isinstance(last, torch.nn.ConvTranspose2d) and last.stride == (2, 2) and last.kernel_size == (4, 4)
    with pytest.raises(ModelError, match="multiple of 16"):
        build_model(arch, image_size=120)


def test_unknown_arch_and_bad_sizes_raise_model_error() -> None:
    with pytest.raises(ModelError, match="known: ae, ae-r16, paper-ae, paper-vae, pca, vae, vae-r16"):
        build_model("resnet")
    with pytest.raises(ModelError, match="multiple of 64"):
        build_model("ae", image_size=100)
    with pytest.raises(ModelError, match="latent_bits"):
        build_model("vae", image_size=64, latent_bits=17)
    model = build_model("ae", image_size=64)
    with pytest.raises(ModelError, match="expects input"):
        model.encode(torch.rand(1, 1, 32, 32))


def test_ae_loss_is_mean_squared_error() -> None:
    torch.manual_seed(1)
    model = build_model("ae", image_size=64).train()
    x = torch.rand(2, 1, 64, 64)
    out = model(x)
    expected = ((out.recon - x) ** 2).mean()
    torch.testing.assert_close(model.loss(x, out), expected)


@pytest.mark.parametrize("arch", ["vae", "paper-vae"])
def test_vae_loss_is_pixel_bce_plus_kl_per_image(arch: str) -> None:
    torch.manual_seed(2)
    model = build_model(arch, image_size=64).train()
    x = torch.rand(2, 1, 64, 64)
    out = model(x)
    assert out.mu is not None and out.logvar is not None
    r = out.recon.double()
    bce = -(x * torch.log(r) + (1 - x) * torch.log(1 - r)).sum(dim=(1, 2, 3))
    mu, logvar = out.mu.double(), out.logvar.double()
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(dim=1)
    expected = (bce + kl).mean()
    torch.testing.assert_close(model.loss(x, out).double(), expected, rtol=1e-4, atol=1e-3)
    without_logits = replace(out, logits=None)  # an output built by hand, from recon alone
    from_recon = model.loss(x, without_logits).double()
    torch.testing.assert_close(from_recon, expected, rtol=1e-4, atol=1e-3)


def test_vae_encodes_to_its_mean_deterministically() -> None:
    model = build_model("vae", image_size=64).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        first, second = model.encode(x), model.encode(x)
        sampled = model(x)  # the training pass samples, whatever the mode
    torch.testing.assert_close(first, second)
    assert sampled.mu is not None
    torch.testing.assert_close(sampled.mu, first)
    assert not torch.equal(sampled.z, sampled.mu)


def test_a_few_training_steps_reduce_the_ae_loss() -> None:
    torch.manual_seed(3)
    model = build_model("ae", image_size=64).train()
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(4, 1, 64, 64).contiguous()
    x = ramp * torch.rand(4, 1, 1, 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        optimiser.zero_grad()
        loss = model.loss(x, model(x))
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        assert F.mse_loss(model.eval().decode(model.encode(x)), x) < losses[0]
