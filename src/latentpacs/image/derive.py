"""Build the DICOM object a retrieval returns from the archived header and decoded pixels.

A lossy reconstruction is a new, derived instance (PS3.3 C.7.6.1.1.5 Lossy Image
Compression, C.7.6.1.1.3 Derivation Description, C.7.6.1.1.4 Source Image Sequence;
PS3.16 CID 7202 / CID 7203 codes): it gets new SOP Instance and Series Instance UIDs,
Image Type DERIVED\\SECONDARY, Lossy Image Compression 01 with ratio and method, a
Derivation Description and Derivation Code Sequence (DCM 113040 "Lossy Compression"),
and a Source Image Sequence pointing at the original (DCM 121320 "Uncompressed
predecessor"). The lossless tier returns the original identity unchanged.

Derived UIDs are deterministic (PS3.5 B.2, UUID-derived ``2.25.`` UIDs from a name-based
UUID): the same original, model and tier always give the same UIDs, so a C-FIND and a
later C-GET agree and re-sending an image never multiplies it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, ExplicitVRLittleEndian

from latentpacs import __version__
from latentpacs.codec.tiers import Tier
from latentpacs.image.pixels import PixelModule, set_pixels
from latentpacs.uid import uid_from_name

#: Namespace of latentpacs' name-based UUIDs (a fixed random UUID; never change it:
#: derived UIDs already handed out depend on it).
UID_NAMESPACE = uuid.UUID("5d0c7d5e-8a57-4b8e-9a0b-2f1f3c6f4a11")

#: Lossy Image Compression Method (0028,2114) for the latent tier. PS3.3 C.7.6.1.1.5.1
#: defines terms for classic codecs only; this is latentpacs' own term, documented in the
#: README's conformance statement.
METHOD_LATENT = "LP_LATENT_AE"
#: The near-lossless tier returns exactly what JPEG-LS near-lossless coding gives.
METHOD_NEAR_LOSSLESS = "ISO_14495_1"

#: Derivation Code (PS3.16 CID 7203) and Purposes of Reference (CID 7202) of derived
#: objects, from pydicom's copy of the PS3.16 code dictionary.
LOSSY_COMPRESSION: Code = codes.DCM.LossyCompression  # DCM 113040
UNCOMPRESSED_PREDECESSOR: Code = codes.DCM.UncompressedPredecessor  # DCM 121320
LOSSY_COMPRESSED_PREDECESSOR: Code = codes.DCM.LossyCompressedPredecessor  # DCM 121330

IMPLEMENTATION_VERSION_NAME = f"LATENTPACS_{__version__}".replace(".", "")[:16]
#: Implementation Class UID (PS3.7 D.3.3.2) of latentpacs, one per release.
IMPLEMENTATION_CLASS_UID = uid_from_name(UID_NAMESPACE, "implementation", __version__, separator="|")


@dataclass(frozen=True)
class Derivation:
    """How a returned object was made.

    Parameters
    ----------
    model_name:
        The registry name of the model that decoded the latent (e.g. ``ae``).
    model_sha256:
        The SHA-256 of that model's weights file: the model's identity.
    tier:
        The fidelity tier the image was archived at.
    ratio:
        Lossy Image Compression Ratio: original stored bytes over archived bytes.
    arrival_method:
        The Lossy Image Compression Method of the lossy transfer syntax the original
        arrived in (PS3.3 C.7.6.1.1.5.1), or None.
    arrival_ratio:
        The compression ratio of that arrival step (uncompressed over received bytes).
    lossy_predecessor:
        The original had already lost information (a lossy transfer syntax or Lossy
        Image Compression 01): the returned object then says so even at ``lossless``, and
        a derived object names its source as a lossy compressed predecessor (DCM 121330).
    """

    model_name: str
    model_sha256: str
    tier: Tier
    ratio: float
    arrival_method: str | None = None
    arrival_ratio: float = 1.0
    lossy_predecessor: bool = False


def derived_uid(original_uid: str, role: str, *parts: str) -> str:
    """Return the deterministic ``2.25.`` UID derived from ``original_uid`` (PS3.5 B.2).

    Parameters
    ----------
    original_uid:
        The UID of the original entity (SOP Instance or Series Instance UID).
    role:
        What the new UID identifies (``"sop"`` or ``"series"``) so the two never collide.
    *parts:
        Further distinguishing names: model SHA-256, tier, SOP Class UID.
    """
    return uid_from_name(UID_NAMESPACE, role, original_uid, *parts, separator="|")


def derived_identity(header: Dataset, derivation: Derivation) -> tuple[str, str]:
    """Return the (SOP Instance UID, Series Instance UID) a retrieval of ``header`` delivers.

    The lossless tier keeps the original UIDs; the lossy tiers derive new ones from the
    original UID, the model's SHA-256, the tier and the SOP Class (so For Presentation and
    For Processing images always land in separate series).
    """
    if not derivation.tier.lossy:
        return str(header.SOPInstanceUID), str(header.SeriesInstanceUID)
    keys = (derivation.model_sha256, str(derivation.tier), str(header.SOPClassUID))
    return (
        derived_uid(str(header.SOPInstanceUID), "sop", *keys),
        derived_uid(str(header.SeriesInstanceUID), "series", *keys),
    )


def _code_item(code: Code) -> Dataset:
    """A Code Sequence item (PS3.3 Table 8.8-1a basic coded entry attributes) of ``code``."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _as_list(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def _format_ratio(ratio: float) -> str:
    """Format a ratio as a Decimal String of at most 16 characters (PS3.5 6.2)."""
    text = f"{ratio:.6g}" if ratio < 1e6 else f"{ratio:.0f}"
    return text[:16]


