"""The one image record: what latentpacs keeps of one image, in the archive and in a ``.lpz``.

An :class:`ImageRecord` is made once, by :func:`latentpacs.image.chain.encode`, and read
back by :func:`latentpacs.image.chain.returned`. The archive stores it as an
:class:`~latentpacs.archive.records.ArchivedImage` row (:meth:`ImageRecord.to_archived`,
:meth:`ImageRecord.from_archived`: the one conversion each way), and ``.lpz`` files
serialise the same fields, so a file and a C-GET of the same image give the same pixels
and the same derived identity (PS3.3 C.7.6.1.1.5: the overrides are computed once, at
encode, and kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from latentpacs.codec.tiers import Tier
from latentpacs.dicomjson import dataset_from_json
from latentpacs.image.pixels import PixelModule

if TYPE_CHECKING:
    from latentpacs.archive.records import ArchivedImage


@dataclass(frozen=True)
class ModelRef:
    """The model a latent was made with; ``sha256`` (of its weights file) is its identity."""

    name: str
    sha256: str
    arch: str
    latent_dim: int
    latent_bits: int


@dataclass(frozen=True)
class ImageRecord:
    """One image as latentpacs keeps it.

    Parameters
    ----------
    tier:
        The fidelity tier it was archived at.
    model_sha256:
        SHA-256 of the weights file of the model that made ``latent`` (its identity).
    module:
        The original Image Pixel module (PS3.3 C.7.6.3).
    original_transfer_syntax:
        The Transfer Syntax UID the image arrived in (PS3.5 Section 10).
    original_stored_bytes:
        Size of the Pixel Data as it arrived (the numerator of the compression ratio).
    header:
        The original data set without Pixel Data, as DICOM JSON (PS3.18 F.2).
    overrides:
        DICOM JSON of what a retrieval returns differently (derived identity, lossy
        attributes; PS3.3 C.7.6.1.1.3-5), computed once at encode.
    latent:
        The quantised latent bytes.
    stream:
        The tier's stream (``b""`` for ``latent``): the pixel cells as sent for
        ``lossless`` (unused high bits included), the stored values for ``near-lossless``.
    stream_coder, stream_coder_version:
        The coder that wrote ``stream`` (:mod:`latentpacs.codec.streams`) and its format.
    pixel_sha256:
        SHA-256 of the original pixel cells (:func:`~latentpacs.image.pixels.cells_sha256`).
    returned_sha256:
        SHA-256 of the cells the stream decodes to, checked at encode and on every decode
        of the stream; ``""`` for the latent tier.
    lossy_on_arrival:
        The original had already lost information (:func:`~latentpacs.image.pixels.lossy_on_arrival`).
    model:
        The full reference of the model, when known (encode, ``.lpz``); the archive keeps
        only the hash in the row and the card in its models table.
    """

    tier: Tier
    model_sha256: str
    module: PixelModule
    original_transfer_syntax: str
    original_stored_bytes: int
    header: dict[str, Any]
    overrides: dict[str, Any]
    latent: bytes
    stream: bytes
    stream_coder: str = ""
    stream_coder_version: int = 0
    pixel_sha256: str = ""
    returned_sha256: str = ""
    lossy_on_arrival: bool = False
    model: ModelRef | None = field(default=None, compare=False)

    @property
    def archived_bytes(self) -> int:
        """Bytes that carry the image: latent plus stream."""
        return len(self.latent) + len(self.stream)

    @property
    def ratio(self) -> float:
        """Original stored bytes over archived bytes (Lossy Image Compression Ratio)."""
        return self.original_stored_bytes / max(self.archived_bytes, 1)

    def dataset_header(self) -> Dataset:
        """The archived header as a pydicom Dataset."""
        return dataset_from_json(self.header)

    def dataset_overrides(self) -> Dataset:
        """The archived overrides as a pydicom Dataset."""
        return dataset_from_json(self.overrides)

    def to_archived(self) -> ArchivedImage:
        """The archive's row type for this record."""
        from latentpacs.archive.records import ArchivedImage

        module = self.module
        return ArchivedImage(
            header=self.header, overrides=self.overrides, tier=str(self.tier),
            model_sha256=self.model_sha256, latent=self.latent, stream=self.stream,
            rows=module.rows, columns=module.columns, bits_allocated=module.bits_allocated,
            bits_stored=module.bits_stored, high_bit=module.high_bit,
            photometric_interpretation=module.photometric_interpretation,
            original_transfer_syntax=self.original_transfer_syntax,
            original_stored_bytes=self.original_stored_bytes,
            pixel_sha256=self.pixel_sha256, returned_sha256=self.returned_sha256,
            lossy_on_arrival=self.lossy_on_arrival, stream_coder=self.stream_coder,
            stream_coder_version=self.stream_coder_version,
        )

    @classmethod
    def from_archived(cls, archived: ArchivedImage) -> ImageRecord:
        """The record an archive row holds."""
        return cls(
            tier=Tier.parse(archived.tier),
            model_sha256=archived.model_sha256,
            module=PixelModule(
                rows=archived.rows, columns=archived.columns,
                bits_allocated=archived.bits_allocated, bits_stored=archived.bits_stored,
                high_bit=archived.high_bit,
                photometric_interpretation=archived.photometric_interpretation,
            ),
            original_transfer_syntax=archived.original_transfer_syntax,
            original_stored_bytes=archived.original_stored_bytes,
            header=archived.header, overrides=archived.overrides, latent=archived.latent,
            stream=archived.stream, stream_coder=archived.stream_coder,
            stream_coder_version=archived.stream_coder_version,
            pixel_sha256=archived.pixel_sha256, returned_sha256=archived.returned_sha256,
            lossy_on_arrival=archived.lossy_on_arrival,
        )
