"""Deferred recompression: archived streams re-coded with the configured coder, then swapped.

Archives re-code what they hold when a better coder arrives (issue 13: JPEG-LS rows once
``codec.coder = "learned"``). A row is recompressed only at the ``lossless`` tier, and
only when the new stream is proven to give back exactly what the archive promised:

1. read the current stream (the archive checks its SHA-256 as it reads it);
2. decode it with the coder it names and check the cells against the archived pixel
   checksum (``pixel_sha256``, PS3.5 8.1.1 cells, every bit): a damaged stream is
   refused and named, never re-coded into a "valid" stream of the wrong pixels;
3. code those cells with the new coder (NEAR = 0, at Bits Stored, or Bits Allocated when
   bits above High Bit are set, as :func:`latentpacs.image.chain.encode` does);
4. decode the new stream and check it gives the same checksum;
5. keep the old stream when the new one is not smaller (unless asked to swap anyway:
   ``archive recompress --even-if-larger``), so recompression never grows the archive;
6. swap it in with :meth:`latentpacs.archive.Archive.restream`: one transaction that
   succeeds only while the row still names the old stream (compare-and-swap on its
   SHA-256); the old stream is deleted after the commit.

A crash at any point (SIGKILL included) leaves the row naming one valid stream, the old
or the new; a blob written for a swap that never committed is named by no row, counted
nowhere, and removed by the next :meth:`~latentpacs.archive.Archive.sweep`.

``near-lossless:K`` rows are never recompressed and are counted as skipped. Their
returned pixels are a derived object whose SOP Instance UID is already handed out
(PS3.3 C.7.6.1.1.5; DESIGN.md "One derived UID, one content"): re-coding the old
stream's values at NEAR = K again would put a second error of up to K on top of the
first (up to 2K from the original), and re-coding from the original would change the
pixels behind that UID; and the original itself is gone, since only ``lossless`` images
are ever archived as received (:func:`latentpacs.image.chain.defers`), and those are
coded with the configured coder anyway. Rows of the ``latent`` tier have no stream.

Two callers: ``latentpacs archive recompress`` (:func:`recompress_rows`, in the
foreground, with a progress bar) and the node's background coder
(:class:`latentpacs.deferred.DeferredCoder`), which recompresses when its queue of
images archived as received is empty.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from latentpacs.archive import Archive, StreamRow
from latentpacs.codec.streams import StreamCoder, get_coder
from latentpacs.codec.tiers import Tier, TierKind
from latentpacs.errors import LatentFormatError, LatentPacsError, NotFoundError, PixelChecksumError
from latentpacs.image import chain
from latentpacs.image.pixels import PixelModule, cells_sha256
from latentpacs.image.record import ImageRecord

logger = logging.getLogger(__name__)

#: The only tier whose rows are recompressed (see the module docstring).
RECOMPRESSED_TIERS = (str(Tier(TierKind.LOSSLESS)),)

#: Why a row was skipped (the CLI counts each reason).
SKIP_NEAR_LOSSLESS = "near-lossless (the original is not kept; re-coding would add error)"
SKIP_NO_STREAM = "no stream (latent tier)"
SKIP_NO_CHECKSUM = "no archived pixel checksum to verify against"
SKIP_DONE = "already coded by the target coder"
SKIP_CHANGED = "changed meanwhile (replaced, or coded by another process)"
SKIP_NOT_SMALLER = "the new stream is not smaller (the old one is kept)"


class Result(StrEnum):
    """What :func:`recompress_one` did with one row."""

    RECOMPRESSED = "recompressed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Outcome:
    """One row's recompression: ``result``, the stream bytes before and after, and why skipped."""

    row: StreamRow
    result: Result
    bytes_before: int = 0
    bytes_after: int = 0
    reason: str = ""


@dataclass
class Summary:
    """What :func:`recompress_rows` did: counts, bytes of the recompressed rows, skip reasons."""

    recompressed: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def saved_bytes(self) -> int:
        """Stream bytes the recompressed rows no longer take."""
        return self.bytes_before - self.bytes_after


def candidates(archive: Archive, coder: str, *, tiers: tuple[str, ...] | None = None
               ) -> Iterator[StreamRow]:
    """Every row whose stream another coder (or version) than ``coder`` wrote, in row order.

    ``tiers=None`` lists rows of every stream tier (near-lossless ones are then skipped
    and counted); the background coder asks for :data:`RECOMPRESSED_TIERS` only.

    Raises
    ------
    ConfigError
        When no stream coder is called ``coder``.
    ArchiveError
        When the database fails.
    """
    target = get_coder(coder)
    after = 0
    while rows := archive.streams_not_by(target.name, target.version, after=after, tiers=tiers):
        yield from rows
        after = rows[-1].instance_id


