"""Content negotiation of WADO-RS (PS3.18 8.7): the Accept header, media types, transfer syntaxes.

An Accept header (RFC 9110 12.5.1) is a list of media ranges with parameters and ``q``
weights. DICOMweb names the transfer syntax of each acceptable representation with the
``transfer-syntax`` parameter (PS3.18 8.7.3.5), on the range itself or on a
``multipart/related; type="..."`` range. These functions turn a header into what the
service needs: the transfer syntaxes a retrieval may send (as a C-GET's accepted
presentation contexts do), or the one media type a frame or rendered answer takes.
Nothing acceptable raises 406 Not Acceptable (PS3.18 8.6.1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeVar

from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UID_dictionary,
    ExplicitVRLittleEndian,
)
from starlette.exceptions import HTTPException

#: The media types of WADO-RS answers (PS3.18 8.7.3, Table 8.7.3-2, -4, -5).
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
JLS = "image/jls"
PNG = "image/png"
JPEG = "image/jpeg"
MULTIPART = "multipart/related"

#: What ``transfer-syntax=*`` sends (PS3.18 8.7.3.5.2: the origin server's choice): the
#: archived stream as it is (JPEG-LS, no decode) when the image has one, else native.
AS_ARCHIVED = frozenset({ExplicitVRLittleEndian, JPEGLSLossless, JPEGLSNearLossless})
#: Transfer syntaxes an ``application/dicom`` part can be sent in (what
#: :func:`latentpacs.image.chain.returned` produces). Implicit VR Little Endian is not a
#: DICOMweb transfer syntax (PS3.18 8.7.3.5.2, Table 8.7.3-2).
DICOM_SYNTAXES = frozenset({ExplicitVRLittleEndian, JPEGLSLossless, JPEGLSNearLossless,
                            JPEG2000Lossless, RLELossless})
#: Transfer syntaxes of ``image/jls`` frames (PS3.18 Table 8.7.3-4); the first is the default.
JLS_SYNTAXES = (JPEGLSLossless, JPEGLSNearLossless)

#: Every Storage SOP Class pydicom knows (PS3.4 B.5): the classes a retrieval's
#: (SOP Class, Transfer Syntax) pairs are offered for, as a C-GET SCU proposes contexts.
#: An instance of a class not listed is sent native, as to a peer that said nothing.
STORAGE_CLASSES = frozenset(
    uid for uid, entry in UID_dictionary.items()
    if entry[1] == "SOP Class" and "Storage" in entry[0]
)


_T = TypeVar("_T")


@dataclass(frozen=True)
class MediaRange:
    """One media range of an Accept header, lower-cased, with its parameters and weight."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def inner(self) -> str:
        """The media type of the parts: ``type`` of a multipart range, else the range itself."""
        if self.media_type == MULTIPART:
            return self.params.get("type", "*/*")
        return self.media_type


