"""The ``.lpz`` container: one archived image as a self-describing file.

The offline twin of the archive: what the node keeps in SQL for one instance, in one file.

Layout (all integers big-endian)::

    magic      8 bytes   89 4C 50 5A 0D 0A 1A 0A   ("\\x89LPZ\\r\\n\\x1a\\n")
    version    u16       FORMAT_VERSION
    reserved   u16       0
    meta       u32 length + UTF-8 JSON: tier, model (name, SHA-256, arch, latent
                         dimension and bits), geometry (Image Pixel module, PS3.3
                         C.7.6.3), original transfer syntax and stored size, the
                         SHA-256 of the original pixel cells and of what the stream
                         decodes to (checked on decode), whether the original arrived
                         lossy, and the original header without Pixel Data as DICOM
                         JSON (PS3.18 F.2)
    latent     u32 length + latent bytes (the codec's quantised latent)
    stream   u32 length + JPEG-LS stream (empty for the ``latent`` tier)
    crc32      u32       CRC-32 of every preceding byte

The encode and decode chains are :mod:`latentpacs.service`'s, the same the node uses.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from latentpacs import __version__
from latentpacs.codec.streams import DEFAULT_CODER
from latentpacs.codec.tiers import Tier
from latentpacs.errors import LatentFormatError, LatentPacsError
from latentpacs.image import chain
from latentpacs.image.derive import Derivation, returned_overrides
from latentpacs.image.pixels import PixelModule, read_file
from latentpacs.image.record import ImageRecord, ModelRef
from latentpacs.uid import uid_file_name

if TYPE_CHECKING:
    from latentpacs.codec.engine import Engine

logger = logging.getLogger(__name__)

MAGIC = b"\x89LPZ\r\n\x1a\n"
FORMAT_VERSION = 1
SUFFIX = ".lpz"
_PREFIX = struct.Struct(">8sHH")
_LENGTH = struct.Struct(">I")


def to_bytes(image: ImageRecord) -> bytes:
    """Serialise an encoded image as an ``.lpz`` container (layout in the module docstring)."""
    meta = json.dumps(_meta(image), separators=(",", ":"), sort_keys=True).encode()
    parts = [_PREFIX.pack(MAGIC, FORMAT_VERSION, 0)]
    for block in (meta, image.latent, image.stream):
        parts += [_LENGTH.pack(len(block)), block]
    body = b"".join(parts)
    return body + _LENGTH.pack(zlib.crc32(body))


def _meta(image: ImageRecord) -> dict[str, Any]:
    module = image.module
    model = asdict(image.model) if image.model is not None else {"sha256": image.model_sha256}
    return {
        "tier": str(image.tier),
        "model": model,
        "geometry": asdict(module),
        "original": {
            "transfer_syntax_uid": image.original_transfer_syntax,
            "stored_bytes": image.original_stored_bytes,
            "pixel_sha256": image.pixel_sha256,
            "lossy_on_arrival": image.lossy_on_arrival,
        },
        "stream": {"coder": image.stream_coder, "version": image.stream_coder_version},
        "returned_sha256": image.returned_sha256,
        "created_by": f"latentpacs {__version__}",
        "header": image.header,
        "overrides": image.overrides,
    }


def from_bytes(data: bytes) -> ImageRecord:
    """Parse an ``.lpz`` container.

    Raises
    ------
    LatentFormatError
        Wrong magic, unknown version, truncation, a CRC mismatch or malformed metadata.
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
        tier = Tier.parse(meta["tier"])
        model = ModelRef(**meta["model"]) if len(meta["model"]) > 1 else None
        stream_meta = meta.get("stream") or {}
        record = ImageRecord(
            tier=tier,
            model_sha256=str(meta["model"]["sha256"]),
            module=PixelModule(**meta["geometry"]),
            original_transfer_syntax=meta["original"]["transfer_syntax_uid"],
            original_stored_bytes=int(meta["original"]["stored_bytes"]),
            header=meta["header"],
            overrides=meta.get("overrides", {}),
            latent=blocks[1],
            stream=blocks[2],
            stream_coder=str(stream_meta.get("coder", DEFAULT_CODER if blocks[2] else "")),
            stream_coder_version=int(stream_meta.get("version", 1 if blocks[2] else 0)),
            pixel_sha256=str(meta["original"].get("pixel_sha256", "")),
            returned_sha256=str(meta.get("returned_sha256", "")),
            lossy_on_arrival=bool(meta["original"].get("lossy_on_arrival", False)),
            model=model,
        )
        if "overrides" not in meta:  # written before the overrides were kept in the file
            record = _with_overrides(record)
        return record
    except (ValueError, KeyError, TypeError, LatentPacsError) as exc:
        raise LatentFormatError(f".lpz metadata is malformed: {exc}") from exc


