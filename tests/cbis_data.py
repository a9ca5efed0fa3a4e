"""A miniature CBIS-DDSM for tests and docs/replication.md: phantoms in the TCIA layout.

:func:`write_miniature_cbis` writes a tiny tree in the TCIA download layout, with the
four case-description CSVs, from the phantom generator
(:mod:`latentpacs.train.cbis` describes the layout); nothing is downloaded. No command
of latentpacs uses it, so it lives with the tests.
"""

from __future__ import annotations

import copy
import csv
import logging
import uuid
from pathlib import Path

import numpy as np
import pydicom

from latentpacs import phantom
from latentpacs.errors import ConfigError
from latentpacs.train.cbis import CSV_NAMES, DATA_FOLDER
from latentpacs.uid import uid_from_name

logger = logging.getLogger(__name__)

_MASS_COLUMNS = [
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id", "abnormality type",
    "mass shape", "mass margins", "assessment", "pathology", "subtlety", "image file path",
    "cropped image file path", "ROI mask file path",
]
_CALC_COLUMNS = [
    "patient_id", "breast density", "left or right breast", "image view", "abnormality id", "abnormality type",
    "calc type", "calc distribution", "assessment", "pathology", "subtlety", "image file path",
    "cropped image file path", "ROI mask file path",
]
#: Patient p belongs to _PLAN[p % 4] and has 3 cases: _SIDES[p % 2].
_PLAN = (("mass", "train"), ("mass", "test"), ("calc", "train"), ("calc", "test"))
_SIDES = ((("LEFT", "CC"), ("LEFT", "MLO"), ("RIGHT", "MLO")), (("RIGHT", "CC"), ("RIGHT", "MLO"), ("LEFT", "MLO")))
_PATHOLOGY = ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK")
#: Never change it: the miniature's UIDs (and the figures measured on it) depend on it.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "latentpacs:cbis-miniature")


def _uid(*parts: object) -> str:
    """A reproducible UID under 2.25 (PS3.5 B.2) derived from ``parts``."""
    return uid_from_name(_UID_NAMESPACE, *parts)


def _dated(rng: np.random.Generator) -> str:
    """A TCIA study folder name, ``MM-DD-YYYY-DDSM-NNNNN``."""
    month, day, number = rng.integers(1, 13), rng.integers(1, 29), rng.integers(10000, 100000)
    return f"{month:02d}-{day:02d}-2016-DDSM-{number:05d}"


