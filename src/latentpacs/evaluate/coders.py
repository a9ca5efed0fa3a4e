"""Lossless and near-lossless coders side by side: bits per pixel and time, every result verified.

The coders of the ``lossless`` and ``near-lossless:K`` tiers (DESIGN.md "Fidelity tiers")
against the classical lossless coders a PACS could archive instead:

* every stream coder of :data:`latentpacs.codec.streams.CODERS` (JPEG-LS via CharLS,
  ISO/IEC 14495-1, the interchange format of PS3.5 A.4.3; the learned coder) at each
  NEAR of :data:`NEARS`. A registered coder whose model is not installed
  (:class:`~latentpacs.errors.ModelError`) is listed as unavailable, with the reason;
* JPEG-XL lossless (ISO/IEC 18181, libjxl) at efforts 7 and 9, JPEG 2000 lossless
  (ISO/IEC 15444-1, OpenJPEG, reversible 5/3 wavelet; PS3.5 A.4.4) and HTJ2K lossless
  (ISO/IEC 15444-15, OpenJPH; PS3.5 A.4.11), all via imagecodecs, at NEAR = 0 only.

Bits are counted from the real codestream, ``8 * len(stream)``; encode and decode are
timed separately (wall clock, one call each). Every stream is decoded and compared with
the input before its size counts: a lossless result must be bit-exact, a near-lossless
one within NEAR of every value. A result that is not, or whose stream does not decode,
is a :class:`CoderFailure` of its row, never dropped: the table marks that row failed.

``summarise`` turns the per-image measures into the JSON the evaluator writes
(``summary.json`` key ``coders``) and :func:`markdown_table` / :func:`assess_targets`
into the benchmark's table (issue 13 targets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import imagecodecs
import numpy as np

from latentpacs.codec.streams import CODERS, StreamCoder
from latentpacs.errors import LatentPacsError, ModelError, PixelDataError

logger = logging.getLogger(__name__)

#: The NEAR values every stream coder is measured at (0: lossless).
NEARS = (0, 1, 2, 4)
#: JPEG-XL efforts measured (libjxl's default is 7; 9 is its slowest lossless setting).
JPEGXL_EFFORTS = (7, 9)
#: The coder every other row is compared with, at the same NEAR.
REFERENCE = "jpeg-ls"
#: Bits Allocated of the uncompressed images (PS3.3 C.8.11.3: 16 for digital mammography).
ALLOCATED_BITS = 16
#: The decode-time target of issue 13: a 2294 x 1914 image within 2 s.
DECODE_TARGET_PIXELS = 2294 * 1914
DECODE_TARGET_MS = 2000.0
#: Near-lossless target: at least this much below JPEG-LS at the same NEAR.
NEAR_TARGET_SAVING = 0.10
#: What a broken decoder raises on a corrupt stream (imagecodecs' errors are RuntimeErrors).
_CODEC_ERRORS = (LatentPacsError, ValueError, RuntimeError, IndexError)


class CoderVerificationError(PixelDataError):
    """A coder's stream did not decode to the input (lossless) or within NEAR of it."""


@dataclass(frozen=True)
class Coder:
    """One row of the comparison: a coder at one NEAR.

    ``encode(stored, bits)`` returns the codestream of uint16 values below ``2**bits``;
    ``decode(stream)`` its values. ``classical`` marks the coders a learned coder must beat.
    """

    name: str
    near: int
    encode: Callable[[np.ndarray, int], bytes]
    decode: Callable[[bytes], np.ndarray]
    classical: bool

    @property
    def label(self) -> str:
        """``name`` at ``NEAR=k``, as the table shows it."""
        return f"{self.name} NEAR={self.near}"


@dataclass(frozen=True)
class CoderMeasure:
    """One image coded by one coder row (verified)."""

    image: str
    coder: str
    near: int
    rows: int
    columns: int
    bits_stored: int
    nbytes: int
    bpp: float
    breast_bpp: float
    encode_ms: float
    decode_ms: float
    max_abs_error: int


@dataclass(frozen=True)
class CoderFailure:
    """One image a coder row failed on: its stream did not encode, decode or verify."""

    image: str
    coder: str
    near: int
    reason: str


@dataclass(frozen=True)
class CoderSet:
    """The rows to measure and the registered coders that cannot be measured here, with why."""

    coders: tuple[Coder, ...]
    unavailable: dict[str, str]