def _with_overrides(record: ImageRecord) -> ImageRecord:
    """A record read from an older file, with the overrides its encode would have kept."""
    from dataclasses import replace

    name = record.model.name if record.model is not None else ""
    derivation = Derivation(name, record.model_sha256, record.tier, record.ratio,
                            lossy_predecessor=record.lossy_on_arrival)
    overrides = returned_overrides(record.dataset_header(), derivation)
    return replace(record, overrides=overrides.to_json_dict())


def summary(image: ImageRecord) -> dict[str, Any]:
    """What ``latentpacs inspect`` shows: the metadata, sizes, and the header's identity."""
    meta = _meta(image)
    header = image.dataset_header()
    meta["header"] = {
        "elements": len(image.header),
        "sop_class_uid": str(header.get("SOPClassUID", "")),
        "sop_instance_uid": str(header.get("SOPInstanceUID", "")),
    }
    meta["format_version"] = FORMAT_VERSION
    meta["latent_bytes"] = len(image.latent)
    meta["latent_bits"] = 8 * len(image.latent)
    meta["stream_bytes"] = len(image.stream)
    meta["archived_bytes"] = image.archived_bytes
    meta["compression_ratio"] = round(image.ratio, 3)
    return meta


def read_lpz(path: str | Path) -> ImageRecord:
    """Read an ``.lpz`` file; a missing or malformed file raises :class:`LatentFormatError`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LatentFormatError(f"cannot read {path}: {exc.strerror}") from exc
    return from_bytes(data)


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
    coder: str = DEFAULT_CODER,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Encode DICOM files into ``out_dir/<SOP Instance UID>.lpz``, batch by batch.

    ``coder`` names the stream coder of the ``lossless`` and ``near-lossless`` tiers.

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
        outcomes += _encode_chunk(readable, out_dir, engine, tier, coder, on_done)
    return outcomes


def _encode_chunk(
    items: list[tuple[Path, Dataset]],
    out_dir: Path,
    engine: Engine,
    tier: Tier,
    coder: str,
    on_done: Callable[[Outcome], None] | None,
) -> list[Outcome]:
    """Encode one chunk together; on failure, retry one by one so one bad file costs one."""
    if not items:
        return []
    try:
        encoded = chain.encode([ds for _, ds in items], engine, tier, coder)
    except LatentPacsError as exc:
        if len(items) == 1:
            return [_report(Outcome(items[0][0], error=exc.message), on_done)]
        return [o for item in items
                for o in _encode_chunk([item], out_dir, engine, tier, coder, on_done)]
    outcomes = []
    for (path, ds), image in zip(items, encoded):
        try:
            target = out_dir / uid_file_name(str(ds.SOPInstanceUID), SUFFIX)
        except LatentPacsError as exc:
            outcomes.append(_report(Outcome(path, error=exc.message), on_done))
            continue
        target.write_bytes(to_bytes(image))
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
    engine_for: Callable[[str], Engine],
    *,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Decode ``.lpz`` files into DICOM files ``out_dir/<returned SOP Instance UID>.dcm``.

    ``engine_for`` gives the engine for the model SHA-256 a container names (only called
    for the latent tier; :meth:`latentpacs.image.chain.EnginePool.for_sha256`). A file that cannot be decoded yields an :class:`Outcome` with a
    one-line ``error``; the others are still written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for path in paths:
        try:
            image = read_lpz(path)
            engine = None if image.tier.has_stream else engine_for(image.model_sha256)
            ds = chain.returned(image, engine)
            target = out_dir / uid_file_name(str(ds.SOPInstanceUID), ".dcm")
            ds.save_as(target, enforce_file_format=True)
        except LatentPacsError as exc:
            outcomes.append(_report(Outcome(path, error=exc.message), on_done))
            continue
        outcomes.append(_report(Outcome(path, output=target), on_done))
    return outcomes