def _split(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside double quotes (RFC 9110 5.6.4)."""
    pieces: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
    pieces.append("".join(current))
    return [piece.strip() for piece in pieces if piece.strip()]


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header (RFC 9110 12.5.1); none or empty: ``*/*``.

    Raises
    ------
    HTTPException
        400 for a malformed range or ``q`` value.
    """
    ranges = []
    for text in _split(header or "*/*", ","):
        media_type, *parameters = _split(text, ";")
        if media_type.count("/") != 1:
            raise HTTPException(400, f"Accept media range {media_type!r} is malformed")
        params: dict[str, str] = {}
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"').strip()
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    raise HTTPException(400, f"Accept q value {value!r} is malformed") from None
                if not 0.0 <= q <= 1.0:
                    raise HTTPException(400, f"Accept q value {value!r} is out of 0..1")
            else:
                params[name] = value.lower() if name == "type" else value
        ranges.append(MediaRange(media_type.lower(), params, q))
    return ranges


def _matches(pattern: str, media_type: str) -> bool:
    """Whether the media range ``pattern`` (``*/*``, ``image/*``, exact) covers ``media_type``."""
    if pattern in ("*/*", "*"):
        return True
    kind, _, sub = pattern.partition("/")
    return sub == "*" and media_type.startswith(kind + "/") or pattern == media_type


def _not_acceptable(header: str | None, what: str) -> HTTPException:
    return HTTPException(406, f"Accept {header or '*/*'!r} names no representation of {what} "
                         "latentpacs can send")


def _best(candidates: Iterable[tuple[float, int, _T]]) -> list[_T]:
    """The choices of the highest weight, in header order."""
    ranked = sorted(candidates, key=lambda c: (-c[0], c[1]))
    if not ranked:
        return []
    return [choice for q, _, choice in ranked if q == ranked[0][0]]


def dicom_syntaxes(header: str | None) -> frozenset[str]:
    """The transfer syntaxes an ``application/dicom`` retrieval may send (PS3.18 8.7.3.5.2).

    Per acceptable range: no ``transfer-syntax`` means Explicit VR Little Endian (the
    default, PS3.18 8.7.3.5.2), ``*`` means :data:`AS_ARCHIVED`, a UID itself when
    latentpacs can produce it (:data:`DICOM_SYNTAXES`). The syntaxes of the ranges of the
    highest ``q`` are returned together: the service then prefers, as for a C-GET, the
    archived stream, then native, then coding losslessly.

    Raises
    ------
    HTTPException
        406 when no range is acceptable and producible.
    """
    candidates: list[tuple[float, int, frozenset[str]]] = []
    for index, media in enumerate(parse_accept(header)):
        if media.q <= 0:
            continue
        if media.media_type == MULTIPART:
            acceptable = _matches(media.inner, DICOM)
        else:  # application/dicom itself, or a wildcard covering it or multipart/related
            acceptable = _matches(media.media_type, DICOM) or media.media_type == "multipart/*"
        if not acceptable:
            continue
        syntax = media.params.get("transfer-syntax")
        if syntax is None:
            chosen: frozenset[str] = frozenset({ExplicitVRLittleEndian})
        elif syntax == "*":
            chosen = AS_ARCHIVED
        elif syntax in DICOM_SYNTAXES:
            chosen = frozenset({syntax})
        else:
            continue
        candidates.append((media.q, index, chosen))
    best = _best(candidates)
    if not best:
        raise _not_acceptable(header, "DICOM instances")
    return frozenset().union(*best)


def frame_media(header: str | None) -> tuple[str, tuple[str, ...]]:
    """The media type and transfer syntaxes of frames or bulk data (PS3.18 8.7.3.5.3).

    ``application/octet-stream`` (Explicit VR Little Endian pixel cells, the default for
    ``*/*`` and a ``multipart/related`` without ``type``) or ``image/jls`` (JPEG-LS,
    Lossless by default, Near-Lossless when named). The first range of the highest ``q``
    wins.

    Raises
    ------
    HTTPException
        406 when neither is acceptable.
    """
    candidates: list[tuple[float, int, tuple[str, tuple[str, ...]]]] = []
    for index, media in enumerate(parse_accept(header)):
        if media.q <= 0:
            continue
        syntax = media.params.get("transfer-syntax")
        inner = media.inner
        if _matches(inner, OCTET_STREAM) and syntax in (None, "*", ExplicitVRLittleEndian):
            candidates.append((media.q, index, (OCTET_STREAM, (ExplicitVRLittleEndian,))))
        elif _matches(inner, JLS):
            if syntax in (None, "*"):
                candidates.append((media.q, index, (JLS, JLS_SYNTAXES)))
            elif syntax in JLS_SYNTAXES:
                candidates.append((media.q, index, (JLS, (syntax,))))
    best = _best(candidates)
    if not best:
        raise _not_acceptable(header, "pixel data")
    return best[0]


def rendered_media(header: str | None) -> str:
    """The image media type of a rendered answer (PS3.18 8.7.4): PNG (default) or JPEG.

    Raises
    ------
    HTTPException
        406 when neither ``image/png`` nor ``image/jpeg`` is acceptable.
    """
    candidates: list[tuple[float, int, str]] = []
    for index, media in enumerate(parse_accept(header)):
        if media.q <= 0:
            continue
        for media_type in (PNG, JPEG):
            if _matches(media.inner, media_type):
                candidates.append((media.q, index, media_type))
                break
    best = _best(candidates)
    if not best:
        raise _not_acceptable(header, "a rendered image (image/png, image/jpeg)")
    return best[0]


def metadata_acceptable(header: str | None) -> None:
    """Check that DICOM JSON (PS3.18 F.2) is acceptable for a metadata answer.

    Raises
    ------
    HTTPException
        406 when neither ``application/dicom+json`` nor ``application/json`` is acceptable.
    """
    for media in parse_accept(header):
        if media.q > 0 and any(_matches(media.inner, kind) for kind in (DICOM_JSON, "application/json")):
            return
    raise _not_acceptable(header, "metadata (application/dicom+json)")


def sendable(syntaxes: Iterable[str]) -> frozenset[tuple[str, str]]:
    """(SOP Class UID, Transfer Syntax UID) pairs of ``syntaxes`` for every Storage SOP Class.

    What :meth:`latentpacs.service.Service.returned` takes, as a C-GET SCU's accepted
    presentation contexts (PS3.4 C.4.3.3) would say it.
    """
    return _sendable(frozenset(syntaxes))


@lru_cache(maxsize=64)
def _sendable(syntaxes: frozenset[str]) -> frozenset[tuple[str, str]]:
    return frozenset((sop_class, syntax) for sop_class in STORAGE_CLASSES for syntax in syntaxes)
