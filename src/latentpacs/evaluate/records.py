"""What the evaluator writes and the plots and report read: CSV rows and the JSON summary.

The evaluator writes; :mod:`~latentpacs.evaluate.plots` and
:mod:`~latentpacs.evaluate.report` only read these files, so figures can be redrawn
from a finished evaluation without touching images or models.

Units: ``mse``, ``psnr`` and ``ssim`` are the paper's scale (canonical [0, 1] images
resized bilinearly to 1024 x 1024); ``mse_over_variance`` is that MSE over the variance of
the resized original (0 is perfect, 1 is the image's mean grey level: images of different
contrast weigh alike, the figure PCA-16 is compared by); ``bits`` is 8 x the stored encoding's bytes (for
``jpeg-qQ`` the 1024 x 1024 JPEG file, as the paper codes it);
``efficiency`` is (1 - mse) / ln(bits) (paper Eq. 3); ``bpp`` is bits over the native
pixel count, for every codec (what storing this image costs per detector pixel); ``psnr_native`` and ``psnr_breast`` are at native resolution and bit depth
(the whole image, the breast region only); ``max_abs_error`` is in the original's stored
values. An infinite PSNR (identical images) is written ``inf`` in CSV and ``null`` in JSON.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

METRICS_CSV = "metrics.csv"
RATE_DISTORTION_CSV = "rate_distortion.csv"
SUMMARY_JSON = "summary.json"
PREVIEWS_NPZ = "previews.npz"
#: The per-image measures summarised per codec, in table order.
MEASURES = ("mse", "mse_over_variance", "psnr", "ssim", "bits", "bpp", "efficiency", "psnr_native", "psnr_breast",
            "max_abs_error")


@dataclass(frozen=True)
class MetricRow:
    """One image measured with one codec (a row of ``metrics.csv``).

    ``kind`` is ``learned`` (a model's latent), ``jpeg`` (the JPEG baselines: ``jpeg-qQ``
    the paper's protocol, a JPEG of the 1024 x 1024 resize; ``jpeg-qQ-native`` a JPEG of
    the native matrix), ``tier`` (latent plus a JPEG-LS stream) or ``lossless`` (a classic
    lossless coder).
    """

    image: str
    codec: str
    kind: str
    rows: int
    columns: int
    bits_stored: int
    mse: float
    mse_over_variance: float
    psnr: float
    ssim: float
    bits: int
    bpp: float
    efficiency: float
    psnr_native: float
    psnr_breast: float
    max_abs_error: int


@dataclass(frozen=True)
class RatePoint:
    """One image coded by a classic lossy codec at one setting (``rate_distortion.csv``)."""

    image: str
    codec: str
    setting: float
    bits: int
    bpp: float
    mse: float


def _write(path: Path, rows: list[Any], kind: type) -> None:
    names = [f.name for f in fields(kind)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in asdict(row).items()})


def _read(path: Path, kind: type) -> list[Any]:
    types = {f.name: f.type for f in fields(kind)}
    convert = {"int": int, "float": float, "str": str}
    with path.open(newline="") as handle:
        return [kind(**{k: convert[str(types[k])](v) for k, v in row.items()}) for row in csv.DictReader(handle)]


def write_metrics(path: Path, rows: list[MetricRow]) -> None:
    """Write ``metrics.csv``."""
    _write(path, rows, MetricRow)


def read_metrics(path: Path) -> list[MetricRow]:
    """Read ``metrics.csv``."""
    return _read(path, MetricRow)


def write_rate_points(path: Path, points: list[RatePoint]) -> None:
    """Write ``rate_distortion.csv``."""
    _write(path, points, RatePoint)


def read_rate_points(path: Path) -> list[RatePoint]:
    """Read ``rate_distortion.csv``."""
    return _read(path, RatePoint)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def spread(values: list[float]) -> dict[str, Any]:
    """Median, quartiles, extremes, mean and standard deviation; non-finite values -> null."""
    data = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf between equal infinite values
        q25, median, q75 = np.percentile(data, [25, 50, 75])
    finite = data[np.isfinite(data)]
    return {
        "median": _finite(median),
        "q25": _finite(q25),
        "q75": _finite(q75),
        "min": _finite(float(data.min())),
        "max": _finite(float(data.max())),
        "mean": _finite(float(finite.mean())) if finite.size == data.size else None,
        "std": _finite(float(finite.std())) if finite.size == data.size else None,
        "infinite": int(data.size - finite.size),
    }


def summarise(rows: list[MetricRow], points: list[RatePoint]) -> dict[str, Any]:
    """Per codec: kind, image count and the spread of every measure; rate-distortion medians."""
    codecs: dict[str, Any] = {}
    for codec in dict.fromkeys(r.codec for r in rows):
        mine = [r for r in rows if r.codec == codec]
        codecs[codec] = {
            "kind": mine[0].kind,
            "images": len(mine),
            **{m: spread([float(getattr(r, m)) for r in mine]) for m in MEASURES},
        }
    curves: dict[str, list[dict[str, float]]] = {}
    for codec in dict.fromkeys(p.codec for p in points):
        for setting in sorted({p.setting for p in points if p.codec == codec}):
            mine_p = [p for p in points if p.codec == codec and p.setting == setting]
            curves.setdefault(codec, []).append({
                "setting": setting,
                "bpp": float(np.median([p.bpp for p in mine_p])),
                "bits": float(np.median([p.bits for p in mine_p])),
                "mse": float(np.median([p.mse for p in mine_p])),
            })
    return {"codecs": codecs, "rate_distortion": curves}


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` (strict JSON: no NaN or Infinity)."""
    path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")


def read_summary(path: Path) -> dict[str, Any]:
    """Read ``summary.json``."""
    return json.loads(path.read_text())
