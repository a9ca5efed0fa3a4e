"""`latentpacs train` data-parallel under torchrun: 2 CPU processes on gloo, one exported model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentpacs.codec.modelfile import load_model, sha256_file
from latentpacs.train import TrainConfig, train


@pytest.fixture(scope="module")
def ddp_run(
    phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`torchrun --nproc_per_node 2 -m latentpacs.cli train ...` for 2 epochs; returns (out, process)."""
    out = tmp_path_factory.mktemp("models") / "ddp-ae"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "latentpacs.cli", "train", "--data", str(phantom_dir), "--arch", "ae", "--epochs", "2",
        "--batch-size", "2", "--image-size", "64", "--out", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    return out, proc


def test_torchrun_exports_one_verified_model(ddp_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = ddp_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    exported = sorted(p.name for p in out.parent.iterdir() if p.is_file())
    assert exported == ["ddp-ae.json", "ddp-ae.safetensors"]
    loaded = load_model(out.parent / "ddp-ae.safetensors")
    assert loaded.card.sha256 == sha256_file(out.parent / "ddp-ae.safetensors")
    training = loaded.card.training
    assert training["world_size"] == 2
    assert "gloo" in str(training["distributed"])
    assert training["train_images"] + training["val_images"] + training["test_images"] == 12
    assert [h["epoch"] for h in training["history"]] == [1, 2]  # type: ignore[union-attr,index]
    assert sorted(p.name for p in (out.parent / "ddp-ae.checkpoints").iterdir()) == ["best.pt", "last.pt", "split.json"]


def test_torchrun_reports_once(ddp_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = ddp_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("trained ddp-ae (ae)") == 1
    card = json.loads((out.parent / "ddp-ae.json").read_text())
    assert card["sha256"] in proc.stdout
    # tqdm draws each bar at 0% once when it opens: one bar per epoch, from rank 0 only.
    assert proc.stderr.count("epoch 1/2:   0%") == 1
    assert proc.stderr.count("epoch 2/2:   0%") == 1
    assert proc.stderr.count("decoding:   0%") == 2  # training and validation set, rank 0 only


def test_single_process_resumes_a_torchrun_checkpoint(
    ddp_run: tuple[Path, subprocess.CompletedProcess[str]], phantom_dir: Path
) -> None:
    out, proc = ddp_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = TrainConfig(
        data_dirs=(phantom_dir,), arch="ae", out=out, epochs=3, batch_size=2, image_size=64, resume=True,
        command="latentpacs train --resume (test)",
    )
    result = train(config, progress=False)
    assert result.epochs_run == 3 and result.world_size == 1
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.card.training["world_size"] == 1
    assert load_model(out.parent / "ddp-ae.safetensors").card.sha256 == result.card.sha256
