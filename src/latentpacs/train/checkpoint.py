"""Training checkpoints: model, optimizer, progress and every random state, with no pickles.

A checkpoint is a plain dictionary of tensors, numbers, strings and lists written with
:func:`torch.save` and read back with ``torch.load(..., weights_only=True)``, so a
checkpoint file cannot run code when it is loaded. It carries the random states of
torch (CPU and CUDA), NumPy, Python and the DataLoader's generator, so a resumed run
draws the same shuffles and samples as one that was never interrupted.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentpacs.errors import ConfigError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """The state of a run after ``epoch`` completed epochs.

    Attributes
    ----------
    epoch:
        Number of epochs completed (1-based count).
    best_epoch, best_val_loss:
        The epoch with the lowest validation loss so far, and that loss.
    model_state, optimizer_state:
        ``state_dict()`` of the model and of the Adam optimizer.
    rng:
        Random states, as made by :func:`capture_rng`.
    history:
        One entry per completed epoch: ``epoch``, ``train_loss``, ``val_loss``.
    fingerprint:
        The settings that must match for a resume (architecture, sizes, seed, data).
    duration_s:
        Training seconds spent so far, over all runs that led to this checkpoint.
    """

    epoch: int
    best_epoch: int
    best_val_loss: float
    model_state: Mapping[str, torch.Tensor]
    optimizer_state: Mapping[str, Any]
    rng: Mapping[str, Any]
    history: tuple[Mapping[str, float], ...]
    fingerprint: Mapping[str, Any]
    duration_s: float


def capture_rng(loader_generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training epoch consumes, as plain tensors, numbers and lists."""
    _name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": [int(v) for v in py_state], "gauss_next": gauss_next},
        "loader": loader_generator.get_state(),
    }


def restore_rng(rng: Mapping[str, Any], loader_generator: torch.Generator) -> None:
    """Put back the random states saved by :func:`capture_rng`."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    state = rng["numpy"]
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))
    python = rng["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    loader_generator.set_state(rng["loader"])


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (a temporary file, then a rename)."""
    payload = {
        "format_version": FORMAT_VERSION,
        "epoch": checkpoint.epoch,
        "best_epoch": checkpoint.best_epoch,
        "best_val_loss": checkpoint.best_val_loss,
        "model": {name: tensor.detach().cpu() for name, tensor in checkpoint.model_state.items()},
        "optimizer": checkpoint.optimizer_state,
        "rng": dict(checkpoint.rng),
        "history": [dict(entry) for entry in checkpoint.history],
        "fingerprint": dict(checkpoint.fingerprint),
        "duration_s": checkpoint.duration_s,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    partial.replace(path)
    logger.debug("wrote checkpoint %s (epoch %d)", path, checkpoint.epoch)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``, on CPU).

    Raises
    ------
    ConfigError
        The file is missing, unreadable, or of another format version.
    """
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}: nothing to resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ConfigError(f"checkpoint {path} is unreadable: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"checkpoint {path} is not a latentpacs checkpoint of version {FORMAT_VERSION}")
    return Checkpoint(
        epoch=int(payload["epoch"]),
        best_epoch=int(payload["best_epoch"]),
        best_val_loss=float(payload["best_val_loss"]),
        model_state=payload["model"],
        optimizer_state=payload["optimizer"],
        rng=payload["rng"],
        history=tuple(payload["history"]),
        fingerprint=payload["fingerprint"],
        duration_s=float(payload["duration_s"]),
    )


def check_fingerprint(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """Refuse to resume from a checkpoint made with other settings or other data.

    Raises
    ------
    ConfigError
        Naming every setting that differs.
    """
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differences:
        raise ConfigError(f"cannot resume from {path}, settings differ: " + "; ".join(differences))
