"""Training on phantom DICOM folders: scanning, patient split, cache, loop, resume, export.

The phantom folder holds 12 images of 3 patients; the default fractions give one patient
each to training, validation (chooses the epoch) and the held-out test.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
import torch

from latentpacs.codec.latent import calibrate
from latentpacs.codec.modelfile import load_model, sha256_file
from latentpacs.codec.models import build_model
from latentpacs.errors import ConfigError
from latentpacs.train import (
    CachedImageDataset,
    TrainConfig,
    TrainResult,
    scan_dicom_folders,
    split_by_patient,
    train,
)
from latentpacs.train.evaluation import evaluate_reconstruction, latents_of
from latentpacs.train.loop import seed_everything
from latentpacs.train.split import split_train_val_test

IMAGE_SIZE = 64
EPOCHS = 12  # 24 optimizer steps: enough to learn far more than the images' mean, still a second of compute


def _config(data: Path, out: Path, **changes: object) -> TrainConfig:
    base = TrainConfig(
        data_dirs=(data,), arch="ae", out=out, epochs=EPOCHS, batch_size=2, image_size=IMAGE_SIZE,
        learning_rate=1e-2, seed=0, command="latentpacs train (test)",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def baseline(phantom_dir: Path, models_dir: Path) -> TrainResult:
    """An uninterrupted AE run of EPOCHS epochs, exported as models_dir/tiny-ae."""
    return train(_config(phantom_dir, models_dir / "tiny-ae"), progress=False)


@pytest.fixture(scope="module")
def short(phantom_dir: Path, models_dir: Path) -> TrainResult:
    """A 3-epoch AE run: the reference of the determinism and resume tests."""
    return train(_config(phantom_dir, models_dir / "short-ae", epochs=3), progress=False)


def test_scan_skips_what_is_not_a_trainable_image(phantom_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    first = sorted(data.rglob("*.dcm"))[0]
    (data / "notes.txt").write_text("not a DICOM file\n")
    (data / "empty.dcm").write_bytes(b"")
    ds = pydicom.dcmread(first)
    no_pixels = copy.deepcopy(ds)
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = pydicom.uid.generate_uid()
    no_pixels.save_as(data / "no_pixels.dcm")
    colour = copy.deepcopy(ds)
    colour.SamplesPerPixel, colour.PhotometricInterpretation = 3, "RGB"
    colour.SOPInstanceUID = pydicom.uid.generate_uid()
    colour.save_as(data / "colour.dcm")
    multi = copy.deepcopy(ds)
    multi.NumberOfFrames = 2
    multi.SOPInstanceUID = pydicom.uid.generate_uid()
    multi.save_as(data / "multi.dcm")
    (data / "zz").mkdir()
    shutil.copy(first, data / "zz" / "copy.dcm")  # walked last: the copy is the duplicate

    records, skipped = scan_dicom_folders([data])

    assert len(records) == 12
    reasons = {path.name: reason for path, reason in skipped}
    assert set(reasons) == {"notes.txt", "empty.dcm", "no_pixels.dcm", "colour.dcm", "multi.dcm", "copy.dcm"}
    assert "not a DICOM" in reasons["notes.txt"]
    assert "Pixel Data" in reasons["no_pixels.dcm"]
    assert "grayscale" in reasons["colour.dcm"]
    assert "multi-frame" in reasons["multi.dcm"]
    assert "duplicate" in reasons["copy.dcm"]
    assert all("\n" not in reason for reason in reasons.values())


def test_split_is_by_patient_and_seeded(phantom_dir: Path) -> None:
    records, _ = scan_dicom_folders([phantom_dir])
    patients = {r.patient_id for r in records}
    splits = set()
    for seed in range(8):
        train_set, val_set = split_by_patient(records, val_fraction=0.2, seed=seed)
        assert split_by_patient(list(reversed(records)), val_fraction=0.2, seed=seed)[1] == list(
            reversed(val_set)
        )
        train_patients = {r.patient_id for r in train_set}
        val_patients = {r.patient_id for r in val_set}
        assert not train_patients & val_patients
        assert train_patients | val_patients == patients
        assert len(train_set) + len(val_set) == len(records)
        assert val_patients
        splits.add(frozenset(val_patients))
    assert len(splits) > 1


def test_three_way_split_is_by_patient_and_seeded(phantom_dir: Path) -> None:
    records, _ = scan_dicom_folders([phantom_dir])
    for seed in range(6):
        split = split_train_val_test(records, val_fraction=0.2, test_fraction=0.1, seed=seed)
        train_p, val_p, test_p = split.patients
        assert len(train_p) == len(val_p) == len(test_p) == 1  # 3 patients: one each
        assert not (train_p & val_p or train_p & test_p or val_p & test_p)
        assert sorted(split.train + split.validation + split.test, key=records.index) == records
        again = split_train_val_test(list(reversed(records)), val_fraction=0.2, test_fraction=0.1, seed=seed)
        assert again.patients == split.patients
        no_test = split_train_val_test(records, val_fraction=0.2, test_fraction=0.0, seed=seed)
        assert no_test.test == () and list(no_test.validation) == split_by_patient(records, seed=seed)[1]
    two = [r for r in records if r.patient_id != records[0].patient_id]
    assert split_train_val_test(two, val_fraction=0.2, test_fraction=0.1).test == ()  # validation comes first
    with pytest.raises(ConfigError, match="together"):
        split_train_val_test(records, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ConfigError, match="test fraction"):
        split_train_val_test(records, test_fraction=-0.1)


def test_the_test_patients_neither_train_nor_choose_the_epoch(baseline: TrainResult, models_dir: Path) -> None:
    split = baseline.split
    train_p, val_p, test_p = split.patients
    assert test_p and not test_p & (train_p | val_p)
    used = {r.sop_instance_uid for r in split.train + split.validation}
    assert not used & {r.sop_instance_uid for r in split.test}
    manifest = json.loads((models_dir / "tiny-ae.checkpoints" / "split.json").read_text())
    for side, records in (("train", split.train), ("validation", split.validation), ("test", split.test)):
        assert [row["sop_instance_uid"] for row in manifest[side]] == [r.sop_instance_uid for r in records]
    # the card's test figure is the exported model measured on exactly those held-out images
    loaded = load_model("tiny-ae", models_dir=models_dir)
    measured = evaluate_reconstruction(loaded.model, CachedImageDataset(split.test, IMAGE_SIZE), "cpu", 2)
    assert measured["images"] == baseline.card.metrics["test_images"] == 4
    assert measured["mse"] == pytest.approx(baseline.card.metrics["test_mse"], rel=1e-5)


def test_single_patient_goes_to_training(phantom_dir: Path) -> None:
    records, _ = scan_dicom_folders([phantom_dir])
    one = [r for r in records if r.patient_id == records[0].patient_id]
    train_set, val_set = split_by_patient(one, seed=3)
    assert train_set == one
    assert val_set == []
    with pytest.raises(ConfigError):
        split_by_patient(records, val_fraction=1.0)


def test_dataset_decodes_once_into_a_reusable_cache(phantom_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    records, _ = scan_dicom_folders([data])
    cache = tmp_path / "cache"
    first = CachedImageDataset(records, IMAGE_SIZE, cache_dir=cache)
    assert len(first) == len(records)
    item = first[0]
    assert item.shape == (1, IMAGE_SIZE, IMAGE_SIZE) and item.dtype == torch.float32
    assert 0.0 <= float(item.min()) and float(item.max()) <= 1.0 and float(item.std()) > 0.01
    assert {p.stem for p in (cache / str(IMAGE_SIZE)).glob("*.npy")} == {r.sop_instance_uid for r in records}
    shutil.rmtree(data)  # a second run needs no DICOM decoding at all
    second = CachedImageDataset(records, IMAGE_SIZE, cache_dir=cache)
    assert torch.equal(second[5], first[5])


def test_undecodable_pixels_are_left_out_with_the_reason(phantom_dir: Path, tmp_path: Path) -> None:
    source = sorted(phantom_dir.rglob("*.dcm"))
    good, broken = tmp_path / "good.dcm", tmp_path / "broken.dcm"
    shutil.copy(source[0], good)
    broken.write_bytes(source[1].read_bytes()[:-4000])  # Pixel Data cut short
    records, skipped = scan_dicom_folders([tmp_path])
    assert len(records) == 2 and skipped == []  # the header alone looks fine
    dataset = CachedImageDataset(records, IMAGE_SIZE)
    assert [r.path for r in dataset.records] == [good]
    assert dataset.skipped[0][0] == broken and "Pixel Data" in dataset.skipped[0][1]


def test_training_lowers_the_loss_and_keeps_the_best_epoch(baseline: TrainResult) -> None:
    history = baseline.history
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    val_losses = [h["val_loss"] for h in history]
    assert baseline.best_val_loss == min(val_losses)
    assert baseline.best_epoch == val_losses.index(min(val_losses)) + 1
    assert baseline.epochs_run == EPOCHS


def test_the_trained_model_reconstructs_far_better_than_at_initialisation(baseline: TrainResult) -> None:
    """Guarantee 8: a loop that does not learn (no step, no gradient, wrong loss) fails here.

    The same architecture at the same seed, before any training step, calibrated on the same
    training images, is measured on the same validation images through the stored latent
    bytes; so is the image's own variance, the MSE of predicting each image's mean.
    """
    train_ds = CachedImageDataset(baseline.split.train, IMAGE_SIZE)
    val_ds = CachedImageDataset(baseline.split.validation, IMAGE_SIZE)
    assert len(val_ds) == 4
    seed_everything(0)
    untrained = build_model("ae", image_size=IMAGE_SIZE).eval()
    calibrate(untrained, latents_of(untrained, train_ds, "cpu", 2))
    untrained_mse = evaluate_reconstruction(untrained, val_ds, "cpu", 2)["mse"]
    variance = sum(float(val_ds[i].var()) for i in range(len(val_ds))) / len(val_ds)
    trained_mse = baseline.card.metrics["val_mse"]
    assert isinstance(trained_mse, float)
    assert trained_mse < 0.5 * untrained_mse, (trained_mse, untrained_mse)
    assert trained_mse < 0.75 * variance, (trained_mse, variance)


def test_best_checkpoint_holds_the_lowest_validation_loss(baseline: TrainResult, models_dir: Path) -> None:
    loaded = load_model("tiny-ae", models_dir=models_dir)
    checkpoints = models_dir / "tiny-ae.checkpoints"
    best = torch.load(checkpoints / "best.pt", weights_only=True)
    last = torch.load(checkpoints / "last.pt", weights_only=True)
    assert best["epoch"] == baseline.best_epoch
    assert best["best_val_loss"] == baseline.best_val_loss
    assert last["epoch"] == EPOCHS
    # the exported weights are the best epoch's, not the last epoch's (calibration aside)
    exported = loaded.model.state_dict()
    for name, tensor in best["model"].items():
        if not name.startswith("latent_"):
            assert torch.equal(exported[name], tensor), name


def test_export_writes_a_verifiable_model_and_card(baseline: TrainResult, models_dir: Path) -> None:
    card = baseline.card
    models = models_dir
    assert card.name == "tiny-ae"
    weights = models / f"{card.name}.safetensors"
    assert card.sha256 == sha256_file(weights)
    loaded = load_model(card.name, models_dir=models, expected_sha256=card.sha256)
    assert loaded.card == card
    on_disk = json.loads((models / f"{card.name}.json").read_text())
    assert on_disk["sha256"] == card.sha256
    assert (card.arch, card.image_size, card.latent_dim, card.latent_bits) == ("ae", IMAGE_SIZE, 16, 8)
    assert card.latent_bytes == 16
    training = card.training
    for key in ("command", "data_dirs", "train_images", "train_patients", "val_images", "val_patients",
                "epochs", "batch_size", "learning_rate", "seed", "device", "torch_version", "duration_s"):
        assert key in training, key
    assert training["train_images"] + training["val_images"] + training["test_images"] == 12
    assert (training["train_patients"], training["val_patients"], training["test_patients"]) == (1, 1, 1)
    assert training["device"] == "cpu"
    metrics = card.metrics
    assert metrics["best_epoch"] == baseline.best_epoch
    assert metrics["latent_bytes"] == 16
    assert metrics["val_images"] == metrics["test_images"] == 4
    assert "lowest validation loss" in str(metrics["epoch_chosen_by"])
    assert "disjoint from training and validation" in str(metrics["test_set"])
    for key in ("val_mse", "val_mse_1024", "test_mse", "test_mse_1024"):
        assert isinstance(metrics[key], float) and metrics[key] > 0.0, key
    low, high = loaded.model.latent_low, loaded.model.latent_high
    assert bool(torch.all(high > low)) and not torch.equal(high, torch.full_like(high, 4.0))


def test_same_seed_gives_the_same_loss_history(phantom_dir: Path, short: TrainResult, tmp_path: Path) -> None:
    again = train(_config(phantom_dir, tmp_path / "again", epochs=3), progress=False)
    assert again.history == short.history
    assert again.card.sha256 == short.card.sha256


def test_resume_reaches_the_uninterrupted_result(phantom_dir: Path, short: TrainResult, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    first = train(_config(phantom_dir, out, epochs=2), progress=False)
    assert first.epochs_run == 2
    assert first.history == short.history[:2]
    resumed = train(_config(phantom_dir, out, epochs=3, resume=True), progress=False)
    assert resumed.epochs_run == 3
    assert resumed.history == short.history
    assert resumed.card.sha256 == short.card.sha256
    with pytest.raises(ConfigError, match="learning_rate"):
        train(_config(phantom_dir, out, epochs=4, resume=True, learning_rate=3e-3), progress=False)
    with pytest.raises(ConfigError, match="test_fraction"):
        train(_config(phantom_dir, out, epochs=4, resume=True, test_fraction=0.0), progress=False)
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(_config(phantom_dir, tmp_path / "never", resume=True), progress=False)
    assert not (tmp_path / "never.checkpoints").exists()


def test_cosine_schedule_falls_to_zero_and_resumes_exactly(phantom_dir: Path, tmp_path: Path) -> None:
    whole = train(_config(phantom_dir, tmp_path / "cosine", epochs=4, lr_schedule="cosine"), progress=False)
    rates = [h["learning_rate"] for h in whole.history]
    assert rates == pytest.approx([1e-2, 1e-2 * (2 + 2**0.5) / 4, 1e-2 / 2, 1e-2 * (2 - 2**0.5) / 4])
    assert whole.card.training["lr_schedule"] == "cosine"
    out = tmp_path / "cosine-resumed"
    train(_config(phantom_dir, out, epochs=2, lr_schedule="cosine"), progress=False)
    # the schedule depends on the total: a run begun for 2 epochs cannot be stretched to 4
    with pytest.raises(ConfigError, match="lr_schedule"):
        train(_config(phantom_dir, out, epochs=4, resume=True, lr_schedule="cosine"), progress=False)
    with pytest.raises(ConfigError, match="schedule"):
        _config(phantom_dir, out, lr_schedule="step")
    constant = train(_config(phantom_dir, tmp_path / "constant", epochs=2), progress=False)
    assert [h["learning_rate"] for h in constant.history] == [1e-2, 1e-2]


def test_left_right_mirroring_is_seeded_and_recorded(phantom_dir: Path, short: TrainResult, tmp_path: Path) -> None:
    first = train(_config(phantom_dir, tmp_path / "flip-a", epochs=3, hflip=True), progress=False)
    again = train(_config(phantom_dir, tmp_path / "flip-b", epochs=3, hflip=True), progress=False)
    assert first.history == again.history and first.card.sha256 == again.card.sha256
    assert first.history != short.history  # the same run without mirroring learns otherwise
    assert first.card.training["augmentation"] == "left-right mirror, probability 1/2"
    assert short.card.training["augmentation"] == "none"
    with pytest.raises(ConfigError, match="hflip"):
        train(_config(phantom_dir, tmp_path / "flip-a", epochs=4, resume=True), progress=False)


def test_vae_trains_and_exports(phantom_dir: Path, tmp_path: Path) -> None:
    result = train(_config(phantom_dir, tmp_path / "tiny-vae", arch="vae", epochs=2), progress=False)
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in result.history)
    loaded = load_model(tmp_path / "tiny-vae.safetensors")
    assert loaded.card.arch == "vae"
    x = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode(x), loaded.model.encode(x))  # archives the mean


def test_one_patient_validates_on_the_training_loss(phantom_dir: Path, tmp_path: Path) -> None:
    records, _ = scan_dicom_folders([phantom_dir])
    patient = records[0].patient_id
    data = tmp_path / "one"
    for i, record in enumerate(r for r in records if r.patient_id == patient):
        data.mkdir(exist_ok=True)
        shutil.copy(record.path, data / f"{i}.dcm")
    result = train(_config(data, tmp_path / "solo", epochs=2, batch_size=2), progress=False)
    assert all(h["val_loss"] == h["train_loss"] for h in result.history)
    assert result.card.training["val_images"] == result.card.training["test_images"] == 0
    assert "training loss" in result.card.training["validation_loss"]
    metrics = result.card.metrics
    assert str(metrics["epoch_chosen_by"]).startswith("lowest training loss")
    assert "train_mse" in metrics and "val_mse" not in metrics and "test_mse" not in metrics
    assert metrics["test_images"] == 0 and str(metrics["test_set"]).startswith("none")


def test_a_folder_without_images_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ConfigError, match="usable training images"):
        train(_config(tmp_path, tmp_path / "none"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["readme.txt"]
