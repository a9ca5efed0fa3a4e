"""Training data: DICOM folders scanned into image records and a cached tensor dataset.

A folder is walked recursively; every file is read up to its Pixel Data header only
(the pixel values themselves are deferred, never loaded) and kept when it is a
single-frame grayscale image (PS3.3 C.7.6.3 Image Pixel module: Samples per Pixel 1,
MONOCHROME1 or MONOCHROME2, Number of Frames absent or 1) that carries Pixel Data
(7FE0,0010). Everything else is reported back with a one-line reason, never raised.

The dataset decodes each kept file once through :mod:`latentpacs.image.pixels`, resizes the
canonical image to the model's input size with the codec's one bilinear resize, and
keeps the result in memory as float16; an optional cache directory stores one ``.npy``
per SOP Instance UID (0008,0018) so a second run skips decoding.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from latentpacs.image import pixels
from latentpacs.codec.engine import resize_bilinear
from latentpacs.errors import LatentPacsError

logger = logging.getLogger(__name__)

_GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})


@dataclass(frozen=True)
class ImageRecord:
    """One usable image found on disk.

    Attributes
    ----------
    path:
        The DICOM file (PS3.10).
    patient_id:
        Patient ID (0010,0020); the unit of the train/validation split. Empty when the
        file has none, which puts all such images with one "unknown" patient.
    sop_instance_uid:
        SOP Instance UID (0008,0018); the key of the decoded-image cache.
    """

    path: Path
    patient_id: str
    sop_instance_uid: str


def _reject_reason(ds: pydicom.Dataset) -> str | None:
    """Why a header-only dataset is not a trainable image, or None when it is (PS3.3 C.7.6.3)."""
    if "PixelData" not in ds:
        return "no Pixel Data (7FE0,0010)"
    uid = str(ds.get("SOPInstanceUID", "")).strip()
    if not uid:
        return "no SOP Instance UID (0008,0018)"
    samples = ds.get("SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if samples != 1 or photometric not in _GRAYSCALE:
        return f"not grayscale (Samples per Pixel {samples}, Photometric {photometric or 'absent'})"
    frames = ds.get("NumberOfFrames", 1)
    try:
        frame_count = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        return f"unreadable Number of Frames {frames!r}"
    if frame_count != 1:
        return f"multi-frame ({frame_count} frames)"
    return None


def _read_header(path: Path) -> pydicom.Dataset:
    """Read a file's data set with large values (Pixel Data) deferred, not loaded (PS3.10 7.1)."""
    return pydicom.dcmread(path, defer_size="4 KB")


def scan_dicom_folders(
    dirs: Sequence[Path],
) -> tuple[list[ImageRecord], list[tuple[Path, str]]]:
    """Find the trainable images under some folders.

    Parameters
    ----------
    dirs:
        Folders walked recursively (files in sorted order, so the result is the same on
        every run). A path that is a file is scanned as a single file.

    Returns
    -------
    records, skipped:
        The single-frame grayscale images with Pixel Data (PS3.3 C.7.6.3), and for
        every other file its path and a one-line reason (not DICOM, colour, multi-frame,
        no pixel data, duplicate SOP Instance UID, unreadable).
    """
    records: list[ImageRecord] = []
    skipped: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    for path in _walk(dirs):
        try:
            ds = _read_header(path)
        except InvalidDicomError:
            skipped.append((path, "not a DICOM file (no PS3.10 preamble and DICM prefix)"))
            continue
        except (OSError, ValueError, EOFError, TypeError, AttributeError, KeyError, struct.error) as exc:
            skipped.append((path, f"unreadable DICOM: {' '.join(str(exc).split())[:120]}"))
            continue
        reason = _reject_reason(ds)
        if reason is not None:
            skipped.append((path, reason))
            continue
        uid = str(ds.SOPInstanceUID).strip()
        if uid in seen:
            skipped.append((path, f"duplicate SOP Instance UID of {seen[uid]}"))
            continue
        seen[uid] = path
        records.append(ImageRecord(path, str(ds.get("PatientID", "") or "").strip(), uid))
    logger.info("scanned %d folder(s): %d images, %d skipped", len(dirs), len(records), len(skipped))
    return records, skipped


