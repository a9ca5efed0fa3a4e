"""The training loop: DICOM folders in, a calibrated model file and its card out.

One call of :func:`train` scans the folders, splits by patient (80/20, seeded), trains
with Adam on the model's own loss (the paper's: MSE for the AE, BCE + KL for the VAE),
keeps a checkpoint at the lowest validation loss, and at the end reloads that
checkpoint, calibrates the latent quantisation range on the training images, measures
the validation MSE through the stored latent bytes and exports safetensors + card with
:func:`latentpacs.codec.modelfile.save_model`.

``out = models/NAME`` gives ``models/NAME.safetensors``, ``models/NAME.json`` and the
checkpoints ``models/NAME.checkpoints/{last,best}.pt``.

Launched by ``torchrun`` the same call trains data-parallel (:mod:`.distributed`): the
model in DistributedDataParallel, each rank on its shard of a seeded DistributedSampler,
training and validation losses summed over ranks; rank 0 alone shows progress, writes
checkpoints (the plain module's weights, so a single process can resume them) and exports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from latentpacs.codec.latent import calibrate
from latentpacs.codec.modelfile import CARD_SUFFIX, ModelCard, save_model
from latentpacs.codec.models import LatentAutoencoder, ModelOutput, build_model
from latentpacs.errors import ConfigError
from latentpacs.train import distributed
from latentpacs.train.checkpoint import (
    Checkpoint,
    capture_rng,
    check_fingerprint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from latentpacs.train.data import CachedImageDataset, ImageRecord, scan_dicom_folders
from latentpacs.train.distributed import DistContext
from latentpacs.train.evaluation import autocast_for, evaluate_reconstruction, latents_of
from latentpacs.train.split import split_by_patient

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on; ``command`` is recorded in the card."""

    data_dirs: tuple[Path, ...]
    arch: str
    out: Path
    epochs: int = 10
    batch_size: int = 8
    image_size: int = 1024
    latent_dim: int = 16
    latent_bits: int = 8
    learning_rate: float = 1e-3
    seed: int = 0
    val_fraction: float = 0.2
    resume: bool = False
    device: str | None = None
    command: str = ""
    cache_dir: Path | None = None
    data_note: str = ""          # where the data came from, e.g. the demo-data command
    records: tuple[ImageRecord, ...] | None = None  # explicit images, used instead of scanning data_dirs
    split: tuple[tuple[ImageRecord, ...], tuple[ImageRecord, ...]] | None = None  # given (train, val), e.g. official

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "image_size", "latent_dim", "latent_bits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0.0:
            raise ConfigError(f"learning rate must be positive, got {self.learning_rate}")
        if not self.data_dirs and self.records is None and self.split is None:
            raise ConfigError("no training data folder given")

    @property
    def checkpoint_dir(self) -> Path:
        """``<out>.checkpoints/`` next to the exported model."""
        return self.out.parent / f"{self.out.name}.checkpoints"


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: the exported card, the best epoch and the per-epoch losses.

    ``rank`` and ``world_size`` say which torchrun process returned it (0 and 1 for a single process).
    """

    card: ModelCard
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    history: tuple[dict[str, Any], ...]
    rank: int = 0
    world_size: int = 1


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch, NumPy and Python; return the seeded generator for the DataLoader."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _as_float32(out: ModelOutput) -> ModelOutput:
    """The model output with every tensor field in float32, for a loss outside autocast."""
    changes = {
        field.name: getattr(out, field.name).float()
        for field in dataclasses.fields(out)
        if isinstance(getattr(out, field.name), torch.Tensor)
    }
    return dataclasses.replace(out, **changes)


def _batch_loss(model: LatentAutoencoder, forward: torch.nn.Module, x: torch.Tensor, device: str) -> torch.Tensor:
    """The model's own loss (paper Eq. 1 or 2) of one batch; forward pass under AMP on CUDA.

    ``forward`` runs the pass: the model itself, or its DistributedDataParallel wrapper.
    """
    with autocast_for(device):
        out = forward(x)
    return model.loss(x, _as_float32(out))


def _run_epoch(
    model: LatentAutoencoder,
    forward: torch.nn.Module,
    loader: DataLoader[torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    device: str,
    bar: tqdm[Any] | None,
) -> tuple[float, int]:
    """One pass; trains when ``optimizer`` is given, else evaluates. Returns (loss sum, image count)."""
    total, count = 0.0, 0
    model.train(optimizer is not None)
    with torch.set_grad_enabled(optimizer is not None):
        for x in loader:
            x = x.to(device, non_blocking=True)
            loss = _batch_loss(model, forward, x, device)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total += float(loss.detach()) * x.shape[0]
            count += x.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / count:.5g}")
    return total, count


def _fingerprint(config: TrainConfig, train_ds: CachedImageDataset, val_ds: CachedImageDataset) -> dict[str, Any]:
    """The settings and data a resumed run must share with the run it continues."""
    digest = hashlib.sha256()
    for side, dataset in (("train", train_ds), ("val", val_ds)):
        for record in dataset.records:
            digest.update(f"{side}:{record.sop_instance_uid}\n".encode())
    return {
        "arch": config.arch,
        "image_size": config.image_size,
        "latent_dim": config.latent_dim,
        "latent_bits": config.latent_bits,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "data_sha256": digest.hexdigest(),
    }


def _datasets(config: TrainConfig, progress: bool) -> tuple[CachedImageDataset, CachedImageDataset, int]:
    """Scan, split by patient and decode; returns (train, validation, files skipped).

    ``config.split`` replaces scanning and the patient split; ``config.records`` replaces scanning.
    """
    skipped: list[tuple[Path, str]] = []
    if config.split is not None:
        train_records, val_records = list(config.split[0]), list(config.split[1])
    else:
        if config.records is not None:
            records = list(config.records)
        else:
            records, skipped = scan_dicom_folders(config.data_dirs)
        for path, reason in skipped:
            logger.warning("skipped %s: %s", path, reason)
        train_records, val_records = split_by_patient(records, val_fraction=config.val_fraction, seed=config.seed)
    train_ds = CachedImageDataset(train_records, config.image_size, cache_dir=config.cache_dir, progress=progress)
    val_ds = CachedImageDataset(val_records, config.image_size, cache_dir=config.cache_dir, progress=progress)
    if len(train_ds) < 2:
        folders = ", ".join(str(d) for d in config.data_dirs) or "the given records"
        raise ConfigError(f"need at least 2 usable training images in {folders}, found {len(train_ds)}")
    return train_ds, val_ds, len(skipped) + len(train_ds.skipped) + len(val_ds.skipped)


def _loaders(
    config: TrainConfig, ctx: DistContext, datasets: tuple[CachedImageDataset, CachedImageDataset],
    generator: torch.Generator,
) -> tuple[DataLoader[torch.Tensor], DataLoader[torch.Tensor], DistributedSampler[int] | None]:
    """Training and validation loaders; under torchrun each rank gets its shard.

    Training: a DistributedSampler seeded with ``config.seed`` (padded so every rank runs
    the same number of steps). Validation: every ``world_size``-th image from ``rank`` on,
    without padding, so the summed losses count each image once.
    """
    train_ds, val_ds = datasets
    pin = ctx.device.startswith("cuda")
    if not ctx.distributed:
        remainder_is_one = len(train_ds) % config.batch_size == 1  # BatchNorm cannot train on one image
        train_loader = DataLoader(
            train_ds, batch_size=config.batch_size, shuffle=True, generator=generator,
            drop_last=remainder_is_one, pin_memory=pin,
        )
        return train_loader, DataLoader(val_ds, batch_size=config.batch_size, shuffle=False), None
    sampler: DistributedSampler[int] = DistributedSampler(
        train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed
    )
    train_loader = DataLoader(
        train_ds, batch_size=config.batch_size, sampler=sampler,
        drop_last=sampler.num_samples % config.batch_size == 1, pin_memory=pin,
    )
    val_shard = Subset(val_ds, range(ctx.rank, len(val_ds), ctx.world_size))
    return train_loader, DataLoader(val_shard, batch_size=config.batch_size, shuffle=False), sampler


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train, checkpoint, calibrate, evaluate and export one model.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every rank calls this; they train together
    and each returns the same card, exported once by rank 0.

    Parameters
    ----------
    config:
        The run's settings. With ``resume=True`` the run continues from
        ``<out>.checkpoints/last.pt`` (same settings and data, else ConfigError) up to
        ``config.epochs`` epochs in total.
    progress:
        Show tqdm bars (one per epoch, running loss in the postfix); rank 0 only.

    Returns
    -------
    TrainResult
        With the card of ``<out>.safetensors`` / ``<out>.json``.

    Raises
    ------
    ConfigError
        Bad settings, no usable images, or nothing (or something else) to resume from.
    ModelError
        Unknown architecture.
    """
    ctx = distributed.start(config.device)
    try:
        return _train(config, ctx, progress and ctx.is_main)
    finally:
        distributed.finish(ctx)


