"""Where the layers meet: image in -> pixels -> codec -> record; record -> codec -> derive -> image out.

The encode and decode chains here are shared by the ``.lpz`` files (:mod:`latentpacs.image.lpz`)
and the node's archive (:class:`Service`), so a file and a C-GET of the same image give
the same pixels and the same derived identity.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from latentpacs.archive import Archive, ArchivedImage, DuplicatePolicy, StoreResult
from latentpacs.archive.records import AS_RECEIVED_VR, dataset_from_json
from latentpacs.codec.engine import Engine
from latentpacs.codec.modelfile import find_model_by_sha256, load_model
from latentpacs.codec.jpegls import decode_stream, encode_stream, stream_precision
from latentpacs.codec.tiers import Tier
from latentpacs.config import Config
from latentpacs.image.derive import (
    Derivation,
    assemble,
    assemble_encapsulated,
    build_returned,
    returned_overrides,
)
from latentpacs.errors import (
    InvalidDicomError,
    LatentFormatError,
    LatentPacsError,
    LimitExceededError,
    PixelChecksumError,
    UnsupportedImageError,
)
from latentpacs.image.pixels import (
    PixelModule,
    arrival_lossy_method,
    canonical_to_stored,
    cells_sha256,
    lossy_on_arrival,
    mask_to_stored,
    original_stored_bytes,
    pixel_cells,
    read_file,
    stored_to_canonical,
)
from latentpacs.uid import check_uid

logger = logging.getLogger(__name__)

#: Instances a retrieval decodes ahead of the one being sent (each one is held in memory).
PREFETCH_DEPTH = 1
#: What a retrieval iterates: an archive row id, loaded when its turn comes, or an image.
_Match = int | ArchivedImage


@dataclass(frozen=True)
class ModelRef:
    """The model a latent was made with; ``sha256`` (of its weights file) is its identity."""

    name: str
    sha256: str
    arch: str
    latent_dim: int
    latent_bits: int


@dataclass(frozen=True)
class EncodedImage:
    """One image as latentpacs keeps it.

    Parameters
    ----------
    tier:
        The fidelity tier it was archived at.
    model:
        The model that made ``latent``.
    module:
        The original Image Pixel module (PS3.3 C.7.6.3).
    original_transfer_syntax:
        The Transfer Syntax UID the image arrived in (PS3.5 Section 10).
    original_stored_bytes:
        Size of the Pixel Data as it arrived (the numerator of the compression ratio).
    header:
        The original data set without Pixel Data, as DICOM JSON (PS3.18 F.2).
    latent:
        The quantised latent bytes.
    stream:
        The JPEG-LS stream of the tier (``b""`` for the latent tier): the pixel cells as
        sent for ``lossless`` (unused high bits included), the stored values for
        ``near-lossless``.
    pixel_sha256:
        SHA-256 of the original pixel cells (:func:`~latentpacs.image.pixels.cells_sha256`).
    returned_sha256:
        SHA-256 of the cells the stream decodes to, checked at store time and on every
        decode of the stream; ``""`` for the latent tier.
    lossy_on_arrival:
        The original had already lost information (:func:`~latentpacs.image.pixels.lossy_on_arrival`).
    arrival_method:
        Lossy Image Compression Method of the lossy transfer syntax it arrived in, or None.
    """

    tier: Tier
    model: ModelRef
    module: PixelModule
    original_transfer_syntax: str
    original_stored_bytes: int
    header: dict[str, Any]
    latent: bytes
    stream: bytes
    pixel_sha256: str = ""
    returned_sha256: str = ""
    lossy_on_arrival: bool = False
    arrival_method: str | None = None

    @property
    def archived_bytes(self) -> int:
        """Bytes that carry the image: latent plus stream."""
        return len(self.latent) + len(self.stream)

    @property
    def ratio(self) -> float:
        """Original stored bytes over archived bytes (Lossy Image Compression Ratio)."""
        return self.original_stored_bytes / max(self.archived_bytes, 1)

    @property
    def derivation(self) -> Derivation:
        """How a retrieval of this image is derived (model, tier, ratio)."""
        uncompressed = self.module.rows * self.module.columns * self.module.bits_allocated // 8
        return Derivation(
            self.model.name,
            self.model.sha256,
            self.tier,
            self.ratio,
            arrival_method=self.arrival_method,
            arrival_ratio=uncompressed / max(self.original_stored_bytes, 1),
            lossy_predecessor=self.lossy_on_arrival,
        )

    def dataset_header(self) -> Dataset:
        """The archived header as a pydicom Dataset."""
        return dataset_from_json(self.header)


def header_json(ds: Dataset) -> dict[str, Any]:
    """The data set without Pixel Data as a DICOM JSON object (PS3.18 F.2).

    The header is kept as received: an element whose value pydicom cannot convert (an IS
    of ``abc``, a DS of ``x.y``), at any depth, is kept byte for byte as VR UN with its
    raw value (PS3.5 6.2.2), never dropped and never a reason to refuse the image.
    :func:`~latentpacs.archive.records.dataset_from_json` reads it back.
    """
    fast = _json_object(ds, top=True, checked=False)
    try:
        Dataset.from_json(fast)  # what every retrieval does with it
    except Exception:
        return _json_object(ds, top=True, checked=True)
    return fast


#: Pixel Data, Float Pixel Data and Double Float Pixel Data (PS3.3 C.7.6.3, C.7.6.24).
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def _json_object(ds: Dataset, *, top: bool = False, checked: bool = True) -> dict[str, Any]:
    """DICOM JSON of a data set; ``checked``: each element is read back to prove it loads."""
    result: dict[str, Any] = {}
    for tag in ds.keys():
        if top and (tag in _PIXEL_TAGS or tag.group == 0x0002):
            continue
        result[f"{tag:08X}"] = _element_json(ds, tag, checked)
    return result


def _element_json(ds: Dataset, tag: Any, checked: bool) -> dict[str, Any]:
    """One element as DICOM JSON; a value that does not convert becomes UN InlineBinary."""
    key = f"{tag:08X}"
    try:
        element = ds[tag]
        if element.VR == "SQ":
            return {"vr": "SQ", "Value": [_json_object(item, checked=checked)
                                          for item in element.value]}
        converted = element.to_json_dict(None, 1 << 62)
        if checked:
            Dataset.from_json({key: converted})
        return converted
    except Exception:
        raw = ds.get_item(tag)
        value = getattr(raw, "value", b"")
        data = value if isinstance(value, bytes | bytearray) else str(value).encode("latin-1", "replace")
        logger.warning("element %s is malformed; kept as received", tag)
        return {"vr": "UN", "InlineBinary": base64.b64encode(bytes(data)).decode("ascii"),
                AS_RECEIVED_VR: str(getattr(raw, "VR", "UN"))}


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


def model_ref(engine: Engine) -> ModelRef:
    """The identity of the engine's model."""
    card = engine.loaded.card
    return ModelRef(card.name, card.sha256, card.arch, card.latent_dim, card.latent_bits)


