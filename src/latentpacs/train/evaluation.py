"""End-of-training measurements: training latents for calibration, and the paper's MSE.

The MSE is measured the way the archive will serve images: each image is encoded, its
latent quantised to the model's stored bytes (:class:`latentpacs.codec.latent.LatentFormat`)
and decoded from those bytes. It is reported at the model's input size and, for models
whose input is not 1024 x 1024, also at the paper's 1024 x 1024, where the original is
decoded again from its file and both images are resized with the codec's bilinear resize.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from latentpacs.codec.engine import resize_bilinear
from latentpacs.codec.latent import LatentFormat
from latentpacs.codec.models import LatentAutoencoder
from latentpacs.train.data import CachedImageDataset, load_canonical

logger = logging.getLogger(__name__)

PAPER_SIZE = 1024


def autocast_for(device: str) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 mixed precision on CUDA, plain float32 elsewhere."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(dataset: CachedImageDataset, batch_size: int) -> Iterator[tuple[range, torch.Tensor]]:
    """Consecutive (indices, (B,1,S,S) float32 batch) of a dataset, in order."""
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        yield indices, torch.stack([dataset[i] for i in indices])


@torch.no_grad()
def latents_of(model: LatentAutoencoder, dataset: CachedImageDataset, device: str, batch_size: int) -> np.ndarray:
    """The (N, D) float32 latents (VAE: the means) of every image, in eval mode."""
    model.eval()
    chunks = []
    for _indices, x in _batches(dataset, batch_size):
        with autocast_for(device):
            z = model.encode(x.to(device))
        chunks.append(z.float().cpu().numpy())
    return np.concatenate(chunks).astype(np.float32)


@torch.no_grad()
def evaluate_reconstruction(
    model: LatentAutoencoder, dataset: CachedImageDataset, device: str, batch_size: int
) -> dict[str, float | int]:
    """The paper's MSE of the images of ``dataset`` reconstructed from their latent bytes.

    Returns
    -------
    dict
        ``images``; ``mse`` (through the quantised latent bytes, at the input size);
        ``mse_unquantised`` (from the float latent); ``mse_1024`` when the input size is
        not 1024; ``latent_bytes`` and ``latent_bits`` (the stored latent's size).
    """
    model.eval()
    latent_format = LatentFormat.from_model(model)
    size = model.image_size
    squared, squared_float, squared_paper = [], [], []
    for indices, x in _batches(dataset, batch_size):
        with autocast_for(device):
            z = model.encode(x.to(device)).float()
            stored = [latent_format.to_bytes(row) for row in z.cpu().numpy()]
            z_stored = torch.from_numpy(np.stack([latent_format.from_bytes(b) for b in stored])).to(device)
            recon = model.decode(z_stored).float().cpu()
            recon_float = model.decode(z).float().cpu()
        squared.extend(((recon - x) ** 2).mean(dim=(1, 2, 3)).tolist())
        squared_float.extend(((recon_float - x) ** 2).mean(dim=(1, 2, 3)).tolist())
        if size != PAPER_SIZE:
            for i, image in zip(indices, recon[:, 0].numpy(), strict=True):
                original = resize_bilinear(load_canonical(dataset.records[i].path), (PAPER_SIZE, PAPER_SIZE))
                upsampled = np.clip(resize_bilinear(image, (PAPER_SIZE, PAPER_SIZE)), 0.0, 1.0)
                squared_paper.append(float(np.mean((upsampled - original) ** 2)))
    metrics: dict[str, float | int] = {
        "images": len(dataset),
        "mse": float(np.mean(squared)),
        "mse_unquantised": float(np.mean(squared_float)),
        "latent_bytes": latent_format.nbytes,
        "latent_bits": latent_format.nbytes * 8,
    }
    if squared_paper:
        metrics["mse_1024"] = float(np.mean(squared_paper))
    logger.info("evaluated %d images: MSE %.6g (unquantised %.6g)", len(dataset), metrics["mse"],
                metrics["mse_unquantised"])
    return metrics