def _train(config: TrainConfig, ctx: DistContext, progress: bool) -> TrainResult:
    """The body of :func:`train` on one rank (or the only process)."""
    started = time.monotonic()
    device = ctx.device
    generator = seed_everything(config.seed)
    model = build_model(
        config.arch, image_size=config.image_size, latent_dim=config.latent_dim, latent_bits=config.latent_bits
    ).to(device)
    shared_cache = ctx.distributed and config.cache_dir is not None
    if shared_cache and not ctx.is_main:
        distributed.barrier(ctx)  # rank 0 fills the decoded-image cache, the others read it
    train_ds, val_ds, n_skipped = _datasets(config, progress)
    if shared_cache and ctx.is_main:
        distributed.barrier(ctx)
    forward: torch.nn.Module = model
    if ctx.distributed:
        forward = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.backend == "nccl" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    train_loader, val_loader, sampler = _loaders(config, ctx, (train_ds, val_ds), generator)
    fingerprint = _fingerprint(config, train_ds, val_ds)
    last_path, best_path = config.checkpoint_dir / "last.pt", config.checkpoint_dir / "best.pt"

    state = Checkpoint(0, 0, float("inf"), {}, {}, {}, (), fingerprint, 0.0)
    if config.resume:
        state = load_checkpoint(last_path)
        check_fingerprint(state.fingerprint, fingerprint, last_path)
        model.load_state_dict(state.model_state)
        optimizer.load_state_dict(dict(state.optimizer_state))
        restore_rng(state.rng, generator)
        logger.info("resuming from %s after epoch %d", last_path, state.epoch)

    history = list(state.history)
    best_epoch, best_loss = state.best_epoch, state.best_val_loss
    for epoch in range(state.epoch + 1, config.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        with tqdm(total=len(train_loader), desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                  disable=not progress) as bar:
            train_sum, train_count = _run_epoch(model, forward, train_loader, optimizer, device, bar)
            distributed.broadcast_buffers(ctx, model)  # validate with rank 0's BatchNorm statistics
            val_sum, val_count = _run_epoch(model, model, val_loader, None, device, None) if len(val_ds) else (0.0, 0)
            train_total, train_n, val_total, val_n = distributed.all_reduce_sums(
                ctx, (train_sum, train_count, val_sum, val_count)
            )
            train_loss = train_total / max(train_n, 1)
            val_loss = val_total / max(val_n, 1) if len(val_ds) else train_loss
            bar.set_postfix(loss=f"{train_loss:.5g}", val_loss=f"{val_loss:.5g}")
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise ConfigError(f"training diverged at epoch {epoch} (loss {train_loss}); lower the learning rate")
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        logger.info("epoch %d/%d: train loss %.6g, validation loss %.6g", epoch, config.epochs, train_loss, val_loss)
        improved = val_loss < best_loss
        if improved:
            best_epoch, best_loss = epoch, val_loss
        state = Checkpoint(
            epoch, best_epoch, best_loss, model.state_dict(), optimizer.state_dict(), capture_rng(generator),
            tuple(history), fingerprint, state.duration_s + (time.monotonic() - started),
        )
        started = time.monotonic()
        if ctx.is_main:
            if improved:
                save_checkpoint(best_path, state)
            save_checkpoint(last_path, state)

    if ctx.is_main:
        best = load_checkpoint(best_path)
        card = _export(config, model, best, tuple(history), (train_ds, val_ds), n_skipped, ctx, state.duration_s)
    distributed.barrier(ctx)  # the other ranks read the card rank 0 has just written
    if not ctx.is_main:
        card_path = config.out.parent / f"{config.out.name}{CARD_SUFFIX}"
        card = ModelCard.from_json(card_path.read_text(encoding="utf-8"))
    return TrainResult(
        card, best_epoch, best_loss, state.epoch, tuple(dict(h) for h in history), ctx.rank, ctx.world_size
    )


def _export(
    config: TrainConfig,
    model: LatentAutoencoder,
    best: Checkpoint,
    history: tuple[Mapping[str, float], ...],
    datasets: tuple[CachedImageDataset, CachedImageDataset],
    n_skipped: int,
    ctx: DistContext,
    duration_s: float,
) -> ModelCard:
    """Reload the best weights, calibrate on the training latents, evaluate and save the model file."""
    train_ds, val_ds = datasets
    device = ctx.device
    model.load_state_dict(best.model_state)
    model.eval()
    calibrate(model, latents_of(model, train_ds, device, config.batch_size))
    has_val = len(val_ds) > 0
    measured = evaluate_reconstruction(model, val_ds if has_val else train_ds, device, config.batch_size)
    metrics: dict[str, object] = {
        **measured,
        "best_epoch": best.best_epoch,
        "best_val_loss": best.best_val_loss,
        "evaluated_on": "validation set" if has_val else "training set (no validation patient)",
    }
    training = {
        "command": config.command,
        "data_dirs": [str(d) for d in config.data_dirs],
        "data_note": config.data_note,
        "train_images": len(train_ds),
        "train_patients": len(train_ds.patients),
        "val_images": len(val_ds),
        "val_patients": len(val_ds.patients),
        "files_skipped": n_skipped,
        "split": "given with the data (e.g. the official CBIS-DDSM train/test sets)" if config.split is not None
        else f"by Patient ID, {config.val_fraction:g} of patients held out, seed {config.seed}",
        "validation_loss": "loss on the validation set" if has_val
        else "no validation patient: validation loss is the training loss",
        "epochs": len(history),
        "batch_size": config.batch_size,
        "world_size": ctx.world_size,
        "distributed": f"DistributedDataParallel ({ctx.backend}), batch size per rank, per-rank BatchNorm"
        if ctx.distributed else "none",
        "learning_rate": config.learning_rate,
        "optimizer": "Adam",
        "loss": "model loss (paper: AE MSE Eq. 1, VAE BCE + KL Eq. 2)",
        "seed": config.seed,
        "device": device,
        "mixed_precision": "bfloat16" if device.startswith("cuda") else "none",
        "torch_version": torch.__version__,
        "duration_s": round(duration_s, 3),
        "history": [dict(h) for h in history],
    }
    description = (
        f"{config.arch} autoencoder, {config.image_size}x{config.image_size} input, {config.latent_dim}-dim latent "
        f"at {config.latent_bits} bits, trained {config.epochs} epochs on {len(train_ds)} images "
        f"of {len(train_ds.patients)} patients"
    )
    model.to("cpu")
    card = save_model(
        model, config.out.parent, config.out.name, description=description, training=training, metrics=metrics
    )
    logger.info("exported %s (sha256 %s)", config.out, card.sha256)
    return card
