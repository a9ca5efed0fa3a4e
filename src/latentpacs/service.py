"""The Service the node (and a web server) calls: store, find, retrieve, with limits applied.

``store`` is :func:`latentpacs.image.chain.encode` then one archive transaction; ``find``
answers from the archive; ``matches`` + ``returned`` are archive -> record ->
:func:`latentpacs.image.chain.returned`. Permissions are the node's (node/peers.py);
limits are applied here. Testable without a network.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from latentpacs import metrics
from latentpacs.archive import Archive, ArchivedImage, DuplicatePolicy, StoreResult
from latentpacs.archive.blobs import configured_stream_store
from latentpacs.codec.streams import DEFAULT_CODER, get_coder
from latentpacs.codec.tiers import Tier
from latentpacs.config import Config
from latentpacs.dicomjson import first_value
from latentpacs.deferred import DeferredCoder
from latentpacs.errors import ArchiveError, DuplicateInstanceError, LatentPacsError, LimitExceededError
from latentpacs.image import chain
from latentpacs.image.chain import EnginePool
from latentpacs.image.pixels import read_file
from latentpacs.image.record import ImageRecord

logger = logging.getLogger(__name__)

#: Instances a retrieval decodes ahead of the one being sent, in parallel (each one is
#: held in memory): two, so both cores decode while the sender writes (JPEG-LS and the
#: integer decoder release the GIL).
PREFETCH_DEPTH = 2
#: What a retrieval iterates: an archive row id, loaded when its turn comes, or an image.
_Match = int | ArchivedImage


@dataclass(frozen=True)
class Imported:
    """What happened to one file of an import: ``result`` or ``error`` is set."""

    source: Path
    result: StoreResult | None = None
    error: str | None = None


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
    bytes per association (384 MiB by default, times ``node.max_associations``).

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
    coder:
        The stream coder of new ``lossless`` / ``near-lossless`` images (``codec.coder``).
    deferred:
        Archive native ``lossless`` images as received and code them in a background
        thread (``codec.deferred``; :mod:`latentpacs.deferred`), started by
        :meth:`start_background`.
    recompress:
        The background coder, when idle, recompresses ``lossless`` rows of other coders
        with ``coder`` (``codec.recompress``; :mod:`latentpacs.recompress`).
    """

    def __init__(
        self,
        archive: Archive,
        engines: EnginePool,
        tier: Tier,
        *,
        duplicates: DuplicatePolicy = DuplicatePolicy.KEEP,
        limits: Limits | None = None,
        coder: str = DEFAULT_CODER,
        deferred: bool = False,
        recompress: bool = True,
    ) -> None:
        self.archive = archive
        self.engines = engines
        self.tier = tier
        self.coder = get_coder(coder).name
        self.duplicates = duplicates
        self.limits = limits or Limits()
        self.decodes = DecodeBudget(self.limits.max_concurrent_decodes, self.limits.decode_wait_s)
        #: The background coder, when deferred coding is on (:mod:`latentpacs.deferred`).
        self.deferred = (DeferredCoder(archive, engines, self.coder, recompress=recompress)
                         if deferred else None)
        card = engines.primary_card
        archive.register_model(
            sha256=card.sha256, name=card.name, arch=card.arch, card=json.loads(card.to_json())
        )

    def start_background(self) -> None:
        """Start the background coder (the node does; a CLI command codes in line)."""
        if self.deferred is not None:
            self.deferred.start()

    def store(self, ds: Dataset, *, received: Path | None = None) -> StoreResult:
        """Archive one received instance (PS3.4 B.2); returns only after the commit.

        A re-sent instance that the duplicate policy keeps or rejects is answered before
        any pixel is decoded or coded: that work would never be read. (A concurrent first
        store of the same instance still meets the policy inside :meth:`Archive.store`.)

        ``received`` is the PS3.10 file ``ds`` was read from, as the node received it.
        With deferred coding on and an image :func:`~latentpacs.image.chain.defers` allows,
        that file is archived as it is (durable before the commit) and the background
        coder codes its stream later; otherwise the stream is coded and verified here.

        Raises
        ------
        LatentPacsError
            The subclass names what is wrong; nothing has been written.
        """
        chain.check_identity(ds)
        if self.duplicates is not DuplicatePolicy.REPLACE and self.archive.is_archived(
                str(ds.SOPInstanceUID)):
            if self.duplicates is DuplicatePolicy.REJECT:
                raise DuplicateInstanceError(f"SOP Instance {ds.SOPInstanceUID} is already archived")
            logger.info("kept %s: already archived, not coded again", ds.SOPInstanceUID)
            return StoreResult.KEPT_EXISTING
        deferred = self.deferred if received is not None and chain.defers(ds, self.tier) else None
        if deferred is not None and received is not None:
            record = chain.received(ds, _read_received(received), self.engines, self.tier)
        else:
            (record,) = chain.encode([ds], self.engines, self.tier, self.coder)
        archived = record.to_archived()
        result = self.archive.store(archived, duplicates=self.duplicates)
        if result is not StoreResult.KEPT_EXISTING:
            metrics.archived(archived.tier, archived.archived_bytes)
        if deferred is not None and result is not StoreResult.KEPT_EXISTING:
            instance_id = self.archive.instance_id(archived.original_sop_instance_uid)
            if instance_id is not None:
                deferred.submit(instance_id)
        logger.info("stored %s (%s, %s%s)", archived.sop_instance_uid, record.tier, result,
                    ", coding deferred" if deferred is not None else "")
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
        """Stop the background coder and the engines, close the database connections.

        A row still pending stays archived as received; the next start codes it.
        """
        if self.deferred is not None:
            self.deferred.stop()
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
        (PS3.8 9.3.2.2); :func:`latentpacs.image.chain.returned` picks the transfer syntax.
        """
        record = ImageRecord.from_archived(archived)
        sop_class = first_value(archived.header, "00080016")  # SOP Class UID
        accepted = {ts for cls, ts in sendable if cls == sop_class}
        return chain.returned(record, self.engines.for_record(record), accepted)

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
        C-STORE sub-operation at a time; ``depth`` worker threads load and decode the
        next instances meanwhile, so decoding and sending overlap while at most ``depth + 1``
        instances are held. A load or decode error is raised by the future's
        ``result()``. Closing the generator (the caller stops early: cancel, failure)
        drops the decodes not yet started.
        """
        executor = ThreadPoolExecutor(max_workers=max(depth, 1),
                                      thread_name_prefix="latentpacs-prefetch")
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


