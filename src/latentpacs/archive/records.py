"""What the archive stores and reports: one archived image, and the archive's figures.

An :class:`ArchivedImage` is the unit of one C-STORE (PS3.4 B.2): the sender's data set
without Pixel Data (PS3.3 C.7.6.3) as DICOM JSON (PS3.18 F.2), the attributes a retrieval
returns differently (derived identity, PS3.3 C.7.6.1.1.5 Lossy Image Compression), the
latent and stream bytes of its fidelity tier, and the Image Pixel module figures a
decoder needs to rebuild the original matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from latentpacs.codec.tiers import Tier
from latentpacs.dicomjson import first_value
from latentpacs.errors import InvalidDicomError, TierError


#: DICOM JSON tags (PS3.18 F.2.1.1) of the three UIDs every archived header must carry.
SOP_INSTANCE_UID = "00080018"
SERIES_INSTANCE_UID = "0020000E"
STUDY_INSTANCE_UID = "0020000D"


@dataclass(frozen=True)
class ArchivedImage:
    """One archived SOP Instance.

    Parameters
    ----------
    header:
        The original data set without Pixel Data, as DICOM JSON (``Dataset.to_json_dict``,
        PS3.18 F.2). Its SOP Instance UID (0008,0018) identifies the instance in the archive.
    overrides:
        DICOM JSON of the attributes a retrieval returns differently (derived SOP Instance
        UID, Series Instance UID, Image Type, Lossy Image Compression, PS3.3 C.7.6.1.1.5);
        empty for the lossless tier. ``header`` updated with ``overrides`` is the *effective
        header*: what C-FIND answers show and C-GET delivers.
    tier:
        ``"latent"``, ``"lossless"`` or ``"near-lossless:K"``.
    model_sha256:
        SHA-256 (hex) of the weights file that made the latent; the model must be registered.
    latent, stream:
        The codec's bytes; ``stream`` is ``b""`` for the latent tier.
    rows, columns, bits_allocated, bits_stored, high_bit, photometric_interpretation:
        The original Image Pixel module (PS3.3 C.7.6.3).
    original_transfer_syntax:
        Transfer Syntax UID the sender used (PS3.5 Section 10).
    original_stored_bytes:
        Bytes of the Pixel Data as the sender stored it (the numerator of the ratio).
    pixel_sha256:
        SHA-256 of the original pixel cells, native little endian, every bit; ``""`` for
        rows archived before it was kept.
    returned_sha256:
        SHA-256 of the cells the stream stream decodes to; ``""`` for ``latent``.
    lossy_on_arrival:
        The pixels had already lost information when they arrived.
    stream_coder, stream_coder_version:
        The coder that wrote ``stream`` and its format version (``""``, 0 for ``latent``).
    """

    header: dict[str, Any]
    overrides: dict[str, Any]
    tier: str
    model_sha256: str
    latent: bytes
    stream: bytes
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    high_bit: int
    photometric_interpretation: str
    original_transfer_syntax: str
    original_stored_bytes: int
    pixel_sha256: str = ""
    returned_sha256: str = ""
    lossy_on_arrival: bool = False
    stream_coder: str = ""
    stream_coder_version: int = 0

    def __post_init__(self) -> None:
        # One tier grammar (codec/tiers.py, which imports no torch): the archive keeps
        # only the canonical text Tier.parse gives back, so near-lossless:999 or LATENT is refused.
        if str(Tier.parse(self.tier)) != self.tier:
            raise TierError(f"tier {self.tier!r} is not written as latent, lossless or near-lossless:K")
        for tag, name in (
            (SOP_INSTANCE_UID, "SOP Instance UID (0008,0018)"),
            (SERIES_INSTANCE_UID, "Series Instance UID (0020,000E)"),
            (STUDY_INSTANCE_UID, "Study Instance UID (0020,000D)"),
        ):
            if not first_value(self.header, tag):
                raise InvalidDicomError(f"the header has no {name}")

    @property
    def effective_header(self) -> dict[str, Any]:
        """The header a retrieval returns: ``header`` updated with ``overrides``."""
        return {**self.header, **self.overrides}

    @property
    def original_sop_instance_uid(self) -> str:
        """The SOP Instance UID the sender gave; the archive's identity of the instance."""
        return first_value(self.header, SOP_INSTANCE_UID)

    @property
    def sop_instance_uid(self) -> str:
        """The SOP Instance UID a retrieval returns (derived for lossy tiers)."""
        return first_value(self.effective_header, SOP_INSTANCE_UID)

    @property
    def archived_bytes(self) -> int:
        """Bytes the archive keeps for the pixels: latent plus stream."""
        return len(self.latent) + len(self.stream)


@dataclass(frozen=True)
class TierStats:
    """Figures of one fidelity tier.

    ``ratio`` is original Pixel Data bytes over archived bytes (latent + stream);
    0.0 when nothing is archived.
    """

    tier: str
    instances: int
    original_bytes: int
    archived_bytes: int

    @property
    def ratio(self) -> float:
        """Compression ratio achieved (original / archived)."""
        return self.original_bytes / self.archived_bytes if self.archived_bytes else 0.0


@dataclass(frozen=True)
class CoderStats:
    """Figures of the streams one coder (at one format version) wrote.

    ``native_bytes`` is what the same pixels take uncompressed (Rows x Columns x Bits
    Allocated / 8: rows x cols x 2 for a 16-bit mammogram, PS3.5 8.1.1); ``ratio`` is
    native bytes over stream bytes (0.0 when nothing is archived) and ``saved_bytes``
    their difference. The reserved coder ``received`` counts objects as received whose
    coding is pending (:mod:`latentpacs.deferred`).
    """

    coder: str
    version: int
    streams: int
    stream_bytes: int
    native_bytes: int

    @property
    def ratio(self) -> float:
        """Native bytes over stream bytes."""
        return self.native_bytes / self.stream_bytes if self.stream_bytes else 0.0

    @property
    def saved_bytes(self) -> int:
        """Native bytes minus stream bytes (negative when a stream is the larger)."""
        return self.native_bytes - self.stream_bytes


@dataclass(frozen=True)
class StreamRow:
    """One archived stream, as :meth:`latentpacs.archive.Archive.streams_not_by` lists it."""

    instance_id: int
    sop_instance_uid: str
    tier: str
    coder: str
    coder_version: int
    stream_bytes: int


@dataclass(frozen=True)
class ArchiveStats:
    """The archive's figures for ``latentpacs archive stats``.

    Entity counts follow the Query/Retrieve information model (PS3.4 C.6.1).
    """

    patients: int
    studies: int
    series: int
    instances: int
    tiers: tuple[TierStats, ...] = field(default_factory=tuple)
    #: Instances archived as received whose stream is not coded yet (:mod:`latentpacs.deferred`).
    pending: int = 0
    #: Streams per coder and version (:mod:`latentpacs.recompress` moves rows between them).
    coders: tuple[CoderStats, ...] = field(default_factory=tuple)

    @property
    def original_bytes(self) -> int:
        """Original Pixel Data bytes over all tiers."""
        return sum(tier.original_bytes for tier in self.tiers)

    @property
    def archived_bytes(self) -> int:
        """Archived bytes (latent + stream) over all tiers."""
        return sum(tier.archived_bytes for tier in self.tiers)

    @property
    def ratio(self) -> float:
        """Overall compression ratio achieved; 0.0 for an empty archive."""
        return self.original_bytes / self.archived_bytes if self.archived_bytes else 0.0