def recompress_one(archive: Archive, coder: str, row: StreamRow, *,
                   only_smaller: bool = True) -> Outcome:
    """Recompress one row with ``coder`` (the steps of the module docstring).

    ``only_smaller``: keep the old stream when the verified new one is not smaller
    (skipped, with both sizes in the outcome).

    Raises
    ------
    StreamHashError
        When the stored stream no longer matches its SHA-256 (nothing is changed).
    PixelChecksumError
        When the old stream does not decode to the archived pixels, or the new one does
        not give them back exactly (nothing is changed).
    LatentPacsError
        When a coder fails, or the archive is unavailable (A700; the row is unchanged).
    """
    target = get_coder(coder)
    tier = Tier.parse(row.tier)
    if not tier.has_stream:
        return Outcome(row, Result.SKIPPED, reason=SKIP_NO_STREAM)
    if tier.near:
        return Outcome(row, Result.SKIPPED, reason=SKIP_NEAR_LOSSLESS)
    try:
        archived = archive.load(row.instance_id)
    except NotFoundError:
        return Outcome(row, Result.SKIPPED, reason=SKIP_CHANGED)
    if (archived.stream_coder, archived.stream_coder_version) == (target.name, target.version):
        return Outcome(row, Result.SKIPPED, reason=SKIP_DONE)
    if (archived.stream_coder, archived.stream_coder_version) != (row.coder, row.coder_version) \
            or archived.tier != row.tier:
        return Outcome(row, Result.SKIPPED, reason=SKIP_CHANGED)
    if not archived.pixel_sha256:
        return Outcome(row, Result.SKIPPED, reason=SKIP_NO_CHECKSUM)
    record = ImageRecord.from_archived(archived)
    cells = _verified_cells(record)
    stream = _exact_stream(target, cells, record.module, record.pixel_sha256)
    if only_smaller and len(stream) >= len(archived.stream):
        return Outcome(row, Result.SKIPPED, len(archived.stream), len(stream),
                       reason=SKIP_NOT_SMALLER)
    old_sha256 = hashlib.sha256(archived.stream).hexdigest()
    if not archive.restream(row.instance_id, old_sha256, stream, coder=target.name,
                            coder_version=target.version):
        return Outcome(row, Result.SKIPPED, reason=SKIP_CHANGED)
    logger.info("recompressed archive row %d: %s v%d %d bytes -> %s v%d %d bytes",
                row.instance_id, row.coder, row.coder_version, len(archived.stream),
                target.name, target.version, len(stream))
    return Outcome(row, Result.RECOMPRESSED, len(archived.stream), len(stream))


def recompress_rows(archive: Archive, coder: str, rows: Iterable[StreamRow], *,
                    on_done: Callable[[StreamRow, Outcome | None, str | None], None] | None = None,
                    only_smaller: bool = True) -> Summary:
    """Recompress ``rows`` (from :func:`candidates`) one at a time, in the foreground.

    A row that fails is left as it is and counted; ``on_done`` gets each row with its
    outcome, or None and the error message. ``only_smaller``: see :func:`recompress_one`.
    """
    summary = Summary()
    for row in rows:
        outcome: Outcome | None = None
        error: str | None = None
        try:
            outcome = recompress_one(archive, coder, row, only_smaller=only_smaller)
        except LatentPacsError as exc:
            summary.failed += 1
            error = exc.message
            logger.warning("recompression of archive row %d failed, left as it is: %s",
                           row.instance_id, exc.message)
        else:
            if outcome.result is Result.RECOMPRESSED:
                summary.recompressed += 1
                summary.bytes_before += outcome.bytes_before
                summary.bytes_after += outcome.bytes_after
            else:
                summary.skipped += 1
                summary.skip_reasons[outcome.reason] = summary.skip_reasons.get(outcome.reason, 0) + 1
        if on_done is not None:
            on_done(row, outcome, error)
    return summary


def _verified_cells(record: ImageRecord) -> np.ndarray:
    """The cells the old stream decodes to, checked against the archived pixel checksum."""
    try:
        cells = chain.decode(record, None)  # checks the stream's returned_sha256 too
    except LatentPacsError:
        raise
    except Exception as exc:  # a coder's own exception on a stream it cannot read
        raise LatentFormatError(f"the {record.stream_coder} stream cannot be decoded: {exc}") from exc
    if cells_sha256(cells, record.module) != record.pixel_sha256:
        raise PixelChecksumError(
            f"the {record.stream_coder} stream does not decode to the archived pixels")
    return cells


def _exact_stream(coder: StreamCoder, cells: np.ndarray, module: PixelModule,
                  pixel_sha256: str) -> bytes:
    """:func:`latentpacs.image.chain.lossless_stream`, a coder's own failure named."""
    try:
        return chain.lossless_stream(coder, cells, module, pixel_sha256)
    except PixelChecksumError as exc:
        raise PixelChecksumError(f"{exc}; not swapped") from exc
    except LatentPacsError:
        raise
    except Exception as exc:
        raise LatentFormatError(f"the {coder.name} coder failed: {exc}") from exc