def encode_datasets(datasets: Sequence[Dataset], engine: Engine, tier: Tier) -> list[EncodedImage]:
    """Encode data sets at ``tier``, sharing one engine batch.

    Each image's pixel data is decoded exactly once. The JPEG-LS stream codes the pixel
    cells themselves, never a difference from network output: for ``lossless`` every bit
    as sent (at Bits Allocated precision when bits above High Bit are set), for
    ``near-lossless:K`` the stored values within K. Each stream is decoded once here and
    checked (exact: its SHA-256 equals the original's; bounded: every value within K)
    before anything is archived, and the checksum of what it decodes to is kept.

    Raises
    ------
    LatentPacsError
        When an image cannot be archived (the subclass names what is wrong).
    """
    for ds in datasets:
        check_identity(ds)
    decoded = [pixel_cells(ds) for ds in datasets]
    values = [mask_to_stored(cells, module) for cells, module in decoded]
    images = [stored_to_canonical(stored, module) for stored, (_, module) in zip(values, decoded)]
    latents = engine.encode(images)
    model = model_ref(engine)
    encoded = []
    for ds, (cells, module), stored, latent in zip(datasets, decoded, values, latents):
        pixel_sha256 = cells_sha256(cells, module)
        stream, returned_sha256 = b"", ""
        if tier.has_stream:
            stream, returned_sha256 = _coded_stream(cells, stored, module, tier, pixel_sha256)
        encoded.append(
            EncodedImage(
                tier=tier,
                model=model,
                module=module,
                original_transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                original_stored_bytes=original_stored_bytes(ds),
                header=header_json(ds),
                latent=latent,
                stream=stream,
                pixel_sha256=pixel_sha256,
                returned_sha256=returned_sha256,
                lossy_on_arrival=lossy_on_arrival(ds),
                arrival_method=arrival_lossy_method(ds),
            )
        )
    return encoded