def _native(stored: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(stored, dtype=np.uint16)


def _stream_row(coder: StreamCoder, near: int) -> Coder:
    def encode(stored: np.ndarray, bits: int) -> bytes:
        return coder.encode(stored, bits, near)

    return Coder(coder.name, near, encode, coder.decode, classical=coder.name == REFERENCE)


def _jpegxl(effort: int, threads: int | None) -> Coder:
    def encode(stored: np.ndarray, bits: int) -> bytes:
        return bytes(imagecodecs.jpegxl_encode(_native(stored), lossless=True, effort=effort,
                                               bitspersample=bits, numthreads=threads))

    def decode(stream: bytes) -> np.ndarray:
        return np.asarray(imagecodecs.jpegxl_decode(stream, numthreads=threads))

    return Coder(f"jpeg-xl-e{effort}", 0, encode, decode, classical=True)


def _jpeg2000(threads: int | None) -> Coder:
    def encode(stored: np.ndarray, bits: int) -> bytes:
        return bytes(imagecodecs.jpeg2k_encode(_native(stored), level=0, reversible=True, bitspersample=bits,
                                               codecformat="J2K", numthreads=threads))

    def decode(stream: bytes) -> np.ndarray:
        return np.asarray(imagecodecs.jpeg2k_decode(stream, numthreads=threads))

    return Coder("jpeg2000", 0, encode, decode, classical=True)


def _htj2k() -> Coder:
    def encode(stored: np.ndarray, bits: int) -> bytes:
        return bytes(imagecodecs.htj2k_encode(_native(stored), reversible=True))

    def decode(stream: bytes) -> np.ndarray:
        return np.asarray(imagecodecs.htj2k_decode(stream))

    return Coder("htj2k", 0, encode, decode, classical=True)


def classical_coders(jpegxl_efforts: Sequence[int] = JPEGXL_EFFORTS, threads: int | None = None) -> list[Coder]:
    """JPEG-XL lossless at each effort, JPEG 2000 lossless and HTJ2K lossless (NEAR = 0).

    ``threads`` is passed to libjxl and OpenJPEG (None: their default).
    """
    return [*(_jpegxl(effort, threads) for effort in jpegxl_efforts), _jpeg2000(threads), _htj2k()]


def _unavailable(coder: StreamCoder) -> str | None:
    """Why ``coder`` cannot code here (its model is not installed), or None when it can."""
    try:
        coder.encode(np.zeros((8, 8), dtype=np.uint16), 12, 0)
    except ModelError as exc:
        return exc.message
    except _CODEC_ERRORS:
        return None  # measurable, but broken: each image's row reports the failure
    return None


def stream_coders(nears: Sequence[int] = NEARS) -> tuple[list[Coder], dict[str, str]]:
    """Every registered stream coder at each of ``nears`` (JPEG-LS first), and those unavailable."""
    rows: list[Coder] = []
    unavailable: dict[str, str] = {}
    for name in sorted(CODERS, key=lambda n: (n != REFERENCE, n)):
        coder = CODERS[name]
        why = _unavailable(coder)
        if why is not None:
            logger.info("stream coder %s is not measured: %s", name, why)
            unavailable[name] = why
            continue
        rows += [_stream_row(coder, near) for near in nears]
    return rows, unavailable


def default_coders(nears: Sequence[int] = NEARS, jpegxl_efforts: Sequence[int] = JPEGXL_EFFORTS,
                   threads: int | None = None) -> CoderSet:
    """The comparison's rows: the stream coders at ``nears``, then the classical lossless coders."""
    rows, unavailable = stream_coders(nears)
    return CoderSet(tuple(rows + classical_coders(jpegxl_efforts, threads)), unavailable)


def verify(coder: Coder, stored: np.ndarray, decoded: np.ndarray) -> int:
    """The largest |decoded - stored|, checked against the coder's NEAR.

    Raises
    ------
    CoderVerificationError
        When the shape differs, a lossless result is not bit-exact, or a value is more
        than NEAR away.
    """
    if decoded.shape != stored.shape:
        raise CoderVerificationError(f"{coder.label} decoded {decoded.shape}, not {stored.shape}")
    error = int(np.abs(decoded.astype(np.int64) - stored.astype(np.int64)).max(initial=0))
    if error > coder.near:
        what = "is not bit-exact" if coder.near == 0 else f"is not within NEAR={coder.near}"
        raise CoderVerificationError(f"{coder.label} {what}: a value is {error} away")
    return error


def measure(coder: Coder, image: str, stored: np.ndarray, bits: int, breast_pixels: int | None = None) -> CoderMeasure:
    """Code ``stored`` with ``coder``, decode it, verify it and time both directions.

    Parameters
    ----------
    coder:
        The row to measure.
    image:
        The image's name in the result.
    stored:
        Unsigned stored values (rows, cols) below ``2**bits`` (Bits Stored, PS3.3 C.7.6.3.1.1).
    bits:
        Bits Stored.
    breast_pixels:
        Pixels of the breast region (``breast_bpp`` is all bits over them); None: every pixel.

    Raises
    ------
    CoderVerificationError
        When the stream cannot be made or decoded, or decodes to other values (:func:`verify`).
    """
    started = time.perf_counter()
    try:
        stream = coder.encode(stored, bits)
    except _CODEC_ERRORS as exc:
        raise CoderVerificationError(f"{coder.label} did not encode: {exc}") from exc
    encoded = time.perf_counter()
    try:
        decoded = np.asarray(coder.decode(stream))
    except _CODEC_ERRORS as exc:
        raise CoderVerificationError(f"{coder.label} stream does not decode: {exc}") from exc
    decode_s = time.perf_counter() - encoded
    error = verify(coder, stored, decoded)
    rows, cols = stored.shape
    bits_total = 8 * len(stream)
    return CoderMeasure(image, coder.name, coder.near, rows, cols, bits, len(stream), bits_total / (rows * cols),
                        bits_total / max(1, breast_pixels if breast_pixels is not None else rows * cols),
                        1000.0 * (encoded - started), 1000.0 * decode_s, error)


def measure_image(coders: Sequence[Coder], image: str, stored: np.ndarray, bits: int,
                  breast_pixels: int | None = None) -> tuple[list[CoderMeasure], list[CoderFailure]]:
    """Every row of ``coders`` on one image; a row that fails is a :class:`CoderFailure`, logged."""
    measures: list[CoderMeasure] = []
    failures: list[CoderFailure] = []
    for coder in coders:
        try:
            measures.append(measure(coder, image, stored, bits, breast_pixels))
        except CoderVerificationError as exc:
            logger.error("coder %s failed verification: %s", coder.label, exc.message)
            failures.append(CoderFailure(image, coder.name, coder.near, exc.message))
    return measures, failures


def summarise(measures: Sequence[CoderMeasure], failures: Sequence[CoderFailure],
              unavailable: dict[str, str] | None = None) -> dict[str, Any]:
    """The comparison as JSON: one row per coder and NEAR (in measured order), failures, unavailable.

    Each row: ``images`` measured, ``failed`` images, ``mean_bpp``, ``ratio_allocated``
    (16 bits allocated over mean bpp), ``ratio_stored`` (mean Bits Stored over mean
    bpp), ``vs_reference_percent`` (mean bpp relative to JPEG-LS at the same NEAR, in
    percent; negative is smaller), ``mean_breast_bpp``, ``median_encode_ms``,
    ``median_decode_ms``, ``median_decode_ms_target_size`` (decode time scaled to a
    2294 x 1914 image; ``at_target_size`` when every image was that size) and
    ``max_abs_error``.
    """
    keys = list(dict.fromkeys([(m.coder, m.near) for m in measures] + [(f.coder, f.near) for f in failures]))
    rows: list[dict[str, Any]] = []
    for name, near in keys:
        mine = [m for m in measures if (m.coder, m.near) == (name, near)]
        failed = sum(1 for f in failures if (f.coder, f.near) == (name, near))
        row: dict[str, Any] = {"coder": name, "near": near, "images": len(mine), "failed": failed}
        if mine:
            bpp = float(np.mean([m.bpp for m in mine]))
            row.update({
                "mean_bpp": bpp,
                "ratio_allocated": ALLOCATED_BITS / bpp if bpp else None,
                "ratio_stored": float(np.mean([m.bits_stored for m in mine])) / bpp if bpp else None,
                "mean_breast_bpp": float(np.mean([m.breast_bpp for m in mine])),
                "median_encode_ms": float(np.median([m.encode_ms for m in mine])),
                "median_decode_ms": float(np.median([m.decode_ms for m in mine])),
                "median_decode_ms_target_size": float(np.median(
                    [m.decode_ms * DECODE_TARGET_PIXELS / (m.rows * m.columns) for m in mine])),
                "max_abs_error": max(m.max_abs_error for m in mine),
                "at_target_size": all(m.rows * m.columns == DECODE_TARGET_PIXELS for m in mine),
            })
        rows.append(row)
    reference = {r["near"]: r["mean_bpp"] for r in rows
                 if r["coder"] == REFERENCE and not r["failed"] and r.get("mean_bpp")}
    for row in rows:
        base = reference.get(row["near"])
        row["vs_reference_percent"] = (100.0 * (row["mean_bpp"] / base - 1.0)
                                       if base and "mean_bpp" in row and not row["failed"] else None)
    return {
        "reference": REFERENCE,
        "allocated_bits": ALLOCATED_BITS,
        "images": len({m.image for m in measures} | {f.image for f in failures}),
        "rows": rows,
        "failures": [asdict(f) for f in failures],
        "unavailable": dict(unavailable or {}),
    }


def assess_targets(summary: dict[str, Any]) -> dict[tuple[str, int], str]:
    """Issue 13's targets for each non-classical stream coder row: ``met``/``MISSED`` with the figure.

    Lossless: mean bpp strictly below the best classical lossless coder (goal: 5 % below
    JPEG-LS). Near-lossless: at least 10 % below JPEG-LS at the same NEAR. Decode: a
    2294 x 1914 image within 2 s (median decode time scaled to that size). A failed row
    is ``FAILED``; classical rows get no status.
    """
    rows = summary["rows"]
    classical = {REFERENCE, *(name for name in (r["coder"] for r in rows) if name not in CODERS)}
    best = min((r["mean_bpp"] for r in rows if r["near"] == 0 and r["coder"] in classical
                and not r["failed"] and "mean_bpp" in r), default=None)
    status: dict[tuple[str, int], str] = {}
    for row in rows:
        if row["coder"] in classical:
            continue
        key = (row["coder"], row["near"])
        if row["failed"] or "mean_bpp" not in row:
            status[key] = f"FAILED on {row['failed']} image(s)"
            continue
        parts = []
        vs = row["vs_reference_percent"]
        if row["near"] == 0:
            if best is not None:
                ok = row["mean_bpp"] < best
                parts.append(f"{'met' if ok else 'MISSED'}: below best classical ({best:.3f} bpp)")
            if vs is not None:
                parts.append(f"goal -5% vs JPEG-LS {'met' if vs <= -5.0 else 'not met'}")
        elif vs is not None:
            ok = vs <= -100.0 * NEAR_TARGET_SAVING
            parts.append(f"{'met' if ok else 'MISSED'}: <= -10% vs JPEG-LS")
        decode = row["median_decode_ms_target_size"]
        scaled = "" if row.get("at_target_size") else " (scaled by pixel count)"
        parts.append(f"decode {'met' if decode <= DECODE_TARGET_MS else 'MISSED'}: {decode / 1000:.2f} s "
                     f"per 2294x1914{scaled}")
        status[key] = "; ".join(parts)
    return status


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(summary: dict[str, Any], targets: bool = False) -> str:
    """The comparison as a Markdown table (with issue 13's target status when ``targets``)."""
    status = assess_targets(summary) if targets else {}
    head = ["coder", "NEAR", "mean bpp", "ratio (16-bit)", "vs JPEG-LS", "bpp in breast", "encode ms", "decode ms"]
    if targets:
        head.append("target")
    align = ["---", *["---:"] * 7, *(["---"] if targets else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for row in summary["rows"]:
        vs = row.get("vs_reference_percent")
        cells = [row["coder"], str(row["near"])]
        if "mean_bpp" in row:
            cells += [_fmt(row["mean_bpp"], ".3f"), _fmt(row["ratio_allocated"], ".2f") + ":1",
                      "–" if vs is None else f"{vs:+.1f}%", _fmt(row["mean_breast_bpp"], ".3f"),
                      _fmt(row["median_encode_ms"], ".0f"), _fmt(row["median_decode_ms"], ".0f")]
        else:
            cells += ["FAILED"] + ["–"] * 5
        if row["failed"] and "mean_bpp" in row:
            cells[2] += f" (FAILED on {row['failed']})"
        if targets:
            cells.append(status.get((row["coder"], row["near"]), ""))
        lines.append("| " + " | ".join(cells) + " |")
    for name, why in summary.get("unavailable", {}).items():
        lines.append(f"\n{name}: not measured ({why})")
    return "\n".join(lines)
