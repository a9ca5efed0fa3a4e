"""The training loop: DICOM folders in, a calibrated model file and its card out.

One call of :func:`train` scans the folders, splits by patient into training, validation
and test sets (seeded; or takes a given test set, e.g. the official CBIS-DDSM test set,
and splits only the rest), trains with Adam on the model's own loss (the paper's: MSE for
the AE, BCE + KL for the VAE), keeps a checkpoint at the lowest validation loss, and at
the end reloads that checkpoint, calibrates the latent quantisation range on the training
images, measures the MSE through the stored latent bytes on the validation set and on
the held-out test set, and exports safetensors + card with
:func:`latentpacs.codec.modelfile.save_model`. The test set never trains and never
chooses the checkpoint: it is decoded only after the last epoch, so the card's
``test_mse`` is a figure on images that chose nothing.

``out = models/NAME`` gives ``models/NAME.safetensors``, ``models/NAME.json``, the
checkpoints ``models/NAME.checkpoints/{last,best}.pt`` and the split actually used,
``models/NAME.checkpoints/split.json`` (path and SOP Instance UID of every image of each set).

Launched by ``torchrun`` the same call trains data-parallel (:mod:`.distributed`): the
model in DistributedDataParallel, each rank on its shard of a seeded DistributedSampler,
training and validation losses summed over ranks; rank 0 alone shows progress, writes
checkpoints (the plain module's weights, so a single process can resume them) and exports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
from latentpacs.codec.models import LatentAutoencoder, ModelOutput, PrincipalComponents, build_model
from latentpacs.errors import ConfigError, ModelError
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
from latentpacs.train.split import PatientSplit, split_train_val_test

logger = logging.getLogger(__name__)


#: Learning-rate schedules of :class:`TrainConfig`.
LR_SCHEDULES = ("constant", "cosine")


def epoch_learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (1-based): a function of the epoch alone, so resuming needs no state."""
    if config.lr_schedule == "cosine":
        return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / config.epochs))
    return config.learning_rate


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
    #: ``"constant"``, or ``"cosine"``: the rate of epoch e of E is lr * (1 + cos(pi (e-1) / E)) / 2.
    lr_schedule: str = "constant"
    #: Mirror each training image left-right with probability 1/2 (seeded by ``seed`` and the epoch).
    hflip: bool = False
    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.1  # share of patients held out as the test set (unused with test_records)
    resume: bool = False
    device: str | None = None
    command: str = ""
    cache_dir: Path | None = None
    data_note: str = ""          # where the data came from, e.g. the demo-data command
    records: tuple[ImageRecord, ...] | None = None  # explicit images, used instead of scanning data_dirs
    # A given held-out test set (e.g. the official CBIS-DDSM test set): measured once at the end, never
    # trained on nor used to choose the checkpoint; validation then comes from the other images.
    test_records: tuple[ImageRecord, ...] | None = None
    test_note: str = ""          # what the given test set is, for the card

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "image_size", "latent_dim", "latent_bits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0.0:
            raise ConfigError(f"learning rate must be positive, got {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown learning-rate schedule {self.lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}")
        if not self.data_dirs and self.records is None:
            raise ConfigError("no training data folder given")
        for what, value in (("validation", self.val_fraction), ("test", self.test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{what} fraction must be in [0, 1), got {value}")

    @property
    def checkpoint_dir(self) -> Path:
        """``<out>.checkpoints/`` next to the exported model."""
        return self.out.parent / f"{self.out.name}.checkpoints"


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: the exported card, the best epoch and the per-epoch losses.

    ``split`` holds the images each set used (training and validation as decoded; the
    test set as held out). ``rank`` and ``world_size`` say which torchrun process
    returned it (0 and 1 for a single process).
    """

    card: ModelCard
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    history: tuple[dict[str, Any], ...]
    split: PatientSplit
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
    flips: torch.Generator | None = None,
) -> tuple[float, int]:
    """One pass; trains when ``optimizer`` is given, else evaluates. Returns (loss sum, image count).

    With ``flips``, each training image is mirrored left-right with probability 1/2 (a
    left breast becomes a plausible right one), drawn from that generator.
    """
    total, count = 0.0, 0
    model.train(optimizer is not None)
    with torch.set_grad_enabled(optimizer is not None):
        for x in loader:
            if flips is not None:
                mirror = torch.rand(x.shape[0], generator=flips) < 0.5
                x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
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


def _fingerprint(
    config: TrainConfig, train_ds: CachedImageDataset, val_ds: CachedImageDataset, test: tuple[ImageRecord, ...]
) -> dict[str, Any]:
    """The settings and data a resumed run must share with the run it continues."""
    digest = hashlib.sha256()
    for side, records in (("train", train_ds.records), ("val", val_ds.records), ("test", test)):
        for record in records:
            digest.update(f"{side}:{record.sop_instance_uid}\n".encode())
    return {
        "arch": config.arch,
        "image_size": config.image_size,
        "latent_dim": config.latent_dim,
        "latent_bits": config.latent_bits,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "lr_schedule": config.lr_schedule if config.lr_schedule == "constant"
        else f"{config.lr_schedule} over {config.epochs} epochs",
        "seed": config.seed,
        "hflip": config.hflip,
        "val_fraction": config.val_fraction,
        "test_fraction": None if config.test_records is not None else config.test_fraction,
        "data_sha256": digest.hexdigest(),
    }


def _refuse_overlap(pool: list[ImageRecord], test: tuple[ImageRecord, ...]) -> None:
    """A given test set must share no image (SOP Instance UID or file) with the training data."""
    uids = {record.sop_instance_uid for record in test}
    paths = {Path(record.path).resolve() for record in test}
    for record in pool:
        if record.sop_instance_uid in uids or Path(record.path).resolve() in paths:
            raise ConfigError(f"{record.path} is both in the held-out test set and in the training data")


def plan_split(config: TrainConfig) -> tuple[PatientSplit, int]:
    """The training, validation and test records of a run, and how many files the scan skipped.

    Without ``config.test_records`` the images (``config.records``, or those scanned in
    ``config.data_dirs``) are split by patient three ways with ``val_fraction`` and
    ``test_fraction``. With it, that set is the test set and the other images are split
    by patient into training and validation with ``val_fraction``.

    Raises
    ------
    ConfigError
        When an image of the given test set is also among the training data.
    """
    skipped: list[tuple[Path, str]] = []
    if config.records is not None:
        records = list(config.records)
    else:
        records, skipped = scan_dicom_folders(config.data_dirs)
    for path, reason in skipped:
        logger.warning("skipped %s: %s", path, reason)
    if config.test_records is None:
        split = split_train_val_test(
            records, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed
        )
    else:
        test = tuple(config.test_records)
        _refuse_overlap(records, test)
        pool = split_train_val_test(records, val_fraction=config.val_fraction, test_fraction=0.0, seed=config.seed)
        split = PatientSplit(pool.train, pool.validation, test)
    return split, len(skipped)


def _datasets(config: TrainConfig, progress: bool) -> tuple[CachedImageDataset, CachedImageDataset, PatientSplit, int]:
    """Split and decode the training and validation sets; returns them, the split and files skipped.

    The test set is only planned here; it is decoded after training (:func:`_export`).
    """
    split, n_skipped = plan_split(config)
    train_ds = CachedImageDataset(split.train, config.image_size, cache_dir=config.cache_dir, progress=progress)
    val_ds = CachedImageDataset(split.validation, config.image_size, cache_dir=config.cache_dir, progress=progress)
    if len(train_ds) < 2:
        folders = ", ".join(str(d) for d in config.data_dirs) or "the given records"
        raise ConfigError(f"need at least 2 usable training images in {folders}, found {len(train_ds)}")
    return train_ds, val_ds, split, n_skipped + len(train_ds.skipped) + len(val_ds.skipped)


def _write_manifest(path: Path, train_ds: CachedImageDataset, val_ds: CachedImageDataset,
                    test: tuple[ImageRecord, ...]) -> None:
    """Record which images trained, validated (chose the epoch) and were held out for the test."""
    def rows(records: tuple[ImageRecord, ...]) -> list[dict[str, str]]:
        return [{"path": str(r.path), "sop_instance_uid": r.sop_instance_uid} for r in records]

    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"train": rows(train_ds.records), "validation": rows(val_ds.records), "test": rows(test)}
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    partial.replace(path)


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
    train_ds, val_ds, split, n_skipped = _datasets(config, progress)
    if shared_cache and ctx.is_main:
        distributed.barrier(ctx)
    if model.closed_form:
        return _fit_closed_form(config, ctx, model, (train_ds, val_ds, split), n_skipped, started, progress)
    forward: torch.nn.Module = model
    if ctx.distributed:
        forward = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.backend == "nccl" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    train_loader, val_loader, sampler = _loaders(config, ctx, (train_ds, val_ds), generator)
    fingerprint = _fingerprint(config, train_ds, val_ds, split.test)
    last_path, best_path = config.checkpoint_dir / "last.pt", config.checkpoint_dir / "best.pt"

    state = Checkpoint(0, 0, float("inf"), {}, {}, {}, (), fingerprint, 0.0)
    if config.resume:
        state = load_checkpoint(last_path)
        check_fingerprint(state.fingerprint, fingerprint, last_path)
        model.load_state_dict(state.model_state)
        optimizer.load_state_dict(dict(state.optimizer_state))
        restore_rng(state.rng, generator)
        logger.info("resuming from %s after epoch %d", last_path, state.epoch)
    if ctx.is_main:
        _write_manifest(config.checkpoint_dir / "split.json", train_ds, val_ds, split.test)

    history = list(state.history)
    best_epoch, best_loss = state.best_epoch, state.best_val_loss
    for epoch in range(state.epoch + 1, config.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = epoch_learning_rate(config, epoch)
        with tqdm(total=len(train_loader), desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                  disable=not progress) as bar:
            flips = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch) if config.hflip else None
            train_sum, train_count = _run_epoch(model, forward, train_loader, optimizer, device, bar, flips)
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
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                        "learning_rate": epoch_learning_rate(config, epoch)})
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
        card = _export(config, model, best, tuple(history), (train_ds, val_ds, split.test), n_skipped, ctx,
                       state.duration_s, progress)
    distributed.barrier(ctx)  # the other ranks read the card rank 0 has just written
    if not ctx.is_main:
        card_path = config.out.parent / f"{config.out.name}{CARD_SUFFIX}"
        card = ModelCard.from_json(card_path.read_text(encoding="utf-8"))
    used = PatientSplit(train_ds.records, val_ds.records, split.test)
    return TrainResult(
        card, best_epoch, best_loss, state.epoch, tuple(dict(h) for h in history), used, ctx.rank, ctx.world_size
    )


def _fit_closed_form(
    config: TrainConfig,
    ctx: DistContext,
    model: LatentAutoencoder,
    data: tuple[CachedImageDataset, CachedImageDataset, PatientSplit],
    n_skipped: int,
    started: float,
    progress: bool,
) -> TrainResult:
    """Fit a closed-form model (``pca``) on the training images: one "epoch", no optimiser.

    The fit is recorded as epoch 1 of the history, with the model's loss (MSE) on the
    training and validation images, and exported like a trained model.
    """
    if not isinstance(model, PrincipalComponents):
        raise ModelError(f"{config.arch}: no closed-form fit is known")
    if ctx.distributed:
        raise ConfigError(f"{config.arch} is fitted in closed form on one process; run it without torchrun")
    train_ds, val_ds, split = data
    _write_manifest(config.checkpoint_dir / "split.json", train_ds, val_ds, split.test)
    images = torch.stack([train_ds[i] for i in tqdm(range(len(train_ds)), desc="fitting pca", unit="image",
                                                    disable=not progress)])
    model.fit(images.to(ctx.device))
    model.eval()
    with torch.no_grad():
        train_loss = _run_epoch(model, model, DataLoader(train_ds, batch_size=config.batch_size), None,
                                ctx.device, None)
        val_loss = (_run_epoch(model, model, DataLoader(val_ds, batch_size=config.batch_size), None,
                               ctx.device, None) if len(val_ds) else train_loss)
    train_mse = train_loss[0] / max(train_loss[1], 1)
    val_mse = val_loss[0] / max(val_loss[1], 1)
    history = ({"epoch": 1, "train_loss": train_mse, "val_loss": val_mse},)
    fingerprint = _fingerprint(config, train_ds, val_ds, split.test)
    state = Checkpoint(1, 1, val_mse, model.state_dict(), {}, {}, history, fingerprint,
                       time.monotonic() - started)
    card = _export(config, model, state, history, (train_ds, val_ds, split.test), n_skipped, ctx,
                   state.duration_s, progress)
    used = PatientSplit(train_ds.records, val_ds.records, split.test)
    return TrainResult(card, 1, val_mse, 1, tuple(dict(h) for h in history), used, ctx.rank, ctx.world_size)


def _test_set_note(config: TrainConfig, test_ds: CachedImageDataset) -> str:
    """What the held-out test set is, for the card."""
    if config.test_records is not None:
        source = config.test_note or "given with the data"
    elif len(test_ds):
        source = f"by Patient ID, {config.test_fraction:g} of patients, seed {config.seed}"
    elif config.test_fraction > 0.0:
        return "none: too few patients to hold one out for a test (it takes 3: training, validation, test)"
    else:
        return "none: test fraction 0"
    return f"{source}; disjoint from training and validation, measured once after the last epoch"


def _export(
    config: TrainConfig,
    model: LatentAutoencoder,
    best: Checkpoint,
    history: tuple[Mapping[str, float], ...],
    datasets: tuple[CachedImageDataset, CachedImageDataset, tuple[ImageRecord, ...]],
    n_skipped: int,
    ctx: DistContext,
    duration_s: float,
    progress: bool,
) -> ModelCard:
    """Reload the best weights, calibrate on the training latents, evaluate and save the model file.

    The validation set (which chose the epoch) and the held-out test set are measured
    separately; the test set is decoded here, after training, for the first time.
    """
    train_ds, val_ds, test_records = datasets
    device = ctx.device
    model.load_state_dict(best.model_state)
    model.eval()
    calibrate(model, latents_of(model, train_ds, device, config.batch_size))
    has_val = len(val_ds) > 0
    chooser = "val" if has_val else "train"
    measured = evaluate_reconstruction(model, val_ds if has_val else train_ds, device, config.batch_size)
    metrics: dict[str, object] = {
        "latent_bytes": measured.pop("latent_bytes"),
        "latent_bits": measured.pop("latent_bits"),
        **{f"{chooser}_{key}": value for key, value in measured.items()},
        "best_epoch": best.best_epoch,
        "best_val_loss": best.best_val_loss,
        "epoch_chosen_by": f"lowest validation loss (the model's loss on the {len(val_ds)} validation images "
        f"of {len(val_ds.patients)} patient{'s' if len(val_ds.patients) != 1 else ''})" if has_val
        else "lowest training loss (no validation patient)",
    }
    test_ds = CachedImageDataset(test_records, config.image_size, cache_dir=config.cache_dir, progress=progress,
                                 desc="decoding test set")
    if len(test_ds):
        tested = evaluate_reconstruction(model, test_ds, device, config.batch_size)
        metrics.update({f"test_{key}": value for key, value in tested.items() if not key.startswith("latent_")})
    else:
        metrics["test_images"] = 0
    metrics["test_patients"] = len(test_ds.patients)
    metrics["test_set"] = _test_set_note(config, test_ds)
    if config.test_records is not None:
        split_note = (f"validation: by Patient ID, {config.val_fraction:g} of the training data's patients, "
                      f"seed {config.seed}; test: {config.test_note or 'given with the data'}")
    else:
        split_note = (f"by Patient ID, seed {config.seed}: {config.val_fraction:g} of patients for validation, "
                      f"{config.test_fraction:g} for the test")
    training = {
        "command": config.command,
        "data_dirs": [str(d) for d in config.data_dirs],
        "data_note": config.data_note,
        "train_images": len(train_ds),
        "train_patients": len(train_ds.patients),
        "val_images": len(val_ds),
        "val_patients": len(val_ds.patients),
        "test_images": len(test_ds),
        "test_patients": len(test_ds.patients),
        "files_skipped": n_skipped + len(test_ds.skipped),
        "split": split_note,
        "val_fraction": config.val_fraction,
        "test_fraction": None if config.test_records is not None else config.test_fraction,
        "validation_loss": "loss on the validation set" if has_val
        else "no validation patient: validation loss is the training loss",
        "epochs": len(history),
        "batch_size": config.batch_size,
        "world_size": ctx.world_size,
        "distributed": f"DistributedDataParallel ({ctx.backend}), batch size per rank, per-rank BatchNorm"
        if ctx.distributed else "none",
        "learning_rate": config.learning_rate,
        "lr_schedule": config.lr_schedule,
        "augmentation": "left-right mirror, probability 1/2" if config.hflip else "none",
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
    if model.closed_form:
        description = (
            f"{config.arch}: principal components, {config.image_size}x{config.image_size} input, "
            f"{config.latent_dim}-dim latent at {config.latent_bits} bits, fitted in closed form on "
            f"{len(train_ds)} images of {len(train_ds.patients)} patients"
        )
        training.update({
            "epochs": 0, "optimizer": "none: fitted in closed form (eigendecomposition of the Gram matrix "
            "of the centred training images, float64)", "learning_rate": None,
            "loss": "MSE (the best linear code of the training images for it)", "mixed_precision": "none",
        })
    model.to("cpu")
    card = save_model(
        model, config.out.parent, config.out.name, description=description, training=training, metrics=metrics
    )
    logger.info("exported %s (sha256 %s)", config.out, card.sha256)
    return card