def _coded_stream(
    cells: np.ndarray, stored: np.ndarray, module: PixelModule, tier: Tier, pixel_sha256: str
) -> tuple[bytes, str]:
    """The tier's JPEG-LS stream and the SHA-256 of what it decodes to, verified once."""
    if tier.near == 0:
        exact = stored is cells  # no bit above High Bit is set
        stream = encode_stream(cells, module.bits_stored if exact else module.bits_allocated, 0)
        back = decode_stream(stream)
        returned = cells_sha256(back, module) if back.shape == module.shape else ""
        if returned != pixel_sha256:
            raise PixelChecksumError(
                "the lossless stream does not decode to the original pixels; nothing stored"
            )
        return stream, returned
    stream = encode_stream(stored, module.bits_stored, tier.near)
    back = decode_stream(stream)
    if back.shape != module.shape or int(
        np.abs(back.astype(np.int32) - stored.astype(np.int32)).max()
    ) > tier.near:
        raise PixelChecksumError(
            f"the near-lossless stream exceeds its bound {tier.near}; nothing stored"
        )
    return stream, cells_sha256(back, module)


def decode_stored(image: EncodedImage, engine: Engine | None) -> np.ndarray:
    """The pixel cells a retrieval returns, uint16 (rows, cols).

    The ``lossless`` and ``near-lossless`` tiers read the JPEG-LS stream and need no
    model; what it decodes to is checked against the archived SHA-256 (when the image has
    one), so a damaged stream can never be returned as the original. The ``latent`` tier
    decodes with ``engine``, whose model must be the one the image names (checked by
    SHA-256).

    Raises
    ------
    PixelChecksumError
        When the stream decodes to other pixels than were archived.
    LatentFormatError
        When the stream's geometry is wrong or the engine's model is not the image's.
    """
    module = image.module
    if image.tier.has_stream:
        stored = decode_stream(image.stream)
        if stored.shape != (module.rows, module.columns):
            raise LatentFormatError(
                f"stream is {stored.shape[0]}x{stored.shape[1]}, "
                f"geometry says {module.rows}x{module.columns}"
            )
        if image.returned_sha256 and cells_sha256(stored, module) != image.returned_sha256:
            raise PixelChecksumError("pixel checksum mismatch: the archived stream is damaged")
        return stored
    if engine is None or engine.loaded.card.sha256 != image.model.sha256:
        raise LatentFormatError(
            f"latent was made by model sha256 {image.model.sha256[:16]}; decode it with that model"
        )
    (canonical,) = engine.decode([image.latent], [(module.rows, module.columns)])
    return canonical_to_stored(canonical, module)


def stream_sendable(image: EncodedImage) -> bool:
    """Whether the archived stream may go out as encapsulated JPEG-LS Pixel Data as it is.

    Only when its precision equals Bits Stored (PS3.5 8.2.3): a ``lossless`` stream that
    carries bits above High Bit is decoded and sent native instead.
    """
    return bool(image.stream) and stream_precision(image.stream) == image.module.bits_stored


