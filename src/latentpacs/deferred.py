"""Deferred coding: images acknowledged as received, coded to their tier's stream afterwards.

A C-STORE at the ``lossless`` tier whose Pixel Data is native is archived as received:
the PS3.10 file the node got is the row's stream (coder
:data:`~latentpacs.codec.tiers.RECEIVED`), a blob fsynced before the row commits, so
Success means durable (PS3.4 B.2.3) as it does for storescp or Orthanc. C-FIND sees the
instance at once, and a retrieval returns it from the bytes as received.

:class:`DeferredCoder` is the background queue that finishes the work: one worker thread,
at a lower CPU priority than the threads that serve associations, takes pending rows in
order, reads the object as received, codes the tier's stream with
:func:`latentpacs.image.chain.encode` (which decodes the new stream and checks it
against the pixel checksum), and swaps it in with
:meth:`latentpacs.archive.Archive.recode`, one transaction that only succeeds while the
row still names the object as received. The object as received is deleted only after
that commit. A crash at any point leaves the row naming one valid stream; a restarted
node finds the pending rows again (:meth:`DeferredCoder.start`). A row whose coding failed
because the archive itself was unavailable (A700: the database restarted, the data disk
full) is tried again, without a restart, when the next store is queued (the archive took a
store, so it is back) or after :data:`RETRY_S` seconds.

When its queue is empty the same worker recompresses, one row at a time, the ``lossless``
rows whose stream another coder wrote than ``codec.coder``, where the verified new stream
is smaller (:mod:`latentpacs.recompress`; ``codec.recompress = false`` turns this off). An image queued meanwhile is coded before
the next row is recompressed, so acknowledgements and deferred coding do not wait for
recompression. A scan that finds nothing more is repeated after :data:`RESCAN_S` seconds
(another node or an import may have archived rows with another coder meanwhile).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from io import BytesIO

from pydicom import dcmread

from latentpacs import metrics, recompress
from latentpacs.archive import Archive, StreamRow
from latentpacs.codec.streams import get_coder
from latentpacs.codec.tiers import RECEIVED
from latentpacs.errors import (
    ArchiveError, InvalidDicomError, LatentPacsError, NotFoundError, Status,
)
from latentpacs.image import chain
from latentpacs.image.chain import EnginePool
from latentpacs.image.record import ImageRecord

logger = logging.getLogger(__name__)

#: How much the worker thread lowers its CPU priority (Linux nice increment).
NICE_INCREMENT = 10
#: Seconds before rows whose coding met an unavailable archive are tried again.
RETRY_S = 30.0
#: Seconds before the archive is scanned again for rows to recompress, once none was left.
RESCAN_S = 300.0


class DeferredCoder:
    """The background coder of one process.

    Parameters
    ----------
    archive:
        The archive whose pending rows are coded.
    engines:
        The engine pool (its primary model's identity goes into each record).
    coder:
        The stream coder of the tier's streams (``codec.coder``).
    recompress:
        Recompress ``lossless`` rows of other coders with ``coder`` while the queue is
        empty (``codec.recompress``, :mod:`latentpacs.recompress`).

    Raises
    ------
    ConfigError
        When no stream coder is called ``coder``.
    """

    def __init__(self, archive: Archive, engines: EnginePool, coder: str, *,
                 recompress: bool = True) -> None:
        self.archive = archive
        self.engines = engines
        self.coder = get_coder(coder).name
        self.recompress = recompress
        #: Rows to recompress, listed a page at a time from after ``_scan_after``.
        self._candidates: deque[StreamRow] = deque()
        self._scan_after = 0
        #: When (time.monotonic) the next scan for rows to recompress may start.
        self._scan_at = 0.0
        #: Whether the last scan found nothing left to recompress.
        self._scan_clean = False
        #: Rows whose recompression failed for good (a damaged stream): not tried again.
        self._given_up: set[int] = set()
        #: Whether the worker is recompressing a row (or scanning for one) now.
        self._recompressing = False
        #: Rows recompressed since start.
        self.recompressed = 0
        self._queue: deque[int] = deque()
        self._queued: set[int] = set()
        #: Rows whose coding met an unavailable archive, to be queued again.
        self._retry: set[int] = set()
        self._wake = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread: threading.Thread | None = None
        #: Rows coded, and rows whose coding failed (kept as received), since start.
        self.coded = 0
        self.failed = 0

    def start(self) -> None:
        """Queue every pending row of the archive and start the worker thread."""
        after = 0
        while ids := self.archive.pending(after=after):
            for instance_id in ids:
                self.submit(instance_id)
            after = ids[-1]
        self._thread = threading.Thread(target=self._run, name="latentpacs-deferred", daemon=True)
        self._thread.start()
        if self._queued:
            logger.info("deferred coding: %d instance(s) pending from before", len(self._queued))

    def submit(self, instance_id: int) -> None:
        """Queue one row for coding (ignored when it is queued already).

        The archive has just committed a store, so rows whose coding met it unavailable
        are queued again too.
        """
        with self._wake:
            self._requeue_retries()
            self._enqueue(instance_id)
            self._wake.notify()

    def _enqueue(self, instance_id: int) -> None:
        if instance_id not in self._queued:
            self._queued.add(instance_id)
            self._queue.append(instance_id)

    def _requeue_retries(self) -> None:
        """Queue the rows to retry again (the caller holds ``self._wake``)."""
        for instance_id in sorted(self._retry):
            self._enqueue(instance_id)
        self._retry.clear()

    def pending(self) -> int:
        """Rows queued or being coded in this process."""
        with self._wake:
            return len(self._queue) + int(self._busy)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the queue is empty and nothing is being coded; False on timeout."""
        with self._wake:
            return self._wake.wait_for(lambda: not self._queue and not self._busy, timeout)

    def wait_recompressed(self, timeout: float) -> bool:
        """Wait until a scan found nothing left to recompress and the worker is idle.

        True at once when recompression is off; False on timeout.
        """
        with self._wake:
            return self._wake.wait_for(
                lambda: not self.recompress or (
                    self._scan_clean and not self._candidates and not self._queue
                    and not self._busy and not self._recompressing), timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the row being coded (the others stay pending in the archive)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _recompress_due(self) -> bool:
        """Whether an idle worker has a row to recompress or a scan to run (holding the lock)."""
        return self.recompress and (bool(self._candidates) or time.monotonic() >= self._scan_at)

    def _idle_timeout(self) -> float | None:
        """How long an idle worker may sleep: until a retry or the next scan is due."""
        waits = [RETRY_S] if self._retry else []
        if self.recompress:
            waits.append(max(self._scan_at - time.monotonic(), 0.0))
        return min(waits) if waits else None

    def _run(self) -> None:
        _lower_priority()
        while True:
            with self._wake:
                if not self._queue and not self._stopping and not self._recompress_due():
                    if not self._wake.wait_for(lambda: self._queue or self._stopping,
                                               timeout=self._idle_timeout()):
                        self._requeue_retries()  # waited: rows to retry, or a scan is due
                        continue
                if self._stopping:
                    return
                if not self._queue:  # idle: recompress one row (pending images come first)
                    self._recompressing = True
                    instance_id = None
                else:
                    instance_id = self._queue.popleft()
                    self._busy = True
            if instance_id is None:
                try:
                    self._recompress_next()
                finally:
                    with self._wake:
                        self._recompressing = False
                        self._wake.notify_all()
                continue
            retry = False
            try:
                done = code_one(self.archive, self.engines, self.coder, instance_id)
            except LatentPacsError as exc:
                self.failed += 1
                metrics.coding_failed()
                unavailable = (isinstance(exc, ArchiveError)
                               and exc.status == Status.OUT_OF_RESOURCES)
                logger.warning("deferred coding of archive row %d failed, kept as received%s: %s",
                               instance_id, ", to be tried again" if unavailable else "",
                               exc.message)
                retry = unavailable
            except Exception:
                self.failed += 1
                metrics.coding_failed()
                logger.exception("deferred coding of archive row %d failed, kept as received",
                                 instance_id)
            else:
                self.coded += int(done)
            finally:
                with self._wake:
                    self._queued.discard(instance_id)
                    if retry:
                        self._retry.add(instance_id)
                    self._busy = False
                    self._wake.notify_all()

    def _recompress_next(self) -> None:
        """Recompress the next candidate row, listing the next page of them when none is left.

        A failure is logged and the row left as it is: a row that met an unavailable
        archive (A700) is tried again at the next scan, any other failure (a damaged
        stream, named in the log) not again in this process's life.
        """
        if not self._candidates:
            try:
                rows = self.archive.streams_not_by(
                    self.coder, get_coder(self.coder).version, after=self._scan_after,
                    tiers=recompress.RECOMPRESSED_TIERS)
            except Exception as exc:  # the worker must live on to code what is stored
                logger.warning("recompression scan failed, tried again in %.0f s: %s", RETRY_S,
                               exc.message if isinstance(exc, LatentPacsError) else repr(exc))
                with self._wake:
                    self._scan_at = time.monotonic() + RETRY_S
                return
            with self._wake:
                if not rows:
                    self._scan_after, self._scan_clean = 0, True
                    self._scan_at = time.monotonic() + RESCAN_S
                    return
                self._scan_after = rows[-1].instance_id
                self._scan_clean = False
                self._candidates.extend(row for row in rows
                                        if row.instance_id not in self._given_up)
                if not self._candidates:
                    return
        with self._wake:
            if not self._candidates:
                return
            row = self._candidates.popleft()
        try:
            outcome = recompress.recompress_one(self.archive, self.coder, row)
        except LatentPacsError as exc:
            unavailable = isinstance(exc, ArchiveError) and exc.status == Status.OUT_OF_RESOURCES
            if not unavailable:
                self._given_up.add(row.instance_id)
            logger.warning("recompression of archive row %d failed, left as it is%s: %s",
                           row.instance_id, ", to be tried again" if unavailable else "",
                           exc.message)
        except Exception:
            self._given_up.add(row.instance_id)
            logger.exception("recompression of archive row %d failed, left as it is",
                             row.instance_id)
        else:
            self.recompressed += int(outcome.result is recompress.Result.RECOMPRESSED)
            if outcome.reason in (recompress.SKIP_NO_CHECKSUM, recompress.SKIP_NOT_SMALLER):
                self._given_up.add(row.instance_id)  # it stays so: not tried again


def code_one(archive: Archive, engines: EnginePool, coder: str, instance_id: int) -> bool:
    """Code one row archived as received; returns whether its stream was swapped in.

    Nothing is changed when the row is gone (replaced, say) or no longer pending.

    Raises
    ------
    LatentPacsError
        When the object as received cannot be coded (it stays as it is).
    """
    try:
        archived = archive.load(instance_id)
    except NotFoundError:
        return False
    if archived.stream_coder != RECEIVED:
        return False
    record = ImageRecord.from_archived(archived)
    try:
        ds = dcmread(BytesIO(archived.stream))
    except Exception as exc:
        raise InvalidDicomError(f"the object as received cannot be read: {exc}") from exc
    (coded,) = chain.encode([ds], engines, record.tier, coder)
    expected = hashlib.sha256(archived.stream).hexdigest()
    done = archive.recode(instance_id, expected, coded.to_archived())
    if done:
        metrics.recoded(str(coded.tier), coded.archived_bytes)
        logger.info("coded archive row %d (%s, ratio %.2f)", instance_id, coded.stream_coder,
                    coded.ratio)
    return done


def code_all(archive: Archive, engines: EnginePool, coder: str,
             on_done: Callable[[int, str | None], None] | None = None) -> tuple[int, int]:
    """Code every pending row in the foreground (``latentpacs archive code-pending``).

    Returns (coded, failed); ``on_done`` gets each row id with its error or None.
    """
    coded = failed = 0
    after = 0
    while ids := archive.pending(after=after):
        for instance_id in ids:
            try:
                coded += int(code_one(archive, engines, coder, instance_id))
                error = None
            except LatentPacsError as exc:
                failed += 1
                error = exc.message
            if on_done is not None:
                on_done(instance_id, error)
        after = ids[-1]
    return coded, failed


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: a thread is a task with its own nice)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + NICE_INCREMENT)
    except (AttributeError, OSError) as exc:
        logger.debug("deferred coder keeps its CPU priority: %s", exc)
