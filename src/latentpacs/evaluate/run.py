"""``latentpacs evaluate``: every model, JPEG and the classic lossless coders on the same images.

For each image the original is read once through :mod:`latentpacs.image.pixels`, then

* each model archives it at the ``latent`` tier through the product's own chain
  (:func:`latentpacs.image.chain.encode` -> :func:`~latentpacs.image.chain.decode`);
* JPEG at quality ``jpeg_quality`` of the image scaled to 8 bits, in two protocols
  (:func:`jpeg_codec_names`). ``jpeg-qQ`` is the paper's: the image resized bilinearly to
  1024 x 1024 first, bits = that file's bytes x 8, MSE and SSIM between the decoded
  1024 x 1024 image and the resized original. ``jpeg-qQ-native`` codes the native matrix
  (bits of the native-size file) and is measured like every other reconstruction; it is
  the one written as a DICOM series (:mod:`~latentpacs.evaluate.jpeg_series`) under
  ``jpeg-qQ-native/``, because it is the image a viewer shows at full size. The paper's
  files are written as they are, ``jpeg-qQ/*.jpg``;
* the first model archives it at each further fidelity tier (latent + stream);
* JPEG-LS, JPEG 2000 and JPEG-XL code it losslessly at the native bit depth;
* with ``coders`` on, every stream coder (JPEG-LS, the learned coder) at NEAR 0, 1, 2, 4
  and JPEG-XL (efforts 7, 9), JPEG 2000 and HTJ2K lossless code it, each stream verified
  (:mod:`~latentpacs.evaluate.coders`; ``summary.json`` key ``coders``, a table and a
  figure in the report);
* JPEG (over qualities, both protocols: ``jpeg`` the paper's, ``jpeg-native``) and
  JPEG 2000 (over target PSNRs, native) trace rate-distortion curves.

Every codec's reconstruction is measured against the original the same way
(:mod:`~latentpacs.evaluate.metrics`). The run writes ``metrics.csv``,
``rate_distortion.csv``, ``summary.json`` and ``previews.npz`` (small originals,
reconstructions and difference maps for the figures), then the figures and ``report.html``.

Unless ``write_dicom`` is off, the evaluation is also written as DICOM objects a PACS can
hold, in the evaluated images' own studies: ``dicom/sr/<Study Instance UID>.dcm``, one TID
1500 Measurement Report per study with the numbers of ``metrics.csv``
(:mod:`~latentpacs.evaluate.sr`), and ``dicom/maps/<SOP Instance UID>/<codec>.dcm``, a
Parametric Map of |reconstruction - original| per image for each model and both JPEG
baselines (:mod:`~latentpacs.evaluate.dicom_maps`; the tiers' errors are bounded by their
definition, the lossless coders' are zero).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from tqdm import tqdm

from latentpacs.codec.engine import Engine, resize_bilinear
from latentpacs.codec.modelfile import load_model
from latentpacs.codec.tiers import Tier
from latentpacs.errors import ConfigError, LatentPacsError
from latentpacs.evaluate import baselines, coders, dicom_common, dicom_maps, metrics, plots, records, report, sr
from latentpacs.evaluate.jpeg_series import jpeg_dataset
from latentpacs.image import chain
from latentpacs.image.pixels import PixelModule, original_stored_bytes, read_file, stored_to_canonical, stored_values
from latentpacs.uid import check_uid, uid_file_name

logger = logging.getLogger(__name__)

#: Longest side of the small images kept for the reconstruction and difference figures.
PREVIEW_ROWS = 384
#: Where the DICOM objects go under the output folder.
DICOM_DIR = "dicom"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")
#: What a header that cannot make a valid DICOM object raises (a bad UID; highdicom's checks).
_DICOM_ERRORS = (LatentPacsError, ValueError, TypeError)


@dataclass(frozen=True)
class EvaluationConfig:
    """What to evaluate and where to write it.

    Parameters
    ----------
    images:
        DICOM files (PS3.10), measured in this order.
    out:
        Output folder, created if missing.
    models:
        Model names or weights paths; the first also archives the ``tiers``. The default
        includes ``pca``, the linear baseline (PCA-16 fitted on the same training images),
        so every report shows what the learned latents add to it.
    jpeg_quality:
        The JPEG baseline's quality (the paper's 85).
    tiers:
        Fidelity tiers beyond ``latent`` to cost (``near-lossless:K``, ``lossless``).
    jpeg_qualities, jpeg2000_psnr_db:
        Settings of the rate-distortion curves (JPEG quality; JPEG 2000 target PSNR).
    previews:
        How many images appear in the reconstruction and difference figures.
    write_jpeg_series:
        Write the native JPEG baseline as DICOM (``jpeg-qQ-native/``) and the paper's files.
    write_dicom:
        Write the structured reports and difference maps (``dicom/``).
    map_max_side:
        Longest side of a difference map before it is block-averaged (0: never;
        :func:`~latentpacs.evaluate.dicom_maps.reduction_factor`).
    coders:
        Also compare the lossless and near-lossless coders
        (:func:`latentpacs.evaluate.coders.default_coders`; off by default: the classical
        coders alone take about 30 s per 2294 x 1914 image on 2 cores, JPEG-XL at effort 9
        19 s of it, and the learned coder at four NEARs adds more).
    """

    images: tuple[Path, ...]
    out: Path
    models: tuple[str, ...] = ("ae", "vae", "pca")
    jpeg_quality: int = baselines.PAPER_JPEG_QUALITY
    tiers: tuple[str, ...] = ("near-lossless:2", "lossless")
    jpeg_qualities: tuple[int, ...] = (5, 15, 30, 50, 70, 85, 95)
    jpeg2000_psnr_db: tuple[float, ...] = (32.0, 38.0, 44.0, 50.0, 56.0)
    previews: int = 4
    models_dir: Path | None = None
    device: str | None = None
    write_jpeg_series: bool = True
    write_dicom: bool = True
    map_max_side: int = dicom_maps.DEFAULT_MAX_SIDE
    coders: bool = False


@dataclass(frozen=True)
class EvaluationResult:
    """What a run wrote.

    ``jpeg_series`` are the native JPEG's DICOM objects (``jpeg-qQ-native/*.dcm``),
    ``jpeg_files`` the paper's 1024 x 1024 JPEG files (``jpeg-qQ/*.jpg``, named by the
    original's SOP Instance UID); ``skipped`` names each input that could not be measured
    and why. ``structured_reports`` (one per study) and ``difference_maps`` are the DICOM
    objects under ``dicom/``. ``coder_failures`` are the coder comparison's rows whose
    stream did not decode to the input (or within NEAR), per image.
    """

    out: Path
    rows: tuple[records.MetricRow, ...]
    summary: dict[str, Any]
    figures: tuple[Path, ...]
    report: Path
    jpeg_series: tuple[Path, ...]
    jpeg_files: tuple[Path, ...]
    skipped: tuple[tuple[Path, str], ...]
    structured_reports: tuple[Path, ...] = ()
    difference_maps: tuple[Path, ...] = ()
    coder_failures: tuple[coders.CoderFailure, ...] = ()


@dataclass(frozen=True)
class _Original:
    """One image as every codec is measured against it."""

    name: str
    canonical: np.ndarray
    paper: np.ndarray
    mask: np.ndarray
    module: PixelModule


def jpeg_codec_names(quality: int) -> tuple[str, str]:
    """The JPEG baselines' codec names: the paper's protocol, then the native one."""
    return f"jpeg-q{quality}", f"jpeg-q{quality}-native"


def _measure(
    original: _Original, codec: str, kind: str, recon: np.ndarray, bits: int, paper_recon: np.ndarray | None = None
) -> records.MetricRow:
    """Measure a reconstruction (canonical, native size) that cost ``bits``.

    The paper's measures (MSE, PSNR, SSIM) compare ``paper_recon`` (1024 x 1024) with
    the resized original; without one, ``recon`` resized to 1024 x 1024 stands in. The
    native measures compare ``recon`` with the original at its own matrix.
    """
    rows, cols = original.canonical.shape
    if paper_recon is None:
        paper_recon = resize_bilinear(recon.astype(np.float32), metrics.PAPER_SIZE)
    if paper_recon.shape != metrics.PAPER_SIZE:
        raise ValueError(f"the paper's measures need a {metrics.PAPER_SIZE} image, got {paper_recon.shape}")
    error = metrics.mse(original.paper, paper_recon)
    diff = np.abs(original.canonical.astype(np.float64) - recon.astype(np.float64))
    return records.MetricRow(
        image=original.name, codec=codec, kind=kind, rows=rows, columns=cols,
        bits_stored=original.module.bits_stored, mse=error,
        mse_over_variance=error / max(float(np.var(original.paper, dtype=np.float64)), 1e-12),
        psnr=metrics.psnr_from_mse(error),
        ssim=metrics.ssim(original.paper, paper_recon), bits=bits, bpp=bits / (rows * cols),
        efficiency=metrics.efficiency(error, bits),
        psnr_native=metrics.psnr(original.canonical, recon),
        psnr_breast=metrics.psnr_region(original.canonical, recon, original.mask),
        max_abs_error=int(np.rint(diff.max() * original.module.max_value)),
    )


def _exact(original: _Original, codec: str, nbytes: int) -> records.MetricRow:
    """A lossless coder's row: the reconstruction is the original (checked by the coder)."""
    rows, cols = original.canonical.shape
    bits = 8 * nbytes
    return records.MetricRow(
        image=original.name, codec=codec, kind="lossless", rows=rows, columns=cols,
        bits_stored=original.module.bits_stored, mse=0.0, mse_over_variance=0.0, psnr=float("inf"), ssim=1.0,
        bits=bits,
        bpp=bits / (rows * cols), efficiency=metrics.efficiency(0.0, bits),
        psnr_native=float("inf"), psnr_breast=float("inf"), max_abs_error=0,
    )