def returned_dataset(image: EncodedImage, engine: Engine | None) -> Dataset:
    """The DICOM object a retrieval returns: derived for lossy tiers, the original for lossless."""
    return build_returned(image.dataset_header(), decode_stored(image, engine), image.module, image.derivation)


@dataclass(frozen=True)
class Imported:
    """What happened to one file of an import: ``result`` or ``error`` is set."""

    source: Path
    result: StoreResult | None = None
    error: str | None = None


class EnginePool:
    """One engine per model, loaded on first use and verified by SHA-256.

    The node encodes with one model but must decode every latent the archive holds,
    whichever model made it.
    """

    def __init__(self, primary: Engine, *, models_dir: Path | None, device: str | None) -> None:
        self.primary = primary
        self._models_dir = models_dir
        self._device = device
        self._engines = {primary.loaded.card.sha256: primary}
        self._lock = threading.Lock()

    def for_sha256(self, sha256: str) -> Engine:
        """The engine of the model with this weights hash (loaded and hash-checked once)."""
        with self._lock:
            if sha256 not in self._engines:
                path = find_model_by_sha256(sha256, self._models_dir)
                loaded = load_model(path, expected_sha256=sha256)
                self._engines[sha256] = Engine(loaded, device=self._device)
            return self._engines[sha256]

    def close(self) -> None:
        """Stop every engine's worker."""
        with self._lock:
            for engine in self._engines.values():
                engine.close()
            self._engines.clear()


@dataclass(frozen=True)
class Limits:
    """Work one request may cause (the ``limits.*`` settings); more is refused with A700.

    Memory bound of retrieval decodes: at most ``max_concurrent_decodes`` decodes run at
    once in the process, each on at most ``max_image_pixels`` pixels, and each
    association holds at most ``PREFETCH_DEPTH + 1`` decoded objects. A decode's working
    set is about 10 bytes per pixel (float32 canonical image, uint16 stored values, the
    Pixel Data bytes), so decodes take at most ``max_image_pixels x 10 x
    max_concurrent_decodes`` bytes (64 Mi pixels x 10 B x 4 = 2.5 GiB by default), and the
    decoded objects waiting to be sent at most ``max_image_pixels x 2 x (PREFETCH_DEPTH + 1)``
    bytes per association (256 MiB by default, times ``node.max_associations``).

    Parameters
    ----------
    max_find_answers:
        C-FIND answers per request (PS3.4 C.4.1); the answer beyond it ends the C-FIND
        with A700 and an ErrorComment, after the answers already sent.
    max_retrieve_instances:
        C-GET / C-MOVE sub-operations per request; more matches: refused with A700
        before any sub-operation.
    max_image_pixels:
        Largest Rows x Columns a retrieval decodes; a larger image fails its
        sub-operation (A700 with an ErrorComment), the others are sent.
    max_concurrent_decodes:
        Decodes running at once across all associations (one semaphore per process).
    decode_wait_s:
        How long a sub-operation waits for a free decode slot before it fails with A700.
    """

    max_find_answers: int = 10000
    max_retrieve_instances: int = 10000
    max_image_pixels: int = 67108864
    max_concurrent_decodes: int = 4
    decode_wait_s: float = 60.0

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        """The limits of a configuration; the decode wait is ``node.dimse_timeout``."""
        return cls(
            max_find_answers=config["limits.max_find_answers"],
            max_retrieve_instances=config["limits.max_retrieve_instances"],
            max_image_pixels=config["limits.max_image_pixels"],
            max_concurrent_decodes=config["limits.max_concurrent_decodes"],
            decode_wait_s=float(config["node.dimse_timeout"]),
        )