def _save(ds: pydicom.Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _derived(full: pydicom.Dataset, pixels: np.ndarray, *, case: str, study: str, series: str,
             description: str) -> pydicom.Dataset:
    """A cropped image or ROI mask made from ``full``: its header, new identity and pixels (PS3.3 C.7.6.1)."""
    ds = copy.deepcopy(full)
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = case, study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(_uid(series, "image"))
    ds.SeriesDescription, ds.ImageType = description, ["DERIVED", "SECONDARY"]
    ds.Rows, ds.Columns = pixels.shape
    for keyword in ("WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    return ds


def _write_case(data_root: Path, case: str, patient_id: str, kind: str, side: str, view: str, lesions: int,
                seed: int, size: tuple[int, int], rng: np.random.Generator) -> list[list[str]]:
    """Write one case folder and its ROI/cropped folders; return its CSV rows (one per abnormality)."""
    study, series = _uid(seed, case, "study"), _uid(seed, case, "series")
    spec = phantom.PhantomSpec(size[0], size[1], view, side[0], 16, "MONOCHROME2", "FOR PRESENTATION",
                               masses=lesions if kind == "mass" else 0,
                               calcification_clusters=lesions if kind == "calc" else 0)
    full = phantom.make_dataset(spec, rng, patient_id=case, patient_name=f"{patient_id}^CBIS", study_uid=study,
                                series_uid=series, instance_number=1, sop_instance_uid=_uid(series, "image"))
    full.SeriesDescription = "full mammogram images"
    _save(full, data_root / case / _dated(rng) / f"1.000000-full mammogram images-{rng.integers(10000, 100000)}"
          / "1-1.dcm")
    image_path = f"{case}/{study}/{series}/000000.dcm"
    stored = np.frombuffer(full.PixelData, dtype=np.uint16).reshape(size)
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    rows = []
    for abnormality in range(1, lesions + 1):
        roi_case = f"{case}_{abnormality}"
        roi_study, crop_series, mask_series = (_uid(seed, roi_case, part) for part in ("study", "crop", "mask"))
        cy, cx = (int(rng.integers(n // 4, 3 * n // 4)) for n in size)
        radius = max(3, min(size) // 10)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).astype(np.uint16) * 65535
        crop = stored[max(cy - radius, 0):cy + radius, max(cx - radius, 0):cx + radius]
        roi_dir = data_root / roi_case / _dated(rng)
        for pixels, series_uid, description in ((crop, crop_series, "cropped images"),
                                                (mask, mask_series, "ROI mask images")):
            ds = _derived(full, pixels, case=roi_case, study=roi_study, series=series_uid, description=description)
            _save(ds, roi_dir / f"1.000000-{description}-{rng.integers(10000, 100000)}" / "1-1.dcm")
        # Like the published CSVs, some path fields carry a trailing newline or stray quotes.
        shown = f'"{image_path}"' if abnormality == 2 else image_path + "\n" * (view == "CC")
        grading = [str(rng.integers(0, 6)), _PATHOLOGY[int(rng.integers(0, 3))], str(rng.integers(1, 6))]
        detail = ["OVAL", "CIRCUMSCRIBED"] if kind == "mass" else ["PLEOMORPHIC", "CLUSTERED"]
        rows.append([patient_id, str(rng.integers(1, 5)), side, view, str(abnormality),
                     "mass" if kind == "mass" else "calcification", *detail, *grading, shown,
                     f"{roi_case}/{roi_study}/{crop_series}/000000.dcm\n",
                     f"{roi_case}/{roi_study}/{mask_series}/000001.dcm\n"])
    return rows


def write_miniature_cbis(root: Path, *, cases: int, seed: int, size: tuple[int, int] = (256, 208)) -> Path:
    """Write a tiny CBIS-DDSM in the TCIA download layout, with its four case-description CSVs.

    Patient ``p`` (``P_0000{p+1}``) gets three case folders (one CC and two MLO views,
    both breasts) of one abnormality type and one official set, cycling mass/train,
    mass/test, calc/train, calc/test; every second case's image has two abnormalities,
    the others one. Each abnormality has a cropped-image and an ROI-mask series in its
    ``<case>_<id>`` folder. Full mammograms are phantom Digital Mammography images
    (PS3.3 A.26, MONOCHROME2, 16 bits) whose Patient ID is the case folder and whose
    Series Description is ``full mammogram images``, as in the published data.

    Parameters
    ----------
    root:
        Created if missing; receives ``CBIS-DDSM/`` and the CSVs.
    cases:
        Number of full-mammogram case folders (12 or more cover every set).
    seed:
        Non-negative; the same arguments write the same tree.
    size:
        (rows, cols) of the full mammograms, at least 32 x 32.

    Returns
    -------
    pathlib.Path
        ``root``, ready for :func:`latentpacs.train.cbis.select_cbis`.
    """
    if cases < 1 or seed < 0:
        raise ConfigError(f"a miniature CBIS-DDSM needs cases >= 1 and seed >= 0 (got {cases}, {seed})")
    root = Path(root)
    tables: dict[tuple[str, str], list[list[str]]] = {key: [] for key in CSV_NAMES}
    for index in range(cases):
        patient, slot = divmod(index, 3)
        kind, split = _PLAN[patient % 4]
        side, view = _SIDES[patient % 2][slot]
        patient_id = f"P_{patient + 1:05d}"
        case = f"{kind.title()}-{'Training' if split == 'train' else 'Test'}_{patient_id}_{side}_{view}"
        rng = np.random.default_rng([seed, index])
        tables[(kind, split)] += _write_case(root / DATA_FOLDER, case, patient_id, kind, side, view,
                                             2 if index % 2 else 1, seed, size, rng)
    for (kind, split), table in tables.items():
        with (root / CSV_NAMES[(kind, split)]).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(_MASS_COLUMNS if kind == "mass" else _CALC_COLUMNS)
            writer.writerows(table)
    logger.info("wrote a miniature CBIS-DDSM of %d cases under %s (seed %d)", cases, root, seed)
    return root
