"""The two chains an image travels, one function each way, and the engine pool.

``encode``: data set -> pixel cells -> canonical image -> latent (engine) and stream
(coder, verified) -> :class:`~latentpacs.image.record.ImageRecord` with its overrides.

``returned``: record -> pixel cells (stream, checksum-checked; or latent, integer
decoder) -> derived or original data set -> :func:`for_peer`, the transfer syntax the
peer takes.

The node (through :mod:`latentpacs.service`), the ``.lpz`` files, ``latentpacs demo`` and
the evaluator all call these, so a file and a C-GET of one image give the same pixels
and the same identity. Nothing here imports SQL, networking or (at import time) torch:
engines are only called, and the pool loads them on first use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Sequence
from pathlib import Path
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from latentpacs.codec.streams import DEFAULT_CODER, StreamCoder, get_coder
from latentpacs.codec.tiers import RECEIVED, Tier
from latentpacs.dicomjson import dataset_from_json, header_json
from latentpacs.errors import (
    InvalidDicomError,
    LatentFormatError,
    PixelChecksumError,
    UnsupportedImageError,
)
from latentpacs.image.derive import Derivation, assemble, assemble_encapsulated, returned_overrides
from latentpacs.image.pixels import (
    PixelModule,
    arrival_lossy_method,
    canonical_to_stored,
    cells_sha256,
    checked_native,
    lossy_on_arrival,
    mask_to_stored,
    original_stored_bytes,
    pixel_cells,
    stored_to_canonical,
)
from latentpacs.image.record import ImageRecord, ModelRef
from latentpacs.uid import check_uid

if TYPE_CHECKING:
    from latentpacs.codec.cards import ModelCard
    from latentpacs.codec.engine import Engine

logger = logging.getLogger(__name__)

#: Transfer syntaxes a returned object can be sent in without coding (PS3.5 A.1, A.2).
NATIVE_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
#: Compressed transfer syntaxes the node codes on the fly, losslessly (PS3.5 A.4).
LOSSLESS_ENCODINGS = (JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, RLELossless)


def _pool(engines: EnginePool | Engine) -> EnginePool:
    return engines if isinstance(engines, EnginePool) else EnginePool(engines)


def check_identity(ds: Dataset) -> None:
    """Validate every UID an image is filed and named under (PS3.5 9.1).

    SOP Instance, Series Instance, Study Instance and SOP Class UID must be digits and
    dots of at most 64 characters before they name a row or a file.

    Raises
    ------
    InvalidUidError
        Naming the attribute and what is wrong with it.
    """
    for keyword, name in (
        ("SOPInstanceUID", "SOP Instance UID (0008,0018)"),
        ("SeriesInstanceUID", "Series Instance UID (0020,000E)"),
        ("StudyInstanceUID", "Study Instance UID (0020,000D)"),
        ("SOPClassUID", "SOP Class UID (0008,0016)"),
    ):
        try:
            value = ds.get(keyword, "")
        except Exception as exc:
            raise InvalidDicomError(f"{name} cannot be read: {exc}") from exc
        check_uid(value, name)


def encode(
    datasets: Sequence[Dataset], engines: EnginePool | Engine, tier: Tier,
    coder: str = DEFAULT_CODER,
) -> list[ImageRecord]:
    """Encode data sets at ``tier`` into image records, sharing one engine batch.

    ``engines`` is the pool whose primary model new images name (or that model's engine).

    Each image's pixel data is decoded exactly once. The ``latent`` tier runs the
    engine; the stream tiers do not (nothing ever reads the latent of an image whose
    stream is returned) and keep an empty latent. The stream codes the pixel cells
    themselves, never a difference from network output: for ``lossless`` every bit as
    sent (at Bits Allocated precision when bits above High Bit are set), for
    ``near-lossless:K`` the stored values within K. Each stream is decoded once here and
    checked (exact: its SHA-256 equals the original's; bounded: every value within K)
    before a record exists, and the checksum of what it decodes to is kept. The overrides
    a retrieval applies (derived identity, lossy attributes) are computed here, once.

    Raises
    ------
    LatentPacsError
        When an image cannot be archived (the subclass names what is wrong).
    """
    stream_coder = get_coder(coder)
    for ds in datasets:
        check_identity(ds)
    decoded = [pixel_cells(ds) for ds in datasets]
    values = [mask_to_stored(cells, module) for cells, module in decoded]
    if tier.has_stream:
        latents = [b""] * len(datasets)
    else:
        images = [stored_to_canonical(stored, module) for stored, (_, module) in zip(values, decoded)]
        latents = _pool(engines).primary.encode(images)
    model = _pool(engines).primary_ref
    records = []
    for ds, (cells, module), stored, latent in zip(datasets, decoded, values, latents):
        pixel_sha256 = cells_sha256(cells, module)
        stream, returned_sha256 = b"", ""
        if tier.has_stream:
            stream, returned_sha256 = _coded_stream(
                stream_coder, cells, stored, module, tier, pixel_sha256)
        records.append(_record(
            ds, module, model, tier, latent, stream,
            stream_coder=stream_coder.name if stream else "",
            stream_coder_version=stream_coder.version if stream else 0,
            pixel_sha256=pixel_sha256, returned_sha256=returned_sha256,
        ))
    return records


def defers(ds: Dataset, tier: Tier) -> bool:
    """Whether an image may be archived as received and coded later (:mod:`latentpacs.deferred`).

    Only at ``lossless``, whose returned object (the original) does not depend on the
    stream, and only for native Pixel Data (PS3.5 A.1, A.2), which is fully checked by
    reading it; an encapsulated image is decoded in line, so an undecodable one is
    refused before it is acknowledged.
    """
    if tier.lossy or not tier.has_stream:
        return False
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return syntax is not None and not UID(syntax).is_compressed


def received(ds: Dataset, raw: bytes, engines: EnginePool, tier: Tier) -> ImageRecord:
    """The record of an image archived as received: its stream is ``raw``, coded later.

    ``raw`` is the PS3.10 file the node received (what :func:`decode` reads back for a
    :data:`~latentpacs.codec.tiers.RECEIVED` stream). The pixels are read once here,
    so a malformed image is refused now, not after the acknowledgement; the pixel
    checksum is taken by the background coder, which codes the tier's stream from
    ``raw``, verifies it and only then replaces ``raw`` (PS3.4 B.2.3: Success once the
    object as received is durable).

    Raises
    ------
    LatentPacsError
        When the image cannot be archived (the subclass names what is wrong).
    """
    check_identity(ds)
    module = checked_native(ds)
    if module is None:
        raise UnsupportedImageError("only native Pixel Data is archived as received")
    return _record(ds, module, engines.primary_ref, tier, b"", raw, stream_coder=RECEIVED,
                   stream_coder_version=1)


def _record(ds: Dataset, module: PixelModule, model: ModelRef, tier: Tier, latent: bytes,
            stream: bytes, **fields: Any) -> ImageRecord:
    """The record of one image, with the overrides a retrieval applies (computed once)."""
    header = header_json(ds)
    original_bytes = original_stored_bytes(ds)
    uncompressed = module.rows * module.columns * module.bits_allocated // 8
    derivation = Derivation(
        model.name, model.sha256, tier, original_bytes / max(len(latent) + len(stream), 1),
        arrival_method=arrival_lossy_method(ds),
        arrival_ratio=uncompressed / max(original_bytes, 1),
        lossy_predecessor=lossy_on_arrival(ds),
    )
    if tier.lossy or derivation.lossy_predecessor:
        # From the header as archived: a malformed optional element there is raw bytes.
        overrides = returned_overrides(dataset_from_json(header), derivation).to_json_dict()
    else:
        overrides = {}  # the original, as it arrived: nothing is returned differently
    return ImageRecord(
        tier=tier, model_sha256=model.sha256, module=module,
        original_transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        original_stored_bytes=original_bytes, header=header,
        overrides=overrides, latent=latent, stream=stream,
        lossy_on_arrival=derivation.lossy_predecessor, model=model, **fields,
    )


def lossless_stream(coder: StreamCoder, cells: np.ndarray, module: PixelModule,
                    pixel_sha256: str) -> bytes:
    """``cells`` coded exactly by ``coder``, its decode checked against ``pixel_sha256``.

    At Bits Stored, or at Bits Allocated when bits above High Bit are set: they are part
    of the original Pixel Data (PS3.5 8.1.1) and a ``lossless`` retrieval returns them.
    Used at store time and by recompression (:mod:`latentpacs.recompress`).

    Raises
    ------
    PixelChecksumError
        When the stream does not decode to the original pixels.
    """
    exact = not cells.size or int(cells.max()) <= module.max_value
    stream = coder.encode(cells, module.bits_stored if exact else module.bits_allocated, 0)
    back = coder.decode(stream)
    if back.shape != module.shape or cells_sha256(back, module) != pixel_sha256:
        raise PixelChecksumError(
            f"the {coder.name} lossless stream does not decode to the original pixels"
        )
    return stream


def _coded_stream(coder: StreamCoder, cells: np.ndarray, stored: np.ndarray,
                  module: PixelModule, tier: Tier, pixel_sha256: str) -> tuple[bytes, str]:
    """The tier's stream and the SHA-256 of what it decodes to, verified once."""
    if tier.near == 0:
        try:
            return lossless_stream(coder, cells, module, pixel_sha256), pixel_sha256
        except PixelChecksumError as exc:
            raise PixelChecksumError(f"{exc}; nothing stored") from exc
    stream = coder.encode(stored, module.bits_stored, tier.near)
    back = coder.decode(stream)
    if back.shape != module.shape or int(
        np.abs(back.astype(np.int32) - stored.astype(np.int32)).max()
    ) > tier.near:
        raise PixelChecksumError(
            f"the near-lossless stream exceeds its bound {tier.near}; nothing stored"
        )
    return stream, cells_sha256(back, module)


def decode(record: ImageRecord, engine: Engine | None) -> np.ndarray:
    """The pixel cells a retrieval returns, uint16 (rows, cols).

    The stream tiers decode their stream with the coder it names and need no model; what
    it decodes to is checked against the archived SHA-256 (when the record has one), so a
    damaged stream can never be returned as the original. The ``latent`` tier decodes with
    ``engine``, whose model must be the one the record names (checked by SHA-256).

    Raises
    ------
    PixelChecksumError
        When the stream decodes to other pixels than were archived.
    LatentFormatError
        When the stream's geometry is wrong or the engine's model is not the record's.
    """
    module = record.module
    if record.stream_coder == RECEIVED:
        return _received_cells(record)
    if record.tier.has_stream:
        coder = get_coder(record.stream_coder or DEFAULT_CODER)
        stored = coder.decode(record.stream)
        if stored.shape != (module.rows, module.columns):
            raise LatentFormatError(
                f"stream is {stored.shape[0]}x{stored.shape[1]}, "
                f"geometry says {module.rows}x{module.columns}"
            )
        if record.returned_sha256 and cells_sha256(stored, module) != record.returned_sha256:
            raise PixelChecksumError("pixel checksum mismatch: the archived stream is damaged")
        return stored
    if engine is None or engine.loaded.card.sha256 != record.model_sha256:
        raise LatentFormatError(
            f"latent was made by model sha256 {record.model_sha256[:16]}; decode it with that model"
        )
    (canonical,) = engine.decode([record.latent], [(module.rows, module.columns)])
    return canonical_to_stored(canonical, module)


def _received_cells(record: ImageRecord) -> np.ndarray:
    """The pixel cells of a stream that is the object as received (its coding pending).

    The archive checked the bytes against their SHA-256 when it read them.
    """
    try:
        ds = dcmread(BytesIO(record.stream))
    except Exception as exc:
        raise LatentFormatError(f"the object as received cannot be read: {exc}") from exc
    cells, module = pixel_cells(ds)
    if module.shape != record.module.shape:
        raise LatentFormatError(
            f"the object as received is {module.rows}x{module.columns}, "
            f"geometry says {record.module.rows}x{record.module.columns}")
    return cells


def returned(record: ImageRecord, engine: Engine | None,
             accepted: Collection[str] = ()) -> Dataset:
    """The DICOM object a retrieval sends, in a transfer syntax of ``accepted``.

    Derived for the lossy tiers, the original for ``lossless`` (the archived overrides
    decide). ``accepted`` holds the Transfer Syntax UIDs the peer accepted for the
    record's SOP Class (PS3.8 9.3.2.2); empty means "uncompressed". A stream the peer
    takes as it is (its coder's transfer syntax, precision equal to Bits Stored) goes out
    encapsulated with no decode: its hash was checked when it was read, and it was proven
    to decode to ``returned_sha256`` before it was archived. Anything else is decoded and
    handed to :func:`for_peer`.
    """
    header, overrides = record.dataset_header(), record.dataset_overrides()
    if record.tier.has_stream and record.stream_coder != RECEIVED:
        coder = get_coder(record.stream_coder or DEFAULT_CODER)
        sends_as = coder.sends_as
        syntax = None if sends_as is None else sends_as[0 if record.tier.near == 0 else 1]
        if (syntax in accepted and record.stream
                and coder.precision(record.stream) == record.module.bits_stored):
            return assemble_encapsulated(header, overrides, record.stream, record.module,
                                         str(syntax))
    cells = decode(record, engine)
    if accepted and not NATIVE_SYNTAXES.intersection(accepted):
        if int(cells.max(initial=0)) > record.module.max_value:
            raise UnsupportedImageError(
                "pixels carry bits above High Bit: they go out native only, "
                "and the peer accepted no native transfer syntax"
            )
        for syntax in (JPEGLSLossless, JPEGLSNearLossless):  # NEAR=0 is valid under both
            if syntax in accepted:
                # Coded here with the GIL released, not through pydicom's plugin.
                stream = get_coder(DEFAULT_CODER).encode(cells, record.module.bits_stored, 0)
                return assemble_encapsulated(header, overrides, stream, record.module, str(syntax))
    ds = assemble(header, overrides, cells, record.module)
    return for_peer(ds, accepted)


def for_peer(ds: Dataset, accepted: Collection[str]) -> Dataset:
    """``ds`` (native pixels) in a transfer syntax the peer accepted for its class.

    The one owner of the sending transfer syntax (PS3.5 Section 10): native when the
    peer accepted a native syntax or said nothing; else the pixels coded losslessly in
    the first accepted syntax latentpacs can code (JPEG-LS, JPEG 2000 lossless, RLE;
    JPEG-LS NEAR=0 is valid under the Near-Lossless syntax).

    Raises
    ------
    UnsupportedImageError
        When the peer accepted only transfer syntaxes latentpacs cannot code.
    """
    if not accepted or NATIVE_SYNTAXES.intersection(accepted):
        return ds
    for syntax in LOSSLESS_ENCODINGS:
        if syntax in accepted:
            if syntax == JPEGLSNearLossless:
                ds.compress(syntax, generate_instance_uid=False, jls_error=0)
            else:
                ds.compress(syntax, generate_instance_uid=False)
            return ds
    raise UnsupportedImageError(
        f"the peer accepted only {', '.join(sorted(accepted))} for this class; "
        "latentpacs sends native, JPEG-LS, JPEG 2000 lossless or RLE"
    )


class EnginePool:
    """One engine per model, loaded on first use and verified by SHA-256.

    The node encodes with one model but must decode every latent the archive holds,
    whichever model made it; ``latentpacs decode`` likewise decodes ``.lpz`` files of any
    model. Every engine runs batches of at most ``max_batch`` (``codec.max_batch``).

    The primary model (the one new images name) is an :class:`Engine`, or just its
    hash-checked card and weights path: a node that archives streams names the model in
    every record but never runs it, so its engine (and torch) is loaded only when a
    latent must be encoded or decoded.

    Parameters
    ----------
    primary:
        The engine new images are encoded with, or None.
    primary_model:
        Instead of ``primary``: (weights path, card) of the model new images name, its
        engine loaded on first use (:func:`latentpacs.codec.cards.verified_card`).
    models_dir:
        Where models are looked up by hash; None: the shipped models and their retired ones.
    device:
        The torch device for engines loaded later; None: CUDA when available.
    max_batch:
        Largest batch of every engine the pool loads.
    """

    def __init__(self, primary: Engine | None = None, *, primary_model: tuple[Path, ModelCard] | None = None,
                 models_dir: Path | None = None, device: str | None = None, max_batch: int = 8) -> None:
        self._primary = primary
        self._primary_model = primary_model
        self._models_dir = models_dir
        self._device = device
        self._max_batch = max_batch
        self._engines: dict[str, Engine] = {}
        if primary is not None:
            self._engines[primary.loaded.card.sha256] = primary
        self._lock = threading.Lock()

    @property
    def primary_card(self) -> ModelCard:
        """The card of the model new images name (no engine is loaded for it).

        Raises
        ------
        LatentFormatError
            When the pool was made for decoding only.
        """
        if self._primary is not None:
            return self._primary.loaded.card
        if self._primary_model is None:
            raise LatentFormatError("this engine pool has no model to encode with")
        return self._primary_model[1]

    @property
    def primary_ref(self) -> ModelRef:
        """The identity of the model new images name."""
        card = self.primary_card
        return ModelRef(card.name, card.sha256, card.arch, card.latent_dim, card.latent_bits)

    @property
    def primary(self) -> Engine:
        """The engine new images are encoded with (loaded now when it was deferred).

        Raises
        ------
        LatentFormatError
            When the pool was made for decoding only.
        ModelError
            When the deferred model cannot be loaded.
        """
        if self._primary is None:
            card = self.primary_card
            path = self._primary_model[0] if self._primary_model is not None else None
            with self._lock:
                if self._primary is None:
                    self._primary = self._engines.get(card.sha256) or self._load(
                        card.sha256, path)
                    self._engines[card.sha256] = self._primary
        return self._primary

    @property
    def loaded(self) -> list[str]:
        """SHA-256 of the models whose engines are loaded."""
        with self._lock:
            return sorted(self._engines)

    def _load(self, sha256: str, path: Path | None = None) -> Engine:
        from latentpacs.codec.engine import Engine
        from latentpacs.codec.modelfile import find_model_by_sha256, load_model

        path = path or find_model_by_sha256(sha256, self._models_dir)
        loaded = load_model(path, expected_sha256=sha256)
        return Engine(loaded, device=self._device, max_batch=self._max_batch)

    def for_sha256(self, sha256: str) -> Engine:
        """The engine of the model with this weights hash (loaded and hash-checked once)."""
        if self._primary is None and self._primary_model is not None \
                and self._primary_model[1].sha256 == sha256:
            return self.primary
        with self._lock:
            if sha256 not in self._engines:
                self._engines[sha256] = self._load(sha256)
            return self._engines[sha256]

    def for_record(self, record: ImageRecord) -> Engine | None:
        """The engine a record's decode needs: None for the stream tiers."""
        return None if record.tier.has_stream else self.for_sha256(record.model_sha256)

    def close(self) -> None:
        """Stop every engine's worker."""
        with self._lock:
            for engine in self._engines.values():
                engine.close()
            self._engines.clear()

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