class DecodeBudget:
    """The decode slots of one process: a bounded semaphore of ``limits.max_concurrent_decodes``.

    ``slot()`` waits at most ``wait_s`` for a slot and then raises
    :class:`~latentpacs.errors.LimitExceededError` (A700), so a burst of retrievals is
    refused rather than queued without bound.
    """

    def __init__(self, slots: int, wait_s: float) -> None:
        self.slots = slots
        self.wait_s = wait_s
        self._semaphore = threading.BoundedSemaphore(slots)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one decode slot for the ``with`` block."""
        if not self._semaphore.acquire(timeout=self.wait_s):
            raise LimitExceededError(
                f"all {self.slots} decode slots busy for {self.wait_s:g} s; retry later")
        try:
            yield
        finally:
            self._semaphore.release()


class Service:
    """The node's work, testable without a network.

    ``store`` is pixels -> encode -> archive (one transaction); ``find`` answers from the
    archive; ``matches`` + ``returned`` are archive -> decode -> derive.

    Parameters
    ----------
    archive:
        The SQL archive (one engine for the process).
    engines:
        The inference engines; new images are encoded with ``engines.primary``.
    tier:
        The fidelity tier new images are archived at.
    duplicates:
        What a re-sent SOP Instance does: keep the first, replace it, or be rejected.
    limits:
        Per-request bounds and the decode budget (:class:`Limits`); defaults when None.
    """

    def __init__(
        self,
        archive: Archive,
        engines: EnginePool,
        tier: Tier,
        *,
        duplicates: DuplicatePolicy = DuplicatePolicy.KEEP,
        limits: Limits | None = None,
    ) -> None:
        self.archive = archive
        self.engines = engines
        self.tier = tier
        self.duplicates = duplicates
        self.limits = limits or Limits()
        self.decodes = DecodeBudget(self.limits.max_concurrent_decodes, self.limits.decode_wait_s)
        card = engines.primary.loaded.card
        archive.register_model(
            sha256=card.sha256, name=card.name, arch=card.arch, card=json.loads(card.to_json())
        )

    def store(self, ds: Dataset) -> StoreResult:
        """Archive one received instance (PS3.4 B.2); returns only after the commit.

        Raises
        ------
        LatentPacsError
            The subclass names what is wrong; nothing has been written.
        """
        check_identity(ds)
        (image,) = encode_datasets([ds], self.engines.primary, self.tier)
        # From the archived header: a malformed optional element there is raw bytes (UN).
        overrides = returned_overrides(image.dataset_header(), image.derivation)
        module = image.module
        archived = ArchivedImage(
            header=image.header,
            overrides=overrides.to_json_dict(),
            tier=str(image.tier),
            model_sha256=image.model.sha256,
            latent=image.latent,
            stream=image.stream,
            rows=module.rows,
            columns=module.columns,
            bits_allocated=module.bits_allocated,
            bits_stored=module.bits_stored,
            high_bit=module.high_bit,
            photometric_interpretation=module.photometric_interpretation,
            original_transfer_syntax=image.original_transfer_syntax,
            original_stored_bytes=image.original_stored_bytes,
            pixel_sha256=image.pixel_sha256,
            returned_sha256=image.returned_sha256,
            lossy_on_arrival=image.lossy_on_arrival,
        )
        result = self.archive.store(archived, duplicates=self.duplicates)
        logger.info("stored %s (%s, %s)", archived.sop_instance_uid, image.tier, result)
        return result

    def import_files(
        self, paths: Iterable[Path], *, on_done: Callable[[Imported], None] | None = None
    ) -> list[Imported]:
        """Archive DICOM files as a C-STORE would, one transaction each (offline import).

        A file that cannot be read or archived yields an :class:`Imported` with a one-line
        ``error``; the others are still archived.
        """
        outcomes = []
        for path in paths:
            try:
                outcome = Imported(path, result=self.store(read_file(path)))
            except LatentPacsError as exc:
                outcome = Imported(path, error=exc.message)
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)
        return outcomes

    def close(self) -> None:
        """Stop the engines and close the database connections."""
        self.engines.close()
        self.archive.dispose()

    def find(self, level: str, identifier: Dataset, *, root: str,
             retrieve_aet: str = "") -> Iterator[Dataset]:
        """C-FIND answers (PS3.4 C.4.1) from the archive, at most ``limits.max_find_answers``.

        ``retrieve_aet`` (the node's AE title) fills Retrieve AE Title when asked.

        Raises
        ------
        InvalidIdentifierError
            At the call, for an invalid identifier (A900).
        LimitExceededError
            While iterating, in place of the answer beyond the limit (A700).
        """
        answers = self.archive.find(level, identifier, root=root, retrieve_aet=retrieve_aet)
        return self._bounded(answers, self.limits.max_find_answers)

    @staticmethod
    def _bounded(answers: Iterator[Dataset], limit: int) -> Iterator[Dataset]:
        for count, answer in enumerate(answers, start=1):
            if count > limit:
                raise LimitExceededError(
                    f"more than {limit} C-FIND answers match; narrow the query")
            yield answer

    def matches(self, level: str, identifier: Dataset, *, root: str) -> list[int]:
        """Archive row ids of the instances a C-GET / C-MOVE selects (PS3.4 C.4.2.2, C.4.3.2).

        Ids only: :meth:`returned` loads each instance when its sub-operation comes.

        Raises
        ------
        InvalidIdentifierError
            For a missing, empty, universal or wildcard unique key (A900).
        LimitExceededError
            When more than ``limits.max_retrieve_instances`` instances match (A700).
        """
        return self.archive.match_instances(level, identifier, root=root,
                                            limit=self.limits.max_retrieve_instances)

    def returned(
        self, archived: ArchivedImage | int, *, sendable: Collection[tuple[str, str]] = ()
    ) -> Dataset:
        """The object a retrieval sends for one archived instance (or its row id, loaded here).

        An image of more than ``limits.max_image_pixels`` pixels is not decoded, and the
        decode waits for a slot of the process's :class:`DecodeBudget`; both refusals
        raise :class:`~latentpacs.errors.LimitExceededError` (A700), failing this
        sub-operation only.
        """
        if isinstance(archived, int):
            archived = self.archive.load(archived)
        pixels = archived.rows * archived.columns
        if pixels > self.limits.max_image_pixels:
            raise LimitExceededError(
                f"image of {archived.rows}x{archived.columns} pixels exceeds "
                f"limits.max_image_pixels {self.limits.max_image_pixels}")
        with self.decodes.slot():
            return self._decoded(archived, sendable)

    def _decoded(self, archived: ArchivedImage, sendable: Collection[tuple[str, str]]) -> Dataset:
        """Decode one archived instance into the object a retrieval sends.

        Uses the overrides archived at store time, so the identity is the one C-FIND shows.
        ``sendable`` holds the (SOP Class UID, Transfer Syntax UID) pairs the peer accepted
        (PS3.8 9.3.2.2); empty means "uncompressed". When the peer took JPEG-LS for this
        image's class, a ``lossless`` or ``near-lossless`` image is sent as its archived
        JPEG-LS stream, with no decode; when it took only a compressed transfer syntax,
        the returned pixels are coded losslessly in it (:func:`_in_accepted_syntax`).
        """
        module = PixelModule(
            rows=archived.rows,
            columns=archived.columns,
            bits_allocated=archived.bits_allocated,
            bits_stored=archived.bits_stored,
            high_bit=archived.high_bit,
            photometric_interpretation=archived.photometric_interpretation,
        )
        tier = Tier.parse(archived.tier)
        header = dataset_from_json(archived.header)
        overrides = dataset_from_json(archived.overrides)
        accepted = {ts for sop_class, ts in sendable if sop_class == str(header.SOPClassUID)}
        engine = None if tier.has_stream else self.engines.for_sha256(archived.model_sha256)
        # The JPEG-LS tiers decode without the model: only its hash is carried along.
        model = model_ref(engine) if engine else ModelRef("", archived.model_sha256, "", 0, 0)
        image = EncodedImage(
            tier=tier,
            model=model,
            module=module,
            original_transfer_syntax=archived.original_transfer_syntax,
            original_stored_bytes=archived.original_stored_bytes,
            header=archived.header,
            latent=archived.latent,
            stream=archived.stream,
            pixel_sha256=archived.pixel_sha256,
            returned_sha256=archived.returned_sha256,
            lossy_on_arrival=archived.lossy_on_arrival,
        )
        if tier.has_stream:
            syntax = JPEGLSLossless if tier.near == 0 else JPEGLSNearLossless
            if syntax in accepted and stream_sendable(image):
                # The stream's hash was checked when it was read; it was proven to decode
                # to ``returned_sha256`` before it was archived.
                return assemble_encapsulated(header, overrides, archived.stream, module, syntax)
        cells = decode_stored(image, engine)
        returned = assemble(header, overrides, cells, module)
        if int(cells.max(initial=0)) > module.max_value and not _NATIVE.intersection(accepted):
            if accepted:
                raise UnsupportedImageError(
                    "pixels carry bits above High Bit: they go out native only, "
                    "and the peer accepted no native transfer syntax"
                )
        return _in_accepted_syntax(returned, accepted)

    def returned_ahead(
        self,
        matches: Sequence[_Match],
        depth: int = PREFETCH_DEPTH,
        *,
        sendable: Collection[tuple[str, str]] = (),
    ) -> Generator[tuple[_Match, Future[Dataset]], None, None]:
        """Each match with the future of :meth:`returned`, decoded up to ``depth`` ahead.

        A match is an archive row id (from :meth:`matches`; the worker loads it) or an
        :class:`ArchivedImage`. A C-GET / C-MOVE (PS3.4 C.4.2.3, C.4.3.3) sends one
        C-STORE sub-operation at a time; a worker thread loads and decodes the next
        instances meanwhile, so decoding and sending overlap while at most ``depth + 1``
        instances are held. A load or decode error is raised by the future's
        ``result()``. Closing the generator (the caller stops early: cancel, failure)
        drops the decodes not yet started.
        """
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latentpacs-prefetch")
        remaining = iter(matches)
        pending: deque[tuple[_Match, Future[Dataset]]] = deque()
        try:
            for archived in remaining:
                future = executor.submit(self.returned, archived, sendable=sendable)
                pending.append((archived, future))
                if len(pending) > depth:
                    yield pending.popleft()
            while pending:
                yield pending.popleft()
        finally:
            executor.shutdown(wait=False, cancel_futures=True)


#: Transfer syntaxes a returned object can be sent in without coding (PS3.5 A.1, A.2).
_NATIVE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
#: Compressed transfer syntaxes the node codes on the fly, losslessly (PS3.5 A.4).
_LOSSLESS_ENCODINGS = (JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, RLELossless)


def _in_accepted_syntax(ds: Dataset, accepted: Collection[str]) -> Dataset:
    """``ds`` (native pixels) in a transfer syntax the peer accepted for its class.

    A peer that accepted only a compressed transfer syntax for the class (a C-GET
    requestor proposing e.g. JPEG-LS first) gets the pixels coded losslessly in it with
    pydicom's encoders; JPEG-LS NEAR=0 is valid under the Near-Lossless syntax.

    Raises
    ------
    UnsupportedImageError
        When the peer accepted only transfer syntaxes latentpacs cannot code.
    """
    if not accepted or _NATIVE.intersection(accepted):
        return ds
    for syntax in _LOSSLESS_ENCODINGS:
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


def open_service(config: Config) -> Service:
    """Open the archive (applying migrations) and load the configured model.

    The caller closes it with :meth:`Service.close`.

    Raises
    ------
    LatentPacsError
        For an unusable configuration, model or database (named in the message).
    """
    data_dir = Path(config["archive.data_dir"])
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = Archive(config.database_url, blob_dir=data_dir / "blobs")
    try:
        device = config["codec.device"] or None
        loaded = load_model(config["codec.model"], models_dir=config.models_dir)
        primary = Engine(loaded, device=device, max_batch=config["codec.max_batch"])
        engines = EnginePool(primary, models_dir=config.models_dir, device=device)
        return Service(
            archive, engines, config.tier, duplicates=DuplicatePolicy(config["archive.duplicates"]),
            limits=Limits.from_config(config),
        )
    except BaseException:
        archive.dispose()
        raise
