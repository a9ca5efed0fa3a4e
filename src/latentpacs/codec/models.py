"""Autoencoder architectures with a dense latent bottleneck, and their registry.

Five architectures share one contract (:class:`LatentAutoencoder`):

``paper-ae`` / ``paper-vae``
    The networks of "Learning Representations for High-Fidelity Image Compression":
    two stride-2 3x3 convolutions (BatchNorm, LeakyReLU 0.2) to S/4 x S/4 x 64, a
    dense layer to the latent, and a ConvTranspose2d decoder. At S = 1024 the dense
    layers alone hold ~134M weights; they exist for replication.
``ae`` / ``vae``
    The compact defaults: a stride-4 stem and four stride-2 blocks bring S = 1024 down
    to 16 x 16 x 64 before the same dense bottleneck, so the whole model stays under
    2M parameters and runs in tens of milliseconds on a CPU.
``pca``
    The linear baseline every learned latent must beat: principal component analysis
    of the training images at the input size (``--image-size 128`` is plenty: 16
    components carry no detail finer than that), fitted in closed form rather than
    trained. The encoder projects onto the first D components, the decoder adds them
    back to the mean image, and the output is the value itself, clipped to [0, 1], not a
    sigmoid.

The AE loss is the mean squared error (paper Eq. 1); the VAE loss is binary cross-entropy
summed over pixels plus the KL divergence summed over latent dimensions, averaged over
the batch (paper Eq. 2). The VAE encodes to its mean for archiving, so inference is
deterministic. Nothing here knows about DICOM; images are canonical float32 in [0, 1].
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentpacs.errors import ModelError

logger = logging.getLogger(__name__)

#: Quantisation range of every latent dimension before :func:`latent.calibrate` sets it.
DEFAULT_LATENT_RANGE = 4.0
#: Largest number of bits per latent dimension the latent format packs.
MAX_LATENT_BITS = 16
_SLOPE = 0.2


@dataclass(frozen=True)
class ModelOutput:
    """What a training pass returns.

    Attributes
    ----------
    recon:
        Reconstruction (B, 1, S, S) in [0, 1].
    z:
        Latent fed to the decoder (B, D); for the VAE a reparameterised sample.
    mu, logvar:
        The VAE's posterior mean and log-variance (B, D); ``None`` for an AE.
    logits:
        The decoder's pre-sigmoid output, when known; the VAE loss then computes BCE
        from it, which is stable where ``recon`` saturates at 0 or 1.
    """

    recon: Tensor
    z: Tensor
    mu: Tensor | None = None
    logvar: Tensor | None = None
    logits: Tensor | None = None


def _down(cin: int, cout: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(_SLOPE, inplace=True),
    )


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(_SLOPE, inplace=True),
    )


class LatentAutoencoder(nn.Module, ABC):
    """Base of every architecture: conv encoder, dense bottleneck, conv decoder.

    Subclasses set :attr:`arch`, :attr:`variational`, :attr:`channels` and
    :attr:`reduction`, and build :attr:`features` (image -> C x s x s) and
    :attr:`head` (C x s x s -> image logits).

    Parameters
    ----------
    image_size:
        Side S of the square input; must be a multiple of :attr:`size_multiple`.
    latent_dim:
        Number of latent dimensions D (16 in the paper).
    latent_bits:
        Bits per latent dimension in the stored format (1 to 16).

    Raises
    ------
    ModelError
        When a size is out of range for the architecture.
    """

    arch: str = ""
    variational: bool = False
    #: ``"sigmoid"``: the head produces logits; ``"identity"``: the value itself.
    output: str = "sigmoid"
    #: Fitted in closed form by :meth:`PrincipalComponents.fit` instead of trained.
    closed_form: bool = False
    latent_low: Tensor
    latent_high: Tensor
    channels: int = 64
    reduction: int = 4
    size_multiple: int = 4

    def __init__(self, image_size: int = 1024, latent_dim: int = 16, latent_bits: int = 8) -> None:
        super().__init__()
        if image_size < self.size_multiple or image_size % self.size_multiple:
            raise ModelError(
                f"{self.arch}: image_size {image_size} must be a positive multiple of "
                f"{self.size_multiple}"
            )
        if latent_dim < 1:
            raise ModelError(f"{self.arch}: latent_dim must be at least 1, got {latent_dim}")
        if not 1 <= latent_bits <= MAX_LATENT_BITS:
            raise ModelError(
                f"{self.arch}: latent_bits must be 1 to {MAX_LATENT_BITS}, got {latent_bits}"
            )
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.latent_bits = latent_bits
        self.side = image_size // self.reduction
        flat = self.channels * self.side * self.side
        self.features = self._build_features()
        self.head = self._build_head()
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim) if self.variational else None
        self.from_latent = nn.Linear(latent_dim, flat)
        self.register_buffer("latent_low", torch.full((latent_dim,), -DEFAULT_LATENT_RANGE))
        self.register_buffer("latent_high", torch.full((latent_dim,), DEFAULT_LATENT_RANGE))

    @abstractmethod
    def _build_features(self) -> nn.Module:
        """Build the convolutional encoder: (B, 1, S, S) -> (B, channels, S/r, S/r)."""

    @abstractmethod
    def _build_head(self) -> nn.Module:
        """Build the convolutional decoder: (B, channels, S/r, S/r) -> (B, 1, S, S) logits."""

    def _flat_features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != (1, self.image_size, self.image_size):
            raise ModelError(
                f"{self.arch} expects input (B, 1, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape)}"
            )
        return torch.flatten(self.features(x), 1)

    def encode(self, x: Tensor) -> Tensor:
        """Encode images (B, 1, S, S) in [0, 1] to latents (B, D); the VAE returns its mean."""
        return self.to_mu(self._flat_features(x))

    def decode_logits(self, z: Tensor) -> Tensor:
        """Decode latents (B, D) to pre-sigmoid images (B, 1, S, S)."""
        h = self.from_latent(z).view(-1, self.channels, self.side, self.side)
        return self.head(h)

    def decode(self, z: Tensor) -> Tensor:
        """Decode latents (B, D) to images (B, 1, S, S) in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: Tensor) -> ModelOutput:
        """Training pass; the VAE samples z = mu + exp(logvar / 2) * eps."""
        h = self._flat_features(x)
        mu = self.to_mu(h)
        if self.to_logvar is None:
            logits = self.decode_logits(mu)
            return ModelOutput(torch.sigmoid(logits), mu, logits=logits)
        logvar = self.to_logvar(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = self.decode_logits(z)
        return ModelOutput(torch.sigmoid(logits), z, mu, logvar, logits)

    def loss(self, x: Tensor, out: ModelOutput) -> Tensor:
        """Training loss, computed in float32 outside any autocast region.

        AE: mean squared error over all pixels (paper Eq. 1). VAE: BCE summed over
        pixels plus KL(q(z|x) || N(0, I)) summed over dimensions, mean over the batch
        (paper Eq. 2).
        """
        with torch.autocast(x.device.type, enabled=False):
            target = x.float()
            if out.mu is None or out.logvar is None:
                return F.mse_loss(out.recon.float(), target)
            if out.logits is not None:
                logits = out.logits.float()
                bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            else:
                bce = F.binary_cross_entropy(out.recon.float(), target, reduction="none")
            mu, logvar = out.mu.float(), out.logvar.float()
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)
            return (bce.flatten(1).sum(dim=1) + kl).mean()