def _read_received(path: Path) -> bytes:
    """The bytes of the file an instance was received into."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ArchiveError(f"the received data set cannot be read back: {exc.strerror}") from exc


def open_engines(config: Config, *, encode: bool = True, lazy: bool = False) -> EnginePool:
    """The engine pool of a configuration: ``codec.model`` on ``codec.device``, batches of
    ``codec.max_batch`` (the CLI's ``encode``/``decode`` use it as the node does).

    ``encode=False`` loads no model up front (decoding finds each by its hash). At a
    stream tier, or with ``lazy`` (the archive maintenance commands, which meet latents
    only in some rows), the model is hash-checked now but its engine (and torch) is
    loaded only if a latent is ever encoded or decoded.

    Raises
    ------
    ModelError
        For a missing or hash-mismatched model, or an unusable device.
    """
    device = config["codec.device"] or None
    pool = {"models_dir": config.models_dir, "device": device, "max_batch": config["codec.max_batch"]}
    if not encode:
        return EnginePool(**pool)
    if config.tier.has_stream or lazy:
        from latentpacs.codec.cards import verified_card

        return EnginePool(primary_model=verified_card(config["codec.model"],
                                                      models_dir=config.models_dir), **pool)
    from latentpacs.codec.engine import Engine
    from latentpacs.codec.modelfile import load_model

    loaded = load_model(config["codec.model"], models_dir=config.models_dir)
    return EnginePool(Engine(loaded, device=device, max_batch=config["codec.max_batch"]), **pool)


def open_service(config: Config, *, background: bool = False, lazy_engine: bool = False) -> Service:
    """Open the archive (applying migrations) and load the configured model.

    ``background``: defer coding as ``codec.deferred`` says and start the background
    coder (the node); otherwise every image is coded in line (the CLI). ``lazy_engine``:
    load the model's engine only when a latent is met (:func:`open_engines`; the archive
    maintenance commands). The caller closes it with :meth:`Service.close`.

    Raises
    ------
    LatentPacsError
        For an unusable configuration, model or database (named in the message).
    """
    data_dir = Path(config["archive.data_dir"])
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = Archive(config.database_url, blob_store=configured_stream_store(config))
    try:
        engines = open_engines(config, lazy=lazy_engine)
        service = Service(
            archive, engines, config.tier, duplicates=DuplicatePolicy(config["archive.duplicates"]),
            limits=Limits.from_config(config), coder=config["codec.coder"],
            deferred=background and config["codec.deferred"],
            recompress=config["codec.recompress"],
        )
        if background and config["codec.deferred_background"]:
            service.start_background()
        return service
    except BaseException:
        archive.dispose()
        raise
