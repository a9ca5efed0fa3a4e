"""The ``.lpz`` container: one archived image as a self-describing file.

The offline twin of the archive: what the node keeps in SQL for one instance, in one file.

Layout (all integers big-endian)::

    magic      8 bytes   89 4C 50 5A 0D 0A 1A 0A   ("\\x89LPZ\\r\\n\\x1a\\n")
    version    u16       FORMAT_VERSION
    reserved   u16       0
    meta       u32 length + UTF-8 JSON: tier, model (name, SHA-256, arch, latent
                         dimension and bits), geometry (Image Pixel module, PS3.3
                         C.7.6.3), original transfer syntax and stored size, and the
                         original header without Pixel Data as DICOM JSON (PS3.18 F.2)
    latent     u32 length + latent bytes (the codec's quantised latent)
    residual   u32 length + JPEG-LS stream (empty for the ``latent`` tier)
    crc32      u32       CRC-32 of every preceding byte

Encoding decodes the pixel data once, runs the engine, and codes the JPEG-LS stream when
the tier asks for it; decoding rebuilds a DICOM object with :mod:`latentpacs.derive`.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from latentpacs import __version__
from latentpacs.codec.engine import Engine
from latentpacs.codec.residual import decode_residual, encode_residual
from latentpacs.codec.tiers import Tier
from latentpacs.derive import Derivation, build_returned
from latentpacs.errors import LatentFormatError, LatentPacsError
from latentpacs.pixels import (
    PixelModule,
    canonical_to_stored,
    original_stored_bytes,
    read_file,
    stored_to_canonical,
    stored_values,
)

logger = logging.getLogger(__name__)

MAGIC = b"\x89LPZ\r\n\x1a\n"
FORMAT_VERSION = 1
SUFFIX = ".lpz"
_PREFIX = struct.Struct(">8sHH")
_LENGTH = struct.Struct(">I")


@dataclass(frozen=True)
class ModelRef:
    """The model a latent was made with; ``sha256`` is its identity."""

    name: str
    sha256: str
    arch: str
    latent_dim: int
    latent_bits: int


@dataclass(frozen=True)
class LpzFile:
    """One archived image.

    Parameters
    ----------
    tier:
        The fidelity tier it was archived at.
    model:
        The model that made ``latent``.
    module:
        The original Image Pixel module (PS3.3 C.7.6.3).
    original_transfer_syntax:
        The Transfer Syntax UID the image arrived in.
    original_stored_bytes:
        Size of the Pixel Data as it arrived (the numerator of the compression ratio).
    header:
        The original data set without Pixel Data, as a DICOM JSON object (PS3.18 F.2).
    latent:
        The quantised latent bytes.
    residual:
        The JPEG-LS stream of the stored values (``b""`` for the latent tier).
    """

    tier: Tier
    model: ModelRef
    module: PixelModule
    original_transfer_syntax: str
    original_stored_bytes: int
    header: dict[str, object]
    latent: bytes
    residual: bytes

    @property
    def archived_bytes(self) -> int:
        """Bytes that carry the image: latent plus residual."""
        return len(self.latent) + len(self.residual)

    @property
    def ratio(self) -> float:
        """Original stored bytes over archived bytes (Lossy Image Compression Ratio)."""
        return self.original_stored_bytes / max(self.archived_bytes, 1)

    def dataset_header(self) -> Dataset:
        """The archived header as a pydicom Dataset (PS3.18 F.2 DICOM JSON)."""
        return Dataset.from_json(self.header)

    def meta(self) -> dict[str, object]:
        """The container's JSON metadata block."""
        module = self.module
        return {
            "tier": str(self.tier),
            "model": {
                "name": self.model.name,
                "sha256": self.model.sha256,
                "arch": self.model.arch,
                "latent_dim": self.model.latent_dim,
                "latent_bits": self.model.latent_bits,
            },
            "geometry": {
                "rows": module.rows,
                "columns": module.columns,
                "bits_allocated": module.bits_allocated,
                "bits_stored": module.bits_stored,
                "high_bit": module.high_bit,
                "photometric_interpretation": module.photometric_interpretation,
            },
            "original": {
                "transfer_syntax_uid": self.original_transfer_syntax,
                "stored_bytes": self.original_stored_bytes,
            },
            "created_by": f"latentpacs {__version__}",
            "header": self.header,
        }

    def to_bytes(self) -> bytes:
        """Serialise the container (layout in the module docstring)."""
        meta = json.dumps(self.meta(), separators=(",", ":"), sort_keys=True).encode()
        parts = [_PREFIX.pack(MAGIC, FORMAT_VERSION, 0)]
        for block in (meta, self.latent, self.residual):
            parts += [_LENGTH.pack(len(block)), block]
        body = b"".join(parts)
        return body + _LENGTH.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> LpzFile:
        """Parse a container.

        Raises
        ------
        LatentFormatError
            Wrong magic, unknown version, truncation or a CRC mismatch.
        """
        if len(data) < _PREFIX.size + 4 * _LENGTH.size or data[:8] != MAGIC:
            raise LatentFormatError("not an .lpz file (bad magic number)")
        _, version, _ = _PREFIX.unpack_from(data)
        if version != FORMAT_VERSION:
            raise LatentFormatError(f".lpz format version {version} is not supported")
        (crc,) = _LENGTH.unpack_from(data, len(data) - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise LatentFormatError(".lpz file is truncated or corrupt (CRC mismatch)")
        blocks = []
        offset = _PREFIX.size
        for _ in range(3):
            (length,) = _LENGTH.unpack_from(data, offset)
            offset += _LENGTH.size
            if offset + length > len(data) - 4:
                raise LatentFormatError(".lpz file is truncated (block runs past the end)")
            blocks.append(data[offset : offset + length])
            offset += length
        try:
            meta = json.loads(blocks[0])
            model = meta["model"]
            geometry = meta["geometry"]
            return cls(
                tier=Tier.parse(meta["tier"]),
                model=ModelRef(**model),
                module=PixelModule(**geometry),
                original_transfer_syntax=meta["original"]["transfer_syntax_uid"],
                original_stored_bytes=int(meta["original"]["stored_bytes"]),
                header=meta["header"],
                latent=blocks[1],
                residual=blocks[2],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise LatentFormatError(f".lpz metadata is malformed: {exc}") from exc

    def summary(self) -> dict[str, object]:
        """What ``latentpacs inspect`` shows: the metadata without the header body."""
        meta = self.meta()
        header = Dataset.from_json(self.header)
        meta["header"] = {
            "elements": len(self.header),
            "sop_class_uid": str(header.get("SOPClassUID", "")),
            "sop_instance_uid": str(header.get("SOPInstanceUID", "")),
        }
        meta["format_version"] = FORMAT_VERSION
        meta["latent_bytes"] = len(self.latent)
        meta["latent_bits"] = 8 * len(self.latent)
        meta["residual_bytes"] = len(self.residual)
        meta["archived_bytes"] = self.archived_bytes
        meta["compression_ratio"] = round(self.ratio, 3)
        return meta


def read_lpz(path: str | Path) -> LpzFile:
    """Read an ``.lpz`` file; a missing or malformed file raises :class:`LatentFormatError`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LatentFormatError(f"cannot read {path}: {exc.strerror}") from exc
    return LpzFile.from_bytes(data)


def header_json(ds: Dataset) -> dict[str, object]:
    """The data set without Pixel Data as a DICOM JSON object (PS3.18 F.2)."""
    header = Dataset()
    header.update(ds)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in header:
            del header[keyword]
    return header.to_json_dict()


def encode_datasets(
    datasets: Sequence[Dataset], engine: Engine, tier: Tier
) -> list[LpzFile]:
    """Encode data sets into containers, sharing one engine batch.

    Each image's pixel data is decoded exactly once.

    Raises
    ------
    LatentPacsError
        When any image cannot be archived; callers wanting per-image errors pass one.
    """
    decoded = [stored_values(ds) for ds in datasets]
    images = [stored_to_canonical(stored, module) for stored, module in decoded]
    latents = engine.encode(images)
    card = engine.loaded.card
    model = ModelRef(card.name, card.sha256, card.arch, card.latent_dim, card.latent_bits)
    out = []
    for ds, (stored, module), latent in zip(datasets, decoded, latents):
        residual = (
            encode_residual(stored, module.bits_stored, tier.near) if tier.has_residual else b""
        )
        out.append(
            LpzFile(
                tier=tier,
                model=model,
                module=module,
                original_transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                original_stored_bytes=original_stored_bytes(ds),
                header=header_json(ds),
                latent=latent,
                residual=residual,
            )
        )
    return out


def decode_stored(lpz: LpzFile, engine: Engine | None) -> np.ndarray:
    """The stored pixel values a retrieval returns, uint16 (rows, cols).

    ``lossless`` and ``near-lossless`` tiers read the JPEG-LS stream and need no model;
    the ``latent`` tier decodes the latent with ``engine``, whose model must be the one
    the container names (checked by SHA-256).
    """
    module = lpz.module
    if lpz.tier.has_residual:
        stored = decode_residual(lpz.residual)
        if stored.shape != (module.rows, module.columns):
            raise LatentFormatError(
                f"residual is {stored.shape[0]}x{stored.shape[1]}, "
                f"geometry says {module.rows}x{module.columns}"
            )
        return stored
    if engine is None or engine.loaded.card.sha256 != lpz.model.sha256:
        raise LatentFormatError(
            f"latent was made by model sha256 {lpz.model.sha256[:16]}; decode it with that model"
        )
    (image,) = engine.decode([lpz.latent], [(module.rows, module.columns)])
    return canonical_to_stored(image, module)


def decode_to_dataset(lpz: LpzFile, engine: Engine | None) -> Dataset:
    """Rebuild the DICOM object for ``lpz`` (derived for lossy tiers, original for lossless)."""
    stored = decode_stored(lpz, engine)
    derivation = Derivation(lpz.model.name, lpz.model.sha256, lpz.tier, lpz.ratio)
    return build_returned(lpz.dataset_header(), stored, lpz.module, derivation)


@dataclass(frozen=True)
class Outcome:
    """What happened to one input file of a batch: ``output`` or ``error`` is set."""

    source: Path
    output: Path | None = None
    error: str | None = None


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def encode_paths(
    paths: Iterable[Path],
    out_dir: Path,
    engine: Engine,
    tier: Tier,
    *,
    batch: int = 8,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Encode DICOM files into ``out_dir/<SOP Instance UID>.lpz``, batch by batch.

    A file that cannot be read or archived yields an :class:`Outcome` with a one-line
    ``error``; the rest of the batch is still processed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    for chunk in _chunks(list(paths), batch):
        readable: list[tuple[Path, Dataset]] = []
        for path in chunk:
            try:
                readable.append((path, read_file(path)))
            except LatentPacsError as exc:
                outcomes.append(_report(Outcome(path, error=exc.message), on_done))
        outcomes += _encode_chunk(readable, out_dir, engine, tier, on_done)
    return outcomes


def _encode_chunk(
    items: list[tuple[Path, Dataset]],
    out_dir: Path,
    engine: Engine,
    tier: Tier,
    on_done: Callable[[Outcome], None] | None,
) -> list[Outcome]:
    """Encode one chunk together; on failure, retry one by one so one bad file costs one."""
    if not items:
        return []
    try:
        encoded = encode_datasets([ds for _, ds in items], engine, tier)
    except LatentPacsError as exc:
        if len(items) == 1:
            return [_report(Outcome(items[0][0], error=exc.message), on_done)]
        return [o for item in items for o in _encode_chunk([item], out_dir, engine, tier, on_done)]
    outcomes = []
    for (path, ds), lpz in zip(items, encoded):
        target = out_dir / f"{ds.SOPInstanceUID}{SUFFIX}"
        target.write_bytes(lpz.to_bytes())
        outcomes.append(_report(Outcome(path, output=target), on_done))
    return outcomes


def _report(outcome: Outcome, on_done: Callable[[Outcome], None] | None) -> Outcome:
    if outcome.error:
        logger.info("%s: %s", outcome.source, outcome.error)
    if on_done is not None:
        on_done(outcome)
    return outcome


def decode_paths(
    paths: Iterable[Path],
    out_dir: Path,
    engine_for: Callable[[ModelRef], Engine],
    *,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Decode ``.lpz`` files into DICOM files ``out_dir/<returned SOP Instance UID>.dcm``.

    ``engine_for`` gives the engine for the model a container names (only called for the
    latent tier). A file that cannot be decoded yields an :class:`Outcome` with a
    one-line ``error``; the others are still written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for path in paths:
        try:
            lpz = read_lpz(path)
            engine = engine_for(lpz.model) if not lpz.tier.has_residual else None
            ds = decode_to_dataset(lpz, engine)
            target = out_dir / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(target, enforce_file_format=True)
        except LatentPacsError as exc:
            outcomes.append(_report(Outcome(path, error=exc.message), on_done))
            continue
        outcomes.append(_report(Outcome(path, output=target), on_done))
    return outcomes
