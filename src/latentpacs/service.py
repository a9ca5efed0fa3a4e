"""Where the layers meet: image in -> pixels -> codec -> record; record -> codec -> derive -> image out.

The encode and decode chains here are shared by the ``.lpz`` files (:mod:`latentpacs.lpz`)
and the node's archive (:class:`Service`), so a file and a C-GET of the same image give
the same pixels and the same derived identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from latentpacs.codec.engine import Engine
from latentpacs.codec.residual import decode_residual, encode_residual
from latentpacs.codec.tiers import Tier
from latentpacs.derive import Derivation, build_returned
from latentpacs.errors import LatentFormatError
from latentpacs.pixels import (
    PixelModule,
    canonical_to_stored,
    original_stored_bytes,
    stored_to_canonical,
    stored_values,
)


@dataclass(frozen=True)
class ModelRef:
    """The model a latent was made with; ``sha256`` (of its weights file) is its identity."""

    name: str
    sha256: str
    arch: str
    latent_dim: int
    latent_bits: int


@dataclass(frozen=True)
class EncodedImage:
    """One image as latentpacs keeps it.

    Parameters
    ----------
    tier:
        The fidelity tier it was archived at.
    model:
        The model that made ``latent``.
    module:
        The original Image Pixel module (PS3.3 C.7.6.3).
    original_transfer_syntax:
        The Transfer Syntax UID the image arrived in (PS3.5 Section 10).
    original_stored_bytes:
        Size of the Pixel Data as it arrived (the numerator of the compression ratio).
    header:
        The original data set without Pixel Data, as DICOM JSON (PS3.18 F.2).
    latent:
        The quantised latent bytes.
    residual:
        The JPEG-LS stream of the stored values (``b""`` for the latent tier).
    """

    tier: Tier
    model: ModelRef
    module: PixelModule
    original_transfer_syntax: str
    original_stored_bytes: int
    header: dict[str, Any]
    latent: bytes
    residual: bytes

    @property
    def archived_bytes(self) -> int:
        """Bytes that carry the image: latent plus residual."""
        return len(self.latent) + len(self.residual)

    @property
    def ratio(self) -> float:
        """Original stored bytes over archived bytes (Lossy Image Compression Ratio)."""
        return self.original_stored_bytes / max(self.archived_bytes, 1)

    @property
    def derivation(self) -> Derivation:
        """How a retrieval of this image is derived (model, tier, ratio)."""
        return Derivation(self.model.name, self.model.sha256, self.tier, self.ratio)

    def dataset_header(self) -> Dataset:
        """The archived header as a pydicom Dataset."""
        return Dataset.from_json(self.header)


def header_json(ds: Dataset) -> dict[str, Any]:
    """The data set without Pixel Data as a DICOM JSON object (PS3.18 F.2)."""
    header = Dataset()
    header.update(ds)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in header:
            del header[keyword]
    return header.to_json_dict()


def model_ref(engine: Engine) -> ModelRef:
    """The identity of the engine's model."""
    card = engine.loaded.card
    return ModelRef(card.name, card.sha256, card.arch, card.latent_dim, card.latent_bits)


def encode_datasets(datasets: Sequence[Dataset], engine: Engine, tier: Tier) -> list[EncodedImage]:
    """Encode data sets at ``tier``, sharing one engine batch.

    Each image's pixel data is decoded exactly once; the JPEG-LS stream (for the
    ``lossless`` and ``near-lossless`` tiers) codes the stored values themselves, so its
    guarantee never depends on floating-point network output.

    Raises
    ------
    LatentPacsError
        When an image cannot be archived (the subclass names what is wrong).
    """
    decoded = [stored_values(ds) for ds in datasets]
    images = [stored_to_canonical(stored, module) for stored, module in decoded]
    latents = engine.encode(images)
    model = model_ref(engine)
    encoded = []
    for ds, (stored, module), latent in zip(datasets, decoded, latents):
        residual = (
            encode_residual(stored, module.bits_stored, tier.near) if tier.has_residual else b""
        )
        encoded.append(
            EncodedImage(
                tier=tier,
                model=model,
                module=module,
                original_transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                original_stored_bytes=original_stored_bytes(ds),
                header=header_json(ds),
                latent=latent,
                residual=residual,
            )
        )
    return encoded


def decode_stored(image: EncodedImage, engine: Engine | None) -> np.ndarray:
    """The stored pixel values a retrieval returns, uint16 (rows, cols).

    The ``lossless`` and ``near-lossless`` tiers read the JPEG-LS stream and need no
    model; the ``latent`` tier decodes with ``engine``, whose model must be the one the
    image names (checked by SHA-256).
    """
    module = image.module
    if image.tier.has_residual:
        stored = decode_residual(image.residual)
        if stored.shape != (module.rows, module.columns):
            raise LatentFormatError(
                f"residual is {stored.shape[0]}x{stored.shape[1]}, "
                f"geometry says {module.rows}x{module.columns}"
            )
        return stored
    if engine is None or engine.loaded.card.sha256 != image.model.sha256:
        raise LatentFormatError(
            f"latent was made by model sha256 {image.model.sha256[:16]}; decode it with that model"
        )
    (canonical,) = engine.decode([image.latent], [(module.rows, module.columns)])
    return canonical_to_stored(canonical, module)


def returned_dataset(image: EncodedImage, engine: Engine | None) -> Dataset:
    """The DICOM object a retrieval returns: derived for lossy tiers, the original for lossless."""
    return build_returned(image.dataset_header(), decode_stored(image, engine), image.module, image.derivation)
