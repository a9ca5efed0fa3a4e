"""CBIS-DDSM: select full mammograms from the case-description CSVs and find them on disk.

CBIS-DDSM describes every abnormality in one CSV row (``mass_case_description_{train,
test}_set.csv``, ``calc_case_description_{train,test}_set.csv``). A row names its full
mammogram as ``<case folder>/<StudyInstanceUID>/<SeriesInstanceUID>/000000.dcm``, where the
case folder reads ``{Mass,Calc}-{Training,Test}_P_NNNNN_{LEFT,RIGHT}_{CC,MLO}``; cropped
lesions and ROI masks live in case folders with an ``_<abnormality id>`` suffix.

A TCIA download does not use those paths: it writes ``CBIS-DDSM/<case folder>/<MM-DD-YYYY-
DDSM-NNNNN>/1.000000-full mammogram images-NNNNN/1-1.dcm``. :func:`select_cbis` therefore
reads the headers (PS3.10 files, pixels not read) of the case folders it needs and matches
each row by case folder and Series Instance UID (0020,000E, PS3.3 C.7.3.1), which the CSV
path and the header share. Each full mammogram is kept once however many abnormalities
its rows describe; series whose Series Description (0008,103E) names ROI masks or cropped
images are never taken. The patient is the ``P_NNNNN`` part of the case folder, so a split
by patient keeps a woman's CC and MLO, left and right images together.

A miniature tree in the download layout, for tests and docs/replication.md, is written by
``write_miniature_cbis`` in the test suite's ``tests/cbis_data.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from latentpacs.errors import ConfigError
from latentpacs.train.data import ImageRecord

logger = logging.getLogger(__name__)

DATA_FOLDER = "CBIS-DDSM"
#: (abnormality, split) -> the CSV file name TCIA publishes.
CSV_NAMES: dict[tuple[str, str], str] = {
    (kind, split): f"{kind}_case_description_{split}_set.csv"
    for kind in ("mass", "calc") for split in ("train", "test")
}
_CASE = re.compile(r"^(Mass|Calc)-(Training|Test)_(P_\d+)_(LEFT|RIGHT)_(CC|MLO)(?:_(\d+))?$", re.IGNORECASE)
_NOT_FULL = ("roi", "mask", "crop")
_HEADER_TAGS = ["SeriesInstanceUID", "SeriesDescription", "SOPInstanceUID"]


@dataclass(frozen=True)
class CbisImage:
    """One full mammogram of CBIS-DDSM, found on disk.

    Attributes
    ----------
    path:
        The DICOM file (PS3.10).
    patient_id:
        The patient, ``P_NNNNN`` (the unit of any train/validation split).
    case:
        The case folder, e.g. ``Mass-Training_P_00001_LEFT_CC`` (also its Patient ID).
    view, laterality:
        ``"CC"`` or ``"MLO"``; ``"L"`` or ``"R"``.
    abnormality:
        ``"mass"`` or ``"calc"``.
    split:
        The official split, ``"train"`` or ``"test"``.
    sop_instance_uid:
        SOP Instance UID (0008,0018) read from the header.
    """

    path: Path
    patient_id: str
    case: str
    view: str
    laterality: str
    abnormality: str
    split: str
    sop_instance_uid: str = ""


@dataclass(frozen=True)
class CbisSelection:
    """What :func:`select_cbis` found.

    Attributes
    ----------
    images:
        The full mammograms, each once, sorted by split and case folder.
    missing:
        CSV image paths (stripped) whose file is not in the download.
    skipped_rows:
        Rows that matched the filters but added no image: further abnormalities of an
        image already selected, and rows whose image path cannot be parsed.
    """

    images: list[CbisImage]
    missing: list[str]
    skipped_rows: int

    @property
    def has_official_split(self) -> bool:
        """True when images of both the official training and test sets were found."""
        return {image.split for image in self.images} == {"train", "test"}

    def records(self, split: str | None = None) -> tuple[ImageRecord, ...]:
        """The images (of one official split, or all) as training records, patient ``P_NNNNN``."""
        return tuple(
            ImageRecord(image.path, image.patient_id, image.sop_instance_uid)
            for image in self.images if split is None or image.split == split
        )

    def official_split(self) -> tuple[tuple[ImageRecord, ...], tuple[ImageRecord, ...]] | None:
        """(train, test) records of the official split, or None when one side is absent.

        Training uses the test records only as its held-out test set (``TrainConfig.test_records``):
        never trained on and never used to choose the checkpoint; validation is a split by
        patient of the training records.
        """
        if not self.has_official_split:
            return None
        train, test = self.records("train"), self.records("test")
        shared = {r.patient_id for r in train} & {r.patient_id for r in test}
        if shared:
            logger.warning("%d patient(s) appear in both official sets, e.g. %s", len(shared), min(shared))
        return train, test


@dataclass(frozen=True)
class _Row:
    """The parts of one CSV row that select and locate its full mammogram."""

    csv_path: str
    case: str
    series_uid: str
    image: CbisImage


@dataclass(frozen=True)
class _Found:
    """A file of the download: where it is and what its header says (PS3.3 C.7.3.1)."""

    path: Path
    sop_instance_uid: str
    description: str


def _normalise(value: str | None, allowed: dict[str, str], what: str) -> str | None:
    if value is None:
        return None
    try:
        return allowed[value.strip().lower()]
    except KeyError:
        raise ConfigError(f"CBIS-DDSM {what} {value!r} is not one of {sorted(set(allowed.values()))}") from None


def _clean_path(text: str) -> str:
    """A CSV path field without the stray whitespace, newlines and quotes some rows carry."""
    return text.strip().strip("\"'").strip().replace("\\", "/")


def _parse_row(row: dict[str, str]) -> _Row | None:
    """The image a CSV row names, or None when its image file path is unusable."""
    fields = {(key or "").strip().lower().replace("_", " "): value or "" for key, value in row.items()}
    csv_path = _clean_path(fields.get("image file path", ""))
    parts = [part for part in csv_path.split("/") if part]
    match = _CASE.match(parts[0]) if parts else None
    if match is None or len(parts) < 3 or match.group(6):
        return None
    kind, split, patient, side, view = match.group(1, 2, 3, 4, 5)
    image = CbisImage(
        path=Path(csv_path), patient_id=patient.upper(), case=parts[0], view=view.upper(),
        laterality=side[0].upper(), abnormality=kind.lower(), split="train" if split.lower() == "training" else "test",
    )
    return _Row(csv_path, parts[0], parts[2], image)


def _locate(root: Path) -> tuple[Path, list[Path]]:
    """The folder holding the case folders, and the folders where the CSVs may be."""
    if not root.is_dir():
        raise ConfigError(f"CBIS-DDSM root {root} is not a folder")
    data_root = root / DATA_FOLDER if (root / DATA_FOLDER).is_dir() else root
    places = list(dict.fromkeys([root, data_root, root.parent]))
    return data_root, places


def _read_csvs(places: list[Path], kinds: list[str], splits: list[str]) -> list[tuple[str, list[dict[str, str]]]]:
    found = []
    for kind in kinds:
        for split in splits:
            name = CSV_NAMES[(kind, split)]
            path = next((place / name for place in places if (place / name).is_file()), None)
            if path is None:
                logger.info("no %s beside or inside the download", name)
                continue
            with path.open(newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.DictReader(handle))
            found.append((name, rows))
    if not found:
        names = ", ".join(CSV_NAMES[(k, s)] for k in kinds for s in splits)
        raise ConfigError(f"none of {names} in {', '.join(str(p) for p in places)}")
    return found


def _index_cases(data_root: Path, cases: set[str], progress: bool) -> dict[tuple[str, str], _Found]:
    """(case folder, Series Instance UID) -> file, from headers only (PS3.10 7.1)."""
    index: dict[tuple[str, str], _Found] = {}
    present = sorted(case for case in cases if (data_root / case).is_dir())
    for case in tqdm(present, desc="indexing CBIS-DDSM", unit="case", disable=not progress):
        for current, subdirs, names in os.walk(data_root / case):
            subdirs.sort()
            for name in sorted(n for n in names if n.lower().endswith(".dcm")):
                path = Path(current) / name
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
                except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
                    logger.warning("unreadable %s: %s", path, " ".join(str(exc).split())[:120])
                    continue
                key = (case, str(ds.get("SeriesInstanceUID", "")).strip())
                if key in index:
                    logger.warning("series %s of %s holds several files; using %s", key[1], case, index[key].path)
                    continue
                index[key] = _Found(path, str(ds.get("SOPInstanceUID", "")).strip(),
                                    str(ds.get("SeriesDescription", "")).strip())
    return index


def select_cbis(
    root: Path,
    *,
    view: str | None = "MLO",
    abnormality: str | None = "mass",
    split: str | None = None,
    progress: bool = False,
) -> CbisSelection:
    """Select the full mammograms of CBIS-DDSM and resolve them in a TCIA download.

    Parameters
    ----------
    root:
        The folder holding ``CBIS-DDSM/`` or that folder itself; the CSVs are looked
        for in ``root``, ``root/CBIS-DDSM`` and the parent of ``root``.
    view:
        ``"CC"``, ``"MLO"`` (the paper) or None for both.
    abnormality:
        ``"mass"`` (the paper), ``"calc"`` or None for both.
    split:
        ``"train"``, ``"test"`` or None for both official sets.
    progress:
        Show a tqdm bar while reading headers.

    Returns
    -------
    CbisSelection
        Each full mammogram once; ROI masks and cropped images are never selected.

    Raises
    ------
    ConfigError
        A bad filter value, no such folder, or none of the wanted CSVs found.
    """
    view = _normalise(view, {"cc": "CC", "mlo": "MLO"}, "view")
    abnormality = _normalise(abnormality, {"mass": "mass", "calc": "calc", "calcification": "calc"}, "abnormality")
    split = _normalise(split, {"train": "train", "training": "train", "test": "test"}, "split")
    data_root, places = _locate(Path(root))
    kinds = [abnormality] if abnormality else ["mass", "calc"]
    splits = [split] if split else ["train", "test"]
    rows: dict[tuple[str, str], _Row] = {}
    skipped = 0
    for name, table in _read_csvs(places, kinds, splits):
        for number, raw in enumerate(table, start=1):
            row = _parse_row(raw)
            if row is None:
                logger.warning("%s row %d: unusable image file path; skipped", name, number)
                skipped += 1
            elif view is None or row.image.view == view:
                key = (row.case, row.series_uid)
                skipped += key in rows
                rows.setdefault(key, row)
    index = _index_cases(data_root, {case for case, _ in rows}, progress)
    images, missing = [], []
    for key, row in rows.items():
        found = index.get(key)
        if found is not None and any(word in found.description.lower() for word in _NOT_FULL):
            logger.warning("%s resolves to %s, a %s series; not a full mammogram", row.csv_path, found.path,
                           found.description)
            found = None
        if found is None:
            missing.append(row.csv_path)
            continue
        images.append(dataclasses.replace(row.image, path=found.path, sop_instance_uid=found.sop_instance_uid))
    images.sort(key=lambda image: (image.split != "train", image.case))
    if missing:
        logger.warning("%d of %d CBIS-DDSM images not found under %s, e.g. %s",
                       len(missing), len(rows), data_root, missing[0])
    logger.info("CBIS-DDSM: %d images selected, %d missing, %d rows skipped", len(images), len(missing), skipped)
    return CbisSelection(images, sorted(missing), skipped)