def compression_history(header: Dataset, derivation: Derivation) -> tuple[list[str], list[str]]:
    """Lossy Image Compression Ratio and Method values before this node's own step.

    The header's values, plus the arrival step when the original arrived in a lossy
    transfer syntax that the header does not already name last (PS3.3 C.7.6.1.1.5.2: one
    value per successive lossy compression).
    """
    ratios = _as_list(header.get("LossyImageCompressionRatio"))
    methods = _as_list(header.get("LossyImageCompressionMethod"))
    method = derivation.arrival_method
    if method is not None and (not methods or methods[-1] != method):
        ratios.append(_format_ratio(derivation.arrival_ratio))
        methods.append(method)
    return ratios, methods


def lossy_attributes(
    header: Dataset,
    *,
    sop_uid: str,
    series_uid: str,
    method: str,
    ratio: float,
    description: str,
    history: tuple[list[str], list[str]] | None = None,
    lossy_predecessor: bool = False,
) -> Dataset:
    """The identity and lossy-compression attributes of a derived object (PS3.3 C.7.6.1.1.3-5).

    New SOP Instance and Series Instance UIDs, Lossy Image Compression 01 with this step's
    ratio and method appended to any earlier ones (C.7.6.1.1.5.2; ``history`` gives them,
    else the header's), Image Type DERIVED\\SECONDARY, the Derivation Description and Code
    Sequence (DCM 113040), and a Source Image Sequence naming ``header``'s instance as its
    uncompressed predecessor (DCM 121320), or as a lossy compressed predecessor (DCM 121330)
    when ``lossy_predecessor``.
    """
    ratios, methods = history if history is not None else (
        _as_list(header.get("LossyImageCompressionRatio")),
        _as_list(header.get("LossyImageCompressionMethod")),
    )
    ds = Dataset()
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*ratios, _format_ratio(ratio)]
    ds.LossyImageCompressionMethod = [*methods, method]
    ds.ImageType = ["DERIVED", "SECONDARY", *_as_list(header.get("ImageType"))[2:]]
    ds.DerivationDescription = description[:1024]
    ds.DerivationCodeSequence = [_code_item(LOSSY_COMPRESSION)]
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    purpose = _code_item(LOSSY_COMPRESSED_PREDECESSOR if lossy_predecessor else UNCOMPRESSED_PREDECESSOR)
    source.PurposeOfReferenceCodeSequence = [purpose]
    ds.SourceImageSequence = [source]
    return ds


