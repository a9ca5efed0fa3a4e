"""Where the layers meet: image in -> pixels -> codec -> record; record -> codec -> derive -> image out.

The encode and decode chains here are shared by the ``.lpz`` files (:mod:`latentpacs.lpz`)
and the node's archive (:class:`Service`), so a file and a C-GET of the same image give
the same pixels and the same derived identity.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
from latentpacs.codec.engine import Engine
from latentpacs.codec.modelfile import find_model_by_sha256, load_model
from latentpacs.codec.residual import decode_residual, encode_residual
from latentpacs.codec.tiers import Tier
from latentpacs.config import Config
from latentpacs.derive import (
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
    UnsupportedImageError,
)
from latentpacs.pixels import (
    PixelModule,
    canonical_to_stored,
    original_stored_bytes,
    read_file,
    stored_to_canonical,
    stored_values,
)

logger = logging.getLogger(__name__)

#: Instances a retrieval decodes ahead of the one being sent (each one is held in memory).
PREFETCH_DEPTH = 1


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
    residual:
        The JPEG-LS stream of the stored values (``b""`` for the latent tier).
    """

    tier: Tier
    model: ModelRef
    module: PixelModule
    original_transfer_syntax: str
    original_stored_bytes: int
    header: dict[str, Any]
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

    @property
    def derivation(self) -> Derivation:
        """How a retrieval of this image is derived (model, tier, ratio)."""
        return Derivation(self.model.name, self.model.sha256, self.tier, self.ratio)

    def dataset_header(self) -> Dataset:
        """The archived header as a pydicom Dataset."""
        return Dataset.from_json(self.header)


def header_json(ds: Dataset) -> dict[str, Any]:
    """The data set without Pixel Data as a DICOM JSON object (PS3.18 F.2)."""
    header = Dataset()
    header.update(ds)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in header:
            del header[keyword]
    return header.to_json_dict()


def model_ref(engine: Engine) -> ModelRef:
    """The identity of the engine's model."""
    card = engine.loaded.card
    return ModelRef(card.name, card.sha256, card.arch, card.latent_dim, card.latent_bits)


def encode_datasets(datasets: Sequence[Dataset], engine: Engine, tier: Tier) -> list[EncodedImage]:
    """Encode data sets at ``tier``, sharing one engine batch.

    Each image's pixel data is decoded exactly once; the JPEG-LS stream (for the
    ``lossless`` and ``near-lossless`` tiers) codes the stored values themselves, so its
    guarantee never depends on floating-point network output.

    Raises
    ------
    LatentPacsError
        When an image cannot be archived (the subclass names what is wrong).
    """
    decoded = [stored_values(ds) for ds in datasets]
    images = [stored_to_canonical(stored, module) for stored, module in decoded]
    latents = engine.encode(images)
    model = model_ref(engine)
    encoded = []
    for ds, (stored, module), latent in zip(datasets, decoded, latents):
        residual = (
            encode_residual(stored, module.bits_stored, tier.near) if tier.has_residual else b""
        )
        encoded.append(
            EncodedImage(
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
    return encoded


def decode_stored(image: EncodedImage, engine: Engine | None) -> np.ndarray:
    """The stored pixel values a retrieval returns, uint16 (rows, cols).

    The ``lossless`` and ``near-lossless`` tiers read the JPEG-LS stream and need no
    model; the ``latent`` tier decodes with ``engine``, whose model must be the one the
    image names (checked by SHA-256).
    """
    module = image.module
    if image.tier.has_residual:
        stored = decode_residual(image.residual)
        if stored.shape != (module.rows, module.columns):
            raise LatentFormatError(
                f"residual is {stored.shape[0]}x{stored.shape[1]}, "
                f"geometry says {module.rows}x{module.columns}"
            )
        return stored
    if engine is None or engine.loaded.card.sha256 != image.model.sha256:
        raise LatentFormatError(
            f"latent was made by model sha256 {image.model.sha256[:16]}; decode it with that model"
        )
    (canonical,) = engine.decode([image.latent], [(module.rows, module.columns)])
    return canonical_to_stored(canonical, module)


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
    """

    def __init__(
        self,
        archive: Archive,
        engines: EnginePool,
        tier: Tier,
        *,
        duplicates: DuplicatePolicy = DuplicatePolicy.KEEP,
    ) -> None:
        self.archive = archive
        self.engines = engines
        self.tier = tier
        self.duplicates = duplicates
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
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"):
            if not str(ds.get(keyword, "")).strip():
                raise InvalidDicomError(f"the data set has no {keyword}")
        (image,) = encode_datasets([ds], self.engines.primary, self.tier)
        overrides = returned_overrides(ds, image.derivation)
        module = image.module
        archived = ArchivedImage(
            header=image.header,
            overrides=overrides.to_json_dict(),
            tier=str(image.tier),
            model_sha256=image.model.sha256,
            latent=image.latent,
            residual=image.residual,
            rows=module.rows,
            columns=module.columns,
            bits_allocated=module.bits_allocated,
            bits_stored=module.bits_stored,
            high_bit=module.high_bit,
            photometric_interpretation=module.photometric_interpretation,
            original_transfer_syntax=image.original_transfer_syntax,
            original_stored_bytes=image.original_stored_bytes,
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

    def find(self, level: str, identifier: Dataset, *, root: str) -> Iterator[Dataset]:
        """C-FIND answers (PS3.4 C.4.1) from the archive."""
        return self.archive.find(level, identifier, root=root)

    def matches(self, level: str, identifier: Dataset, *, root: str) -> list[ArchivedImage]:
        """The instances a C-GET / C-MOVE identifier selects (PS3.4 C.4.2.2, C.4.3.2)."""
        return self.archive.match_instances(level, identifier, root=root)

    def returned(
        self, archived: ArchivedImage, *, sendable: Collection[tuple[str, str]] = ()
    ) -> Dataset:
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
        header = Dataset.from_json(archived.header)
        overrides = Dataset.from_json(archived.overrides)
        accepted = {ts for sop_class, ts in sendable if sop_class == str(header.SOPClassUID)}
        if tier.has_residual:
            syntax = JPEGLSLossless if tier.near == 0 else JPEGLSNearLossless
            if syntax in accepted:
                return assemble_encapsulated(header, overrides, archived.residual, module, syntax)
        engine = None if tier.has_residual else self.engines.for_sha256(archived.model_sha256)
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
            residual=archived.residual,
        )
        returned = assemble(header, overrides, decode_stored(image, engine), module)
        return _in_accepted_syntax(returned, accepted)

    def returned_ahead(
        self,
        matches: Sequence[ArchivedImage],
        depth: int = PREFETCH_DEPTH,
        *,
        sendable: Collection[tuple[str, str]] = (),
    ) -> Generator[tuple[ArchivedImage, Future[Dataset]], None, None]:
        """Each match with the future of :meth:`returned`, decoded up to ``depth`` ahead.

        A C-GET / C-MOVE (PS3.4 C.4.2.3, C.4.3.3) sends one C-STORE sub-operation at a
        time; a worker thread decodes the next instances meanwhile, so decoding and
        sending overlap while at most ``depth + 1`` decoded objects are held. A decode
        error is raised by the future's ``result()``. Closing the generator (the caller
        stops early: cancel, failure) drops the decodes not yet started.
        """
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latentpacs-prefetch")
        remaining = iter(matches)
        pending: deque[tuple[ArchivedImage, Future[Dataset]]] = deque()
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
            archive, engines, config.tier, duplicates=DuplicatePolicy(config["archive.duplicates"])
        )
    except BaseException:
        archive.dispose()
        raise