def _preview_shape(shape: tuple[int, int]) -> tuple[int, int]:
    scale = min(1.0, PREVIEW_ROWS / max(shape))
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def _rate_points(original: _Original, stored: np.ndarray, config: EvaluationConfig) -> list[records.RatePoint]:
    points = []
    pixels = stored.size
    for quality in config.jpeg_qualities:
        stream = baselines.jpeg_paper_encode(original.canonical, quality)
        bits = 8 * len(stream)
        points.append(records.RatePoint(original.name, "jpeg", float(quality), bits, bits / pixels,
                                        metrics.mse(original.paper, baselines.jpeg_decode(stream))))
        stream = baselines.jpeg_encode(original.canonical, quality)
        recon = resize_bilinear(baselines.jpeg_decode(stream), metrics.PAPER_SIZE)
        bits = 8 * len(stream)
        points.append(records.RatePoint(original.name, "jpeg-native", float(quality), bits, bits / pixels,
                                        metrics.mse(original.paper, recon)))
    for target in config.jpeg2000_psnr_db:
        stream = baselines.jpeg2000_encode(stored, original.module.bits_stored, target)
        decoded = stored_to_canonical(baselines.jpeg2000_decode(stream), original.module)
        recon = resize_bilinear(decoded, metrics.PAPER_SIZE)
        bits = 8 * len(stream)
        points.append(records.RatePoint(original.name, "jpeg2000", float(target), bits, bits / pixels,
                                        metrics.mse(original.paper, recon)))
    return points