class _PaperFamily(LatentAutoencoder):
    reduction = 4
    size_multiple = 4

    def _build_features(self) -> nn.Module:
        return nn.Sequential(_down(1, 32, 3, 2, 1), _down(32, 64, 3, 2, 1))

    def _build_head(self) -> nn.Module:
        return nn.Sequential(_up(64, 64), _up(64, 32), nn.ConvTranspose2d(32, 1, 3, 1, 1))


class _CompactFamily(LatentAutoencoder):
    reduction = 64
    size_multiple = 64

    def _build_features(self) -> nn.Module:
        widths = (16, 32, 64, 64, 64)
        blocks = [_down(1, widths[0], 4, 4, 0)]
        blocks += [_down(a, b, 3, 2, 1) for a, b in zip(widths, widths[1:])]
        return nn.Sequential(*blocks)

    def _build_head(self) -> nn.Module:
        widths = (64, 64, 64, 32, 16)
        blocks: list[nn.Module] = [_up(a, b) for a, b in zip(widths, widths[1:])]
        blocks.append(nn.ConvTranspose2d(widths[-1], 1, 4, 4, 0))
        return nn.Sequential(*blocks)


class _FineGridFamily(LatentAutoencoder):
    """A stride-4 stem and two stride-2 blocks: S/16 x S/16 x 64 before the dense layer.

    At the 128 x 128 input a 16-number latent can carry, the compact family's S/64 grid
    is 2 x 2 and its last layer paints each 4 x 4 output block from one feature vector;
    this one keeps an 8 x 8 grid (4096 features into the dense bottleneck) and decodes
    with a 3x3 convolution at S/16 and S/8 (depth where it is cheap) and overlapping
    stride-2 transposed convolutions down to the last pixel.
    """

    reduction = 16
    size_multiple = 16

    def _build_features(self) -> nn.Module:
        return nn.Sequential(_down(1, 16, 4, 4, 0), _down(16, 32, 3, 2, 1), _down(32, 64, 3, 2, 1))

    def _build_head(self) -> nn.Module:
        return nn.Sequential(
            _down(64, 64, 3, 1, 1), _up(64, 64), _down(64, 64, 3, 1, 1),
            _up(64, 32), _up(32, 16), nn.ConvTranspose2d(16, 1, 4, 2, 1),
        )