def returned_overrides(header: Dataset, derivation: Derivation) -> Dataset:
    """The attributes a retrieval returns differently from the archived header.

    For ``lossless`` nothing, unless the original was already lossy: then Lossy Image
    Compression 01 with its ratio and method; for the lossy tiers the derived identity and the lossy
    compression and derivation attributes (:func:`lossy_attributes`). The archive keeps
    this beside the original header, so C-FIND shows exactly the identity C-GET delivers.
    """
    history = compression_history(header, derivation)
    if not derivation.tier.lossy:
        kept = Dataset()
        if derivation.lossy_predecessor:
            # The original UIDs and pixels, but an honest header (PS3.3 C.7.6.1.1.5).
            kept.LossyImageCompression = "01"
            ratios, methods = history
            if ratios:
                kept.LossyImageCompressionRatio = ratios
            if methods:
                kept.LossyImageCompressionMethod = methods
        return kept
    sop_uid, series_uid = derived_identity(header, derivation)
    if derivation.tier.name == "latent":
        method, how = METHOD_LATENT, "reconstructed from a learned latent"
    else:
        method = METHOD_NEAR_LOSSLESS
        how = f"JPEG-LS near-lossless, max error {derivation.tier.near}"
    description = (
        f"latentpacs {how}; model {derivation.model_name} "
        f"sha256 {derivation.model_sha256[:16]}; tier {derivation.tier}; "
        f"ratio {_format_ratio(derivation.ratio)}:1"
    )
    return lossy_attributes(
        header,
        sop_uid=sop_uid,
        series_uid=series_uid,
        method=method,
        ratio=derivation.ratio,
        description=description,
        history=history,
        lossy_predecessor=derivation.lossy_predecessor,
    )


def file_meta(ds: Dataset, transfer_syntax: str) -> FileMetaDataset:
    """The File Meta Information of ``ds`` written by latentpacs (PS3.10 7.1)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def build_returned(
    header: Dataset, stored: np.ndarray, module: PixelModule, derivation: Derivation
) -> Dataset:
    """Build the object a retrieval returns (PS3.10 ready, Explicit VR Little Endian).

    Parameters
    ----------
    header:
        The archived original data set without Pixel Data; it is not modified.
    stored:
        The pixel values to return, uint16 (rows, cols), already in the original
        photometric interpretation and Bits Stored.
    module:
        The original Image Pixel module (PS3.3 C.7.6.3).
    derivation:
        Model, tier and ratio; for ``lossless`` only the pixels are set.
    """
    return assemble(header, returned_overrides(header, derivation), stored, module)


def assemble(header: Dataset, overrides: Dataset, stored: np.ndarray, module: PixelModule) -> Dataset:
    """The archived header updated with ``overrides``, with pixels and File Meta (PS3.10 7.1).

    The node calls this with the overrides archived at store time, so a C-GET delivers
    exactly the identity a C-FIND showed.
    """
    ds = Dataset()
    ds.update(header)
    ds.update(overrides)
    ds.file_meta = file_meta(ds, ExplicitVRLittleEndian)
    set_pixels(ds, stored, module)
    return ds


def assemble_encapsulated(
    header: Dataset, overrides: Dataset, stream: bytes, module: PixelModule, transfer_syntax: str
) -> Dataset:
    """Like :func:`assemble`, but with an archived codestream as encapsulated Pixel Data.

    ``stream`` is one frame's JPEG-LS codestream (PS3.5 A.4.3) of the stored values, sent
    as archived with ``transfer_syntax`` (JPEG-LS Lossless or Near-Lossless), so a peer that
    accepts it gets the pixels without a decode and in a fraction of the bytes.
    """
    ds = Dataset()
    ds.update(header)
    ds.update(overrides)
    ds.file_meta = file_meta(ds, transfer_syntax)
    module.apply_to(ds)
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds
