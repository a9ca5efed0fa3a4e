"""CBIS-DDSM: selection, deduplication, path resolution and the held-out official test set.

On a miniature tree in the TCIA layout.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from cbis_data import write_miniature_cbis

from latentpacs.cli import main
from latentpacs.errors import ConfigError
from latentpacs.train import TrainConfig, split_by_patient, train
from latentpacs.train.cbis import CSV_NAMES, select_cbis

SIZE = (96, 80)
MASS_MLO = {
    "Mass-Training_P_00001_LEFT_MLO", "Mass-Training_P_00001_RIGHT_MLO",
    "Mass-Test_P_00002_RIGHT_MLO", "Mass-Test_P_00002_LEFT_MLO",
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 cases of 4 patients: mass/train, mass/test, calc/train, calc/test; 3 cases each."""
    return write_miniature_cbis(tmp_path_factory.mktemp("cbis"), cases=12, seed=3, size=SIZE)


@pytest.fixture()
def copy(tree: Path, tmp_path: Path) -> Path:
    """A private copy of the tree that a test may damage."""
    return Path(shutil.copytree(tree, tmp_path / "cbis"))


def _rows(root: Path, kind: str = "mass", split: str = "train") -> list[dict[str, str]]:
    with (root / CSV_NAMES[(kind, split)]).open(newline="") as handle:
        return list(csv.DictReader(handle))


def _case(row: dict[str, str]) -> str:
    return row["image file path"].strip().strip('"').split("/")[0]


def test_default_selection_is_the_papers_mlo_mass_images(tree: Path) -> None:
    selection = select_cbis(tree)
    assert {image.case for image in selection.images} == MASS_MLO
    assert selection.missing == []
    for image in selection.images:
        assert (image.view, image.abnormality) == ("MLO", "mass")
        ds = pydicom.dcmread(image.path, stop_before_pixels=True)
        assert ds.PatientID == image.case
        assert ds.SeriesDescription == "full mammogram images"
        assert ds.SOPInstanceUID == image.sop_instance_uid


def test_filters_by_view_abnormality_and_split(tree: Path) -> None:
    everything = select_cbis(tree, view=None, abnormality=None)
    assert len(everything.images) == 12
    cc = select_cbis(tree, view="cc", abnormality=None)
    assert len(cc.images) == 4 and {image.view for image in cc.images} == {"CC"}
    calc = select_cbis(tree, view=None, abnormality="calcification")
    assert {image.case.split("-")[0] for image in calc.images} == {"Calc"} and len(calc.images) == 6
    test = select_cbis(tree, view=None, abnormality=None, split="test")
    assert {image.split for image in test.images} == {"test"} and len(test.images) == 6
    assert all("-Test_" in image.case for image in test.images)
    with pytest.raises(ConfigError, match="view"):
        select_cbis(tree, view="LMLO")
    with pytest.raises(ConfigError, match="abnormality"):
        select_cbis(tree, abnormality="architectural distortion")


def test_an_image_with_two_abnormalities_is_kept_once(tree: Path) -> None:
    rows = [row for split in ("train", "test") for row in _rows(tree, "mass", split)
            if row["image view"] == "MLO"]
    per_case = {case: sum(_case(row) == case for row in rows) for case in MASS_MLO}
    assert max(per_case.values()) == 2  # the miniature does describe one image twice
    selection = select_cbis(tree)
    cases = [image.case for image in selection.images]
    assert sorted(cases) == sorted(MASS_MLO)
    assert selection.skipped_rows == len(rows) - len(MASS_MLO)


def test_roi_masks_and_cropped_images_are_never_selected(copy: Path) -> None:
    roi_row = dict(_rows(copy)[0])
    roi_row["image file path"] = roi_row["ROI mask file path"]  # a row naming a mask as its image
    crop_row = dict(_rows(copy)[1])
    crop_row["image file path"] = crop_row["cropped image file path"]
    with (copy / CSV_NAMES[("mass", "train")]).open("a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=list(roi_row)).writerows([roi_row, crop_row])
    selection = select_cbis(copy, view=None, abnormality=None)
    assert len(selection.images) == 12
    assert selection.skipped_rows == 6 + 2
    for image in selection.images:
        assert image.path.parent.name.startswith("1.000000-full mammogram images-")
        assert pydicom.dcmread(image.path, stop_before_pixels=True).SeriesDescription == "full mammogram images"


def test_csv_paths_resolve_by_case_folder_and_series_uid(tree: Path) -> None:
    selection = select_cbis(tree, view=None, abnormality=None)
    by_case = {image.case: image for image in selection.images}
    rows = [row for kind in ("mass", "calc") for split in ("train", "test") for row in _rows(tree, kind, split)]
    assert any(row["image file path"] != row["image file path"].strip().strip('"') for row in rows)
    for row in rows:
        case, study, series, name = row["image file path"].strip().strip('"').split("/")
        assert not (tree / "CBIS-DDSM" / case / study / series / name).exists()  # the layouts differ
        ds = pydicom.dcmread(by_case[case].path, stop_before_pixels=True)
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (study, series)
        assert by_case[case].path.name == "1-1.dcm"


def test_root_may_be_the_download_folder_with_csvs_beside_or_inside(copy: Path) -> None:
    expected = {image.case for image in select_cbis(copy).images}
    assert {image.case for image in select_cbis(copy / "CBIS-DDSM").images} == expected
    for name in CSV_NAMES.values():
        (copy / name).rename(copy / "CBIS-DDSM" / name)
    assert {image.case for image in select_cbis(copy).images} == expected
    assert {image.case for image in select_cbis(copy / "CBIS-DDSM").images} == expected
    (copy.parent / "elsewhere" / "CBIS-DDSM").mkdir(parents=True)
    with pytest.raises(ConfigError, match="mass_case_description_train_set.csv"):
        select_cbis(copy.parent / "elsewhere")


def test_files_not_in_the_download_are_reported(copy: Path) -> None:
    shutil.rmtree(copy / "CBIS-DDSM" / "Mass-Test_P_00002_LEFT_MLO")
    renamed = next((copy / "CBIS-DDSM" / "Mass-Training_P_00001_RIGHT_MLO").rglob("1-1.dcm"))
    ds = pydicom.dcmread(renamed)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()  # a file of another series
    ds.save_as(renamed)
    selection = select_cbis(copy)
    assert {image.case for image in selection.images} == MASS_MLO - {
        "Mass-Test_P_00002_LEFT_MLO", "Mass-Training_P_00001_RIGHT_MLO"}
    assert [path.split("/")[0] for path in selection.missing] == [
        "Mass-Test_P_00002_LEFT_MLO", "Mass-Training_P_00001_RIGHT_MLO"]
    assert all(path.endswith("/000000.dcm") and "\n" not in path for path in selection.missing)


def test_the_official_split_is_honoured_when_both_csvs_are_present(copy: Path) -> None:
    selection = select_cbis(copy)
    assert selection.has_official_split
    official = selection.official_split()
    assert official is not None
    train, test = official
    assert {r.patient_id for r in train} == {"P_00001"} and {r.patient_id for r in test} == {"P_00002"}
    (copy / CSV_NAMES[("mass", "test")]).unlink()
    only_train = select_cbis(copy)
    assert {image.split for image in only_train.images} == {"train"}
    assert not only_train.has_official_split and only_train.official_split() is None


def test_patients_are_parsed_from_the_case_folders(tree: Path) -> None:
    selection = select_cbis(tree, view=None, abnormality=None)
    p1 = {(image.laterality, image.view) for image in selection.images if image.patient_id == "P_00001"}
    assert p1 == {("L", "CC"), ("L", "MLO"), ("R", "MLO")}
    records = selection.records()
    assert {r.patient_id for r in records} == {"P_00001", "P_00002", "P_00003", "P_00004"}
    for seed in range(4):
        train, val = split_by_patient(records, seed=seed)
        assert not {r.patient_id for r in train} & {r.patient_id for r in val}


def test_the_miniature_is_reproducible(tmp_path: Path) -> None:
    first = write_miniature_cbis(tmp_path / "a", cases=2, seed=9, size=(48, 40))
    second = write_miniature_cbis(tmp_path / "b", cases=2, seed=9, size=(48, 40))
    for name in CSV_NAMES.values():
        assert (first / name).read_bytes() == (second / name).read_bytes()
    files = sorted(p.relative_to(first) for p in first.rglob("*.dcm"))
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.dcm"))
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in files)
    assert len(files) == 2 + 2 * 3  # 2 full images; 3 abnormalities with a crop and a mask each