def _walk(dirs: Sequence[Path]) -> list[Path]:
    """All files under ``dirs``, sorted within each folder; hidden files are included."""
    files: list[Path] = []
    for root in dirs:
        root = Path(root)
        if root.is_file():
            files.append(root)
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"training data folder {root} does not exist")
        for current, subdirs, names in os.walk(root):
            subdirs.sort()
            files.extend(Path(current) / name for name in sorted(names))
    return files


def load_canonical(path: Path) -> np.ndarray:
    """Decode one file to its canonical image (float32 in [0, 1], PS3.3 C.7.6.3 honoured)."""
    image, _module = pixels.to_canonical(pixels.read_file(path))
    return np.asarray(image, dtype=np.float32)


class CachedImageDataset(torch.utils.data.Dataset[torch.Tensor]):
    """Images decoded once, resized to ``image_size`` and kept in memory as float16.

    Parameters
    ----------
    records:
        The images, in the order the dataset indexes them.
    image_size:
        The square model input size S; every image is resized bilinearly (with
        antialiasing) to S x S by :func:`latentpacs.codec.engine.resize_bilinear`.
    cache_dir:
        Optional folder holding ``<S>/<SOP Instance UID>.npy`` (float16) files; present
        files are read instead of decoding, missing ones are written.
    progress:
        Show a tqdm bar while decoding.
    desc:
        The bar's label.

    Attributes
    ----------
    records:
        The records that decoded; a file whose pixels cannot be decoded (a
        :class:`~latentpacs.errors.LatentPacsError` from :mod:`latentpacs.image.pixels`) is
        left out and listed in ``skipped`` with the reason.
    skipped:
        ``(path, reason)`` for each left-out record.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int,
        *,
        cache_dir: Path | None = None,
        progress: bool = False,
        desc: str = "decoding",
    ) -> None:
        self.image_size = image_size
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / str(image_size)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        kept: list[ImageRecord] = []
        self.skipped: list[tuple[Path, str]] = []
        images: list[torch.Tensor] = []
        for record in tqdm(records, desc=desc, unit="image", disable=not progress):
            try:
                image = self._load(record)
            except LatentPacsError as exc:
                self.skipped.append((record.path, exc.message))
                logger.warning("skipping %s: %s", record.path, exc.message)
                continue
            kept.append(record)
            images.append(torch.from_numpy(image))
        self.records: tuple[ImageRecord, ...] = tuple(kept)
        shape = (len(images), 1, image_size, image_size)
        self._cache = torch.stack(images).unsqueeze(1) if images else torch.empty(shape, dtype=torch.float16)

    def _load(self, record: ImageRecord) -> np.ndarray:
        """The resized float16 image of one record, from the cache folder when present."""
        cached = None if self.cache_dir is None else self.cache_dir / f"{record.sop_instance_uid}.npy"
        if cached is not None and cached.is_file():
            image = np.load(cached, allow_pickle=False)
            if image.shape == (self.image_size, self.image_size) and image.dtype == np.float16:
                return image
            logger.warning("ignoring stale cache file %s", cached)
        canonical = load_canonical(record.path)
        resized = resize_bilinear(canonical, (self.image_size, self.image_size))
        image = np.clip(resized, 0.0, 1.0).astype(np.float16)
        if cached is not None:
            partial = cached.with_suffix(".tmp.npy")
            np.save(partial, image, allow_pickle=False)
            partial.replace(cached)
        return image

    def __len__(self) -> int:
        return int(self._cache.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        """The image at ``index`` as a (1, S, S) float32 tensor in [0, 1]."""
        return self._cache[index].float()

    @property
    def patients(self) -> frozenset[str]:
        """The distinct Patient IDs (0010,0020) of the kept images."""
        return frozenset(record.patient_id for record in self.records)