@dataclass(frozen=True)
class _ImageOutcome:
    """Everything measured on one image."""

    original: _Original
    header: Dataset
    rows: list[records.MetricRow]
    points: list[records.RatePoint]
    recons: dict[str, np.ndarray]
    series: list[Path]
    jpeg_files: list[Path]
    coder_measures: tuple[coders.CoderMeasure, ...] = ()
    coder_failures: tuple[coders.CoderFailure, ...] = ()


def _evaluate_image(
    path: Path, engines: dict[str, Engine], tiers: list[Tier], config: EvaluationConfig, out: Path,
    coder_set: coders.CoderSet | None = None,
) -> _ImageOutcome:
    """Every codec on one image; raises LatentPacsError when the image cannot be measured."""
    ds = read_file(path)
    stored, module = stored_values(ds)
    canonical = stored_to_canonical(stored, module)
    original = _Original(str(path), canonical, resize_bilinear(canonical, metrics.PAPER_SIZE),
                         metrics.breast_mask(canonical), module)
    rows: list[records.MetricRow] = []
    recons: dict[str, np.ndarray] = {}
    series: list[Path] = []
    for label, engine in engines.items():
        (encoded,) = chain.encode([ds], engine, Tier("latent"))
        recons[label] = stored_to_canonical(chain.decode(encoded, engine), module)
        rows.append(_measure(original, label, "learned", recons[label], 8 * len(encoded.latent)))
    paper_codec, native_codec = jpeg_codec_names(config.jpeg_quality)
    # The paper's protocol: resize to 1024 x 1024, then JPEG; measured at 1024 x 1024.
    paper_stream = baselines.jpeg_paper_encode(canonical, config.jpeg_quality)
    paper_decoded = baselines.jpeg_decode(paper_stream)
    recons[paper_codec] = resize_bilinear(paper_decoded, canonical.shape)
    rows.append(_measure(original, paper_codec, "jpeg", recons[paper_codec], 8 * len(paper_stream),
                         paper_recon=paper_decoded))
    # Native: JPEG of the full matrix, the file a viewer shows.
    stream = baselines.jpeg_encode(canonical, config.jpeg_quality)
    recons[native_codec] = baselines.jpeg_decode(stream)
    rows.append(_measure(original, native_codec, "jpeg", recons[native_codec], 8 * len(stream)))
    jpeg_files: list[Path] = []
    if config.write_jpeg_series:
        jds = jpeg_dataset(ds, stream, config.jpeg_quality, original_stored_bytes(ds))
        target = out / native_codec / f"{jds.SOPInstanceUID}.dcm"
        jds.save_as(target, enforce_file_format=True)
        series.append(target)
        jpeg_file = out / paper_codec / f"{ds.SOPInstanceUID}.jpg"
        jpeg_file.write_bytes(paper_stream)
        jpeg_files.append(jpeg_file)
    primary = next(iter(engines))
    for tier in tiers:
        (encoded,) = chain.encode([ds], engines[primary], tier)
        recon = stored_to_canonical(chain.decode(encoded, None), module)
        rows.append(_measure(original, f"{primary}+{tier}", "tier", recon, 8 * encoded.archived_bytes))
    for codec in baselines.LOSSLESS_CODECS:
        rows.append(_exact(original, codec, baselines.lossless_size(codec, stored, module.bits_stored)))
    measured, failed = coders.measure_image(coder_set.coders, str(path), stored, module.bits_stored,
                                            int(original.mask.sum())) if coder_set else ([], [])
    return _ImageOutcome(original, dicom_common.header_of(ds), rows, _rate_points(original, stored, config), recons,
                         series, jpeg_files, tuple(measured), tuple(failed))