def test_the_official_test_set_never_trains_nor_chooses_the_checkpoint(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Validation comes from the official training set; the test set is only measured, at the end."""
    selection = select_cbis(tree, view=None, abnormality=None)
    official_train = {r.sop_instance_uid for r in selection.records("train")}
    official_test = {r.sop_instance_uid for r in selection.records("test")}
    assert len(official_train) == len(official_test) == 6 and not official_train & official_test
    out = tmp_path / "models" / "cbis-ae"
    code = main(["train", "--cbis-ddsm", str(tree), "--view", "", "--abnormality", "", "--arch", "ae",
                 "--image-size", "64", "--epochs", "2", "--batch-size", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "official test set held out, validation split by patient from the training set" in printed
    assert "held-out test MSE" in printed
    manifest = json.loads((out.parent / "cbis-ae.checkpoints" / "split.json").read_text())
    sides = {side: {row["sop_instance_uid"] for row in rows} for side, rows in manifest.items()}
    assert sides["test"] == official_test
    assert sides["train"] and sides["validation"]  # one training patient validates, one trains
    assert sides["train"] | sides["validation"] == official_train
    assert not (sides["train"] | sides["validation"]) & official_test
    card = json.loads(out.with_suffix(".json").read_text())
    training, metrics = card["training"], card["metrics"]
    assert (training["train_patients"], training["val_patients"], training["test_patients"]) == (1, 1, 2)
    assert (training["train_images"], training["val_images"], training["test_images"]) == (3, 3, 6)
    assert "official CBIS-DDSM test set" in training["split"] and "official CBIS-DDSM test set" in metrics["test_set"]
    assert metrics["test_images"] == 6 and metrics["test_mse"] > 0 and metrics["val_images"] == 3
    assert "validation loss" in metrics["epoch_chosen_by"]
    assert "CBIS-DDSM all views all abnormalities" in training["data_note"]


def test_a_test_image_among_the_training_data_is_refused(tree: Path, tmp_path: Path) -> None:
    selection = select_cbis(tree, view=None, abnormality=None)
    leaked = selection.records("train") + selection.records("test")[:1]
    config = TrainConfig(data_dirs=(tree,), records=leaked, test_records=selection.records("test"), arch="ae",
                         out=tmp_path / "leak", epochs=1, batch_size=2, image_size=64)
    with pytest.raises(ConfigError, match="held-out test set"):
        train(config, progress=False)
    assert not (tmp_path / "leak.json").exists()


def test_train_cli_without_test_csvs_splits_by_patient(copy: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    for kind in ("mass", "calc"):
        (copy / CSV_NAMES[(kind, "test")]).unlink()
    out = tmp_path / "all-ae"
    code = main(["train", "--cbis-ddsm", str(copy), "--view", "", "--abnormality", "", "--arch", "ae",
                 "--image-size", "64", "--epochs", "1", "--batch-size", "2", "--out", str(out)])
    assert code == 0
    assert "random split by patient" in capsys.readouterr().out
    training = json.loads(out.with_suffix(".json").read_text())["training"]
    assert training["train_images"] + training["val_images"] == 6
    assert (training["train_patients"], training["val_patients"]) == (1, 1)
    assert training["test_images"] == 0  # two patients: one trains, one validates, none is left for a test


def test_train_cli_needs_exactly_one_data_source(tree: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--arch", "ae", "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tree), "--cbis-ddsm", str(tree), "--arch", "ae", "--out", str(tmp_path / "m")])
    capsys.readouterr()
    assert main(["train", "--cbis-ddsm", str(tmp_path), "--arch", "ae", "--out", str(tmp_path / "m")]) == 2
    assert "case_description" in capsys.readouterr().err