class PaperAE(_PaperFamily):
    """The paper's convolutional autoencoder (MSE loss)."""

    arch = "paper-ae"


class PaperVAE(_PaperFamily):
    """The paper's variational autoencoder (BCE + KL loss)."""

    arch = "paper-vae"
    variational = True


class CompactAE(_CompactFamily):
    """Compact autoencoder: same 16-dim bottleneck, < 2M parameters at 1024 x 1024."""

    arch = "ae"


class CompactVAE(_CompactFamily):
    """Compact variational autoencoder: same bottleneck and loss as ``paper-vae``."""

    arch = "vae"
    variational = True


class FineGridAE(_FineGridFamily):
    """Autoencoder on an S/16 grid (MSE loss); meant for ``--image-size 128``."""

    arch = "ae-r16"


class FineGridVAE(_FineGridFamily):
    """Variational autoencoder on an S/16 grid (BCE + KL loss); meant for ``--image-size 128``."""

    arch = "vae-r16"
    variational = True


class PrincipalComponents(LatentAutoencoder):
    """PCA with D components as an autoencoder: the best linear code of the training set.

    ``encode`` is ``C (x - m)`` and ``decode`` is ``m + C^T z`` clipped to [0, 1], with
    ``m`` the mean training image and ``C`` (D, S*S) the first D right singular vectors of
    the centred training images (:meth:`fit`). The head is a fixed 1x1 identity
    convolution, so the integer decoder of :mod:`latentpacs.codec.integer` runs it like
    any other model, with an identity output table instead of the sigmoid.
    """

    arch = "pca"
    output = "identity"
    closed_form = True
    channels = 1
    reduction = 1
    size_multiple = 1

    def _build_features(self) -> nn.Module:
        return nn.Identity()

    def _build_head(self) -> nn.Module:
        identity = nn.Conv2d(1, 1, 1, bias=False)
        with torch.no_grad():
            identity.weight.fill_(1.0)
        identity.weight.requires_grad_(False)
        return nn.Sequential(identity)

    def decode(self, z: Tensor) -> Tensor:
        """Decode latents (B, D) to images (B, 1, S, S): the mean plus the components, clipped."""
        return self.decode_logits(z).clamp(0.0, 1.0)

    def forward(self, x: Tensor) -> ModelOutput:
        """The projection and its reconstruction (nothing is sampled, nothing trained)."""
        z = self.encode(x)
        return ModelOutput(self.decode(z), z)

    @torch.no_grad()
    def fit(self, images: Tensor) -> None:
        """Fit the mean and components to ``images`` (N, 1, S, S).

        Computed in float64 from the N x N Gram matrix of the centred images (N is small
        next to S*S), so memory is N * S * S values.

        Raises
        ------
        ModelError
            With fewer images than components plus one.
        """
        if images.dim() != 4 or images.shape[1:] != (1, self.image_size, self.image_size):
            raise ModelError(f"pca: fit expects (N, 1, {self.image_size}, {self.image_size}), "
                             f"got {tuple(images.shape)}")
        count = images.shape[0]
        if count < self.latent_dim + 1:
            raise ModelError(f"pca: {self.latent_dim} components need at least {self.latent_dim + 1} "
                             f"training images, got {count}")
        flat = images.reshape(count, -1).to(torch.float64)
        mean = flat.mean(dim=0)
        centred = flat - mean
        eigenvalues, vectors = torch.linalg.eigh(centred @ centred.T)  # ascending
        order = torch.argsort(eigenvalues, descending=True)[: self.latent_dim]
        singular = eigenvalues[order].clamp_min(0.0).sqrt()
        components = (vectors[:, order].T @ centred) / singular.clamp_min(1e-12)[:, None]
        # a deterministic sign: the largest entry of each component is positive
        peak = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
        components = components * torch.where(peak < 0, -1.0, 1.0)
        self.to_mu.weight.copy_(components)
        self.to_mu.bias.copy_(-(components @ mean))
        self.from_latent.weight.copy_(components.T)
        self.from_latent.bias.copy_(mean)


ARCHITECTURES: dict[str, type[LatentAutoencoder]] = {
    cls.arch: cls
    for cls in (PaperAE, PaperVAE, CompactAE, CompactVAE, FineGridAE, FineGridVAE, PrincipalComponents)
}


def build_model(
    arch: str, *, image_size: int = 1024, latent_dim: int = 16, latent_bits: int = 8
) -> LatentAutoencoder:
    """Build an untrained model of a registered architecture.

    Raises
    ------
    ModelError
        When ``arch`` is not registered or a size is invalid for it.
    """
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unknown architecture {arch!r}; known: {known}") from None
    return cls(image_size=image_size, latent_dim=latent_dim, latent_bits=latent_bits)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (buffers such as the latent range excluded)."""
    return sum(p.numel() for p in model.parameters())