def _previews(index: int, original: _Original, recons: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Small float16 copies of the original, each reconstruction and each |difference|.

    Differences are taken at native resolution before shrinking, so the maps show the
    mean absolute error of each preview pixel's area.
    """
    shape = _preview_shape(original.canonical.shape)
    out = {f"{index}/original": resize_bilinear(original.canonical, shape).astype(np.float16)}
    for label, recon in recons.items():
        out[f"{index}/{label}"] = resize_bilinear(recon, shape).astype(np.float16)
        diff = np.abs(original.canonical - recon.astype(np.float32))
        out[f"{index}/{label}/diff"] = resize_bilinear(diff, shape).astype(np.float16)
    return out


def _write_maps(image: _ImageOutcome, out: Path, series_numbers: dict[str, int], max_side: int) -> list[Path]:
    """One Parametric Map per reconstruction of ``image`` (models and JPEG baselines), in one series.

    The series and its Frame of Reference are derived from the image's SOP Instance UID and
    the digest of its measured rows, so the same evaluation writes the same UIDs; each
    image of a study takes the next Series Number (``series_numbers``, per study). Every
    map is built before any is written.

    Raises
    ------
    InvalidUidError
        When the image's SOP Instance or Study Instance UID is not a valid UID.
    ValueError, TypeError
        When highdicom cannot build a valid object from the image's header.
    """
    header = image.header
    sop_uid = check_uid(header.get("SOPInstanceUID"), "SOP Instance UID (0008,0018)")
    study_uid = check_uid(header.get("StudyInstanceUID"), "Study Instance UID (0020,000D)")
    check_uid(header.get("SOPClassUID"), "SOP Class UID (0008,0016)")
    series_number = series_numbers.get(study_uid, dicom_maps.FIRST_SERIES_NUMBER)
    digest = dicom_common.content_digest(
        [r.codec, repr(r.mse), repr(r.ssim), r.bits, r.max_abs_error] for r in image.rows if r.codec in image.recons)
    series_uid = dicom_common.evaluation_uid("map-series", sop_uid, digest, max_side)
    frame_uid = dicom_common.evaluation_uid("map-frame-of-reference", sop_uid, digest, max_side)
    built = [
        (codec, dicom_maps.difference_map(
            header, image.original.canonical, recon, codec, series_uid=series_uid, series_number=series_number,
            frame_of_reference_uid=frame_uid, instance_number=number, max_side=max_side))
        for number, (codec, recon) in enumerate(image.recons.items(), start=1)
    ]
    series_numbers[study_uid] = series_number + 1
    folder = out / DICOM_DIR / "maps" / uid_file_name(sop_uid, "")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for codec, pm in built:
        target = folder / f"{_UNSAFE_NAME.sub('_', codec)}.dcm"
        pm.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def _write_reports(images: list[sr.EvaluatedImage], out: Path, versions: dict[str, str], progress: bool,
                   not_written: list[tuple[Path, str]]) -> list[Path]:
    """One Measurement Report per study under ``dicom/sr/`` (:func:`latentpacs.evaluate.sr.study_report`).

    A study whose report highdicom cannot build is logged and named in ``not_written``.
    """
    folder = out / DICOM_DIR / "sr"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    studies = sr.group_by_study(images)
    for index, (study_uid, mine) in enumerate(tqdm(studies.items(), desc="structured reports", unit="study",
                                                   disable=not progress or None), start=1):
        try:
            document = sr.study_report(mine, versions)
        except (ValueError, TypeError) as exc:
            logger.warning("no structured report for study %d of %d: %s", index, len(studies), exc)
            not_written.extend((Path(image.rows[0].image), f"structured report: {exc}") for image in mine)
            continue
        target = folder / uid_file_name(study_uid, ".dcm")
        document.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def _open_engines(config: EvaluationConfig) -> dict[str, Engine]:
    if not config.models:
        raise ConfigError("evaluate needs at least one --model")
    engines: dict[str, Engine] = {}
    try:
        for name in config.models:
            loaded = load_model(name, models_dir=config.models_dir)
            label = loaded.card.name if name == loaded.card.name else Path(name).stem
            if label in engines:
                raise ConfigError(f"model {name!r} is given twice")
            engines[label] = Engine(loaded, device=config.device)
    except BaseException:
        for engine in engines.values():
            engine.close()
        raise
    return engines


def evaluate(config: EvaluationConfig, progress: bool = True) -> EvaluationResult:
    """Measure every codec on ``config.images`` and write the CSV, JSON, figures and report.

    Raises
    ------
    ConfigError
        When there are no images or no models, or a tier or JPEG quality is invalid.
    LatentPacsError
        When a model cannot be loaded. An unreadable image is skipped and named in the
        result instead.
    """
    if not config.images:
        raise ConfigError("evaluate found no images to measure")
    if not 1 <= config.jpeg_quality <= 100:
        raise ConfigError(f"JPEG quality must be 1 to 100, got {config.jpeg_quality}")
    if config.previews < 1:
        raise ConfigError(f"previews must be at least 1, got {config.previews}")
    tiers = [Tier.parse(t) for t in config.tiers]
    paper_codec, native_codec = jpeg_codec_names(config.jpeg_quality)
    out = Path(config.out)
    for folder in (paper_codec, native_codec):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows: list[records.MetricRow] = []
    points: list[records.RatePoint] = []
    previews: dict[str, np.ndarray] = {}
    series: list[Path] = []
    jpeg_files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    evaluated: list[sr.EvaluatedImage] = []
    maps: list[Path] = []
    map_series: dict[str, int] = {}  # Series Number of the next map series, per study
    not_written: list[tuple[Path, str]] = []  # measured, but no DICOM objects could be made
    coder_set = coders.default_coders() if config.coders else None
    coder_measures: list[coders.CoderMeasure] = []
    coder_failures: list[coders.CoderFailure] = []
    engines = _open_engines(config)
    try:
        for path in tqdm(config.images, desc="evaluate", unit="img", disable=not progress or None):
            try:
                image = _evaluate_image(Path(path), engines, tiers, config, out, coder_set)
            except LatentPacsError as exc:
                logger.warning("skipping %s: %s", path, exc.message)
                skipped.append((Path(path), exc.message))
                continue
            rows += image.rows
            points += image.points
            coder_measures += image.coder_measures
            coder_failures += image.coder_failures
            series += image.series
            jpeg_files += image.jpeg_files
            if config.write_dicom:
                try:
                    maps += _write_maps(image, out, map_series, config.map_max_side)
                    evaluated.append(sr.EvaluatedImage(image.header, tuple(image.rows)))
                except _DICOM_ERRORS as exc:
                    logger.warning("no DICOM objects for %s: %s", path, exc)
                    not_written.append((Path(path), str(exc)))
            index = len({r.image for r in rows}) - 1
            if index < config.previews:
                previews.update(_previews(index, image.original, image.recons))
    finally:
        for engine in engines.values():
            engine.close()
    if not rows:
        raise ConfigError(f"none of the {len(config.images)} input(s) could be measured")
    primary = next(iter(engines))
    versions = {label: e.loaded.card.sha256 for label, e in engines.items()}
    versions.update({f"{primary}+{tier}": engines[primary].loaded.card.sha256 for tier in tiers})
    reports = _write_reports(evaluated, out, versions, progress, not_written) if config.write_dicom else []
    records.write_metrics(out / records.METRICS_CSV, rows)
    records.write_rate_points(out / records.RATE_DISTORTION_CSV, points)
    # numpy's stub also checks **kwds against its allow_pickle: bool keyword
    np.savez_compressed(out / records.PREVIEWS_NPZ, **previews)  # type: ignore[arg-type]
    summary = records.summarise(rows, points)
    summary["images"] = len({r.image for r in rows})
    summary["skipped"] = [{"path": str(p), "reason": why} for p, why in skipped]
    summary["models"] = {
        label: {"sha256": e.loaded.card.sha256, "arch": e.loaded.card.arch,
                "latent_bytes": e.loaded.card.latent_bytes, "description": e.loaded.card.description}
        for label, e in engines.items()
    }
    summary["config"] = json.loads(json.dumps(asdict(config), default=str))
    summary["codec_order"] = {"learned": list(engines), "jpeg": paper_codec, "jpeg_native": native_codec}
    summary["dicom"] = {"structured_reports": [str(p.relative_to(out)) for p in reports],
                        "difference_maps": [str(p.relative_to(out)) for p in maps],
                        "not_written": [{"path": str(p), "reason": why} for p, why in not_written]}
    if coder_set is not None:
        summary["coders"] = coders.summarise(coder_measures, coder_failures, coder_set.unavailable)
    records.write_summary(out / records.SUMMARY_JSON, summary)
    figures = plots.write_figures(out)
    page = report.write_report(out)
    logger.info("evaluated %d image(s) into %s", summary["images"], out)
    return EvaluationResult(out, tuple(rows), summary, tuple(figures), page, tuple(series), tuple(jpeg_files),
                            tuple(skipped), tuple(reports), tuple(maps), tuple(coder_failures))
